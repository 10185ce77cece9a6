"""Per-output-channel scalar codes and fp16-kept layers (scalar.py): the GPTQ quantizer, the layers, the
plan fields, size accounting, the file round trip, ONNX export, and the allocator's richer menu."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bitdown
from bitdown import serialize
from bitdown.allocate import (RICH_MENU, allocate, apply_allocation, budget_bytes, measure_options, menu,
                              scalar_baseline_config, size_bounds)
from bitdown.compress import CompressionInfo
from bitdown.config import LayerPlan, QuantConfig, _check_override, resolve_plan
from bitdown.em import exact_objective
from bitdown.modules import is_pq, quantize_module
from bitdown.scalar import (Fp16Conv2d, ScalarConv2d, ScalarLinear, is_fp16, is_scalar, quantize_fp16,
                            quantize_module_fp16, quantize_module_scalar, quantize_scalar)
from bitdown.serialize import BitdownFileError
from bitdown.size import layer_size, size_report
from bitdown.stats import collect_stats


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def correlated_gram(r: int, groups: int = 1, seed: int = 0) -> torch.Tensor:
    """(groups, r, r) Gram of strongly correlated inputs (a few latent factors plus a little noise)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(groups):
        base = torch.randn(2000, max(2, r // 8), generator=g, dtype=torch.float64)
        x = base @ torch.randn(base.shape[1], r, generator=g, dtype=torch.float64)
        x += 0.1 * torch.randn(2000, r, generator=g, dtype=torch.float64)
        out.append(x.T @ x)
    return torch.stack(out)


# ----------------------------------------------------------------------------- quantizer

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(bits):
    h = correlated_gram(64)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    gptq = quantize_scalar(w, h, bits)
    rtn = quantize_scalar(w, h, bits, feedback=False)
    assert gptq.exact and rtn.exact
    assert gptq.rel_error < 0.6 * rtn.rel_error, (gptq.rel_error, rtn.rel_error)
    err, energy = exact_objective(w, gptq.weight(tuple(w.shape)), h)     # the reported error is the exact one
    assert math.isclose(gptq.objective, err, rel_tol=1e-9)
    assert math.isclose(gptq.rel_error, math.sqrt(err / energy), rel_tol=1e-9)


def test_gptq_on_a_depthwise_conv_all_channels_at_once():
    h = correlated_gram(9, groups=16, seed=2)                           # one Gram per channel
    w = torch.randn(16, 1, 3, 3, generator=torch.Generator().manual_seed(3))
    gptq, rtn = quantize_scalar(w, h, 3), quantize_scalar(w, h, 3, feedback=False)
    assert gptq.codes.shape == (16, 9) and gptq.rel_error < rtn.rel_error
    per_channel = []                                                    # the same as channel by channel
    for c in range(16):
        per_channel.append(quantize_scalar(w[c:c + 1], h[c:c + 1], 3).codes)
    assert torch.equal(torch.cat(per_channel), gptq.codes)


def test_codes_grid_and_dtypes():
    w = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(4))
    w[2] = 0                                                            # a dead channel
    w[3] = w[3].abs() + 0.1                                             # an all-positive channel
    for bits in (2, 3, 4, 8):
        res = quantize_scalar(w, None, bits)
        assert not res.exact
        assert res.codes.dtype == torch.uint8 and res.codes.shape == (8, 27) and int(res.codes.max()) < 2 ** bits
        assert res.zero.dtype == torch.uint8 and int(res.zero.max()) < 2 ** bits
        assert res.scale.dtype == torch.float16 and bool((res.scale > 0).all())
        w_hat = res.weight(tuple(w.shape))
        assert torch.equal(w_hat[2], torch.zeros_like(w_hat[2]))       # 0 is on every grid
        assert bool((w_hat[3] >= 0).all())
    rel = [quantize_scalar(w, None, b).rel_error for b in (2, 3, 4, 8)]
    assert rel == sorted(rel, reverse=True) and rel[-1] < 0.01


def test_fixed_grid_is_used_as_given():
    h = correlated_gram(27, seed=5)
    w = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(6))
    first = quantize_scalar(w, h, 4)
    again = quantize_scalar(w, h, 4, scale=first.scale.float() * 1.5, zero=first.zero)
    assert torch.equal(again.scale, (first.scale.float() * 1.5).half()) and torch.equal(again.zero, first.zero)
    assert torch.equal(quantize_scalar(w, h, 4, scale=first.scale, zero=first.zero).codes, first.codes)
    with pytest.raises(ValueError, match="zero points"):
        quantize_scalar(w, h, 4, scale=first.scale, zero=torch.full((8,), 16))
    with pytest.raises(ValueError, match="scalar bits"):
        quantize_scalar(w, h, 5)
    with pytest.raises(ValueError, match="does not fit"):
        quantize_scalar(w, correlated_gram(9), 4)


