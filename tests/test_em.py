"""Output-aware EM: objectives against brute force, monotonicity, baselines, refinements, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from bitdown import em
from bitdown.config import EMConfig
from bitdown.em import exact_objective, kmeans, subvectors
from bitdown.stats import StatsCollector
from _brute import brute_x  # noqa: E402


# ----------------------------------------------------------------------------- helpers




def layer_stats(layer, x, d):
    with StatsCollector("l", layer, d, full_gram=True) as col:
        with torch.no_grad():
            layer(x)
    return col.stats


def correlated_case(seed, r_len=24, d=4, c_out=32, n=256):
    """A linear layer whose inputs are anisotropic within a block and correlated across blocks."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([4.0, 1.0, 0.25, 0.05], dtype=torch.float64).repeat(r_len // 4)
    mix = torch.eye(r_len, dtype=torch.float64) + 0.5 * torch.randn(r_len, r_len, generator=g,
                                                                   dtype=torch.float64) / r_len ** 0.5
    X = (torch.randn(n, r_len, generator=g, dtype=torch.float64) * scale) @ mix
    W = torch.randn(c_out, r_len, generator=g)
    H = X.T @ X
    nb = r_len // d
    bg = torch.stack([H[b * d:(b + 1) * d, b * d:(b + 1) * d] for b in range(nb)])[None]
    return W, X, H[None], bg


def exact(W, res, H):
    return exact_objective(W, res.weight(W.shape), H)[0]


# ----------------------------------------------------------------------------- objectives vs brute force

CASES = {
    "linear": (lambda: nn.Linear(12, 16, bias=False), (40, 12), 4, 8),
    "conv3x3": (lambda: nn.Conv2d(3, 16, 3, padding=1, bias=False), (3, 3, 6, 6), 9, 8),
    "conv3x3_d3": (lambda: nn.Conv2d(3, 8, 3, stride=2, bias=False), (3, 3, 7, 7), 3, 8),
    "grouped": (lambda: nn.Conv2d(4, 8, 3, groups=2, padding=1, bias=False), (3, 4, 6, 6), 3, 8),
    "depthwise": (lambda: nn.Conv2d(4, 8, 3, groups=4, dilation=2, padding=2, bias=False), (3, 4, 6, 6), 9, 2),
    "conv1x1": (lambda: nn.Conv2d(8, 16, 1, bias=False), (3, 8, 5, 5), 4, 8),
}


@pytest.mark.parametrize("name", list(CASES))
def test_exact_objective_is_output_error(name):
    """||X (W - W_hat)^T||^2 from the full Gram equals the layer's output error, computed directly."""
    torch.manual_seed(0)
    make, xshape, d, k = CASES[name]
    layer = make()
    x = torch.randn(*xshape)
    st = layer_stats(layer, x, d)
    res = kmeans(layer.weight, st.block_grams, k, EMConfig.paper(n_iter=5), full_gram=st.full_gram)
    w_hat = res.weight(layer.weight.shape)
    err, energy = exact_objective(layer.weight, w_hat, st.full_gram)
    dense = layer.double()
    with torch.no_grad():
        y = dense(x.double())
        dense.weight.copy_(w_hat.double())
        y_hat = dense(x.double())
    assert err == pytest.approx(float((y - y_hat).pow(2).sum()), rel=1e-5)
    assert energy == pytest.approx(float(y.pow(2).sum()), rel=1e-5)
    assert 0 < err < energy


@pytest.mark.parametrize("objective", ["pooled", "per_block", "weights"])
@pytest.mark.parametrize("name", ["linear", "grouped", "conv3x3_d3"])
def test_em_objective_matches_its_brute_force_definition(name, objective):
    torch.manual_seed(1)
    make, xshape, d, k = CASES[name]
    layer = make()
    x = torch.randn(*xshape)
    st = layer_stats(layer, x, d)
    res = kmeans(layer.weight, st.block_grams, k, EMConfig.paper(n_iter=10, objective=objective))
    X = brute_x(layer, x)                                                # (g, rows, R)
    g, _, r_len = X.shape
    nb = r_len // d
    W = layer.weight.detach().double().reshape(g, -1, nb, d)             # (g, opg, nb, d)
    E = W - res.weight(layer.weight.shape).double().reshape(W.shape)     # errors of every subvector
    if objective == "per_block":      # sum_{o,b} ||X_b e_{o,b}||^2
        ref = sum(float((X[gi, :, b * d:(b + 1) * d] @ E[gi, :, b].T).pow(2).sum())
                  for gi in range(g) for b in range(nb))
        energy = sum(float((X[gi, :, b * d:(b + 1) * d] @ W[gi, :, b].T).pow(2).sum())
                     for gi in range(g) for b in range(nb))
    elif objective == "pooled":       # sum_{o,b} sum_{g', b'} ||X_{g',b'} e_{o,b}||^2
        Ef, Wf = E.reshape(-1, d), W.reshape(-1, d)
        ref = sum(float((X[gi, :, b * d:(b + 1) * d] @ Ef.T).pow(2).sum()) for gi in range(g) for b in range(nb))
        energy = sum(float((X[gi, :, b * d:(b + 1) * d] @ Wf.T).pow(2).sum()) for gi in range(g) for b in range(nb))
    else:                             # plain k-means on the weights (its objective is only checked
        ref, energy = float(E.pow(2).sum()), float(W.pow(2).sum())  # through rel_error: scale-free)
    if objective != "weights":
        assert res.objective == pytest.approx(ref, rel=1e-4, abs=1e-6 * energy)
    assert res.rel_error == pytest.approx(math.sqrt(ref / energy), rel=1e-3)
    assert not res.exact


