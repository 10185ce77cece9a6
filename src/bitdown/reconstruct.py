"""Block output reconstruction: fit a quantized block's output to the uncompressed block's output.

After every layer of a block is quantized (EM, teacher targets, GPTQ feedback), the block's trainable
parameters theta (the codebooks of its own PQ layers, the affine parameters of its BatchNorms and the
biases of its convs / linears) are trained with Adam to minimise the normalised output error

    L(theta) = sum_tensors ||f_student(X_s; theta) - f_teacher(X_t)||^2 / ||f_teacher(X_t)||^2

over the calibration batches, where X_s are the block's inputs in the compressed network (earlier blocks
already quantized) and f_teacher(X_t) the uncompressed block's outputs on the uncompressed network's
inputs (BRECQ, Li et al. 2021: the block output carries far more values per image than the logits, so
few images do not over-fit it). With `codes="ste"` the codes are learned as well: each subvector gets a
latent weight v (starting at its codeword, so the codes start as the EM's), the forward uses v's nearest
codeword, and the gradient reaches v straight through (Ŵ + v - sg(v)): a subvector changes code when the
block loss pushes v across a Voronoi boundary (AdaRound/BRECQ learn their rounding on the same block loss;
this is the vector-quantized analogue). With `drop_prob` p > 0 each input value is, at each step, the teacher's
with probability p instead of the student's (QDrop, Wei et al. 2022).

The model stays in eval mode (BatchNorm statistics frozen). The learning rate follows a cosine decay.
Codebooks shared with other blocks are not trained here (the global stage trains them).
Deterministic for a seed (the batch order and the QDrop masks come from a seeded generator), and for any number
of processes that divides `grad_slices`: each step's rows are cut into that many gradient slices, each with its
own backward, the gradients added in slice order (finetune.slice_step); every process draws the same rows and
QDrop masks for the whole step and normalises by the whole step's target energy.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import dist
from .blockio import Cached, map_tensors, run_block, tensors_of
from .config import ReconstructConfig
from .finetune import nhwc, slice_step
from .modules import is_pq, round_codebook
from .scalar import is_scalar, round_scale

log = logging.getLogger(__name__)


def block_params(block: nn.Module, cfg: ReconstructConfig, shared: set[int] = frozenset()) -> list[nn.Parameter]:
    """The parameters reconstruction trains: own codebooks, BatchNorm affine, biases (each once)."""
    params: dict[int, nn.Parameter] = {}
    for m in block.modules():
        if is_pq(m) and id(m.codebook) not in shared:
            params[id(m.codebook)] = m.codebook
        if is_scalar(m):                                 # per-channel scales of scalar layers
            params[id(m.scale)] = m.scale
        if cfg.train_bn and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            params[id(m.weight)], params[id(m.bias)] = m.weight, m.bias
        if cfg.train_bias and isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            params[id(m.bias)] = m.bias
    return list(params.values())


def output_error(out: Any, target: Any, norms: list[torch.Tensor] | None = None) -> torch.Tensor:
    """sum over the tensors of the output of ||out - target||^2 / ||target||^2 (a scalar tensor); `norms`: the
    ||target||^2 to divide by instead (those of a whole batch of which out/target are some rows)."""
    a, b = tensors_of(out), tensors_of(target)
    if len(a) != len(b) or not a:
        raise ValueError(f"block output holds {len(a)} tensors, its target {len(b)}")
    total = a[0].new_zeros(())
    for i, (s, t) in enumerate(zip(a, b)):
        if s.shape != t.shape:
            raise ValueError(f"block output of shape {list(s.shape)} vs target {list(t.shape)}")
        norm = t.float().pow(2).sum().clamp_min(1e-12) if norms is None else norms[i]
        total = total + (s.float() - t.float()).pow(2).sum() / norm
    return total


def _rows(obj: Any, idx: torch.Tensor) -> Any:
    """The rows `idx` of every batched tensor in obj (tensors without a batch dim are kept)."""
    return map_tensors(obj, lambda t: t[idx] if t.dim() > 0 else t)


@torch.no_grad()
def _nearest_codes(latents: list[tuple[nn.Module, float]]) -> None:
    """Each layer's codes := the nearest codeword (Euclidean) of every latent subvector."""
    for m, _ in latents:
        v, c = m._ste_latent, m.codebook                                          # (n_sub, d), (K, d)
        dist = (v * v).sum(1, keepdim=True) - 2 * v @ c.T + (c * c).sum(1)       # (n_sub, K)
        m.codes.copy_(dist.argmin(1).reshape(m.codes.shape).to(m.codes.dtype))


