"""Compressed layers PQConv2d / PQLinear: forward, decode, cache, gradients, to_dense, validation."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bitdown.modules import PQConv2d, PQLinear, code_dtype, is_pq, quantize_module


LAYERS = {
    "conv3x3": (lambda: nn.Conv2d(4, 6, 3), 9, (2, 4, 7, 7)),
    "conv1x1": (lambda: nn.Conv2d(8, 6, 1), 4, (2, 8, 5, 5)),
    "conv5x5": (lambda: nn.Conv2d(2, 4, 5, padding=2), 25, (2, 2, 6, 6)),
    "grouped": (lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), 9, (2, 4, 6, 6)),
    "depthwise": (lambda: nn.Conv2d(4, 4, 3, groups=4, padding=1, bias=False), 9, (2, 4, 6, 6)),
    "strided": (lambda: nn.Conv2d(3, 4, 3, stride=2), 9, (2, 3, 7, 7)),
    "dilated": (lambda: nn.Conv2d(3, 4, 3, dilation=2), 9, (2, 3, 7, 7)),
    "padded": (lambda: nn.Conv2d(3, 4, 3, padding=2), 27, (2, 3, 5, 5)),
    "linear": (lambda: nn.Linear(12, 5), 4, (3, 12)),
    "linear_3d": (lambda: nn.Linear(12, 5, bias=False), 6, (2, 3, 12)),
}


def random_pq(layer, d, k=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_sub = layer.weight.numel() // d
    codebook = torch.randn(k, d, generator=g)
    codes = torch.randint(0, k, (layer.weight.shape[0], n_sub // layer.weight.shape[0]), generator=g)
    return codebook, codes


def eval_pq_conv():
    """A PQ Conv2d(4, 6, 3) in eval mode (seeded), with its codebook and codes."""
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3)
    cb, codes = random_pq(layer, 9)
    quantize_module(layer, cb, codes).eval()
    return layer, cb, codes


def dense_forward(layer, weight, x):
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


@pytest.mark.parametrize("name", list(LAYERS))
def test_forward_equals_dense_layer_with_decoded_weight(name):
    torch.manual_seed(0)
    make, d, xshape = LAYERS[name]
    layer = make()
    shape = tuple(layer.weight.shape)
    cb, codes = random_pq(layer, d)
    decoded = cb[codes].reshape(shape)            # subvector = d consecutive entries of one filter
    x = torch.randn(*xshape)
    out = quantize_module(layer, cb, codes)
    assert out is layer and is_pq(layer)
    assert isinstance(layer, PQLinear if "linear" in name else PQConv2d)
    assert isinstance(layer, nn.Linear if "linear" in name else nn.Conv2d)
    assert "weight" not in dict(layer.named_parameters())
    assert layer.n_centroids == 8 and layer.block_size == d and layer.weight_shape == shape
    torch.testing.assert_close(layer.dequantize(), decoded)
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        torch.testing.assert_close(layer(x), dense_forward(layer, decoded, x))
        with torch.no_grad():
            torch.testing.assert_close(layer(x), dense_forward(layer, decoded, x))


def test_decode_layout_is_filter_major():
    layer = nn.Conv2d(2, 3, 2, bias=False)       # row = (C_in=2, 2, 2) = 8, d = 4 -> 2 blocks per filter
    cb = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4)
    codes = torch.tensor([[0, 1], [2, 3], [4, 5]])
    quantize_module(layer, cb, codes)
    w = layer.weight
    assert w[1, 0].reshape(-1).tolist() == cb[2].tolist()   # filter 1, input channel 0 = block 0
    assert w[1, 1].reshape(-1).tolist() == cb[3].tolist()
    assert w[2].reshape(-1).tolist() == cb[4].tolist() + cb[5].tolist()


def test_state_dict_holds_codebook_codes_bias():
    layer = nn.Conv2d(4, 6, 3)
    quantize_module(layer, *random_pq(layer, 9))
    sd = layer.state_dict()
    assert set(sd) == {"codebook", "codes", "bias"}
    assert sd["codes"].dtype == torch.uint8 and sd["codes"].shape == (6, 4)
    assert sd["codebook"].dtype == torch.float32 and isinstance(layer.codebook, nn.Parameter)


@pytest.mark.parametrize("k, dtype", [(2, torch.uint8), (256, torch.uint8), (512, torch.int16), (1 << 15, torch.int16)])
def test_code_dtype(k, dtype):
    assert code_dtype(k) == dtype


def test_code_dtype_too_many():
    with pytest.raises(ValueError):
        code_dtype((1 << 15) + 1)


def test_int16_codes_for_k_above_256():
    layer = nn.Linear(64, 64)
    cb, codes = random_pq(layer, 4, k=512)
    codes[0, 0] = 511
    quantize_module(layer, cb, codes)
    assert layer.codes.dtype == torch.int16
    torch.testing.assert_close(layer.weight, cb[codes].reshape(64, 64))


# ----------------------------------------------------------------------------- subclasses


class ScaledConv(nn.Conv2d):
    """A user subclass with its own forward."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_subclass_keeps_its_forward():
    torch.manual_seed(0)
    layer = ScaledConv(3, 4, 3, padding=1)
    cb, codes = random_pq(layer, 9)
    quantize_module(layer, cb, codes)
    assert isinstance(layer, ScaledConv) and isinstance(layer, PQConv2d)
    assert type(layer).__name__ == "PQScaledConv"
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(layer(x), 2 * dense_forward(layer, cb[codes].reshape(4, 3, 3, 3), x))
    other = ScaledConv(3, 4, 3)
    quantize_module(other, *random_pq(other, 9))
    assert type(other) is type(layer)              # the generated class is reused