def test_fp16_result():
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(7))
    res = quantize_fp16(w, correlated_gram(6))
    assert res.weight16.dtype == torch.float16 and 0 < res.rel_error < 1e-3 and res.exact
    with pytest.raises(ValueError, match="fp16"):
        quantize_fp16(torch.full((2, 2), 1e6))


# ----------------------------------------------------------------------------- layers

class SameConv(nn.Conv2d):
    """A Conv2d subclass with its own forward (as timm's Conv2dSame)."""

    def forward(self, x):
        return super().forward(F.pad(x, (1, 1, 1, 1)))


def test_scalar_layers_keep_the_original_forward():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 7)
    for layer in (nn.Conv2d(4, 6, 3, padding=1), SameConv(4, 6, 3), nn.Conv2d(4, 4, 3, groups=4)):
        cls = type(layer)
        res = quantize_scalar(layer.weight, None, 4)
        dense = _with_weight(layer, res.weight(tuple(layer.weight.shape)))(x)
        out = quantize_module_scalar(layer, res.codes, res.scale, 4, res.zero)
        assert out is layer and is_scalar(layer) and not is_pq(layer) and isinstance(layer, (ScalarConv2d, cls))
        assert "weight" not in dict(layer.named_parameters())
        assert torch.equal(layer.eval()(x), dense)
        assert type(layer.to_dense()) is cls and torch.equal(layer.to_dense()(x), dense)
    lin = nn.Linear(5, 3)
    res = quantize_scalar(lin.weight, None, 8)
    quantize_module_scalar(lin, res.codes, res.scale, 8, res.zero)
    assert isinstance(lin, ScalarLinear) and lin.weight.shape == (3, 5)


def _with_weight(layer: nn.Module, w: torch.Tensor) -> nn.Module:
    import copy
    dense = copy.deepcopy(layer)
    dense.weight = nn.Parameter(w.clone())
    return dense


def test_eval_cache_sees_scale_and_code_changes_and_scale_trains():
    lin = nn.Linear(6, 4)
    res = quantize_scalar(lin.weight, None, 4)
    quantize_module_scalar(lin, res.codes, res.scale, 4, res.zero).eval()
    with torch.no_grad():
        w1 = lin.weight.clone()
        lin.scale.mul_(2)
        assert torch.equal(lin.weight, 2 * w1)
        lin.codes.fill_(0)
        assert torch.equal(lin.weight, -(lin.scale[:, None] * lin.zero[:, None].float()).expand(4, 6))
    loss = lin(torch.randn(3, 6)).pow(2).sum()
    loss.backward()
    assert lin.scale.grad is not None and lin.scale.grad.shape == (4,)


