"""The paper's per-architecture settings for zoo models (Stock et al. 2020, section 4.1 and the
kill-the-bits scripts): the classifier's number of centroids, and ResNet-18 `large` keeping
1x1 convs at d = 4. `zoo_config` merges them under any user overrides."""
from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .config import QuantConfig
from .zoo import get_entry

EXTRA_TYPE_OVERRIDES: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("resnet18", "large"): {"conv1x1": {"block_size": 4}},
}


def zoo_config(name: str, preset: str = "small", **kwargs: Any) -> QuantConfig:
    """A QuantConfig for zoo model `name` with the paper's settings; kwargs as QuantConfig's
    (their name_overrides / type_overrides take precedence over the recipe's)."""
    entry = get_entry(name)
    names = dict(kwargs.pop("name_overrides", {}) or {})
    types = dict(kwargs.pop("type_overrides", {}) or {})
    k = entry.classifier_centroids.get(preset)
    if k:
        names = {entry.classifier: {"n_centroids": k}, **names}
    types = {**EXTRA_TYPE_OVERRIDES.get((name, preset), {}), **types}
    return QuantConfig.from_dict(dict(preset=preset, name_overrides=names, type_overrides=types, **kwargs))


# The default recipe of `bitdown compress` (CLI) when no method flag is given: the measured best
# (benchmarks/results/budget.md). int8 codebooks + 10 per-layer + 300 global distillation steps: ResNet-20
# 20x 80.70 %, 30x 77.73 %, EfficientNet-Lite0 10x 77.2 % (0 + 150 steps). Block reconstruction
# (200 steps, no per-layer steps) measured 80.33 / 77.54 / 75.6 % (50 steps): within noise, not better,
# so it stays an option (--reconstruct). `fast` keeps the EM only.
DEFAULT_QUANT: dict[str, Any] = {"codebook_bits": 8, "reconstruct": {"steps": 0}}
DEFAULT_FINETUNE: dict[str, Any] = {"layer_steps": 10, "global_steps": 300, "batch_size": 64}
FAST_QUANT: dict[str, Any] = {"codebook_bits": 8, "reconstruct": {"steps": 0}}


# Above LONG_RATIO the default recipe distils LONG_GLOBAL_STEPS steps instead: ResNet-20 30x 300 steps 77.73 %,
# 3,000 steps 79.46 % (session 14, benchmarks/results/budget_longft_s14.md; 30 min of distillation at one thread
# here). At 20x and below 300 steps already keep ResNet-20 within 0.33 pt of its teacher (80.70 %), so short runs
# stay short there. It pays where the training set is large (CIFAR's 50,000 images); on a few hundred images the
# holdout guard undoes a distillation that over-fits.
LONG_RATIO = 20.0
LONG_GLOBAL_STEPS = 3000


def long_distillation(ratio: float | None) -> bool:
    """Whether a budget of `ratio` (None: no budget) gets the default recipe's long distillation."""
    return ratio is not None and ratio > LONG_RATIO