def test_to_dense_of_subclass():
    layer = ScaledConv(3, 4, 3, padding=1)
    cb, codes = random_pq(layer, 9)
    quantize_module(layer, cb, codes)
    dense = layer.to_dense()
    assert type(dense) is ScaledConv


# ----------------------------------------------------------------------------- cache, gradients


def test_eval_cache_is_reused_and_invalidated_on_codebook_change():
    layer, cb, codes = eval_pq_conv()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        w1 = layer.weight
        assert layer.weight is w1                                  # cached in eval / no_grad
        y1 = layer(x)
        layer.codebook.mul_(2.0)                                   # in-place change
        torch.testing.assert_close(layer(x) - layer.bias[:, None, None], 2 * (y1 - layer.bias[:, None, None]))
        layer.codebook.data = torch.zeros_like(layer.codebook)     # replaced storage
        torch.testing.assert_close(layer(x), layer.bias[:, None, None].expand_as(y1))
        layer.load_state_dict({"codebook": cb, "codes": codes.to(torch.uint8), "bias": layer.bias.clone()})
        torch.testing.assert_close(layer(x), y1)
        layer.codes[0, 0] = (int(layer.codes[0, 0]) + 1) % 8      # codes change too
        torch.testing.assert_close(layer.weight, cb[layer.codes.long()].reshape(6, 4, 3, 3))


def test_eval_cache_invalidated_by_optimizer_step():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    quantize_module(layer, *random_pq(layer, 4)).eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = layer(x)
    opt = torch.optim.SGD([layer.codebook], lr=0.5)
    layer(x).pow(2).sum().backward()
    opt.step()
    with torch.no_grad():
        after = layer(x)
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, F.linear(x, layer.dequantize(), layer.bias))


def test_eval_cache_invalidated_by_data_write():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    cb, codes = random_pq(layer, 4)
    quantize_module(layer, cb, codes).eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        layer(x)
        new = torch.randn_like(cb)
        layer.codebook.data.copy_(new)
        torch.testing.assert_close(layer(x), F.linear(x, new[codes].reshape(4, 8), layer.bias))


def test_eval_cache_sees_every_write_to_the_codes_and_the_codebook():
    """In-place writes that no version counter sees (through `.data`, numpy views, for the codes as for the
    codebook), load_state_dict, an optimizer step and to(dtype): the weight always follows."""
    layer, cb, codes = eval_pq_conv()

    def expect():
        return layer.codebook.detach()[layer.codes.long()].reshape(6, 4, 3, 3)

    with torch.no_grad():
        layer.weight
        layer.codes.data[0, 0] = (int(layer.codes[0, 0]) + 1) % 8
        torch.testing.assert_close(layer.weight, expect())
        layer.codes.numpy()[1, 2] = (int(layer.codes[1, 2]) + 3) % 8
        torch.testing.assert_close(layer.weight, expect())
        layer.codebook.detach().numpy()[2, 1] += 1.0
        torch.testing.assert_close(layer.weight, expect())
        layer.codebook.data[3].zero_()
        torch.testing.assert_close(layer.weight, expect())
        layer.load_state_dict({"codebook": cb, "codes": codes.to(torch.uint8), "bias": layer.bias.clone()})
        torch.testing.assert_close(layer.weight, cb[codes].reshape(6, 4, 3, 3))
    opt = torch.optim.Adam([layer.codebook], lr=0.1)
    layer(torch.randn(2, 4, 5, 5)).sum().backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(layer.weight, expect())
        assert not torch.equal(layer.weight, cb[codes].reshape(6, 4, 3, 3))
        layer.to(torch.float64)
        assert layer.weight.dtype == torch.float64
        torch.testing.assert_close(layer.weight, expect())
    with torch.inference_mode():
        layer.codes.data[0, 1] = (int(layer.codes[0, 1]) + 1) % 8
        torch.testing.assert_close(layer.weight, expect())