def test_quantize_module_scalar_refuses_bad_inputs_leaving_the_layer_untouched():
    lin = nn.Linear(6, 4)
    res = quantize_scalar(lin.weight, None, 2)
    with pytest.raises(ValueError, match="out of range"):
        quantize_module_scalar(lin, res.codes.long() + 3, res.scale, 2, res.zero)
    with pytest.raises(ValueError, match="do not fit"):
        quantize_module_scalar(lin, res.codes[:2], res.scale, 2, res.zero)
    with pytest.raises(ValueError, match="shape"):
        quantize_module_scalar(lin, res.codes, res.scale[:2], 2, res.zero)
    assert not is_scalar(lin) and isinstance(lin.weight, nn.Parameter)
    quantize_module_scalar(lin, res.codes, res.scale, 2, res.zero)
    with pytest.raises(TypeError, match="already quantized"):
        quantize_module_scalar(lin, res.codes, res.scale, 2, res.zero)
    with pytest.raises(TypeError, match="already quantized"):
        quantize_module_fp16(lin)


def test_fp16_layer():
    conv = nn.Conv2d(3, 4, 3)
    target = torch.randn(4, 3, 3, 3)
    quantize_module_fp16(conv, target)
    assert is_fp16(conv) and isinstance(conv, Fp16Conv2d) and not is_scalar(conv)
    assert isinstance(conv.weight, nn.Parameter) and torch.equal(conv.weight, target.half().float())
    assert type(conv.to_dense()) is nn.Conv2d and torch.equal(conv.to_dense().weight, conv.weight)


# ----------------------------------------------------------------------------- plans, overrides, size

def test_plan_fields_backward_compatible_and_checked():
    old = {"name": "a", "kind": "convkxk", "weight_shape": [8, 4, 3, 3], "block_size": 9, "n_centroids": 16}
    p = LayerPlan.from_json(old)                                        # a plan written before the fields
    assert (p.scalar_bits, p.fp16, p.quantizer) == (0, False, "pq")
    s = LayerPlan.scalar("a", "convkxk", (8, 4, 3, 3), 3)
    assert (s.block_size, s.n_centroids, s.code_bits, s.n_subvectors, s.quantizer) == (1, 8, 3, 288, "int3")
    assert LayerPlan.from_json(json.loads(json.dumps(s.to_json()))) == s
    h = LayerPlan.half("a", "linear", (4, 5))
    assert h.quantizer == "fp16" and LayerPlan.from_json(h.to_json()) == h
    for bad in (dict(scalar_bits=5), dict(scalar_bits=4, block_size=4, n_centroids=16), dict(scalar_bits=4, fp16=True)):
        with pytest.raises(ValueError):
            LayerPlan.from_json({**old, **bad})


def test_overrides_accept_scalar_and_fp16_keys():
    _check_override({"scalar_bits": 3}, "x")
    _check_override({"fp16": True}, "x")
    _check_override({"scalar_bits": 0, "block_size": 9}, "x")          # back to PQ
    for bad, match in [({"scalar_bits": 5}, "scalar_bits"), ({"fp16": 1}, "fp16"),
                       ({"scalar_bits": 4, "block_size": 9}, "cannot be combined"),
                       ({"fp16": True, "share": "g"}, "cannot be combined"),
                       ({"scalar_bits": 4, "fp16": True}, "cannot be combined")]:
        with pytest.raises(ValueError, match=match):
            _check_override(bad, "x")


def test_size_accounting():
    p = LayerPlan.scalar("x", "convkxk", (32, 16, 3, 3), 4)
    lay = layer_size(p)
    assert lay.index_bytes == 4608 * 4 / 8 and lay.codebook_bytes == 32 * (16 + 4) / 8
    assert lay.quantizer == "int4" and math.isclose(lay.bits_per_weight, 4 + 32 * 20 / 4608)
    h = layer_size(LayerPlan.half("x", "linear", (10, 64)))
    assert (h.index_bytes, h.codebook_bytes, h.bits_per_weight, h.quantizer) == (1280, 0, 16, "fp16")
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 10))
    plans = [LayerPlan.scalar("0", "linear", (32, 64), 2), LayerPlan.half("1", "linear", (10, 32))]
    before = size_report(model, plans)
    res = quantize_scalar(model[0].weight, None, 2)
    quantize_module_scalar(model[0], res.codes, res.scale, 2, res.zero)
    quantize_module_fp16(model[1])
    after = size_report(model, plans)                                   # the scales are not "other" parameters
    assert after.size_bytes == before.size_bytes == (32 + 10) * 4 + 2048 * 2 / 8 + 32 * 18 / 8 + 320 * 2
    assert after.other_bytes == (32 + 10) * 4


