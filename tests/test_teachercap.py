"""The teacher-side layer inputs recorded in one teacher block run per batch (teachercap.py): equal to the per-layer
teacher runs' bit for bit, used by compress where they fit the block cache's budget, the per-layer path beyond it."""
from __future__ import annotations

import importlib

import torch
import torch.nn as nn

import bitdown
from bitdown import QuantConfig
from bitdown.blockio import Cached, TensorStore, run_block
from bitdown.stats import capture_call, capture_input
from bitdown.teachercap import TeacherInputs, block_run, plan_capture

bc = importlib.import_module("bitdown.compress")
tc = importlib.import_module("bitdown.teachercap")


class Res(nn.Module):
    """A residual block of three layers: 3x3 conv, 3x3 conv, 1x1 shortcut conv; in-place ops on the way."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.short = nn.Conv2d(c, c, 1, bias=False)

    def forward(self, x):
        out = self.bn1(self.conv1(x)).relu_()
        out = self.bn2(self.conv2(out))
        out += self.short(x)
        return out.relu_()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.res1, self.res2 = Res(), Res()
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.res2(self.res1(self.bn(self.stem(x)).relu()))
        return self.fc(x.mean((2, 3)))


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def batches(n: int = 64, bs: int = 32) -> list[torch.Tensor]:
    return list(torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1)).split(bs))


LAYERS = ("conv1", "conv2", "short")


def block_inputs(net: Net, xs: list[torch.Tensor], store: TensorStore) -> Cached:
    return Cached(store, (capture_call(net, net.res2, x) for x in xs), xs[0].device, xs[0].dtype)


def test_recorded_inputs_equal_the_per_layer_runs_exactly():
    net, xs = make_net(), batches(40, 20)         # batches of 20 images in pieces of 6: 6, 6, 6, 2
    store = TensorStore(1 << 30)
    t_in = block_inputs(net, xs, store)
    mods = {n: getattr(net.res2, n) for n in LAYERS}
    rec = plan_capture(store, net.res2, t_in, mods, [len(x) for x in xs])
    assert isinstance(rec, TeacherInputs)
    with torch.no_grad():
        outs = [block_run(net.res2, t_in, b, 6, len(x), rec) for b, x in enumerate(xs)]
    for b, x in enumerate(xs):
        assert torch.equal(outs[b], run_block(net.res2, t_in[b]))      # the run still gives the block's outputs
        slices = t_in.slices(b, 6, len(x))
        assert len(slices) == 4
        for name in LAYERS:
            for k, sl in enumerate(slices):
                per_layer = capture_input(lambda a: run_block(net.res2, a), mods[name], t_in.piece(b, sl, len(x)))
                got = rec.piece(name, b, slices, k, x.device)
                assert got is not None and torch.equal(got, per_layer), (name, b, k)
    assert rec.used == 2 * 4 * len(LAYERS)
    # another cut of the batch than the recorded run's: no answer (the caller runs the teacher up to the layer)
    assert rec.piece("conv1", 0, t_in.slices(0, 0, 20), 0, xs[0].device) is None
    held = store.in_ram
    rec.free()
    assert store.in_ram < held


def test_a_tiny_budget_records_nothing():
    net, xs = make_net(), batches(40, 20)
    store = TensorStore(1 << 30)
    t_in = block_inputs(net, xs, store)
    mods = {n: getattr(net.res2, n) for n in LAYERS}
    store.budget = store.in_ram + 1024             # 1 KB left: 40 images x 3 layers x 2 KB do not fit
    before = store.in_ram
    assert plan_capture(store, net.res2, t_in, mods, [20, 20]) is None
    assert store.in_ram == before and store.spilled == 0       # nothing was stored to find that out
    assert plan_capture(TensorStore(1 << 30, torch.float16), net.res2, t_in, mods, [20, 20]) is None


def count_paths(monkeypatch) -> dict[str, int]:
    """Counts the pieces answered from the record and the per-layer teacher runs inside compress."""
    seen = {"recorded": 0, "per_layer": 0}
    real_piece, real_capture = TeacherInputs.piece, bc.capture_input

    def piece(self, *a, **k):
        t = real_piece(self, *a, **k)
        seen["recorded"] += t is not None
        return t

    def capture(*a, **k):
        seen["per_layer"] += 1
        return real_capture(*a, **k)
    monkeypatch.setattr(TeacherInputs, "piece", piece)
    monkeypatch.setattr(bc, "capture_input", capture)
    return seen


def cfg(**kw) -> QuantConfig:
    return QuantConfig(**{**dict(em={"n_iter": 5}, calib_images=64, batch_size=32, n_centroids=16,
                                 forward_mb=0.005), **kw})          # 0.005 MB: pieces of 6 images


def compress_counted(monkeypatch, **kw) -> tuple[nn.Module, dict[str, int]]:
    with monkeypatch.context() as m:
        seen = count_paths(m)
        q = bitdown.compress(make_net(), batches(), cfg(**kw), progress=False)
    return q, seen


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_compress_uses_the_record_and_gives_the_per_layer_result(monkeypatch):
    recorded, seen = compress_counted(monkeypatch)
    assert seen["per_layer"] == 0 and seen["recorded"] > 0
    with monkeypatch.context() as m:                      # main's path: every teacher input from its own run
        m.setattr(bc, "plan_capture", lambda *a, **k: None)
        per_layer, seen_off = compress_counted(m)
    assert seen_off["recorded"] == 0 and seen_off["per_layer"] == seen["recorded"]
    assert_same_state(recorded, per_layer)


def test_compress_beyond_the_budget_takes_the_per_layer_path(monkeypatch):
    tiny, seen = compress_counted(monkeypatch, cache_mb=0)      # every activation spills; no record fits
    assert seen["recorded"] == 0 and seen["per_layer"] > 0
    assert_same_state(tiny, compress_counted(monkeypatch)[0])


def test_an_unshared_copy_is_its_own_and_frees_cleanly():
    store = TensorStore(1 << 30)
    a = torch.randn(4, 5)
    h1 = store.put(a)
    h2 = store.put(a.clone(), share=False)            # equal values, yet a copy of its own
    assert h2 is not h1 and store.in_ram == 2 * a.numel() * 4
    assert store.put(a) is h1                          # a shared put still finds the shared copy, not this one
    store.free(h2)
    assert store.in_ram == a.numel() * 4 and torch.equal(store.get(h1), a)
