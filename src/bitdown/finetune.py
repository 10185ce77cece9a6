"""Distillation fine-tuning of the codebooks (labels never used).

Loss (`FinetuneConfig.loss`), between the student's and the teacher's outputs on the same images:

- "kl": KL(teacher || student) over the class axis at temperature T (times T^2), for (N, C) logits:

      L = T^2 * mean_n sum_c softmax(z_t / T) * (log softmax(z_t / T) - log softmax(z_s / T))

  Any other shape is a ValueError (a softmax over dim 1 of a feature map or a detector head would
  silently train on nonsense).
- "mse": normalised MSE, per tensor  L = sum((s - t)^2) / (sum(t^2) + eps)  (scale-free: 1 means
  "as far as predicting zero"), for any shape.
- "auto" (default): "kl" for a 2-D (N, C >= 2) tensor, "mse" for any other tensor.
- "bce": every element is a logit read through a sigmoid (a YOLO head: objectness, class and box maps are all
  sigmoid(raw) in its decode); per tensor the Bernoulli KL, summed over elements and averaged over the batch,

      L = (1/N) sum BCE(s, sigmoid(t)) - BCE(t, sigmoid(t))     (0 when s = t; gradient sigmoid(s) - sigmoid(t))

  so an error counts by what it does to the decoded probability, not by the size of the raw value (the
  background's very negative class logits dominate a plain MSE on the raw maps).

A tuple / list / dict output (nested allowed: a detector's feature pyramid, a HuggingFace ModelOutput)
gives the sum of the losses of the floating-point tensors it contains, paired by position (dict: by
key). Integer / bool tensors carry no gradient and are skipped; other non-tensor leaves (None, numbers)
must be equal in both outputs. Any other output (a string, a custom object, no floating tensor at all)
is a TypeError; `check_outputs` runs the model once so that this is known before any work.

- per layer (`finetune_layer`): right after a layer's EM, only its codebook trains; the model is in
  eval mode, so BatchNorm is frozen (running statistics and affine). With a `holdout` tensor (and
  `layer_guard`, default on) the same distillation loss is measured on the holdout before and after the
  layer's steps and the layer's codebook is put back (its EM result) when the stage made the student worse
  (`_worse`: the loss rose, or, for class logits distilled by KL, the top-1 agreement with the teacher fell by
  more than the slice's binomial band). The teacher's
  outputs on the holdout are computed once per run (`teacher_outputs`), so the guard costs two student
  forwards of the holdout per layer;
- global (`finetune_global`): every codebook together, optionally the BatchNorm affine parameters,
  still in eval mode (running statistics fixed; compress() re-estimates them first when
  QuantConfig.recalibrates_bn, by default only without teacher targets: docs/DESIGN.md), with a step
  (`milestones` x `gamma`) or cosine (`schedule`) learning-rate schedule, checkpointed every `checkpoint_every`
  steps. With a `holdout` tensor of images (never trained on) the stage never returns a student worse than before it: the distillation
  loss (and the top-1 agreement) on the holdout is measured before and after, and when the stage made the
  student worse (`_worse`, the same rule as per layer) the parameters this stage
  trains are put back as they were (a resumed run needs `holdout_state`, which compress keeps in its
  checkpoints). compress() draws the holdout with `split_holdout`: `FinetuneConfig.holdout` images (10 %,
  16..256, at most a quarter, by default) at seeded positions of the fine-tuning dataset, removed from the
  stream of both fine-tuning stages; both guards use it.

Gradients reach a codeword through the decode W = codebook[codes]: its gradient is the *sum* of the
gradients of the subvectors assigned to it. The original CentroidSGD used the *mean*, so a plain-SGD
learning rate lr_orig corresponds to lr_orig / (subvectors per codeword) here. With the default
Adam the question disappears: Adam's update is invariant to a per-parameter gradient scale.

The training stream is the augmented, unlabelled calibration data, deterministic in (seed, step):
batch s of a run is batch (s mod B) of the permutation of epoch s // B, so a resumed run sees the
same images as an uninterrupted one.

Gradient slices (`grad_slices` S, here and in block reconstruction): every step's batch is cut into S fixed
slices (`dist.slices`); each slice gets its own teacher forward and student forward / backward, and the step's
gradient (and loss) is the sum of the S slice gradients added in slice order (`slice_step`, `dist.sum_slices`).
Under torchrun with N processes each holds S/N slices (N must divide S), so the gradient has the same bits for
any N that divides S: the same file from 1 or N processes (docs/DESIGN.md, "Session 10"). Nothing else depends
on how the batch is cut: the models stay in eval mode (BatchNorm uses its running statistics), mixup mixes the
whole batch before it is cut, KL / BCE are divided by the whole batch's image count and the normalised MSE by
the whole batch's teacher energy (summed over the slices in slice order).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import dist
from .config import GRAD_SLICES, check_int
from .modules import is_pq, round_codebook, round_codebooks_

log = logging.getLogger(__name__)

LOSSES = ("auto", "kl", "mse", "bce")
MSE_EPS = 1e-12          # normalised MSE: sum((s - t)^2) / (sum(t^2) + MSE_EPS)
HOLDOUT_MIN, HOLDOUT_MAX = 16, 256     # a fractional holdout: at least / at most this many images
TARGETS_MAX_BYTES = 256 * 2**20        # the teacher's outputs on the holdout are kept when at most this large
SCHEDULES = ("step", "cosine")         # FinetuneConfig.schedule: the global stage's learning-rate schedule
AGREEMENT_TOL_IMAGES = 1               # the guards' floor: a stage may always lose this many top-1 matches (`_worse`)


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
    train_bias: bool = False          # global stage: the biases of the compressed conv / linear layers train too
                                      # (a detector's head convs: its objectness and class offsets)
    milestones: tuple[float, ...] = (0.5, 0.8)   # fractions of global_steps where lr *= gamma
    gamma: float = 0.1
    schedule: str = "step"            # global stage lr: 'step' (milestones x gamma) | 'cosine' (global_lr -> 0)
    checkpoint_every: int = 100
    seed: int = 0
    mixup: float = 0.0                # > 0: each image mixed with another of the batch, weight ~ Beta(a, a)
    loss: str = "auto"                # 'auto' | 'kl' | 'mse' | 'bce': see the module docstring
    holdout: int | float = 0.1        # images compress() keeps out of fine-tuning for the guards of both stages:
                                      # a count, or a fraction (clamped to 16..256, at most a quarter); 0: off
    grad_slices: int = GRAD_SLICES    # each step's gradient: the sum of this many slices of the batch, in order
                                      # (the same file for any number of processes that divides it)
    layer_guard: bool = True          # per-layer stage: undo a layer's steps that made the holdout figures worse

    def __post_init__(self) -> None:
        h = self.holdout
        if isinstance(h, bool) or not isinstance(h, (int, float)):
            raise ValueError(f"holdout must be an image count (int >= 0) or a fraction in [0, 1), got {h!r}")
        if isinstance(h, float) and not 0 <= h < 1:
            raise ValueError(f"holdout must be a fraction in [0, 1) or an image count (int >= 0), got {h!r}")
        if isinstance(h, int) and h < 0:
            raise ValueError(f"holdout must be an image count >= 0 (0: off) or a fraction in [0, 1), got {h}")
        if not isinstance(self.layer_guard, bool):
            raise ValueError(f"layer_guard must be true or false, got {self.layer_guard!r}")
        for k in ("layer_steps", "global_steps"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)}")
        for k in ("batch_size", "checkpoint_every", "grad_slices"):
            check_int(getattr(self, k), k, 1)
        if not (self.mixup >= 0 and math.isfinite(self.mixup)):
            raise ValueError(f"mixup must be a finite alpha >= 0 (0: off), got {self.mixup}")
        for k in ("layer_lr", "global_lr", "temperature"):
            if not getattr(self, k) > 0:
                raise ValueError(f"{k} must be > 0, got {getattr(self, k)}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(repr(k) for k in LOSSES)}, got {self.loss!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(repr(k) for k in SCHEDULES)}, got {self.schedule!r}")
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


_LEAVES = (type(None), bool, int, float)


def _pairs(s: Any, t: Any, path: str = "output") -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(path, student tensor, teacher tensor) for every floating-point tensor of two outputs, paired by
    structure. Raises TypeError for an unsupported type, ValueError for outputs that do not pair."""
    if isinstance(t, torch.Tensor):
        if not isinstance(s, torch.Tensor):
            raise ValueError(f"{path}: the teacher gives a tensor, the student a {type(s).__name__}")
        if s.shape != t.shape:
            raise ValueError(f"{path}: student shape {tuple(s.shape)} != teacher shape {tuple(t.shape)}")
        if t.is_floating_point():       # integer / bool tensors (indices, masks) have no gradient: skipped
            yield path, s, t
    elif isinstance(t, Mapping):
        if not isinstance(s, Mapping) or set(s) != set(t):
            raise ValueError(f"{path}: the outputs do not have the same keys "
                             f"(student {sorted(map(str, s)) if isinstance(s, Mapping) else type(s).__name__}, "
                             f"teacher {sorted(map(str, t))})")
        for k in t:
            yield from _pairs(s[k], t[k], f"{path}[{k!r}]")
    elif isinstance(t, (tuple, list)):
        if not isinstance(s, (tuple, list)) or len(s) != len(t):
            raise ValueError(f"{path}: the teacher gives a {type(t).__name__} of {len(t)}, the student "
                             + (f"a {type(s).__name__} of {len(s)}" if isinstance(s, (tuple, list))
                                else f"a {type(s).__name__}"))
        for i, (a, b) in enumerate(zip(s, t)):
            yield from _pairs(a, b, f"{path}[{i}]")
    elif isinstance(t, _LEAVES):
        if type(s) is not type(t) or s != t:
            raise ValueError(f"{path}: non-tensor values differ (student {s!r}, teacher {t!r})")
    else:
        raise TypeError(f"{path}: cannot distil a model output of type {type(t).__qualname__}; supported: a "
                        "tensor, or a tuple / list / dict of tensors (nested)")