# ----------------------------------------------------------------------------- file

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.pw(F.relu(self.dw(x))))
        return self.fc(F.relu(self.bn(self.mid(x))).mean((2, 3)))


def mixed_model() -> tuple[nn.Module, list[LayerPlan]]:
    """stem int8, dw int2, pw int3, mid PQ, fc fp16: every kind of layer in one file."""
    model = Net().eval()
    plans = []
    for name, bits in (("stem", 8), ("dw", 2), ("pw", 3)):
        m = model.get_submodule(name)
        res = quantize_scalar(m.weight, None, bits)
        quantize_module_scalar(m, res.codes, res.scale, bits, res.zero)
        plans.append(LayerPlan.scalar(name, "convkxk" if name != "pw" else "conv1x1", m.weight_shape, bits, m.groups))
    g = torch.Generator().manual_seed(1)
    quantize_module(model.mid, torch.randn(8, 9, generator=g).half().float(),
                    torch.randint(0, 8, (16, 16), generator=g))
    plans.append(LayerPlan("mid", "convkxk", (16, 16, 3, 3), 9, 8))
    quantize_module_fp16(model.fc)
    plans.append(LayerPlan.half("fc", "linear", (10, 16)))
    return model, plans


def metadata(model, plans):
    return CompressionInfo({"name": "Net", "source": "user"}, {}, plans, {}).metadata(model)


def test_file_round_trip_is_bit_identical(tmp_path):
    model, plans = mixed_model()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    path = bitdown.save(model, tmp_path / "m.bitdown", metadata(model, plans))
    tensors, meta = serialize.read(path)
    assert tensors["dw.codes"].dtype == torch.uint8 and tensors["dw.codes"].numel() == math.ceil(72 * 2 / 8)
    assert tensors["pw.codes"].numel() == math.ceil(128 * 3 / 8) and tensors["pw.zero"].numel() == math.ceil(16 * 3 / 8)
    assert tensors["stem.scale"].dtype == torch.float16 and tensors["fc.weight"].dtype == torch.float16
    assert [(p["name"], p["scalar_bits"], p["fp16"]) for p in meta["layers"]] == [
        ("stem", 8, False), ("dw", 2, False), ("pw", 3, False), ("mid", 0, False), ("fc", 0, True)]
    loaded = bitdown.load(path, Net())
    assert is_scalar(loaded.dw) and loaded.dw.scalar_bits == 2 and is_pq(loaded.mid) and is_fp16(loaded.fc)
    for name in ("stem", "dw", "pw", "mid", "fc"):
        assert torch.equal(loaded.get_submodule(name).weight, model.get_submodule(name).weight), name
    assert model.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(a, loaded.state_dict()[k]) for k, a in model.state_dict().items())
    assert torch.equal(loaded(x), model(x))
    again = bitdown.save(loaded, tmp_path / "again.bitdown", metadata(loaded, plans))
    assert again.read_bytes() == path.read_bytes()
    assert meta["size"]["size_bytes"] == size_report(model, plans).size_bytes


def test_pq_only_files_are_unchanged_by_the_new_fields(tmp_path):
    model = nn.Sequential(nn.Linear(12, 5))
    quantize_module(model[0], torch.randn(4, 4).half().float(), torch.randint(0, 4, (5, 3)))
    path = bitdown.save(model, tmp_path / "pq.bitdown", metadata(model, [LayerPlan("0", "linear", (5, 12), 4, 4)]))
    raw = serialize.read_stored(path)[1]
    assert "scalar_bits" not in raw["layers"][0] and "fp16" not in raw["layers"][0]   # default: omitted


