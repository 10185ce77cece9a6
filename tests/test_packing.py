"""Format version 2's (and 3's) size savings: codes bit-packed to ceil(log2 K) bits, BatchNorm statistics in fp16
(kept fp32 where fp16 would overflow or lose them), a compact JSON header; and what is on disk is
exactly what the accounting says."""

from __future__ import annotations

import json
import math
import zlib

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

import bitdown
from bitdown import serialize
from bitdown.compress import CompressionInfo
from bitdown.config import LayerPlan
from bitdown.modules import quantize_module
from bitdown.serialize import code_bits, pack_codes, unpack_codes

from test_serialize import TinyNet


def test_code_bits():
    assert [code_bits(k) for k in (1, 2, 3, 4, 5, 8, 12, 16, 255, 256, 257, 512, 1 << 15)] == \
        [1, 1, 2, 2, 3, 3, 4, 4, 8, 8, 9, 9, 15]


def test_pack_layout_is_lsb_first():
    # 2-bit codes 1, 2, 3 -> bits 1 0 | 0 1 | 1 1 -> 0b00111001
    assert pack_codes(torch.tensor([1, 2, 3]), 2).tolist() == [0b00111001]
    assert pack_codes(torch.tensor([5]), 3).tolist() == [5]
    assert pack_codes(torch.tensor([300, 1]), 9).tolist() == [300 & 0xFF, (300 >> 8) | (1 << 1), 0]