def test_dtype_change_invalidates_cache():
    layer = nn.Linear(8, 4)
    quantize_module(layer, *random_pq(layer, 4)).eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        layer(x)
        layer.double()
        assert layer.weight.dtype == torch.float64
        assert layer(x.double()).dtype == torch.float64


def _decodes(layer, monkeypatch):
    """Count the layer's decodes (calls of dequantize)."""
    calls = []
    real = type(layer).dequantize
    monkeypatch.setattr(type(layer), "dequantize", lambda self: calls.append(1) or real(self))
    return calls


def test_eval_cache_hot_path_decodes_once(monkeypatch):
    layer, cb, codes = eval_pq_conv()
    calls = _decodes(layer, monkeypatch)
    with torch.no_grad():
        w = layer.weight
        assert all(layer.weight is w for _ in range(10)) and len(calls) == 1
        layer.codebook.data.mul_(3.0)             # same storage and version: only the bytes tell
        torch.testing.assert_close(layer.weight, 3 * cb[codes].reshape(6, 4, 3, 3))
        assert len(calls) == 2
    with torch.inference_mode():
        torch.testing.assert_close(layer.weight, 3 * cb[codes].reshape(6, 4, 3, 3))
    layer.train()
    with torch.no_grad():
        assert layer.weight is not layer.weight       # training mode: no cache