def _rewrite(path, tensors, meta):
    meta = dict(meta)
    meta.pop("size", None)
    meta["checksum"] = serialize.checksum(tensors, meta)
    serialize.write_stored(path, tensors, meta)


def test_corrupt_scalar_layers_refused_naming_what(tmp_path):
    model, plans = mixed_model()
    path = bitdown.save(model, tmp_path / "m.bitdown", metadata(model, plans))
    tensors, meta = serialize.read(path)
    meta["layers"] = [{k: v for k, v in p.items()} for p in meta["layers"]]
    bad = tmp_path / "bad.bitdown"
    cases = [
        ({**tensors, "dw.scale": tensors["dw.scale"].float()}, meta, "scale of 2-bit layer 'dw'"),
        ({k: v for k, v in tensors.items() if k != "pw.zero"}, meta, "zero of 3-bit layer 'pw' missing"),
        ({**tensors, "dw.codes": torch.cat([tensors["dw.codes"], tensors["dw.codes"][:1]])}, meta, "codes of 2-bit"),
        ({**tensors, "fc.weight": tensors["fc.weight"].float()}, meta, "fp16 layer 'fc'"),
        (tensors, {**meta, "layers": [dict(meta["layers"][0], n_centroids=16)] + meta["layers"][1:]}, "n_centroids"),
        (tensors, {**meta, "layers": [dict(meta["layers"][0], scalar_bits=6)] + meta["layers"][1:]}, "scalar_bits"),
        (tensors, {**meta, "layers": meta["layers"][:4] + [dict(meta["layers"][4], fp16=1)]}, "fp16"),
    ]
    for t, m, match in cases:
        _rewrite(bad, t, m)
        with pytest.raises(BitdownFileError, match=match):
            bitdown.load(bad, Net())


# ----------------------------------------------------------------------------- ONNX

def test_export_scalar_and_fp16_layers_through_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx
    import onnxruntime as ort
    from bitdown.export import export_onnx

    model, plans = mixed_model()
    path = export_onnx(model, tmp_path / "m.onnx", (1, 3, 8, 8))       # checked against the model inside
    init = {i.name: i for i in onnx.load(str(path)).graph.initializer}
    dtypes = {n: onnx.helper.tensor_dtype_to_np_dtype(i.data_type) for n, i in init.items()}
    assert dtypes["dw.codes"] == np.uint8 and dtypes["dw.export_scale"] == np.float16
    assert dtypes["fc.export_weight16"] == np.float16
    assert not any(list(i.dims) in ([8, 1, 3, 3], [10, 16]) and dtypes[n] == np.float32
                   for n, i in init.items())                                    # no dense fp32 copy
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - model(x).numpy()).max() < 1e-4
    assert is_fp16(model.fc) and isinstance(model.fc.weight, nn.Parameter)   # the model is left as it was


# ----------------------------------------------------------------------------- allocator

