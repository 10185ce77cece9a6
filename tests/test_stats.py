"""Calibration statistics: Grams from forward hooks checked against a brute-force input matrix X.

X is built independently of unfold: column r of X_g is the output of the layer whose every filter of
group g is the one-hot vector e_r (in (C_in, kh, kw) order), so it honours stride, padding, dilation
and groups by construction.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn

from bitdown import lagstats, stats
from bitdown.stats import LayerStats, StatsCollector, collect_stats, run_until
from _brute import brute_x  # noqa: E402




def brute_stats(module, x, d):
    X = brute_x(module, x)
    g, rows, r_len = X.shape
    nb = r_len // d
    full = X.transpose(1, 2) @ X                                                      # (g, R, R)
    blocks = torch.stack([torch.stack([full[gi, b * d:(b + 1) * d, b * d:(b + 1) * d] for b in range(nb)])
                          for gi in range(g)])                                        # (g, nb, d, d)
    return blocks, full, rows


LAYERS = {
    "conv3x3": (lambda: nn.Conv2d(4, 6, 3), 9),
    "conv3x3_half_kernel_block": (lambda: nn.Conv2d(4, 6, 3), 3),
    "conv1x1": (lambda: nn.Conv2d(8, 6, 1), 4),
    "conv1x1_strided": (lambda: nn.Conv2d(8, 6, 1, stride=2), 4),
    "conv5x5": (lambda: nn.Conv2d(2, 4, 5, padding=2), 25),
    "grouped": (lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), 9),
    "grouped_2kernels": (lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), 18),
    "depthwise": (lambda: nn.Conv2d(4, 4, 3, groups=4, padding=1), 9),
    "strided": (lambda: nn.Conv2d(3, 4, 3, stride=2), 9),
    "dilated": (lambda: nn.Conv2d(3, 4, 3, dilation=2), 9),
    "padded": (lambda: nn.Conv2d(3, 4, 3, padding=2), 9),
    "asym": (lambda: nn.Conv2d(3, 4, (3, 1), stride=(2, 1), padding=(1, 0), dilation=(1, 2)), 3),
    "depthwise_strided": (lambda: nn.Conv2d(4, 4, 3, stride=2, groups=4, padding=1), 9),
    "grouped_strided_dilated": (lambda: nn.Conv2d(4, 6, 3, stride=2, groups=2, padding=2, dilation=2), 9),
    "conv3x3_wide": (lambda: nn.Conv2d(17, 4, 3, padding=1), 9),       # R = 153: the Gram in two row blocks
    "linear": (lambda: nn.Linear(12, 5), 4),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_grams_match_brute_force(name):
    torch.manual_seed(0)
    make, d = LAYERS[name]
    layer = make()
    in_ch = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    x = torch.randn(3, in_ch) if isinstance(layer, nn.Linear) else torch.randn(3, in_ch, 9, 8)
    with StatsCollector(name, layer, d, full_gram=True) as col:
        layer(x)
    st = col.stats
    blocks, full, rows = brute_stats(layer, x, d)
    assert st.block_grams.dtype == torch.float64 and st.full_gram.dtype == torch.float64
    assert st.block_grams.shape == blocks.shape
    torch.testing.assert_close(st.block_grams, blocks, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.full_gram, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.gram, blocks.sum((0, 1)), rtol=1e-5, atol=1e-5)
    assert st.gram.shape == (d, d)
    assert st.n_rows == rows
    assert st.n_images == (0 if isinstance(layer, nn.Linear) else 3)
    assert not layer._forward_pre_hooks  # hook removed on exit


@pytest.mark.parametrize("name", list(LAYERS))
def test_every_statistic_matches_brute_force(name):
    """The hook's products (block Grams alone, and full + cross Grams with column sums) against the
    brute-force X and the teacher's T: X^T X, X^T T, column sums."""
    torch.manual_seed(0)
    make, d = LAYERS[name]
    layer = make()
    shape = (3, layer.in_features) if isinstance(layer, nn.Linear) else (3, layer.in_channels, 9, 8)
    x, t = torch.randn(shape), torch.randn(shape)
    X, T = brute_x(layer, x), brute_x(layer, t)                                  # (g, rows, R)
    with StatsCollector(name, layer, d) as alone:
        layer(x)
    col = StatsCollector(name, layer, d, full_gram=True, cross_gram=True)
    col.reference = t
    with torch.no_grad():
        layer(x)
    col.remove()
    st = col.stats
    blocks = brute_stats(layer, x, d)[0]
    close = {"rtol": 1e-5, "atol": 1e-4}
    torch.testing.assert_close(alone.stats.block_grams, blocks, **close)
    torch.testing.assert_close(st.block_grams, blocks, **close)
    torch.testing.assert_close(st.full_gram, X.transpose(1, 2) @ X, **close)
    torch.testing.assert_close(st.cross_gram, X.transpose(1, 2) @ T, **close)
    torch.testing.assert_close(st.in_sum, X.sum(1), **close)
    torch.testing.assert_close(st.ref_sum, T.sum(1), **close)
    assert st.n_rows == alone.stats.n_rows == X.shape[1]


