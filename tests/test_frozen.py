"""The frozen inference model (frozen.py, `bitdown.load(path, frozen=True)`): plain layers with the decoded
weights, bit-identical outputs, train(True) / load_state_dict / save / export refused before anything changes,
evaluate and the CLI's inference paths using it."""

from __future__ import annotations

import copy
import io
import json
import pickle

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import bitdown
from bitdown import FrozenModelError, freeze, is_frozen
from bitdown.evaluate import evaluate
from bitdown.modules import quantize_module
from bitdown.scalar import is_quantized
from bitdown.size import size_report
from test_cli import SPEC, compressed, run, ws  # noqa: F401  (fixtures)
from test_scalar import Net, metadata, mixed_model

X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))


@pytest.fixture
def mixed_file(tmp_path):
    """A file with int8 / int2 / int3 scalar layers, a PQ conv and an fp16 linear (test_scalar.mixed_model)."""
    model, plans = mixed_model()
    return bitdown.save(model, tmp_path / "m.bitdown", metadata(model, plans))


def _modes(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


def test_frozen_model_is_plain_layers_with_identical_outputs(mixed_file):
    pq = bitdown.load(mixed_file, Net())
    fr = bitdown.load(mixed_file, Net(), frozen=True)
    assert is_frozen(fr) and not is_frozen(pq) and not fr.training
    assert not any(is_quantized(m) for m in fr.modules())
    assert [type(fr.get_submodule(n)) for n in ("stem", "dw", "pw", "mid", "fc")] == [nn.Conv2d] * 4 + [nn.Linear]
    assert all(is_frozen(m) for m in fr.modules()) and "Conv2d(3, " in repr(fr)
    assert all(isinstance(p, nn.Parameter) and not p.requires_grad for p in fr.parameters())
    for name in ("stem", "dw", "pw", "mid", "fc"):
        assert torch.equal(fr.get_submodule(name).weight, pq.get_submodule(name).weight), name
    with torch.no_grad():
        assert torch.equal(fr(X), pq(X))
    assert torch.equal(fr(X), pq(X).detach())          # outside no_grad too (no autograd graph for the frozen one)
    assert fr.bitdown.plans == pq.bitdown.plans       # what `bitdown info` reports about the file
    assert size_report(fr, fr.bitdown.plans) == size_report(pq, pq.bitdown.plans)    # the demo's size row


def test_freeze_in_place_keeps_subclasses_hooks_and_shared_layers():
    class MyLinear(nn.Linear):
        pass

    torch.manual_seed(0)
    model = nn.Sequential(MyLinear(12, 6), nn.ReLU())
    model.append(nn.Linear(6, 6))
    model.append(model[2])                               # one layer at two places
    g = torch.Generator().manual_seed(1)
    quantize_module(model[0], torch.randn(8, 4, generator=g), torch.randint(0, 8, (6, 3), generator=g))
    quantize_module(model[2], torch.randn(8, 3, generator=g), torch.randint(0, 8, (6, 2), generator=g))
    model.eval()
    x = torch.randn(5, 12, generator=g)
    with torch.no_grad():
        ref = model(x)
    seen = []
    handle = model[0].register_forward_hook(lambda m, i, o: seen.append(type(m)))
    assert freeze(model) is model and freeze(model) is model           # in place; freezing again: the same
    assert type(model[0]) is MyLinear and type(model[2]) is nn.Linear and model[3] is model[2]   # classes kept
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert seen == [MyLinear]                            # the hook moved to the dense layer
    handle.remove()
    model(x)
    assert seen == [MyLinear]                            # and its handle still removes it

    layer = quantize_module(nn.Linear(4, 2), torch.randn(3, 2, generator=g), torch.randint(0, 3, (2, 2), generator=g))
    dense = freeze(layer)                                # a bare compressed layer: a new dense one
    assert type(dense) is nn.Linear and is_frozen(dense) and torch.equal(dense.weight, layer.dequantize())


def test_train_and_load_state_dict_refused_before_anything_changes(mixed_file):
    fr = bitdown.load(mixed_file, Net(), frozen=True)
    before = _modes(fr)
    state = {k: v.clone() for k, v in fr.state_dict().items()}
    for call in (fr.train, lambda: fr.train(True), lambda: fr.train(mode=True), fr.bn.train,
                 lambda: fr.load_state_dict(state), lambda: fr.fc.load_state_dict(fr.fc.state_dict())):
        with pytest.raises(FrozenModelError, match="without frozen=True"):
            call()
        assert _modes(fr) == before and not any(before.values())
    assert fr.eval() is fr and fr.train(False) is fr and _modes(fr) == before      # eval mode is always fine
    assert all(torch.equal(v, state[k]) for k, v in fr.state_dict().items())
    with pytest.raises(FrozenModelError, match="cannot save"):
        bitdown.save(fr, mixed_file.with_name("again.bitdown"))
    from bitdown.export import export_onnx
    with pytest.raises(FrozenModelError, match="cannot export"):
        export_onnx(fr, mixed_file.with_name("m.onnx"), (1, 3, 8, 8))
    assert not mixed_file.with_name("again.bitdown").exists()
    with pytest.raises(FrozenModelError, match="cannot load a file into"):    # loading into it: refused untouched
        bitdown.load(mixed_file, fr)
    assert all(torch.equal(v, state[k]) for k, v in fr.state_dict().items())
    assert not any(is_quantized(m) for m in fr.modules())


def test_copies_and_pickles_stay_frozen(mixed_file):
    fr = bitdown.load(mixed_file, Net(), frozen=True)
    buf = io.BytesIO()
    torch.save(fr, buf)
    buf.seek(0)
    for other in (copy.deepcopy(fr), pickle.loads(pickle.dumps(fr)), torch.load(buf, weights_only=False)):
        assert is_frozen(other) and other.train.module is other and other.bn.train.module is other.bn
        assert all(is_frozen(m) for m in other.modules()) and type(other.fc) is type(fr.fc)
        assert _modes(other) == _modes(fr) and not any(p.requires_grad for p in other.parameters())
        with pytest.raises(FrozenModelError):
            other.train()
        with torch.no_grad():
            assert torch.equal(other(X), fr(X))


def test_evaluate_restores_the_mode_of_a_frozen_model(mixed_file):
    pq = bitdown.load(mixed_file, Net())
    fr = bitdown.load(mixed_file, Net(), frozen=True)
    ds = TensorDataset(torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(4)), torch.arange(12) % 10)
    loader = DataLoader(ds, batch_size=5)
    res, ref = evaluate(fr, loader, teacher=pq), evaluate(pq, loader, teacher=pq)
    keys = ("top1", "top5", "agreement", "n")
    assert {k: res[k] for k in keys} == {k: ref[k] for k in keys}
    assert res["agreement"] == 100.0
    assert not any(_modes(fr).values()) and is_frozen(fr)


