"""Fast checks of benchmarks/em_layer.py on a tiny seeded conv: JSON keys, the reference EM's layout, and
that the reference (materialised X~(m - c)) and bitdown's Gram EM minimise the same objective."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import em_layer  # noqa: E402

from bitdown.em import kmeans, subvectors  # noqa: E402

TINY = (8, 8, 3, 6, 8, 0)  # c_out, c_in, k, n_images, hw, seed: 64 subvectors of size 9


@pytest.fixture
def li(monkeypatch):
    try:
        mod = _common.load_layer_inputs()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    monkeypatch.setitem(mod.CASES, "tiny", TINY)
    monkeypatch.setattr(em_layer, "load_layer_inputs", lambda: mod)
    return mod


def test_run_case_json(li):
    out = em_layer.run_case("tiny", "paper", ref_iters=1, n_centroids=16, repeats=1)
    json.dumps(out)
    for key in ("case", "stats_s", "em_s", "out_rel_err", "n_iter", "config", "ref_iter_s", "speedup_per_iter",
                "em_iter_s", "ref_out_rel_err", "machine"):
        assert key in out, key
    assert out["case"] == "tiny" and out["config"] == "paper" and out["n_iter"] >= 1
    assert out["em_s"] > 0 and out["ref_iter_s"] > 0 and 0 < out["out_rel_err"] < 1
    assert len(out["machine"]["loadavg_start"]) == 3
    best = em_layer.run_case("tiny", "best", ref_iters=1, n_centroids=16, repeats=1)
    assert best["full_gram"] and best["out_rel_err"] <= out["out_rel_err"] + 1e-3


def test_reference_layout(li):
    inp = li.make_inputs(*TINY)
    w, x = inp["W"], inp["X"]
    m = em_layer.ref_subvectors(w, 9)                                       # (d, nb * C_out)
    assert torch.equal(m, subvectors(w, 9).permute(2, 1, 0).reshape(9, -1))
    gen = torch.Generator().manual_seed(3)
    a = em_layer.ref_sample_rows(x, 3, 2, 1, 5, 9, gen)                     # stride 2 on purpose
    cols = F.unfold(x, 3, padding=1, stride=2)
    idx = torch.randint(0, x.shape[0] * cols.shape[2], (5,), generator=torch.Generator().manual_seed(3))
    rows = torch.stack([cols[i // cols.shape[2], :, i % cols.shape[2]] for i in idx.tolist()])
    assert torch.equal(a, torch.cat(rows.chunk(rows.shape[1] // 9, dim=1), dim=0))
    w_hat, _, _ = em_layer.reference_em(inp, m.shape[1], 1)                 # one centroid per subvector
    assert torch.equal(w_hat, w)


def _all_rows(x: torch.Tensor, r: int) -> torch.Tensor:
    """Every im2col row (stride 1, padding 1), stacked over the 9-blocks like the reference's samples."""
    cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, r)        # (rows, R)
    return torch.cat(cols.chunk(r // 9, dim=1), dim=0)                      # (nb * rows, 9)


def test_reference_and_bitdown_same_objective(li):
    inp = li.make_inputs(*TINY)
    w, x = inp["W"], inp["X"]
    stats, _ = _common.conv_stats(inp, 9, full_gram=False)
    cfg = replace(em_layer.CONFIGS["paper"], n_iter=200, tol=0.0)          # run bitdown's EM to its fixed point
    res = kmeans(w, stats.block_grams, 16, cfg)
    a, m = _all_rows(x, w[0].numel()), em_layer.ref_subvectors(w, 9)
    dist = em_layer.ref_distances(a, m, res.codebook)                       # materialised ||X~(m - c)||^2
    assert dist.min(0).values.double().sum().item() == pytest.approx(res.objective, rel=1e-4)
    ref_codes = dist.argmin(0).reshape(-1, w.shape[0]).t()                  # (C_out, nb)
    assert (ref_codes == res.codes).float().mean() > 0.95                   # float32 ties aside
    # bitdown's converged codebook is a fixed point of the original's E+M step on all rows
    new, codes, n_empty = em_layer.ref_step(a, m, res.codebook.clone(), torch.Generator().manual_seed(0))
    assert n_empty == 0 and torch.allclose(new, res.codebook, atol=1e-5, rtol=1e-4)


def test_best_no_worse_than_reference(li):
    inp = li.make_inputs(*TINY)
    w, x = inp["W"], inp["X"]
    stats, _ = _common.conv_stats(inp, 9, full_gram=True)
    res = kmeans(w, stats.block_grams, 16, em_layer.CONFIGS["best"], full_gram=stats.full_gram)
    w_ref, _, _ = em_layer.reference_em(inp, 16, 10)
    err_ref = li.out_rel_err(w, w_ref, x, 1, 1)
    assert li.out_rel_err(w, res.weight(w.shape), x, 1, 1) <= err_ref