def test_position_subsample_is_the_seeded_rows_of_x_and_t():
    """positions=P: the statistics of P seeded output positions per image (the same rows of X and T), so the
    Grams are the brute-force ones on those rows; a layer with fewer positions keeps them all."""
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    x, t = torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)                 # 5 x 4 = 20 positions per image
    col = StatsCollector("c", layer, 9, full_gram=True, cross_gram=True, positions=6, seed=3)
    col.reference, col.batch = t, 5                    # global batch 5: the draw depends on (seed, batch) only
    with torch.no_grad():
        layer(x)
    col.remove()
    pick = torch.randperm(20, generator=torch.Generator().manual_seed(3 * 1_000_003 + 5))[:6].sort().values
    rows = torch.cat([pick, pick + 20])                                        # both images, same positions
    X, T = brute_x(layer, x)[:, rows], brute_x(layer, t)[:, rows]
    close = {"rtol": 1e-5, "atol": 1e-4}
    torch.testing.assert_close(col.stats.full_gram, X.transpose(1, 2) @ X, **close)
    torch.testing.assert_close(col.stats.cross_gram, X.transpose(1, 2) @ T, **close)
    torch.testing.assert_close(col.stats.ref_sum, T.sum(1), **close)
    assert col.stats.n_rows == 12
    with StatsCollector("c", layer, 9, full_gram=True, positions=20) as everything:
        layer(x)
    torch.testing.assert_close(everything.stats.full_gram, brute_stats(layer, x, 9)[1], **close)


def test_position_draw_depends_on_the_global_batch_not_on_the_collector_history():
    """Two ranks each holding every other batch (dist.shard) draw the positions one process draws: the
    summed statistics are the same (the draw is seeded by the global batch index, not by call count)."""
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3, padding=1)
    batches = [torch.randn(2, 3, 8, 8) for _ in range(4)]

    def collect(indices):
        col = StatsCollector("c", layer, 9, full_gram=True, positions=10, seed=1)
        for b in indices:
            col.batch = b
            with torch.no_grad():
                layer(batches[b])
        col.remove()
        return col.stats.full_gram
    torch.testing.assert_close(collect([0, 2]) + collect([1, 3]), collect([0, 1, 2, 3]), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("full", [False, True])
def test_string_padding_is_a_clear_error_on_every_path(padding, full):
    layer = nn.Conv2d(4, 8, 3, padding=padding)
    col = StatsCollector("c", layer, 9, full_gram=full)
    with pytest.raises(ValueError, match="string padding"), torch.no_grad():
        layer(torch.randn(1, 4, 8, 8))
    col.remove()


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 5), (9, 8)])
@pytest.mark.parametrize("conv", [dict(kernel_size=3, padding=1), dict(kernel_size=3), dict(kernel_size=5, padding=2),
                                  dict(kernel_size=3, padding=3, dilation=2), dict(kernel_size=(1, 3), padding=(2, 0)),
                                  dict(kernel_size=3, padding=4), dict(kernel_size=3, padding=1, groups=3)])
