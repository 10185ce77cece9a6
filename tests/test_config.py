"""Quantization config: presets, the K clamp, override precedence, stem handling and validation."""

from __future__ import annotations

import pytest
import torch.nn as nn

from bitdown.config import (
    EMConfig,
    LayerPlan,
    QuantConfig,
    clamp_centroids,
    layer_kind,
    quantizable_layers,
    resolve_layer,
    resolve_plan,
)


class Net(nn.Module):
    """stem 3x3, a 3x3, a 1x1, a 5x5, a depthwise 3x3, a grouped 3x3 and a linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 64, 3, padding=1)
        self.c1 = nn.Conv2d(64, 64, 1)
        self.c5 = nn.Conv2d(64, 32, 5, padding=2)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.gr = nn.Conv2d(32, 64, 3, padding=1, groups=4)
        self.fc = nn.Linear(64, 128)

    def forward(self, x):
        x = self.gr(self.dw(self.c5(self.c1(self.c3(self.stem(x))))))
        return self.fc(x.mean((2, 3)))


def plans_by_name(model, config, order=None):
    plans, skipped = resolve_plan(model, config, order)
    return {p.name: p for p in plans}, skipped


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    "preset, expected",
    [
        # small: kxk d = kh*kw, 1x1 d = 4, linear d = 4
        ("small", {"c3": 9, "c1": 4, "c5": 25, "dw": 9, "gr": 9, "fc": 4}),
        # large: kxk d = 2*kh*kw capped at the row (depthwise row = 9), 1x1 d = 8, linear d = 4
        ("large", {"c3": 18, "c1": 8, "c5": 50, "dw": 9, "gr": 18, "fc": 4}),
    ],
)
def test_preset_block_sizes(preset, expected):
    plans, skipped = plans_by_name(Net(), QuantConfig(preset=preset))
    assert {n: p.block_size for n, p in plans.items()} == expected
    assert set(skipped) == {"stem"}
    assert plans["c1"].kind == "conv1x1" and plans["c3"].kind == "convkxk" and plans["fc"].kind == "linear"
    assert plans["dw"].kind == "convkxk" and plans["dw"].groups == 32 and plans["gr"].groups == 4


def test_layer_kind_and_registration_order():
    net = Net()
    assert layer_kind(net.c1) == "conv1x1" and layer_kind(net.c5) == "convkxk"
    assert layer_kind(net.fc) == "linear" and layer_kind(nn.ReLU()) is None
    assert [n for n, _ in quantizable_layers(net)] == ["stem", "c3", "c1", "c5", "dw", "gr", "fc"]


def test_subclass_of_conv_is_quantizable():
    class MyConv(nn.Conv2d):
        pass

    m = nn.Sequential(nn.Conv2d(3, 8, 3), MyConv(8, 64, 3))
    plans, _ = plans_by_name(m, QuantConfig())
    assert plans["1"].kind == "convkxk" and plans["1"].block_size == 9


# ----------------------------------------------------------------------------- K clamp


@pytest.mark.parametrize(
    "k, n_sub, expected",
    [
        (256, 1024, 128),     # n/4 = 256 is itself a power of two: strictly below -> 128
        (256, 1028, 256),     # n/4 = 257 -> 256
        (256, 100_000, 256),  # never above the request
        (256, 36, 8),         # n/4 = 9 -> 8
        (256, 32, 4),         # n/4 = 8 -> 4
        (16, 4096, 16),
        (256, 8, 1),          # too few subvectors: 1
    ],
)
def test_clamp_centroids(k, n_sub, expected):
    assert clamp_centroids(k, n_sub) == expected


def test_plan_clamps_k_per_layer():
    plans, _ = plans_by_name(Net(), QuantConfig())
    # c3: 64 x 16 subvectors = 1024 -> 128; c1: 64 * 16 = 1024 -> 128;
    # c5: 32 * 64 = 2048 -> 256; dw: 32 subvectors -> 4; gr: 64*8=512 -> 64; fc: 128*16=2048 -> 256
    assert {n: p.n_centroids for n, p in plans.items()} == {
        "c3": 128, "c1": 128, "c5": 256, "dw": 4, "gr": 64, "fc": 256}
    for p in plans.values():
        assert p.n_subvectors == p.weight_shape[0] * p.row_length // p.block_size


def test_too_few_subvectors_is_skipped_with_reason():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1), nn.Flatten(), nn.Linear(8, 64))
    plans, skipped = plans_by_name(m, QuantConfig())
    assert "1" in skipped and "too few" in skipped["1"]  # 2 subvectors
    assert "3" in plans


# ----------------------------------------------------------------------------- overrides


def test_override_precedence_name_over_type_over_global():
    cfg = QuantConfig(
        n_centroids=32,
        type_overrides={"conv1x1": {"n_centroids": 16, "block_size": 8}, "linear": {"n_centroids": 64}},
        name_overrides={"c1": {"n_centroids": 4}, "f.*": {"block_size": 8}},
    )
    plans, _ = plans_by_name(Net(), cfg)
    assert plans["c1"].n_centroids == 4 and plans["c1"].block_size == 8     # name beats type; type's d kept
    assert plans["fc"].n_centroids == 64 and plans["fc"].block_size == 8    # type K, name d
    assert plans["c3"].n_centroids == 32 and plans["c3"].block_size == 9    # global
    assert plans["c5"].n_centroids == 32


def test_name_override_is_a_full_match():
    cfg = QuantConfig(name_overrides={"c": {"n_centroids": 2}, "c[35]": {"n_centroids": 8}})
    with pytest.raises(ValueError, match="matches no"):  # 'c' full-matches nothing
        resolve_plan(Net(), cfg)
    plans, _ = plans_by_name(Net(), QuantConfig(name_overrides={"c[35]": {"n_centroids": 8}}))
    assert plans["c3"].n_centroids == 8 and plans["c5"].n_centroids == 8 and plans["c1"].n_centroids == 128


def test_kind_key_beats_class_name_key():
    cfg = QuantConfig(type_overrides={"Conv2d": {"n_centroids": 4}, "convkxk": {"n_centroids": 16}})
    plans, _ = plans_by_name(Net(), cfg)
    assert plans["c3"].n_centroids == 16 and plans["c1"].n_centroids == 4


def test_override_k_is_still_clamped():
    plans, _ = plans_by_name(Net(), QuantConfig(name_overrides={"dw": {"n_centroids": 1024}}))
    assert plans["dw"].n_centroids == 4


@pytest.mark.parametrize("override", [None, {"skip": True}])
def test_skip_override(override):
    plans, skipped = plans_by_name(Net(), QuantConfig(name_overrides={"c5": override}))
    assert "c5" not in plans and "c5" in skipped and "c5" in skipped["c5"]
    plans, skipped = plans_by_name(Net(), QuantConfig(type_overrides={"linear": override}))
    assert "fc" not in plans and "linear" in skipped["fc"]


def test_name_override_can_unskip():
    cfg = QuantConfig(type_overrides={"convkxk": {"skip": True}}, name_overrides={"c5": {"skip": False}})
    plans, skipped = plans_by_name(Net(), cfg)
    assert "c5" in plans and "c3" in skipped and "dw" in skipped


# ----------------------------------------------------------------------------- stem


class Reordered(nn.Module):
    """Registration order differs from forward order: `b` runs first."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 16, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(16, 64)

    def forward(self, x):
        return self.fc(self.a(self.b(x)).mean((2, 3)))


