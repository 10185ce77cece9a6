"""Size-budget allocation (allocate.py): budgets met exactly by the paper-style accounting,
unsatisfiable budgets refused before any work, allocation reproducible with a seed."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import bitdown
from bitdown.allocate import Option, allocate, budget_bytes, layer_options, parse_size, size_bounds
from bitdown.config import QuantConfig, resolve_plan


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()


@pytest.fixture()
def data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(32, 3, 12, 12, generator=g) for _ in range(4)]


def test_parse_size():
    assert parse_size("100KB") == 100 * 1024
    assert parse_size("1.5MB") == 1.5 * 2 ** 20
    assert parse_size("2048") == 2048
    with pytest.raises(ValueError, match="cannot parse"):
        parse_size("big")


def test_options_cost_is_paper_accounting():
    plans, _ = resolve_plan(net(), QuantConfig())
    p = next(p for p in plans if p.name == "3")                     # 32x16x3x3
    opts = layer_options(p, 9)
    o = next(o for o in opts if o.block_size == 9 and o.n_centroids == 64)
    assert o.bytes == 512 * 6 / 8 + 64 * 9 * 2
    assert all(o.n_centroids < (4608 // o.block_size) / 4 for o in opts if not o.keep)   # the paper's clamp
    assert {o.block_size for o in opts} <= {4, 8, 9, 16, 18, 32, 36, 144, 0}
    keep = [o for o in opts if o.keep]
    assert len(keep) == 1 and keep[0].bytes == 4608 * 4 and keep[0].distortion == 0.0    # fp32, exact


def test_allocate_meets_budget_and_prefers_low_distortion():
    opts = {"a": [Option(4, 2, 10, 0.9), Option(4, 4, 20, 0.5), Option(4, 8, 40, 0.1)],
            "b": [Option(4, 2, 10, 0.3), Option(4, 4, 20, 0.25), Option(4, 8, 40, 0.2)]}
    choice = allocate(opts, budget=100 + 60, other=100)
    assert sum(o.bytes for o in choice.values()) <= 60
    # the best split of 60 bytes: a 40 (0.1) + b 20 (0.25) = 0.35, better than 20 + 40 (0.7) or 40 + 10 (0.4)
    assert choice["a"].bytes == 40 and choice["b"].bytes == 20


def test_unsatisfiable_budget_refused_naming_smallest(data):
    model = net()
    plans, _ = resolve_plan(model, QuantConfig())
    smallest, dense, _ = size_bounds(model, plans)
    with pytest.raises(ValueError, match=r"smallest achievable size is .* MB"):
        budget_bytes(model, plans, target_ratio=dense / smallest * 1.5)
    with pytest.raises(ValueError, match="unsatisfiable"):
        bitdown.compress(model, data, QuantConfig(bn_recalibrate=False), target_size=10, progress=False)


@pytest.mark.parametrize("ratio", [6.0, 10.0])
def test_compress_to_ratio_meets_budget_and_is_reproducible(data, ratio):
    cfg = QuantConfig(calib_images=128, bn_recalibrate=False)
    q1 = bitdown.compress(net(), data, cfg, target_ratio=ratio, progress=False)
    rep = bitdown.size_report(q1, q1.bitdown.plans)
    assert rep.ratio >= ratio - 1e-9                                # budget met by the paper accounting
    assert rep.ratio < ratio * 1.3                                  # and mostly spent
    al = q1.bitdown.extra["allocation"]
    assert math.isclose(al["achieved_bytes"], rep.size_bytes)
    q2 = bitdown.compress(net(), data, cfg, target_ratio=ratio, progress=False)
    assert [(p.name, p.block_size, p.n_centroids) for p in q1.bitdown.plans] == \
           [(p.name, p.block_size, p.n_centroids) for p in q2.bitdown.plans]
    for (n, a), (_, b) in zip(q1.state_dict().items(), q2.state_dict().items()):
        assert torch.equal(a, b), n


def test_resumed_budget_run_reuses_the_allocation(data, tmp_path, monkeypatch):
    """A budget run with a checkpoint folder keeps its allocation there: a rerun skips the
    rate-distortion sweep and ends identical; another budget recomputes it."""
    import bitdown.allocate as ba
    from bitdown.serialize import file_tensors

    cfg = QuantConfig(calib_images=128, bn_recalibrate=False)
    ref = bitdown.compress(net(), data, cfg, target_ratio=8.0, progress=False)
    first = bitdown.compress(net(), data, cfg, target_ratio=8.0, progress=False, checkpoint_dir=tmp_path)
    assert (tmp_path / "allocation.json").exists()

    def no_sweep(*a, **k):
        raise AssertionError("rate-distortion sweep rerun")

    monkeypatch.setattr(ba, "measure_options", no_sweep)
    again = bitdown.compress(net(), data, cfg, target_ratio=8.0, progress=False, checkpoint_dir=tmp_path)
    for q in (first, again):
        assert q.bitdown.extra["allocation"] == ref.bitdown.extra["allocation"]
        assert q.bitdown.metadata(q) == ref.bitdown.metadata(ref)
        fa, fb = file_tensors(q), file_tensors(ref)
        assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    with pytest.raises(AssertionError, match="sweep rerun"):         # another budget: not the cached one
        bitdown.compress(net(), data, cfg, target_ratio=9.0, progress=False, checkpoint_dir=tmp_path / "b")


def test_tighter_budget_gives_more_error(data):
    cfg = QuantConfig(calib_images=128, bn_recalibrate=False)
    errs = []
    for ratio in (5.0, 12.0):
        q = bitdown.compress(net(), data, cfg, target_ratio=ratio, progress=False)
        errs.append(sum(v["rel_err2"] for v in q.bitdown.extra["allocation"]["layers"].values()))
    assert errs[1] > errs[0]


def test_generous_budget_keeps_layers_uncompressed(data):
    """With room to spare the allocation keeps some layers in fp32 (distortion 0); they are left
    dense, counted in fp32 by the accounting, and the budget still holds."""
    cfg = QuantConfig(calib_images=128, bn_recalibrate=False)
    q = bitdown.compress(net(), data, cfg, target_ratio=1.6, progress=False)
    layers = q.bitdown.extra["allocation"]["layers"]
    kept = [n for n, v in layers.items() if v["keep"]]
    assert kept and all(type(q.get_submodule(n)) in (nn.Conv2d, nn.Linear) for n in kept)
    assert all(n in q.bitdown.skipped for n in kept)
    assert bitdown.size_report(q, q.bitdown.plans).ratio >= 1.6 - 1e-9


# ----------------------------------------------------------------------------- sensitivity weighting

class TwoPaths(nn.Module):
    """Two parallel convs; the output reads `loud` at full scale and `quiet` scaled by 1e-3."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.loud = nn.Conv2d(3, 8, 3, padding=1)
        self.quiet = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc((self.loud(x) + 1e-3 * self.quiet(x)).mean((2, 3)))


