"""Output-mean correction after a layer is quantized (EMConfig.mean_correction).

The EM minimises ||X (W* - W_hat)^T||^2, which leaves a per-channel *mean* error in the layer's outputs:

    delta = mean(X) W_hat^T - mean(T) W^T        (C_out,)

(X: the layer's inputs in the compressed network, T: the same images' inputs in the uncompressed one
when teacher targets are on, else T = X; the means are over all calibration rows, from the column sums
StatsCollector keeps with the full Gram). A mean shift is free to undo: the running mean of a
BatchNorm fed directly by the layer absorbs it (running_mean += delta), otherwise the layer's bias
(bias -= delta). A layer with neither is left as it is. A BatchNorm re-estimation afterwards (QuantConfig
.bn_recalibrate, on by default only without teacher targets) replaces the corrected running means; the
correction then only shaped the statistics of the layers quantized after it. Nothing is added to the file: the corrected
running mean / bias are tensors it stores anyway. Cf. "bias correction", Nagel et al. 2019 (DFQ).

The same conv -> BatchNorm pairs (`following_batchnorm`) give each output channel's post-BN error weight
(`bn_gains`, EMConfig.channel_weighting='bn'): the BN maps y_o to gamma_o (y_o - mu_o) / sqrt(var_o + eps) +
beta_o, so an error e_o of the conv output becomes an error gamma_o e_o / sqrt(var_o + eps) after it.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from .stats import LayerStats

log = logging.getLogger(__name__)


def following_batchnorm(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, str]:
    """{layer name: name of the BatchNorm whose input *is* that layer's output tensor, unchanged}, found
    with one forward of `x` (a small batch). A layer whose output passes through anything first (a ReLU,
    in place or not) is not listed. A layer whose output feeds the BatchNorm *and* another consumer (a
    skip path) is listed: only the BatchNorm path is corrected."""
    modules = dict(model.named_modules())
    outputs: dict[int, tuple[str, torch.Tensor, int]] = {}    # id -> (layer, output kept alive, its version)
    found: dict[str, str] = {}
    handles = []

    def after_layer(name):
        def hook(_m, _inp, out) -> None:
            outputs[id(out)] = (name, out, out._version)
        return hook

    def before_bn(name):
        def hook(_m, inputs) -> None:
            x = inputs[0]
            hit = outputs.get(id(x))
            # the same tensor, not changed in place since (an in-place ReLU / scale keeps the object)
            if hit is not None and hit[1] is x and x._version == hit[2]:
                found.setdefault(hit[0], name)
        return hook

    try:
        for n in names:
            handles.append(modules[n].register_forward_hook(after_layer(n)))
        for n, m in modules.items():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                handles.append(m.register_forward_pre_hook(before_bn(n)))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(x)
        finally:
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return found


def bn_gain(bn: nn.Module, floor: float = 1e-6) -> torch.Tensor | None:
    """(gamma_c / sqrt(running_var_c + eps))^2 per channel of a BatchNorm in eval mode, float64, floored at
    `floor` x its mean (a channel with gamma = 0 still gets a positive weight); None without running
    statistics (the BN then normalises by each batch's own statistics)."""
    var = getattr(bn, "running_var", None)
    if var is None:
        return None
    gain = 1.0 / (var.detach().double().cpu() + bn.eps)                                  # (C,)
    if getattr(bn, "weight", None) is not None:
        gain = gain * bn.weight.detach().double().cpu().pow(2)
    return gain.clamp_min(floor * float(gain.mean()) + 1e-30)


def bn_gains(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """{layer name: its bn_gain (C_out,)} for the layers of `names` that feed a BatchNorm directly
    (`following_batchnorm`, one forward of the small batch `x`); the others are absent (weight 1)."""
    modules = dict(model.named_modules())
    pairs = following_batchnorm(model, x, names)
    gains = {n: bn_gain(modules[b]) for n, b in pairs.items()}
    return {n: g for n, g in gains.items() if g is not None}


def output_mean_shift(stats: LayerStats, weight_q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """delta = mean(X) W_hat^T - mean(T) W^T, (C_out,) float64 (T = X without teacher statistics)."""
    return _shift_and_reference(stats, weight_q, weight)[0]


def _shift_and_reference(stats: LayerStats, weight_q: torch.Tensor, weight: torch.Tensor,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta, mean(T) W^T), both (C_out,) float64."""
    ref = stats.output_mean(weight, reference=stats.ref_sum is not None)
    return stats.output_mean(weight_q) - ref, ref


def correct_layer_mean(stats: LayerStats, module: nn.Module, bn: nn.Module | None, weight: torch.Tensor,
                       ) -> dict[str, float | str]:
    """Measure the shift of the quantized `module`'s output mean against `weight`'s (the teacher's) and
    undo it (correct_mean). Returns {'mean_shift': |delta| / |reference mean|, 'mean_corrected_in': where}."""
    delta, ref = _shift_and_reference(stats, module.weight.detach().cpu(), weight.detach().cpu())  # (C_out,)
    return {"mean_shift": float(delta.norm() / ref.norm().clamp_min(1e-12)),
            "mean_corrected_in": correct_mean(module, bn, delta)}


@torch.no_grad()
def correct_mean(module: nn.Module, bn: nn.Module | None, delta: torch.Tensor) -> str:
    """Undo the output mean shift `delta` through `bn`'s running mean, else `module`'s bias.
    Returns where it went: 'batchnorm', 'bias' or 'none'."""
    if bn is not None and getattr(bn, "running_mean", None) is not None:
        bn.running_mean += delta.to(bn.running_mean)
        return "batchnorm"
    if getattr(module, "bias", None) is not None:
        module.bias -= delta.to(module.bias)
        return "bias"
    return "none"
