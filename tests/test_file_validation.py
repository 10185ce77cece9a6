"""Hostile files whose checksum is valid (it is not a signature: anyone can recompute it): every one is
refused with a BitdownFileError naming the key or tensor, by `read` (hence `bitdown info`), `load`,
and the CLI's info / eval / export (exit code 2 and one error line, never a traceback)."""

from __future__ import annotations

import json
import math
import zlib

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import bitdown
from bitdown import serialize
from bitdown.cli import main
from bitdown.compress import CompressionInfo
from bitdown.config import LayerPlan
from bitdown.modules import quantize_module
from bitdown.serialize import BitdownFileError

from test_serialize import TinyNet, make_data

MODEL = "test_serialize:TinyNet"      # module:function for the CLI (tests/ is on sys.path)


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    torch.manual_seed(0)
    q = bitdown.compress(TinyNet(), make_data(), bitdown.QuantConfig(em={"n_iter": 4}, bn_recalibrate=True),
                         progress=False)
    path = bitdown.save(q, tmp_path_factory.mktemp("valid") / "m.bitdown")
    return path.read_bytes()


def raw(path):
    """The file's tensors and metadata exactly as stored (only the container checked)."""
    return serialize.read_stored(path)


def write(path, tensors, meta):
    """A file with a valid checksum for whatever tensors and metadata it holds."""
    meta = dict(meta, checksum=serialize.checksum(tensors, meta))
    return serialize.write_stored(path, tensors, meta)


def setitem(container_key, key, value):
    def mutate(t, m):
        m[container_key][key] = value
    return mutate


def layer(i, key, value):
    def mutate(t, m):
        m["layers"][i][key] = value
    return mutate


def tensor(name, index, value):
    def mutate(t, m):
        x = t[name].clone()
        x.view(-1)[index] = value
        t[name] = x
    return mutate


def top(key, value):
    def mutate(t, m):
        m[key] = value
    return mutate


def delete(key, sub=None):
    def mutate(t, m):
        del (m if sub is None else m["layers"][sub])[key]
    return mutate


NAN, INF = float("nan"), float("inf")