def test_layer_sensitivity_measures_what_reaches_the_output(data):
    from bitdown.allocate import layer_sensitivity
    model = TwoPaths().eval()
    plans, _ = resolve_plan(model, QuantConfig(quantize_stem=True))
    s = layer_sensitivity(model, plans, data, progress=False)
    assert set(s) == {p.name for p in plans} >= {"loud", "quiet"}
    assert s["quiet"] < 1e-3 * s["loud"] and s["loud"] > 0
    assert s == layer_sensitivity(model, plans, data, progress=False)              # seeded
    with pytest.raises(ValueError, match="no calibration image"):
        layer_sensitivity(model, plans, [torch.zeros(0, 3, 12, 12)], progress=False)


class TwoMaps(nn.Module):
    """A detector-like output: two maps, `a` read by the first only, `b` by the second only; the second map is
    1000x larger, so a plain sum of squared errors would see only `b`."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return [self.a(x), 1e3 * self.b(x)]


def test_layer_sensitivity_on_several_output_tensors(data):
    """Each output tensor's error is normalised by its own energy (as the distillation loss): both layers count."""
    from bitdown.allocate import layer_sensitivity
    model = TwoMaps().eval()
    plans, _ = resolve_plan(model, QuantConfig(quantize_stem=True))
    s = layer_sensitivity(model, plans, data, progress=False)
    assert 0.5 < s["a"] / s["b"] < 2


