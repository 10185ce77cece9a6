"""Per-output-channel scalar quantization (int8 / int4 / int3 / int2), and layers kept in fp16.

Next to product quantization, a layer may get one b-bit code per weight (LayerPlan.scalar_bits = b):

    w_hat[o, r] = s_o * (q[o, r] - z_o),     q in [0, 2**b),  z_o in [0, 2**b)  (integers),  s_o fp16

asymmetric ("uniform affine", as GPTQ, AdaRound and BRECQ report their per-channel baselines): the
grid of channel o spans [s_o * -z_o, s_o * (2**b - 1 - z_o)], which covers 0 exactly. Stored: the codes
bit-packed to b bits, the fp16 scales, the zero points packed to b bits (size.py counts b bits per
weight plus 16 + b bits per channel).

The grid of a channel is chosen before the codes: its range [p * min(w_o, 0), p * max(w_o, 0)] with the
clip factor p in CLIP_GRID minimising the diag(H)-weighted rounding error of that channel (all channels at
once). The codes are then chosen with GPTQ error feedback (Frantar et al. 2022) on the layer's full input
Gram H = X^T X (damped), the objective the PQ EM minimises (em.py):

    ||X (W - W_hat)^T||^2 = sum_o (w_o - w_hat_o)^T H (w_o - w_hat_o),

column after column (in decreasing order of diag H with `act_order`), each column's rounding error pushed
onto the columns not yet quantized through the upper Cholesky factor U of H^-1 (H^-1 = U^T U), in lazy
blocks of BLOCK columns; every output channel (and every group of a grouped conv) at once.

Layers: `ScalarConv2d` / `ScalarLinear` (and generated `ScalarFoo` for a subclass `Foo`), the original
class with its `weight` Parameter replaced by a property decoding scale * (codes - zero), so the original
forward runs unchanged (as modules.py's PQ layers); cached in eval mode.

    scale  (C_out,)      trainable fp32 Parameter holding fp16 values (stored fp16)
    codes  (C_out, R)    uint8 buffer
    zero   (C_out,)      uint8 buffer

A layer kept in fp16 (LayerPlan.fp16) keeps its `weight` Parameter, rounded to fp16 values; its class
becomes `Fp16Conv2d` / `Fp16Linear` (`is_fp16`), so the file, the exporter and `round_scalars_` know it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import SCALAR_BITS, LayerPlan
from .em import _damped, exact_objective
from .modules import FP16_TINY, empty_pq_like

__all__ = ["SCALAR_BITS", "ScalarResult", "HalfResult", "quantize_scalar", "quantize_fp16", "ScalarMixin",
           "ScalarConv2d", "ScalarLinear", "HalfMixin", "Fp16Conv2d", "Fp16Linear", "quantize_module_scalar",
           "quantize_module_fp16", "empty_scalar_like", "empty_like_plan", "is_scalar", "is_fp16", "is_quantized",
           "round_scalars_", "round_scale"]

CLIP_GRID = tuple(1 - 0.025 * i for i in range(29))   # clip factors tried per channel: 1.0 ... 0.3
BLOCK = 128                                          # GPTQ lazy-update block (columns)


def _check_bits(bits: int) -> None:
    if bits not in SCALAR_BITS or isinstance(bits, bool):
        raise ValueError(f"scalar bits must be one of {SCALAR_BITS}, got {bits!r}")


def round_scale(scale: torch.Tensor) -> torch.Tensor:
    """Scales as the file holds them: fp16 values (at least fp16's smallest normal number), in fp32."""
    s = scale.detach().float()
    return s.sign().where(s != 0, torch.ones_like(s)) * s.abs().clamp_min(FP16_TINY).half().float()


# ----------------------------------------------------------------------------- quantizer


@dataclass
class ScalarResult:
    codes: torch.Tensor     # (C_out, R) uint8 in [0, 2**bits)
    scale: torch.Tensor     # (C_out,) fp16
    zero: torch.Tensor      # (C_out,) uint8 in [0, 2**bits)
    bits: int
    objective: float        # output error sum_o (w_o - w_hat_o)^T H (w_o - w_hat_o) (H = I without a Gram)
    rel_error: float        # sqrt(objective / energy), energy = sum_o w_o^T H w_o (as EMResult.rel_error)
    exact: bool             # whether the objective is the full-Gram one
    n_iter: int = 0         # (EMResult's fields, so compress records both alike)

    def weight(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The decoded fp32 weight."""
        s = self.scale.float()
        return (s[:, None] * (self.codes.float() - self.zero.float()[:, None])).reshape(shape)


@dataclass
class HalfResult:
    weight16: torch.Tensor  # the weight in fp16
    objective: float
    rel_error: float
    exact: bool
    n_iter: int = 0


def _rows(weight: torch.Tensor, g: int) -> torch.Tensor:
    """(C_out, ...) -> (g, C_out/g, R) float64."""
    if weight.shape[0] % g:
        raise ValueError(f"a weight of {weight.shape[0]} output channels cannot form {g} groups")
    return weight.detach().cpu().reshape(g, weight.shape[0] // g, -1).double()


def _error(weight: torch.Tensor, w_hat: torch.Tensor, full_gram: torch.Tensor | None) -> tuple[float, float, bool]:
    """(objective, relative error, exact) of w_hat against weight."""
    if full_gram is not None:
        err, energy = exact_objective(weight.cpu(), w_hat.cpu(), full_gram)
    else:
        err = float((weight.detach().cpu().double() - w_hat.cpu().double()).pow(2).sum())
        energy = float(weight.detach().cpu().double().pow(2).sum())
    return err, math.sqrt(err / energy) if energy > 0 else 0.0, full_gram is not None


def _grid(w: torch.Tensor, hdiag: torch.Tensor, bits: int, clip_search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, zero) of w (g, opg, R): fp16-valued scales (float64) and integer zeros (float64),
    the clip factor of CLIP_GRID minimising each channel's sum_r H_rr (w_r - w_hat_r)^2."""
    qmax = (1 << bits) - 1
    lo, hi = w.amin(-1).clamp_max(0), w.amax(-1).clamp_min(0)            # (g, opg) each, 0 inside the range
    best_err = best_s = best_z = None
    for p in CLIP_GRID if clip_search else (1.0,):
        s = round_scale((hi - lo) * p / qmax).double()                   # (g, opg)
        z = torch.round(-lo * p / s).clamp_(0, qmax)                     # (g, opg)
        q = torch.round(w / s[..., None] + z[..., None]).clamp_(0, qmax)  # (g, opg, R)
        err = ((w - s[..., None] * (q - z[..., None])).pow(2) * hdiag[:, None, :]).sum(-1)   # (g, opg)
        if best_err is None:
            best_err, best_s, best_z = err, s, z
        else:
            better = err < best_err
            best_err, best_s, best_z = (torch.where(better, err, best_err), torch.where(better, s, best_s),
                                        torch.where(better, z, best_z))
    return best_s, best_z


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """U upper triangular with H^-1 = U^T U (the upper Cholesky factor of H^-1), per group; h: (g, R, R)
    symmetric positive definite. With J the reversal, J H J = L L^T gives U = J L^-1 J: one Cholesky
    and one triangular inverse, without forming H^-1."""
    rev = h.flip(-1, -2)                                                    # J H J
    low = torch.linalg.cholesky(rev)
    eye = torch.eye(h.shape[-1], dtype=h.dtype).expand_as(h)
    return torch.linalg.solve_triangular(low, eye, upper=False).flip(-1, -2)


def _damped_inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """_inverse_cholesky of the damped Gram (em._damped: dead inputs get a unit diagonal); when a Gram of
    too few samples is not positive definite at `damp`, the damping is raised (x10 from 1e-4) until it is."""
    for d in (damp, *(x for x in (1e-4, 1e-3, 1e-2, 1e-1, 1.0) if x > damp)):
        try:
            return _inverse_cholesky(_damped(h, d))
        except torch.linalg.LinAlgError:
            continue
    raise ValueError("the layer's input Gram is not positive definite even with damping 1.0 (non-finite inputs?)")


def _gptq_columns(w: torch.Tensor, u: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int) -> torch.Tensor:
    """Integer codes (g, opg, R) of w (g, opg, R) on the grid s (q - z), column by column with GPTQ error
    feedback through u (g, R, R) (H^-1 = U^T U), in lazy blocks of BLOCK columns."""
    w = w.clone()
    g, opg, r = w.shape
    codes = torch.empty(g, opg, r, dtype=torch.float64)
    for i1 in range(0, r, BLOCK):
        i2 = min(i1 + BLOCK, r)
        w1 = w[:, :, i1:i2]                                                 # (g, opg, B) view
        err1 = torch.empty_like(w1)
        u1 = u[:, i1:i2, i1:i2]                                             # (g, B, B)
        for j in range(i2 - i1):
            col = w1[:, :, j]                                               # (g, opg)
            q = torch.round(col / s + z).clamp_(0, qmax)
            codes[:, :, i1 + j] = q
            e = (col - s * (q - z)) / u1[:, j, j][:, None]                  # (g, opg)
            w1[:, :, j:] -= e[:, :, None] * u1[:, None, j, j:]              # push forward inside the block
            err1[:, :, j] = e
        if i2 < r:
            w[:, :, i2:] -= err1 @ u[:, i1:i2, i2:]                         # and onto the later columns
    return codes


@torch.no_grad()
def quantize_scalar(weight: torch.Tensor, full_gram: torch.Tensor | None, bits: int, damp: float = 0.01, *,
                    feedback: bool = True, act_order: bool = True, clip_search: bool = True,
                    scale: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> ScalarResult:
    """Per-output-channel `bits`-bit codes of `weight` (C_out, ...) (see the module docstring).

    full_gram: the layer's (g, R, R) input Gram (stats.LayerStats.full_gram; g the conv's groups), or None
    for plain round-to-nearest in weight space. damp: GPTQ's relative diagonal damping (EMConfig.damp).
    feedback=False: round to nearest on the same grid (no error feedback). scale / zero: a fixed grid
    ((C_out,) each, e.g. a layer's trained scales) instead of the clip search. Returns the codes, fp16
    scales, zero points and the output error under the *undamped* Gram."""
    _check_bits(bits)
    if not torch.isfinite(weight).all():
        raise ValueError("weight has non-finite values")
    qmax = (1 << bits) - 1
    g = full_gram.shape[0] if full_gram is not None else 1
    if full_gram is not None:
        full_gram = full_gram.detach().cpu().double()
        r = weight[0].numel()
        if full_gram.dim() != 3 or tuple(full_gram.shape[1:]) != (r, r):
            raise ValueError(f"full_gram of shape {list(full_gram.shape)} does not fit a weight of shape "
                             f"{list(weight.shape)} (expected (groups, {r}, {r}))")
    w = _rows(weight, g)                                                    # (g, opg, R)
    hdiag = (full_gram.diagonal(dim1=1, dim2=2) if full_gram is not None
             else torch.ones(1, w.shape[2], dtype=torch.float64))          # (g, R)
    if scale is None:
        s, z = _grid(w, hdiag, bits, clip_search)
    else:
        zero = torch.full_like(scale, 1 << (bits - 1)) if zero is None else zero
        if scale.shape != (weight.shape[0],) or zero.shape != (weight.shape[0],):
            raise ValueError(f"scale and zero must be ({weight.shape[0]},), got {list(scale.shape)}, "
                             f"{list(zero.shape)}")
        s = round_scale(scale).double().reshape(w.shape[:2])
        z = zero.detach().cpu().double().reshape(w.shape[:2])
        if bool(((z < 0) | (z > qmax) | (z != z.round())).any()):
            raise ValueError(f"zero points must be integers in [0, {qmax}]")
    if feedback and full_gram is not None:
        perm = torch.argsort(hdiag, dim=1, descending=True, stable=True) if act_order else None   # (g, R)
        h = full_gram
        if perm is not None:
            gi = torch.arange(g)[:, None, None]
            h = h[gi, perm[:, :, None], perm[:, None, :]]                       # (g, R, R) permuted
            w = w.gather(2, perm[:, None, :].expand_as(w))
        codes = _gptq_columns(w, _damped_inverse_cholesky(h, damp), s, z, qmax)
        if perm is not None:
            codes = torch.empty_like(codes).scatter_(2, perm[:, None, :].expand_as(codes), codes)
    else:
        codes = torch.round(w / s[..., None] + z[..., None]).clamp_(0, qmax)
    c_out = weight.shape[0]
    res = ScalarResult(codes.reshape(c_out, -1).to(torch.uint8), s.reshape(c_out).half(),
                       z.reshape(c_out).to(torch.uint8), bits, 0.0, 0.0, False)
    res.objective, res.rel_error, res.exact = _error(weight, res.weight(tuple(weight.shape)), full_gram)
    return res


@torch.no_grad()
def quantize_fp16(weight: torch.Tensor, full_gram: torch.Tensor | None = None) -> HalfResult:
    """The weight rounded to fp16, with its output error under `full_gram` (weight space without one)."""
    w16 = weight.detach().cpu().half()
    if not torch.isfinite(w16).all():
        raise ValueError("the weight does not fit fp16 (values beyond +-65504)")
    err, rel, exact = _error(weight, w16.float(), full_gram)
    return HalfResult(w16, err, rel, exact)


# ----------------------------------------------------------------------------- layers


class ScalarMixin:
    """Shared behaviour of per-channel scalar-quantized layers (mixed in before the layer class)."""

    scale: nn.Parameter
    codes: torch.Tensor
    zero: torch.Tensor
    weight_shape: tuple[int, ...]

    @property
    def scalar_bits(self) -> int:
        return self.__dict__["_scalar_bits"]

    def dequantize(self) -> torch.Tensor:
        """The dense weight scale * (codes - zero), in the weight's shape (differentiable in the scale)."""
        s = self.scale
        return (s[:, None] * (self.codes.to(s.dtype) - self.zero.to(s.dtype)[:, None])).reshape(self.weight_shape)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        stored = self._buffers.get("export_scale")       # registered by export.py while tracing for ONNX:
        if stored is not None:                           # the graph decodes Cast(scale16) * (Cast(codes) - Cast(zero))
            s = stored.float()
            return (s[:, None] * (self.codes.float() - self.zero.float()[:, None])).reshape(self.weight_shape)
        if self.training or torch.is_grad_enabled() and self.scale.requires_grad:
            self._scalar_cache = None
            return self.dequantize()
        cache = getattr(self, "_scalar_cache", None)     # keyed on the scale's values and the codes' versions
        key = (self.codes.data_ptr(), self.codes._version, self.zero.data_ptr(), self.zero._version)
        if (cache is None or cache[1] != key or cache[0].dtype != self.scale.dtype
                or not torch.equal(cache[0], self.scale)):
            with torch.no_grad():
                cache = (self.scale.detach().clone(), key, self.dequantize())
            self._scalar_cache = cache
        return cache[2]

    def extra_repr(self) -> str:  # type: ignore[override]
        return f"{super().extra_repr()}, scalar_bits={self.scalar_bits}"

    def to_dense(self) -> nn.Module:
        """An equivalent plain layer of the original class with the decoded weight (hooks not copied)."""
        return _dense_copy(self, ScalarMixin, self.dequantize(), drop_params=("scale",), drop_buffers=("codes", "zero"),
                           drop_attrs=("_scalar_cache", "_scalar_bits", "weight_shape"))


class ScalarConv2d(ScalarMixin, nn.Conv2d):
    """A Conv2d whose weight is scale * (codes - zero), one scale and zero point per output channel."""


class ScalarLinear(ScalarMixin, nn.Linear):
    """A Linear whose weight is scale * (codes - zero), one scale and zero point per output channel."""


class HalfMixin:
    """A layer whose weight Parameter is kept at fp16 values (stored in fp16)."""

    def extra_repr(self) -> str:  # type: ignore[override]
        return f"{super().extra_repr()}, fp16"

    def to_dense(self) -> nn.Module:
        return _dense_copy(self, HalfMixin, self.weight.detach(), drop_params=("weight",))


class Fp16Conv2d(HalfMixin, nn.Conv2d):
    """A Conv2d whose weight is kept in fp16."""


class Fp16Linear(HalfMixin, nn.Linear):
    """A Linear whose weight is kept in fp16."""


_CLASSES: dict[tuple[type, type], type] = {
    (ScalarMixin, nn.Conv2d): ScalarConv2d, (ScalarMixin, nn.Linear): ScalarLinear,
    (HalfMixin, nn.Conv2d): Fp16Conv2d, (HalfMixin, nn.Linear): Fp16Linear}


def _class_for(mixin: type, cls: type) -> type:
    """The mixin's version of layer class `cls` (generated once for a Conv2d / Linear subclass)."""
    if (mixin, cls) not in _CLASSES:
        base_cls = nn.Conv2d if issubclass(cls, nn.Conv2d) else nn.Linear if issubclass(cls, nn.Linear) else None
        if base_cls is None:
            raise TypeError(f"cannot quantize a {cls.__name__}: not a Conv2d or Linear")
        prefix = "Scalar" if mixin is ScalarMixin else "Fp16"
        _CLASSES[(mixin, cls)] = type(f"{prefix}{cls.__name__}", (_CLASSES[(mixin, base_cls)], cls),
                                      {"__module__": __name__})
    return _CLASSES[(mixin, cls)]


def _dense_copy(layer: nn.Module, mixin: type, weight: torch.Tensor, drop_params=(), drop_buffers=(),
                drop_attrs=()) -> nn.Module:
    base = next(c for c in type(layer).__mro__[1:] if not issubclass(c, mixin))
    dense = base.__new__(base)
    nn.Module.__init__(dense)
    skip = {*drop_attrs, "_parameters", "_buffers", "_modules"} | {
        k for k in layer.__dict__ if k.endswith("hooks") or k.startswith("_forward") or k.startswith("_backward")}
    for k, v in layer.__dict__.items():
        if k not in skip and k not in dense.__dict__:
            dense.__dict__[k] = v
    dense.__dict__["training"] = layer.training
    dense.weight = nn.Parameter(weight.detach().clone())
    for k, v in layer._parameters.items():
        if k not in drop_params:
            dense.register_parameter(k, v)
    for k, v in layer._buffers.items():
        if k not in drop_buffers:
            dense.register_buffer(k, v)
    return dense


def is_scalar(module: nn.Module) -> bool:
    """Whether `module` holds per-channel scalar codes."""
    return isinstance(module, ScalarMixin)


def is_fp16(module: nn.Module) -> bool:
    """Whether `module` is a layer kept in fp16."""
    return isinstance(module, HalfMixin)


def is_quantized(module: nn.Module) -> bool:
    """Whether bitdown compressed `module` in any way (product-quantized, scalar codes, fp16)."""
    from .modules import is_pq

    return is_pq(module) or is_scalar(module) or is_fp16(module)


def _check_plain(module: nn.Module) -> None:
    if is_quantized(module):
        raise TypeError("module is already quantized")
    if not isinstance(getattr(module, "weight", None), nn.Parameter):
        raise TypeError(f"cannot quantize a {type(module).__name__} without a weight Parameter")


def quantize_module_scalar(module: nn.Module, codes: torch.Tensor, scale: torch.Tensor, bits: int,
                           zero: torch.Tensor | None = None) -> nn.Module:
    """Turn `module` (Conv2d/Linear or a subclass) into its scalar-quantized version in place and return it.

    codes: C_out x R integers in [0, 2**bits) (any shape with that many, row-major); scale: (C_out,) (rounded
    to fp16 here: memory == file); zero: (C_out,) integers in [0, 2**bits) (default 2**(bits-1): the signed
    grid s * [-2**(bits-1), 2**(bits-1))). All moved to the device of the layer's weight."""
    _check_bits(bits)
    _check_plain(module)
    cls = _class_for(ScalarMixin, type(module))                 # raises before anything is changed
    weight = module.weight
    shape = tuple(weight.shape)
    c_out = shape[0]
    qmax = (1 << bits) - 1
    zero = torch.full((c_out,), 1 << (bits - 1), dtype=torch.long) if zero is None else zero
    if codes.numel() != weight.numel():
        raise ValueError(f"{codes.numel()} codes do not fit a weight of shape {list(shape)}")
    if tuple(scale.shape) != (c_out,) or tuple(zero.shape) != (c_out,):
        raise ValueError(f"scale and zero must have shape ({c_out},), got {list(scale.shape)} and {list(zero.shape)}")
    for name, t in (("codes", codes), ("zero points", zero)):
        if t.is_floating_point() and bool((t != t.round()).any()):
            raise ValueError(f"{name} must be integers")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > qmax):
            raise ValueError(f"{name} out of range [0, {qmax}] for {bits}-bit codes")
    s = round_scale(scale)
    if not torch.isfinite(s).all():
        raise ValueError("scale has non-finite values (or values beyond fp16's range)")
    dev = weight.device
    del module._parameters["weight"]
    module.__class__ = cls
    module.weight_shape = shape
    module._scalar_bits = bits
    module.scale = nn.Parameter(s.to(dev))
    module.register_buffer("codes", codes.detach().reshape(c_out, -1).to(dev, torch.uint8).clone())
    module.register_buffer("zero", zero.detach().reshape(c_out).to(dev, torch.uint8).clone())
    return module


@torch.no_grad()
def quantize_module_fp16(module: nn.Module, weight: torch.Tensor | None = None) -> nn.Module:
    """Turn `module` into its fp16-kept version in place: its weight (or `weight`, e.g. a teacher target)
    rounded to fp16 values, kept as an fp32 Parameter."""
    _check_plain(module)
    cls = _class_for(HalfMixin, type(module))
    w = module.weight if weight is None else weight
    if tuple(w.shape) != tuple(module.weight.shape):
        raise ValueError(f"weight of shape {list(w.shape)} for a layer of weight shape {list(module.weight.shape)}")
    w16 = w.detach().half()
    if not torch.isfinite(w16).all():
        raise ValueError("the weight does not fit fp16 (values beyond +-65504)")
    module.weight.data = w16.to(module.weight.device, module.weight.dtype)
    module.__class__ = cls
    return module


def empty_scalar_like(module: nn.Module, bits: int) -> nn.Module:
    """Turn `module` into a scalar layer with zero codes / unit scales (for loading a file)."""
    c_out = module.weight.shape[0]
    return quantize_module_scalar(module, torch.zeros(module.weight.numel(), dtype=torch.long),
                                  torch.ones(c_out), bits, torch.zeros(c_out, dtype=torch.long))


def empty_like_plan(module: nn.Module, plan: LayerPlan) -> nn.Module:
    """Turn `module` into the (empty) layer that `plan` describes, ready for `load_state_dict`: a PQ layer
    (modules.empty_pq_like), a scalar layer or an fp16 layer."""
    if plan.fp16:                       # zeros: never refused, whatever the weight (a failed load changes nothing)
        return quantize_module_fp16(module, torch.zeros_like(module.weight))
    if plan.scalar_bits:
        return empty_scalar_like(module, plan.scalar_bits)
    return empty_pq_like(module, plan.n_centroids, plan.block_size, plan.codebook_bits)


@torch.no_grad()
def round_scalars_(model: nn.Module) -> None:
    """Round, in place, every scalar layer's scales and every fp16 layer's weight to what the file holds
    (after training them, e.g.), so the model equals the file."""
    for m in model.modules():
        if is_scalar(m):
            m.scale.data = round_scale(m.scale.data).to(m.scale)
        elif is_fp16(m):
            m.weight.data = m.weight.data.half().to(m.weight.dtype)
