"""Compress to a size budget: per-layer block size and number of centroids chosen by rate-distortion.

For every quantizable layer l and every option o = (d, K) (d a sensible divisor of the row length,
K a power of two within the paper's clamp) we know the exact paper-style cost in bytes,

    R_l(o) = n_subvectors * log2(K) / 8 + K * d * 2        (indices + fp16 codebook;
                                                            K * d + 2 * d with int8 codebooks)

and measure the distortion D_l(o) = ||X(W - W_hat)||^2 / ||X W||^2, the layer's relative output
error on the calibration inputs, with the fast pooled EM and the exact full-Gram objective (one
pass of the teacher collects every layer's full Gram; the block Grams of any d are its diagonal
blocks). The allocation minimises sum_l D_l (or sum_l s_l D_l with `alloc_weighting="sensitivity"`,
s_l measured by `layer_sensitivity`) subject to sum_l R_l + other <= budget by a
Lagrangian search (each layer picks argmin D + lambda R; lambda bisected), then spends what is
left greedily by best distortion decrease per byte.

One more option per layer is to keep it uncompressed (fp32, distortion 0; `block_size` 0 in the
report): tiny layers, e.g. the first depthwise convs of a mobile network whose few kernels would
get only 2-4 codewords under the paper's clamp, cost less kept than the damage they do quantized.

A richer menu (issue 13 item 4; `extra` below, EXTRA_OPTIONS by default): per-output-channel scalar
codes (scalar.py) at 8, 4 or 2 bits, costing b bits per weight plus an fp16 scale and a b-bit zero point
per channel, and keeping the layer in fp16 (16 bits per weight); their distortion is the same exact
relative output error under the layer's full Gram, measured, like the PQ options, with the fast
quantizer (round to nearest on the clip-searched grid; `scalar_feedback=True`: GPTQ error feedback, as
compress quantizes them). Depthwise and other tiny layers, whose PQ options have 2-4 codewords, are
where they pay. In the report they carry "scalar_bits" / "fp16" (absent for PQ and fp32 choices), and
`apply_allocation` turns them into name overrides {"scalar_bits": b} / {"fp16": true}.

Budgets smaller than the smallest achievable size are refused before any statistics are gathered.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .config import (SCALAR_BITS, EMConfig, LayerPlan, QuantConfig, check_sensitivity_loss, clamp_centroids,
                     resolve_plan)
from .em import assign_pooled, exact_objective, kmeans
from .meancorrect import bn_gains
from .modules import module_device
from .scalar import quantize_fp16, quantize_scalar
from .size import MB, codebook_bytes, fp16_bytes, scalar_bytes
from .stats import collect_stats

log = logging.getLogger(__name__)

BLOCK_SIZES = (4, 8, 9, 16, 18, 32, 36)
CENTROIDS = tuple(2 ** i for i in range(1, 12))     # 2 ... 2048
RICH_MENU = ("int8", "int4", "int2", "fp16")         # the options beyond PQ a layer may get (any of int2/3/4/8, fp16)
# The options beyond PQ (and fp32) that the allocator offers by default: set to RICH_MENU once compress.py
# quantizes scalar / fp16 plans and config.resolve_layer honours the "scalar_bits" / "fp16" overrides;
# until then an allocation choosing them could not be realised.
EXTRA_OPTIONS: tuple[str, ...] = ()


@dataclass(frozen=True)
class Option:
    block_size: int                 # 0: keep the layer uncompressed (fp32); 1: scalar codes or fp16
    n_centroids: int                # 2**scalar_bits for scalar codes, 1 for fp16
    bytes: float
    distortion: float = math.nan
    scalar_bits: int = 0            # per-output-channel scalar codes of this many bits (0: not)
    fp16: bool = False              # the layer kept in fp16

    @property
    def keep(self) -> bool:
        return self.block_size == 0

    @property
    def key(self) -> tuple[int, int, int, bool]:
        """What identifies the option among a layer's (its cost and distortion aside)."""
        return self.block_size, self.n_centroids, self.scalar_bits, self.fp16

    @property
    def quantizer(self) -> str:
        """'pq', 'int8' ... 'int2', 'fp16' or 'fp32' (kept)."""
        return ("fp32" if self.keep else "fp16" if self.fp16 else f"int{self.scalar_bits}" if self.scalar_bits
                else "pq")