def block_error(block: nn.Module, inputs: Cached, targets: Cached) -> float:
    """The normalised output error of `block` summed over the batches' images, divided by the image count
    (each batch's error is weighted by its size; under torchrun over every rank's batches, added in global batch
    order: the same float whatever the number of processes)."""
    per_batch = []
    with torch.no_grad():
        for b in range(len(inputs)):
            args = inputs[b]
            size = tensors_of(args)[0].shape[0]
            per_batch.append((float(output_error(run_block(block, args), targets[b])) * size, size))
    if dist.active():
        per_batch = dist.interleave(dist.all_gather_object(per_batch, "the block output error"))
    total, n = 0.0, 0
    for err, size in per_batch:
        total += err
        n += size
    return total / max(1, n)


def _step_rows(b: int, idx: torch.Tensor, inputs: Cached, targets: Cached, teacher_inputs: Cached | None,
               what: str) -> tuple[Any, Any, Any]:
    """(inputs, targets, teacher inputs or None) at rows `idx` of global batch `b` on every rank: under torchrun
    batch b lives on rank b % N (dist.shard), which sends those rows to the others (through the CPU)."""
    if not dist.active():
        return _rows(inputs[b], idx), _rows(targets[b], idx), (
            _rows(teacher_inputs[b], idx) if teacher_inputs is not None else None)
    owner, local = b % dist.world_size(), b // dist.world_size()
    rows = None
    if dist.rank() == owner:
        rows = map_tensors((_rows(inputs[local], idx), _rows(targets[local], idx),
                            _rows(teacher_inputs[local], idx) if teacher_inputs is not None else None),
                           lambda t: t.cpu())
    rows = dist.broadcast_object(rows, owner, what)
    return map_tensors(rows, lambda t: t.to(inputs.device))


def _slice_losses(block: nn.Module, args: Any, target: Any, count: int) -> list[Any]:
    """For each of this process's gradient slices of the step's rows (dist.my_slices; every process holds all the
    rows): a function giving the slice's output error, normalised by the whole step's target energy (None for
    an empty slice)."""
    norms = [t.float().pow(2).sum().clamp_min(1e-12) for t in tensors_of(target)]
    n = tensors_of(target)[0].shape[0]

    def loss(rows: slice) -> torch.Tensor:
        a, t = map_tensors((args, target), lambda v: v[rows] if v.dim() > 0 else v)
        return output_error(run_block(block, map_tensors(a, nhwc)), t, norms)
    return [(lambda rows=rows: loss(rows)) if rows.stop > rows.start else None
            for rows in dist.my_slices(n, count)]