class BackgroundMaps(nn.Module):
    """Two YOLO-like logit maps: `a`'s logits sit around -16 (background: sigmoid ~ 1e-7, saturated), `b`'s around
    0 (where a box's probability is decided). Relative noise of the same size in either layer moves each map's
    normalised MSE equally, but only `b`'s decoded probabilities."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(3, 16, 3, padding=1)
        with torch.no_grad():
            self.a.weight.mul_(0.05)
            self.a.bias.fill_(-16.0)
            self.b.bias.zero_()

    def forward(self, x):
        return [self.a(x), self.b(x)]


def test_layer_sensitivity_bce_reads_the_decoded_probabilities(data):
    """loss='bce' (QuantConfig.alloc_sensitivity_loss): a layer whose map is saturated background logits barely
    reaches the sigmoid outputs, though its normalised raw-map MSE is as large as the other layer's."""
    from bitdown.allocate import layer_sensitivity
    model = BackgroundMaps().eval()
    plans, _ = resolve_plan(model, QuantConfig(quantize_stem=True))
    mse = layer_sensitivity(model, plans, data, progress=False)
    bce = layer_sensitivity(model, plans, data, progress=False, loss="bce")
    assert 0.5 < mse["a"] / mse["b"] < 2
    assert bce["a"] < 0.01 * bce["b"] and bce["a"] > 0
    with pytest.raises(ValueError, match="loss must be one of 'mse', 'bce', 'kl'"):
        layer_sensitivity(model, plans, data, progress=False, loss="l1")
    with pytest.raises(ValueError, match="kl"):                       # class logits only: maps are refused
        layer_sensitivity(model, plans, data, progress=False, loss="kl")
    with pytest.raises(ValueError, match="alloc_sensitivity_loss"):
        QuantConfig(alloc_sensitivity_loss="l1")


class TailLogits(nn.Module):
    """A classifier whose logits come from two layers: `head` gives two classes near 0 (where the prediction is
    decided), `tail` eight classes near -30 (probability ~1e-13). The tail holds almost all the logits' energy."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.feat = nn.Conv2d(3, 64, 3, padding=1)
        self.head = nn.Linear(64, 2)
        self.tail = nn.Linear(64, 8)
        with torch.no_grad():
            self.tail.weight.mul_(0.05)
            self.tail.bias.fill_(-30.0)
            self.head.bias.zero_()

    def forward(self, x):
        z = self.feat(x).mean((2, 3))
        return torch.cat([self.head(z), self.tail(z)], 1)


def test_layer_sensitivity_kl_reads_the_predicted_distribution(data):
    """loss='kl': noise on the tail logits moves their normalised MSE most, the softmax hardly at all."""
    from bitdown.allocate import layer_sensitivity
    model = TailLogits().eval()
    plans, _ = resolve_plan(model, QuantConfig(quantize_stem=True))
    mse = layer_sensitivity(model, plans, data, progress=False)
    kl = layer_sensitivity(model, plans, data, progress=False, loss="kl")
    assert mse["tail"] > 10 * mse["head"]
    assert kl["tail"] < 1e-3 * kl["head"] and kl["head"] > 0


def test_budget_config_uses_the_sensitivity_loss(data):
    """The allocation weighted by the 'bce' sensitivity gives the probability-deciding layer the bytes."""
    from bitdown.allocate import budget_config
    model = BackgroundMaps().eval()
    reports = {}
    for loss in ("mse", "bce"):
        cfg = QuantConfig(quantize_stem=True, calib_images=128, alloc_weighting="sensitivity",
                          alloc_sensitivity_loss=loss)
        _, reports[loss] = budget_config(model, data, cfg, target_ratio=10.0, progress=False)
    mse, bce = (reports[k]["layers"] for k in ("mse", "bce"))
    assert reports["bce"]["sensitivity_loss"] == "bce"
    assert bce["b"]["sensitivity"] > 100 * bce["a"]["sensitivity"]
    assert mse["a"]["bytes"] == mse["b"]["bytes"]                  # the raw maps' MSE: the layers look alike
    assert bce["b"]["bytes"] > bce["a"]["bytes"] and bce["b"]["rel_err2"] < mse["b"]["rel_err2"]


class Levels(nn.Module):
    """Two YOLO-like levels: `p3` a 12x12 map, `p5` a 3x3 map (16x fewer cells) read by `p5` only, logits near 0."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.p3 = nn.Conv2d(3, 8, 3, padding=1)
        self.p5 = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return [self.p3(x), self.p5(x)[:, :, ::4, ::4]]


