"""Export a compressed model to ONNX with its codebooks and codes kept compact.

Each product-quantized layer's weight is computed inside the graph from what the .bitdown file
stores, so the .onnx file is about as small as the .bitdown file:

    weight = Reshape(Gather(Cast<float>(codebook_fp16), Cast<int64>(codes_uint8)))          (fp16 codebooks)
    weight = Reshape(Gather(Cast<float>(codebook_int8) * Cast<float>(scale_fp16), ...))    (int8 codebooks)

and likewise for the other layers bitdown compresses (scalar.py):

    weight = Reshape(Cast<float>(scale_fp16) * (Cast<float>(codes_uint8) - Cast<float>(zero_uint8)))  (scalar codes)
    weight = Cast<float>(weight_fp16)                                                        (fp16-kept layers)

then the layer's own Conv / Gemm. onnxruntime constant-folds this into dense weights when it builds a
session, so inference runs at dense speed. The TorchScript exporter is used with constant folding
off: the torch.export-based one folds the gather at export time and writes dense fp32 weights.
After writing, the file is checked against the PyTorch model with onnxruntime when it is installed
(non-finite outputs on either side count as a disagreement). The codes stay uint8 (int16 for K > 256)
in the graph, scalar codes and zero points uint8 too (ONNX has no 2- or 3-bit type): they come from the
model in memory, where `bitdown.load` has unpacked the file's bit-packed codes (format version 2 and later).
"""
from __future__ import annotations

import contextlib
import copy
import os
import logging
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from .frozen import refuse_frozen
from .modules import encode_codebook, is_pq
from .scalar import is_fp16, is_quantized, is_scalar

log = logging.getLogger(__name__)

OPSET = 17


_HALF_EXPORT: dict[type, type] = {}


def _half_export_class(cls: type) -> type:
    """`cls` (an fp16-kept layer class) with `weight` decoded from its fp16 buffer `export_weight16`."""
    if cls not in _HALF_EXPORT:
        _HALF_EXPORT[cls] = type(f"Export{cls.__name__}", (cls,), {
            "__module__": __name__, "weight": property(lambda self: self._buffers["export_weight16"].float())})
    return _HALF_EXPORT[cls]


@contextlib.contextmanager
def _stored_codebooks(model: nn.Module) -> Iterator[None]:
    """Inside the block every PQ layer decodes its weight from its stored (fp16 / int8 + scale) codebook
    (a codebook shared by several layers is stored once: one tensor, one initializer), every scalar layer
    from its fp16 scales, and every fp16-kept layer from its fp16 weight."""
    stored: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    layers = [m for m in model.modules() if is_pq(m)]
    scalars = [m for m in model.modules() if is_scalar(m)]
    halves: list[tuple[nn.Module, type, nn.Parameter]] = []
    try:
        for m in layers:
            key = id(m.codebook)
            if key not in stored:
                stored[key] = encode_codebook(m.codebook, m.codebook_bits)
            m.register_buffer("export_codebook", stored[key][0])
            m.register_buffer("export_scale", stored[key][1])
        for m in scalars:
            m.register_buffer("export_scale", m.scale.detach().half())
        for m in model.modules():
            if is_fp16(m):
                halves.append((m, type(m), m._parameters.pop("weight")))
                m.__class__ = _half_export_class(type(m))
                m.register_buffer("export_weight16", halves[-1][2].detach().half())
        yield
    finally:
        for m in layers + scalars:
            m._buffers.pop("export_codebook", None)
            m._buffers.pop("export_scale", None)
        for m, cls, w in halves:
            m._buffers.pop("export_weight16", None)
            m.__class__ = cls
            m._parameters["weight"] = w


def export_onnx(model: nn.Module, path: str | Path, input_shape: Sequence[int], *, opset: int = OPSET,
                dynamic_batch: bool = True, check: bool = True, atol: float = 1e-4) -> Path:
    """Write `model` (compressed by bitdown) as ONNX to `path`; returns the path.

    input_shape: one example input's shape, e.g. (1, 3, 224, 224) (the batch axis is dynamic unless
    `dynamic_batch=False`). With `check`, onnxruntime (when installed) runs the file on a seeded random
    input and its outputs must match the PyTorch model's within `atol` (relative to their scale)."""
    refuse_frozen(model, "export the codes of")
    if not any(is_quantized(m) for m in model.modules()):
        raise ValueError("the model has no product-quantized layer (nor a scalar or fp16 one): compress it "
                         "(or bitdown.load a file) first")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be (batch, ...) with positive sizes, got {list(input_shape)}")
    model = copy.deepcopy(model).cpu().eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    from .serialize import new_file_mode, output_target

    path = output_target(path)            # through a symlink; a directory or device is refused
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with _stored_codebooks(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")          # the TorchScript exporter's deprecation notices
            torch.onnx.export(model, (x,), str(tmp), dynamo=False, do_constant_folding=False, opset_version=opset,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None)
        if check:
            _check(model, tmp, x, atol)
        os.chmod(tmp, new_file_mode(path))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %s (%d bytes)", path, path.stat().st_size)
    return path


def _check(model: nn.Module, path: Path, x: torch.Tensor, atol: float) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        log.warning("onnxruntime is not installed: the ONNX file was not checked against the model")
        return
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x)
    if not isinstance(want, torch.Tensor):
        raise TypeError("export_onnx checks models with one tensor output; pass check=False for others")
    want = want.numpy()
    if got.shape != want.shape:
        raise ValueError(f"the exported ONNX model disagrees with the PyTorch model (output shape {list(got.shape)} "
                         f"vs {list(want.shape)}); the file was not written")
    if not (np.isfinite(got).all() and np.isfinite(want).all()):   # NaN compares false: check explicitly
        raise ValueError(f"the exported ONNX model or the PyTorch model gives NaN/inf outputs (ONNX: "
                         f"{int((~np.isfinite(got)).sum())}, PyTorch: {int((~np.isfinite(want)).sum())} non-finite "
                         f"values) on the check input; the file was not written")
    scale = max(float(np.abs(want).max(initial=0.0)), 1.0)
    err = float(np.abs(got - want).max(initial=0.0))
    if not err <= atol * scale:
        raise ValueError(f"the exported ONNX model disagrees with the PyTorch model (max abs difference {err:.3g}, "
                         f"output scale {scale:.3g}); the file was not written")
