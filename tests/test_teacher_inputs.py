"""TeacherInputs: the windowed cache of the uncompressed model's layer inputs gives exactly what one
prefix forward per layer (stats.capture_input) gives, whatever the memory budget, with fewer forwards;
and compress's result does not depend on the budget."""
from __future__ import annotations

import pytest
import torch

import bitdown
import bitdown.teacher_inputs as ti
from bitdown import QuantConfig
from bitdown.stats import capture_input
from bitdown.teacher_inputs import TeacherInputs
from test_compress import LAYERS, make_net


@pytest.mark.parametrize("budget", [0, 60_000, 10**12])
def test_same_tensors_as_capture_input(budget):
    net = make_net()
    batches = [torch.randn(4, 3, 16, 16), torch.randn(3, 3, 16, 16)]
    layers = [net.get_submodule(n) for n in LAYERS]
    cache = TeacherInputs(net, layers, batches, budget_bytes=budget)
    for i in range(len(layers)):
        for b, x in enumerate(batches):
            assert torch.equal(cache.get(i, b), capture_input(net, layers[i], x))
    if budget == 0:         # one layer per window: a forward per layer and batch (+ the size probe)
        assert cache.forwards == 1 + len(layers) * len(batches)
    if budget == 10**12:    # one window: one forward per batch
        assert cache.forwards == 1 + len(batches)
    if budget == 60_000:    # conv2's input (57 KB) alone, then conv3 + conv4 + fc (58 KB) in one window
        assert cache.forwards == 1 + 2 * len(batches)


def test_a_layer_the_forward_never_calls_is_named():
    net = make_net()
    orphan = torch.nn.Conv2d(3, 3, 1)
    cache = TeacherInputs(net, [net.conv2, orphan, net.conv3], [torch.randn(2, 3, 16, 16)], budget_bytes=10**12)
    with pytest.raises(ValueError, match="layer 1 of the plan was not called"):
        cache.get(0, 0)


def test_compress_does_not_depend_on_the_budget(monkeypatch):
    net = make_net()
    data = [torch.randn(16, 3, 16, 16) for _ in range(2)]
    cfg = QuantConfig(n_centroids=8, calib_images=32, batch_size=16)
    a = bitdown.compress(net, data, cfg, progress=False)
    monkeypatch.setattr(ti, "DEFAULT_BUDGET", 0)
    b = bitdown.compress(net, data, cfg, progress=False)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv("BITDOWN_TEACHER_CACHE_MB", "0.5")
    assert ti._budget_from_env() == 2**19
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv("BITDOWN_TEACHER_CACHE_MB", bad)
        with pytest.raises(ValueError, match="BITDOWN_TEACHER_CACHE_MB must be a number"):
            ti._budget_from_env()


def test_copies_survive_later_in_place_ops_and_windows_are_released():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = (torch.nn.Linear(4, 4) for _ in range(3))

        def forward(self, x):
            x = x * 1.0
            x += self.fc1(x)            # in place on fc1's input, after fc1 has run
            x += self.fc2(x)
            return self.fc3(x)

    m = M().eval()
    batches = [torch.randn(3, 4)]
    layers = [m.fc1, m.fc2, m.fc3]
    cache = TeacherInputs(m, layers, batches, budget_bytes=10**12)
    for i, layer in enumerate(layers):
        assert torch.equal(cache.get(i, 0), capture_input(m, layer, batches[0]))
        cache.release(i)
    assert cache._window == {}


def test_a_layer_over_the_budget_is_captured_batch_by_batch():
    net = make_net()
    batches = [torch.randn(4, 3, 16, 16), torch.randn(3, 3, 16, 16)]
    layers = [net.get_submodule(n) for n in LAYERS]
    cache = TeacherInputs(net, layers, batches, budget_bytes=30_000)    # conv2's 57 KB do not fit
    assert torch.equal(cache.get(0, 1), capture_input(net, layers[0], batches[1]))
    assert cache._window == {}                                          # nothing kept for it
    assert torch.equal(cache.get(1, 0), capture_input(net, layers[1], batches[0]))
    assert 1 in cache._window