def test_eval_cache_storage_replacements_never_stale():
    """`.data = ...` many times (freed storages can come back at the same address), codes replaced
    through `.data` and as a new buffer, a non-contiguous codebook: the weight always follows."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    cb, codes = random_pq(layer, 4)
    quantize_module(layer, cb, codes).eval()
    with torch.no_grad():
        for i in range(20):
            new = torch.randn_like(cb)
            layer.codebook.data = new
            torch.testing.assert_close(layer.weight, new[codes].reshape(4, 8))
        new_codes = (codes + 1) % 8
        layer.codes.data = new_codes.to(torch.uint8)
        torch.testing.assert_close(layer.weight, new[new_codes].reshape(4, 8))
        layer.codes = codes.to(torch.uint8)
        torch.testing.assert_close(layer.weight, new[codes].reshape(4, 8))
        strided = torch.randn(4, 8).t()           # (8, 4), not contiguous
        layer.codebook.data = strided
        assert not layer.codebook.is_contiguous()
        torch.testing.assert_close(layer.weight, strided[codes].reshape(4, 8))
        want = 2 * strided[codes].reshape(4, 8)
        layer.codebook.data.mul_(2.0)             # (strided shares the storage)
        torch.testing.assert_close(layer.weight, want)
        flat = torch.randn(32)                    # the same pointer, shape and dtype, other strides
        layer.codebook.data = flat.view(8, 4)
        torch.testing.assert_close(layer.weight, flat.view(8, 4)[codes].reshape(4, 8))
        layer.codebook.data = flat.as_strided((8, 4), (1, 8))
        torch.testing.assert_close(layer.weight, flat.as_strided((8, 4), (1, 8))[codes].reshape(4, 8))


def test_eval_cache_shared_codebook():
    torch.manual_seed(0)
    a, b = nn.Linear(8, 4), nn.Linear(8, 4)
    cb, codes = random_pq(a, 4)
    quantize_module(a, cb, codes).eval()
    quantize_module(b, cb, codes).eval()
    b.codebook = a.codebook                        # one Parameter for both layers
    with torch.no_grad():
        a.weight, b.weight
        a.codebook.data.add_(1.0)
        for layer in (a, b):
            torch.testing.assert_close(layer.weight, (cb + 1)[codes].reshape(4, 8))


def test_copies_and_pickles_drop_the_cache():
    layer, cb, codes = eval_pq_conv()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        y = layer(x)
        assert layer.__dict__["_pq_cache"] is not None
        buf = io.BytesIO()
        torch.save(layer, buf)
        buf.seek(0)
        for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)),
                      torch.load(buf, weights_only=False)):
            assert clone.__dict__["_pq_cache"] is None
            torch.testing.assert_close(clone(x), y)
            clone.codebook.data.zero_()
            torch.testing.assert_close(clone(x), layer.bias[:, None, None].expand_as(y))
        torch.testing.assert_close(layer(x), y)


def test_gradients_reach_the_codebook():
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3, padding=1)
    cb, codes = random_pq(layer, 9)
    ref = nn.Conv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        ref.weight.copy_(cb[codes].reshape(6, 4, 3, 3))
        ref.bias.copy_(layer.bias)
    quantize_module(layer, cb, codes)
    x = torch.randn(2, 4, 5, 5)
    for mode in ("train", "eval"):           # eval mode too: the cache must not cut the graph
        getattr(layer, mode)()
        layer.zero_grad()
        ref.zero_grad()
        layer(x).pow(2).sum().backward()
        ref(x).pow(2).sum().backward()
        expected = torch.zeros_like(cb).index_add_(0, codes.reshape(-1), ref.weight.grad.reshape(-1, 9))
        assert layer.codebook.grad is not None
        torch.testing.assert_close(layer.codebook.grad, expected)
        torch.testing.assert_close(layer.bias.grad, ref.bias.grad)


def test_codes_are_not_trainable():
    layer = nn.Linear(8, 4)
    quantize_module(layer, *random_pq(layer, 4))
    assert sorted(n for n, _ in layer.named_parameters()) == ["bias", "codebook"]
    assert "codes" in dict(layer.named_buffers())


# ----------------------------------------------------------------------------- to_dense, copies


@pytest.mark.parametrize("name", ["conv3x3", "grouped", "linear"])
def test_to_dense(name):
    torch.manual_seed(0)
    make, d, xshape = LAYERS[name]
    layer = make()
    cb, codes = random_pq(layer, d)
    quantize_module(layer, cb, codes)
    x = torch.randn(*xshape)
    dense = layer.to_dense()
    assert type(dense) is (nn.Linear if "linear" in name else nn.Conv2d) and not is_pq(dense)
    assert isinstance(dense.weight, nn.Parameter)
    assert list(dense.state_dict()) == list(make().state_dict())
    torch.testing.assert_close(dense(x), layer(x))
    calls = []
    dense.register_forward_hook(lambda *a: calls.append(1))
    layer(x)
    assert not calls                           # the dense copy does not share hooks with the PQ layer


def test_deepcopy_of_quantized_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 2))
    quantize_module(m[0], *random_pq(m[0], 9))
    quantize_module(m[3], *random_pq(m[3], 4))
    m.eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        y = m(x)
        c = copy.deepcopy(m)
        torch.testing.assert_close(c(x), y)
        c[0].codebook.mul_(0)
        torch.testing.assert_close(m(x), y)    # independent codebooks


# ----------------------------------------------------------------------------- validation


def test_already_quantized_rejected():
    layer = nn.Linear(8, 4)
    cb, codes = random_pq(layer, 4)
    quantize_module(layer, cb, codes)
    with pytest.raises(TypeError, match="already"):
        quantize_module(layer, cb, codes)


def test_codes_out_of_range_rejected():
    layer = nn.Linear(8, 4)
    cb, codes = random_pq(layer, 4)
    codes[1, 1] = 8
    with pytest.raises(ValueError, match="out of range"):
        quantize_module(layer, cb, codes)
    codes[1, 1] = -1
    with pytest.raises(ValueError, match="out of range"):
        quantize_module(layer, cb, codes)
    assert not is_pq(layer) and isinstance(layer.weight, nn.Parameter)   # untouched on error


def test_codes_of_wrong_count_rejected():
    layer = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="do not fit"):
        quantize_module(layer, torch.randn(4, 4), torch.zeros(4, 3, dtype=torch.long))
    assert not is_pq(layer)


def test_block_size_not_dividing_row_rejected():
    layer = nn.Linear(6, 4)                       # 24 weights divisible by 4, but rows of 6 are not
    with pytest.raises(ValueError, match="does not divide the row length 6"):
        quantize_module(layer, torch.randn(4, 4), torch.zeros(6, dtype=torch.long))


def test_rejected_module_left_intact():
    bn = nn.BatchNorm2d(4)
    with pytest.raises(TypeError, match="not a Conv2d or Linear"):
        quantize_module(bn, torch.randn(2, 2), torch.zeros(2, 1, dtype=torch.long))
    assert isinstance(bn.weight, nn.Parameter) and bn(torch.randn(2, 4, 3, 3)).shape == (2, 4, 3, 3)
