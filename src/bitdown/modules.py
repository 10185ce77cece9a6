"""Compressed layers: a conv / linear whose weight is decoded from a codebook and uint8/int16 codes.

`PQConv2d` and `PQLinear` are the original layer classes with their `weight` Parameter replaced by
a property that decodes `codebook[codes]` (one gather), so the original `forward` runs unchanged:
this keeps TF-"SAME" padding convs, timm's Conv2dSame or any other Conv2d/Linear subclass working.
A layer of a subclass `Foo(nn.Conv2d)` becomes an instance of a generated `PQFoo(PQConv2d, Foo)`.

    codebook  (K, d)        trainable fp32 Parameter (stored fp16 on disk, or int8 + a (d,) fp16 scale
                            with codebook_bits=8)
    codes     (C_out, nb)   uint8 buffer (int16 when K > 256)
    bias      unchanged

In eval mode the decoded weight is cached until the codebook or the codes change (their bytes are compared
with a snapshot at every access, so no write path can leave a stale weight).
"""
from __future__ import annotations

import ctypes
import sys

import torch
import torch.nn as nn

__all__ = ["PQMixin", "PQConv2d", "PQLinear", "quantize_module", "is_pq", "code_dtype", "round_codebooks_",
           "round_codebook", "encode_codebook", "decode_codebook", "CODEBOOK_BITS", "module_device"]