HOSTILE = {
    # --- metadata: types, ranges, known keys
    "arch_is_a_string": (top("arch", "x"), r"arch must be a JSON object, got \"x\""),
    "arch_name_not_string": (setitem("arch", "name", 5), r"arch\.name must be a non-empty string"),
    "arch_source_unknown": (setitem("arch", "source", "internet"), r"arch\.source must be 'zoo' or 'user'"),
    "arch_unknown_key": (setitem("arch", "pickle", "x"), r"arch has unknown key\(s\) \['pickle'\]"),
    "arch_preprocess_not_string": (setitem("arch", "preprocess", 3), r"arch\.preprocess"),
    "config_is_a_list": (top("config", []), r"config must be a JSON object"),
    "missing_config": (delete("config"), r"metadata lacks \['config'\]"),
    "unknown_top_level_key": (top("evil", 1), r"unknown metadata key\(s\) \['evil'\]"),
    "skipped_is_a_list": (top("skipped", ["conv1"]), r"skipped must be a JSON object"),
    "skipped_reason_not_string": (top("skipped", {"conv1": 3}), r"skipped\['conv1'\] must be a string"),
    "em_is_a_list": (top("em", []), r"em must be a JSON object"),
    "em_entry_not_object": (top("em", {"conv2": 0.5}), r"em\['conv2'\] must be a JSON object"),
    "extra_is_a_list": (top("extra", []), r"extra must be a JSON object"),
    "allocation_is_a_list": (top("extra", {"allocation": []}), r"extra\.allocation must be a JSON object"),
    "allocation_budget_string": (top("extra", {"allocation": {"budget_bytes": "1MB", "achieved_bytes": 1.0,
                                                              "ratio": 2.0}}), r"extra\.allocation\.budget_bytes"),
    "calib_images_negative": (top("extra", {"calib_images": -1}), r"extra\.calib_images"),
    "size_is_a_string": (top("size", "big"), r"size must be a JSON object"),
    "size_nan": (setitem("size", "size_mb", NAN), r"size\.size_mb must be a finite number"),
    "size_negative": (setitem("size", "ratio", -3), r"size\.ratio must be a finite number >= 0"),
    "size_value_string": (setitem("size", "size_bytes", "1 MB"), r"size\.size_bytes"),
    "timings_is_a_list": (top("timings", [1.0]), r"timings must be a JSON object"),
    "layers_is_an_object": (top("layers", {}), r"corrupt layer list.*non-empty list"),
    "layers_empty": (top("layers", []), r"corrupt layer list.*non-empty list"),
    "layer_is_a_string": (lambda t, m: m["layers"].__setitem__(0, "conv2"),
                          r"corrupt layer list.*layers\[0\] must be a JSON object, got \"conv2\""),
    "layer_missing_key": (delete("block_size", sub=1), r"layers\[1\] \('conv3'\): missing key\(s\) \['block_size'\]"),
    "layer_unknown_key": (layer(1, "bits", 3), r"layers\[1\] \('conv3'\).*unknown key\(s\) \['bits'\]"),
    "layer_name_empty": (layer(0, "name", ""), r"layers\[0\]: name must be a non-empty string"),
    "layer_name_number": (layer(0, "name", 7), r"layers\[0\]: name must be a non-empty string"),
    "layer_kind_unknown": (layer(0, "kind", "conv3d"), r"layers\[0\] \('conv2'\): kind must be one of"),
    "layer_shape_string": (layer(0, "weight_shape", "16x8x3x3"), r"'conv2'\): weight_shape must be a list of 4"),
    "layer_shape_rank": (layer(0, "weight_shape", [16, 72]), r"weight_shape must be a list of 4 positive"),
    "layer_shape_zero": (layer(0, "weight_shape", [0, 8, 3, 3]), r"weight_shape must be a list of 4 positive"),
    "layer_shape_float": (layer(2, "weight_shape", [10.0, 16]), r"'fc'\): weight_shape must be a list of 2"),
    "layer_block_size_not_dividing": (layer(0, "block_size", 5), r"block_size must be a positive integer "
                                                                 r"dividing the row length 72"),
    "layer_block_size_bool": (layer(1, "block_size", True), r"'conv3'\): block_size"),
    "layer_k_zero": (layer(0, "n_centroids", 0), r"n_centroids must be an integer in \[1, 32768\]"),
    "layer_k_huge": (layer(0, "n_centroids", 1 << 20), r"n_centroids must be an integer in \[1, 32768\]"),
    "layer_k_string": (layer(0, "n_centroids", "16"), r"n_centroids must be an integer"),
    "layer_k_float": (layer(0, "n_centroids", 16.0), r"n_centroids must be an integer"),
    "layer_codebook_bits_12": (layer(0, "codebook_bits", 12), r"codebook_bits must be one of \[16, 8\]"),
    "layer_codebook_bits_bool": (layer(0, "codebook_bits", True), r"codebook_bits must be one of"),
    "layer_groups_zero": (layer(0, "groups", 0), r"groups must be a positive integer"),
    "layer_share_list": (layer(0, "share", ["g"]), r"corrupt layer list.*share must be a group name"),
    "layer_listed_twice": (lambda t, m: m["layers"].append(dict(m["layers"][0])), r"\['conv2'\] listed twice"),
    "share_group_inconsistent": (lambda t, m: [d.__setitem__("share", "g") for d in m["layers"][:2]],
                                 r"share group 'g' has layers with different block_size"),
    # --- tensors: finite values, variances, codes below K, shapes and dtypes matching the plan
    "nan_codebook": (tensor("conv2.codebook", 0, NAN), r"tensor 'conv2.codebook' holds NaN or infinite values"),
    "inf_codebook": (tensor("conv3.codebook", 5, -INF), r"tensor 'conv3.codebook' holds NaN or infinite"),
    "inf_bias": (tensor("fc.bias", 3, INF), r"tensor 'fc.bias' holds NaN or infinite values"),
    "nan_dense_weight": (tensor("conv1.weight", 7, NAN), r"tensor 'conv1.weight' holds NaN"),
    "nan_bn_weight": (tensor("bn1.weight", 0, NAN), r"tensor 'bn1.weight' holds NaN"),
    "nan_running_mean": (tensor("bn3.running_mean", 2, NAN), r"tensor 'bn3.running_mean' holds NaN"),
    "negative_running_var": (tensor("bn2.running_var", 3, -1.0), r"tensor 'bn2.running_var' holds negative values"),
    "inf_running_var": (tensor("bn2.running_var", 0, INF), r"tensor 'bn2.running_var' holds NaN or infinite"),
    "codebook_fewer_rows_than_k": (lambda t, m: t.__setitem__("conv2.codebook", t["conv2.codebook"][:8].clone()),
                                   r"codebook/codes of 'conv2' missing or of the wrong shape"),
    "plan_k_larger_than_codebook": (layer(0, "n_centroids", 32), r"codebook/codes of 'conv2' missing or of the wrong"),
    "codebook_wrong_width": (layer(1, "block_size", 8), r"codebook/codes of 'conv3' missing or of the wrong shape"),
    "codebook_fp32": (lambda t, m: t.__setitem__("fc.codebook", t["fc.codebook"].float()),
                      r"codebook of 'fc' is not stored as the metadata says"),
    "codes_missing": (lambda t, m: t.pop("conv3.codes"), r"codebook/codes of 'conv3' missing"),
    "codes_truncated": (lambda t, m: t.__setitem__("conv2.codes", t["conv2.codes"][:-1].clone()),
                        r"codes of 'conv2': not 128 4-bit codes packed into 64 bytes"),
    "codes_unpacked_in_v2": (lambda t, m: t.__setitem__("conv2.codes", torch.zeros(16, 8, dtype=torch.uint8)),
                             r"codes of 'conv2': not 128 4-bit codes packed"),
    "codes_int16": (lambda t, m: t.__setitem__("conv3.codes", t["conv3.codes"].to(torch.int16)),
                    r"codes of 'conv3': not 64 3-bit codes"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_file_refused(valid, tmp_path, case):
    mutate, match = HOSTILE[case]
    good = tmp_path / "good.bitdown"
    good.write_bytes(valid)
    tensors, meta = raw(good)
    mutate(tensors, meta)
    path = write(tmp_path / "bad.bitdown", tensors, meta)
    with pytest.raises(BitdownFileError, match=match):
        serialize.read(path)                                  # what `bitdown info` reads
    model = TinyNet()
    with pytest.raises(BitdownFileError, match=match):
        bitdown.load(path, model)
    assert not any(isinstance(m, bitdown.PQConv2d) for m in model.modules())      # untouched
    with pytest.raises(BitdownFileError, match=match):       # apply checks what it is given too
        serialize.apply(TinyNet(), tensors, meta)


CLI_CASES = ["arch_is_a_string", "layer_is_a_string", "skipped_is_a_list", "nan_codebook", "inf_bias",
             "negative_running_var", "layer_k_string", "size_is_a_string"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_refuses_hostile_file_without_traceback(valid, tmp_path, capsys, case):
    (tmp_path / "good.bitdown").write_bytes(valid)
    tensors, meta = raw(tmp_path / "good.bitdown")
    HOSTILE[case][0](tensors, meta)
    path = str(write(tmp_path / "bad.bitdown", tensors, meta))
    for argv in (["info", path], ["info", path, "--json"],
                 ["eval", path, "--data", str(tmp_path), "--model", MODEL],
                 ["export", path, "--out", str(tmp_path / "x.onnx"), "--model", MODEL, "--input-shape", "1,3,8,8"]):
        rc = main(argv)
        out, err = capsys.readouterr()
        assert rc == 2, (argv, out, err)
        assert err.startswith(f"error: {path}: ") and "Traceback" not in err, err    # a BitdownFileError
        assert not (tmp_path / "x.onnx").exists()


def test_valid_file_still_reads(valid, tmp_path, capsys):
    path = tmp_path / "good.bitdown"
    path.write_bytes(valid)
    tensors, meta = serialize.read(path)
    assert main(["info", str(path)]) == 0
    assert "TinyNet" in capsys.readouterr().out
    write(tmp_path / "same.bitdown", *raw(path))            # rewriting unchanged content: still valid
    bitdown.load(tmp_path / "same.bitdown", TinyNet())


def small_linear_file(tmp_path, k, codes, bits=16, name="k.bitdown"):
    """A file of a Linear(12, 5) quantized with d = 4 (15 codes) and K centroids."""
    model = nn.Sequential(nn.Linear(12, 5))
    g = torch.Generator().manual_seed(0)
    quantize_module(model[0], torch.randn(k, 4, generator=g).half().float(), codes, bits)
    plans = [LayerPlan("0", "linear", (5, 12), 4, k, codebook_bits=bits)]
    meta = CompressionInfo({"name": "lin", "source": "user"}, {}, plans, {}).metadata(model)
    return bitdown.save(model, tmp_path / name, metadata=meta), model


def test_packed_codes_at_or_above_k_refused(tmp_path):
    """K = 12 packs to 4 bits, so a packed code can say 12..15: out of range."""
    codes = torch.arange(15).remainder(12).reshape(5, 3)
    path, model = small_linear_file(tmp_path, 12, codes)
    loaded = bitdown.load(path, nn.Sequential(nn.Linear(12, 5)))
    assert torch.equal(loaded[0].codes.long(), codes)
    tensors, meta = raw(path)
    assert tensors["0.codes"].shape == (8,)                   # 15 x 4 bits = 60 bits -> 8 bytes
    bad = codes.clone()
    bad[4, 2] = 13
    write(path, dict(tensors, **{"0.codes": serialize.pack_codes(bad, 4)}), meta)
    with pytest.raises(BitdownFileError, match=r"codes of '0' out of range for 12 centroids \(found 0\.\.13\)"):
        serialize.read(path)
    packed = tensors["0.codes"].clone()
    packed[-1] |= 0x80                                        # a padding bit set (codes use 60 of 64 bits)
    write(path, dict(tensors, **{"0.codes": packed}), meta)
    with pytest.raises(BitdownFileError, match=r"codes of '0': nonzero padding bits"):
        serialize.read(path)


def test_nan_codebook_scale_refused(tmp_path):
    path, _ = small_linear_file(tmp_path, 4, torch.zeros(5, 3, dtype=torch.long), bits=8)
    tensors, meta = raw(path)
    scale = tensors["0.codebook_scale"].clone()
    scale[1] = NAN
    write(path, dict(tensors, **{"0.codebook_scale": scale}), meta)
    with pytest.raises(BitdownFileError, match=r"tensor '0.codebook_scale' holds NaN"):
        bitdown.load(path, nn.Sequential(nn.Linear(12, 5)))


def test_save_refuses_what_load_would_refuse(tmp_path):
    _, model = small_linear_file(tmp_path, 4, torch.zeros(5, 3, dtype=torch.long))
    info = CompressionInfo({"name": "lin", "source": "user"}, {}, [LayerPlan("0", "linear", (5, 12), 4, 4)], {})
    with torch.no_grad():
        model[0].bias[0] = math.inf
    with pytest.raises(ValueError, match=r"refusing to save.*tensor '0.bias' holds NaN or infinite"):
        bitdown.save(model, tmp_path / "inf.bitdown", metadata=info.metadata(model))
    with torch.no_grad():
        model[0].bias[0] = 0.0
    for bad_meta, match in [(dict(info.metadata(model), arch="x"), "arch must be a JSON object"),
                            (dict(info.metadata(model), skipped=["a"]), "skipped must be a JSON object")]:
        with pytest.raises(ValueError, match=rf"refusing to save metadata.*{match}"):
            bitdown.save(model, tmp_path / "bad.bitdown", metadata=bad_meta)
    assert not (tmp_path / "inf.bitdown").exists() and not (tmp_path / "bad.bitdown").exists()


def test_non_object_metadata_refused(valid, tmp_path):
    path = tmp_path / "list.bitdown"
    (tmp_path / "good.bitdown").write_bytes(valid)
    tensors, _ = raw(tmp_path / "good.bitdown")
    save_file(tensors, str(path), metadata={"bitdown": json.dumps(["bitdown", 2])})
    with pytest.raises(BitdownFileError, match="does not describe a bitdown file"):
        serialize.read(path)
    save_file(tensors, str(path), metadata={"bitdown": "[" * 100_000})     # deeply nested: no RecursionError
    with pytest.raises(BitdownFileError, match="corrupt bitdown metadata"):
        serialize.read(path)


# ----------------------------------------------------------------------------- the version-3 container


def container(path, payload: bytes, version=3, extra: dict | None = None):
    """A version-`version` container holding `payload` (already compressed) as its one tensor."""
    tensors = {serialize.PAYLOAD: torch.frombuffer(bytearray(payload), dtype=torch.uint8), **(extra or {})}
    save_file(tensors, str(path), metadata={"bitdown": json.dumps({"format": "bitdown", "format_version": version})})
    return path


def deflated(index, data: bytes = b"", n: int | None = None) -> bytes:
    head = index if isinstance(index, bytes) else json.dumps(index).encode()
    return zlib.compress((len(head) if n is None else n).to_bytes(8, "little") + head + data)


def test_version_2_file_still_loads_and_resaves_as_version_3(valid, tmp_path):
    (tmp_path / "v3.bitdown").write_bytes(valid)
    tensors, meta = raw(tmp_path / "v3.bitdown")
    old = write(tmp_path / "v2.bitdown", tensors, dict(meta, format_version=2))   # the version-2 layout
    with safe_open(str(old), framework="pt") as f:
        assert serialize.PAYLOAD not in f.keys() and json.loads(f.metadata()["bitdown"])["format_version"] == 2
    loaded = bitdown.load(old, TinyNet())
    assert bitdown.save(loaded, tmp_path / "again.bitdown").read_bytes() == valid
    assert len(valid) < old.stat().st_size


@pytest.mark.parametrize("case", ["not_zlib", "two_tensors", "truncated_data", "trailing_data", "huge_index",
                                  "huge_tensor", "bad_dtype", "negative_shape", "duplicate_name", "index_not_object",
                                  "index_json_broken", "versions_disagree", "inner_not_bitdown"])
def test_hostile_container_refused(valid, tmp_path, case):
    (tmp_path / "good.bitdown").write_bytes(valid)
    tensors, meta = raw(tmp_path / "good.bitdown")
    entry = [["w", "F32", [2]]]
    four = torch.ones(2).numpy().tobytes()
    payload, extra, version = {
        "not_zlib": (b"\x00" * 64, None, 3),
        "two_tensors": (deflated({"tensors": entry, "meta": meta}, four), {"x": torch.zeros(1)}, 3),
        "truncated_data": (deflated({"tensors": entry, "meta": meta}, four[:5]), None, 3),
        "trailing_data": (deflated({"tensors": entry, "meta": meta}, four + b"\x00"), None, 3),
        "huge_index": (deflated(b"{}", n=1 << 40), None, 3),
        "huge_tensor": (deflated({"tensors": [["w", "F64", [1 << 20, 1 << 20]]], "meta": meta}), None, 3),
        "bad_dtype": (deflated({"tensors": [["w", "F128", [2]]], "meta": meta}, four), None, 3),
        "negative_shape": (deflated({"tensors": [["w", "F32", [-2]]], "meta": meta}, four), None, 3),
        "duplicate_name": (deflated({"tensors": entry * 2, "meta": meta}, four * 2), None, 3),
        "index_not_object": (deflated([entry, meta], four), None, 3),
        "index_json_broken": (deflated(b'{"tensors": [', four), None, 3),
        "versions_disagree": (deflated({"tensors": entry, "meta": dict(meta, format_version=2)}, four), None, 3),
        "inner_not_bitdown": (deflated({"tensors": entry, "meta": dict(meta, format="other")}, four), None, 3),
    }[case]
    match = {"not_zlib": "corrupt compressed payload", "two_tensors": "exactly one", "truncated_data": "ends inside",
             "trailing_data": "holds more than its index", "huge_index": "index of", "huge_tensor": "more than",
             "bad_dtype": "index entry 0", "negative_shape": "index entry 0", "duplicate_name": "listed twice",
             "index_not_object": "must be a JSON object", "index_json_broken": "corrupt bitdown metadata",
             "versions_disagree": "container says format version 3", "inner_not_bitdown": "does not describe"}[case]
    path = container(tmp_path / "bad.bitdown", payload, version, extra)
    with pytest.raises(BitdownFileError, match=match):
        serialize.read(path)
    with pytest.raises(BitdownFileError, match=match):
        bitdown.load(path, TinyNet())


def test_zip_bomb_is_inflated_only_as_far_as_the_index_declares(valid, tmp_path):
    (tmp_path / "good.bitdown").write_bytes(valid)
    _, meta = raw(tmp_path / "good.bitdown")
    bomb = deflated({"tensors": [["w", "U8", [8]]], "meta": meta}, b"\x00" * (256 << 20))   # 256 MiB of zeros
    assert len(bomb) < 400_000
    path = container(tmp_path / "bomb.bitdown", bomb)
    with pytest.raises(BitdownFileError, match="holds more than its index"):
        serialize.read(path)


def test_byte_planes_round_trip_every_dtype():
    g = torch.Generator().manual_seed(0)
    for dtype in serialize.DTYPES.values():
        for shape in ([3, 5], [], [0, 4], [7]):
            t = (torch.randn(shape, generator=g) * 100).to(dtype)
            planes = serialize._planes(t)
            assert len(planes) == t.numel() * t.element_size()
            back = serialize._from_planes(planes, dtype, shape)
            assert back.dtype == dtype and list(back.shape) == shape and torch.equal(back, t), (dtype, shape)
    x = torch.tensor([1.0, 2.0], dtype=torch.float16)           # planes: the low bytes, then the high bytes
    assert serialize._planes(x) == bytes([0x00, 0x00, 0x3C, 0x40])
