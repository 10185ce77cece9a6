"""Top-1 / top-5 accuracy of a classifier over a labelled loader, and top-1 agreement with a teacher."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .modules import module_device


EVAL_BATCH_MAX, EVAL_BATCH_MIN = 256, 16


def eval_batch_size(image_shape: torch.Size | tuple[int, ...]) -> int:
    """Images per evaluation forward for images of `image_shape` (C, H, W): 256 at CIFAR's 32x32, fewer for larger
    images (the same pixels per batch, at least 16), so activations stay small: EfficientNet-Lite0 at 224 px and
    batch 256 peaked at 4.9 GB RSS with its teacher, at batch 16 at 0.67 GB (benchmarks/results/eval_memory.md)."""
    pixels = int(image_shape[-1]) * int(image_shape[-2])
    return max(EVAL_BATCH_MIN, min(EVAL_BATCH_MAX, EVAL_BATCH_MAX * 32 * 32 // max(pixels, 1)))


@contextlib.contextmanager
def _eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Put models in eval mode, restoring each one's previous mode afterwards."""
    present = [m for m in models if m is not None]
    previous = [m.training for m in present]
    try:
        for m in present:
            m.eval()
        yield
    finally:
        for m, was_training in zip(present, previous):
            m.train(was_training)


def _split_batch(batch: object) -> tuple[Tensor, Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        return batch[0], batch[1]
    raise ValueError("evaluate needs a loader yielding (images, labels) batches; this one yields no labels")


def _describe(out: object) -> str:
    if isinstance(out, dict):
        return f"a {type(out).__name__} with keys {list(out)[:5]}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)} items"
    if isinstance(out, Tensor):
        dtype = str(out.dtype).removeprefix("torch.")
        kind = "a tensor" if out.is_floating_point() else f"{'an' if dtype[0] in 'aeiou' else 'a'} {dtype} tensor"
        return f"{kind} of shape {tuple(out.shape)}"
    return f"a {type(out).__name__}"


def check_logits(out: object, labels: Tensor | None = None, what: str = "the model") -> Tensor:
    """``out`` when it is (N, C) class logits; else TypeError naming what the forward returned.
    With ``labels``: ValueError when a label is not below C (the data has more classes than the model)."""
    if not isinstance(out, Tensor) or out.ndim != 2 or not out.is_floating_point():
        raise TypeError(f"evaluate needs {what} to return (N, C) class logits, but its forward returned "
                        f"{_describe(out)}: wrap the model so that forward returns the logits tensor")
    if labels is not None and labels.numel() and int(labels.max()) >= out.shape[1]:
        raise ValueError(f"label {int(labels.max())} is out of range for {what}'s {out.shape[1]} outputs: the data "
                         f"has more classes than the model")
    return out


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    teacher: nn.Module | None = None,
    device: str | torch.device | None = None,
    desc: str = "eval",
) -> dict[str, float | int]:
    """Return ``{'top1': %, 'top5': %, 'n': images}`` (+ ``'agreement'``: % of images where the
    student's and teacher's top-1 predictions agree, and ``'teacher_top1'``: the teacher's top-1 %,
    when ``teacher`` is given). Batches go to ``device`` (default: the model's device); the models
    are not moved. A model whose forward does not return (N, C) logits is a TypeError naming what it
    returned; a label not below C a ValueError."""
    if device is None:
        device = module_device(model)
    n = top1 = top5 = agree = teacher_top1 = 0
    with torch.no_grad(), _eval_mode(model, teacher):
        for batch in tqdm(loader, desc=desc, unit="batch", disable=None, leave=False):
            x, y = _split_batch(batch)
            x, y = x.to(device), y.to(device)
            logits = check_logits(model(x), y)
            k = min(5, logits.shape[1])
            pred = logits.topk(k, dim=1).indices
            hits = pred == y[:, None]
            top1 += int(hits[:, 0].sum())
            top5 += int(hits.any(dim=1).sum())
            if teacher is not None:
                t_pred = check_logits(teacher(x), y, "the teacher").argmax(dim=1)
                agree += int((t_pred == pred[:, 0]).sum())
                teacher_top1 += int((t_pred == y).sum())
            n += y.shape[0]
    if n == 0:
        raise ValueError("evaluate got an empty loader (no samples)")
    out: dict[str, float | int] = {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "n": n}
    if teacher is not None:
        out["agreement"] = 100.0 * agree / n
        out["teacher_top1"] = 100.0 * teacher_top1 / n
    return out