FP16_TINY = float(torch.finfo(torch.float16).tiny)   # smallest normal fp16 number
CODEBOOK_BITS = (16, 8)     # fp16 codebooks (the paper) | int8 codebooks with one fp16 scale per column


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (or buffer); the CPU when it has none."""
    return next((t.device for t in (*module.parameters(), *module.buffers())), torch.device("cpu"))


def code_dtype(n_centroids: int) -> torch.dtype:
    """The smallest whole-byte integer type holding codes 0..K-1 (int16 holds up to 2**15)."""
    if n_centroids <= 256:
        return torch.uint8
    if n_centroids <= 1 << 15:
        return torch.int16
    raise ValueError(f"n_centroids {n_centroids} needs more than 15-bit codes")


def _find_memcmp():
    """The C library's memcmp through ctypes (PyDLL: the GIL is kept, the call is a few hundred bytes'
    compare), called with ready-made c_void_p / c_size_t arguments: about 0.5 us, a fifth of a
    torch.equal call; None where there is no C library to load (torch.equal is used then)."""
    try:
        lib = ctypes.PyDLL("msvcrt" if sys.platform == "win32" else None)
        fn = lib.memcmp
    except (OSError, AttributeError, TypeError):  # pragma: no cover - no C library to call
        return None
    fn.restype = ctypes.c_int
    return fn


_MEMCMP = _find_memcmp()


def _no_cache() -> None:
    return None


class _WeightCache:
    """The decoded weight of a PQ layer in eval mode, valid while the codebook and the codes hold the same
    *values* at the same place: each is compared byte for byte with a snapshot taken when the weight was
    decoded (in-place writes, through `.data` and numpy views too, optimizer steps, load_state_dict: all
    seen), and its data pointer, dtype, shape and contiguity must be the snapshot's (`.data = ...`,
    `.to(dtype)`, a new Parameter or buffer, a view with other strides: decode again).

    It keeps aliases of both tensors' storages, so a storage freed after a `.data = ...` cannot be
    reused at the same address and pass for the old one. Copies and pickles of a layer drop it (the
    copy decodes its own weight on first use)."""

    __slots__ = ("weight", "aliases", "snapshots", "cb_ptr", "cb_dtype", "cb_shape", "codes_ptr", "codes_dtype",
                 "codes_shape", "fast", "cb_args", "codes_args", "hot_ptr")

    def __init__(self, codebook: torch.Tensor, codes: torch.Tensor, weight: torch.Tensor) -> None:
        self.weight = weight
        self.aliases = (codebook.detach(), codes.detach())
        self.snapshots = tuple(t.clone(memory_format=torch.contiguous_format) for t in self.aliases)
        self.cb_ptr, self.cb_dtype, self.cb_shape = codebook.data_ptr(), codebook.dtype, codebook.shape
        self.codes_ptr, self.codes_dtype, self.codes_shape = codes.data_ptr(), codes.dtype, codes.shape
        # bytes compared with memcmp for contiguous CPU tensors (else torch.equal); its arguments are made
        # once: they stay right while the data pointers are the cached ones
        self.fast = _MEMCMP is not None and all(t.is_cpu and t.is_contiguous() for t in self.aliases)
        self.cb_args, self.codes_args = (
            tuple((ctypes.c_void_p(t.data_ptr()), ctypes.c_void_p(v.data_ptr()), ctypes.c_size_t(v.nbytes))
                  for t, v in zip(self.aliases, self.snapshots)) if self.fast else ((), ()))
        # the weight property's hot path takes only a memcmp cache: None matches no data pointer
        self.hot_ptr = self.cb_ptr if self.fast else None

    def valid(self, codebook: torch.Tensor, codes: torch.Tensor) -> bool:
        """Whether the cached weight is still codebook[codes]."""
        if (codebook.data_ptr() != self.cb_ptr or codes.data_ptr() != self.codes_ptr
                or codebook.dtype is not self.cb_dtype or codes.dtype is not self.codes_dtype
                or codebook.shape != self.cb_shape or codes.shape != self.codes_shape
                or codebook.device != self.aliases[0].device or codes.device != self.aliases[1].device):
            return False
        if self.fast and codebook.is_contiguous() and codes.is_contiguous():
            return _MEMCMP(*self.cb_args) == 0 and _MEMCMP(*self.codes_args) == 0
        return (torch.equal(self.snapshots[0], codebook.detach())
                and torch.equal(self.snapshots[1], codes.detach()))

    def __reduce__(self):
        return _no_cache, ()

    def __deepcopy__(self, memo: dict) -> None:
        return None


class PQMixin:
    """Shared behaviour of product-quantized layers (mixed in before the layer class)."""

    codebook: nn.Parameter
    codes: torch.Tensor
    weight_shape: tuple[int, ...]

    @property
    def block_size(self) -> int:
        return self.codebook.shape[1]

    @property
    def n_centroids(self) -> int:
        return self.codebook.shape[0]

    @property
    def codebook_bits(self) -> int:
        return self.__dict__.get("_codebook_bits", 16)

    def dequantize(self) -> torch.Tensor:
        """The dense weight codebook[codes], reshaped to the layer's weight shape (differentiable)."""
        return self.codebook[self.codes.long()].reshape(self.weight_shape)  # (C_out, ...)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        # Hot path (eval, no grad, a CPU cache): `_WeightCache.valid` inlined (benchmarks/results/pq_speed.md
        # has its cost). The same data pointers as the cache's aliases (which keep those CPU storages alive)
        # mean the same memory, so memcmp's ready-made arguments are right; the byte comparisons are what
        # catch writes through `.data` or numpy views, which no version counter sees. Anything else
        # (another device, a change) goes to `_decoded_weight`.
        c = self.__dict__.get("_pq_cache")
        if c is not None and not self.training and not torch.is_grad_enabled():
            buffers = self._buffers
            codes, cb = buffers["codes"], self._parameters["codebook"]
            if (cb.data_ptr() == c.hot_ptr and codes.data_ptr() == c.codes_ptr and cb.dtype is c.cb_dtype
                    and codes.dtype is c.codes_dtype and cb.shape == c.cb_shape and codes.shape == c.codes_shape
                    and cb.is_contiguous() and codes.is_contiguous() and "export_codebook" not in buffers
                    and _MEMCMP(*c.cb_args) == 0 and _MEMCMP(*c.codes_args) == 0):
                return c.weight
        return self._decoded_weight()

    def _decoded_weight(self) -> torch.Tensor:
        stored = self._buffers.get("export_codebook")     # registered by export.py while tracing for ONNX
        if stored is not None:                            # the graph decodes the stored form: Cast (Mul) Gather
            codebook = decode_codebook(stored, self._buffers.get("export_scale"))
            return codebook[self.codes.long()].reshape(self.weight_shape)
        latent = self.__dict__.get("_ste_latent")        # reconstruct.py's code learning: straight-through
        if latent is not None and torch.is_grad_enabled():
            return self.dequantize() + (latent - latent.detach()).reshape(self.weight_shape)
        if self.training or torch.is_grad_enabled() and self.codebook.requires_grad:
            self.__dict__["_pq_cache"] = None
            return self.dequantize()
        cache = self.__dict__.get("_pq_cache")
        codebook, codes = self.codebook, self.codes
        if cache is None or not cache.valid(codebook, codes):
            with torch.no_grad():
                cache = _WeightCache(codebook, codes, self.dequantize())
            self.__dict__["_pq_cache"] = cache
        return cache.weight

    def extra_repr(self) -> str:  # type: ignore[override]
        return f"{super().extra_repr()}, n_centroids={self.n_centroids}, block_size={self.block_size}"

    def to_dense(self) -> nn.Module:
        """An equivalent plain layer of the original class with the decoded weight (hooks not copied)."""
        base = next(c for c in type(self).__mro__[1:] if not issubclass(c, PQMixin))
        dense = base.__new__(base)
        nn.Module.__init__(dense)
        skip = {"_pq_cache", "weight_shape", "_codebook_bits", "_parameters", "_buffers", "_modules"} | {
            k for k in self.__dict__ if k.endswith("hooks") or k.startswith("_forward") or k.startswith("_backward")}
        for k, v in self.__dict__.items():
            if k not in skip and k not in dense.__dict__:
                dense.__dict__[k] = v
        dense.__dict__["training"] = self.training
        dense.weight = nn.Parameter(self.dequantize().detach().clone())
        for k, v in self._parameters.items():
            if k != "codebook":
                dense.register_parameter(k, v)
        for k, v in self._buffers.items():
            if k != "codes":
                dense.register_buffer(k, v)
        return dense