def default_recipe(fast: bool = False, ratio: float | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(QuantConfig keys, FinetuneConfig keys) of the default recipe for a budget of `ratio` (None: no budget);
    with `fast` the EM only (no block reconstruction, no distillation: FinetuneConfig keys empty)."""
    if fast:
        return dict(FAST_QUANT), {}
    ft = dict(DEFAULT_FINETUNE)
    if long_distillation(ratio):
        ft["global_steps"] = LONG_GLOBAL_STEPS
    return copy.deepcopy(DEFAULT_QUANT), ft


# The recipe of a detector zoo model (ZooEntry.task == "detect": YOLOv5n), picked automatically by
# `bitdown compress`; measured on COCO128 (benchmarks/results/detection.md): before session 11 (plain allocation)
# at 26x it gave mAP50-95 0.0176
# (teacher 0.3366; the 0.250 target is missed, docs/DESIGN.md says why); the 'bce' loss with trained biases
# measured worse (0.0117), so the global stage keeps the normalised MSE on the raw maps ('auto').
# EMConfig.channel_weighting='bn' (the post-BatchNorm error) measured EM-only: 26x 0.0246 vs 0.0169, 16x worse,
# 12x even (docs/DESIGN.md, session 10): not in the recipe.
# Session 11: the SPPF block (model.9) and the Detect convs (model.24) alone take most of the mAP at 16x; the
# sensitivity-weighted allocation protects them: EM only 16x 0.169 (bce) / 0.181 (mse) vs 0.106, 20x 0.134 (bce),
# 26x 0.059 (bce) / 0.050 (mse) vs 0.017 (benchmarks/results/detection.md, docs/DESIGN.md session 11).
# Session 13 (benchmarks/results/detection_s13.md, EM only, seeds 0/1/2 on fixed allocations): the rate menu
# (per-layer int8/int4/int2 per-channel scalar or fp16 next to PQ) 26x 0.0617 / 0.0606 / 0.0801 vs 0.0616 / 0.0501 /
# 0.0674 (+0.008, every pair >= 0), 20x 0.1415 / 0.1397 / 0.1413 vs 0.1301 / 0.1150 / 0.1304; it stores the first
# layers in int8 instead of fp32. The per-level normalised 'bce' sensitivity (alloc_sensitivity_norm='level')
# feeds the P5 path and starves the SPPF again: 26x 0.0287, 20x 0.1153: not in the recipe.
DETECTOR_QUANT: dict[str, Any] = {
    "codebook_bits": 8,
    "alloc_weighting": "sensitivity",
    "alloc_sensitivity_loss": "bce",
    "alloc_menu": ["int8", "int4", "int2", "fp16"],
    "reconstruct": {"steps": 100, "lr": 1e-3, "batch_size": 16},
}
DETECTOR_FINETUNE: dict[str, Any] = {"layer_steps": 0, "global_steps": 300, "batch_size": 16}
DETECTOR_DATA: dict[str, Any] = {"calib_size": 320, "calib_images": 128}


def detector_recipe(fast: bool = False) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(QuantConfig keys, FinetuneConfig keys, data keys) of the detector recipe; data keys: `calib_size` (the
    letterbox size of the calibration and distillation images) and `calib_images`. With `fast` the EM only."""
    quant = copy.deepcopy(DETECTOR_QUANT)
    if fast:
        quant["reconstruct"] = {"steps": 0}
        return quant, {}, dict(DETECTOR_DATA)
    return quant, dict(DETECTOR_FINETUNE), dict(DETECTOR_DATA)


# The recipe of a compact network: any model with a depthwise conv (groups == in_channels > 1: MobileNet,
# EfficientNet, MBConv-style blocks), picked automatically by `bitdown compress`. Measured on EfficientNet-Lite0
# at 10x (held-out 500, teacher 87.80 %, 128 calibration images; benchmarks/results/budget_effnet_s12.md,
# docs/DESIGN.md session 12): the sensitivity-weighted allocation with a 0.3 cap on each layer's relative output
# error and the rate menu (per-channel int8/int4/int2 codes or fp16 next to PQ), EM only: 81.60 / 80.80 %
# (seeds 0/1), against 78.60 / 79.00 % without the menu and 78.40 % for the same allocation + 150 global
# distillation steps (500 images over-fit: distillation costs ~3 pt), 77.2 % for the classifier recipe's
# allocation + 150 steps. No distillation, so the whole command takes under an hour on a 2-core CPU (44-47 min at one thread,
# loaded; benchmarks/results/recipe_cli.md), where the distilling default took ~5.5 h.
# Session 14: the cap is the tightest of [0.2, 0.3] the budget allows (0.2 fits up to ~20x): at 16x 0.2 gives
# 54.00 / 53.80 % (seeds 0/1) against 47.80 / 47.40 % with 0.3; 0.15 is too tight (45.20 %, seed 0;
# benchmarks/results/budget_effnet16_s14.md);
# at 10x it does not bind (the largest chosen D_l is 0.12).
# Session 15: at 20x the list picked 0.2 (feasible, with no slack left) and gave 8.00 % (plain CLI) against 26.20 %
# with 0.3 (budget.py). Session 16: the cap is measured, not guessed (QuantConfig.alloc_cap_rule 'measured',
# allocate.measured_cap): each cap of the list the budget satisfies gets its allocation, quantized by the allocator's
# fast quantizer, and the one whose softmax KL to the teacher on the calibration images is least wins. On
# EfficientNet-Lite0 that KL orders the caps as their final top-1 does at 16x (0.2 54.0 > 0.25 52.6 > 0.3 47.8 > 0.15
# 45.2 %) and 20x (0.3 26.2 > 0.2 8.0 %); the logits' MSE does not (docs/DESIGN.md, session 16). Session 17, the
# plain CLI on its own images: 16x picked 0.25 (48.2 %; 0.2 on the same images 50.4 %), 20x picked 0.4 (19.4 %; the
# tightest rule's 0.2 gave 8.0 %): caps whose KLs lie within ~0.1 are a tie the rule cannot rank, a far-off cap it
# rejects (docs/DESIGN.md, session 17).
COMPACT_QUANT: dict[str, Any] = {
    "codebook_bits": 8,
    "alloc_weighting": "sensitivity",
    "alloc_max_error": [0.15, 0.2, 0.25, 0.3, 0.4],
    "alloc_cap_rule": "measured",
    "alloc_menu": ["int8", "int4", "int2", "fp16"],
    "reconstruct": {"steps": 0},
}
COMPACT_DATA: dict[str, Any] = {"calib_images": 128}


def is_compact(model: nn.Module) -> bool:
    """A compact network: it has a depthwise conv (groups == in_channels > 1)."""
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in model.modules())