def test_output_aware_beats_weight_space_kmeans_on_correlated_inputs():
    for seed in range(4):
        W, X, H, bg = correlated_case(seed)
        aware = kmeans(W, bg, 16, EMConfig.paper(), seed=seed)
        ident = kmeans(W, torch.eye(4, dtype=torch.float64).expand_as(bg).clone(), 16, EMConfig.paper(), seed=seed)
        baseline = kmeans(W, bg, 16, EMConfig.paper(objective="weights"), seed=seed)
        assert exact(W, aware, H) < 0.8 * exact(W, ident, H)
        assert exact(W, aware, H) < 0.8 * exact(W, baseline, H)
        # the 'weights' objective is exactly k-means with an identity Gram
        assert torch.equal(baseline.codes, ident.codes)


@pytest.mark.parametrize("objective", ["pooled", "per_block", "weights"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_objective_history_never_increases(objective, seed):
    W, X, H, bg = correlated_case(seed, c_out=64)
    res = kmeans(W, bg, 32, EMConfig.paper(n_iter=40, tol=0.0, objective=objective), seed=seed)
    h = res.history
    assert len(h) >= 3 and res.n_iter == len(h) - 1
    for a, b in zip(h, h[1:]):
        assert b <= a + 1e-6 * h[0]
    assert h[-1] < h[0]
    assert res.objective == pytest.approx(h[-1])


def test_more_centroids_less_error():
    W, X, H, bg = correlated_case(3, c_out=64)
    errs = [kmeans(W, bg, k, EMConfig.paper(n_restarts=2), seed=0).objective for k in (2, 4, 8, 16, 32, 64)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    exacts = [exact(W, kmeans(W, bg, k, EMConfig.paper(n_restarts=2), seed=0), H) for k in (2, 8, 32)]
    assert exacts[0] > exacts[1] > exacts[2]


@pytest.mark.parametrize("k", [8, 16])
def test_degenerate_more_centroids_than_subvectors(k):
    torch.manual_seed(0)
    W = torch.randn(2, 8)                         # 4 subvectors of d = 4
    bg = torch.eye(4, dtype=torch.float64).expand(1, 2, 4, 4).clone()
    res = kmeans(W, bg, k, EMConfig.paper(code_reopt=1), full_gram=torch.eye(8, dtype=torch.float64)[None])
    assert res.codebook.shape == (k, 4) and res.codes.shape == (2, 2)
    assert int(res.codes.max()) < k and res.codes.unique().numel() == 4
    torch.testing.assert_close(res.weight(W.shape), W)
    assert res.objective == pytest.approx(0.0, abs=1e-10)


def test_exactly_as_many_centroids_as_subvectors():
    W = torch.randn(4, 4)
    res = kmeans(W, torch.eye(2, dtype=torch.float64).expand(1, 2, 2, 2).clone(), 8)
    torch.testing.assert_close(res.weight(W.shape), W)


def test_deterministic_given_seed():
    W, X, H, bg = correlated_case(0)
    for cfg in (EMConfig.paper(), EMConfig.paper(init="random", n_restarts=2), EMConfig.paper(objective="per_block")):
        a = kmeans(W, bg, 16, cfg, seed=5)
        b = kmeans(W, bg, 16, cfg, seed=5)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.codebook, b.codebook)
        assert a.history == b.history
    c = kmeans(W, bg, 16, EMConfig.paper(), seed=6)
    a = kmeans(W, bg, 16, EMConfig.paper(), seed=5)
    assert not torch.equal(a.codebook, c.codebook)


def test_restarts_keep_the_best():
    W, X, H, bg = correlated_case(1)
    one = kmeans(W, bg, 16, EMConfig.paper(n_restarts=1), seed=3)
    many = kmeans(W, bg, 16, EMConfig.paper(n_restarts=4), seed=3)
    assert many.objective <= one.objective


def test_split_empty_refills_from_largest_cluster():
    cb = torch.tensor([[1.0, 2.0], [5.0, 5.0], [0.0, 0.0], [9.0, 9.0]], dtype=torch.float64)
    counts = torch.tensor([10, 3, 0, 0])
    n = em._split_empty(cb, counts)
    assert n == 2
    assert len({tuple(r.tolist()) for r in cb}) == 4                     # all codewords distinct now
    assert torch.allclose(cb[2], torch.tensor([1.0, 2.0], dtype=torch.float64), atol=0.05)
    assert torch.equal(cb[1], torch.tensor([5.0, 5.0], dtype=torch.float64))


def test_empty_clusters_get_split(monkeypatch):
    """All initial codewords identical: every cluster but one is empty; splitting must revive them."""
    W, X, H, bg = correlated_case(2, c_out=64)
    monkeypatch.setattr(em, "_init", lambda points, k, *a, **kw: torch.zeros(k, dtype=torch.long))
    res = kmeans(W, bg, 8, EMConfig.paper(n_iter=50), seed=0)
    counts = torch.bincount(res.codes.reshape(-1), minlength=8)
    assert (counts > 0).all(), counts
    monkeypatch.undo()
    one = kmeans(W, bg, 2, EMConfig.paper(n_iter=50), seed=0)
    assert res.objective < one.objective


@pytest.mark.parametrize("cfg", [
    EMConfig.paper(error_feedback=True),
    EMConfig.paper(code_reopt=2),
    EMConfig.paper(codebook_refit=True),
    EMConfig.paper(code_reopt=1, codebook_refit=True),
    EMConfig.paper(error_feedback=True, code_reopt=1, codebook_refit=True),
], ids=["error_feedback", "code_reopt", "codebook_refit", "reopt+refit", "all"])
def test_refinements_do_not_worsen_exact_objective(cfg):
    for seed in range(3):
        W, X, H, bg = correlated_case(seed)
        plain = kmeans(W, bg, 16, EMConfig.paper(), seed=seed)
        better = kmeans(W, bg, 16, cfg, seed=seed, full_gram=H)
        assert better.exact and better.objective == pytest.approx(exact(W, better, H), rel=1e-9)
        assert better.objective <= exact(W, plain, H) * (1 + 1e-9)
        assert better.codes.shape == plain.codes.shape and better.codebook.dtype == torch.float32


def test_refinements_on_grouped_conv():
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 8, 3, groups=2, padding=1, bias=False)
    x = torch.randn(4, 4, 6, 6)
    x[:, 1] = 0.9 * x[:, 0] + 0.1 * x[:, 1]    # correlated channels
    st = layer_stats(layer, x, 3)
    plain = kmeans(layer.weight, st.block_grams, 8, EMConfig.paper(), seed=0)
    ref = exact_objective(layer.weight, plain.weight(layer.weight.shape), st.full_gram)[0]
    for cfg in (EMConfig.paper(code_reopt=2), EMConfig.paper(codebook_refit=True)):
        res = kmeans(layer.weight, st.block_grams, 8, cfg, seed=0, full_gram=st.full_gram)
        assert res.objective <= ref * (1 + 1e-9)


# ----------------------------------------------------------------------------- errors


def test_nan_weights_rejected():
    W = torch.randn(8, 8)
    W[3, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        kmeans(W, torch.eye(4, dtype=torch.float64).expand(1, 2, 4, 4).clone(), 4)


def test_inf_weights_rejected():
    W = torch.randn(8, 8)
    W[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        kmeans(W, torch.eye(4, dtype=torch.float64).expand(1, 2, 4, 4).clone(), 4)


@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (1, 2, 3, 3), (3, 2, 4, 4)], ids=["nb", "d", "groups"])
def test_mismatched_stats_shape_rejected(shape):
    W = torch.randn(8, 8)                           # d=4 -> nb=2; d=3 does not divide 8; 3 groups vs 8 rows
    with pytest.raises(ValueError, match="do(es)? not (match|divide)"):
        kmeans(W, torch.eye(shape[-1], dtype=torch.float64).expand(*shape).clone(), 4)


def test_nan_stats_rejected():
    bg = torch.eye(4, dtype=torch.float64).expand(1, 2, 4, 4).clone()
    bg[0, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        kmeans(torch.randn(8, 8), bg, 4)


@pytest.mark.parametrize("cfg", [EMConfig.paper(error_feedback=True), EMConfig.paper(code_reopt=1), EMConfig.paper(codebook_refit=True)])
def test_missing_full_gram_rejected(cfg):
    with pytest.raises(ValueError, match="full_gram"):
        kmeans(torch.randn(8, 8), torch.eye(4, dtype=torch.float64).expand(1, 2, 4, 4).clone(), 4, cfg)


@pytest.mark.parametrize("fg_shape", [(1, 6, 6), (2, 8, 8)], ids=["R", "groups"])
@pytest.mark.parametrize("cfg", [EMConfig.paper(error_feedback=True), EMConfig.paper(code_reopt=1), EMConfig.paper(codebook_refit=True)],
                         ids=["error_feedback", "code_reopt", "codebook_refit"])
def test_mismatched_full_gram_shape_rejected(cfg, fg_shape):
    fg = torch.eye(fg_shape[-1], dtype=torch.float64).expand(*fg_shape).clone()
    with pytest.raises(ValueError, match="full_gram|statistics"):
        kmeans(torch.randn(8, 8), torch.eye(4, dtype=torch.float64).expand(1, 2, 4, 4).clone(), 4, cfg,
               full_gram=fg)


@pytest.mark.parametrize("cfg", [EMConfig.paper(error_feedback=True), EMConfig.paper(code_reopt=1), EMConfig.paper(codebook_refit=True)],
                         ids=["error_feedback", "code_reopt", "codebook_refit"])
def test_nan_full_gram_rejected(cfg):
    fg = torch.eye(8, dtype=torch.float64)[None].clone()
    fg[0, 2, 3] = fg[0, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        kmeans(torch.randn(8, 8), torch.eye(4, dtype=torch.float64).expand(1, 2, 4, 4).clone(), 4, cfg,
               full_gram=fg)


def test_subvectors_layout():
    W = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)   # (C_out, C_in, kh, kw)
    sv = subvectors(W, 4)
    assert sv.shape == (2, 3, 4)
    assert sv[0, 1].tolist() == [4.0, 5.0, 6.0, 7.0]          # one whole kernel of input channel 1
    assert subvectors(W, 6)[1, 0].tolist() == [12.0, 13.0, 14.0, 15.0, 16.0, 17.0]
    with pytest.raises(ValueError, match="does not divide"):
        subvectors(W, 5)


@pytest.mark.parametrize("objective", ["pooled", "per_block"])
def test_chunked_assignment_is_identical(monkeypatch, objective):
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 8, 3, groups=2, padding=1, bias=False)
    st = layer_stats(layer, torch.randn(3, 4, 6, 6), 3)
    ref = kmeans(layer.weight, st.block_grams, 8, EMConfig.paper(objective=objective), seed=1)
    monkeypatch.setattr(em, "ROW_CHUNK", 1)           # one output row per E-step chunk
    res = kmeans(layer.weight, st.block_grams, 8, EMConfig.paper(objective=objective), seed=1)
    assert torch.equal(res.codes, ref.codes) and torch.equal(res.codebook, ref.codebook)


def test_dead_inputs_give_finite_results():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(100, 16, generator=g, dtype=torch.float64)
    X[:, 0] = 0
    X[:, 8:12] = 0                                      # one whole block position never active
    H = X.T @ X
    bg = torch.stack([H[b * 4:(b + 1) * 4, b * 4:(b + 1) * 4] for b in range(4)])[None]
    W = torch.randn(32, 16, generator=g)
    for cfg in (EMConfig.paper(), EMConfig.paper(objective="per_block"), EMConfig.paper(error_feedback=True),
                EMConfig.paper(code_reopt=1, codebook_refit=True)):
        res = kmeans(W, bg, 8, cfg, full_gram=H[None])
        assert torch.isfinite(res.codebook).all() and math.isfinite(res.objective)
        assert int(res.codes.max()) < 8
    zero = kmeans(W, torch.zeros(1, 4, 4, 4, dtype=torch.float64), 8)   # no signal at all
    assert zero.objective == 0.0 and torch.isfinite(zero.codebook).all()


def test_weights_objective_is_plain_kmeans_error():
    torch.manual_seed(0)
    W = torch.randn(16, 12)
    bg = torch.eye(4, dtype=torch.float64).expand(1, 3, 4, 4).clone()
    res = kmeans(W, bg, 8, EMConfig.paper(objective="weights"))
    assert res.objective == pytest.approx(float((W - res.weight(W.shape)).double().pow(2).sum()), rel=1e-5)
