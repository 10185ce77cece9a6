"""Baselines a user would otherwise pick, for benchmarks: per-channel uniform scalar quantization
(round to nearest, symmetric, one fp32 scale per output channel) of the same layers bitdown
quantizes. Weight-space product quantization (fairseq iPQ's objective) is EMConfig(objective='weights').
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import LayerPlan


@torch.no_grad()
def scalar_quantize_(model: nn.Module, names: list[str], bits: int) -> None:
    """Round every weight of the named layers to `bits`-bit symmetric per-output-channel levels, in place."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    modules = dict(model.named_modules())
    qmax = 2 ** (bits - 1) - 1
    for name in names:
        w = modules[name].weight                                          # (C_out, ...)
        scale = w.abs().reshape(w.shape[0], -1).amax(1).clamp_min(1e-12) / qmax   # (C_out,)
        s = scale.reshape(-1, *([1] * (w.dim() - 1)))
        w.copy_((w / s).round().clamp(-qmax, qmax) * s)


def scalar_size_bytes(model: nn.Module, plans: list[LayerPlan], bits: int) -> tuple[float, float]:
    """(paper-style bytes, fp32 bytes): quantized weights at `bits` bits plus an fp32 scale per
    output channel; every other parameter fp32 (BatchNorm running statistics not counted)."""
    quantized = {f"{p.name}.weight" for p in plans}
    other = sum(p.numel() for n, p in model.named_parameters() if n not in quantized) * 4
    q = sum(p.n_subvectors * p.block_size * bits / 8 + p.weight_shape[0] * 4 for p in plans)
    dense = other + sum(p.n_subvectors * p.block_size * 4 for p in plans)
    return other + q, dense