def _kind(t: torch.Tensor, loss: str, path: str = "output") -> str:
    """The loss ('kl', 'mse' or 'bce') used for tensor `t` under the `loss` setting."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(repr(k) for k in LOSSES)}, got {loss!r}")
    is_logits = t.dim() == 2 and t.shape[1] >= 2
    if loss == "kl" and not is_logits:
        raise ValueError(f"loss 'kl' needs (N, C >= 2) class logits, but {path} has shape {tuple(t.shape)}; "
                         "use loss 'mse' (or 'auto') for feature maps and other outputs")
    if loss == "auto":
        return "kl" if is_logits else "mse"
    return loss


def _tensor_loss(s: torch.Tensor, t: torch.Tensor, kind: str, temperature: float, n_total: int | None = None,
                 norm: torch.Tensor | None = None) -> torch.Tensor:
    if kind == "kl":
        T = temperature
        if n_total is not None:     # some rows of a batch of n_total: their share of the batch mean
            return F.kl_div(F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1),
                            reduction="sum", log_target=True) / n_total * T * T
        return F.kl_div(F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1),
                        reduction="batchmean", log_target=True) * T * T
    s, t = s.float(), t.float()        # sums of squares of a large map: fp32 at least
    if kind == "bce":               # per-image mean (of a slice: its share of the batch's)
        p = torch.sigmoid(t)
        kl = (F.binary_cross_entropy_with_logits(s, p, reduction="sum")
              - F.binary_cross_entropy_with_logits(t, p, reduction="sum"))
        return kl / (n_total if n_total is not None else max(1, s.shape[0])) if s.dim() else kl
    return (s - t).pow(2).sum() / ((t.pow(2).sum() if norm is None else norm) + MSE_EPS)


def distill_loss(student_out: Any, teacher_out: Any, temperature: float = 1.0, loss: str = "auto",
                 n_total: int | None = None, norms: torch.Tensor | None = None) -> torch.Tensor:
    """Distillation loss between two model outputs (the module docstring): a scalar tensor, the sum
    over the paired floating-point tensors of KL (class logits) or normalised MSE (anything else).
    A gradient slice's share of its batch's loss (the shares sum to it): `n_total`, the batch's rows (KL and BCE
    summed over the slice's rows / n_total), `norms`, the batch's teacher energy of each MSE tensor in order
    (`mse_energies` summed over the slices), else each MSE tensor is normalised by its own teacher energy."""
    pairs = list(_pairs(student_out, teacher_out))
    if not pairs:
        raise TypeError(f"the model output ({type(teacher_out).__qualname__}) holds no floating-point tensor "
                        "to distil")
    kinds = [_kind(t, loss, path) for path, _, t in pairs]
    mse = iter(norms if norms is not None else [])
    total = None
    for (path, s, t), kind in zip(pairs, kinds):
        term = _tensor_loss(s, t, kind, temperature, n_total, next(mse, None) if kind == "mse" else None)
        total = term if total is None else total + term
    return total


def mse_energies(teacher_out: Any, loss: str = "auto") -> torch.Tensor:
    """(m,) float32: sum(t^2) of each of the m tensors of `teacher_out` that `loss` distils by normalised MSE, in
    `distill_loss` order (m = 0: none)."""
    ts = [t for path, _, t in _pairs(teacher_out, teacher_out) if _kind(t, loss, path) == "mse"]
    return torch.stack([t.detach().float().pow(2).sum() for t in ts]) if ts else torch.zeros(0)


def describe_output(out: Any, loss: str = "auto") -> str:
    """'tensor (N, 10): kl', 'tuple of 3 tensors: mse', 'dict of 2 tensors: kl + mse' (validates `out`)."""
    pairs = list(_pairs(out, out))
    if not pairs:
        raise TypeError(f"the model output ({type(out).__qualname__}) holds no floating-point tensor to distil")
    kinds = [_kind(t, loss, path) for path, _, t in pairs]
    kind = " + ".join(k for k in LOSSES if k in kinds)
    if isinstance(out, torch.Tensor):
        return f"tensor {'(N, ' + ', '.join(map(str, out.shape[1:])) + ')' if out.dim() else '()'}: {kind}"
    n = len(pairs)
    return f"{type(out).__name__} of {n} tensor{'s' if n > 1 else ''}: {kind}"


def check_outputs(model: nn.Module, x: torch.Tensor, loss: str = "auto") -> str:
    """Run `model` once (eval mode, no grad, on the first 2 images of `x`, moved to the model's device) and
    check that its output can be distilled with `loss`: TypeError / ValueError with a clear message otherwise.
    Meant to be called before any compression work. Returns a short description of the output and the loss
    used (`describe_output`)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"check_outputs needs a tensor of images, got {type(x).__qualname__}")
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:2].to(next(iter(model.parameters()), x).device))
    finally:
        model.train(training)
    desc = describe_output(out, loss)
    log.debug("distillation on the model output: %s", desc)
    return desc