def test_layer_sensitivity_level_norm_counts_each_level_alike(data):
    """alloc_sensitivity_norm='level': each output tensor's 'bce' term is its mean over the tensor's elements, so a
    layer feeding only the small P5 map is no longer 16x less sensitive for having 16x fewer cells. Each layer
    here reaches one map only, so the 'level' sensitivity is exactly the 'sum' one over that map's elements."""
    from bitdown.allocate import budget_config, layer_sensitivity
    model = Levels().eval()
    plans, _ = resolve_plan(model, QuantConfig(quantize_stem=True))
    plain = layer_sensitivity(model, plans, data, progress=False, loss="bce")
    level = layer_sensitivity(model, plans, data, progress=False, loss="bce", norm="level")
    assert plain["p3"] > 8 * plain["p5"]                            # summed: the P3 map's 16x cells decide
    for name, per_image in (("p3", 8 * 12 * 12), ("p5", 8 * 3 * 3)):
        assert level[name] == pytest.approx(plain[name] / per_image, rel=1e-5)
    assert 0.25 < level["p3"] / level["p5"] < 4
    cfg = QuantConfig(quantize_stem=True, calib_images=128, alloc_weighting="sensitivity",
                      alloc_sensitivity_loss="bce", alloc_sensitivity_norm="level")
    _, report = budget_config(model, data, cfg, target_ratio=10.0, progress=False)
    assert report["sensitivity_norm"] == "level"
    assert report["layers"]["p5"]["sensitivity"] == pytest.approx(level["p5"])
    with pytest.raises(ValueError, match="alloc_sensitivity_norm='level' needs alloc_sensitivity_loss='bce'"):
        QuantConfig(alloc_sensitivity_norm="level")
    with pytest.raises(ValueError, match="alloc_sensitivity_norm must be one of 'sum', 'level'"):
        QuantConfig(alloc_sensitivity_loss="bce", alloc_sensitivity_norm="mean")


def test_weighted_allocation_favours_the_sensitive_layer():
    from bitdown.allocate import weighted
    opts = {n: [Option(4, 2, 10.0, 0.5), Option(4, 16, 30.0, 0.1)] for n in ("a", "b")}
    plain = allocate(opts, 40.0, 0.0)                       # room for one upgrade; a tie: either
    assert sorted(o.n_centroids for o in plain.values()) == [2, 16]
    choice = allocate(weighted(opts, {"a": 1.0, "b": 100.0}), 40.0, 0.0)
    assert choice["b"].n_centroids == 16 and choice["a"].n_centroids == 2


def test_compress_with_sensitivity_weighting(data):
    cfg = QuantConfig(calib_images=128, bn_recalibrate=False, alloc_weighting="sensitivity")
    q = bitdown.compress(net(), data, cfg, target_ratio=8.0, progress=False)
    al = q.bitdown.extra["allocation"]
    assert al["weighting"] == "sensitivity"
    assert all(v["sensitivity"] > 0 for v in al["layers"].values())
    assert bitdown.size_report(q, q.bitdown.plans).ratio >= 8.0 - 1e-9
    with pytest.raises(ValueError, match="alloc_weighting"):
        QuantConfig(alloc_weighting="hessian")


def test_capped_options_drop_layers_above_the_error_cap():
    from bitdown.allocate import capped
    opts = {"a": [Option(4, 2, 10, 0.9), Option(4, 4, 20, 0.5), Option(4, 8, 40, 0.1)],
            "b": [Option(4, 2, 10, 0.7), Option(4, 4, 20, 0.6)]}
    c = capped(opts, 0.5)
    assert [o.n_centroids for o in c["a"]] == [4, 8]
    assert [o.n_centroids for o in c["b"]] == [4]            # none qualifies: the least distorted is kept
    assert allocate(opts, budget=30, other=0)["a"].distortion == 0.5   # uncapped: a=20, b=10 (0.5 + 0.7)
    choice = allocate(capped(opts, 0.4), budget=60, other=0)            # capped: only a=40 qualifies
    assert choice["a"].distortion == 0.1


def test_compress_with_error_cap(data):
    plain = bitdown.compress(net(), data, QuantConfig(calib_images=128, bn_recalibrate=False), target_ratio=10.0,
                             progress=False)
    worst = max(v["rel_err2"] for v in plain.bitdown.extra["allocation"]["layers"].values())
    cap = 0.8 * worst
    cfg = QuantConfig(calib_images=128, bn_recalibrate=False, alloc_max_error=cap)
    q = bitdown.compress(net(), data, cfg, target_ratio=10.0, progress=False)
    al = q.bitdown.extra["allocation"]
    assert al["max_error"] == cap
    assert max(v["rel_err2"] for v in al["layers"].values()) <= cap
    assert bitdown.size_report(q, q.bitdown.plans).ratio >= 10.0 - 1e-9
    with pytest.raises(ValueError, match="no allocation keeps every layer"):
        bitdown.compress(net(), data, QuantConfig(calib_images=128, alloc_max_error=1e-9), target_ratio=10.0,
                         progress=False)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alloc_max_error"):
            QuantConfig(alloc_max_error=bad)