def reconstruct_block(name: str, block: nn.Module, inputs: Cached, targets: Cached, cfg: ReconstructConfig,
                      seed: int = 0, teacher_inputs: Cached | None = None, shared: set[int] = frozenset(),
                      progress: bool = False) -> dict[str, Any]:
    """Train `block`'s parameters (block_params) so that its outputs on `inputs` match `targets` (see the
    module docstring). Codebooks end rounded to their stored precision. Returns loss figures."""
    params = block_params(block, cfg, shared)
    if cfg.steps == 0 or not params:
        return {}
    before = block_error(block, inputs, targets)
    saved = [p.detach().clone() for p in params]
    pq = [m for m in block.modules() if is_pq(m) and id(m.codebook) not in shared]
    saved_codes = [m.codes.clone() for m in pq]
    latents = []
    if cfg.codes == "ste":
        for m in pq:
            w = m.dequantize().detach()
            # (n_sub, d); a plain attribute, not a Parameter: never in the state dict or the file
            m.__dict__["_ste_latent"] = w.reshape(-1, m.block_size).clone().requires_grad_(True)
            latents.append((m, float(w.pow(2).mean().sqrt()) + 1e-12))
    # the batch sizes of every rank's batches in global order (dist.shard): the step stream is the same for any N
    sizes = dist.interleave(dist.all_gather_object([tensors_of(inputs[b])[0].shape[0] for b in range(len(inputs))],
                                                   "the block input sizes"))
    gen = torch.Generator().manual_seed(seed)
    flags = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    scalars = [m for m in block.modules() if is_scalar(m)]
    own = {id(m.scale) for m in scalars}
    # a scale's Adam step relative to it as a codeword's to the weights: lr * mean|s| / rms(W_hat) per layer
    groups = [{"params": [p for p in params if id(p) not in own], "scale": 1.0}] + [
        {"params": [m.scale], "scale": float(m.scale.detach().abs().mean()
                                             / m.dequantize().detach().pow(2).mean().sqrt().clamp_min(1e-12))}
        for m in scalars] + [{"params": [m._ste_latent], "scale": cfg.latent_lr * rms / cfg.lr}
                                                   for m, rms in latents]
    opt = torch.optim.Adam(groups, lr=cfg.lr)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc=f"reconstruct {name}", unit="step", leave=False, disable=not progress)
    try:
        for s in bar:
            b = int(torch.randint(len(sizes), (1,), generator=gen))          # a cached batch, then rows of it
            idx = torch.randperm(sizes[b], generator=gen)[: cfg.batch_size]
            args, target, t_args = _step_rows(b, idx, inputs, targets,
                                              teacher_inputs if cfg.drop_prob > 0 else None, f"block {name!r} step {s}")
            if cfg.drop_prob > 0 and teacher_inputs is not None:             # QDrop: some values the teacher's
                ref = iter(tensors_of(t_args))

                def drop(t: torch.Tensor) -> torch.Tensor:
                    tt = next(ref)
                    if not t.is_floating_point():
                        return t
                    keep = torch.rand(t.shape, generator=gen).to(t.device) >= cfg.drop_prob
                    return torch.where(keep, t, tt)
                args = map_tensors(args, drop)
            for g in opt.param_groups:
                g["lr"] = g["scale"] * cfg.lr * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))
            _nearest_codes(latents)
            losses.append(slice_step(_slice_losses(block, args, target, cfg.grad_slices), opt,
                                     f"block {name!r}: non-finite reconstruction loss at step {s}; lower the "
                                     "reconstruct lr"))
            if s % 10 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
        _nearest_codes(latents)
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        for m, _ in latents:
            m.__dict__.pop("_ste_latent", None)
        bar.close()
    with torch.no_grad():
        for m in block.modules():
            if is_pq(m) and id(m.codebook) not in shared:
                m.codebook.data = round_codebook(m.codebook.data, m.codebook_bits)
            if is_scalar(m):
                m.scale.data = round_scale(m.scale.data)
    after = block_error(block, inputs, targets)
    kept = "reconstructed"
    if not after <= before:                  # never leave a block worse than its EM result
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
            for m, c in zip(pq, saved_codes):
                m.codes.copy_(c)
        kept = "em"
        log.info("block %s: reconstruction raised its output error %.4f -> %.4f; the EM result is kept",
                 name, before, after)
        after = before
    log.debug("block %s reconstructed: error %.4f -> %.4f", name, before, after)
    changed = sum(int((m.codes != c).sum()) for m, c in zip(pq, saved_codes))
    return {"error_before": before, "error_after": after, "steps": cfg.steps, "kept": kept, "codes_changed": changed,
            "first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:])}