# ----------------------------------------------------------------------------- data stream

def _as_dataset(data: Any) -> torch.utils.data.Dataset:
    ds = getattr(data, "dataset", data)
    if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
        raise TypeError("fine-tuning needs a map-style dataset (or a DataLoader over one) for a "
                        "deterministic, resumable stream")
    if len(ds) == 0:
        raise ValueError("the fine-tuning data is empty")
    return ds


def holdout_size(n_images: int, holdout: int | float) -> int:
    """How many of `n_images` fine-tuning images a `holdout` setting keeps out: an int is a count (at most half
    of the images, else a ValueError); a fraction f gives ceil(f * n) clamped to [HOLDOUT_MIN, HOLDOUT_MAX] and
    to at most a quarter of the images; 0 is none."""
    if isinstance(holdout, int):
        if 2 * holdout > n_images:
            raise ValueError(f"holdout={holdout} images would leave fewer of the {n_images} fine-tuning images to "
                             f"train on than it holds out; use at most {n_images // 2} (or a fraction, or 0: off)")
        return holdout
    if holdout <= 0:
        return 0
    return min(max(math.ceil(holdout * n_images), HOLDOUT_MIN), HOLDOUT_MAX, n_images // 4)


class _Without(torch.utils.data.Dataset):
    """`ds` restricted to the positions `keep` (the fine-tuning images outside the holdout); `set_epoch` is
    passed on, so an augmenting dataset keeps its per-image augmentation stream."""

    def __init__(self, ds: torch.utils.data.Dataset, keep: torch.Tensor) -> None:
        self.ds, self.keep = ds, keep

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int) -> Any:
        return self.ds[int(self.keep[i])]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(epoch)