def test_stem_left_uncompressed_by_default():
    plans, skipped = plans_by_name(Net(), QuantConfig())
    assert "stem" not in plans and "stem" in skipped["stem"]
    plans, skipped = plans_by_name(Net(), QuantConfig(quantize_stem=True))
    assert "stem" in plans and plans["stem"].block_size == 9 and not skipped


def test_stem_is_first_conv_in_forward_order():
    plans, skipped = resolve_plan(Reordered(), QuantConfig(), order=["b", "a", "fc"])
    assert [p.name for p in plans] == ["a", "fc"] and set(skipped) == {"b"}
    plans, skipped = resolve_plan(Reordered(), QuantConfig(), order=None)  # registration order: a is first
    assert set(skipped) == {"a"}


def test_stem_name_override_quantizes_it():
    cfg = QuantConfig(name_overrides={"stem": {"skip": False}})
    plans, skipped = plans_by_name(Net(), cfg)
    assert "stem" in plans


# ----------------------------------------------------------------------------- block size not dividing


def test_preset_block_size_not_dividing_is_skipped_with_reason():
    m = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Conv2d(6, 64, 1), nn.Conv2d(64, 64, 1), nn.Linear(6, 64))
    plans, skipped = plans_by_name(m, QuantConfig())
    assert "1" in skipped and "does not divide" in skipped["1"] and "'1'" in skipped["1"]
    assert "3" in skipped and "does not divide" in skipped["3"]
    assert list(plans) == ["2"]


def test_forced_block_size_not_dividing_raises():
    with pytest.raises(ValueError, match=r"c1.*block_size 3 does not divide"):
        resolve_plan(Net(), QuantConfig(name_overrides={"c1": {"block_size": 3}}))
    with pytest.raises(ValueError, match="does not divide"):
        resolve_plan(Net(), QuantConfig(type_overrides={"linear": {"block_size": 7}}))


