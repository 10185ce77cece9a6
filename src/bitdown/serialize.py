"""The compact file: one safetensors file, never unpickled.

Tensors: for every product-quantized layer `NAME.codebook` (K, d) fp16 (or int8 with a (d,) fp16
`NAME.codebook_scale` when the layer's codebook_bits is 8) and `NAME.codes` (C_out, nb) uint8
(int16 when K > 256); every other tensor of the state dict as it is (biases,
BatchNorm weight/bias *and* running statistics, uncompressed layers).
A codebook shared by several layers (LayerPlan.share) is stored once, under the group's first
layer in name order; the others have only their codes.
Metadata: one JSON string under the key "bitdown":

    {"format": "bitdown", "format_version": 1, "arch": {"name": ..., "source": "zoo"|"user"},
     "layers": [LayerPlan...], "skipped": {name: reason}, "config": {...}, "size": {...},
     "checksum": sha256 over (name, dtype, shape, bytes) of every tensor in name order, ...}

Loading verifies the header, the checksum (tampering, bit rot), and that the model matches the
file (layer names and weight shapes) before loading anything, and says which check failed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .config import LayerPlan, share_groups, share_owner
from .modules import decode_codebook, empty_pq_like, encode_codebook, is_pq

log = logging.getLogger(__name__)

FORMAT = "bitdown"
FORMAT_VERSION = 1


class BitdownFileError(ValueError):
    """A bitdown file is missing, truncated, tampered with, or does not match the model."""


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


def file_tensors(model: nn.Module, plans: list[LayerPlan] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the compact file: fp16 (or int8 + scale) codebooks, integer codes, everything
    else as is. A share group of `plans` (default: layers using one codebook Parameter) stores its
    codebook once; its layers must hold the same codebook values, else ValueError (never a file that
    loads as something else)."""
    out: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    bits = {name: m.codebook_bits for name, m in modules.items() if is_pq(m)}
    if plans is not None:
        groups = [[p.name for p in ms] for ms in share_groups(plans).values()]
    else:
        users: dict[int, list[str]] = {}      # a shared codebook Parameter -> the layers using it
        for name in bits:
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
    for key, t in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in borrowed and leaf == "codebook":
            continue                          # stored once, under the group's owner
        if prefix in bits and leaf == "codebook":
            t, scale = encode_codebook(t, bits[prefix])
            if scale is not None:
                out[f"{prefix}.codebook_scale"] = scale.cpu().contiguous()
        out[key] = t.detach().cpu().contiguous()
    return out


