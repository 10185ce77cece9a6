"""Fast checks of benchmarks/peers.py's size accounting (no real model, no image): the palettized size is counted
as bitdown's size_report counts it (log2 K index bits, fp16 LUTs, other parameters fp32, MB = 2^20 B), layers the
peer leaves fp32 are counted fp32, and the layout is read right from coremltools' own metadata when it is installed."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import peers  # noqa: E402
from peers import Palette, Setting, palette_size  # noqa: E402

from bitdown.config import LayerPlan  # noqa: E402
from bitdown.size import size_report  # noqa: E402


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def test_per_tensor_equals_bitdown_size_report():
    """A per-tensor N-bit palette is bitdown's PQ with block size 1 and K = 2^N: the same bytes, the same ratio."""
    m = small_net()
    quantized = {"3": (16, 8, 3, 3), "8": (10, 16)}
    for bits in (1, 2, 3, 4):
        got = palette_size(m, {f"{n}.weight": Palette(1, 2 ** bits) for n in quantized})
        plans = [LayerPlan(n, "convkxk" if len(s) == 4 else "linear", s, 1, 2 ** bits) for n, s in quantized.items()]
        want = size_report(m, plans)
        assert got["size_bytes"] == pytest.approx(want.size_bytes)
        assert got["ratio"] == pytest.approx(want.ratio)
        assert got["uncompressed_bytes"] == want.uncompressed_bytes


def test_grouped_vector_scaled_and_fp32_layers_by_hand():
    m = small_net()
    n_params = sum(p.numel() for p in m.parameters())          # 216 + 16 + 1152 + 32 + 160 + 10 = 1586
    assert n_params == 1586
    # conv 3 (16, 8, 3, 3) = 1152 weights: 2-bit, one LUT per 4 output channels -> 4 LUTs x 4 x fp16
    # linear (10, 16) = 160 weights: 3-bit, 2-d vectors -> 80 codes x 3 bits, one LUT 8 x 2 fp16, 10 fp16 scales
    # first conv (216 weights) not palettized: fp32, as are BatchNorm and the linear bias
    layout = {"3.weight": Palette(4, 4), "8.weight": Palette(1, 8, cluster_dim=2, n_scales=10)}
    got = palette_size(m, layout)
    index = 1152 * 2 / 8 + 80 * 3 / 8
    lut = 4 * 4 * 2 + 8 * 2 * 2
    other = (216 + 16 + 32 + 10) * 4
    assert got["index_bytes"] == index and got["lut_bytes"] == lut and got["scale_bytes"] == 20
    assert got["other_bytes"] == other
    assert got["size_bytes"] == index + lut + 20 + other
    assert got["ratio"] == pytest.approx(1586 * 4 / (index + lut + 20 + other))
    assert got["size_mb"] == got["size_bytes"] / 2 ** 20
    assert peers.unpalettized_weights(m, layout) == ["0.weight"]


def test_bad_layouts_refused():
    m = small_net()
    with pytest.raises(KeyError):
        palette_size(m, {"nope.weight": Palette(1, 4)})
    with pytest.raises(ValueError):
        palette_size(m, {"3.weight": Palette(1, 6)})               # K not a power of two
    with pytest.raises(ValueError):
        palette_size(m, {"8.weight": Palette(1, 4, cluster_dim=3)})  # 160 weights not in 3-vectors


def test_setting_names_round_trip():
    for s in ("b2", "b2g4", "b3v2", "b4g8s", "b2g4a", "b3v2sa"):
        assert Setting.parse(s).name == s
    assert Setting.parse("b2g4").module_config() == {"n_bits": 2, "granularity": "per_grouped_channel",
                                                      "group_size": 4, "enable_per_channel_scale": False}
    with pytest.raises(ValueError):
        Setting.parse("2bit")


def test_layout_from_coremltools_metadata():
    """End to end on a tiny net: the layout read from coremltools' buffers gives the hand-counted size; the first
    conv stays fp32; a layer refused for its channel count (10 outputs, groups of 4) is counted fp32."""
    pytest.importorskip("coremltools.optimize.torch.palettization")
    m = small_net().eval()
    q = peers.palettize("ptp", m, Setting.parse("b2g4"))
    layout = peers.palette_layout(q)
    assert layout == {"3.weight": Palette(4, 4)}
    assert peers.unpalettized_weights(q, layout) == ["0.weight", "8.weight"]
    peers.round_palettes_fp16_(q, layout)
    for g in q[3].weight.reshape(4, -1):
        assert g.unique().numel() <= 4
    assert torch.equal(q[0].weight, m[0].weight)
    assert palette_size(q, layout)["size_bytes"] == 1152 * 2 / 8 + 4 * 4 * 2 + (216 + 16 + 32 + 160 + 10) * 4
    q = peers.palettize("ptp", m, Setting.parse("b3v2a"))
    assert peers.palette_layout(q) == {"0.weight": Palette(1, 8, 2), "3.weight": Palette(1, 8, 2),
                                       "8.weight": Palette(1, 8, 2)}