def parse_size(text: str) -> float:
    """'100KB' | '1.5MB' | '2048' (bytes) -> bytes, with KB = 2**10 and MB = 2**20 as the paper."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(B|KB|KIB|MB|MIB)?\s*", text.upper())
    if not m:
        raise ValueError(f"cannot parse size {text!r}: use e.g. 100KB or 1.5MB")
    unit = {"B": 1, None: 1, "KB": 1 << 10, "KIB": 1 << 10, "MB": 1 << 20, "MIB": 1 << 20}[m.group(2)]
    return float(m.group(1)) * unit


def layer_options(plan: LayerPlan, kernel_area: int) -> list[Option]:
    """Every (d, K) worth trying for a layer, with its paper-style byte cost."""
    row = plan.row_length
    sizes = sorted({d for d in BLOCK_SIZES + (kernel_area, 2 * kernel_area) if d <= row and row % d == 0})
    out = []
    n_weights = math.prod(plan.weight_shape)
    for d in sizes:
        n_sub = n_weights // d
        kmax = clamp_centroids(CENTROIDS[-1], n_sub)
        for k in CENTROIDS:
            if k <= kmax:
                out.append(Option(d, k, n_sub * math.log2(k) / 8 + codebook_bytes(k, d, plan.codebook_bits)))
    out.append(Option(0, 0, n_weights * 4, 0.0))                           # kept in fp32
    return out


def _extra(extra: Sequence[str] | None) -> tuple[str, ...]:
    extra = EXTRA_OPTIONS if extra is None else tuple(extra)
    bad = [e for e in extra if not (e == "fp16" or e.startswith("int") and e[3:].isdigit()
                                    and int(e[3:]) in SCALAR_BITS)]
    if bad:
        raise ValueError(f"unknown option(s) {bad}: use fp16 or int{{b}} with b in {SCALAR_BITS}")
    return extra


def scalar_options(plan: LayerPlan, extra: Sequence[str] | None = None) -> list[Option]:
    """The options beyond PQ for a layer ('int8', 'int4', ..., 'fp16' in `extra`; default EXTRA_OPTIONS),
    with their byte cost (size.py's rule)."""
    n_weights = math.prod(plan.weight_shape)
    out = []
    for e in _extra(extra):
        if e == "fp16":
            out.append(Option(1, 1, fp16_bytes(n_weights), fp16=True))
        else:
            b = int(e[3:])
            out.append(Option(1, 1 << b, sum(scalar_bytes(n_weights, plan.weight_shape[0], b)), scalar_bits=b))
    return out


def menu(plan: LayerPlan, kernel_area: int, extra: Sequence[str] | None = None) -> list[Option]:
    """A layer's whole rate-distortion menu: its PQ options, fp32, and `extra` (default EXTRA_OPTIONS)."""
    return layer_options(plan, kernel_area) + scalar_options(plan, extra)


def _other_bytes(model: nn.Module, plans: list[LayerPlan]) -> float:
    quantized = {f"{p.name}.weight" for p in plans}
    return sum(p.numel() for n, p in model.named_parameters() if n not in quantized) * 4


def size_bounds(model: nn.Module, plans: list[LayerPlan], extra: Sequence[str] | None = None,
                ) -> tuple[float, float, float]:
    """(smallest achievable, fp32 total, non-quantized) bytes for these layers."""
    modules = dict(model.named_modules())
    other = _other_bytes(model, plans)
    smallest = other + sum(min(o.bytes for o in menu(p, _kernel_area(modules[p.name]), extra)) for p in plans)
    dense = other + sum(math.prod(p.weight_shape) * 4 for p in plans)
    return smallest, dense, other


def _kernel_area(module: nn.Module) -> int:
    return math.prod(module.kernel_size) if isinstance(module, nn.Conv2d) else 1


def budget_bytes(model: nn.Module, plans: list[LayerPlan], target_ratio: float | None = None,
                 target_size: str | float | None = None, extra: Sequence[str] | None = None) -> float:
    """The budget in bytes; raises ValueError (naming the smallest achievable size) when unsatisfiable."""
    if (target_ratio is None) == (target_size is None):
        raise ValueError("give exactly one of target_ratio and target_size")
    if any(p.share is not None for p in plans):
        raise ValueError("shared codebooks (share overrides / share_same_shape) cannot be combined with a "
                         "target size yet: the allocator prices every layer's codebook separately")
    smallest, dense, _ = size_bounds(model, plans, extra)
    if target_ratio is not None:
        if not (math.isfinite(target_ratio) and target_ratio > 1):
            raise ValueError(f"target_ratio must be a finite number > 1, got {target_ratio}")
        budget = dense / target_ratio
    else:
        budget = parse_size(target_size) if isinstance(target_size, str) else float(target_size)
        if not (math.isfinite(budget) and budget > 0):
            raise ValueError(f"target_size must be a finite size > 0, got {target_size!r}")
    if budget < smallest:
        raise ValueError(f"budget {budget / MB:.6f} MB ({budget:.0f} B, {dense / budget:.2f}x) is unsatisfiable: "
                         f"the smallest achievable size is {smallest / MB:.6f} MB ({smallest:.0f} B, "
                         f"{dense / smallest:.2f}x) with every layer at its cheapest option; "
                         f"the uncompressed remainder alone is {_other_bytes(model, plans):.0f} B")
    return budget


def check_budget(model: nn.Module, config: QuantConfig, target_ratio: float | None = None,
                 target_size: str | float | None = None, extra: Sequence[str] | None = None) -> float:
    """`budget_bytes` for `model` under `config`: refuses an impossible budget before any data is read."""
    return budget_bytes(model, resolve_plan(model, config)[0], target_ratio, target_size, extra)


def budget_ratio(model: nn.Module, config: QuantConfig, target_ratio: float | None = None,
                 target_size: str | float | None = None, extra: Sequence[str] | None = None) -> float:
    """The compression ratio a budget asks for (paper-style dense bytes / budget bytes: `target_ratio` itself, or
    what `target_size` means for `model`); refuses an impossible budget as `check_budget` does."""
    plans = resolve_plan(model, config)[0]
    return size_bounds(model, plans, extra)[1] / budget_bytes(model, plans, target_ratio, target_size, extra)


def alloc_em(em: EMConfig) -> EMConfig:
    """The fast EM of the rate-distortion sweep (the paper's pooled EM, 10 iterations), with `em`'s
    post-BatchNorm channel weighting ('bn'; the 'variance' weighting is the compression EM's only)."""
    return EMConfig.paper(n_iter=10, channel_weighting="bn" if em.channel_weighting == "bn" else "none")


_RD_TABLES: dict[str, dict[str, list[Option]]] = {}   # fingerprint of the inputs -> table (this process)
_SENSITIVITIES: dict[str, dict[str, float]] = {}  # the same for layer_sensitivity
_RD_KEEP = 4


def measure_options(model: nn.Module, plans: list[LayerPlan], batches: Iterable[torch.Tensor],
                    em: EMConfig | None = None, seed: int = 0, progress: bool = True,
                    extra: Sequence[str] | None = None, scalar_feedback: bool = False) -> dict[str, list[Option]]:
    """Distortion of every option of every layer, from one pass of `model` (the teacher).

    Each option's codebook is learned by the pooled EM on at most max(16 K, 4096) subvectors (whole
    output rows drawn at random, seeded), then every subvector is assigned and the exact relative output
    error measured: big layers (EfficientNet's 1x1 convs, K up to 2048) cost seconds, not minutes.
    The options of `extra` (default EXTRA_OPTIONS: scalar codes, fp16) are measured on the same full Gram:
    scalar codes rounded to nearest on their clip-searched grid (`scalar_feedback`: with GPTQ feedback).
    The table depends on the model, plans, images, EM and seed only, not on the budget: the last few
    are kept in this process, so a sweep over budgets measures it once."""
    em = em or alloc_em(EMConfig())
    extra = _extra(extra)
    batches = list(batches)
    key = _inputs_key(model, plans, batches, dataclasses.asdict(em), seed,
                      *([list(extra), scalar_feedback] if extra else []))
    if key in _RD_TABLES:
        log.info("rate-distortion table reused (same model, layers, images, EM and seed)")
        return {n: list(v) for n, v in _RD_TABLES[key].items()}
    table = _measure_options(model, plans, batches, em, seed, progress, extra, scalar_feedback)
    _remember(_RD_TABLES, key, table)
    return {n: list(v) for n, v in table.items()}


def _inputs_key(model: nn.Module, plans: list[LayerPlan], batches: list[torch.Tensor], *settings) -> str:
    """Fingerprint of what a per-process table of the allocator depends on: the model (weights, mode, device),
    the layers, the images and `settings`."""
    from .checkpoint import fingerprint

    return fingerprint(type(model).__qualname__, repr(model), model.training, str(module_device(model)),
                       {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
                       [p.to_json() for p in plans], {str(i): b for i, b in enumerate(batches)}, *settings)


def _remember(cache: dict, key: str, value) -> None:
    cache[key] = value
    while len(cache) > _RD_KEEP:
        cache.pop(next(iter(cache)))


def _measure_options(model: nn.Module, plans: list[LayerPlan], batches: list[torch.Tensor], em: EMConfig,
                     seed: int, progress: bool, extra: tuple[str, ...] = (), scalar_feedback: bool = False,
                     ) -> dict[str, list[Option]]:
    modules = dict(model.named_modules())
    stats = collect_stats(model, {p.name: (modules[p.name], 1) for p in plans}, batches, full_gram=True)
    gains = _row_gains(model, plans, batches, em)
    out: dict[str, list[Option]] = {}
    for p in tqdm(plans, desc="rate-distortion", unit="layer", disable=not progress):
        module, full = modules[p.name], stats[p.name].full_gram               # (g, R, R)
        w = module.weight.detach().cpu()
        lam = gains.get(p.name)                                             # (C_out,) post-BN weights, or None

        def distortion(w_hat: torch.Tensor) -> float:
            err, energy = exact_objective(w, w_hat, full, lam)
            return err / energy if energy > 0 else 0.0
        opts = [o if o.keep else dataclasses.replace(o, distortion=distortion(
                    quantize_option(w, full, o, em, seed, lam, scalar_feedback)))
                for o in layer_options(p, _kernel_area(module)) + scalar_options(p, extra)]
        out[p.name] = opts
    return out


def _row_gains(model: nn.Module, plans: list[LayerPlan], batches: list[torch.Tensor],
               em: EMConfig) -> dict[str, torch.Tensor]:
    """The post-BN row weights the allocator's quantizer uses with em.channel_weighting 'bn' (else none)."""
    if em.channel_weighting != "bn":
        return {}
    return bn_gains(model, batches[0][:2].to(module_device(model)), [p.name for p in plans])


def quantize_option(w: torch.Tensor, full: torch.Tensor, o: Option, em: EMConfig, seed: int = 0,
                    lam: torch.Tensor | None = None, scalar_feedback: bool = False) -> torch.Tensor:
    """The allocator's fast quantization of weight `w` under option `o` (not `o.keep`), given the layer's full
    input Gram `full` (g, R, R) and optional post-BN row weights `lam` (C_out,): a PQ option's codebook is learned
    by the pooled EM on at most max(16 K, 4096) subvectors (whole output rows drawn at random, seeded), then every
    subvector is assigned; scalar codes are rounded to nearest on their clip-searched grid (`scalar_feedback`:
    with GPTQ feedback); fp16 is the weight in fp16. Returns W_hat, float32, shaped as `w`."""
    if o.fp16:
        return quantize_fp16(w, full).weight16.float()
    if o.scalar_bits:
        return quantize_scalar(w, full, o.scalar_bits, em.damp, feedback=scalar_feedback).weight(tuple(w.shape))
    g, r, _ = full.shape
    nb = r // o.block_size
    idx = torch.arange(r).view(nb, o.block_size)                            # (nb, d)
    block_grams = full[:, idx[:, :, None], idx[:, None, :]]                 # (g, nb, d, d)
    pooled = block_grams.sum(dim=0, keepdim=True)                           # (1, nb, d, d)
    rows = w.reshape(w.shape[0], -1)                                        # (C_out, R)
    sel = torch.arange(rows.shape[0])
    cap = max(1, max(16 * o.n_centroids, 4096) // nb)                       # rows to learn the codebook on
    if rows.shape[0] > cap:
        gen = torch.Generator().manual_seed(seed * 7919 + o.block_size * 4099 + o.n_centroids)
        sel = torch.randperm(rows.shape[0], generator=gen)[:cap].sort().values
    res = kmeans(rows[sel], pooled, o.n_centroids, em, seed=seed, row_weights=None if lam is None else lam[sel])
    codes = assign_pooled(w, pooled.sum(dim=(0, 1)), res.codebook)          # (C_out, nb)
    return res.codebook[codes].reshape(w.shape)


@torch.no_grad()
def layer_sensitivity(model: nn.Module, plans: list[LayerPlan], batches: list[torch.Tensor], eps: float = 0.1,
                      n_images: int = 64, seed: int = 0, progress: bool = True, loss: str = "mse",
                      norm: str = "sum") -> dict[str, float]:
    """How much each layer's relative output error reaches the network's output:

        s_l = L(f(x; y_l + n), f(x)) / eps^2,   n ~ N(0, eps^2 mean(y_l^2)),

    L = finetune.distill_loss under `loss`: 'kl' KL(softmax f(x) || softmax f(x; y_l + n)) for class logits (N, C)
    (an error counts by what it does to the predicted distribution, not to the 1,000 logits' energy); 'mse' the
    normalised E||f(x; y_l + n) - f(x)||^2 / E||f(x)||^2
    (summed over the output's tensors when it has several, e.g. a detector's three head maps: the same
    normalisation as the distillation loss); 'bce' the Bernoulli KL between sigmoid(f(x)) and sigmoid of the
    noisy output (every element read through a sigmoid, as a YOLO head's decode reads its maps: an error
    counts by what it does to the decoded objectness / class probabilities and box offsets, not by its share
    of the maps' energy, which the background's very negative logits dominate),

    with `norm` 'sum' each tensor's term summed over its elements (per image), 'level' ('bce' only) averaged over
    them: a detector's levels then count alike (summed, the P3 map, 4x the cells of P4 and 16x those of P5,
    decides; the P5 path's layers look insensitive and are starved of bytes),

    white noise of relative energy eps^2 added to layer l's output y_l (its quantization error is an
    output error of that size: D_l = ||X(W - W_hat)||^2 / ||XW||^2), on `n_images` calibration images,
    seeded. One forward pass per layer (the last few results are kept in this process). Weighting D_l by s_l makes the allocation minimise (to first
    order) the error of the network's outputs rather than the plain sum of layer errors, which starves
    the big layers of compact networks whose errors compound."""
    check_sensitivity_loss(loss, "loss", norm, "norm")
    batches = list(batches)
    key = _inputs_key(model, plans, batches, eps, n_images, seed, loss, *([norm] if norm != "sum" else []))
    if key not in _SENSITIVITIES:           # a sweep over budgets measures them once
        _remember(_SENSITIVITIES, key, _layer_sensitivity(model, plans, batches, eps, n_images, seed, progress, loss,
                                                          norm))
    return dict(_SENSITIVITIES[key])


def _layer_sensitivity(model: nn.Module, plans: list[LayerPlan], batches: list[torch.Tensor], eps: float,
                       n_images: int, seed: int, progress: bool, loss: str, norm: str = "sum") -> dict[str, float]:
    x = torch.cat(batches)[:n_images]
    if x.shape[0] == 0:
        raise ValueError("no calibration image to measure layer sensitivities on")
    was_training = model.training
    model.eval()
    ref = _output_tensors(model(x))                                         # e.g. [(n, classes)]
    modules = dict(model.named_modules())
    out: dict[str, float] = {}
    try:
        for i, p in enumerate(tqdm(plans, desc="sensitivity", unit="layer", disable=not progress)):
            gen = torch.Generator().manual_seed(seed * 1000003 + i)

            def noisy(_m, _inp, y, gen=gen):
                scale = eps * float(y.pow(2).mean().sqrt())
                return y + scale * torch.randn(y.shape, generator=gen, dtype=y.dtype).to(y.device)
            handle = modules[p.name].register_forward_hook(noisy)
            try:
                err = _output_error(_output_tensors(model(x)), ref, loss, norm)
            finally:
                handle.remove()
            out[p.name] = err / eps ** 2
    finally:
        model.train(was_training)
    return out


def _output_error(out: list[torch.Tensor], ref: list[torch.Tensor], loss: str, norm: str = "sum") -> float:
    """finetune.distill_loss of `out` against `ref` under `loss`; `norm` 'level': each tensor's term averaged over
    its elements (per image) instead of summed (`layer_sensitivity`)."""
    from .finetune import distill_loss

    if norm == "sum":
        return float(distill_loss(out, ref, loss=loss))
    return sum(float(distill_loss([o], [r], loss=loss)) * r.shape[0] / r.numel() for o, r in zip(out, ref))


def _output_tensors(out) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (a tensor, or a tuple / list / dict of them: a detector's
    raw head maps), in float32."""
    from .blockio import tensors_of

    return [t.float() for t in tensors_of(out) if t.is_floating_point()]


def first_feasible_cap(options: dict[str, list[Option]], caps: list[float], budget: float, other: float,
                       dense: float) -> tuple[dict[str, list[Option]], float]:
    """(options capped at the first of `caps` that the budget can satisfy, that cap); QuantConfig.alloc_max_error
    as a list: e.g. [0.15, 0.2, 0.3] keeps the tightest cap a budget allows. None satisfiable: ValueError naming
    the smallest model the loosest cap allows."""
    cap = feasible_caps(options, caps, budget, other, dense)[0]
    if cap != caps[0]:
        log.info("allocation: error cap %g (the tighter %s cannot fit %.4f MB)", cap,
                 ", ".join(f"{c:g}" for c in caps[:caps.index(cap)]), budget / MB)
    return capped(options, cap), cap


def feasible_caps(options: dict[str, list[Option]], caps: list[float], budget: float, other: float,
                  dense: float) -> list[float]:
    """The caps of `caps` (in order) that the budget can satisfy: every layer keeps an option within the cap and the
    smallest such model fits. None: ValueError naming the smallest model the loosest cap allows."""
    out = [c for c in caps if _smallest(capped(options, c), other) <= budget]
    if not out:
        smallest = _smallest(capped(options, caps[-1]), other)
        raise ValueError(f"no allocation keeps every layer's relative output error <= {caps[-1]} within "
                         f"{budget / MB:.4f} MB: the smallest such model is {smallest / MB:.4f} MB "
                         f"({dense / smallest:.1f}x); raise alloc_max_error or the budget")
    return out


def _smallest(options: dict[str, list[Option]], other: float) -> float:
    """Bytes of the smallest model `options` allow (`other`: the bytes no option changes)."""
    return other + sum(min(o.bytes for o in opts) for opts in options.values())


def _choose(options: dict[str, list[Option]], sens: dict[str, float] | None, budget: float,
            other: float) -> dict[str, Option]:
    """The allocation of `options` within `budget`, minimising the summed distortion weighted by `sens` (None:
    unweighted); the options returned carry their unweighted distortion."""
    if sens is None:
        return allocate(options, budget, other)
    choice = allocate(weighted(options, sens), budget, other)
    return {n: next(o for o in options[n] if o.key == c.key) for n, c in choice.items()}


@torch.no_grad()
def measured_cap(model: nn.Module, plans: list[LayerPlan], batches: list[torch.Tensor],
                 options: dict[str, list[Option]], caps: list[float], budget: float, other: float, dense: float,
                 sens: dict[str, float] | None, em: EMConfig, seed: int = 0, loss: str = "auto",
                 progress: bool = True, n_images: int = 64
                 ) -> tuple[dict[str, list[Option]], float, dict[float, float]]:
    """(options capped at the best of `caps`, that cap, {cap: output error}): QuantConfig.alloc_cap_rule 'measured'.

    Every cap the budget satisfies gets its allocation (`_choose`); each layer of `model` is quantized with its
    chosen option by the allocator's fast quantizer (`quantize_option`, on the teacher's full Grams), and the
    network's output error on the first `n_images` calibration images is measured against the unquantized
    outputs by finetune.distill_loss under `loss` ('auto': the KL of the softmax for class logits (N, C), the
    normalised MSE otherwise). The cap with the smallest error wins (ties: the tighter). The weights are put back
    before returning. Why: the tightest satisfiable cap can leave the allocator no slack (EfficientNet-Lite0 20x:
    8.0 % top-1 with 0.2, 26.2 % with 0.3), while a looser cap lets a few layers' errors compound (16x: 54.0 % with
    0.2, 47.8 % with 0.3); measuring the whole network decides per model and budget. The KL ranks EfficientNet-
    Lite0's 16x caps as their final top-1 does, the logits' MSE does not (docs/DESIGN.md, session 16). No
    satisfiable cap: the ValueError of `feasible_caps`."""
    feasible = feasible_caps(options, caps, budget, other, dense)
    if len(feasible) == 1:
        return capped(options, feasible[0]), feasible[0], {}
    modules = dict(model.named_modules())
    x = torch.cat(batches)[:n_images]
    was_training = model.training
    saved = {p.name: modules[p.name].weight.detach().clone() for p in plans}
    errors: dict[float, float] = {}
    seen: dict[tuple, float] = {}                 # caps that give the same allocation are measured once
    try:
        model.eval()                              # the Grams and the outputs of the deployed (eval) model
        stats = collect_stats(model, {p.name: (modules[p.name], 1) for p in plans}, batches, full_gram=True)
        gains = _row_gains(model, plans, batches, em)
        ref = _output_tensors(model(x))
        for cap in tqdm(feasible, desc="cap selection", unit="cap", disable=not progress):
            choice = _choose(capped(options, cap), sens, budget, other)
            key = tuple((n, o.key) for n, o in choice.items())
            if key not in seen:
                for n, o in choice.items():
                    w = modules[n].weight
                    w.copy_(saved[n] if o.keep else quantize_option(saved[n].cpu(), stats[n].full_gram, o, em, seed,
                                                                     gains.get(n)).to(w.device, w.dtype))
                seen[key] = _output_error(_output_tensors(model(x)), ref, loss)
            errors[cap] = seen[key]
    finally:
        for n, w in saved.items():
            modules[n].weight.copy_(w)
        model.train(was_training)
    best = min(feasible, key=lambda c: errors[c] if math.isfinite(errors[c]) else math.inf)
    log.info("allocation: error cap %g measured best (network output error %s on %d calibration images)", best,
             ", ".join(f"{c:g}: {e:.4g}" for c, e in errors.items()), x.shape[0])
    return capped(options, best), best, errors


def capped(options: dict[str, list[Option]], max_error: float) -> dict[str, list[Option]]:
    """Each layer's options with distortion <= `max_error`; a layer with none keeps its least distorted
    option(s) (e.g. only keeping it uncompressed qualifies)."""
    out = {}
    for n, opts in options.items():
        ok = [o for o in opts if o.distortion <= max_error]
        if not ok:
            best = min(o.distortion for o in opts)
            ok = [o for o in opts if o.distortion == best]
        out[n] = ok
    return out


def weighted(options: dict[str, list[Option]], weights: dict[str, float]) -> dict[str, list[Option]]:
    """Options with every distortion multiplied by its layer's weight (e.g. its sensitivity)."""
    return {n: [dataclasses.replace(o, distortion=o.distortion * weights[n]) for o in opts]
            for n, opts in options.items()}


def allocate(options: dict[str, list[Option]], budget: float, other: float) -> dict[str, Option]:
    """Per-layer options minimising the summed distortion within `budget` bytes (paper-style)."""
    names = list(options)
    hull = {n: sorted(options[n], key=lambda o: (o.bytes, o.distortion)) for n in names}

    def pick(lam: float) -> dict[str, Option]:
        return {n: min(hull[n], key=lambda o: (o.distortion + lam * o.bytes, o.bytes)) for n in names}

    def total(choice: dict[str, Option]) -> float:
        return other + sum(o.bytes for o in choice.values())

    lo, hi = 0.0, 1.0
    while total(pick(hi)) > budget and hi < 1e30:
        hi *= 4
    if total(pick(hi)) > budget:
        pick_min = {n: min(hull[n], key=lambda o: o.bytes) for n in names}
        if total(pick_min) > budget:
            raise ValueError("budget below the smallest achievable size")
        return pick_min
    if total(pick(lo)) <= budget:
        return pick(lo)
    for _ in range(100):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
        if total(pick(mid)) > budget:
            lo = mid
        else:
            hi = mid
        if lo > 0 and hi / lo < 1 + 1e-9:
            break
    choice = pick(hi)
    # greedy: spend what is left on the best distortion decrease per extra byte
    while True:
        left = budget - total(choice)
        best, gain = None, 0.0
        for n in names:
            cur = choice[n]
            for o in hull[n]:
                extra = o.bytes - cur.bytes
                if 0 < extra <= left and cur.distortion - o.distortion > 0:
                    g = (cur.distortion - o.distortion) / extra
                    if g > gain:
                        best, gain = (n, o), g
        if best is None:
            return choice
        choice[best[0]] = best[1]


def budget_config(model: nn.Module, batches: list[torch.Tensor], config: QuantConfig, target_ratio: float | None = None,
                  target_size: str | float | None = None, order: list[str] | None = None,
                  progress: bool = True, extra: Sequence[str] | None = None) -> tuple[QuantConfig, dict]:
    """`config` with exact per-layer name overrides realising the allocation, and a report. `extra`: the
    options beyond PQ and fp32 (default EXTRA_OPTIONS; e.g. RICH_MENU). Every pass runs `model` in eval mode (the
    deployed model: BatchNorm on its running statistics, which a train-mode forward would update); its mode is
    put back on return."""
    plans, _ = resolve_plan(model, config, order)
    budget = budget_bytes(model, plans, target_ratio, target_size, extra)  # refuses before any work
    was_training = model.training
    model.eval()
    try:
        return _budget_config(model, batches, config, plans, budget, target_ratio, target_size, progress, extra)
    finally:
        model.train(was_training)


def _budget_config(model: nn.Module, batches: list[torch.Tensor], config: QuantConfig, plans: list[LayerPlan],
                   budget: float, target_ratio: float | None, target_size: str | float | None, progress: bool,
                   extra: Sequence[str] | None) -> tuple[QuantConfig, dict]:
    _, dense, other = size_bounds(model, plans, extra)
    options = measure_options(model, plans, batches, em=alloc_em(config.em), seed=config.seed, progress=progress,
                              extra=extra)
    cap, cap_errors = None, None
    measured = config.alloc_cap_rule == "measured" and len(config.alloc_caps) > 1     # (a list of caps)
    if measured:                                # none satisfiable: refused before the sensitivities are measured
        feasible_caps(options, config.alloc_caps, budget, other, dense)
    elif config.alloc_max_error is not None:
        options, cap = first_feasible_cap(options, config.alloc_caps, budget, other, dense)
    sens = None
    if config.alloc_weighting == "sensitivity":
        sens = layer_sensitivity(model, plans, batches, seed=config.seed, progress=progress,
                                 loss=config.alloc_sensitivity_loss, norm=config.alloc_sensitivity_norm)
    if measured:
        options, cap, cap_errors = measured_cap(model, plans, batches, options, config.alloc_caps, budget, other,
                                                dense, sens, alloc_em(config.em), config.seed, progress=progress)
    choice = _choose(options, sens, budget, other)
    achieved = other + sum(o.bytes for o in choice.values())
    report = {"budget_bytes": budget, "achieved_bytes": achieved, "ratio": dense / achieved,
              "target_ratio": target_ratio, "target_size": target_size,
              "weighting": config.alloc_weighting, "max_error": cap,
              **({"cap_errors": {str(c): e for c, e in cap_errors.items()}} if cap_errors else {}),
              **({"sensitivity_loss": config.alloc_sensitivity_loss} if sens else {}),
              **({"sensitivity_norm": config.alloc_sensitivity_norm}
                 if sens and config.alloc_sensitivity_norm != "sum" else {}),
              "layers": {n: {"block_size": o.block_size, "n_centroids": o.n_centroids, "bytes": o.bytes,
                             "rel_err2": o.distortion, "keep": o.keep,
                             **({"scalar_bits": o.scalar_bits} if o.scalar_bits else {}),
                             **({"fp16": True} if o.fp16 else {}),
                             **({"sensitivity": sens[n]} if sens else {})} for n, o in choice.items()}}
    log.info("allocation: %.4f MB (%.1fx) for a budget of %.4f MB", achieved / MB, dense / achieved, budget / MB)
    report = json.loads(json.dumps(report))     # exactly what a checkpoint's allocation.json gives back
    return apply_allocation(config, report), report


def _override(lay: dict) -> dict:
    """The name override realising one layer of an allocation report."""
    if lay["keep"]:
        return {"skip": True}
    if lay.get("fp16"):
        return {"fp16": True}
    if lay.get("scalar_bits"):
        return {"scalar_bits": lay["scalar_bits"]}
    return {"block_size": lay["block_size"], "n_centroids": lay["n_centroids"]}


def apply_allocation(config: QuantConfig, report: dict) -> QuantConfig:
    """`config` with exact per-layer name overrides realising an allocation report (`budget_config`):
    {"skip": true} (fp32), {"fp16": true}, {"scalar_bits": b}, or {"block_size": d, "n_centroids": K}."""
    overrides = dict(config.name_overrides)
    for name, lay in report["layers"].items():
        overrides[re.escape(name)] = _override(lay)
    return QuantConfig.from_dict({**config.to_json(), "name_overrides": overrides, "em": config.em})


def scalar_baseline_config(config: QuantConfig, model: nn.Module, bits: int, order: list[str] | None = None,
                           edge_bits: int = 8) -> QuantConfig:
    """The per-channel scalar baseline as GPTQ / BRECQ / AdaRound report it: every Conv2d / Linear at
    `bits`-bit per-output-channel codes, the first (the stem) and the last layer (the classifier) in
    forward order `order` (default: registration order) at `edge_bits`. `config`'s other settings
    (statistics, teacher targets, block reconstruction, ...) are kept, so a comparison with PQ under the
    same config isolates the quantizer. The stem is quantized (quantize_stem=True); name overrides that
    skip a layer are kept (that layer stays fp32)."""
    from .config import quantizable_layers

    for b in (bits, edge_bits):
        if b not in SCALAR_BITS:
            raise ValueError(f"scalar bits must be one of {SCALAR_BITS}, got {b!r}")
    names = list(order) if order is not None else [n for n, _ in quantizable_layers(model)]
    if not names:
        raise ValueError("the model has no Conv2d or Linear layer")
    kept = [n for n in names for pat, ov in config.name_overrides.items()
            if re.fullmatch(pat, n) and (ov is None or ov.get("skip"))]
    overrides = {re.escape(n): {"scalar_bits": edge_bits if n in (names[0], names[-1]) else bits}
                 for n in names if n not in kept}
    overrides.update({re.escape(n): {"skip": True} for n in kept})
    return QuantConfig.from_dict({**config.to_json(), "quantize_stem": True, "name_overrides": overrides,
                                  "type_overrides": {}, "em": config.em})