class PQConv2d(PQMixin, nn.Conv2d):
    """A Conv2d whose weight is codebook[codes]."""


class PQLinear(PQMixin, nn.Linear):
    """A Linear whose weight is codebook[codes]."""


_CLASSES: dict[type, type] = {nn.Conv2d: PQConv2d, nn.Linear: PQLinear}


def _pq_class(cls: type) -> type:
    if cls not in _CLASSES:
        base = PQConv2d if issubclass(cls, nn.Conv2d) else PQLinear if issubclass(cls, nn.Linear) else None
        if base is None:
            raise TypeError(f"cannot product-quantize a {cls.__name__}: not a Conv2d or Linear")
        _CLASSES[cls] = type(f"PQ{cls.__name__}", (base, cls), {"__module__": __name__})
    return _CLASSES[cls]


def is_pq(module: nn.Module) -> bool:
    return isinstance(module, PQMixin)


def _check_bits(bits: int) -> None:
    if bits not in CODEBOOK_BITS:
        raise ValueError(f"codebook_bits must be one of {CODEBOOK_BITS}, got {bits!r}")


@torch.no_grad()
def encode_codebook(codebook: torch.Tensor, bits: int = 16) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The stored form of a (K, d) codebook: fp16 (bits=16, scale None), or int8 values in [-127, 127]
    with a (d,) fp16 scale per column (bits=8: codeword = int8 * scale, the column's max maps to 127)."""
    _check_bits(bits)
    if bits == 16:
        return codebook.detach().to(torch.float16), None
    cb = codebook.detach().float()                                          # (K, d)
    # at least fp16's smallest normal number: a subnormal scale would not round-trip (not idempotent)
    scale = (cb.abs().amax(dim=0) / 127).clamp_min(FP16_TINY).half()          # (d,)
    q = torch.round(cb / scale.float()).clamp_(-127, 127).to(torch.int8)     # (K, d)
    return q, scale


def decode_codebook(stored: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 (K, d) codebook from its stored form (encode_codebook's output)."""
    if scale is None:
        return stored.float()
    return stored.float() * scale.float()                                   # (K, d)


def round_codebook(codebook: torch.Tensor, bits: int = 16) -> torch.Tensor:
    """`codebook` rounded to what the file will hold (idempotent), in fp32."""
    return decode_codebook(*encode_codebook(codebook, bits))


@torch.no_grad()
def round_codebooks_(model: nn.Module) -> None:
    """Round every codebook to its stored precision in place (fp16, or int8 x fp16 scale), so the
    model equals what the file holds."""
    for m in model.modules():
        if is_pq(m):
            m.codebook.data = round_codebook(m.codebook.data, m.codebook_bits)


def quantize_module(module: nn.Module, codebook: torch.Tensor, codes: torch.Tensor,
                    codebook_bits: int = 16) -> nn.Module:
    """Turn `module` (Conv2d/Linear or a subclass) into its PQ version in place and return it.

    codebook: (K, d) float; codes: (C_out, nb) integers in [0, K); codebook_bits: how the file
    stores the codebook (16: fp16, 8: int8 + fp16 column scales; see round_codebook). Both are
    moved to the device of the layer's weight."""
    if is_pq(module):
        raise TypeError("module is already product-quantized")
    _check_bits(codebook_bits)
    pq_class = _pq_class(type(module))                       # raises before anything is changed
    weight = module.weight
    shape = tuple(weight.shape)
    k, d = codebook.shape
    row = weight[0].numel() if weight.dim() else 0
    if d < 1 or row % d:
        raise ValueError(f"block_size {d} does not divide the row length {row} of a weight of shape {list(shape)}")
    n_sub = weight.numel() // d
    if codes.numel() != n_sub:
        raise ValueError(f"codes of shape {list(codes.shape)} and block_size {d} do not fit a weight "
                         f"of shape {list(shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
        raise ValueError(f"codes out of range [0, {k})")
    del module._parameters["weight"]
    module.__class__ = pq_class
    module.weight_shape = shape
    module._codebook_bits = codebook_bits
    dev = weight.device
    module.codebook = nn.Parameter(codebook.detach().to(dev, torch.float32).clone())
    module.register_buffer("codes", codes.detach().reshape(shape[0], -1).to(dev, code_dtype(k)).clone())
    return module


def empty_pq_like(module: nn.Module, n_centroids: int, block_size: int, codebook_bits: int = 16) -> nn.Module:
    """Turn `module` into a PQ layer with zero codebook/codes of the given sizes (for loading a file)."""
    n_sub = module.weight.numel() // block_size
    return quantize_module(module, torch.zeros(n_centroids, block_size),
                           torch.zeros(module.weight.shape[0], n_sub // module.weight.shape[0], dtype=torch.long),
                           codebook_bits)