def split_holdout(data: Any, cfg: FinetuneConfig) -> tuple[torch.utils.data.Dataset, torch.Tensor | None]:
    """(the dataset fine-tuning draws from, the holdout images): `holdout_size` images of `data` (a map-style
    dataset or a DataLoader over one) at seeded random positions (cfg.seed), read at epoch 0, are kept out of
    the stream; (the dataset, None) when the holdout is 0."""
    ds = _as_dataset(data)
    n = holdout_size(len(ds), cfg.holdout)
    if n == 0:
        return ds, None
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.seed * 7919 + 104723))
    held = perm[:n].sort().values
    keep = perm[n:].sort().values
    if hasattr(ds, "set_epoch"):
        ds.set_epoch(0)
    items = [ds[int(i)] for i in held]
    x = torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items])
    log.info("holdout: %d of the %d fine-tuning images kept out of fine-tuning to check it", n, len(ds))
    return _Without(ds, keep), x


def batch_at(ds: torch.utils.data.Dataset, step: int, batch_size: int, seed: int,
             rows: slice | None = None) -> torch.Tensor:
    """Batch number `step` of the deterministic stream over `ds` (labels, if any, dropped); `rows`: only
    those rows of it (a rank's part under torchrun: only they are read)."""
    n = len(ds)
    bs = min(batch_size, n)
    per_epoch = n // bs
    epoch, b = divmod(step, per_epoch)
    if hasattr(ds, "set_epoch"):
        ds.set_epoch(epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    items = [ds[int(i)] for i in perm[b * bs:(b + 1) * bs][rows if rows is not None else slice(None)]]
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


def stream(ds, start: int, steps: int, batch_size: int, seed: int,
           rows: slice | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(step, batch) for steps start..steps-1 (`rows` of each batch: batch_at); the next batch is prepared in
    a background thread while the caller trains on this one (a batch depends only on its step: the stream
    stays deterministic)."""
    if start >= steps:
        return
    pool = ThreadPoolExecutor(max_workers=1)
    nxt = pool.submit(batch_at, ds, start, batch_size, seed, rows)
    try:
        for s in range(start, steps):
            x = nxt.result()
            if s + 1 < steps:
                nxt = pool.submit(batch_at, ds, s + 1, batch_size, seed, rows)
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


def batch_rows(cfg: FinetuneConfig, data: Any) -> int:
    """The images of every fine-tuning step's batch (`data`: a map-style dataset or a DataLoader over one),
    checked against the gradient slices before any step (N processes must divide cfg.grad_slices; a batch
    smaller than grad_slices is refused)."""
    dist.check_slices(cfg.grad_slices, "fine-tuning")
    n = min(cfg.batch_size, len(_as_dataset(data)))
    if n < cfg.grad_slices:
        raise ValueError(f"fine-tuning: a batch of {n} images cannot be cut into grad_slices={cfg.grad_slices} "
                         "gradient slices; lower grad_slices (--grad-slices) or use more images")
    return n


def _rows(cfg: FinetuneConfig, n: int) -> slice | None:
    """The rows of each batch (of n) this process reads: those of its gradient slices (dist.my_rows), all of them
    with mixup, which mixes across the whole batch (then cut)."""
    return dist.my_rows(n, cfg.grad_slices) if cfg.mixup == 0 else None


def slice_step(slice_losses: list[Any], opt: torch.optim.Optimizer, what: str) -> float:
    """One optimizer step whose gradient is a fixed sum of gradient slices. `slice_losses`: one per slice this
    process holds (dist.my_slices order), a function computing that slice's share of the step's loss (None: an
    empty slice, zero). Each slice's gradient comes from its own backward; `dist.sum_slices` adds every slice's
    gradient and loss in slice order (the same bits for any number of processes), then opt.step(). A non-finite
    loss is a FloatingPointError naming `what`, raised on every rank before the step. Returns the step's loss."""
    params = [p for g in opt.param_groups for p in g["params"]]
    if any(p.dtype != torch.float32 for p in params):
        raise TypeError("gradient slices need float32 parameters")
    rows = []
    for fn in slice_losses:
        for p in params:
            p.grad = None
        if fn is None:
            rows.append(params[0].new_zeros(sum(p.numel() for p in params) + 1))
            continue
        loss = fn()
        loss.backward()
        rows.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
                              + [loss.detach().float().reshape(1)]))
    total = dist.sum_slices(torch.stack(rows), "gradient slices")
    if not torch.isfinite(total[-1]):
        raise FloatingPointError(what)
    offset = 0
    for p in params:
        p.grad = total[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    opt.step()
    return float(total[-1])


def nhwc(x: torch.Tensor) -> torch.Tensor:
    """NHWC: conv forward+backward ~1.3-2x faster on CPU (ResNet-20/56, EfficientNet-Lite0)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _step(student: nn.Module, teacher: nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer, cfg: FinetuneConfig,
          step: int, seed: int, n: int) -> float:
    """One distillation step of a batch of `n` images: `x` holds this process's rows of it (`_rows`: all of them
    with mixup, mixed here, then cut), one teacher forward and one student forward / backward per gradient slice
    (the same slices, shapes and sums whatever the number of processes)."""
    x = x.to(next(iter(opt.param_groups[0]["params"])).device, non_blocking=True)
    x = mix_batch(x, cfg.mixup, seed, step)                 # on the device: mixing is a whole-batch op
    mine = dist.my_slices(n, cfg.grad_slices)
    first = 0 if cfg.mixup > 0 else mine[0].start           # the batch row that x's row 0 holds
    parts = [nhwc(x[s.start - first:s.stop - first]) for s in mine]
    with torch.no_grad():
        zts = [teacher(xs) for xs in parts]
    energies = torch.stack([mse_energies(zt, cfg.loss).to(x.device) for zt in zts])      # (S/N, m)
    norms = dist.sum_slices(energies, "the distillation loss normalisers") if energies.shape[1] else None
    return slice_step([lambda xs=xs, zt=zt: distill_loss(student(xs), zt, cfg.temperature, cfg.loss, n, norms)
                       for xs, zt in zip(parts, zts)], opt,
                      f"non-finite distillation loss at step {step}; lower the learning rate")


def finetune_layer(student: nn.Module, teacher: nn.Module, layer: nn.Module, data: Any, cfg: FinetuneConfig,
                   seed: int = 0, progress: bool = False, holdout: torch.Tensor | None = None,
                   targets: list[Any] | None = None, name: str = "the layer") -> dict[str, Any]:
    """Train only `layer.codebook` by distillation, BatchNorm frozen (eval mode). Returns loss figures.

    Guard (with `holdout`, images never trained on, and cfg.layer_guard): the distillation loss on the holdout
    is measured before and after the steps (`evaluate_holdout`; `targets`: the teacher's outputs on it from
    `teacher_outputs`, else the teacher runs each time); when the layer's steps made the student worse
    (`_worse`: the loss rose, or, for class logits, the top-1 agreement fell beyond the slice's binomial band) the codebook
    is put back exactly as it was before the steps and a WARNING names the layer (`name`), why and the figures.
    result["holdout"]: {"loss_before", "loss_after", "agreement_before", "agreement_after" (None unless the
    output is class logits), "kept": "finetuned" | "before"}."""
    if teacher is None:
        raise ValueError("fine-tuning needs the uncompressed teacher model")
    if not is_pq(layer):
        raise TypeError("finetune_layer needs a product-quantized layer")
    ds = _as_dataset(data)
    student.eval()
    teacher.eval()
    n = batch_rows(cfg, ds)
    guard = holdout is not None and cfg.layer_guard
    before, saved = None, None
    if guard:
        before = _layer_figures(student, teacher, holdout, cfg, targets, name)
        saved = layer.codebook.detach().clone()
    opt = _optimizer([layer.codebook], cfg.layer_lr, cfg)
    losses = []
    with _train_only(student, [layer.codebook]):
        with closing(stream(ds, 0, cfg.layer_steps, cfg.batch_size, cfg.seed + seed, _rows(cfg, n))) as steps:
            for s, x in tqdm(steps, total=cfg.layer_steps, desc="layer ft", leave=False,
                             disable=not (progress and dist.is_main())):
                losses.append(_step(student, teacher, x, opt, cfg, s, cfg.seed + seed, n))
    layer.codebook.data = round_codebook(layer.codebook.data, layer.codebook_bits)   # what the file will hold
    out: dict[str, Any] = {"first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:])}
    if guard:
        after = _layer_figures(student, teacher, holdout, cfg, targets, name)
        out["holdout"] = {"loss_before": before["loss"], "loss_after": after["loss"],
                          "agreement_before": before["agreement"], "agreement_after": after["agreement"],
                          "kept": "finetuned"}
        why = _worse(before, after, cfg.loss)
        if why:
            with torch.no_grad():
                layer.codebook.copy_(saved)
            out["holdout"]["kept"] = "before"
            log.warning("holdout: the per-layer fine-tuning of %s made the student worse (%s; loss %s): its "
                        "codebook from before it is restored; try a lower layer_lr", name, why, _figures(before, after))
        else:
            log.info("holdout: the per-layer fine-tuning of %s: loss %s", name, _figures(before, after))
    return out


def _layer_figures(student: nn.Module, teacher: nn.Module, holdout: torch.Tensor, cfg: FinetuneConfig,
                   targets: list[Any] | None, name: str) -> dict[str, Any]:
    """evaluate_holdout on rank 0, sent to every rank (under torchrun every rank then takes the same decision)."""
    return dist.on_main(lambda: evaluate_holdout(student, teacher, holdout, cfg, targets),
                        f"the holdout figures of {name}")


def _worse(before: dict[str, Any], after: dict[str, Any], loss: str) -> str | None:
    """The guards' rule (both stages): why the stage made the student worse on the holdout, None when it did not.

    - the distillation loss went up (a NaN after counts as worse): "the distillation loss rose";
    - class logits distilled by KL (`loss` "kl" / "auto" and both figures carry an "agreement"): the top-1
      agreement with the teacher fell by more than max(AGREEMENT_TOL_IMAGES, sqrt(n p (1 - p))) images of the
      holdout's n (p: the agreement before), even if the loss fell (the soft KL can fall while arg-max matches are
      lost: EfficientNet-Lite0, docs/DESIGN.md session 13). The binomial band: a helpful ResNet-20 global stage
      flips ~7 % of the matches both ways, so a fixed one-image slack undid it on 24 % of random 256-image
      slices, the band on 7 % (loss rule alone: 2 %; benchmarks/results/guard_slices_resnet20_cifar10.md).
    Other outputs (detector maps, "mse" / "bce" losses) keep the loss-only rule."""
    if not after["loss"] <= before["loss"]:
        return "the distillation loss rose"
    a0, a1 = before.get("agreement"), after.get("agreement")
    if loss in ("kl", "auto") and a0 is not None and a1 is not None:
        n = after["n"]
        k0, k1 = round(a0 * n), round(a1 * n)                         # top-1 matches before / after, as counts
        if n and k0 - k1 > max(AGREEMENT_TOL_IMAGES, math.sqrt(k0 * (n - k0) / n)):
            return f"the teacher agreement fell by {k0 - k1} of {n} images"
    return None


def _lr_at(step: int, cfg: FinetuneConfig) -> float:
    """The global stage's learning rate at `step` (0-based) of cfg.global_steps."""
    if cfg.schedule == "cosine":
        return cfg.global_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.global_steps))
    return cfg.global_lr * cfg.gamma ** sum(step >= m * cfg.global_steps for m in cfg.milestones)