def test_error_cap_list_keeps_the_first_cap_the_budget_satisfies(data):
    """alloc_max_error as a list: caps tried in order, the first one the budget can satisfy is used (and reported);
    none satisfiable names the loosest. Bad lists are refused."""
    plain = bitdown.compress(net(), data, QuantConfig(calib_images=128, bn_recalibrate=False), target_ratio=10.0,
                             progress=False)
    worst = max(v["rel_err2"] for v in plain.bitdown.extra["allocation"]["layers"].values())
    cap = 0.8 * worst
    cfg = QuantConfig(calib_images=128, bn_recalibrate=False, alloc_max_error=[1e-9, cap, 10.0])
    q = bitdown.compress(net(), data, cfg, target_ratio=10.0, progress=False)
    al = q.bitdown.extra["allocation"]
    assert al["max_error"] == cap                            # 1e-9 cannot fit 10x, cap can: 10.0 is never reached
    assert max(v["rel_err2"] for v in al["layers"].values()) <= cap
    with pytest.raises(ValueError, match="<= 2e-09"):
        bitdown.compress(net(), data, QuantConfig(calib_images=128, alloc_max_error=[1e-9, 2e-9]), target_ratio=10.0,
                         progress=False)
    assert QuantConfig(alloc_max_error=[0.3]).alloc_max_error == 0.3      # a one-cap list is that cap
    assert QuantConfig(alloc_max_error=[0.2, 0.3]).alloc_caps == [0.2, 0.3]
    assert QuantConfig.from_dict(QuantConfig(alloc_max_error=[0.2, 0.3]).to_json()).alloc_max_error == [0.2, 0.3]
    for bad in ([], [0.2, 0.0], [0.2, float("nan")], ["0.2"], [True], [0.3, 0.2], [0.2, 0.2]):
        with pytest.raises(ValueError, match="alloc_max_error"):
            QuantConfig(alloc_max_error=bad)