def save(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write the compact file atomically (a crash never leaves a half-written file at `path`).

    `metadata` defaults to `model.bitdown.metadata()` as set by `bitdown.compress`."""
    from safetensors.torch import save_file

    if metadata is None:
        info = getattr(model, "bitdown", None)
        if info is None:
            raise ValueError("model has no bitdown metadata: compress it with bitdown.compress, or pass metadata=")
        metadata = info.metadata(model)
    if not any(is_pq(m) for m in model.modules()):
        raise ValueError("model has no product-quantized layer to save")
    try:
        plans = [LayerPlan.from_json(p) for p in metadata.get("layers", [])] or None
    except (TypeError, KeyError) as e:
        raise ValueError(f"metadata has a corrupt layer list: {e}") from None
    tensors = file_tensors(model, plans)
    meta = dict(metadata, format=FORMAT, format_version=FORMAT_VERSION)
    meta = json.loads(json.dumps(meta))               # canonical JSON types, as read() will see them
    meta["checksum"] = checksum(tensors, meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={FORMAT: json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a bitdown file, verified (header, format, checksum)."""
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
    except json.JSONDecodeError as e:
        raise BitdownFileError(f"{path}: corrupt bitdown metadata: {e}") from None
    if meta.get("format") != FORMAT or not isinstance(meta.get("format_version"), int):
        raise BitdownFileError(f"{path}: metadata does not describe a bitdown file")
    if meta["format_version"] > FORMAT_VERSION:
        raise BitdownFileError(f"{path}: format version {meta['format_version']} is newer than this "
                               f"bitdown supports ({FORMAT_VERSION}); upgrade bitdown")
    actual = checksum(tensors, meta)
    if actual != meta.get("checksum"):
        raise BitdownFileError(f"{path}: checksum mismatch: the tensors or metadata were modified or corrupted "
                               f"(stored {str(meta.get('checksum'))[:12]}…, computed {actual[:12]}…)")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise BitdownFileError(f"{path}: metadata lacks {missing}")
    return tensors, meta


REQUIRED = ("arch", "layers", "config")


def apply(model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Any = "file") -> nn.Module:
    """Turn `model` (the dense architecture) into the compressed model stored in (tensors, meta), in place."""
    try:
        plans = [LayerPlan.from_json(p) for p in meta["layers"]]
    except (TypeError, KeyError) as e:
        raise BitdownFileError(f"{path}: corrupt layer list in the metadata: {e}") from None
    modules = dict(model.named_modules())
    arch = meta.get("arch", {}).get("name", "?")
    owner = {}                                         # layer -> the layer whose codebook it uses
    for g, members in share_groups(plans).items():
        first = share_owner([p.name for p in members])
        for key in ("block_size", "n_centroids", "codebook_bits"):
            if len({getattr(p, key) for p in members}) > 1:
                raise BitdownFileError(f"{path}: share group {g!r} has layers with different {key}")
        owner.update({p.name: first for p in members})
    for p in plans:                                    # every check first: a failed load changes nothing
        if p.codebook_bits not in (8, 16):
            raise BitdownFileError(f"{path}: layer {p.name!r} has an unknown codebook_bits {p.codebook_bits!r}")
        m = modules.get(p.name)
        if m is None:
            raise BitdownFileError(f"{path}: the model has no layer {p.name!r} (file is for architecture {arch!r})")
        if is_pq(m):
            raise BitdownFileError(f"{path}: layer {p.name!r} of the model is already quantized")
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != tuple(p.weight_shape):
            shape = list(w.shape) if isinstance(w, torch.Tensor) else None
            raise BitdownFileError(f"{path}: layer {p.name!r} has weight shape {shape} in the model but "
                                   f"{list(p.weight_shape)} in the file (file is for architecture {arch!r})")
        src = owner.get(p.name, p.name)
        cb, codes = tensors.get(f"{src}.codebook"), tensors.get(f"{p.name}.codes")
        if cb is None or codes is None or tuple(cb.shape) != (p.n_centroids, p.block_size):
            raise BitdownFileError(f"{path}: codebook/codes of {p.name!r} missing or of the wrong shape")
        want = torch.int8 if p.codebook_bits == 8 else torch.float16
        scale = tensors.get(f"{src}.codebook_scale")
        if cb.dtype != want or (p.codebook_bits == 8) != (scale is not None) or (
                scale is not None and (scale.dtype != torch.float16 or tuple(scale.shape) != (p.block_size,))):
            raise BitdownFileError(f"{path}: codebook of {p.name!r} is not stored as the metadata says "
                                   f"({p.codebook_bits}-bit codebook, found {cb.dtype} with scale "
                                   f"{None if scale is None else (scale.dtype, list(scale.shape))})")
        if codes.numel() and int(codes.long().max()) >= p.n_centroids:
            raise BitdownFileError(f"{path}: codes of {p.name!r} out of range for {p.n_centroids} centroids")
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for p in plans:
        del own[f"{p.name}.weight"]
        own[f"{p.name}.codes"] = (p.weight_shape[0], p.n_subvectors // p.weight_shape[0])
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
        src = owner.get(p.name, p.name)
        empty_pq_like(modules[p.name], p.n_centroids, p.block_size, p.codebook_bits)
        state[f"{p.name}.codebook"] = decode_codebook(tensors[f"{src}.codebook"], tensors.get(f"{src}.codebook_scale"))
    model.load_state_dict(state, strict=True)
    for name, src in owner.items():                    # tie: one Parameter per share group
        if name != src:
            modules[name].codebook = modules[src].codebook
    return model.eval()
