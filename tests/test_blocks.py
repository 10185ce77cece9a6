"""The block pipeline: block discovery (blocks.py), replayed block inputs (blockio.py), block reconstruction
(reconstruct.py) and the block loop of compress (resume per block, errors)."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn

import bitdown
from bitdown import QuantConfig
from bitdown.blockio import BlockIO, Cached, TensorStore, dependencies, run_block
from bitdown.blocks import find_blocks
from bitdown.compress import forward_order
from bitdown.config import GRAD_SLICES, ReconstructConfig
from bitdown.reconstruct import block_error, reconstruct_block
from bitdown.zoo import build_model

bc = importlib.import_module("bitdown.compress")


def _blocks(model, x):
    order = forward_order(model, x)
    return find_blocks(model.eval(), x, order)


# ----------------------------------------------------------------------------- discovery

def test_zoo_cifar_resnet_blocks():
    m = build_model("resnet20_cifar10", None)
    names = [b.name for b in _blocks(m, torch.randn(2, 3, 32, 32))]
    assert names == ["conv1"] + [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)] + ["linear"]


def test_zoo_efficientnet_blocks():
    m = build_model("efficientnet_lite0", None)
    blocks = _blocks(m, torch.randn(1, 3, 64, 64))
    names = [b.name for b in blocks]
    assert names == ["_conv_stem"] + [f"_blocks.{i}" for i in range(16)] + ["_conv_head", "_fc"]
    assert blocks[2].layers == ["_blocks.1._expand_conv", "_blocks.1._depthwise_conv", "_blocks.1._project_conv"]


def test_torchvision_style_resnet_blocks():
    m = build_model("resnet18", None)           # torchvision layout: conv1/bn1/maxpool, layerN.M, fc
    blocks = _blocks(m, torch.randn(1, 3, 64, 64))
    assert [b.name for b in blocks] == ["conv1"] + [f"layer{s}.{i}" for s in (1, 2, 3, 4) for i in (0, 1)] + ["fc"]
    assert sorted(blocks[3].layers) == ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"]


class Unit(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class SkipNet(nn.Module):
    """u0 -> u1 -> u2(cat(u1, u0)): u0's output is read two blocks later (a U-Net-style skip)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.units = nn.ModuleList([Unit(8, 8), Unit(8, 8), Unit(16, 8), Unit(8, 8)])
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        a = self.units[0](x)
        b = self.units[1](a)
        c = self.units[2](torch.cat([b, nn.functional.max_pool2d(a, 1)], 1))
        d = self.units[3](c) + a
        return self.head(d.mean((2, 3)))


def test_skip_connection_across_blocks_is_found():
    torch.manual_seed(0)
    m = SkipNet().eval()
    x = torch.randn(2, 3, 8, 8)
    blocks = _blocks(m, x)
    assert [b.name for b in blocks] == ["stem", "units.0", "units.1", "units.2", "units.3", "head"]
    last = dependencies(m, blocks, x[:1])
    assert last == [1, 5, 3, 4, 5, 5]      # units.0 is read by units.1, units.2 and (through the sum) the head


def skipnet_batches(n: int = 6, per: int = 3):
    """(SkipNet, its calibration batches of `per` images, its blocks, its modules by name), seeded."""
    torch.manual_seed(0)
    m = SkipNet().eval()
    batches = list(torch.randn(n, 3, 8, 8).split(per))
    return m, batches, _blocks(m, batches[0]), dict(m.named_modules())


def test_replayed_inputs_equal_a_plain_forward():
    m, batches, blocks, mods = skipnet_batches()
    seen = {}
    hs = [mods[b.name].register_forward_pre_hook(lambda _m, a, i=i: seen.setdefault(i, []).append(a[0].clone()))
          for i, b in enumerate(blocks)]
    with torch.no_grad():
        for x in batches:
            m(x)
    for h in hs:
        h.remove()
    store = TensorStore(0)                          # budget 0: everything spills to disk and is read back
    io = BlockIO(m, blocks, batches, store, dependencies(m, blocks, batches[0][:1]))
    for i, b in enumerate(blocks):
        ins = io.inputs(i)
        for k in range(len(batches)):
            assert torch.equal(ins[k][0][0], seen[i][k]), (b.name, k)
        with torch.no_grad():
            io.set_outputs(i, Cached(store, [run_block(mods[b.name], ins[k]) for k in range(len(ins))],
                                     ins.device, ins.dtype))
    assert store.spilled > 0
    io.close()
    store.close()


