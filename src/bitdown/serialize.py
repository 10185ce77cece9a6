"""The compact file: one safetensors file, never unpickled.

Format version 3 (what `save` writes; version-1 and -2 files still load, any other version is refused).

Container (version 3): a safetensors file holding one uint8 tensor "bitdown.zlib" and the metadata string
{"format": "bitdown", "format_version": 3} under the key "bitdown". The tensor is one zlib stream of

    8 bytes        little-endian length n of the index
    n bytes        the index, JSON: {"tensors": [[name, dtype, shape], ...], "meta": METADATA}, dtype a
                   safetensors dtype name ("F16", "U8", ...), tensors ordered by (dtype, last name part, name)
    the tensors' bytes one after the other in index order, each as byte planes: a tensor of N elements
                   of k bytes (little-endian, row-major) is stored as the N first bytes of its elements, then
                   the N second bytes, ... (k = 1: the bytes themselves)

(version 2 kept every tensor as a safetensors tensor and METADATA as the "bitdown" string: a 135-tensor
ResNet-20 spent 12 KB on the safetensors index and 9 KB on uncompressed JSON; see docs/DESIGN.md). Grouping
by dtype and byte planes let zlib find the redundancy of floating-point values (exponent bytes) and of
similar tensors next to one another. Reading
a version-3 file checks the container before anything else: one uint8 tensor, a zlib stream that inflates
to exactly the index's bytes (inflated piece by piece, never beyond what the index declares: no zip bomb),
known dtypes, unique names, non-negative shapes, and the outer and inner format versions agreeing.
`read_stored` / `write_stored` give and take the stored tensors and metadata whatever the container.

Tensors (the stored form, in every version):

    NAME.codebook        (K, d) fp16, or int8 with a (d,) fp16 NAME.codebook_scale when the layer's
                         codebook_bits is 8. A codebook shared by several layers (LayerPlan.share) is
                         stored once, under the group's first layer in name order; the others have
                         only their codes.
    NAME.codes           the layer's (C_out, nb) codes in row-major order, bit-packed to
                         b = max(1, ceil(log2 K)) bits each, least significant bit first, in a 1-D
                         uint8 tensor of ceil(C_out * nb * b / 8) bytes whose padding bits are zero
                         (`pack_codes`). Version 1: (C_out, nb) uint8 (int16 when K > 256).
    NAME.codes, NAME.scale, NAME.zero
                         a layer with per-output-channel scalar codes (LayerPlan.scalar_bits = b, scalar.py):
                         its C_out x R codes bit-packed to b bits as above, its (C_out,) fp16 scales, and its
                         (C_out,) zero points bit-packed to b bits the same way.
    NAME.weight          a layer kept in fp16 (LayerPlan.fp16): its weight in fp16, fp32 again after loading.
                         (Scalar and fp16 layers are optional LayerPlan keys of version 2: files without them
                         are unchanged, and a bitdown that predates them refuses such a file, naming the key.)
    *.running_mean/var   BatchNorm running statistics in fp16 (version 1: fp32), fp32 again after
                         loading. A statistic stays fp32 when fp16 would overflow or move the layer's
                         normalisation by more than BN_FP16_TOL of a channel's standard deviation
                         (a tiny variance, a mean far larger than the std). `save` rounds the model's
                         statistics in memory to what the file holds, so after `save` the model in
                         memory equals the one `load` gives (fp16-rounded statistics), as for codebooks.
    everything else      as in the state dict (biases, BatchNorm weight/bias, uncompressed layers).

Metadata (METADATA above; in versions 1-2 the safetensors metadata string "bitdown"): compact JSON (no spaces;
LayerPlan fields at their default omitted):

    {"arch": {"name": str, "source": "zoo"|"user"[, "preprocess": str][, "classes": [str, ...]]}, "config": {...},
     "layers": [LayerPlan...], "skipped": {name: reason}, "em": {name: {...}}, "extra": {...},
     "size": {name: number}, "format": "bitdown", "format_version": 3,
     "checksum": sha256 over (name, dtype, shape, bytes) of every tensor in name order and the metadata}

Loading checks, and names what failed in a BitdownFileError: the container and header; the format
and version; the checksum (tampering, bit rot; it is not a signature, anyone can recompute it, so
the rest is checked as well); the metadata against a schema (`check_metadata`: types, ranges, known
keys); every tensor (`decode`: present with the dtype and shape the plan says, codes below K, finite
floating values, BatchNorm running_var >= 0); and (`apply`) that the model matches the file, before
changing the model. `save` runs the same checks on what it writes: it never writes a file that
`load` refuses.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .config import CODEBOOK_BITS, LAYER_KINDS, MAX_CENTROIDS, SCALAR_BITS, LayerPlan, share_groups, share_owner
from .frozen import refuse_frozen
from .modules import code_dtype, decode_codebook, encode_codebook, is_pq
from .scalar import empty_like_plan, is_fp16, is_quantized, is_scalar

log = logging.getLogger(__name__)

FORMAT = "bitdown"
FORMAT_VERSION = 3
VERSIONS = (1, 2, 3)                 # the format versions this bitdown reads
PAYLOAD = "bitdown.zlib"             # version 3: the one tensor of the safetensors container
MAX_INDEX_BYTES = 64 << 20           # version 3: largest index JSON read
MAX_DATA_BYTES = 1 << 36             # version 3: largest total of tensor bytes read (64 GiB)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
BN_STATS = ("running_mean", "running_var")
BN_FP16_TOL = 1e-2                   # most a stored statistic may move a channel's normalisation, in stds

REQUIRED_KEYS = ("format", "format_version", "checksum", "arch", "layers", "config")
OPTIONAL_KEYS = ("skipped", "em", "extra", "size", "timings")
ARCH_KEYS = ("name", "source", "preprocess", "classes")
LAYER_FIELDS = {f.name: f for f in dataclasses.fields(LayerPlan)}
LAYER_DEFAULTS = {n: f.default for n, f in LAYER_FIELDS.items() if f.default is not dataclasses.MISSING}


class BitdownFileError(ValueError):
    """A bitdown file is missing, truncated, tampered with, or does not match the model."""


class _Invalid(Exception):
    """A metadata or tensor check failed; the message names the key or tensor."""


def checksum(tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes, in name order) and the canonical JSON of
    the metadata (without the checksum itself)."""
    h = hashlib.sha256()
    if meta is not None:
        h.update(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- code packing


def code_bits(n_centroids: int) -> int:
    """Bits per code on disk: ceil(log2 K), at least 1."""
    return max(1, (int(n_centroids) - 1).bit_length())


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (any shape, integers in [0, 2**bits), bits <= 16) bit-packed in row-major order, least
    significant bit first, into a 1-D uint8 tensor of ceil(n * bits / 8) bytes (padding bits zero)."""
    c = codes.detach().reshape(-1).cpu().long()
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    if bits == 8:                                                            # K in (128, 256]: the bytes
        return c.to(torch.uint8)
    planes = np.unpackbits(c.numpy().astype("<u2").view(np.uint8).reshape(-1, 2), axis=1,
                           bitorder="little")[:, :bits]                       # (n, bits), LSB first
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """The n codes (int64, 1-D) of `pack_codes(codes, bits)`; ValueError when `packed` is not exactly
    such a tensor (wrong dtype or length, nonzero padding bits)."""
    data = packed.detach().cpu().contiguous().numpy()
    total = n * bits
    if packed.dtype != torch.uint8 or data.ndim != 1 or data.size != (total + 7) // 8:
        raise ValueError(f"not {n} {bits}-bit codes packed into {(total + 7) // 8} bytes: found "
                         f"{packed.dtype} of shape {list(packed.shape)}")
    if total % 8 and int(data[-1]) >> (total % 8):
        raise ValueError("nonzero padding bits after the last code")
    if bits == 8:
        return torch.from_numpy(data.astype(np.int64))
    full = np.zeros((n, 16), np.uint8)
    full[:, :bits] = np.unpackbits(data, count=total, bitorder="little").reshape(n, bits)
    return torch.from_numpy(np.packbits(full, axis=1, bitorder="little").view("<u2").reshape(n).astype(np.int64))


# ----------------------------------------------------------------------------- metadata schema


def _show(x: Any) -> str:
    text = json.dumps(x) if isinstance(x, (dict, list, str, int, float, bool, type(None))) else repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(x: Any) -> bool:
    return type(x) is int                     # JSON integers; not bool


def _is_num(x: Any) -> bool:
    return type(x) in (int, float) and math.isfinite(x)


def _object(x: Any, what: str) -> dict[str, Any]:
    if not isinstance(x, dict):
        raise _Invalid(f"{what} must be a JSON object, got {_show(x)}")
    return x


def _check_version(v: Any) -> None:
    if not _is_int(v):
        raise _Invalid(f"format_version must be an integer, got {_show(v)}")
    if v > FORMAT_VERSION:
        raise _Invalid(f"format version {v} is newer than this bitdown supports ({FORMAT_VERSION}); upgrade bitdown")
    if v not in VERSIONS:
        raise _Invalid(f"unknown format version {v} (this bitdown reads versions {list(VERSIONS)})")


def _check_layer(i: int, d: Any) -> LayerPlan:
    where = f"corrupt layer list in the metadata: layers[{i}]"
    if not isinstance(d, dict):
        raise _Invalid(f"{where} must be a JSON object, got {_show(d)}")
    if isinstance(d.get("name"), str) and d["name"]:
        where += f" ({d['name']!r})"
    missing = [k for k, f in LAYER_FIELDS.items() if k not in d and k not in LAYER_DEFAULTS]
    unknown = sorted(set(d) - set(LAYER_FIELDS))
    if missing or unknown:
        raise _Invalid(f"{where}: missing key(s) {missing}, unknown key(s) {unknown}")
    d = {**LAYER_DEFAULTS, **d}

    def bad(key: str, want: str) -> _Invalid:
        return _Invalid(f"{where}: {key} must be {want}, got {_show(d[key])}")

    if not isinstance(d["name"], str) or not d["name"]:
        raise bad("name", "a non-empty string")
    if d["kind"] not in LAYER_KINDS:
        raise bad("kind", f"one of {list(LAYER_KINDS)}")
    shape, rank = d["weight_shape"], 2 if d["kind"] == "linear" else 4
    if not isinstance(shape, list) or len(shape) != rank or not all(_is_int(s) and s >= 1 for s in shape):
        raise bad("weight_shape", f"a list of {rank} positive integers for a {d['kind']} layer")
    if not _is_int(d["block_size"]) or d["block_size"] < 1 or math.prod(shape[1:]) % d["block_size"]:
        raise bad("block_size", f"a positive integer dividing the row length {math.prod(shape[1:])}")
    if not _is_int(d["n_centroids"]) or not 1 <= d["n_centroids"] <= MAX_CENTROIDS:
        raise bad("n_centroids", f"an integer in [1, {MAX_CENTROIDS}]")
    if not _is_int(d["groups"]) or d["groups"] < 1:
        raise bad("groups", "a positive integer")
    if not _is_int(d["codebook_bits"]) or d["codebook_bits"] not in CODEBOOK_BITS:
        raise bad("codebook_bits", f"one of {list(CODEBOOK_BITS)}")
    if d["share"] is not None and (not isinstance(d["share"], str) or not d["share"]):
        raise bad("share", "a group name (non-empty string) or null")
    if not _is_int(d["scalar_bits"]) or d["scalar_bits"] not in (0,) + SCALAR_BITS:
        raise bad("scalar_bits", f"0 (product quantization) or one of {list(SCALAR_BITS)}")
    if type(d["fp16"]) is not bool:
        raise bad("fp16", "true or false")
    if d["scalar_bits"] and d["fp16"]:
        raise _Invalid(f"{where}: a layer cannot have both scalar_bits and fp16")
    if d["scalar_bits"] or d["fp16"]:
        k = 1 << d["scalar_bits"] if d["scalar_bits"] else 1
        for key, want in (("block_size", 1), ("n_centroids", k), ("codebook_bits", 16), ("share", None)):
            if d[key] != want:
                raise bad(key, f"{json.dumps(want)} for a {'fp16' if d['fp16'] else 'scalar'} layer")
    return LayerPlan.from_json(d)


def _check_plans(layers: Any) -> list[LayerPlan]:
    if not isinstance(layers, list) or not layers:
        raise _Invalid(f"corrupt layer list in the metadata: layers must be a non-empty list, got {_show(layers)}")
    plans = [_check_layer(i, d) for i, d in enumerate(layers)]
    names = [p.name for p in plans]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _Invalid(f"corrupt layer list in the metadata: layer(s) {dup} listed twice")
    for g, members in share_groups(plans).items():
        for key in ("block_size", "n_centroids", "codebook_bits"):
            if len({getattr(p, key) for p in members}) > 1:
                raise _Invalid(f"corrupt layer list in the metadata: share group {g!r} has layers with different {key}")
    return plans


def _schema(meta: Any) -> list[LayerPlan]:
    """Check the metadata's types, ranges and keys; its layer plans."""
    meta = _object(meta, "the metadata")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise _Invalid(f"metadata lacks {missing}")
    unknown = sorted(set(meta) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise _Invalid(f"unknown metadata key(s) {unknown}; known: {list(REQUIRED_KEYS + OPTIONAL_KEYS)}")
    if meta["format"] != FORMAT:
        raise _Invalid("metadata does not describe a bitdown file")
    _check_version(meta["format_version"])
    c = meta["checksum"]
    if not isinstance(c, str) or len(c) != 64 or any(ch not in "0123456789abcdef" for ch in c):
        raise _Invalid(f"checksum must be 64 lowercase hex digits, got {_show(c)}")

    arch = _object(meta["arch"], "arch")
    unknown = sorted(set(arch) - set(ARCH_KEYS))
    if unknown:
        raise _Invalid(f"arch has unknown key(s) {unknown}; known: {list(ARCH_KEYS)}")
    if not isinstance(arch.get("name"), str) or not arch["name"]:
        raise _Invalid(f"arch.name must be a non-empty string, got {_show(arch.get('name'))}")
    if arch.get("source") not in ("zoo", "user"):
        raise _Invalid(f"arch.source must be 'zoo' or 'user', got {_show(arch.get('source'))}")
    if arch.get("preprocess") is not None and (not isinstance(arch["preprocess"], str) or not arch["preprocess"]):
        raise _Invalid(f"arch.preprocess must be a preset name or null, got {_show(arch['preprocess'])}")
    classes = arch.get("classes")
    if classes is not None and (not isinstance(classes, list) or not classes
                                or not all(isinstance(c, str) and c for c in classes)
                                or len(set(classes)) != len(classes)):
        raise _Invalid(f"arch.classes must be a non-empty list of distinct class names or null, got {_show(classes)}")

    _object(meta["config"], "config")
    for name, why in _object(meta.get("skipped", {}), "skipped").items():
        if not isinstance(why, str):
            raise _Invalid(f"skipped[{name!r}] must be a string (the reason), got {_show(why)}")
    for name, res in _object(meta.get("em", {}), "em").items():
        _object(res, f"em[{name!r}]")
    extra = _object(meta.get("extra", {}), "extra")
    if extra.get("allocation") is not None:
        al = _object(extra["allocation"], "extra.allocation")
        for key in ("budget_bytes", "achieved_bytes", "ratio"):
            if not _is_num(al.get(key)) or al[key] <= 0:
                raise _Invalid(f"extra.allocation.{key} must be a positive number, got {_show(al.get(key))}")
    if "calib_images" in extra and (not _is_int(extra["calib_images"]) or extra["calib_images"] < 0):
        raise _Invalid(f"extra.calib_images must be a non-negative integer, got {_show(extra['calib_images'])}")
    for section in ("size", "timings"):
        for key, v in _object(meta.get(section, {}), section).items():
            if not _is_num(v) or v < 0:
                raise _Invalid(f"{section}.{key} must be a finite number >= 0, got {_show(v)}")
    return _check_plans(meta["layers"])


def check_metadata(meta: Any, path: Any = "file") -> list[LayerPlan]:
    """Validate a file's metadata (types, ranges, known keys, version 1 or 2); its layer plans.
    BitdownFileError naming the key when it is invalid."""
    try:
        return _schema(meta)
    except _Invalid as e:
        raise BitdownFileError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------- tensors


def _finite(t: torch.Tensor) -> bool:
    if not t.is_floating_point():
        return True
    try:
        return bool(torch.isfinite(t).all())
    except (RuntimeError, TypeError, NotImplementedError):     # float8 etc.
        return bool(torch.isfinite(t.float()).all())


def _decode(tensors: dict[str, torch.Tensor], version: int, plans: list[LayerPlan]) -> dict[str, torch.Tensor]:
    for name in sorted(tensors):
        t = tensors[name]
        if not _finite(t):
            raise _Invalid(f"tensor {name!r} holds NaN or infinite values")
        if name.endswith("running_var") and t.dtype != torch.bool and t.numel() and bool((t < 0).any()):
            raise _Invalid(f"tensor {name!r} holds negative values (a variance is >= 0)")
    owner: dict[str, str] = {}
    for members in share_groups(plans).values():
        first = share_owner([p.name for p in members])
        owner.update({p.name: first for p in members})
    out = dict(tensors)
    for p in plans:
        if p.scalar_bits or p.fp16:
            if version < 2:
                raise _Invalid(f"layer {p.name!r}: a version-{version} file cannot hold {p.quantizer} layers")
            out.update(_decode_scalar(tensors, p))
            continue
        src = owner.get(p.name, p.name)
        cb, codes = tensors.get(f"{src}.codebook"), tensors.get(f"{p.name}.codes")
        if cb is None or codes is None or tuple(cb.shape) != (p.n_centroids, p.block_size):
            raise _Invalid(f"codebook/codes of {p.name!r} missing or of the wrong shape (the plan says a "
                           f"({p.n_centroids}, {p.block_size}) codebook{'' if src == p.name else f' under {src!r}'}; "
                           f"found {None if cb is None else list(cb.shape)})")
        want = torch.int8 if p.codebook_bits == 8 else torch.float16
        scale = tensors.get(f"{src}.codebook_scale")
        if cb.dtype != want or (p.codebook_bits == 8) != (scale is not None) or (
                scale is not None and (scale.dtype != torch.float16 or tuple(scale.shape) != (p.block_size,))):
            raise _Invalid(f"codebook of {p.name!r} is not stored as the metadata says "
                           f"({p.codebook_bits}-bit codebook, found {cb.dtype} with scale "
                           f"{None if scale is None else (scale.dtype, list(scale.shape))})")
        n, rows = p.n_subvectors, p.weight_shape[0]
        if version == 1:
            if codes.dtype != code_dtype(p.n_centroids) or tuple(codes.shape) != (rows, n // rows):
                raise _Invalid(f"codebook/codes of {p.name!r} missing or of the wrong shape (version-1 codes "
                               f"{code_dtype(p.n_centroids)} {[rows, n // rows]}, found {codes.dtype} "
                               f"{list(codes.shape)})")
            plain = codes
        else:
            try:
                plain = unpack_codes(codes, n, code_bits(p.n_centroids))
            except ValueError as e:
                raise _Invalid(f"codes of {p.name!r}: {e}") from None
            plain = plain.reshape(rows, n // rows)
        if plain.numel():
            lo, hi = int(plain.min()), int(plain.max())
            if lo < 0 or hi >= p.n_centroids:
                raise _Invalid(f"codes of {p.name!r} out of range for {p.n_centroids} centroids (found {lo}..{hi})")
        out[f"{p.name}.codes"] = plain.to(code_dtype(p.n_centroids))
    if version >= 2:
        for name, t in tensors.items():
            if name.rpartition(".")[2] in BN_STATS and t.dtype == torch.float16:
                out[name] = t.float()
    return out


def _decode_scalar(tensors: dict[str, torch.Tensor], p: LayerPlan) -> dict[str, torch.Tensor]:
    """The in-memory tensors of a scalar or fp16 layer (checked): codes (C_out, R) and zero (C_out,) uint8
    (the scale stays fp16, as codebooks do); an fp16 layer's weight in fp32."""
    c_out, n = p.weight_shape[0], math.prod(p.weight_shape)
    if p.fp16:
        w = tensors.get(f"{p.name}.weight")
        if w is None or w.dtype != torch.float16 or tuple(w.shape) != tuple(p.weight_shape):
            raise _Invalid(f"weight of fp16 layer {p.name!r} missing or not stored as the metadata says (fp16 "
                           f"{list(p.weight_shape)}, found {None if w is None else (w.dtype, list(w.shape))})")
        return {f"{p.name}.weight": w.float()}
    b = p.scalar_bits
    scale = tensors.get(f"{p.name}.scale")
    if scale is None or scale.dtype != torch.float16 or tuple(scale.shape) != (c_out,):
        raise _Invalid(f"scale of {b}-bit layer {p.name!r} missing or not stored as the metadata says (fp16 "
                       f"[{c_out}], found {None if scale is None else (scale.dtype, list(scale.shape))})")
    out = {}
    for key, count, shape in (("codes", n, (c_out, n // c_out)), ("zero", c_out, (c_out,))):
        t = tensors.get(f"{p.name}.{key}")
        if t is None:
            raise _Invalid(f"{key} of {b}-bit layer {p.name!r} missing")
        try:
            out[f"{p.name}.{key}"] = unpack_codes(t, count, b).reshape(shape).to(torch.uint8)
        except ValueError as e:
            raise _Invalid(f"{key} of {b}-bit layer {p.name!r}: {e}") from None
    return out


def decode(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Any = "file",
           plans: list[LayerPlan] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a file (as `read` returns them) in their in-memory form: codes unpacked to
    (C_out, nb) uint8/int16 (scalar layers: codes (C_out, R) and zero points (C_out,) uint8), BatchNorm
    statistics and fp16 layers' weights fp32. Checks every tensor (present with the dtype
    and shape the plan says, codes below K, finite floating values, running_var >= 0) and raises
    BitdownFileError naming the tensor."""
    if plans is None:
        plans = check_metadata(meta, path)
    try:
        return _decode(tensors, meta["format_version"], plans)
    except _Invalid as e:
        raise BitdownFileError(f"{path}: {e}") from None


def _stat_in_fp16(key: str, state: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> bool:
    """Whether the fp32 running statistic `key` is stored in fp16: it fits fp16 and rounding it moves
    the layer's normalisation (x - mean) / sqrt(var + eps) by at most BN_FP16_TOL stds per channel."""
    prefix, _, leaf = key.rpartition(".")
    eps = getattr(modules.get(prefix), "eps", None)
    var = state.get(f"{prefix}.running_var")
    if (not isinstance(eps, (int, float)) or var is None or var.dtype != torch.float32
            or var.shape != state[key].shape):
        return False
    var = var.detach().cpu().double()
    var16 = var.half().double()
    var_ok = bool(torch.isfinite(var16).all() and
                  (((var16 + eps) / (var + eps)).sqrt() - 1).abs().le(BN_FP16_TOL).all())
    if leaf == "running_var":
        return var_ok
    mean = state[key].detach().cpu().double()
    mean16 = mean.half().double()
    std = ((var16 if var_ok else var) + eps).sqrt()
    return bool(torch.isfinite(mean16).all() and (mean16 - mean).abs().le(BN_FP16_TOL * std).all())


def _fp16_stats(model: nn.Module) -> list[str]:
    """The state-dict keys of the running statistics the file stores in fp16."""
    state = model.state_dict()
    modules = dict(model.named_modules())
    return [k for k, t in state.items()
            if k.rpartition(".")[2] in BN_STATS and t.dtype == torch.float32 and _stat_in_fp16(k, state, modules)]


@torch.no_grad()
def round_bn_stats_(model: nn.Module) -> nn.Module:
    """Round, in place, the BatchNorm running statistics that the file stores in fp16 to fp16 values
    (kept fp32 in memory), so the model equals what `load` gives back. `save` does this."""
    buffers = dict(model.named_buffers())
    for key in _fp16_stats(model):
        if key in buffers:
            buffers[key].copy_(buffers[key].half())
    return model


def file_tensors(model: nn.Module, plans: list[LayerPlan] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the compact file (format version 2): fp16 (or int8 + scale) codebooks, bit-packed
    codes, fp16 BatchNorm statistics where that is safe, everything else as is. The model is not
    changed. A share group of `plans` (default: layers using one codebook Parameter) stores its
    codebook once; its layers must hold the same codebook values, else ValueError (never a file that
    loads as something else)."""
    out: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    pq = {name: m for name, m in modules.items() if is_pq(m)}
    scalar = {name: m for name, m in modules.items() if is_scalar(m)}
    half = {f"{name}.weight" for name, m in modules.items() if is_fp16(m)}
    if plans is not None:
        groups = [[p.name for p in ms] for ms in share_groups(plans).values()]
    else:
        users: dict[int, list[str]] = {}      # a shared codebook Parameter -> the layers using it
        for name in pq:
            users.setdefault(id(modules[name].codebook), []).append(name)
        groups = [names for names in users.values() if len(names) > 1]
    for names in groups:
        first = modules[names[0]].codebook
        for n in names[1:]:
            cb = modules[n].codebook
            if cb is not first and (cb.shape != first.shape or not torch.equal(cb.detach(), first.detach())):
                raise ValueError(f"layers {names[0]!r} and {n!r} share a codebook in the plan but hold different "
                                 f"codebooks (untied, e.g. by load_state_dict(assign=True)): re-tie them before saving")
    borrowed = {n for names in groups for n in names if n != share_owner(names)}
    half |= set(_fp16_stats(model))
    for key, t in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        t = t.detach().cpu()
        if prefix in borrowed and leaf == "codebook":
            continue                          # stored once, under the group's owner
        if prefix in pq and leaf == "codebook":
            t, scale = encode_codebook(t, pq[prefix].codebook_bits)
            if scale is not None:
                out[f"{prefix}.codebook_scale"] = scale.cpu().contiguous()
        elif prefix in scalar and leaf in ("codes", "zero"):
            b = scalar[prefix].scalar_bits
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= 1 << b):
                raise ValueError(f"layer {prefix!r} holds {leaf} out of range for {b} bits")
            t = pack_codes(t, b)
        elif prefix in scalar and leaf == "scale":
            t = t.half()
        elif prefix in pq and leaf == "codes":
            k = pq[prefix].n_centroids
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= k):
                raise ValueError(f"layer {prefix!r} holds codes out of range [0, {k})")
            t = pack_codes(t, code_bits(k))
        elif key in half:
            t = t.half()
        out[key] = t.contiguous()
    return out


def _compact_layer(d: dict[str, Any]) -> dict[str, Any]:
    """A LayerPlan's JSON without the fields at their default value (LayerPlan.from_json restores them)."""
    return {k: v for k, v in d.items()
            if not (k in LAYER_DEFAULTS and type(v) is type(LAYER_DEFAULTS[k]) and v == LAYER_DEFAULTS[k])}


def _encode(model: nn.Module, metadata: dict[str, Any] | None) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors and the metadata JSON of the file `save` writes, checked as `read` checks them."""
    refuse_frozen(model, "save")
    if metadata is None:
        info = getattr(model, "bitdown", None)
        if info is None:
            raise ValueError("model has no bitdown metadata: compress it with bitdown.compress, or pass metadata=")
        metadata = info.metadata(model)
    if not any(is_quantized(m) for m in model.modules()):
        raise ValueError("model has no product-quantized layer to save (nor a scalar or fp16 one)")
    try:
        layers = [LayerPlan.from_json(p).to_json() for p in metadata.get("layers", [])]
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise ValueError(f"metadata has a corrupt layer list: {e}") from None
    meta = dict(metadata, format=FORMAT, format_version=FORMAT_VERSION,
                layers=[_compact_layer(d) for d in layers], checksum="0" * 64)
    meta = json.loads(json.dumps(meta))               # canonical JSON types, as read() will see them
    try:
        plans = _schema(meta)
    except _Invalid as e:
        raise ValueError(f"refusing to save metadata that load would refuse: {e}") from None
    tensors = file_tensors(model, plans)
    meta["checksum"] = checksum(tensors, meta)
    try:
        _decode(tensors, FORMAT_VERSION, plans)
    except _Invalid as e:
        raise ValueError(f"refusing to save a model that load would refuse: {e}") from None
    return tensors, json.dumps(meta, separators=(",", ":"))


# ----------------------------------------------------------------------------- container (version 3)


def _planes(t: torch.Tensor) -> bytes:
    """The bytes of `t` as byte planes (the module docstring)."""
    a = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    k = t.element_size()
    return a.reshape(-1, k).T.tobytes() if k > 1 else a.tobytes()


def _from_planes(data: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    k = dtype.itemsize
    if not data:
        return torch.empty(shape, dtype=dtype)
    a = np.frombuffer(data, np.uint8)
    if k > 1:
        a = a.reshape(k, -1).T
    return torch.frombuffer(bytearray(a.tobytes()), dtype=dtype).reshape(shape)


def _payload(tensors: dict[str, torch.Tensor], text: str) -> torch.Tensor:
    """The version-3 payload tensor: zlib(index length, index JSON with the metadata `text`, tensor bytes)."""
    names = sorted(tensors, key=lambda n: (DTYPE_NAMES[tensors[n].dtype], n.rpartition(".")[2], n))
    index = json.dumps([[n, DTYPE_NAMES[tensors[n].dtype], list(tensors[n].shape)] for n in names],
                       separators=(",", ":"))
    head = f'{{"tensors":{index},"meta":{text}}}'.encode()
    z = zlib.compressobj(9)
    parts = [z.compress(len(head).to_bytes(8, "little")), z.compress(head)]
    parts += [z.compress(_planes(tensors[n])) for n in names]
    parts.append(z.flush())
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)


class _Inflater:
    """Inflate a zlib stream piece by piece, never more than asked (a hostile stream cannot blow up memory)."""

    def __init__(self, data: bytes) -> None:
        self.z, self.tail = zlib.decompressobj(), data

    def take(self, n: int, what: str) -> bytes:
        parts, got = [], 0
        try:
            while got < n and self.tail:
                chunk = self.z.decompress(self.tail, min(n - got, 1 << 26))
                self.tail = self.z.unconsumed_tail
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
        except zlib.error as e:
            raise _Invalid(f"corrupt compressed payload ({e})") from None
        if got < n:
            raise _Invalid(f"the compressed payload ends inside {what} ({got} of {n} bytes)")
        return b"".join(parts)

    def end(self) -> None:
        try:
            rest = self.z.decompress(self.tail, 1) if self.tail else self.z.flush()
        except zlib.error as e:
            raise _Invalid(f"corrupt compressed payload ({e})") from None
        if rest or not self.z.eof or self.z.unused_data:
            raise _Invalid("the compressed payload holds more than its index declares")


def _unpack(stored: dict[str, torch.Tensor], outer: dict[str, Any]) -> tuple[dict[str, torch.Tensor], Any]:
    """The tensors and metadata of a version-3 container (checked as the module docstring says)."""
    t = stored.get(PAYLOAD)
    if set(stored) != {PAYLOAD} or t.dtype != torch.uint8 or t.dim() != 1:
        raise _Invalid(f"a version-3 file holds exactly one 1-D uint8 tensor {PAYLOAD!r}, found "
                       f"{sorted(stored)[:5]}")
    inf = _Inflater(t.numpy().tobytes())
    n = int.from_bytes(inf.take(8, "the index length"), "little")
    if n > MAX_INDEX_BYTES:
        raise _Invalid(f"index of {n} bytes (at most {MAX_INDEX_BYTES} read)")
    try:
        head = json.loads(inf.take(n, "the index"))
    except (ValueError, RecursionError) as e:
        raise _Invalid(f"corrupt bitdown metadata (the index JSON): {e}") from None
    if not isinstance(head, dict) or set(head) != {"tensors", "meta"} or not isinstance(head["tensors"], list):
        raise _Invalid('the index must be a JSON object {"tensors": [...], "meta": {...}}')
    entries, total = [], 0
    for i, e in enumerate(head["tensors"]):
        if not (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and e[0] and e[1] in DTYPES
                and isinstance(e[2], list) and all(_is_int(d) and d >= 0 for d in e[2])):
            raise _Invalid(f"index entry {i} must be [name, dtype (one of {list(DTYPES)}), shape], got {_show(e)}")
        size = math.prod(e[2]) * DTYPES[e[1]].itemsize
        entries.append((e[0], DTYPES[e[1]], e[2], size))
        total += size
        if total > MAX_DATA_BYTES:
            raise _Invalid(f"the index declares more than {MAX_DATA_BYTES} bytes of tensors")
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        raise _Invalid(f"tensor(s) {sorted({x for x in names if names.count(x) > 1})[:5]} listed twice in the index")
    tensors = {}
    for name, dtype, shape, size in entries:
        tensors[name] = _from_planes(inf.take(size, f"tensor {name!r}"), dtype, shape)
    inf.end()
    meta = head["meta"]
    if isinstance(meta, dict) and meta.get("format_version") != outer.get("format_version"):
        raise _Invalid(f"the container says format version {_show(outer.get('format_version'))}, its metadata "
                       f"{_show(meta.get('format_version'))}")
    return tensors, meta


def _write_container(path: str | Path, tensors: dict[str, torch.Tensor], text: str) -> None:
    """Write stored `tensors` and the metadata JSON `text` as a version-3 file (no check, not atomic)."""
    from safetensors.torch import save_file

    save_file({PAYLOAD: _payload(tensors, text)}, str(path),
              metadata={FORMAT: json.dumps({"format": FORMAT, "format_version": 3}, separators=(",", ":"))})


def write_stored(path: str | Path, tensors: dict[str, torch.Tensor], meta: Any) -> Path:
    """Write stored tensors and metadata as they are (no check, checksum not recomputed): a version-3
    container when meta["format_version"] >= 3, else the version-1/2 layout. For tests and tools."""
    from safetensors.torch import save_file

    version = meta.get("format_version") if isinstance(meta, dict) else None
    if _is_int(version) and version >= 3:
        _write_container(path, tensors, json.dumps(meta))
    else:
        save_file(tensors, str(path), metadata={FORMAT: json.dumps(meta)})
    return Path(path)


def save(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write the compact file atomically (a crash never leaves a half-written file at `path`).

    `metadata` defaults to `model.bitdown.metadata()` as set by `bitdown.compress`. The model's
    BatchNorm statistics that the file stores in fp16 are rounded in place (`round_bn_stats_`), so
    the model in memory equals what `load` gives back."""
    path = output_target(path)                          # refused before any encoding work
    tensors, text = _encode(model, metadata)
    round_bn_stats_(model)                             # the same values as the file (checked above, first)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        _write_container(tmp, tensors, text)
        os.chmod(tmp, new_file_mode(path))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def output_target(path: str | Path) -> Path:
    """Where writing `path` must go: through a symlink to its target; refused (ValueError) when that exists and
    is not a regular file (a directory, /dev/null, /dev/full: the atomic rename would replace it)."""
    real = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    if real.exists() and not real.is_file():
        raise ValueError(f"{path} exists and is not a regular file: refusing to replace it")
    return real


def new_file_mode(path: Path) -> int:
    """The mode the written file gets: the existing file's, else the usual 0o666 minus the umask (mkstemp's
    temporary file is 0o600)."""
    if path.exists():
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def file_size(model: nn.Module, metadata: dict[str, Any] | None = None) -> int:
    """The bytes `save(model, path, metadata)` would write (header included), without writing or
    changing anything."""
    from safetensors.torch import save as to_bytes

    tensors, text = _encode(model, metadata)
    return len(to_bytes({PAYLOAD: _payload(tensors, text)},
                        metadata={FORMAT: json.dumps({"format": FORMAT, "format_version": 3}, separators=(",", ":"))}))


def read_stored(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The stored tensors (packed codes, fp16 statistics) and metadata of a bitdown file of any version, with
    only the container checked (header, format, version; version 3: the payload and its index); `read`
    checks the rest."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise BitdownFileError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except BitdownFileError:
        raise
    except Exception as e:  # safetensors raises its own error types for a bad header / short file
        raise BitdownFileError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    if FORMAT not in header:
        raise BitdownFileError(f"{path}: a safetensors file without bitdown metadata (not a bitdown file)")
    try:
        meta = json.loads(header[FORMAT])
    except (ValueError, RecursionError) as e:
        raise BitdownFileError(f"{path}: corrupt bitdown metadata: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BitdownFileError(f"{path}: metadata does not describe a bitdown file")
    try:
        _check_version(meta.get("format_version"))
        if meta["format_version"] >= 3:
            tensors, meta = _unpack(tensors, meta)
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise _Invalid("metadata does not describe a bitdown file")
    except _Invalid as e:
        raise BitdownFileError(f"{path}: {e}") from None
    return tensors, meta


def read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors (as stored: packed codes, fp16 statistics; `decode` gives the in-memory form) and
    metadata of a bitdown file, verified: container (`read_stored`), format and version, checksum, the
    metadata schema and every tensor. The returned metadata lists every LayerPlan field (the file omits those
    at their default), and its "size" gains two figures measured here, not stored: "paper_bytes" (the
    paper-style size, = "size_bytes") and "file_bytes" (this file's bytes on disk)."""
    path = Path(path)
    tensors, meta = read_stored(path)
    actual = checksum(tensors, meta)
    if actual != meta.get("checksum"):
        raise BitdownFileError(f"{path}: checksum mismatch: the tensors or metadata were modified or corrupted "
                               f"(stored {str(meta.get('checksum'))[:12]}…, computed {actual[:12]}…)")
    plans = check_metadata(meta, path)
    decode(tensors, meta, path, plans)
    meta["layers"] = [p.to_json() for p in plans]     # every field, those the file omits at their default too
    size = dict(meta.get("size", {}))
    if "size_bytes" in size:
        size.setdefault("paper_bytes", size["size_bytes"])
    size["file_bytes"] = path.stat().st_size
    meta["size"] = size
    return tensors, meta


def apply(model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Any = "file") -> nn.Module:
    """Turn `model` (the dense architecture) into the compressed model stored in (tensors, meta), as
    `read` returns them, in place. Everything is checked before the model is changed."""
    plans = check_metadata(meta, path)
    tensors = decode(tensors, meta, path, plans)
    modules = dict(model.named_modules())
    arch = meta["arch"]["name"]
    owner = {}                                         # layer -> the layer whose codebook it uses
    for members in share_groups(plans).values():
        first = share_owner([p.name for p in members])
        owner.update({p.name: first for p in members})
    for p in plans:                                    # every check first: a failed load changes nothing
        m = modules.get(p.name)
        if m is None:
            raise BitdownFileError(f"{path}: the model has no layer {p.name!r} (file is for architecture {arch!r})")
        if is_quantized(m):
            raise BitdownFileError(f"{path}: layer {p.name!r} of the model is already quantized")
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != tuple(p.weight_shape):
            shape = list(w.shape) if isinstance(w, torch.Tensor) else None
            raise BitdownFileError(f"{path}: layer {p.name!r} has weight shape {shape} in the model but "
                                   f"{list(p.weight_shape)} in the file (file is for architecture {arch!r})")
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for p in plans:
        if p.fp16:
            continue                                   # its weight, in fp16
        del own[f"{p.name}.weight"]
        own[f"{p.name}.codes"] = (p.weight_shape[0], p.n_subvectors // p.weight_shape[0])
        if p.scalar_bits:
            own[f"{p.name}.scale"] = own[f"{p.name}.zero"] = (p.weight_shape[0],)
            continue
        if owner.get(p.name, p.name) != p.name:
            continue                                   # its codebook is the owner's
        own[f"{p.name}.codebook"] = (p.n_centroids, p.block_size)
        if p.codebook_bits == 8:
            own[f"{p.name}.codebook_scale"] = (p.block_size,)
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    bad = [k for k in own if k in tensors and own[k] != tuple(tensors[k].shape)]
    if missing or unexpected or bad:
        raise BitdownFileError(f"{path}: the model does not match the file (architecture {arch!r}): "
                               f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {bad[:5]}")
    state = {k: v for k, v in tensors.items() if not k.endswith(".codebook_scale")}
    for p in plans:
        empty_like_plan(modules[p.name], p)
        if p.scalar_bits:
            state[f"{p.name}.scale"] = tensors[f"{p.name}.scale"].float()
        elif not p.fp16:                               # an fp16 layer's weight: fp32 already (decode)
            src = owner.get(p.name, p.name)
            state[f"{p.name}.codebook"] = decode_codebook(tensors[f"{src}.codebook"],
                                                          tensors.get(f"{src}.codebook_scale"))
    model.load_state_dict(state, strict=True)
    for name, src in owner.items():                    # tie: one Parameter per share group
        if name != src:
            modules[name].codebook = modules[src].codebook
    return model.eval()