def test_cli_eval_uses_the_frozen_model(compressed, capsys, monkeypatch):  # noqa: F811
    from bitdown import evaluate as evaluate_module

    path, _ = compressed
    seen = []
    real = evaluate_module.evaluate

    def spy(model, *args, **kwargs):
        seen.append(is_frozen(model))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate", spy)
    rc, out, err = run(capsys, "eval", path, "--data", "imgs", "--model", SPEC, "--json")
    assert rc == 0, err
    assert seen == [True]
    from test_cli_eval import _build, _ref
    assert json.loads(out)["top1"] == _ref(bitdown.load(path, _build()))["top1"]   # the PQ model's figure


def test_detector_files_load_frozen(monkeypatch, tmp_path):
    from bitdown.cli_detect import resolve_detector

    calls = []
    monkeypatch.setattr(bitdown, "load", lambda path, **kw: calls.append(kw) or nn.Identity())
    (tmp_path / "d.bitdown").write_bytes(b"")
    resolve_detector(tmp_path / "d.bitdown")
    assert calls == [{"frozen": True}]


class _Sub(nn.Linear):
    """A user's layer class (module level, so pickle finds it by name)."""


def _sub_model() -> nn.Module:
    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(_Sub(12, 6), nn.ReLU(), nn.Linear(6, 4))
    quantize_module(model[0], torch.randn(8, 4, generator=g), torch.randint(0, 8, (6, 3), generator=g))
    return model


def test_a_frozen_model_is_freed_without_the_cycle_collector(mixed_file):
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        for make in (lambda: freeze(_sub_model()), lambda: bitdown.load(mixed_file, Net(), frozen=True)):
            fr = make()
            refs = [weakref.ref(fr), weakref.ref(next(fr.parameters()))]
            assert is_frozen(fr) and all(r() is not None for r in refs)
            del fr                                       # the last reference: freed now, not at the next gc run
            assert [r() for r in refs] == [None, None]
    finally:
        gc.enable()


def test_copies_and_pickles_are_frozen_with_the_same_outputs():
    fr = freeze(_sub_model())
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(6))
    data = pickle.dumps(fr)
    for other in (copy.deepcopy(fr), pickle.loads(data)):
        assert other is not fr and other[0].weight is not fr[0].weight
        assert is_frozen(other) and type(other[0]) is _Sub and other[0].train.module is other[0]
        assert all(is_frozen(m) for m in other.modules()) and not other.training
        with torch.no_grad():
            assert torch.equal(other(x), fr(x))
        for call in (lambda: other.train(True), lambda: other[0].train(), lambda: other.load_state_dict(fr.state_dict())):
            with pytest.raises(FrozenModelError, match="without frozen=True"):
                call()
        assert not any(m.training for m in other.modules()) and other.eval() is other


def test_frozen_models_trace_and_fuse_as_plain_models():
    """freeze keeps every module's class: torch.fx sees nn layers as leaves, Conv-BN-ReLU fusion finds its pattern
    (a frozen model made of subclasses broke both)."""
    import torch.fx as fx
    from torch.ao.quantization import fuse_modules

    model = freeze(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 5)))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    graph = fx.symbolic_trace(model)
    assert [n.op for n in graph.graph.nodes].count("call_module") == 5
    with torch.no_grad():
        assert torch.equal(graph(x), model(x))
        fused = fuse_modules(copy.deepcopy(model), [["0", "1", "2"]])
        assert type(fused[0]).__name__ == "ConvReLU2d"
        assert torch.allclose(fused(x), model(x), atol=1e-5)


def test_compressing_a_frozen_model_is_refused_first():
    fr = freeze(_sub_model())
    with pytest.raises(FrozenModelError, match="cannot compress a frozen model"):
        bitdown.compress(fr, [torch.randn(4, 12)], bitdown.QuantConfig())
