"""Distillation fine-tuning of the codebooks (labels never used).

Loss: KL(teacher || student) of the network outputs at temperature T (times T^2):

    L = T^2 * sum_classes softmax(z_t / T) * (log softmax(z_t / T) - log softmax(z_s / T))

- per layer (`finetune_layer`): right after a layer's EM, only its codebook trains; the model is in
  eval mode, so BatchNorm is frozen (running statistics and affine);
- global (`finetune_global`): every codebook together, optionally the BatchNorm affine parameters,
  still in eval mode (running statistics fixed; compress() re-estimates them first when
  QuantConfig.recalibrates_bn, by default only without teacher targets: docs/DESIGN.md), with a step
  learning-rate schedule, checkpointed every `checkpoint_every` steps.

Gradients reach a codeword through the decode W = codebook[codes]: its gradient is the *sum* of the
gradients of the subvectors assigned to it. The original CentroidSGD used the *mean*, so a plain-SGD
learning rate lr_orig corresponds to lr_orig / (subvectors per codeword) here. With the default
Adam the question disappears: Adam's update is invariant to a per-parameter gradient scale.

The training stream is the augmented, unlabelled calibration data, deterministic in (seed, step):
batch s of a run is batch (s mod B) of the permutation of epoch s // B, so a resumed run sees the
same images as an uninterrupted one.
"""
from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .modules import is_pq, round_codebook

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    layer_steps: int = 0              # per-layer distillation steps after each layer's EM (0: off)
    global_steps: int = 0             # global distillation steps at the end (0: off)
    batch_size: int = 64
    layer_lr: float = 1e-3
    global_lr: float = 1e-3          # Adam; measured best of {1e-4, 3e-4, 1e-3, 3e-3, 1e-2} on ResNet-20
    optimizer: str = "adam"           # 'adam' | 'sgd'
    momentum: float = 0.9             # sgd only
    temperature: float = 1.0
    train_bn_affine: bool = True      # global stage: BatchNorm weight/bias train too
    milestones: tuple[float, ...] = (0.5, 0.8)   # fractions of global_steps where lr *= gamma
    gamma: float = 0.1
    checkpoint_every: int = 100
    seed: int = 0
    mixup: float = 0.0                # > 0: each image mixed with another of the batch, weight ~ Beta(a, a)

    def __post_init__(self) -> None:
        for k in ("layer_steps", "global_steps"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)}")
        for k in ("batch_size", "checkpoint_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if not (self.mixup >= 0 and math.isfinite(self.mixup)):
            raise ValueError(f"mixup must be a finite alpha >= 0 (0: off), got {self.mixup}")
        for k in ("layer_lr", "global_lr", "temperature"):
            if not getattr(self, k) > 0:
                raise ValueError(f"{k} must be > 0, got {getattr(self, k)}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        self.milestones = tuple(float(m) for m in self.milestones)
        if any(not 0 < m < 1 for m in self.milestones):
            raise ValueError(f"milestones are fractions in (0, 1), got {self.milestones}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneConfig":
        """From a JSON dict; unknown keys are refused with the list of known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown fine-tuning key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @property
    def enabled(self) -> bool:
        return self.layer_steps > 0 or self.global_steps > 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * t * t


# ----------------------------------------------------------------------------- data stream

def _as_dataset(data: Any) -> torch.utils.data.Dataset:
    ds = getattr(data, "dataset", data)
    if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
        raise TypeError("fine-tuning needs a map-style dataset (or a DataLoader over one) for a "
                        "deterministic, resumable stream")
    if len(ds) == 0:
        raise ValueError("the fine-tuning data is empty")
    return ds


def batch_at(ds: torch.utils.data.Dataset, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """Batch number `step` of the deterministic stream over `ds` (labels, if any, dropped)."""
    n = len(ds)
    bs = min(batch_size, n)
    per_epoch = n // bs
    epoch, b = divmod(step, per_epoch)
    if hasattr(ds, "set_epoch"):
        ds.set_epoch(epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    items = [ds[int(i)] for i in perm[b * bs:(b + 1) * bs]]
    xs = [it[0] if isinstance(it, (tuple, list)) else it for it in items]
    return torch.stack(xs)


def mix_batch(x: torch.Tensor, alpha: float, seed: int, step: int) -> torch.Tensor:
    """Mixup without labels: image i becomes lam_i x_i + (1 - lam_i) x_perm(i), lam_i ~ Beta(alpha, alpha),
    seeded by (seed, step). Teacher and student see the same mixed image (distillation on the whole
    neighbourhood of the few unlabelled images, not only on them)."""
    n = x.shape[0]
    if alpha <= 0 or n < 2:
        return x
    rng = np.random.default_rng([seed & 0xFFFFFFFF, step, 0x6D6978])
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=n)).to(x.device, x.dtype)  # (N,)
    perm = torch.from_numpy(rng.permutation(n)).to(x.device)                     # (N,)
    lam = lam.view(-1, *([1] * (x.dim() - 1)))                                   # (N, 1, ...)
    return lam * x + (1 - lam) * x[perm]                                         # (N, ...)


def stream(ds, start: int, steps: int, batch_size: int, seed: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(step, batch) for steps start..steps-1; the next batch is prepared in a background thread while
    the caller trains on this one (a batch depends only on its step: the stream stays deterministic)."""
    if start >= steps:
        return
    pool = ThreadPoolExecutor(max_workers=1)
    nxt = pool.submit(batch_at, ds, start, batch_size, seed)
    try:
        for s in range(start, steps):
            x = nxt.result()
            if s + 1 < steps:
                nxt = pool.submit(batch_at, ds, s + 1, batch_size, seed)
            yield s, x
    finally:        # stopped early (an error, a closed generator): the worker must not touch `ds` afterwards
        nxt.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- training

@contextmanager
def _train_only(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Only `params` require grad inside the block; every flag of `model` is restored afterwards."""
    all_params = list(model.parameters())
    flags = [p.requires_grad for p in all_params]
    for p in all_params:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, f in zip(all_params, flags):
            p.requires_grad_(f)


def _optimizer(params: list[nn.Parameter], lr: float, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum)


def _step(student: nn.Module, teacher: nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer, cfg: FinetuneConfig,
          step: int, seed: int) -> float:
    x = x.to(next(iter(opt.param_groups[0]["params"])).device, non_blocking=True)
    x = mix_batch(x, cfg.mixup, seed, step)                 # on the device: mixing is a whole-batch op
    t = cfg.temperature
    if x.dim() == 4:      # NHWC: conv forward+backward ~1.3-2x faster on CPU (ResNet-20/56, EfficientNet-Lite0)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        zt = teacher(x)
    loss = distill_loss(student(x), zt, t)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite distillation loss at step {step}; lower the learning rate")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def finetune_layer(student: nn.Module, teacher: nn.Module, layer: nn.Module, data: Any, cfg: FinetuneConfig,
                   seed: int = 0, progress: bool = False) -> dict[str, float]:
    """Train only `layer.codebook` by distillation, BatchNorm frozen (eval mode). Returns loss figures."""
    if teacher is None:
        raise ValueError("fine-tuning needs the uncompressed teacher model")
    if not is_pq(layer):
        raise TypeError("finetune_layer needs a product-quantized layer")
    ds = _as_dataset(data)
    student.eval()
    teacher.eval()
    opt = _optimizer([layer.codebook], cfg.layer_lr, cfg)
    losses = []
    with _train_only(student, [layer.codebook]):
        with closing(stream(ds, 0, cfg.layer_steps, cfg.batch_size, cfg.seed + seed)) as steps:
            for s, x in tqdm(steps, total=cfg.layer_steps, desc="layer ft", leave=False, disable=not progress):
                losses.append(_step(student, teacher, x, opt, cfg, s, cfg.seed + seed))
    layer.codebook.data = round_codebook(layer.codebook.data, layer.codebook_bits)   # what the file will hold
    return {"first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:])}


def _lr_at(step: int, cfg: FinetuneConfig) -> float:
    return cfg.global_lr * cfg.gamma ** sum(step >= m * cfg.global_steps for m in cfg.milestones)


def global_params(student: nn.Module, cfg: FinetuneConfig) -> list[nn.Parameter]:
    params = list({id(m.codebook): m.codebook for m in student.modules() if is_pq(m)}.values())  # shared once
    if cfg.train_bn_affine:
        for m in student.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                params += [m.weight, m.bias]
    return params


def finetune_global(student: nn.Module, teacher: nn.Module, data: Any, cfg: FinetuneConfig, seed: int = 0,
                    start: int = 0, opt_state: dict | None = None, on_checkpoint=None,
                    progress: bool = True) -> dict[str, Any]:
    """All codebooks (and BatchNorm affine) by distillation, eval mode, step lr schedule.

    `on_checkpoint(step, optimizer)` is called every `cfg.checkpoint_every` steps and at the end;
    (`start`, `opt_state`) resume a run."""
    if teacher is None:
        raise ValueError("fine-tuning needs the uncompressed teacher model")
    ds = _as_dataset(data)
    params = global_params(student, cfg)
    student.eval()
    teacher.eval()
    opt = _optimizer(params, cfg.global_lr, cfg)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    losses: list[float] = []
    bar = tqdm(total=cfg.global_steps, initial=start, desc="global ft", unit="step", disable=not progress)
    with _train_only(student, params), bar, closing(stream(ds, start, cfg.global_steps, cfg.batch_size,
                                                            cfg.seed + seed + 1)) as steps:
        for s, x in steps:
            for group in opt.param_groups:
                group["lr"] = _lr_at(s, cfg)
            losses.append(_step(student, teacher, x, opt, cfg, s, cfg.seed + seed + 1))
            bar.update(1)
            if len(losses) % 10 == 0:
                bar.set_postfix(loss=f"{sum(losses[-10:]) / 10:.4f}")
            if on_checkpoint is not None and ((s + 1) % cfg.checkpoint_every == 0 or s + 1 == cfg.global_steps):
                on_checkpoint(s + 1, opt)
    n_images = cfg.global_steps * min(cfg.batch_size, len(ds))
    return {"steps": cfg.global_steps, "images_seen": n_images,
            "last_loss": sum(losses[-10:]) / max(1, len(losses[-10:])) if losses else math.nan}


# ----------------------------------------------------------------------------- optimizer state <-> tensors

def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten an optimizer state into named tensors + a JSON part (for safetensors checkpoints)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"__opt__.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("__opt__."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}
