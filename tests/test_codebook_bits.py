"""int8 codebooks with fp16 column scales (codebook_bits=8): rounding, size accounting, the file,
the compression pipeline and the allocator."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import bitdown
from bitdown import serialize
from bitdown.allocate import layer_options
from bitdown.config import LayerPlan, QuantConfig, resolve_plan
from bitdown.modules import decode_codebook, encode_codebook, quantize_module, round_codebook
from bitdown.serialize import BitdownFileError
from bitdown.size import layer_size, size_report

from test_serialize import TinyNet, make_data


def test_encode_int8_range_scale_and_error():
    g = torch.Generator().manual_seed(0)
    cb = torch.randn(256, 9, generator=g) * torch.logspace(-3, 1, 9)       # columns of very different range
    q, scale = encode_codebook(cb, 8)
    assert q.dtype == torch.int8 and q.shape == (256, 9)
    assert scale.dtype == torch.float16 and scale.shape == (9,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    err = (decode_codebook(q, scale) - cb).abs()
    assert (err <= scale.float() * 0.5 + 1e-3 * scale.float()).all()      # half a step per column
    assert (err.amax(0) / cb.abs().amax(0)).max() < 0.01                   # relative to each column's range


def test_round_codebook_is_idempotent_and_fp16_unchanged():
    cb = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    r8 = round_codebook(cb, 8)
    assert torch.equal(round_codebook(r8, 8), r8)
    assert torch.equal(round_codebook(cb, 16), cb.half().float())
    zero = torch.zeros(8, 4)
    assert torch.equal(round_codebook(zero, 8), zero)
    with pytest.raises(ValueError, match="codebook_bits"):
        round_codebook(cb, 4)


def test_size_accounting_int8():
    p16 = LayerPlan("a", "convkxk", (16, 16, 3, 3), 9, 32)
    p8 = LayerPlan("a", "convkxk", (16, 16, 3, 3), 9, 32, codebook_bits=8)
    assert layer_size(p16).codebook_bytes == 32 * 9 * 2
    assert layer_size(p8).codebook_bytes == 32 * 9 + 2 * 9
    assert layer_size(p8).index_bytes == layer_size(p16).index_bytes == 256 * 5 / 8
    opts = {(o.block_size, o.n_centroids): o.bytes for o in layer_options(p8, 9)}
    assert opts[(9, 32)] == 256 * 5 / 8 + 32 * 9 + 18


def test_config_validates_bits():
    with pytest.raises(ValueError, match="codebook_bits"):
        QuantConfig(codebook_bits=4)
    with pytest.raises(ValueError, match="codebook_bits"):
        QuantConfig(name_overrides={"fc": {"codebook_bits": 32}})
    plans, _ = resolve_plan(TinyNet(), QuantConfig(codebook_bits=8, name_overrides={"fc": {"codebook_bits": 16}}))
    assert {p.name: p.codebook_bits for p in plans} == {"conv2": 8, "conv3": 8, "fc": 16}


@pytest.fixture(scope="module")
def compressed8():
    torch.manual_seed(0)
    return bitdown.compress(TinyNet(), make_data(), QuantConfig(codebook_bits=8, em={"n_iter": 8}), progress=False)


def test_compress_int8_file_round_trip(compressed8, tmp_path):
    q = compressed8
    for p in q.bitdown.plans:
        m = q.get_submodule(p.name)
        assert m.codebook_bits == 8
        assert torch.equal(m.codebook, round_codebook(m.codebook, 8))      # memory == file
    path = bitdown.save(q, tmp_path / "m8.bitdown")
    tensors, meta = serialize.read(path)
    assert tensors["conv2.codebook"].dtype == torch.int8 and tensors["conv2.codebook_scale"].dtype == torch.float16
    back = bitdown.load(path, TinyNet())
    x = make_data(32, seed=3)[0]
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    assert back.conv2.codebook_bits == 8
    # smaller on disk and by the accounting than the same model with fp16 codebooks
    q16 = bitdown.compress(TinyNet(), make_data(), QuantConfig(em={"n_iter": 8}), progress=False)
    p16 = bitdown.save(q16, tmp_path / "m16.bitdown")
    nbytes = lambda f: sum(t.numel() * t.element_size() for t in serialize.read(f)[0].values())  # noqa: E731
    cb_bytes = sum(p.n_centroids * p.block_size for p in q.bitdown.plans)
    assert nbytes(path) == nbytes(p16) - cb_bytes + sum(2 * p.block_size for p in q.bitdown.plans)
    assert size_report(q, q.bitdown.plans).size_bytes < size_report(q16, q16.bitdown.plans).size_bytes


def test_int8_file_with_wrong_codebook_dtype_refused(compressed8, tmp_path):
    path = bitdown.save(compressed8, tmp_path / "m8.bitdown")
    tensors, meta = serialize.read(path)
    tensors["conv2.codebook"] = tensors["conv2.codebook"].half()          # says int8, holds fp16
    del tensors["conv2.codebook_scale"]
    meta["checksum"] = serialize.checksum(tensors, meta)
    serialize.write_stored(tmp_path / "bad.bitdown", tensors, meta)
    with pytest.raises(BitdownFileError, match="not stored as the metadata says"):
        bitdown.load(tmp_path / "bad.bitdown", TinyNet())


def test_quantize_module_rejects_bad_bits():
    layer = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="codebook_bits"):
        quantize_module(layer, torch.randn(4, 4), torch.zeros(4, 2, dtype=torch.long), codebook_bits=12)
    assert isinstance(layer.weight, nn.Parameter)                           # untouched


def test_em_config_rejects_bad_target_damp():
    from bitdown.config import EMConfig
    with pytest.raises(ValueError, match="target_damp"):
        EMConfig(target_damp=0.0)


def test_int8_rounding_idempotent_for_tiny_codewords():
    """Column maxima below 127 x fp16's smallest normal number: the scale is clamped to a normal fp16
    value, so rounding twice gives the same codebook (memory == file)."""
    g = torch.Generator().manual_seed(2)
    for scale in (1e-2, 1e-3, 1e-4, 1e-6):
        cb = torch.randn(256, 9, generator=g) * scale
        r = round_codebook(cb, 8)
        assert torch.equal(round_codebook(r, 8), r), scale
        assert (r - cb).abs().max() <= max(scale * 0.05, 1e-4)