def test_lagged_products_match_brute_force(conv, size):
    """lagstats (stride-1 convs) on any geometry, including images smaller than the kernel span and padding
    wider than it, whether or not worth_it would pick it."""
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 3, **conv)
    x, t = torch.randn(2, 3, *size), torch.randn(2, 3, *size)
    try:
        X, T = brute_x(layer, x), brute_x(layer, t)
    except RuntimeError:
        pytest.skip("the kernel does not fit the padded image")
    g, r = layer.groups, X.shape[2]
    full, cross = torch.zeros(g, r, r, dtype=torch.float64), torch.zeros(g, r, r, dtype=torch.float64)
    in_sum, ref_sum = torch.zeros(g, r, dtype=torch.float64), torch.zeros(g, r, dtype=torch.float64)
    assert lagstats.applies(layer)
    assert lagstats.accumulate(layer, x, t, full, in_sum, cross, ref_sum, stats.patch_view) == X.shape[1]
    close = {"rtol": 1e-5, "atol": 1e-4}
    torch.testing.assert_close(full, X.transpose(1, 2) @ X, **close)
    torch.testing.assert_close(cross, X.transpose(1, 2) @ T, **close)
    torch.testing.assert_close(in_sum, X.sum(1), **close)
    torch.testing.assert_close(ref_sum, T.sum(1), **close)


