"""The compact file: content, exact round trip, and a clear BitdownFileError for every kind of bad file."""

from __future__ import annotations

import copy
import json
import os
import struct
import zlib

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import bitdown
from bitdown import serialize
from bitdown.compress import CompressionInfo
from bitdown.config import LayerPlan
from bitdown.modules import is_pq, quantize_module
from bitdown.serialize import BitdownFileError


class TinyNet(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 16, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def make_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 3, 8, 8, generator=g) + 0.5 for _ in range(n // 32)]


@pytest.fixture(scope="module")
def compressed():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyNet()
    q = bitdown.compress(model, make_data(), bitdown.QuantConfig(em={"n_iter": 8}, bn_recalibrate=True),
                         progress=False)
    torch.set_num_threads(threads)
    return q


@pytest.fixture
def saved(compressed, tmp_path):
    return bitdown.save(compressed, tmp_path / "m.bitdown")


def header(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return raw, n, json.loads(raw[8:8 + n])


def rewrite(path, tensors, meta, fix_checksum=True):
    if fix_checksum:
        meta = dict(meta, checksum=serialize.checksum(tensors, meta))
    serialize.write_stored(path, tensors, meta)


def inflated(path) -> bytes:
    """A version-3 file's payload, inflated: index length, index JSON, tensor bytes."""
    return zlib.decompress(_payload(path))


def _payload(path) -> bytes:
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == [serialize.PAYLOAD]
        return f.get_tensor(serialize.PAYLOAD).numpy().tobytes()


def reflate(path, data: bytes) -> None:
    """Replace a version-3 file's payload by zlib(data), the outer container unchanged."""
    save_file({serialize.PAYLOAD: torch.frombuffer(bytearray(zlib.compress(data)), dtype=torch.uint8)}, str(path),
              metadata={"bitdown": json.dumps({"format": "bitdown", "format_version": 3})})


# ----------------------------------------------------------------------------- content and round trip


def test_file_content(compressed, saved):
    tensors, meta = serialize.read_stored(saved)
    keys = set(tensors)
    data = inflated(saved)
    n = int.from_bytes(data[:8], "little")
    text = json.dumps(json.loads(data[8:8 + n])["meta"], separators=(",", ":"))
    assert data[8:8 + n].decode().endswith(f',"meta":{text}}}')       # stored as compact JSON
    for name in ("conv2", "conv3", "fc"):
        layer = getattr(compressed, name)
        assert tensors[f"{name}.codebook"].dtype == torch.float16
        # bit-packed: ceil(log2 K) bits per code, one flat uint8 tensor
        bits = (layer.n_centroids - 1).bit_length()
        assert bits < 8
        assert tensors[f"{name}.codes"].dtype == torch.uint8
        assert tensors[f"{name}.codes"].shape == ((layer.codes.numel() * bits + 7) // 8,)
        assert torch.equal(serialize.unpack_codes(tensors[f"{name}.codes"], layer.codes.numel(), bits),
                           layer.codes.reshape(-1).long())
        assert f"{name}.weight" not in keys
    assert tensors["conv1.weight"].dtype == torch.float32           # the stem stays dense
    for bn in ("bn1", "bn2", "bn3"):
        assert {f"{bn}.running_mean", f"{bn}.running_var", f"{bn}.weight", f"{bn}.bias"} <= keys
        assert tensors[f"{bn}.running_mean"].dtype == tensors[f"{bn}.running_var"].dtype == torch.float16
        assert tensors[f"{bn}.weight"].dtype == torch.float32
    assert meta["format"] == "bitdown" and meta["format_version"] == serialize.FORMAT_VERSION == 3
    assert meta["layers"][0] == {"name": "conv2", "kind": "convkxk", "weight_shape": [16, 8, 3, 3],
                                 "block_size": 9, "n_centroids": 16}   # fields at their default omitted
    assert [p["name"] for p in meta["layers"]] == ["conv2", "conv3", "fc"]
    assert meta["arch"] == {"name": "TinyNet", "source": "user"}
    assert meta["size"]["size_mb"] == pytest.approx(bitdown.size_report(compressed, compressed.bitdown.plans).size_mb)
    assert meta["checksum"] == serialize.checksum(tensors, meta)
    assert meta["skipped"] == {"conv1": "stem conv (quantize_stem=False)"}
    # the file is small: codes of log2(K) bits, codebooks and statistics two bytes
    assert saved.stat().st_size < sum(p.numel() * 4 for p in TinyNet().parameters()) + 5_000


def test_loaded_model_equals_in_memory_model_exactly(compressed, saved):
    x = torch.randn(4, 3, 8, 8)
    loaded = bitdown.load(saved, TinyNet())
    assert not loaded.training
    assert all(is_pq(getattr(loaded, n)) for n in ("conv2", "conv3", "fc")) and not is_pq(loaded.conv1)
    with torch.no_grad():
        assert torch.equal(loaded(x), compressed(x))
    fresh = TinyNet()
    for bn in ("bn1", "bn2", "bn3"):       # running statistics (re-estimated by compress) preserved,
        for stat in ("running_mean", "running_var"):   # rounded to fp16 by save, in memory as in the file
            mine, back = getattr(getattr(compressed, bn), stat), getattr(getattr(loaded, bn), stat)
            assert back.dtype == torch.float32 and torch.equal(back, mine)
            assert torch.equal(back, back.half().float())
        assert not torch.equal(getattr(loaded, bn).running_mean, getattr(fresh, bn).running_mean)
    for k, v in compressed.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert [p.name for p in loaded.bitdown.plans] == ["conv2", "conv3", "fc"]


def test_resave_is_byte_identical(saved, tmp_path):
    loaded = bitdown.load(saved, TinyNet())
    again = bitdown.save(loaded, tmp_path / "again.bitdown")
    assert again.read_bytes() == saved.read_bytes()


def test_read_and_apply(saved):
    tensors, meta = serialize.read(saved)
    model = serialize.apply(TinyNet(), tensors, meta)
    assert is_pq(model.fc) and model.fc.codes.dtype == torch.uint8


def test_int16_codes_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(512, 4, generator=g).half().float()
    codes = torch.randint(0, 512, (64, 16), generator=g)
    codes[0, 0] = 511
    quantize_module(model[0], codebook, codes)
    plans = [LayerPlan("0", "linear", (64, 64), 4, 512)]
    meta = CompressionInfo({"name": "seq", "source": "user"}, {}, plans, {"2": "kept"}).metadata(model)
    path = bitdown.save(model, tmp_path / "k512.bitdown", metadata=meta)
    tensors, meta = serialize.read(path)
    assert tensors["0.codes"].dtype == torch.uint8 and tensors["0.codes"].shape == (64 * 16 * 9 // 8,)  # 9 bits
    assert tensors["0.codebook"].dtype == torch.float16
    assert serialize.decode(tensors, meta)["0.codes"].dtype == torch.int16
    target = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    loaded = bitdown.load(path, target)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded[0].codes.dtype == torch.int16 and torch.equal(loaded[0].codes.long(), codes)


# ----------------------------------------------------------------------------- saving


def test_save_needs_metadata_and_pq_layers(tmp_path):
    with pytest.raises(ValueError, match="no bitdown metadata"):
        bitdown.save(TinyNet(), tmp_path / "x.bitdown")
    with pytest.raises(ValueError, match="no product-quantized layer"):
        bitdown.save(TinyNet(), tmp_path / "x.bitdown", metadata={"layers": []})
    assert not (tmp_path / "x.bitdown").exists()


def test_atomic_save(compressed, saved, monkeypatch):
    import safetensors.torch

    before = saved.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        bitdown.save(compressed, saved)
    assert saved.read_bytes() == before                                   # old file untouched
    assert sorted(os.listdir(saved.parent)) == [saved.name]               # no temporary left behind


# ----------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    with pytest.raises(BitdownFileError, match="no such file"):
        bitdown.load(tmp_path / "nope.bitdown", TinyNet())


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_file(saved, keep):
    raw = saved.read_bytes()
    saved.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(BitdownFileError, match="truncated or corrupt"):
        bitdown.load(saved, TinyNet())


def test_tampered_tensor_byte(saved):
    data = inflated(saved)
    n = int.from_bytes(data[:8], "little")
    for pos in (8 + n + 5, len(data) - 3):       # the first and the last tensor bytes
        tampered = bytearray(data)
        tampered[pos] ^= 0x10
        reflate(saved, bytes(tampered))
        with pytest.raises(BitdownFileError, match="checksum mismatch"):
            bitdown.load(saved, TinyNet())


def test_tampered_compressed_byte(saved):
    raw = saved.read_bytes()
    for pos in (len(raw) // 2, len(raw) - 2):   # inside the deflate stream (the error depends on the bytes); its trailer
        data = bytearray(raw)
        data[pos] ^= 0x10
        saved.write_bytes(bytes(data))
        with pytest.raises(BitdownFileError, match="corrupt compressed payload|checksum mismatch|ends inside|"
                                                   "holds more than its index declares"):
            bitdown.load(saved, TinyNet())


def test_flipped_metadata_byte_breaking_the_json(saved):
    data = bytearray(inflated(saved))
    pos = data.index(b'"layers"') + len(b'"layers"')     # the ':' after the key "layers"
    assert data[pos:pos + 1] == b":"
    data[pos] = ord(";")
    reflate(saved, bytes(data))
    with pytest.raises(BitdownFileError, match="corrupt bitdown metadata"):
        bitdown.load(saved, TinyNet())


def test_flipped_header_byte_breaking_safetensors(saved):
    raw, n, hdr = header(saved)
    data = bytearray(raw)
    data[8] = ord("[")                                   # the header is no longer a JSON object
    saved.write_bytes(bytes(data))
    with pytest.raises(BitdownFileError, match="not a readable safetensors file"):
        bitdown.load(saved, TinyNet())


@pytest.mark.parametrize("key", ["size_mb", "rel_error", "calib_images", "layers"])
def test_flipped_metadata_byte(saved, key):
    raw = inflated(saved)
    n = int.from_bytes(raw[:8], "little")
    text = raw[8:8 + n].decode()
    start = text.index(key)
    if key == "layers":                                  # a letter of a key: "layers" -> "lbyers"
        pos = start + 1
        new = "b"
    else:                                                # a digit of a value
        pos = next(i for i in range(start, len(text)) if text[i].isdigit())
        new = "7" if text[pos] != "7" else "3"
    data = bytearray(raw)
    data[8 + pos] = ord(new)
    reflate(saved, bytes(data))
    with pytest.raises(BitdownFileError):
        bitdown.load(saved, TinyNet())


def test_non_bitdown_safetensors(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(path), metadata={"other": "1"})
    with pytest.raises(BitdownFileError, match="without bitdown metadata"):
        bitdown.load(path, TinyNet())


def test_metadata_not_describing_bitdown(saved):
    tensors, meta = serialize.read(saved)
    rewrite(saved, tensors, dict(meta, format="other"))
    with pytest.raises(BitdownFileError, match="does not describe a bitdown file"):
        bitdown.load(saved, TinyNet())


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.bitdown"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(BitdownFileError, match="not a readable safetensors file"):
        bitdown.load(path, TinyNet())


def test_newer_format_version(saved):
    tensors, meta = serialize.read(saved)
    rewrite(saved, tensors, dict(meta, format_version=serialize.FORMAT_VERSION + 1))
    with pytest.raises(BitdownFileError, match="newer"):
        bitdown.load(saved, TinyNet())


def version1(tensors, meta):
    """A version-1 file's tensors and metadata (whole-byte codes, fp32 statistics) from a version-2 file's."""
    return serialize.decode(tensors, meta), dict(meta, format_version=1)


def test_codes_out_of_range_in_file(saved):
    tensors, meta = version1(*serialize.read(saved))   # whole-byte codes can exceed K
    codes = tensors["conv3.codes"].clone()
    codes[0, 0] = 200                                   # conv3 has 8 centroids
    rewrite(saved, dict(tensors, **{"conv3.codes": codes}), meta)
    with pytest.raises(BitdownFileError, match="codes of 'conv3' out of range for 8 centroids"):
        bitdown.load(saved, TinyNet())


def test_version_1_file_loads(compressed, saved, tmp_path):
    tensors, meta = version1(*serialize.read(saved))
    assert tensors["conv2.codes"].dtype == torch.uint8 and tensors["conv2.codes"].shape == (16, 8)
    assert tensors["bn1.running_var"].dtype == torch.float32
    old = tmp_path / "v1.bitdown"
    rewrite(old, tensors, meta)
    assert serialize.read(old)[1]["format_version"] == 1
    loaded = bitdown.load(old, TinyNet())
    for k, v in compressed.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    again = bitdown.save(loaded, tmp_path / "again.bitdown")           # re-saved as version 3
    assert again.read_bytes() == saved.read_bytes()


@pytest.mark.parametrize("version", [0, -1, True, 1.0, "2", None])
def test_unknown_format_versions_refused(saved, version):
    tensors, meta = serialize.read(saved)
    rewrite(saved, tensors, dict(meta, format_version=version))
    with pytest.raises(BitdownFileError, match="format.version"):
        bitdown.load(saved, TinyNet())


class Other(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
        self.head = nn.Linear(8, 10)


@pytest.mark.parametrize("model, match", [
    (Other(), r"no layer 'conv2'.*TinyNet"),
    (TinyNet(width=12), r"'conv2' has weight shape \[12, 8, 3, 3\] in the model but \[16, 8, 3, 3\]"),
    (TinyNet(classes=5), r"'fc' has weight shape \[5, 16\]"),
], ids=["other_arch", "conv_shape", "fc_shape"])
def test_model_of_another_architecture(saved, model, match):
    with pytest.raises(BitdownFileError, match=match):
        bitdown.load(saved, model)


def test_model_with_other_non_quantized_tensors(saved):
    model = TinyNet()
    model.bn2 = nn.BatchNorm2d(16, affine=False)        # lacks bn2.weight / bn2.bias
    with pytest.raises(BitdownFileError, match=r"does not match the file.*unexpected \['bn2.bias', 'bn2.weight'\]"):
        bitdown.load(saved, model)


def test_already_quantized_target(saved):
    model = bitdown.load(saved, TinyNet())
    with pytest.raises(BitdownFileError, match="already quantized"):
        bitdown.load(saved, model)


def test_failed_load_leaves_model_untouched(saved):
    model = TinyNet(classes=5)                          # conv2, conv3 fit; fc does not
    with pytest.raises(BitdownFileError, match="'fc'"):
        bitdown.load(saved, model)
    assert not any(is_pq(m) for m in model.modules())
    model(torch.randn(1, 3, 8, 8))


def test_load_without_model_needs_zoo_arch(saved):
    with pytest.raises(BitdownFileError, match=r"'TinyNet' is not in the zoo"):
        bitdown.load(saved)


class AllKinds(nn.Module):
    """Every layer kind of the spec: 3x3, strided, 1x1, 5x5, grouped, depthwise, dilated, padded, linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.strided = nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.k5 = nn.Conv2d(32, 16, 5, padding=2)
        self.grouped = nn.Conv2d(16, 32, 3, groups=4, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, groups=32, padding=2, dilation=2)
        self.padded = nn.Conv2d(32, 16, 3, padding=2)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        x = torch.relu(self.bn(self.strided(torch.relu(self.stem(x)))))
        x = torch.relu(self.dw(self.grouped(self.k5(self.pw(x)))))
        return self.fc(self.padded(x).mean((2, 3)))


def test_round_trip_every_layer_kind(tmp_path):
    torch.manual_seed(0)
    model = AllKinds().eval()
    data = [torch.randn(16, 3, 8, 8) for _ in range(2)]
    q = bitdown.compress(model, data, bitdown.QuantConfig(em={"n_iter": 4}), progress=False)
    names = ["strided", "pw", "k5", "grouped", "dw", "padded", "fc"]
    assert [p.name for p in q.bitdown.plans] == names
    path = bitdown.save(q, tmp_path / "all.bitdown")
    torch.manual_seed(1)
    loaded = bitdown.load(path, AllKinds())
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
        # and each quantized layer computes its dense layer with the decoded weight
        for n in names:
            ref = getattr(model, n)
            dense = copy.deepcopy(ref)
            dense.weight.copy_(getattr(loaded, n).dequantize())
            linear = isinstance(ref, nn.Linear)
            inp = torch.randn(2, ref.in_features) if linear else torch.randn(2, ref.in_channels, 6, 6)
            torch.testing.assert_close(getattr(loaded, n)(inp), dense(inp))


def test_zoo_file_loads_without_model(tmp_path):
    from bitdown.zoo import build_model

    torch.manual_seed(0)
    model = build_model("resnet20_cifar10", weights=None)
    layer = model.layer3[2].conv2
    g = torch.Generator().manual_seed(0)
    quantize_module(layer, torch.randn(64, 9, generator=g).half().float(),
                    torch.randint(0, 64, (64, 64), generator=g))
    plans = [LayerPlan("layer3.2.conv2", "convkxk", (64, 64, 3, 3), 9, 64)]
    meta = CompressionInfo({"name": "resnet20_cifar10", "source": "zoo"}, {}, plans, {}).metadata(model)
    path = bitdown.save(model, tmp_path / "r20.bitdown", metadata=meta)
    loaded = bitdown.load(path)
    assert type(loaded).__name__ == "CifarResNet" and is_pq(loaded.layer3[2].conv2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_save_writes_through_symlinks_keeps_devices_and_uses_the_umask(tmp_path):
    """A symlinked target is written through (the link stays), a device or directory is refused, and a new
    file gets 0o666 minus the umask (mkstemp's temporary file would be 0o600)."""
    import os
    import stat

    import torch.nn as nn

    from bitdown.modules import quantize_module

    m = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False))
    quantize_module(m[0], torch.zeros(2, 3), torch.zeros(4, 1, dtype=torch.long))
    meta = {"arch": {"name": "x", "source": "user"}, "config": {}, "layers": [
        {"name": "0", "kind": "conv1x1", "weight_shape": [4, 3, 1, 1], "block_size": 3, "n_centroids": 2}],
        "skipped": {}, "em": {}, "extra": {}}
    real = tmp_path / "real.bitdown"
    link = tmp_path / "link.bitdown"
    bitdown.save(m, real, meta)
    link.symlink_to(real)
    bitdown.save(m, link, meta)
    assert link.is_symlink() and os.path.realpath(link) == str(real)
    old = os.umask(0o027)
    try:
        new = tmp_path / "new.bitdown"
        bitdown.save(m, new, meta)
        assert stat.S_IMODE(new.stat().st_mode) == 0o640
    finally:
        os.umask(old)
    for bad in (tmp_path, "/dev/null"):
        with pytest.raises(ValueError, match="not a regular file"):
            bitdown.save(m, bad, meta)
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