def test_rate_distortion_table_measured_once_per_inputs(data, monkeypatch):
    import bitdown.allocate as ba
    calls = []
    real = ba._measure_options
    monkeypatch.setattr(ba, "_measure_options", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(ba, "_RD_TABLES", {})
    model = net()
    plans, _ = resolve_plan(model, QuantConfig())
    first = ba.measure_options(model, plans, data, progress=False)
    again = ba.measure_options(model, plans, data, progress=False)
    assert len(calls) == 1 and again == first
    again[next(iter(again))].clear()                               # a caller's edit does not reach the cache
    assert ba.measure_options(model, plans, data, progress=False) == first
    ba.measure_options(model, plans, data, seed=1, progress=False)           # another seed: measured
    ba.measure_options(model, plans, data[:2], progress=False)               # other images: measured
    other = net()
    with torch.no_grad():
        other[0].weight.mul_(2)
    ba.measure_options(other, plans, data, progress=False)                   # other weights: measured
    assert len(calls) == 4


def test_measured_cap_rule_picks_the_cap_with_the_least_output_error(data):
    """alloc_cap_rule 'measured': every satisfiable cap of the list is measured (the network with each layer at its
    allocated option, fast quantizer, against the unquantized outputs on the calibration images); the reported errors
    are recomputed here independently, the least wins, the weights are put back, and an unsatisfiable list is still
    refused. The default rule keeps the tightest."""
    import copy

    from bitdown.allocate import (_choose, _output_tensors, alloc_em, budget_config, capped, measure_options,
                                  quantize_option)
    from bitdown.finetune import distill_loss
    from bitdown.stats import collect_stats

    model = net()
    before = copy.deepcopy(model.state_dict())
    plans, _ = resolve_plan(model, QuantConfig())
    plain_cfg = QuantConfig(calib_images=128, bn_recalibrate=False)
    _, plain = budget_config(model, data, plain_cfg, target_ratio=10.0, progress=False)
    worst = max(v["rel_err2"] for v in plain["layers"].values())
    caps = [0.5 * worst, 0.8 * worst, 10.0]
    cfg = QuantConfig(calib_images=128, bn_recalibrate=False, alloc_max_error=caps, alloc_cap_rule="measured")
    _, rep = budget_config(model, data, cfg, target_ratio=10.0, progress=False)
    errors = {float(c): e for c, e in rep["cap_errors"].items()}
    assert rep["max_error"] == min(errors, key=errors.get)
    for k, v in model.state_dict().items():                     # the model is left as it was
        assert torch.equal(v, before[k]), k
    # the figures, recomputed: each cap's allocation quantized by the fast quantizer, the output error measured
    options = measure_options(model, plans, data, em=alloc_em(cfg.em), progress=False)
    _, dense, other = size_bounds(model, plans)
    budget = budget_bytes(model, plans, 10.0)
    mods = dict(model.named_modules())
    stats = collect_stats(model, {p.name: (mods[p.name], 1) for p in plans}, data, full_gram=True)
    x = torch.cat(data)[:64]
    with torch.no_grad():
        ref = _output_tensors(model(x))
        for cap, err in errors.items():
            q = copy.deepcopy(model)
            qm = dict(q.named_modules())
            for n, o in _choose(capped(options, cap), None, budget, other).items():
                if not o.keep:
                    qm[n].weight.copy_(quantize_option(mods[n].weight.detach(), stats[n].full_gram, o, alloc_em(cfg.em)))
            assert err == pytest.approx(float(distill_loss(_output_tensors(q(x)), ref, loss="kl")), rel=1e-5)
    assert len(set(errors.values())) > 1                        # the caps gave different allocations
    _, tight = budget_config(model, data, QuantConfig(calib_images=128, bn_recalibrate=False, alloc_max_error=caps),
                             target_ratio=10.0, progress=False)
    assert tight["max_error"] == caps[1] and "cap_errors" not in tight    # 0.5 x worst cannot fit: the tightest is next
    with pytest.raises(ValueError, match="no allocation keeps every layer"):
        budget_config(model, data, QuantConfig(calib_images=128, alloc_max_error=[1e-9, 2e-9], alloc_cap_rule="measured"),
                      target_ratio=10.0, progress=False)
    with pytest.raises(ValueError, match="alloc_cap_rule"):
        QuantConfig(alloc_cap_rule="loosest")


def test_measured_cap_with_weighting_puts_the_weights_back_even_on_error(data, monkeypatch):
    """The measured rule with sensitivity weighting and post-BN row weights runs and leaves the model as it was
    (weights, BatchNorm statistics); a forward that fails mid-selection still restores it."""
    import copy

    import bitdown.allocate as al
    from bitdown.allocate import budget_config
    from bitdown.config import EMConfig

    model = net()
    for m in model.modules():                       # non-uniform BN gains, so the 'bn' row weights matter
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.2, 3.0)
    before = copy.deepcopy(model.state_dict())
    cfg = QuantConfig(calib_images=128, bn_recalibrate=False, alloc_max_error=[0.05, 0.2, 10.0],
                      alloc_cap_rule="measured", alloc_weighting="sensitivity", em=EMConfig(channel_weighting="bn"))
    _, rep = budget_config(model, data, cfg, target_ratio=6.0, progress=False)
    assert rep["max_error"] in cfg.alloc_caps and len(rep["cap_errors"]) > 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    calls = []

    def boom(*a, **k):              # the sensitivities come from this process's cache: only the cap selection calls it
        calls.append(1)
        raise RuntimeError("forward failed")
    monkeypatch.setattr(al, "_output_error", boom)
    with pytest.raises(RuntimeError, match="forward failed"):
        budget_config(model, data, cfg, target_ratio=6.0, progress=False)
    assert calls == [1]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_budget_config_on_a_train_mode_model_leaves_its_batchnorm_and_mode(data):
    """The allocator measures the deployed (eval) model: a model handed over in train mode gets the same allocation
    as in eval mode, its BatchNorm running statistics are not updated by the passes, and it stays in train mode."""
    import copy

    from bitdown.allocate import budget_config

    cfg = QuantConfig(calib_images=128, bn_recalibrate=False, alloc_weighting="sensitivity",
                      alloc_max_error=[0.05, 0.2, 10.0], alloc_cap_rule="measured")
    model = net().train()
    before = copy.deepcopy(model.state_dict())
    _, rep = budget_config(model, data, cfg, target_ratio=6.0, progress=False)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    _, rep_eval = budget_config(net(), data, cfg, target_ratio=6.0, progress=False)
    assert rep["layers"] == rep_eval["layers"] and rep["cap_errors"] == rep_eval["cap_errors"]