def test_hook_takes_lagged_products_where_they_pay(monkeypatch):
    """A 3x3 conv on 32 x 32 images goes through lagstats (and matches brute force); an 8 x 8 one does not."""
    torch.manual_seed(0)
    layer = nn.Conv2d(2, 3, 3, padding=1)
    assert lagstats.worth_it(layer, 32, 32, True) and not lagstats.worth_it(layer, 8, 8, True)
    calls = []
    orig = lagstats.accumulate
    monkeypatch.setattr(lagstats, "accumulate", lambda *a: calls.append(1) or orig(*a))
    x, t = torch.randn(2, 2, 32, 32), torch.randn(2, 2, 32, 32)
    col = StatsCollector("c", layer, 9, full_gram=True, cross_gram=True)
    col.reference = t
    with torch.no_grad():
        layer(x)
    col.remove()
    assert calls == [1]
    X, T = brute_x(layer, x), brute_x(layer, t)
    torch.testing.assert_close(col.stats.full_gram, X.transpose(1, 2) @ X, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(col.stats.cross_gram, X.transpose(1, 2) @ T, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(col.stats.block_grams, brute_stats(layer, x, 9)[0], rtol=1e-5, atol=1e-3)
    with StatsCollector("c", layer, 9, full_gram=True):
        layer(x[:, :, :8, :8])
    assert calls == [1]


def test_output_is_x_times_weight():
    """Sanity of the brute-force X itself: X_g W_g^T reproduces the conv output."""
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, bias=False).double()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    X = brute_x(layer, x)                                                   # (g, rows, R)
    w = layer.weight.reshape(2, 3, -1)                                      # (g, opg, R)
    y = layer(x)                                                            # (N, 6, H, W)
    for gi in range(2):
        pred = X[gi] @ w[gi].T                                              # (rows, opg)
        ref = y[:, gi * 3:(gi + 1) * 3].permute(0, 2, 3, 1).reshape(-1, 3)
        torch.testing.assert_close(pred, ref.detach())


def test_linear_rows_of_3d_input():
    torch.manual_seed(0)
    layer = nn.Linear(8, 3)
    x = torch.randn(2, 5, 8)
    with StatsCollector("fc", layer, 4, full_gram=True) as col:
        layer(x)
    X = x.reshape(-1, 8).double()
    assert col.stats.n_rows == 10
    torch.testing.assert_close(col.stats.full_gram[0], X.T @ X, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(col.stats.block_grams[0, 1], X[:, 4:].T @ X[:, 4:], rtol=1e-5, atol=1e-5)


def test_full_gram_only_on_request():
    layer = nn.Conv2d(3, 4, 3)
    with StatsCollector("c", layer, 9) as col:
        layer(torch.randn(2, 3, 5, 5))
    assert col.stats.full_gram is None


def test_accumulates_over_batches_and_merge_is_addition():
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3, padding=1)
    a, b = torch.randn(3, 4, 6, 6), torch.randn(2, 4, 6, 6)

    def run(*xs):
        with StatsCollector("c", layer, 9, full_gram=True) as col:
            for x in xs:
                layer(x)
        return col.stats

    both, sa, sb = run(a, b), run(a), run(b)
    merged = sa.merge(sb)
    torch.testing.assert_close(merged.block_grams, both.block_grams)  # same float32 partial sums
    torch.testing.assert_close(merged.full_gram, both.full_gram)
    assert merged.n_rows == both.n_rows == 5 * 36 and merged.n_images == both.n_images == 5
    one = run(torch.cat([a, b]))
    torch.testing.assert_close(one.block_grams, both.block_grams, rtol=1e-5, atol=1e-5)


def test_merge_rejects_other_shapes():
    a = LayerStats(4, torch.zeros(1, 2, 4, 4, dtype=torch.float64), None)
    b = LayerStats(4, torch.zeros(1, 3, 4, 4, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(b)


@pytest.mark.parametrize("stride", [1, 2])
def test_chunking_gives_same_result(monkeypatch, stride):
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3, stride=stride, padding=1)
    x, t = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)

    def run():
        col = StatsCollector("c", layer, 9, full_gram=True, cross_gram=True)
        col.reference = t
        with torch.no_grad():
            layer(x)
        col.remove()
        return col.stats

    ref = run()
    monkeypatch.setattr(stats, "CHUNK_ELEMENTS", 1)             # one output row per product
    chunks = []
    orig = stats._position_chunks
    monkeypatch.setattr(stats, "_position_chunks", lambda v: chunks.extend(orig(v)) or iter(chunks))
    small = run()
    assert len(chunks) == 5 * (8 if stride == 1 else 4)          # 5 images x their output rows
    for f in ("block_grams", "full_gram", "cross_gram", "in_sum", "ref_sum"):
        torch.testing.assert_close(getattr(small, f), getattr(ref, f), rtol=1e-5, atol=1e-5)
    assert small.n_rows == ref.n_rows == 5 * (64 if stride == 1 else 16)


@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
def test_non_finite_activation_raises(bad):
    layer = nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 5, 5)
    x[1, 0, 2, 2] = bad
    with StatsCollector("blk.conv", layer, 9) as _:
        with pytest.raises(ValueError, match=r"non-finite.*'blk.conv'"):
            layer(x)


def test_block_size_must_divide_row():
    with pytest.raises(ValueError, match="does not divide"):
        StatsCollector("c", nn.Conv2d(3, 4, 3), 4)


@pytest.mark.parametrize("layer", [nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
                                   nn.Conv2d(3, 4, 3, padding="same")])
def test_unsupported_padding_raises(layer):
    with StatsCollector("c", layer, 9):
        with pytest.raises(ValueError, match="padding"):
            layer(torch.randn(1, 3, 5, 5))


class Three(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.unused = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.b(torch.relu(self.a(x))).mean((2, 3)))


def test_collect_stats_one_pass_several_layers():
    torch.manual_seed(0)
    m = Three()
    batches = [torch.randn(2, 3, 6, 6), torch.randn(3, 3, 6, 6)]
    out = collect_stats(m, {"b": (m.b, 4), "fc": (m.fc, 2)}, batches, full_gram=True)
    with torch.no_grad():
        h = torch.cat([m.b(torch.relu(m.a(x))).mean((2, 3)) for x in batches]).double()
        hb = torch.cat([torch.relu(m.a(x)).permute(0, 2, 3, 1).reshape(-1, 4) for x in batches]).double()
    torch.testing.assert_close(out["fc"].full_gram[0], h.T @ h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["b"].full_gram[0], hb.T @ hb, rtol=1e-5, atol=1e-6)
    assert out["fc"].n_rows == 5 and out["b"].n_rows == 5 * 36
    assert not any(mod._forward_pre_hooks for mod in m.modules())