def global_params(student: nn.Module, cfg: FinetuneConfig) -> list[nn.Parameter]:
    params = list({id(m.codebook): m.codebook for m in student.modules() if is_pq(m)}.values())  # shared once
    if cfg.train_bn_affine:
        for m in student.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                params += [m.weight, m.bias]
    if cfg.train_bias:
        params += [m.bias for m in student.modules() if is_pq(m) and isinstance(getattr(m, "bias", None), nn.Parameter)]
    return params


def teacher_outputs(teacher: nn.Module, holdout: torch.Tensor, cfg: FinetuneConfig,
                    max_bytes: int = TARGETS_MAX_BYTES) -> list[Any] | None:
    """The teacher's outputs on `holdout` in batches of cfg.batch_size (eval mode, no grad): the `targets` of
    `evaluate_holdout`, so that a run evaluating the holdout many times (the per-layer guard) runs the teacher
    on it once; None when they would take more than `max_bytes` (estimated from the first batch)."""
    from .blockio import tensors_of

    dev = next(iter(teacher.parameters()), torch.empty(0)).device
    batches = holdout.split(cfg.batch_size)
    out: list[Any] = []
    mode = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            for xb in batches:
                out.append(teacher(nhwc(xb.to(dev, non_blocking=True))))
                if len(out) == 1 and sum(t.nbytes for t in tensors_of(out[0])) * len(batches) > max_bytes:
                    return None
    finally:
        teacher.train(mode)
    return out