class TinyDepthwise(nn.Module):
    """A big 3x3 conv next to a tiny depthwise one (32 kernels: PQ gets 2 or 4 codewords)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.big = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.dw(F.relu(self.stem(x))))
        return self.fc(F.relu(self.big(x)).mean((2, 3)))


@pytest.fixture()
def images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, 8, 8, generator=g) for _ in range(2)]


def test_allocator_gives_the_tiny_depthwise_layer_int8_or_fp16(images):
    model = TinyDepthwise().eval()
    plans, _ = resolve_plan(model, QuantConfig())
    dw = next(p for p in plans if p.name == "dw")
    opts = {o.quantizer for o in menu(dw, 9, RICH_MENU)}
    assert opts == {"pq", "fp32", "int8", "int4", "int2", "fp16"}
    table = measure_options(model, plans, images, progress=False, extra=RICH_MENU)
    d = {o.quantizer if o.quantizer != "pq" else (o.block_size, o.n_centroids): o for o in table["dw"]}
    assert {k for k in d if isinstance(k, tuple)} == {(9, 2), (9, 4)}            # PQ: 2 or 4 codewords only
    assert d["int2"].distortion > d["int4"].distortion > d["int8"].distortion > d["fp16"].distortion >= 0
    assert d["int8"].distortion < 1e-3 < min(d[(9, 2)].distortion, d[(9, 4)].distortion)
    w = model.dw.weight.detach()                                                  # measured on the exact objective
    full = collect_stats(model, {"dw": (model.dw, 1)}, images, full_gram=True)["dw"].full_gram
    err, energy = exact_objective(w, quantize_scalar(w, full, 4, feedback=False).weight(tuple(w.shape)), full)
    assert math.isclose(d["int4"].distortion, err / energy, rel_tol=1e-9)
    _, dense, other = size_bounds(model, plans, RICH_MENU)
    pq_only = {n: [o for o in opts if o.quantizer in ("pq", "fp32")] for n, opts in table.items()}
    for ratio in (8, 12):                                                    # the big layer is squeezed
        choice = allocate(table, dense / ratio, other)
        assert choice["dw"].quantizer in ("int8", "fp16"), choice["dw"]
        assert choice["big"].quantizer not in ("fp32", "fp16")
        assert allocate(pq_only, dense / ratio, other)["dw"].quantizer == "fp32"   # without the menu: 4x the bytes
        assert other + sum(o.bytes for o in choice.values()) <= dense / ratio
    choice = allocate(table, dense / 8, other)
    report = {"layers": {n: {"block_size": o.block_size, "n_centroids": o.n_centroids, "keep": o.keep,
                             **({"scalar_bits": o.scalar_bits} if o.scalar_bits else {}),
                             **({"fp16": True} if o.fp16 else {})} for n, o in choice.items()}}
    cfg = apply_allocation(QuantConfig(), report)
    assert cfg.name_overrides["dw"] in ({"scalar_bits": 8}, {"fp16": True})
    assert budget_bytes(model, plans, target_ratio=8.0, extra=RICH_MENU) == pytest.approx(dense / 8)


def test_allocation_report_without_the_new_keys_still_applies():
    report = {"layers": {"a": {"block_size": 9, "n_centroids": 16, "keep": False},
                         "b": {"block_size": 0, "n_centroids": 0, "keep": True}}}
    cfg = apply_allocation(QuantConfig(), report)
    assert cfg.name_overrides == {"a": {"block_size": 9, "n_centroids": 16}, "b": {"skip": True}}


def test_scalar_baseline_config_edges_at_8_bits():
    model = TinyDepthwise()
    cfg = scalar_baseline_config(QuantConfig(name_overrides={"fc": {"n_centroids": 4}}), model, 3,
                                 order=["stem", "dw", "big", "fc"])
    assert cfg.quantize_stem
    assert cfg.name_overrides == {"stem": {"scalar_bits": 8}, "dw": {"scalar_bits": 3}, "big": {"scalar_bits": 3},
                                  "fc": {"scalar_bits": 8}}
    with pytest.raises(ValueError, match="scalar bits"):
        scalar_baseline_config(QuantConfig(), model, 5)


# ----------------------------------------------------------------------------- the pipeline (once wired in)

def _pipeline_has_scalar() -> bool:
    plans, _ = resolve_plan(TinyDepthwise(), QuantConfig(name_overrides={"big": {"scalar_bits": 4}}))
    return any(p.scalar_bits for p in plans)


@pytest.mark.skipif(not _pipeline_has_scalar(), reason="config.resolve_layer / compress.py do not quantize scalar "
                                                       "plans yet (see scalar.py and the issue-13 hand-over)")
def test_compress_with_scalar_and_fp16_plans(images, tmp_path):
    model = TinyDepthwise().eval()
    cfg = QuantConfig(calib_images=32, bn_recalibrate=False, quantize_stem=True,
                      name_overrides={"stem": {"scalar_bits": 8}, "dw": {"fp16": True}, "big": {"scalar_bits": 3}})
    q = bitdown.compress(model, images, cfg, progress=False)
    assert [p.quantizer for p in q.bitdown.plans] == ["int8", "fp16", "int3", "pq"]
    assert is_scalar(q.stem) and is_fp16(q.dw) and is_scalar(q.big) and is_pq(q.fc)
    assert q.bitdown.layers["big"]["exact"] and q.bitdown.layers["big"]["rel_error"] < 0.5
    path = bitdown.save(q, tmp_path / "q.bitdown")
    loaded = bitdown.load(path, TinyDepthwise())
    assert torch.equal(loaded(images[0]), q(images[0]))
    base = scalar_baseline_config(QuantConfig(calib_images=32, bn_recalibrate=False), model, 2)
    qb = bitdown.compress(model, images, base, progress=False)
    assert [p.quantizer for p in qb.bitdown.plans] == ["int8", "int2", "int2", "int8"]


# ----------------------------------------------------------------------------- benchmarks/budget.py's baseline

def test_budget_benchmark_gptq_methods_and_report(tmp_path):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import budget

    assert [budget._scalar_method(m) for m in ("alloc", "uniform", "shared", "gptq4", "gptq3", "gptq2")] == \
           [0, 0, 0, 4, 3, 2]
    for bad in ("gptq5", "gptq", "rtn4"):
        with pytest.raises(SystemExit, match="unknown method"):
            budget._scalar_method(bad)
    row = dict(model="m", method="alloc", codebook_bits=8, target_ratio=20.0, layer_steps=0, global_steps=10,
               calib_images=8, batch_size=4, seed=0, top1=50.0, teacher_top1=60.0, drop=10.0, agreement=70.0,
               size_mb=0.1, ratio=20.0, bytes_on_disk=1000, wall_s=1.0)
    rows = [row, dict(row, method="gptq3", codebook_bits=None, target_ratio=None, ratio=9.5, top1=45.0)]
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"machine": {"cpu": "x", "cores": 2, "torch": "t"}, "teachers": {"m": 60.0},
                                "rows": rows}))
    budget.write_report(path)
    md = (tmp_path / "b.md").read_text()
    assert "| m | gptq3 | - | - | 9.50x |" in md and "| m | alloc | int8 | 20x |" in md


def test_alloc_menu_lets_compress_pick_scalar_options():
    """QuantConfig.alloc_menu: with 'int8'/'fp16' on the menu, a budget run may give layers those options,
    and the file round-trips them; with the default (PQ only) it never does."""
    import bitdown
    from bitdown import QuantConfig

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
            self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
            self.pw = nn.Conv2d(16, 128, 1, bias=False)
            self.fc = nn.Linear(128, 64)

        def forward(self, x):
            x = torch.relu(self.dw(torch.relu(self.stem(x))))
            return self.fc(torch.relu(self.pw(x)).mean((2, 3)))

    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    kinds = {}
    for menu in ([], ["int8", "int4", "fp16"]):
        q = bitdown.compress(Tiny().eval(), [x], QuantConfig(calib_images=64, alloc_menu=menu, em={"n_iter": 5}),
                             target_ratio=4, progress=False)
        kinds[tuple(menu)] = {p.name: p.quantizer for p in q.bitdown.plans}
    assert set(kinds[()].values()) == {"pq"}
    assert set(kinds[("int8", "int4", "fp16")].values()) - {"pq"}
    with pytest.raises(ValueError, match="alloc_menu"):
        QuantConfig(alloc_menu=["int5"])