def test_forced_block_size_on_a_kernel_row():
    # 2 kernels of a 3x3 conv with 16 input channels: 18 divides 144
    plans, _ = plans_by_name(Net(), QuantConfig(name_overrides={"c3": {"block_size": 18}}))
    assert plans["c3"].block_size == 18


# ----------------------------------------------------------------------------- validation


def test_unknown_preset_rejected():
    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*large.*small"):
        QuantConfig(preset="huge")


@pytest.mark.parametrize("where", ["name_overrides", "type_overrides"])
def test_unknown_override_key_rejected(where):
    key = "c1" if where == "name_overrides" else "conv1x1"
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['blocksize'\]"):
        QuantConfig(**{where: {key: {"blocksize": 4}}})


@pytest.mark.parametrize("ov", [{"block_size": 0}, {"block_size": 2.5}, {"n_centroids": 3}, {"n_centroids": 1 << 16}])
def test_bad_override_values_rejected(ov):
    with pytest.raises(ValueError):
        QuantConfig(type_overrides={"linear": ov})


def test_override_must_be_a_dict():
    with pytest.raises(ValueError, match="must be a dict"):
        QuantConfig(name_overrides={"fc": 4})


def test_bad_regex_rejected():
    with pytest.raises(ValueError, match="not a valid regex"):
        QuantConfig(name_overrides={"fc[": {"n_centroids": 4}})


def test_unknown_type_override_key_rejected():
    with pytest.raises(ValueError, match=r"type override 'conv3x3' matches no layer"):
        resolve_plan(Net(), QuantConfig(type_overrides={"conv3x3": {"n_centroids": 4}}))


@pytest.mark.parametrize("k", [0, 1, 3, 100, 1 << 16, 2.0])
def test_bad_global_centroids_rejected(k):
    with pytest.raises(ValueError, match="power of two"):
        QuantConfig(n_centroids=k)


def test_from_dict_rejects_unknown_keys():
    cfg = QuantConfig.from_dict({"preset": "large", "em": {"n_iter": 3}})
    assert cfg.preset == "large" and isinstance(cfg.em, EMConfig) and cfg.em.n_iter == 3
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['presett'\]"):
        QuantConfig.from_dict({"presett": "small"})
    with pytest.raises(ValueError, match=r"unknown EM option\(s\) \['iters'\]"):
        QuantConfig(em={"iters": 3})


@pytest.mark.parametrize(
    "kw",
    [{"n_iter": -1}, {"tol": -1.0}, {"init": "kmeans"}, {"n_restarts": 0}, {"objective": "full"},
     {"damp": 1.0}, {"code_reopt": -1}],
)
def test_bad_em_options_rejected(kw):
    with pytest.raises(ValueError):
        EMConfig(**kw)


def test_needs_full_gram():
    assert EMConfig().needs_full_gram                     # the default refines on the exact objective
    assert not EMConfig.paper().needs_full_gram
    assert EMConfig.paper(error_feedback=True).needs_full_gram
    assert EMConfig.paper(code_reopt=1).needs_full_gram
    assert EMConfig.paper(codebook_refit=True).needs_full_gram


def test_config_json_round_trip():
    cfg = QuantConfig(preset="large", name_overrides={"fc": {"n_centroids": 16}}, em=EMConfig(n_iter=7))
    again = QuantConfig.from_dict(cfg.to_json())
    assert again == cfg


def test_layer_plan_json_round_trip():
    p = LayerPlan("a.b", "convkxk", (8, 4, 3, 3), 9, 16, 2)
    assert LayerPlan.from_json(p.to_json()) == p
    assert p.row_length == 36 and p.n_subvectors == 32 and p.code_bits == 4


def test_model_without_quantizable_layers():
    with pytest.raises(ValueError, match="no Conv2d or Linear"):
        resolve_plan(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)), QuantConfig())


def test_only_stem_means_nothing_left():
    with pytest.raises(ValueError, match="no layer left to quantize"):
        resolve_plan(nn.Sequential(nn.Conv2d(3, 64, 3)), QuantConfig())


def test_order_with_unknown_layer_rejected():
    with pytest.raises(ValueError, match="not Conv2d/Linear"):
        resolve_plan(Net(), QuantConfig(), order=["stem", "nope"])


def test_resolve_layer_non_quantizable():
    plan, reason = resolve_layer("x", nn.ReLU(), QuantConfig())
    assert plan is None and "not a Conv2d/Linear" in reason


@pytest.mark.parametrize("n", [-1, 1.5, True, "64"])
def test_bad_stats_positions_rejected(n):
    with pytest.raises(ValueError, match="stats_positions must be an integer >= 0"):
        QuantConfig(stats_positions=n)