def evaluate_holdout(student: nn.Module, teacher: nn.Module, holdout: torch.Tensor,
                     cfg: FinetuneConfig, targets: list[Any] | None = None) -> dict[str, Any]:
    """Distillation loss (cfg.loss, cfg.temperature) of `student` against `teacher` on the `holdout` images,
    in batches of cfg.batch_size, eval mode, no grad; the mean over images (each batch's loss weighted by its
    size). "agreement": the fraction of images whose top-1 class is the teacher's, when the output is one
    (N, C >= 2) tensor, else None. `targets`: the teacher's outputs from `teacher_outputs` (not recomputed).
    Returns {"n", "loss", "agreement"}."""
    if not isinstance(holdout, torch.Tensor):
        raise TypeError(f"the holdout must be a tensor of images, got {type(holdout).__qualname__}")
    n = holdout.shape[0] if holdout.dim() else 0
    if n == 0:
        raise ValueError("the holdout is empty")
    batches = holdout.split(cfg.batch_size)
    if targets is not None and len(targets) != len(batches):
        raise ValueError(f"targets holds {len(targets)} batches of teacher outputs for the holdout's "
                         f"{len(batches)}; make them with teacher_outputs()")
    dev = next(iter(student.parameters()), torch.empty(0)).device
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    total, agree, classes = 0.0, 0, True
    try:
        with torch.no_grad():
            for b, xb in enumerate(batches):
                xb = nhwc(xb.to(dev, non_blocking=True))
                zs = student(xb)
                zt = targets[b] if targets is not None else teacher(xb)
                total += float(distill_loss(zs, zt, cfg.temperature, cfg.loss)) * xb.shape[0]
                classes = classes and isinstance(zt, torch.Tensor) and zt.dim() == 2 and zt.shape[1] >= 2
                if classes:
                    agree += int((zs.argmax(1) == zt.argmax(1)).sum())
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    return {"n": n, "loss": total / n, "agreement": agree / n if classes else None}


