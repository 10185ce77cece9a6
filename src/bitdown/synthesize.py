"""Images synthesised from a trained network's own statistics (no data): DeepInversion (Yin et al. 2020) /
ZeroQ (Cai et al. 2020).

Each batch of ``B`` images starts as Gaussian noise in the model's *normalised* input space and is optimised
with Adam (cosine learning rate) for ``steps`` steps, the model frozen in eval mode, to minimise

    L(x) = w_bn  * sum_l ( ||mu_l(x) - mu_l^run||_2 + ||var_l(x) - var_l^run||_2 )      (BatchNorm statistics)
         + w_div * D(f(x))                                                               (diversity)
         + w_tv  * TV(x)                                                                 (smoothness prior)

- ``mu_l``, ``var_l``: per-channel mean and (biased) variance of BatchNorm ``l``'s *input* over the batch and
  every spatial position (N, H, W), from a forward pre-hook; ``mu^run``, ``var^run`` its running statistics.
  The first BatchNorm's term is weighted ``first_bn_weight`` (DeepInversion's first-layer multiplier).
- ``D``: for a classifier (outputs (N, C) logits), the cross-entropy to assigned classes spread evenly over the
  images (image ``i`` of the whole set gets class ``perm[i mod C]``, ``perm`` a seeded permutation of the
  classes), so every batch is class-balanced; for any other output, the information-maximisation loss on the
  first output tensor averaged over its spatial axes: mean per-image entropy minus the entropy of the batch's
  mean prediction (confident images, spread over the outputs' channels).
- ``TV``: mean squared difference between neighbouring pixels (the L2 total variation).
- Each step the model sees the canvas rolled by a random shift of up to ``jitter`` pixels on each axis and
  flipped left-right with probability 1/2 (whole-batch ``torch.roll`` / ``torch.flip``), then centre-cropped to
  the model's input size. After each step the canvas is clamped to the pixel range [0, 255] of the preset.
  Canvas pixels the model never sees (the frame outside the centre crop widened by ``jitter``: 16 px of a 256 px
  ImageNet canvas at the default jitter 0) are, at the end, the reflection of those it saw, not leftover noise.

The canvas has the size the preset's loader produces before cropping: ``crop`` x ``crop`` for fixed-size
presets (CIFAR: 32), ``resize`` x ``resize`` for the resize-and-crop presets (ImageNet: 256), so an image saved
as a PNG and read back by :class:`bitdown.data.ImageDataset` with the same preset gives the model exactly the
pixels it was optimised on (centre crop for calibration, random crops for fine-tuning).

Batch ``b`` is drawn from its own ``torch.Generator`` seeded by (seed, b): batches are independent, a run
into a folder resumes at the first missing batch, and results are identical at one thread.

Note: ``bitdown.synthesize`` is the function; this module is ``bitdown.synthesize`` in ``sys.modules`` and is
imported with ``from bitdown.synthesize import ...``.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .blockio import tensors_of
from .checkpoint import fingerprint, settings_diff, summarise_diff
from .config import _checked
from .data import Preset, get_preset

log = logging.getLogger(__name__)

MANIFEST = "bitdown-synthesize.json"
_NAME_RE = re.compile(r"^synth_\d{6,}\.png$")
Diversity = Literal["auto", "classes", "entropy", "none"]


@dataclass
class SynthConfig:
    """Options of :func:`synthesize` (the objective is in the module docstring).

    Defaults: 50 Adam steps of batches of 256 (a ResNet-20 batch: 104-183 s on one thread of the loaded 2-core
    dev CPU, benchmarks/results/synthetic.md), lr 0.25 with a cosine decay, Adam betas (0.5, 0.9), and the
    BatchNorm term alone: ``w_div=0, w_tv=0, jitter=0, flip=False`` (ZeroQ's objective). DeepInversion's extra
    terms stay available (its CIFAR ratio is ``w_div=0.1``, ``w_tv=1e-3``, ``jitter=None``: ``(resize - crop) // 2``
    for resize presets, else ``crop // 16``, at least 1, and ``flip=True``; the defaults before session 15), but
    every measurement on ResNet-20 20x favoured the BatchNorm term alone (benchmarks/results/synthetic.md):
    EM only on 256 images 77.70 % against 75.18 % with all terms (real images: 77.86 %), EM only on 2,048
    images 77.21 vs 76.58 %, the distilling recipe 76.74 vs 76.43 % like for like, and it costs less per image
    (147 vs 235 s for 256). DeepInversion runs 2,000 steps at lr 0.1; here the step count is what a CPU affords
    (the BatchNorm term reached against real images: benchmarks/results/synthetic.md)."""

    batch_size: int = 256
    steps: int = 50
    lr: float = 0.25
    betas: tuple[float, float] = (0.5, 0.9)
    w_bn: float = 1.0
    first_bn_weight: float = 1.0
    diversity: Diversity = "auto"
    w_div: float = 0.0                # DeepInversion: 0.1
    w_tv: float = 0.0                 # DeepInversion: 1e-3
    jitter: int | None = 0            # None: automatic (auto_jitter), as DeepInversion
    flip: bool = False                # DeepInversion: True
    seed: int = 0

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SynthConfig.{name} must be a positive integer, got {v!r}")

        positive_int("batch_size")
        positive_int("steps")
        for name in ("lr", "w_bn", "first_bn_weight", "w_div", "w_tv"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"SynthConfig.{name} must be a finite number >= 0, got {v!r}")
        if self.lr == 0:
            raise ValueError("SynthConfig.lr must be > 0")
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else ()
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"SynthConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        if self.diversity not in ("auto", "classes", "entropy", "none"):
            raise ValueError(f"SynthConfig.diversity must be auto, classes, entropy or none, got {self.diversity!r}")
        if self.jitter is not None and (isinstance(self.jitter, bool) or not isinstance(self.jitter, int)
                                        or self.jitter < 0):
            raise ValueError(f"SynthConfig.jitter must be an integer >= 0 or None (automatic), got {self.jitter!r}")
        if isinstance(self.flip, int) and not isinstance(self.flip, bool):
            self.flip = bool(self.flip)
        if not isinstance(self.flip, bool):
            raise ValueError(f"SynthConfig.flip must be true or false, got {self.flip!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"SynthConfig.seed must be an integer, got {self.seed!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SynthConfig":
        """From a JSON dict; unknown keys are refused with the list of known ones."""
        return cls(**_checked(d, {f.name for f in fields(cls)}, "SynthConfig key"))

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["betas"] = list(self.betas)
        return out


@dataclass
class SynthResult:
    """What :func:`synthesize` made: ``images`` uint8 (n, 3, S, S) pixels on the preset's canvas (0-255 RGB),
    ``classes`` the class assigned to each image (None without class targets), ``batches`` one dict per batch
    (final loss terms, seconds, whether it was read back from the folder)."""

    images: torch.Tensor
    classes: torch.Tensor | None
    batches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        """Seconds of optimisation in this call (batches read back from the folder not counted)."""
        return float(sum(b["seconds"] for b in self.batches if not b.get("resumed")))


# ----------------------------------------------------------------------------- geometry

def canvas_size(preset: Preset) -> int:
    """The side of the images synthesised for `preset`: what its loader holds before the (centre / random)
    crop, so a saved PNG reads back to the same pixels."""
    return preset.resize if preset.resize is not None else preset.crop


def auto_jitter(preset: Preset) -> int:
    if preset.resize is not None and preset.resize > preset.crop:
        return (preset.resize - preset.crop) // 2
    return max(1, preset.crop // 16)


def pixel_bounds(preset: Preset, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) of the normalised input, (1, 3, 1, 1) each: pixels 0 and 255 through the preset."""
    mean = torch.tensor(preset.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(preset.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return (0.0 - mean) / std, (255.0 - mean) / std


def to_pixels(x: torch.Tensor, preset: Preset) -> torch.Tensor:
    """Normalised float (N, 3, H, W) -> uint8 pixels (rounded, clamped to 0-255), on the CPU."""
    mean = torch.tensor(preset.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(preset.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.detach().float().cpu() * std + mean).round_().clamp_(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- model hooks

def batchnorms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The model's BatchNorm layers that hold running statistics, in module order."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None and m.running_var is not None]


class _BNLoss:
    """Forward pre-hooks on the BatchNorm layers: each call adds its statistics distance to ``self.terms``."""

    def __init__(self, bns: list[tuple[str, nn.Module]], first_weight: float) -> None:
        self.terms: list[torch.Tensor] = []
        self.handles = []
        for k, (_, bn) in enumerate(bns):
            self.handles.append(bn.register_forward_pre_hook(self._hook(bn, first_weight if k == 0 else 1.0)))

    def _hook(self, bn: nn.Module, weight: float):
        def hook(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0]
            dims = [0, *range(2, x.dim())]                       # every axis but the channels
            var, mean = torch.var_mean(x, dim=dims, unbiased=False)
            d = torch.linalg.vector_norm(mean - bn.running_mean) + torch.linalg.vector_norm(var - bn.running_var)
            self.terms.append(d * weight if weight != 1.0 else d)
        return hook

    def take(self) -> torch.Tensor:
        total = torch.stack(self.terms).sum()
        self.terms = []
        return total

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _first_tensor(out: Any) -> torch.Tensor | None:
    ts = tensors_of(out)
    return ts[0] if ts else None


def _all_finite(out: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors_of(out) if t.is_floating_point())


def _diversity_kind(out: Any, mode: str) -> str:
    """'classes', 'entropy' or 'none' for the model output `out` under SynthConfig.diversity `mode`."""
    t = _first_tensor(out)
    if mode == "none":
        return "none"
    if t is None or not t.is_floating_point() or t.dim() < 2:
        if mode != "auto":
            raise ValueError(f"diversity {mode!r} needs a float output tensor of shape (N, C, ...); the model "
                             f"returns {type(out).__name__}")
        return "none"
    if mode == "classes" and not (isinstance(out, torch.Tensor) and t.dim() == 2):
        raise ValueError(f"diversity 'classes' needs (N, C) logits; the model returns shape {tuple(t.shape)}")
    if mode == "auto":
        return "classes" if isinstance(out, torch.Tensor) and t.dim() == 2 and t.shape[1] > 1 else "entropy"
    return mode


def _entropy_loss(out: Any) -> torch.Tensor:
    """Mean per-image entropy minus the entropy of the mean prediction (spatial axes averaged first)."""
    t = _first_tensor(out)
    z = t.flatten(2).mean(2) if t.dim() > 2 else t                     # (N, C)
    p = F.softmax(z.float(), dim=1)
    logp = F.log_softmax(z.float(), dim=1)
    per_image = -(p * logp).sum(1).mean()
    pm = p.mean(0)
    return per_image + (pm * pm.clamp_min(1e-12).log()).sum()


def _tv(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() + (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean()


def batch_generator(seed: int, b: int) -> torch.Generator:
    """The generator of batch `b` (noise, shifts, flips): a function of (seed, b) only."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, b, 0x53594E]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def class_targets(n: int, n_classes: int, seed: int) -> torch.Tensor:
    """Image i's class: perm[i mod C], perm a seeded permutation of the C classes (balanced, spread)."""
    perm = torch.randperm(n_classes, generator=torch.Generator().manual_seed(seed))
    return perm[torch.arange(n) % n_classes]


# ----------------------------------------------------------------------------- one batch

class _Synthesizer:
    """The frozen model with its hooks, ready to optimise batches."""

    def __init__(self, model: nn.Module, preset: Preset, config: SynthConfig, device: torch.device) -> None:
        bns = batchnorms(model)
        if not bns:
            raise ValueError(f"{type(model).__name__} has no BatchNorm layer with running statistics: synthesis "
                             "matches the batch statistics of every BatchNorm's input to its running mean and "
                             "variance, so it needs a model with BatchNorm layers (trained, in their stored "
                             "state); give real images (--data) for this model instead")
        self.model = copy.deepcopy(model).eval().to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.preset, self.config, self.device = preset, config, device
        self.n_bn = len(bns)
        self.bn = _BNLoss(batchnorms(self.model), config.first_bn_weight)
        self.size = canvas_size(preset)
        self.jitter = config.jitter if config.jitter is not None else auto_jitter(preset)
        self.low, self.high = pixel_bounds(preset, device)

    def close(self) -> None:
        self.bn.remove()

    def _view(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """What the model sees this step: the canvas rolled by a random shift, maybe flipped, centre-cropped."""
        if self.jitter:
            dy, dx = (int(v) for v in torch.randint(-self.jitter, self.jitter + 1, (2,), generator=g))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        if self.config.flip and bool(torch.rand((), generator=g) < 0.5):
            x = torch.flip(x, dims=(3,))
        crop = self.preset.crop
        if self.size != crop:
            top = (self.size - crop) // 2
            x = x[..., top:top + crop, top:top + crop]
        return x          # NCHW: channels_last made the whole step slower here (the statistics hooks)

    def probe(self) -> tuple[str, int | None]:
        """(diversity kind, number of classes) from one forward on two noise images; non-finite outputs and
        inputs the model cannot take are clear errors."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, self.size, self.size, generator=g).to(self.device)
        x = torch.max(torch.min(x, self.high), self.low)
        try:
            with torch.no_grad():
                out = self.model(self._view(x, torch.Generator().manual_seed(0)))
        except RuntimeError as e:
            raise ValueError(f"the model cannot take {self.preset.name!r}-preprocessed images of "
                             f"{self.preset.crop}x{self.preset.crop}: {str(e).splitlines()[0]}") from None
        finally:
            self.bn.terms = []
        if not _all_finite(out):
            raise ValueError("the model's outputs are not finite (NaN/inf) on noise images of its input range: "
                             "check its weights (synthesis needs a working, trained model)")
        kind = _diversity_kind(out, self.config.diversity)
        return kind, (int(out.shape[1]) if kind == "classes" else None)

    def batch(self, b: int, n_images: int, kind: str, targets: torch.Tensor | None,
              bar: tqdm | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Batch `b` of `n_images` optimised from noise: (uint8 pixels (n, 3, S, S), final loss terms)."""
        cfg = self.config
        g = batch_generator(cfg.seed, b)
        x = torch.randn(n_images, 3, self.size, self.size, generator=g).to(self.device)
        x = torch.max(torch.min(x, self.high), self.low).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=cfg.lr, betas=cfg.betas, eps=1e-8)
        y = targets.to(self.device) if targets is not None else None
        terms: dict[str, float] = {}
        t0 = time.perf_counter()
        for step in range(cfg.steps):
            for group in opt.param_groups:                                    # cosine decay to 0
                group["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * step / cfg.steps))
            opt.zero_grad(set_to_none=True)
            out = self.model(self._view(x, g))
            l_bn = self.bn.take()
            loss = cfg.w_bn * l_bn
            l_div = torch.zeros((), device=self.device)
            if kind == "classes" and cfg.w_div > 0:
                l_div = F.cross_entropy(out.float(), y)
            elif kind == "entropy" and cfg.w_div > 0:
                l_div = _entropy_loss(out)
            l_tv = _tv(x) if cfg.w_tv > 0 else torch.zeros((), device=self.device)
            loss = loss + cfg.w_div * l_div + cfg.w_tv * l_tv
            if not bool(torch.isfinite(loss.detach())):
                raise FloatingPointError(f"synthesis loss became {float(loss)} at step {step} of batch {b} "
                                         f"(BatchNorm term {float(l_bn):.4g}): the model's outputs or statistics "
                                         f"are not finite; lower SynthConfig.lr or check the model")
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.copy_(torch.max(torch.min(x, self.high), self.low))
            terms = {k: float(v.detach()) for k, v in (("loss", loss), ("bn", l_bn), ("div", l_div), ("tv", l_tv))}
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{terms['loss']:.3f}", bn=f"{terms['bn']:.3f}", refresh=False)
        info = {"batch": b, "images": n_images, **terms, "seconds": time.perf_counter() - t0}
        return to_pixels(self._fill_unseen(x.detach()), self.preset), info

    def _fill_unseen(self, x: torch.Tensor) -> torch.Tensor:
        """The canvas with the pixels the model never saw (outside the centre crop widened by the jitter, e.g. the
        16 px frame of a 256 px ImageNet canvas at jitter 0) replaced by the reflection of those it saw, so no
        noise frame reaches the fine-tuning's random crops; the centre crop is unchanged."""
        crop = self.preset.crop
        top = (self.size - crop) // 2 - self.jitter
        bottom = self.size - crop - (self.size - crop) // 2 - self.jitter
        if top <= 0 and bottom <= 0:
            return x
        top, bottom = max(top, 0), max(bottom, 0)
        inner = x[..., top:self.size - bottom, top:self.size - bottom]
        return F.pad(inner, (top, bottom, top, bottom), mode="reflect")


# ----------------------------------------------------------------------------- folder

def image_name(i: int) -> str:
    return f"synth_{i:06d}.png"


def _model_digest(model: nn.Module) -> str:
    """A hash of the model's state (names, shapes, bytes): a folder made from another model is not resumed."""
    return fingerprint(model.state_dict())


def _settings(n: int, preset: Preset, config: SynthConfig, digest: str) -> dict[str, Any]:
    return {"format": 1, "n": n, "preprocess": preset.name, "canvas": canvas_size(preset),
            "config": config.to_json(), "model_sha256": digest}


def prepare_folder(out: str | os.PathLike, settings: dict[str, Any], overwrite: bool) -> tuple[Path, dict]:
    """The output folder, created if needed; returns (folder, manifest of an earlier run with the same
    settings, to resume; else empty). A folder holding other files, or a synthesis with other settings, is
    refused unless `overwrite` (then the earlier synthesis's images and manifest are removed; other files
    are left and said)."""
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder (give a folder for the images)")
    if not folder.exists():
        if not folder.parent.is_dir():
            raise ValueError(f"--out {out}: folder {str(folder.parent)!r} does not exist (create it first)")
        folder.mkdir()
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: folder is not writable")
    entries = sorted(e for e in os.listdir(folder)           # our own temporary files (another process) ignored
                     if not (e.endswith(".tmp") and (e.startswith(".synth_") or e.startswith(f".{MANIFEST}"))))
    ours = [e for e in entries if _NAME_RE.match(e)]
    others = [e for e in entries if e != MANIFEST and not _NAME_RE.match(e)]
    old: dict[str, Any] = {}
    if MANIFEST in entries:
        try:
            old = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            old = {}
    same = bool(old) and old.get("settings") == settings
    if others and not overwrite:
        raise ValueError(f"--out {out} holds other files ({', '.join(others[:5])}"
                         f"{', ...' if len(others) > 5 else ''}): give an empty or new folder, or --overwrite "
                         f"(they would be read with the images by --data)")
    if (ours or MANIFEST in entries) and not same and not overwrite:
        diff = settings_diff(old["settings"], settings, where="the folder") if isinstance(old.get("settings"), dict) else []
        why = ": " + summarise_diff(diff, 6) if diff else " (or none recorded)"
        hint = (" (SynthConfig's defaults before session 15 were DeepInversion's terms: --config "
                "'{\"w_div\": 0.1, \"w_tv\": 0.001, \"jitter\": null, \"flip\": true}' resumes such a folder)"
                if any(d.startswith(("config.w_div", "config.w_tv", "config.jitter", "config.flip")) for d in diff)
                else "")
        raise ValueError(f"--out {out} holds a synthesis with other settings{why}{hint}: give the same settings "
                         f"to resume it, another folder, or --overwrite to replace it")
    if overwrite and not same:
        for e in ours + ([MANIFEST] if MANIFEST in entries else []):
            (folder / e).unlink()
        old = {}
        if others:
            log.warning("--overwrite: %d other files stay in %s (read with the images by --data): %s",
                        len(others), folder, ", ".join(others[:5]))
    return folder, (old if same else {})


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    tmp = folder / f".{MANIFEST}.{os.getpid()}.tmp"          # per process: torchrun ranks write the same folder
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)


def _save_pngs(folder: Path, pixels: torch.Tensor, start: int) -> None:
    arr = pixels.permute(0, 2, 3, 1).numpy()                     # (n, S, S, 3) uint8
    for k in range(arr.shape[0]):
        tmp = folder / f".{image_name(start + k)}.{os.getpid()}.tmp"
        Image.fromarray(arr[k]).save(tmp, format="PNG")
        os.replace(tmp, folder / image_name(start + k))


def _load_pngs(folder: Path, start: int, count: int) -> torch.Tensor | None:
    """Images start..start+count-1 of an earlier run, or None if any is missing or unreadable."""
    arrs = []
    for i in range(start, start + count):
        try:
            with Image.open(folder / image_name(i)) as img:
                arrs.append(np.asarray(img.convert("RGB")))
        except (OSError, ValueError):
            return None
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- entry point

def synthesize(model: nn.Module, n: int, preprocess: str | Preset = "cifar10", config: SynthConfig | None = None,
               out: str | os.PathLike | None = None, overwrite: bool = False,
               device: str | torch.device | None = None, progress: bool | None = None) -> SynthResult:
    """`n` images synthesised from `model`'s BatchNorm statistics (module docstring), as uint8 pixels of the
    `preprocess` preset's canvas. `out`: also write them as PNGs ``synth_000000.png`` ... into that folder
    with a manifest (``bitdown-synthesize.json``); a rerun with the same settings resumes at the first
    missing batch; a folder holding other files is refused unless `overwrite`. `device`: where the model
    runs (default: CPU); the model itself is not moved. `progress`: the progress bar (None: on a terminal)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"the number of images must be a positive integer, got {n!r}")
    n = int(n)
    config = config if config is not None else SynthConfig()
    if not isinstance(config, SynthConfig):
        raise TypeError(f"config must be a SynthConfig, got {type(config).__name__}")
    preset = get_preset(preprocess)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    syn = _Synthesizer(model, preset, config, dev)
    try:
        kind, n_classes = syn.probe()
        targets = class_targets(n, n_classes, config.seed) if kind == "classes" else None
        folder, manifest = None, {}
        if out is not None:
            settings = _settings(n, preset, config, _model_digest(model))
            folder, manifest = prepare_folder(out, settings, overwrite)
            manifest = manifest or {"settings": settings, "batches": {}}
        bs = config.batch_size
        n_batches = -(-n // bs)
        log.info("synthesising %d images (%d batches of %d, %d steps, %s, %d BatchNorm layers, diversity %s) "
                 "on %s", n, n_batches, bs, config.steps, preset.name, syn.n_bn, kind, dev)
        images = torch.empty(n, 3, syn.size, syn.size, dtype=torch.uint8)
        infos: list[dict[str, Any]] = []
        with tqdm(total=n_batches * config.steps, desc=f"synthesize {n}", unit="step", disable=(
                None if progress is None else not progress), leave=False) as bar:
            for b in range(n_batches):
                start, count = b * bs, min(bs, n - b * bs)
                done = manifest.get("batches", {}).get(str(b)) if folder is not None else None
                pix = _load_pngs(folder, start, count) if done else None
                if pix is not None:
                    info = {**done, "resumed": True}
                    bar.update(config.steps)
                else:
                    y = targets[start:start + count] if targets is not None else None
                    pix, info = syn.batch(b, count, kind, y, bar)
                    if folder is not None:
                        _save_pngs(folder, pix, start)
                        manifest["batches"][str(b)] = info
                        _write_manifest(folder, manifest)
                    log.info("batch %d/%d: loss %.4f (BatchNorm %.4f, diversity %.4f, TV %.4f) in %.1f s",
                             b + 1, n_batches, info["loss"], info["bn"], info["div"], info["tv"], info["seconds"])
                images[start:start + count] = pix
                infos.append(info)
        return SynthResult(images, targets, infos)
    finally:
        syn.close()