@pytest.mark.parametrize("bits", range(1, 16))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 13, 1000])
def test_pack_round_trip(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (n,), generator=g)
    if n:
        codes[0] = (1 << bits) - 1
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == ((n * bits + 7) // 8,)
    assert torch.equal(unpack_codes(packed, n, bits), codes)


def test_pack_a_whole_resnet_layer_quickly():
    """Vectorised: 2.4 M codes (a large ImageNet layer) pack and unpack at once."""
    codes = torch.randint(0, 1 << 11, (2_400_000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_codes(pack_codes(codes.reshape(2000, -1), 11), codes.numel(), 11), codes)


def test_pack_and_unpack_refuse_bad_input():
    with pytest.raises(ValueError, match="out of range for 3-bit"):
        pack_codes(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([-1]), 3)
    packed = pack_codes(torch.tensor([1, 2, 3]), 2)
    with pytest.raises(ValueError, match="not 4 2-bit codes packed into 1 bytes"):
        unpack_codes(packed.to(torch.int16), 4, 2)
    with pytest.raises(ValueError, match="not 5 2-bit codes packed into 2 bytes"):
        unpack_codes(packed, 5, 2)
    with pytest.raises(ValueError, match="nonzero padding bits"):
        unpack_codes(torch.tensor([0b01000000], dtype=torch.uint8), 3, 2)


# ----------------------------------------------------------------------------- files

KS = {"conv2": 2, "conv3": 12, "fc": 256}          # 1-, 4- and 8-bit codes


def random_q(ks=KS, seed=0):
    """TinyNet with conv2 / conv3 / fc quantized to random codebooks and codes, and its metadata."""
    torch.manual_seed(seed)
    model = TinyNet().eval()
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
    plans = []
    for name, d, kind in (("conv2", 9, "convkxk"), ("conv3", 4, "conv1x1"), ("fc", 4, "linear")):
        layer = getattr(model, name)
        shape = tuple(layer.weight.shape)
        n = layer.weight.numel() // d
        k = ks[name]
        quantize_module(layer, torch.randn(k, d, generator=g).half().float(),
                        torch.randint(0, k, (n,), generator=g))
        plans.append(LayerPlan(name, kind, shape, d, k))
    meta = CompressionInfo({"name": "TinyNet", "source": "user"}, {}, plans, {"conv1": "stem"}).metadata(model)
    return model, meta


def data_bytes(path):
    """The bytes of the tensors the file stores (before the version-3 container compresses them)."""
    return sum(t.numel() * t.element_size() for t in serialize.read_stored(path)[0].values())


def test_codes_take_log2_k_bits_on_disk(tmp_path):
    model, meta = random_q()
    path = bitdown.save(model, tmp_path / "m.bitdown", metadata=meta)
    stored = serialize.read_stored(path)[0]
    for name, k in KS.items():
        n = getattr(model, name).codes.numel()
        assert stored[f"{name}.codes"].numel() == math.ceil(n * code_bits(k) / 8), name
    # the data section is exactly: packed codes + fp16 codebooks + fp32 parameters + fp16 statistics
    # + the int64 batch counters
    rep = bitdown.size_report(model, [LayerPlan.from_json(p) for p in meta["layers"]])
    index = sum(math.ceil(getattr(model, n).codes.numel() * code_bits(k) / 8) for n, k in KS.items())
    cb = sum(layer.codebook_bytes for layer in rep.layers)
    stats = sum(2 * m.running_mean.numel() * 2 + 8 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert data_bytes(path) == index + cb + rep.other_bytes + stats
    loaded = bitdown.load(path, TinyNet())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for name in KS:
        assert torch.equal(getattr(loaded, name).codes, getattr(model, name).codes)


def test_file_is_close_to_the_paper_size(tmp_path):
    """Only the statistics and the (compressed) index and metadata are on top of the paper-style size."""
    model, meta = random_q()
    path = bitdown.save(model, tmp_path / "m.bitdown", metadata=meta)
    paper = meta["size"]["size_bytes"]
    assert data_bytes(path) < paper + 300
    assert path.stat().st_size < data_bytes(path) + 500      # 23 tensors listed + metadata: 2.5 KB in version 2


def test_bn_statistics_fp16_and_memory_equals_file(tmp_path):
    model, meta = random_q()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = bitdown.save(model, tmp_path / "m.bitdown", metadata=meta)
    stored = serialize.read_stored(path)[0]
    for bn in ("bn1", "bn2", "bn3"):
        for stat in ("running_mean", "running_var"):
            key = f"{bn}.{stat}"
            t = stored[key]
            assert t.dtype == torch.float16
            mem = model.state_dict()[key]
            assert mem.dtype == torch.float32 and torch.equal(mem, t.float())       # rounded in place
            assert not torch.equal(mem, before[key])                                 # (it did change)
            assert (mem - before[key]).abs().max() <= before[key].abs().max() * 2 ** -11
    loaded = bitdown.load(path, TinyNet())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
        assert loaded.state_dict()[k].dtype == v.dtype


@pytest.mark.parametrize("case", ["var_overflows_fp16", "mean_far_beyond_std", "tiny_var_tiny_eps"])
def test_bn_statistics_kept_fp32_when_fp16_would_lose_them(tmp_path, case):
    model, meta = random_q()
    with torch.no_grad():
        if case == "var_overflows_fp16":
            model.bn2.running_var[3] = 1e6                 # > 65504: inf in fp16
        elif case == "mean_far_beyond_std":
            model.bn2.running_mean[1] = 3000.0 + 1 / 3     # fp16 step at 3000 is 2: a 0.33-std error
            model.bn2.running_var[1] = 1.0
        else:
            model.bn2.eps = 1e-12
            model.bn2.running_var[0] = 3e-8                # fp16 subnormal: rounds to 2.98e-8 (0.3 % std)
            model.bn2.running_var[1] = 1e-9                # rounds to 0: sqrt(var + eps) changes 30x
    want = {k: v.clone() for k, v in model.state_dict().items()}
    path = bitdown.save(model, tmp_path / "m.bitdown", metadata=meta)
    dtypes = {k: t.dtype for k, t in serialize.read_stored(path)[0].items()}
    kept = {"var_overflows_fp16": ["bn2.running_var"],
            "mean_far_beyond_std": ["bn2.running_mean"],
            "tiny_var_tiny_eps": ["bn2.running_var", "bn2.running_mean"]}[case]
    for key in kept:
        assert dtypes[key] == torch.float32, key
        assert torch.equal(model.state_dict()[key], want[key])       # not rounded in memory either
    assert dtypes["bn1.running_var"] == dtypes["bn3.running_mean"] == torch.float16
    if case == "mean_far_beyond_std":
        assert dtypes["bn2.running_var"] == torch.float16
    loaded = bitdown.load(path, TinyNet() if case != "tiny_var_tiny_eps" else _eps(TinyNet(), 1e-12))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def _eps(model, eps):
    model.bn2.eps = eps
    return model


def test_header_is_compact_and_omits_default_layer_fields(tmp_path):
    model, meta = random_q()
    path = bitdown.save(model, tmp_path / "m.bitdown", metadata=meta)
    with safe_open(str(path), framework="pt") as f:
        data = zlib.decompress(f.get_tensor(serialize.PAYLOAD).numpy().tobytes())
    index = data[8:8 + int.from_bytes(data[:8], "little")].decode()
    stored = json.loads(index)["meta"]
    assert index.endswith(',"meta":' + json.dumps(stored, separators=(",", ":")) + "}")   # compact JSON
    assert all(set(d) == {"name", "kind", "weight_shape", "block_size", "n_centroids"} for d in stored["layers"])
    tensors, back = serialize.read(path)                      # every field still there after loading
    assert [LayerPlan.from_json(d) for d in back["layers"]] == [LayerPlan.from_json(d) for d in meta["layers"]]
    assert bitdown.load(path, TinyNet()).bitdown.plans == [LayerPlan.from_json(d) for d in meta["layers"]]
    # fields away from their default are kept
    full = {"name": "x", "kind": "linear", "weight_shape": [4, 8], "block_size": 4, "n_centroids": 4,
            "groups": 2, "codebook_bits": 8, "share": "g"}
    assert serialize._compact_layer(full) == full