def finetune_global(student: nn.Module, teacher: nn.Module, data: Any, cfg: FinetuneConfig, seed: int = 0,
                    start: int = 0, opt_state: dict | None = None, on_checkpoint=None,
                    progress: bool = True, holdout: torch.Tensor | None = None,
                    holdout_before: dict[str, Any] | None = None,
                    holdout_state: list[torch.Tensor] | None = None,
                    last_loss: float | None = None) -> dict[str, Any]:
    """All codebooks (and BatchNorm affine) by distillation, eval mode, lr schedule `cfg.schedule`.

    `on_checkpoint(step, optimizer)` is called every `cfg.checkpoint_every` steps and at the end (the end
    one after the holdout guard, so that it holds what is returned); (`start`, `opt_state`) resume a run.
    `last_loss`: the figure of an earlier run, returned unchanged when no step runs here (a finished run
    resumed at start == cfg.global_steps), else the mean loss of the last 10 steps.

    Holdout guard: `holdout` is a tensor of images never trained on. The distillation loss (and, for class
    logits, the top-1 agreement with the teacher) is measured on it before and after training
    (`evaluate_holdout`). When the stage made the student worse (`_worse`: the loss rose, or for class logits
    distilled by KL the agreement fell beyond the slice's binomial band), the trained parameters are restored to their state
    before this stage (a CPU copy of just those is kept) and a WARNING is logged; result["holdout"]["kept"]
    is then "before", else "finetuned". The "before" figures are `holdout_before` when given (the
    `evaluate_holdout` dict of the first run: a resumed run should pass it), else measured here when
    start == 0. A run resumed at start > 0 has no before-state in memory: the guard compares with
    `holdout_before` but cannot restore (logged) unless `holdout_state` is given: the trained parameters'
    values before the stage, in `global_params` order (what `holdout_baseline` returns, kept by a checkpoint);
    without `holdout_before` it only reports the figures after.
    """
    if teacher is None:
        raise ValueError("fine-tuning needs the uncompressed teacher model")
    ds = _as_dataset(data)
    n = batch_rows(cfg, ds)
    params = global_params(student, cfg)
    student.eval()
    teacher.eval()
    before, saved = None, None
    if holdout is not None:
        before, saved = holdout_baseline(student, teacher, holdout, cfg, start, holdout_before, holdout_state)
        if before is not None:
            log.info("holdout before global fine-tuning (%d images): loss %s, agreement %s", holdout.shape[0],
                     _fmt(before["loss"]), _fmt(before.get("agreement"), pct=True))
    opt = _optimizer(params, cfg.global_lr, cfg)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    losses: list[float] = []
    bar = tqdm(total=cfg.global_steps, initial=start, desc="global ft", unit="step",
               disable=not (progress and dist.is_main()))
    with _train_only(student, params), bar, closing(stream(ds, start, cfg.global_steps, cfg.batch_size,
                                                            cfg.seed + seed + 1, _rows(cfg, n))) as steps:
        for s, x in steps:
            for group in opt.param_groups:
                group["lr"] = _lr_at(s, cfg)
            losses.append(_step(student, teacher, x, opt, cfg, s, cfg.seed + seed + 1, n))
            bar.update(1)
            if len(losses) % 10 == 0:
                bar.set_postfix(loss=f"{sum(losses[-10:]) / 10:.4f}")
            if on_checkpoint is not None and (s + 1) % cfg.checkpoint_every == 0 and s + 1 < cfg.global_steps:
                on_checkpoint(s + 1, opt)
    round_codebooks_(student)        # what the file will hold (the per-layer stage rounds too): the guard judges it
    n_images = cfg.global_steps * n
    out: dict[str, Any] = {"steps": cfg.global_steps, "images_seen": n_images,
                           "last_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else last_loss}
    if holdout is not None:
        out["holdout"] = _guard(student, teacher, holdout, cfg, params, before, saved)
    if on_checkpoint is not None and losses:       # the run ends here: the checkpoint holds what is returned
        on_checkpoint(cfg.global_steps, opt)
    return out


def holdout_baseline(student: nn.Module, teacher: nn.Module, holdout: torch.Tensor, cfg: FinetuneConfig,
                     start: int = 0, before: dict[str, Any] | None = None,
                     state: list[torch.Tensor] | None = None) -> tuple[dict[str, Any] | None, list[torch.Tensor] | None]:
    """What the holdout guard compares with and restores: (`before`, else the `evaluate_holdout` figures of
    `student` now when start == 0; `state`, else a CPU copy of the `global_params` when start == 0). Checked."""
    params = global_params(student, cfg)
    if before is not None:
        if not (isinstance(before, Mapping) and isinstance(before.get("loss"), (int, float))):
            raise ValueError("holdout_before must be the dict evaluate_holdout() returned (with a numeric "
                             f"'loss'), got {before!r}")
        before = dict(before)
    if before is None and start == 0:
        before = evaluate_holdout(student, teacher, holdout, cfg)
    if state is not None:
        if [tuple(v.shape) for v in state] != [tuple(p.shape) for p in params]:
            raise ValueError("holdout_state does not match the parameters the global stage trains "
                             f"({len(state)} tensors for {len(params)} parameters, or other shapes)")
    elif start == 0:
        state = [p.detach().to("cpu", copy=True) for p in params]
    return before, state


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.1f} %" if pct else f"{v:.4g}"