class SeqUnitNet(nn.Module):
    """Residual units written as bare Sequentials (conv, bn, relu, conv, bn) in a ModuleList, one stage a
    Sequential of such units (issue 13: each unit was split into per-layer blocks)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)

        def unit():
            return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.units = nn.ModuleList([unit(), unit()])
        self.stage = nn.Sequential(unit(), unit())
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for u in list(self.units) + list(self.stage):
            x = torch.relu(x + u(x))
        return self.head(x.mean((2, 3)))


def test_sequential_units_are_one_block_each():
    m = SeqUnitNet().eval()
    blocks = _blocks(m, torch.randn(2, 3, 8, 8))
    assert [b.name for b in blocks] == ["stem", "units.0", "units.1", "stage.0", "stage.1", "head"]
    assert blocks[1].layers == ["units.0.0", "units.0.3"]
    # a stage mixing a bare layer with composite units is still looked into
    m.stage = nn.Sequential(nn.Conv2d(8, 8, 1), m.stage[0], m.stage[1])
    assert [b.name for b in _blocks(m, torch.randn(2, 3, 8, 8))][3:6] == ["stage.0", "stage.1", "stage.2"]


def test_zoo_yolov5_blocks():
    m = build_model("yolov5n_coco", None)
    blocks = _blocks(m, torch.randn(1, 3, 64, 64))
    kinds = {b.name: type(dict(m.named_modules())[b.name]).__name__ for b in blocks}
    assert [b.name for b in blocks] == [f"model.{i}" for i in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 17, 18,
                                                               20, 21, 23, 24)]
    assert kinds["model.2"] == "C3" and kinds["model.9"] == "SPPF" and kinds["model.24"] == "Detect"
    assert blocks[-1].layers == ["model.24.m.0", "model.24.m.1", "model.24.m.2"]


def test_blocks_regex_names_blocks_and_unmatched_is_an_error():
    m = SkipNet().eval()
    x = torch.randn(2, 3, 8, 8)
    order = forward_order(m, x)
    blocks = find_blocks(m, x, order, [r"units\.[01]"])
    assert [b.name for b in blocks] == ["stem", "units.0", "units.1", "units.2.conv", "units.3.conv", "head"]
    with pytest.raises(ValueError, match=r"nothing.*|match no module"):
        find_blocks(m, x, order, [r"units\.9"])
    with pytest.raises(ValueError, match="match no module"):
        bitdown.compress(m, [torch.randn(32, 3, 8, 8)], QuantConfig(blocks=[r"nope"], calib_images=32), progress=False)


def test_block_called_twice_is_looked_into():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.u = Unit(3, 3)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.u(self.u(x)).mean((2, 3)))

    with pytest.raises(ValueError, match="called 2 times"):
        _blocks(Twice().eval(), torch.randn(1, 3, 8, 8))


# ----------------------------------------------------------------------------- reconstruction

def _quantized_unit(seed=0):
    torch.manual_seed(seed)
    teacher = Unit(8, 16).eval()
    student = bitdown.compress(nn.Sequential(nn.Conv2d(3, 8, 1), teacher, nn.Conv2d(16, 4, 1)),
                               [torch.randn(64, 3, 8, 8)],
                               QuantConfig(calib_images=64, n_centroids=4, em={"n_iter": 3}), progress=False)
    return teacher, student[1]


def _cached_pair(teacher, xs):
    """The cached (inputs, teacher outputs) of batches `xs`, as the block loop hands them to reconstruction."""
    store = TensorStore(1 << 30)
    inputs = Cached(store, [((x,), {}) for x in xs], torch.device("cpu"), torch.float32)
    with torch.no_grad():
        targets = Cached(store, [teacher(x) for x in xs], torch.device("cpu"), torch.float32)
    return inputs, targets


def test_reconstruction_lowers_the_block_error():
    teacher, block = _quantized_unit()
    xs = [torch.randn(16, 8, 8, 8) for _ in range(4)]
    inputs, targets = _cached_pair(teacher, xs)
    res = reconstruct_block("u", block, inputs, targets, ReconstructConfig(steps=60, lr=1e-2), seed=0)
    assert res["kept"] == "reconstructed"
    assert res["error_after"] < 0.9 * res["error_before"]
    assert block_error(block, inputs, targets) == pytest.approx(res["error_after"], rel=1e-5)


def test_reconstruction_never_leaves_a_block_worse():
    teacher, block = _quantized_unit()
    xs = [torch.randn(16, 8, 8, 8) for _ in range(2)]
    inputs, targets = _cached_pair(teacher, xs)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    res = reconstruct_block("u", block, inputs, targets, ReconstructConfig(steps=5, lr=50.0), seed=0)
    assert res["kept"] == "em"
    assert all(torch.equal(before[k], v) for k, v in block.state_dict().items())


def test_reconstruct_config_is_checked():
    for bad in ({"steps": -1}, {"lr": 0}, {"batch_size": 0}, {"drop_prob": 1.5}):
        with pytest.raises(ValueError):
            ReconstructConfig(**bad)
    with pytest.raises(ValueError, match="unknown reconstruct option"):
        QuantConfig(reconstruct={"stepz": 3})


# ----------------------------------------------------------------------------- the block loop

def _cfg(**kw):
    return QuantConfig(**{"calib_images": 48, "batch_size": 16, "em": {"n_iter": 5},
                          "reconstruct": {"steps": 10, "lr": 1e-3, "batch_size": 8}, **kw})


def test_compress_skipnet_with_reconstruction():
    torch.manual_seed(0)
    m = SkipNet().eval()
    x = torch.randn(48, 3, 8, 8)
    q = bitdown.compress(m, [x], _cfg(), progress=False)
    rec = q.bitdown.extra["reconstruct"]
    assert set(rec) == {"units.0", "units.1", "units.2", "units.3", "head"}
    assert all(r["error_after"] <= r["error_before"] for r in rec.values())
    with torch.no_grad():
        rel = (q(x) - m(x)).norm() / m(x).norm()
    assert rel < 0.5


def test_resume_per_block_is_identical(monkeypatch, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(48, 3, 8, 8)
    torch.manual_seed(0)
    ref = bitdown.compress(SkipNet().eval(), [x], _cfg(), progress=False)
    calls = []
    real = bc.kmeans

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("interrupted")
        return real(*a, **k)

    monkeypatch.setattr(bc, "kmeans", failing)
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="interrupted"):
        bitdown.compress(SkipNet().eval(), [x], _cfg(), checkpoint_dir=tmp_path, progress=False)
    monkeypatch.setattr(bc, "kmeans", real)
    torch.manual_seed(0)
    resumed = bitdown.compress(SkipNet().eval(), [x], _cfg(), checkpoint_dir=tmp_path, progress=False)
    assert resumed.bitdown.extra["resumed"]["layers"] == 3
    sa, sb = ref.state_dict(), resumed.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert ref.bitdown.extra["reconstruct"] == resumed.bitdown.extra["reconstruct"]


def test_depthwise_conv_fed_by_a_zero_channel_does_not_crash():
    """A singular input Gram (a channel that is always zero, as after ReLU6 of a dead channel)."""
    class DW(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw = nn.Conv2d(3, 16, 1, bias=False)
            self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            h = self.pw(x)
            h = torch.cat([h[:, :4] * 0, h[:, 4:]], 1)          # channels 0-3 always zero
            return self.fc(torch.relu(self.dw(h)).mean((2, 3)))

    torch.manual_seed(0)
    m = DW().eval()
    q = bitdown.compress(m, [torch.randn(64, 3, 8, 8)], _cfg(calib_images=64, n_centroids=16), progress=False)
    assert all(torch.isfinite(p).all() for p in q.parameters())


def test_code_learning_changes_codes_and_lowers_the_error():
    teacher, block = _quantized_unit()
    xs = [torch.randn(16, 8, 8, 8) for _ in range(4)]
    inputs, targets = _cached_pair(teacher, xs)
    codes = block.conv.codes.clone()
    res = reconstruct_block("u", block, inputs, targets,
                            ReconstructConfig(steps=80, lr=1e-2, codes="ste", latent_lr=0.1), seed=0)
    assert res["kept"] == "reconstructed" and res["error_after"] < 0.9 * res["error_before"]
    assert res["codes_changed"] == int((block.conv.codes != codes).sum()) > 0
    assert "_ste_latent" not in block.conv.__dict__                 # the latent weights are gone afterwards
    assert block_error(block, inputs, targets) == pytest.approx(res["error_after"], rel=1e-5)


def test_reassign_rounds_run_and_are_recorded():
    torch.manual_seed(0)
    m = SkipNet().eval()
    x = torch.randn(48, 3, 8, 8)
    q = bitdown.compress(m, [x], _cfg(reconstruct={"steps": 10, "lr": 1e-3, "batch_size": 8, "reassign": 1}),
                         progress=False)
    rec = q.bitdown.extra["reconstruct"]
    assert all(r["rounds"] == 2 for r in rec.values())
    assert all(r["error_after"] <= r["error_before"] for r in rec.values())


def test_nan_reconstruction_loss_names_the_block_and_keeps_the_checkpoint(monkeypatch, tmp_path):
    rec = importlib.import_module("bitdown.reconstruct")
    real = rec.output_error
    calls = []

    def nan_in_third_block(out, target, norms=None):     # from the third block's first step (10 steps a block)
        loss = real(out, target, norms)
        if torch.is_grad_enabled():
            calls.append(1)                              # one per gradient slice
        return loss * float("nan") if torch.is_grad_enabled() and len(calls) > 2 * 10 * GRAD_SLICES else loss

    monkeypatch.setattr(rec, "output_error", nan_in_third_block)
    torch.manual_seed(0)
    with pytest.raises(FloatingPointError, match=r"block 'units\.\d'.*checkpoint is kept"):
        bitdown.compress(SkipNet().eval(), [torch.randn(48, 3, 8, 8)], _cfg(), checkpoint_dir=tmp_path,
                         progress=False)
    assert (tmp_path / "state.safetensors").exists()