def compact_recipe(fast: bool = False) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(QuantConfig keys, FinetuneConfig keys, data keys) of the compact-network recipe: the EM only, so `fast`
    changes nothing; data keys: `calib_images`."""
    return copy.deepcopy(COMPACT_QUANT), {}, dict(COMPACT_DATA)


RECIPES = ("default", "compact", "detector")


def recipe_kind(model: nn.Module, detector: bool) -> str:
    """Which recipe `bitdown compress` gives `model`: 'detector' for a detector, 'compact' for a model with a
    depthwise conv, else 'default'."""
    return "detector" if detector else "compact" if is_compact(model) else "default"


# Images synthesised by bitdown (issue 15): the default recipe's distillation with label-free mixup and 3,000 global
# steps. ResNet-20 20x on 2,048 BN-only synthetic images: 77.44 % with the plain recipe, 77.90 % with mixup 0.4,
# 78.55 % with mixup 0.4 and 3,000 steps (benchmarks/results/synthetic.md; real images: 80.70 %). Session 15: 6,000
# steps 78.28 %, mixup 1.0 (3,000 steps) 78.63 %: within noise, not changed.
SYNTHETIC_FINETUNE: dict[str, Any] = {"mixup": 0.4, "global_steps": LONG_GLOBAL_STEPS}


def recipe(kind: str, fast: bool = False, ratio: float | None = None, synthetic: bool = False
           ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(QuantConfig keys, FinetuneConfig keys, data keys) of recipe `kind` (one of RECIPES) for a budget of
    `ratio` (the compression ratio asked for; None: no budget); `synthetic`: the data are images synthesised by
    bitdown (the default recipe then distils with mixup, longer: SYNTHETIC_FINETUNE)."""
    if kind == "detector":
        return detector_recipe(fast=fast)
    if kind == "compact":
        return compact_recipe(fast=fast)
    if kind != "default":
        raise ValueError(f"recipe must be one of {RECIPES}, got {kind!r}")
    quant, ft = default_recipe(fast=fast, ratio=ratio)
    if synthetic and ft:
        ft.update(SYNTHETIC_FINETUNE)
    return quant, ft, {}