def _figures(before: dict[str, Any], after: dict[str, Any]) -> str:
    """'0.301 -> 0.22, agreement 86.7 % -> 87.5 %' (the guards' log lines)."""
    return (f"{_fmt(before['loss'])} -> {_fmt(after['loss'])}, agreement {_fmt(before.get('agreement'), pct=True)} "
            f"-> {_fmt(after.get('agreement'), pct=True)}")


def _guard(student: nn.Module, teacher: nn.Module, holdout: torch.Tensor, cfg: FinetuneConfig,
           params: list[nn.Parameter], before: dict[str, Any] | None,
           saved: list[torch.Tensor] | None) -> dict[str, Any]:
    """The holdout figures after training; restores `saved` into `params` when the stage made the student worse
    (`_worse`: the loss rose, or for class logits the top-1 agreement fell beyond the slice's binomial band)."""
    after = evaluate_holdout(student, teacher, holdout, cfg)
    rec = {"n": after["n"], "loss_before": (before or {}).get("loss"), "loss_after": after["loss"],
           "agreement_before": (before or {}).get("agreement"), "agreement_after": after["agreement"],
           "kept": "finetuned"}
    if before is None:
        log.warning("holdout after global fine-tuning: loss %s, agreement %s; no figures from before it (a "
                    "resumed run without holdout_before): not compared", _fmt(after["loss"]),
                    _fmt(after["agreement"], pct=True))
        return rec
    why = _worse(before, after, cfg.loss)
    if not why:
        log.info("holdout: global fine-tuning kept (loss %s)", _figures(before, after))
        return rec
    if saved is None:
        log.warning("holdout: global fine-tuning made the student worse (%s; loss %s), but this run was resumed "
                    "mid-way: the state before it is not available, the fine-tuned parameters are kept", why,
                    _figures(before, after))
        return rec
    with torch.no_grad():
        for p, v in zip(params, saved):
            p.copy_(v.to(p.device))
    rec["kept"] = "before"
    log.warning("holdout: global fine-tuning made the student worse (%s; loss %s): the parameters from before it "
                "are restored; try a lower global_lr", why, _figures(before, after))
    return rec


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