def test_collect_stats_unused_layer_raises():
    m = Three()
    with pytest.raises(ValueError, match=r"'unused' received no input"):
        collect_stats(m, {"unused": (m.unused, 2)}, [torch.randn(1, 3, 4, 4)])
    assert not any(mod._forward_pre_hooks for mod in m.modules())


def test_run_until_stops_before_last_but_collects_its_input():
    torch.manual_seed(0)
    m = Three()
    ran = []
    m.fc.register_forward_hook(lambda *a: ran.append("fc"))
    m.a.register_forward_hook(lambda *a: ran.append("a"))
    with StatsCollector("b", m.b, 4) as col:
        n = run_until(m, [torch.randn(2, 3, 4, 4), torch.randn(1, 3, 4, 4)], m.b)
    assert n == 3 and ran == ["a", "a"]          # b and fc never computed
    assert col.stats.n_rows == 3 * 16              # but b's inputs were seen
    assert len(m.b._forward_pre_hooks) == 0


def test_teacher_target_weight_maps_student_inputs_to_teacher_outputs():
    """When the student's input is a per-channel rescaling of the teacher's (a drift a linear layer can
    undo), W* reproduces the teacher's outputs; with noise it still beats W; identical inputs: W* == W."""
    from bitdown.stats import StatsCollector, teacher_target_weight
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1, bias=False, groups=2)
    xt = torch.randn(16, 6, 10, 10, generator=g)                       # teacher's input
    xs = xt * torch.linspace(0.5, 1.5, 6).view(1, 6, 1, 1) + 0.05 * torch.randn(16, 6, 10, 10, generator=g)
    col = StatsCollector("c", conv, 3, full_gram=True, cross_gram=True)
    col.reference = xt
    with torch.no_grad():
        conv(xs)
    col.remove()
    w_star = teacher_target_weight(conv.weight, col.stats, damp=1e-6)
    with torch.no_grad():
        want = conv(xt)
        err_w = (nn.functional.conv2d(xs, conv.weight, padding=1, groups=2) - want).pow(2).sum()
        err_star = (nn.functional.conv2d(xs, w_star, padding=1, groups=2) - want).pow(2).sum()
    assert err_star < 0.05 * err_w
    same = StatsCollector("c", conv, 3, full_gram=True, cross_gram=True)
    same.reference = xt
    with torch.no_grad():
        conv(xt)
    same.remove()
    assert torch.allclose(teacher_target_weight(conv.weight, same.stats), conv.weight, atol=1e-5)


def test_cross_gram_needs_reference_of_same_shape():
    from bitdown.stats import StatsCollector
    conv = nn.Conv2d(3, 4, 1, bias=False)
    with StatsCollector("c", conv, 3, full_gram=True, cross_gram=True):
        with pytest.raises(ValueError, match="teacher's input"):
            with torch.no_grad():
                conv(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="needs full_gram"):
        StatsCollector("c", conv, 3, cross_gram=True)


def test_subsampled_positions_rise_for_small_calibration_sets():
    sp = stats.subsample_positions
    assert sp(0, 144, 9, 256, 16) == 0                          # 0: every position, whatever the set
    assert sp(256, 144, 9, 256, 1024) == 256                    # plenty of images: the cap
    n = sp(256, 144, 9, 256, 16)                                # 16 images: >= 64 R rows in all
    assert n * 16 >= stats.MIN_ROWS_PER_INPUT * 144 and (n - 1) * 16 < stats.MIN_ROWS_PER_INPUT * 144
    n = sp(256, 9, 9, 4096, 100)                                # a depthwise conv with many centroids:
    assert n * 100 * 1 >= stats.MIN_SAMPLES_PER_CENTROID * 4096 > (n - 1) * 100    # >= 16 samples per centroid
