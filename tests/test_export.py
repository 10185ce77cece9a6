"""ONNX export (export.py): the graph decodes the stored codebooks (fp16, or int8 + scale) and uint8
codes, so the file stays compact; onnxruntime reproduces the PyTorch outputs; bad input is refused."""
from __future__ import annotations

import json

import pytest
import torch

import bitdown
from bitdown.export import export_onnx
from bitdown.modules import is_pq

from test_compress import LAYERS, batches, cfg, images, make_net

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
FP32, UINT8, INT8, FP16 = 1, 2, 3, 10   # onnx TensorProto data types


def run_onnx(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def initializers(path):
    return {i.name: i for i in onnx.load(str(path)).graph.initializer}


@pytest.fixture(scope="module")
def q16():
    return bitdown.compress(make_net(), batches(), cfg(), progress=False)


def test_export_is_compact_and_matches_the_model(q16, tmp_path):
    before = {k: v.clone() for k, v in q16.state_dict().items()}
    path = export_onnx(q16, tmp_path / "m.onnx", (1, 3, 8, 8))
    assert list(q16.state_dict()) == list(before)                             # no export buffer left behind
    assert all(torch.equal(v, before[k]) for k, v in q16.state_dict().items())
    inits = initializers(path)
    for name in LAYERS:
        layer = getattr(q16, name)
        assert inits[f"{name}.export_codebook"].data_type == FP16
        assert inits[f"{name}.codes"].data_type == UINT8
        dense = list(layer.weight_shape)
        assert not any(list(i.dims) == dense and i.data_type == FP32 for i in inits.values()), name
    x = images(5, seed=3)                                                      # another batch size: dynamic axis
    with torch.no_grad():
        want = q16(x).numpy()
    assert abs(run_onnx(path, x) - want).max() < 1e-4
    dense_path = tmp_path / "dense.onnx"
    torch.onnx.export(make_net(), (images(1),), str(dense_path), dynamo=False)
    assert path.stat().st_size < dense_path.stat().st_size


def test_export_int8_codebooks(tmp_path):
    q = bitdown.compress(make_net(), batches(), cfg(codebook_bits=8), progress=False)
    path = export_onnx(q, tmp_path / "m8.onnx", (2, 3, 8, 8))
    inits = initializers(path)
    assert inits["conv3.export_codebook"].data_type == INT8
    assert inits["conv3.export_scale"].data_type == FP16
    x = images(4, seed=4)
    with torch.no_grad():
        assert abs(run_onnx(path, x) - q(x).numpy()).max() < 1e-4


def test_export_shared_codebooks(tmp_path):
    import test_share as ts
    q = bitdown.compress(ts.make_net(), ts.batches(), ts.cfg(), progress=False)
    path = export_onnx(q, tmp_path / "s.onnx", (1, 3, 8, 8))
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert abs(run_onnx(path, x) - q(x).numpy()).max() < 1e-4


def test_a_graph_that_disagrees_is_not_written(q16, tmp_path, monkeypatch):
    import bitdown.export as bx
    real = bx.encode_codebook
    monkeypatch.setattr(bx, "encode_codebook", lambda cb, bits: real(cb * 1.5, bits))   # a wrong decode
    with pytest.raises(ValueError, match="disagrees"):
        export_onnx(q16, tmp_path / "bad.onnx", (1, 3, 8, 8))
    assert not (tmp_path / "bad.onnx").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_nan_onnx_output_is_a_disagreement(q16, tmp_path, monkeypatch):
    """NaN - x is NaN and NaN > tol is false: a graph giving NaN must still be refused."""
    import bitdown.export as bx
    real = bx.encode_codebook
    monkeypatch.setattr(bx, "encode_codebook", lambda cb, bits: real(cb * float("nan"), bits))
    with pytest.raises(ValueError, match="NaN/inf outputs"):
        export_onnx(q16, tmp_path / "nan.onnx", (1, 3, 8, 8))
    assert not (tmp_path / "nan.onnx").exists()


def test_nan_model_output_is_refused(q16, tmp_path):
    import copy
    q = copy.deepcopy(q16)
    with torch.no_grad():
        q.fc.bias[0] = float("inf")                      # the PyTorch model (and the graph) give inf / NaN
    with pytest.raises(ValueError, match="NaN/inf outputs"):
        export_onnx(q, tmp_path / "inf.onnx", (1, 3, 8, 8))
    assert not (tmp_path / "inf.onnx").exists()


def test_export_from_a_saved_file(q16, tmp_path):
    """The file holds bit-packed codes; the loaded model (and so the graph) has uint8 codes again."""
    from bitdown import serialize
    f = bitdown.save(q16, tmp_path / "m.bitdown")
    tensors, meta = serialize.read(f)
    assert meta["format_version"] == serialize.FORMAT_VERSION and tensors["conv3.codes"].dim() == 1   # packed
    loaded = bitdown.load(f, make_net())
    path = export_onnx(loaded, tmp_path / "m.onnx", (1, 3, 8, 8))
    inits = initializers(path)
    for name in LAYERS:
        assert inits[f"{name}.codes"].data_type == UINT8
        assert list(inits[f"{name}.codes"].dims) == list(getattr(q16, name).codes.shape)
    x = images(3, seed=6)
    with torch.no_grad():
        assert abs(run_onnx(path, x) - q16(x).numpy()).max() < 1e-4


def test_bad_input_refused(q16, tmp_path):
    with pytest.raises(ValueError, match="no product-quantized layer"):
        export_onnx(make_net(), tmp_path / "x.onnx", (1, 3, 8, 8))
    for shape in [(8,), (1, 3, 0, 8)]:
        with pytest.raises(ValueError, match="input_shape"):
            export_onnx(q16, tmp_path / "x.onnx", shape)


def test_cli_export(tmp_path, monkeypatch, capsys):
    from bitdown.cli import main
    from bitdown.zoo import build_model
    q = bitdown.compress(build_model("resnet20_cifar10", weights=None),
                         [torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)],
                         bitdown.QuantConfig(calib_images=64, em={"n_iter": 3}), progress=False,
                         arch={"name": "resnet20_cifar10", "source": "zoo", "preprocess": "cifar10"})
    f = bitdown.save(q, tmp_path / "r20.bitdown")
    rc = main(["export", str(f), "--out", str(tmp_path / "r20.onnx"), "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and out["input_shape"] == [1, 3, 32, 32]
    assert out["bytes_on_disk"] < 2 * out["bitdown_bytes"]
    rc = main(["export", str(f), "--out", str(tmp_path / "x.onnx"), "--input-shape", "1,3,a"])
    assert rc == 2 and "--input-shape" in capsys.readouterr().err
    assert sum(1 for m in q.modules() if is_pq(m)) == 19


def test_export_efficientnet_with_conv_subclasses_and_int8(tmp_path):
    """EfficientNet-Lite0's TF-"SAME" padding convs are Conv2d subclasses: their PQ versions export too."""
    from bitdown.config import resolve_plan
    from bitdown.modules import quantize_module
    from bitdown.recipes import zoo_config
    from bitdown.zoo import build_model
    torch.manual_seed(0)
    m = build_model("efficientnet_lite0", weights=None).eval()
    plans, _ = resolve_plan(m, zoo_config("efficientnet_lite0", "small", codebook_bits=8))
    mods = dict(m.named_modules())
    for p in plans:                                  # random codebooks/codes: only the graph is under test
        n = mods[p.name].weight.numel() // p.block_size
        quantize_module(mods[p.name], torch.randn(p.n_centroids, p.block_size) * 0.05,
                        torch.randint(0, p.n_centroids, (n,)), 8)
    path = export_onnx(m, tmp_path / "eff.onnx", (1, 3, 224, 224))     # raises if onnxruntime disagrees
    inits = initializers(path)
    assert sum(i.data_type == INT8 for i in inits.values()) == len(plans)
