"""The compression pipeline: model + unlabelled images -> product-quantized model.

    calibration images --(forward order)--> for each layer, in forward order:
        statistics of its inputs in the *current* student (upstream layers already quantized)
        -> output-aware EM -> the layer becomes a PQConv2d / PQLinear (codebook rounded to fp16)
        -> [per-layer fine-tuning, finetune.py]  -> checkpoint
    -> BatchNorm statistics re-estimated -> [global fine-tuning] -> model (with `.bitdown` info)

Every layer's statistics come from a forward pass that stops right before that layer, so
quantizing L layers costs about L/2 forward passes over the calibration images.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import dist
from .checkpoint import RunKey, fingerprint, load_checkpoint, save_checkpoint
from .config import LayerPlan, QuantConfig, quantizable_layers, resolve_plan, share_groups
from .em import assign_codes, kmeans, kmeans_shared
from .frozen import refuse_frozen
from .meancorrect import bn_gain, correct_layer_mean, following_batchnorm
from .memtrim import release_memory
from .modules import empty_pq_like, is_pq, module_device, quantize_module, round_codebook, round_codebooks_
from .serialize import round_bn_stats_
from .size import size_report
from .blockio import BlockIO, Cached, TensorStore, dependencies, run_block
from .blocks import Block, call_order, find_blocks
from .reconstruct import reconstruct_block
from .teachercap import TeacherInputs, block_run, plan_capture
from .scalar import (empty_like_plan, is_quantized, quantize_fp16, quantize_module_fp16, quantize_module_scalar,
                     quantize_scalar, round_scalars_)
from .stats import (LayerStats, StatsCollector, StopForward, capture_input, collect_stats, subsample_positions,
                    target_is_determined, teacher_target_weight)

log = logging.getLogger(__name__)

VOLATILE = ("resumed",)  # CompressionInfo.extra keys that describe the run, not the result
ALLOCATION = "allocation.json"   # in a checkpoint folder: the size allocation of a budget run
HOLDOUT_STATE = "__holdout__."   # checkpoint tensors: the global stage's parameters before it (holdout guard)


@dataclass
class CompressionInfo:
    """What `compress` did; saved as the file's metadata."""

    arch: dict[str, Any]
    config: dict[str, Any]
    plans: list[LayerPlan]
    skipped: dict[str, str]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)   # per-layer EM results
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def metadata(self, model: nn.Module | None = None) -> dict[str, Any]:
        """The file's metadata: deterministic given the inputs and seed (no timings, no resume
        markers), so a resumed run writes the same bytes as an uninterrupted one."""
        em = {n: {k: v for k, v in d.items() if not k.endswith("_s")} for n, d in self.layers.items()}
        extra = {k: v for k, v in self.extra.items() if k not in VOLATILE}
        meta = {"arch": self.arch, "config": self.config, "layers": [p.to_json() for p in self.plans],
                "skipped": self.skipped, "em": em, "extra": extra}
        if model is not None:
            meta["size"] = {k: v for k, v in size_report(model, self.plans).to_json().items() if k != "layers"}
        return meta


# ----------------------------------------------------------------------------- data

def _images(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and isinstance(batch.get("image"), torch.Tensor):
        return batch["image"]
    raise TypeError(f"data must yield image tensors or (images, labels) tuples, got {type(batch).__name__}")


def _image_batch(batch: Any) -> torch.Tensor:
    x = _images(batch)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if not torch.is_floating_point(x):
        raise TypeError(f"calibration images must be float tensors, got {x.dtype}")
    return x


def _counted(count: int, n: int, chunks: list[torch.Tensor]) -> None:
    """The checks on `count` images read of the `n` asked for (`chunks`: those this process holds)."""
    if count == 0:
        raise ValueError("the calibration data is empty: no image was read")
    if count < n:
        log.warning("the data holds %d images, fewer than the %d asked for: using them all", count, n)
    if not all(torch.isfinite(c).all() for c in chunks):
        raise ValueError("the calibration images contain NaN/inf values")


def take_images(data: Iterable, n: int, batch_size: int) -> list[torch.Tensor]:
    """The first `n` images of `data` (an iterable of batches), re-batched to `batch_size`."""
    chunks, count = [], 0
    for batch in data:
        x = _image_batch(batch)
        chunks.append(x[: n - count])
        count += chunks[-1].shape[0]
        if count >= n:
            break
    _counted(count, n, chunks)
    return list(torch.cat(chunks).split(batch_size))


def _loader_indices(data: Any, n: int) -> list[int] | None:
    """The dataset indices of the first `n` images a DataLoader over a map-style dataset yields (None for any
    other iterable)."""
    if not (isinstance(data, torch.utils.data.DataLoader) and data.batch_sampler is not None
            and not isinstance(data.dataset, torch.utils.data.IterableDataset)):
        return None
    out: list[int] = []
    for b in data.batch_sampler:
        out.extend(int(i) for i in b)
        if len(out) >= n:
            break
    return out[:n]


def _check_ranks(n_batches: int, n_images: int, batch_size: int) -> None:
    if dist.world_size() > n_batches:
        raise ValueError(f"{dist.world_size()} processes, but the {n_images} calibration images make only {n_batches} "
                         f"batch{'es' if n_batches > 1 else ''} of {batch_size}: each process needs one; start at most "
                         f"{n_batches} processes, or use a smaller batch_size (--config '{{\"batch_size\": "
                         f"{max(1, n_images // dist.world_size())}}}')")


def take_shard(data: Iterable, n: int, batch_size: int) -> tuple[list[torch.Tensor], int]:
    """This process's share of `take_images(data, n, batch_size)` under torchrun (its batches `dist.shard`:
    rank r holds global batches r, r + N, ...) and the global number of images. A DataLoader over a map-style
    dataset is read at this rank's indices only; any other iterable is read whole and cut. Without a
    process group: all the batches."""
    idx = _loader_indices(data, n) if dist.active() else None
    if idx is None:
        batches = take_images(data, n, batch_size)
        count = sum(x.shape[0] for x in batches)
        _check_ranks(len(batches), count, batch_size)
        return dist.shard(batches), count
    groups = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    _check_ranks(max(1, len(groups)), len(idx), batch_size)
    batches = [_image_batch(data.collate_fn([data.dataset[i] for i in g])) for g in dist.shard(groups)]
    _counted(len(idx), n, batches)
    return batches, len(idx)


def _global_batches(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every rank's batches (dist.shard) put back in global order, on every rank (a copy over the network)."""
    if not dist.active():
        return batches
    dev = batches[0].device
    got = dist.all_gather_object([x.cpu() for x in batches], "gathering the calibration images")
    return [x.to(dev) for x in dist.interleave(got)]


def batch_digests(batches: list[torch.Tensor]) -> list[str]:
    """A hash of every calibration batch, in global order on every rank (what identifies the images)."""
    return dist.interleave(dist.all_gather_object([fingerprint(list(x.shape), x) for x in batches],
                                                  "hashing the calibration images"))


def forward_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the Conv2d/Linear layers in the order forward() first calls them."""
    return call_order(model, [n for n, _ in quantizable_layers(model)], x)[1]


# ----------------------------------------------------------------------------- BatchNorm

@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: list[torch.Tensor]) -> int:
    """Re-estimate every BatchNorm's running mean/var as the plain average over `batches`
    (the rest of the model in eval mode). Returns the number of BatchNorm layers updated."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None          # cumulative moving average: exact mean over the batches
        bn.train()
    try:
        for x in batches:
            model(x)
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
        model.train(was_training)
    if dist.active():       # each rank averaged its batches: the average over all, weighted by batch count
        k = torch.tensor([float(len(batches))], dtype=torch.float64)
        sums = [torch.cat([b.running_mean, b.running_var]).double() * len(batches) for b in bns]
        dist.all_reduce_(sums + [k], "BatchNorm re-estimation")
        for bn, t in zip(bns, sums):
            c = bn.running_mean.numel()
            bn.running_mean.copy_(t[:c] / k)
            bn.running_var.copy_(t[c:] / k)
            bn.num_batches_tracked.fill_(int(k))
    return len(bns)


# ----------------------------------------------------------------------------- pipeline

def _check_model(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"parameter {name!r} of the model has non-finite (NaN/inf) values")
    if any(is_quantized(m) for m in model.modules()):
        raise ValueError("the model is already (partly) product-quantized")


def _finetune_data(train_data: Any, data: Any, calib: list[torch.Tensor]) -> Any:
    """The map-style dataset fine-tuning draws from: `train_data`, else `data`'s dataset, else the
    calibration images themselves (all ranks' under torchrun)."""
    if train_data is not None:
        return train_data
    ds = getattr(data, "dataset", data)
    if hasattr(ds, "__len__") and hasattr(ds, "__getitem__") and isinstance(ds, torch.utils.data.Dataset):
        return ds
    calib = _global_batches(calib)
    log.warning("no train_data for fine-tuning: using the %d calibration images without augmentation",
                sum(x.shape[0] for x in calib))
    return torch.utils.data.TensorDataset(torch.cat(calib))


def _describe(ds: Any) -> Any:
    """What identifies a fine-tuning dataset in the resume fingerprint."""
    if ds is None:
        return None
    if isinstance(ds, torch.utils.data.TensorDataset):
        return {"tensors": ds.tensors[0]}
    return {"type": type(ds).__name__, "len": len(ds), "names": getattr(ds, "names", None),
            "source": getattr(ds, "source", None), "train": getattr(ds, "train", None),
            "seed": getattr(ds, "seed", None)}


def channel_weights(stats, floor: float = 1e-2) -> torch.Tensor:
    """1 / Var(y_o) per output channel, with the variance floored at `floor` x its mean so dead
    channels do not dominate: the error a following BatchNorm sees, channel by channel."""
    var = stats.output_variance()                                          # (C_out,)
    return 1.0 / var.clamp_min(floor * float(var.mean()) + 1e-30)


def check_calibration_count(model: nn.Module, plans: list[LayerPlan], x: torch.Tensor, n_images: int) -> None:
    """Refuse, before any work, fewer calibration images than the EM needs: every layer must see at least
    as many subvector samples (rows x blocks per row) as it has centroids. Rows per image come from one
    probe forward on `x[:1]`."""
    modules = dict(model.named_modules())
    rows: dict[str, int] = {}

    def count(name: str):
        def hook(m, inputs) -> None:
            t = inputs[0]
            if isinstance(m, nn.Conv2d):
                rows.setdefault(name, math.prod(F.conv2d(t[:1, :1], torch.zeros(1, 1, *m.kernel_size), None,
                                                         m.stride, m.padding if not isinstance(m.padding, str)
                                                         else 0, m.dilation).shape[2:]))
            else:
                rows.setdefault(name, t[:1].numel() // t.shape[-1])
        return hook

    handles = [modules[p.name].register_forward_pre_hook(count(p.name)) for p in plans]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    per_image = {p.name: rows[p.name] * (p.row_length // p.block_size) for p in plans if rows.get(p.name)}
    if per_image:
        worst = max((p for p in plans if p.name in per_image),
                    key=lambda p: min_calib_images(p, per_image[p.name], 1))
        check_samples(worst, per_image[worst.name], 1, n_images)


def min_calib_images(plan: LayerPlan, samples: int, images: int) -> int:
    """The calibration-count rule (the one copy): the EM needs at least one subvector sample (a row's block) per
    centroid. `images` images gave the layer `samples` samples, so it needs ceil(K * images / samples) images."""
    return -(-plan.n_centroids * max(1, images) // max(1, samples))


def check_samples(plan: LayerPlan, samples: int, images: int, n_calib: int) -> None:
    """ValueError naming the layer and the images needed when `n_calib` calibration images are fewer than
    `min_calib_images` (`images` images gave the layer `samples` subvector samples)."""
    need = min_calib_images(plan, samples, images)
    if n_calib < need:
        raise ValueError(f"{n_calib} calibration images are too few: layer {plan.name!r} needs at least "
                         f"{plan.n_centroids} subvector samples for its {plan.n_centroids} centroids ({samples} from "
                         f"{images} image{'s' if images != 1 else ''}), i.e. at least {need} images; give "
                         f"--calib-images {need} or more")


def compress(model: nn.Module, data: Iterable, config: QuantConfig | None = None, *, arch: dict | None = None,
             inplace: bool = False, checkpoint_dir: str | Path | None = None, progress: bool = True,
             finetune: Any = None, train_data: Any = None, target_ratio: float | None = None,
             target_size: str | float | None = None, device: str | torch.device | None = None) -> nn.Module:
    """Product-quantize every eligible Conv2d/Linear of `model` on unlabelled `data`.

    data: an iterable of image batches (tensors, or (images, labels) whose labels are ignored).
    Returns the compressed model (a copy unless `inplace`), with `.bitdown` (CompressionInfo).
    With `checkpoint_dir`, progress is saved after every layer and a rerun resumes from it.
    `finetune` (finetune.FinetuneConfig) adds per-layer and global distillation from the original
    model on `train_data` (a map-style dataset of augmented unlabelled images; default: `data`'s).
    `finetune.holdout` of those images are kept out of fine-tuning: the global stage, and each layer's
    per-layer steps (`finetune.layer_guard`), are measured on them before and after and undone if they made
    their distillation loss worse or, for class logits, lost top-1 agreement with the teacher beyond the
    slice's binomial band (finetune._worse) (`extra["global_finetune"]["holdout"]`, `extra["layer_finetune"]["holdout"]`).
    `target_ratio` / `target_size` ('100KB', '1.5MB', bytes) choose every layer's block size and
    number of centroids by rate-distortion to fit that paper-style size (allocate.py).
    `device` ('cuda', 'cpu', ...; default: where the model's parameters are) runs the forward passes
    and the fine-tuning there; the EM always runs on the CPU. The result lives on `device`; a copy of
    the teacher is made there when fine-tuning needs one and `model` is elsewhere (`model` is never
    moved unless `inplace`).
    """
    config = config or QuantConfig()
    _check_model(model)
    refuse_frozen(model, "compress")                 # before any work: its guards would refuse training mode later
    t0 = time.perf_counter()
    progress = progress and dist.is_main()           # under torchrun: bars on rank 0 only
    model.eval()
    # the uncompressed model is needed next to the student for teacher targets and distillation
    needs_teacher = config.em.teacher_target or finetune is not None or config.reconstruct.steps > 0
    dev = resolve_device(model, device)
    teacher = copy.deepcopy(model) if inplace and needs_teacher else model
    student = model if inplace else copy.deepcopy(model)
    if needs_teacher and module_device(teacher) != dev:     # next to the student; the user's model stays put
        teacher = (copy.deepcopy(teacher) if teacher is model else teacher).to(dev).eval()
    student.to(dev).eval()
    if target_ratio is not None or target_size is not None:     # refuse an impossible budget before any work
        from .allocate import check_budget
        check_budget(student, config, target_ratio, target_size, extra=config.alloc_menu)
    ft = finetune
    weights_key = fingerprint({k: v for k, v in teacher.state_dict().items()})
    if dist.active():                  # every rank must run the same job: refused before any work otherwise
        dist.check_same(fingerprint(_fp_json(config.to_json()), ft.to_json() if ft is not None else None,
                                    arch, weights_key, target_ratio, target_size),
                        "configuration, fine-tuning configuration, size target or model weights")
    if ft is not None and ft.enabled:      # N processes must share the gradient slices: refused before any work
        dist.check_slices(ft.grad_slices, "fine-tuning")
    if config.reconstruct.steps > 0:
        dist.check_slices(config.reconstruct.grad_slices, "block reconstruction")
    calib, n_calib = take_shard(data, config.calib_images, config.batch_size)
    calib = [x.to(dev) for x in calib]
    # the first 2 images, the same on every rank: the probe forwards (layer order, blocks, counts) see them
    probe = dist.broadcast_object(calib[0][:2].cpu() if dist.is_main() else None, what="the probe images").to(dev)
    if finetune is not None:       # an output distillation cannot use is refused before any work
        from .finetune import check_outputs
        log.info("distillation on the model output: %s", check_outputs(student, probe, finetune.loss))
    log.info("calibration: %d images in %d batches%s", n_calib, len(calib),
             f" on this rank ({dist.rank()} of {dist.world_size()})" if dist.active() else "")
    order = forward_order(student, probe)
    allocation = None
    if target_ratio is not None or target_size is not None:
        # the rate-distortion table runs on rank 0, on every image, in forward pieces (QuantConfig.forward_mb)
        n = piece_images(config, calib)
        all_calib = [p for x in _global_batches(calib) for p in (x.split(n) if n else [x])]
        config, allocation = dist.on_main(lambda: _allocation(student, all_calib, config, target_ratio, target_size,
                                                              order, progress, checkpoint_dir), "the size allocation")
        del all_calib
        release_memory()              # the rate-distortion pass's freed activations
    plans, skipped = resolve_plan(student, config, order)
    for name, _ in quantizable_layers(student):
        if name not in order:
            skipped.setdefault(name, "not called by forward() on the calibration images")
    blocks = find_blocks(student, probe, order, config.blocks)
    plans = _block_order(plans, blocks)
    check_calibration_count(student, plans, probe, n_calib)
    info = CompressionInfo(arch or {"name": type(model).__name__, "source": "user"}, config.to_json(), plans, skipped)
    info.extra["calib_images"] = n_calib
    info.extra["blocks"] = [b.name for b in blocks]
    if allocation is not None:
        info.extra["allocation"] = allocation

    ft_data = _finetune_data(train_data, data, calib) if ft is not None else None
    # what identifies the run, the same for any number of processes (the calibration batches by their hashes)
    settings = {"quant": _fp_json(config.to_json()), "finetune": _fp_json(ft.to_json()) if ft is not None else None}
    settings = json.loads(json.dumps(settings, default=str))    # as fingerprint() reads them (numpy scalars: str)
    fp = RunKey(fingerprint(settings["quant"], settings["finetune"], info.arch, weights_key, batch_digests(calib),
                            _describe(ft_data)), settings)
    holdout = None                   # images kept out of fine-tuning: both stages' guards (finetune.py)
    if ft is not None and ft.enabled:
        from .finetune import batch_rows, split_holdout
        ft_data, holdout = split_holdout(ft_data, ft)
        batch_rows(ft, ft_data)            # a batch too small for its gradient slices: refused before the EM
    done, resume = 0, {}
    if checkpoint_dir is not None:
        ck = dist.on_main(lambda: load_checkpoint(checkpoint_dir, fp), "reading the checkpoint")   # then sent
        if ck is not None:
            done, resume = _restore(student, plans, ck, info)
            log.info("resuming from %s: %d/%d layers done, stage %s", checkpoint_dir, done, len(plans),
                     resume["stage"])

    shared = _learn_shared(teacher, plans, done, calib, config)   # group -> initial codebook
    run = _BlockRun(student, teacher if needs_teacher else None, blocks, plans, calib, probe, n_calib, config, ft,
                    ft_data, info, shared, checkpoint_dir, fp, progress, holdout)
    blocks_done = len(blocks) if resume.get("stage") == "global" else resume.get("blocks_done", 0)
    if blocks_done < len(blocks):
        run.run(blocks_done)
    if holdout is not None and ft.layer_steps > 0 and ft.layer_guard:
        info.extra["layer_finetune"] = {"holdout": layer_guard_summary(info.layers, holdout.shape[0])}
    info.timings["quantize_s"] = time.perf_counter() - t0

    if resume.get("stage") != "global":
        if config.recalibrates_bn:
            t1 = time.perf_counter()
            try:
                bn_batches = [x.to(dev) for x in take_shard(data, config.bn_images, config.batch_size)[0]]
            except ValueError:      # a one-shot stream, already consumed by the calibration
                log.warning("the data yielded nothing on a second pass: BatchNorm statistics re-estimated on "
                            "the %d calibration images", n_calib)
                bn_batches = calib
            n = recalibrate_bn(student, bn_batches)
            info.timings["bn_s"] = time.perf_counter() - t1
            log.info("re-estimated %d BatchNorm layers on %d images%s", n, sum(x.shape[0] for x in bn_batches),
                     " on this rank" if dist.active() else "")
        if checkpoint_dir is not None:
            _save(checkpoint_dir, student, plans, info, fp, stage="global", step=0)
    release_memory()                  # the block loop's freed memory, before the global stage's backward
    if ft is not None and ft.global_steps > 0:
        from .finetune import finetune_global, holdout_baseline, optimizer_tensors

        hold_before, hold_state = None, None       # kept in the checkpoints: a resumed run compares and restores
        if holdout is not None and resume.get("global_finetune") is None:
            hold_before, hold_state = holdout_baseline(student, teacher, holdout, ft, resume.get("step", 0),
                                                       resume.get("holdout_before"), resume.get("holdout_state"))

        def on_checkpoint(step: int, opt) -> None:
            if checkpoint_dir is not None:
                tensors, opt_meta = optimizer_tensors(opt)
                tensors.update({f"{HOLDOUT_STATE}{i}": v for i, v in enumerate(hold_state or [])})
                _save(checkpoint_dir, student, plans, info, fp, stage="global", step=step, extra_tensors=tensors,
                      extra={"optimizer": opt_meta, "holdout_before": hold_before})

        t1 = time.perf_counter()
        if resume.get("global_finetune") is not None:          # a finished run, rerun: nothing left to train
            info.extra["global_finetune"] = resume["global_finetune"]
        else:
            try:
                info.extra["global_finetune"] = finetune_global(
                    student, teacher, ft_data, ft, seed=config.seed, start=resume.get("step", 0),
                    opt_state=resume.get("optimizer"), on_checkpoint=on_checkpoint, progress=progress,
                    holdout=holdout, holdout_before=hold_before, holdout_state=hold_state)
            except FloatingPointError as e:
                raise FloatingPointError(_kept(e, checkpoint_dir, "at the last global step that is a multiple of "
                                                                  f"{ft.checkpoint_every} (or its start)")) from e
            if checkpoint_dir is not None:       # the finished state, with what the stage reported
                _save(checkpoint_dir, student, plans, info, fp, stage="global", step=ft.global_steps,
                      extra={"global_finetune": info.extra["global_finetune"]})
        info.timings["global_finetune_s"] = time.perf_counter() - t1
    round_codebooks_(student)     # the file stores fp16 codebooks and BatchNorm statistics: memory == file
    round_scalars_(student)       # and fp16 scales / fp16-kept weights
    round_bn_stats_(student)
    info.timings["total_s"] = time.perf_counter() - t0
    student.bitdown = info
    return student.eval()


def layer_guard_summary(layers: dict[str, dict[str, Any]], n: int) -> dict[str, Any]:
    """extra.layer_finetune.holdout: how many layers the per-layer guard checked on the `n` holdout images and
    which it undid, from the per-layer records (kept in the checkpoints, so a resumed run counts the same)."""
    recs = {name: d["finetune"]["holdout"] for name, d in layers.items() if "holdout" in d.get("finetune", {})}
    undone = [name for name, r in recs.items() if r["kept"] == "before"]
    return {"n": n, "n_layers": len(recs), "n_layers_undone": len(undone), "undone": undone}


def _block_order(plans: list[LayerPlan], blocks: list[Block]) -> list[LayerPlan]:
    """The plans in the order the block loop quantizes them (block by block, forward order inside)."""
    by_name = {p.name: p for p in plans}
    ordered = [by_name[n] for b in blocks for n in b.layers if n in by_name]
    missing = [p.name for p in plans if p not in ordered]
    if missing:
        raise ValueError(f"layers {missing} of the plan are in no block")
    return ordered


def piece_images(config: QuantConfig, batches: list[torch.Tensor]) -> int:
    """Images per forward piece of a calibration batch (QuantConfig.forward_mb of float32 input images; 0: whole
    batches)."""
    if config.forward_mb <= 0 or not batches:
        return 0
    per_image = batches[0][0].numel() * 4
    return max(1, int(config.forward_mb * 2**20 // per_image))


def _raise_stop(*_) -> None:
    raise StopForward


class _BlockRun:
    """The block loop of `compress`: for each block (blocks.py) in forward order, its inputs in the student
    and the teacher (blockio.py), then each of its layers: statistics -> EM -> PQ layer, then block
    reconstruction (reconstruct.py), then its outputs for the next blocks, then a checkpoint."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, blocks: list[Block], plans: list[LayerPlan],
                 calib: list[torch.Tensor], probe: torch.Tensor, n_calib: int, config: QuantConfig, ft, ft_data,
                 info: CompressionInfo, shared: dict[str, torch.Tensor], checkpoint_dir, fp: RunKey,
                 progress: bool, holdout: torch.Tensor | None = None) -> None:
        self.student, self.teacher, self.blocks, self.plans = student, teacher, blocks, plans
        self.calib, self.probe, self.n_calib = calib, probe, n_calib    # this rank's batches; all ranks' count
        self.config, self.ft, self.ft_data, self.info = config, ft, ft_data, info
        self.shared, self.checkpoint_dir, self.fp, self.progress = shared, checkpoint_dir, fp, progress
        self.modules = dict(student.named_modules())
        self.t_modules = dict(teacher.named_modules()) if teacher is not None else {}
        self.index = {p.name: i for i, p in enumerate(plans)}
        self.holdout = holdout if ft is not None and ft.layer_guard else None   # the per-layer guard's images
        self.targets = None                     # the teacher's outputs on them (finetune.teacher_outputs), once
        self.piece = 0                          # images per forward piece of a batch (piece_images), set by run
        self.t_rec: TeacherInputs | None = None  # the current block's recorded teacher layer inputs (teachercap.py)

    def run(self, blocks_done: int) -> None:
        cfg = self.config
        store = TensorStore(cfg.cache_mb * 2**20, torch.float16 if cfg.cache_dtype == "float16" else None,
                            spill_dir=None)
        last = dependencies(self.student, self.blocks, self.probe[:1], seed=cfg.seed)
        n = self.piece = piece_images(cfg, self.calib)
        s_io = BlockIO(self.student, self.blocks, self.calib, store, last, n)
        t_io = BlockIO(self.teacher, self.blocks, self.calib, store, last, n) if self.teacher is not None else None
        self.bn_after = (following_batchnorm(self.student, self.probe, [p.name for p in self.plans])
                         if cfg.em.mean_correction or cfg.em.channel_weighting == "bn" else {})
        done_layers = sum(1 for b in self.blocks[:blocks_done] for n in b.layers if n in self.index)
        bar = tqdm(total=len(self.plans), desc="quantize", unit="layer", disable=not self.progress,
                   initial=done_layers)
        try:
            for bi, block in enumerate(self.blocks):
                s_in = s_io.inputs(bi)
                t_in = t_io.inputs(bi) if t_io is not None else None
                s_block = self.modules[block.name]
                t_block = self.t_modules.get(block.name)
                targets = None
                if t_in is not None:
                    # the one teacher block run per batch: targets, next blocks' inputs, and (teachercap.py) the
                    # teacher inputs of the block's layers for their cross Grams
                    rec = self.t_rec = self._teacher_recorder(bi >= blocks_done, block, store, t_block, t_in)
                    with torch.no_grad():
                        targets = Cached(store, (block_run(t_block, t_in, b, n, len(x), rec)
                                                 for b, x in enumerate(self.calib)), s_in.device, s_in.dtype)
                if bi >= blocks_done:
                    self._quantize_block(bi, block, s_block, s_in, t_block, t_in, targets, bar)
                if self.t_rec is not None:
                    self.info.timings["teacher_inputs_recorded"] = (
                        self.info.timings.get("teacher_inputs_recorded", 0) + self.t_rec.used)
                    self.t_rec.free()
                    self.t_rec = None
                with torch.no_grad():
                    outs = Cached(store, (s_in.run(b, lambda a: run_block(s_block, a), n, len(x))
                                          for b, x in enumerate(self.calib)), s_in.device, s_in.dtype)
                s_io.set_outputs(bi, outs)
                if t_io is not None:
                    t_io.set_outputs(bi, targets)
                    t_in.free()
                s_in.free()
                release_memory()          # the block's freed activations back to the OS (memtrim.py)
                if bi >= blocks_done and self.checkpoint_dir is not None:
                    done = [p for p in self.plans if self.index[p.name] < self._layers_through(bi)]
                    _save(self.checkpoint_dir, self.student, done, self.info, self.fp, stage="layers",
                          extra={"blocks_done": bi + 1})
        finally:
            bar.close()
            s_io.close()
            if t_io is not None:
                t_io.close()
            store.close()
        self.info.timings["stats_s"] = sum(v.get("stats_s", 0.0) for v in self.info.layers.values())
        self.info.timings["block_cache_peak_mb"] = store.peak_ram / 2**20      # timings: not in the file
        self.info.timings["block_cache_spilled_mb"] = store.spilled / 2**20

    def _teacher_recorder(self, quantized: bool, block: Block, store: TensorStore, t_block: nn.Module,
                          t_in: Cached) -> TeacherInputs | None:
        """Where the block's layers will be quantized with cross Grams (teacher targets), a recorder of their
        teacher inputs for the block's one teacher run (teachercap.plan_capture: None beyond the cache budget).
        Only where the statistics cut batches as that run does (no `stats_positions`, or one piece a batch), so
        the recorded inputs are the per-layer path's exactly."""
        cfg = self.config
        names = [n for n in block.layers if n in self.index]
        if not quantized or not names or not cfg.em.teacher_target:
            return None
        sizes = [len(x) for x in self.calib]
        if cfg.stats_positions and any(len(t_in.slices(b, self.piece, k)) > 1 for b, k in enumerate(sizes)):
            return None
        return plan_capture(store, t_block, t_in, {n: self.t_modules[n] for n in names}, sizes)

    def _layers_through(self, bi: int) -> int:
        return sum(1 for b in self.blocks[: bi + 1] for n in b.layers if n in self.index)

    def _quantize_block(self, bi: int, block: Block, s_block: nn.Module, s_in: Cached, t_block: nn.Module | None,
                        t_in: Cached | None, targets: Cached | None, bar) -> None:
        for name in block.layers:
            if name not in self.index:
                continue
            i = self.index[name]
            plan = self.plans[i]
            self._quantize_layer(i, plan, s_block, s_in, t_block, t_in)
            bar.set_postfix(layer=plan.name, err=f"{self.info.layers[plan.name]['rel_error']:.3f}")
            bar.update(1)
        rc = self.config.reconstruct
        if rc.steps > 0 and targets is not None and any(n in self.index for n in block.layers):
            for r in range(rc.reassign + 1):
                if r:
                    self._reassign(block, s_block, s_in, t_block, t_in)
                self._reconstruct(bi, block, s_block, s_in, targets, t_in, r, bar)

    def _reconstruct(self, bi: int, block: Block, s_block: nn.Module, s_in: Cached, targets: Cached,
                     t_in: Cached | None, round_: int, bar) -> None:
        shared_ids = {id(self.modules[p.name].codebook) for p in self.plans if p.share is not None
                      and is_pq(self.modules[p.name])}
        t0 = time.perf_counter()
        try:
            res = reconstruct_block(block.name, s_block, s_in, targets, self.config.reconstruct,
                                    seed=self.config.seed + 104729 * (bi + 1) + round_, teacher_inputs=t_in,
                                    shared=shared_ids, progress=self.progress)
        except FloatingPointError as e:
            raise FloatingPointError(_kept(e, self.checkpoint_dir if bi else None,
                                           f"{bi} of {len(self.blocks)} blocks done")) from e
        self.info.timings["reconstruct_s"] = self.info.timings.get("reconstruct_s", 0.0) + time.perf_counter() - t0
        if res:
            entry = {k: v for k, v in res.items() if k in ("error_before", "error_after", "kept", "codes_changed")}
            recs = self.info.extra.setdefault("reconstruct", {})
            if round_:
                entry["error_before"] = recs[block.name]["error_before"]
                entry["rounds"] = round_ + 1
            recs[block.name] = entry
            bar.set_postfix(block=block.name, err=f"{entry['error_before']:.3f}->{entry['error_after']:.3f}")

    def _reassign(self, block: Block, s_block: nn.Module, s_in: Cached, t_block: nn.Module | None,
                  t_in: Cached | None) -> None:
        """New codes for the block's own-codebook layers, in forward order, under their reconstructed codebooks:
        GPTQ assignment towards the teacher target on the layers' current input statistics."""
        em = self.config.em
        for name in block.layers:
            if name not in self.index or self.plans[self.index[name]].share is not None:
                continue
            plan, module = self.plans[self.index[name]], self.modules[name]
            if plan.fp16:
                continue
            st = self._layer_stats(plan, s_block, s_in, t_block, t_in)
            w0 = self.t_modules[name].weight.detach().cpu()
            target = self._teacher_target(name, w0, st)
            if plan.scalar_bits:        # new codes on the (reconstructed) scales
                res = dist.on_main(lambda: quantize_scalar(target, st.full_gram, plan.scalar_bits, em.damp,
                                                           scale=module.scale.detach().cpu(), zero=module.zero.cpu()),
                                   f"the code re-assignment of {name!r}")
                with torch.no_grad():
                    module.codes.copy_(res.codes.to(module.codes))
                continue
            res = dist.on_main(lambda: assign_codes(target, module.codebook.detach().cpu(), st.block_grams, em,
                                                    full_gram=st.full_gram), f"the code re-assignment of {name!r}")
            with torch.no_grad():
                module.codes.copy_(res.codes.reshape(module.codes.shape).to(module.codes))

    def _layer_stats(self, plan: LayerPlan, s_block: nn.Module, s_in: Cached, t_block: nn.Module | None,
                     t_in: Cached | None) -> LayerStats:
        em = self.config.em
        module = self.modules[plan.name]
        weighted = em.channel_weighting == "variance" and em.objective != "weights"
        cross = em.teacher_target
        collector = StatsCollector(plan.name, module, plan.block_size,
                                   full_gram=em.needs_full_gram or cross or em.mean_correction or plan.scalar_bits > 0
                                   or plan.fp16,
                                   output_stats=weighted, cross_gram=cross,
                                   positions=subsample_positions(self.config.stats_positions, plan.row_length,
                                                                 plan.block_size, plan.n_centroids, self.n_calib),
                                   seed=self.config.seed)
        stop = module.register_forward_pre_hook(_raise_stop)   # after the collector's hook: that one runs first
        try:
            for b in range(len(s_in)):
                collector.batch = dist.rank() + b * dist.world_size()    # the global batch index (dist.shard)
                batch = len(self.calib[b])
                # pieces of the batch (QuantConfig.forward_mb), private copies of one piece at a time; whole batches
                # with seeded positions (drawn per batch)
                with s_in.store.mapped():      # a spilled batch opened once for its pieces
                    slices = s_in.slices(b, 0 if self.config.stats_positions else self.piece, batch)
                    for k, sl in enumerate(slices):
                        if cross:          # recorded by the block's teacher run (teachercap.py), else run up to it
                            ref = (self.t_rec.piece(plan.name, b, slices, k, s_in.device) if self.t_rec is not None
                                   else None)
                            collector.reference = ref if ref is not None else capture_input(
                                lambda a: run_block(t_block, a), self.t_modules[plan.name], t_in.piece(b, sl, batch))
                        try:
                            with torch.no_grad():
                                run_block(s_block, s_in.piece(b, sl, batch))
                        except StopForward:
                            pass
            collector.reference = None
        finally:
            stop.remove()
            collector.remove()
        dist.all_reduce_stats(collector.stats, f"the statistics of layer {plan.name!r}")   # sums over ranks
        if collector.stats.n_rows == 0:
            raise ValueError(f"layer {plan.name!r} received no input when its block ran")
        return collector.stats.to("cpu")                 # the EM runs on the CPU, in float64

    def _row_weights(self, name: str, st: LayerStats) -> torch.Tensor | None:
        """Each output channel's weight in the layer's EM objective (EMConfig.channel_weighting), or None."""
        em = self.config.em
        if em.objective == "weights" or em.channel_weighting == "none":
            return None
        if em.channel_weighting == "variance":
            return channel_weights(st)
        bn = self.bn_after.get(name)                    # 'bn': the post-BatchNorm error; weight 1 without one
        return bn_gain(self.modules[bn]) if bn is not None else None

    def _teacher_target(self, name: str, w0: torch.Tensor, st: LayerStats) -> torch.Tensor:
        """The weight the layer's EM quantizes: the teacher target (EMConfig.teacher_target) where the calibration
        inputs determine it (`stats.target_is_determined`, EMConfig.target_min_rows), else `w0` itself."""
        em = self.config.em
        if not em.teacher_target:
            return w0
        if not target_is_determined(st, em.target_min_rows):
            log.info("%s: no teacher target (%d calibration input rows for %d weights per output row, below "
                     "target_min_rows %g): its own weight is quantized", name, st.n_rows, st.full_gram.shape[-1],
                     em.target_min_rows)
            return w0
        return teacher_target_weight(w0, st, em.target_damp)

    def _quantize_layer(self, i: int, plan: LayerPlan, s_block: nn.Module, s_in: Cached, t_block, t_in) -> None:
        t1 = time.perf_counter()
        cfg, em = self.config, self.config.em
        module = self.modules[plan.name]
        st = self._layer_stats(plan, s_block, s_in, t_block, t_in)
        check_samples(plan, st.n_rows * (plan.row_length // plan.block_size), self.n_calib, self.n_calib)
        w0 = module.weight.detach().cpu()
        target = self._teacher_target(plan.name, w0, st)
        shift = {"target_shift": float((target - w0).norm() / w0.norm())} if target is not w0 else {}
        t_stats = time.perf_counter() - t1
        row_weights = self._row_weights(plan.name, st)
        owner = _shared_param(self.modules, self.plans, plan.share) if plan.share is not None else None
        codebook = ((owner.detach().cpu() if owner is not None else self.shared[plan.share]) if plan.share is not None
                    else None)

        def em_step():
            if plan.fp16:                   # the (teacher-target) weight in fp16
                return quantize_fp16(target, st.full_gram)
            if plan.scalar_bits:            # per-channel scalar codes, GPTQ feedback on the full Gram
                return quantize_scalar(target, st.full_gram, plan.scalar_bits, em.damp)
            if plan.share is None:
                return kmeans(target, st.block_grams, plan.n_centroids, em, seed=cfg.seed + i,
                              full_gram=st.full_gram, row_weights=row_weights)
            # the group's codebook is fixed: only this layer's codes, on its own statistics
            return assign_codes(target, codebook, st.block_grams, em, full_gram=st.full_gram, row_weights=row_weights)

        res = dist.on_main(em_step, f"the EM of layer {plan.name!r}")     # rank 0 runs it, every rank gets it
        if plan.fp16:
            quantize_module_fp16(module, res.weight16.float())
        elif plan.scalar_bits:
            quantize_module_scalar(module, res.codes, res.scale, plan.scalar_bits, res.zero)
        elif plan.share is None:
            quantize_module(module, round_codebook(res.codebook, plan.codebook_bits), res.codes,  # file == memory
                            plan.codebook_bits)
        else:
            quantize_module(module, codebook, res.codes, plan.codebook_bits)
            if owner is not None:
                module.codebook = owner                         # one Parameter for the whole group
        if em.mean_correction:
            bn = self.modules[self.bn_after[plan.name]] if plan.name in self.bn_after else None
            ref_w = self.t_modules[plan.name].weight if em.teacher_target else w0
            shift.update(correct_layer_mean(st, module, bn, ref_w))
        self.info.layers[plan.name] = {"rel_error": res.rel_error, "exact": res.exact, "n_iter": res.n_iter,
                                       "objective": res.objective, "stats_s": t_stats, **shift,
                                       "em_s": time.perf_counter() - t1 - t_stats}
        ft = self.ft
        if ft is not None and ft.layer_steps > 0 and is_pq(module):    # per-layer fine-tuning trains codebooks
            from .finetune import finetune_layer, teacher_outputs
            if self.holdout is not None and self.targets is None:
                self.targets = teacher_outputs(self.teacher, self.holdout, ft)
            release_memory()              # the statistics' and the EM's freed memory, before the backward's
            try:
                self.info.layers[plan.name]["finetune"] = finetune_layer(
                    self.student, self.teacher, module, self.ft_data, ft, seed=cfg.seed + i, holdout=self.holdout,
                    targets=self.targets, name=f"layer {plan.name!r}")
            except FloatingPointError as e:
                raise FloatingPointError(_kept(e, self.checkpoint_dir if i else None,
                                               f"{i} of {len(self.plans)} layers done")) from e
            release_memory()              # the backward's freed activations, before the next layer's statistics


# config keys added after checkpoints were first written (QuantConfig / FinetuneConfig, and the "em" dict
# inside QuantConfig) -> their defaults. FinetuneConfig.holdout is not one on purpose: a checkpoint made before
# the holdout guard fine-tuned on the images a run now holds out; nor is FinetuneConfig.layer_guard: a checkpoint
# made before the per-layer guard kept per-layer steps the guard would undo (and, without global steps, trained
# on the holdout). forward_mb (session 11) is one although a checkpoint made before it ran whole batches: a run
# resuming it at the default computes the remaining statistics and block outputs in pieces, which changes float
# summation order only (not at all where a batch fits one piece: CIFAR), so it resumes rather than starts over.
# alloc_sensitivity_loss (session 11) at 'mse' is the sensitivity measured before it existed; so is
# alloc_sensitivity_norm (session 13) at 'sum'.
ADDED_KEYS = {"alloc_max_error": None, "mixup": 0.0, "loss": "auto", "alloc_menu": [], "train_bias": False,
              "stats_positions": 0, "forward_mb": 16.0, "alloc_sensitivity_loss": "mse",
              "alloc_sensitivity_norm": "sum", "schedule": "step",
              "alloc_cap_rule": "tightest"}
ADDED_EM_KEYS = {"mean_correction": False, "target_min_rows": 1.0}
# target_min_rows (session 17) at its default 1.0 keeps earlier checkpoints resuming: it changes only layers with
# fewer calibration input rows than weights per row, which were rare (EfficientNet-Lite0's fc, its last layer) and
# are each quantized validly either way; a checkpoint that already holds such a layer keeps it as it was quantized
# config keys that change no result, fingerprinted at one fixed value: QuantConfig.cache_mb only moves cached
# activations between RAM and spill files read back exactly. Its value before session 11's default (512) was
# 4096, the one checkpoints made then carry in their fingerprint, so any cache_mb matches them.
NEUTRAL_KEYS = {"cache_mb": 4096}


def _fp_json(d: dict[str, Any]) -> dict[str, Any]:
    """`d` as the run's fingerprint sees it: without the ADDED_KEYS that hold their defaults (a checkpoint made
    before those keys existed still matches a run that does not use them), the NEUTRAL_KEYS at their fixed value."""
    out = {k: v for k, v in d.items() if not (k in ADDED_KEYS and v == ADDED_KEYS[k])}
    out.update({k: v for k, v in NEUTRAL_KEYS.items() if k in out})
    rc = out.get("reconstruct")
    if isinstance(rc, dict) and not rc.get("steps"):         # no reconstruction: its gradient slices change nothing
        out["reconstruct"] = {k: v for k, v in rc.items() if k != "grad_slices"}
    if isinstance(out.get("em"), dict):
        out["em"] = {k: v for k, v in out["em"].items() if not (k in ADDED_EM_KEYS and v == ADDED_EM_KEYS[k])}
    return out


def resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """`device` (a CUDA device torch cannot use is a clear error), else where `model` is."""
    if device is None:
        return module_device(model)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but torch sees no CUDA device")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _allocation(student: nn.Module, calib: list[torch.Tensor], config: QuantConfig, target_ratio, target_size,
                order: list[str], progress: bool, checkpoint_dir: str | Path | None) -> tuple[QuantConfig, dict]:
    """The size-budget allocation (allocate.budget_config); with a checkpoint folder it is kept there
    (allocation.json, keyed by config, budget, weights and calibration images), so a resumed run skips
    the rate-distortion sweep."""
    from .allocate import apply_allocation, budget_config

    cache = Path(checkpoint_dir) / ALLOCATION if checkpoint_dir is not None else None
    key = fingerprint(_fp_json(config.to_json()), [target_ratio, target_size], order,
                      student.state_dict(), {str(i): x for i, x in enumerate(calib)})
    if cache is not None and cache.exists():
        try:
            saved = json.loads(cache.read_text())
        except (OSError, ValueError):
            saved = {}
        if saved.get("key") == key:
            log.info("size allocation read from %s", cache)
            return apply_allocation(config, saved["allocation"]), saved["allocation"]
    config, allocation = budget_config(student, calib, config, target_ratio, target_size, order, progress,
                                       extra=config.alloc_menu)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "allocation": allocation}))
        os.replace(tmp, cache)
    return config, allocation


def _kept(err: Exception, checkpoint_dir: str | Path | None, where: str) -> str:
    """The message of a fine-tuning failure, saying what was kept."""
    if checkpoint_dir is None:
        return (f"{err}. Stopped; nothing was saved (no checkpoint_dir, or no layer finished yet). Pass "
                "checkpoint_dir (CLI: --checkpoint-dir) to keep the quantized layers across such a stop")
    return (f"{err}. Stopped; the last good checkpoint is kept in {checkpoint_dir} ({where}); rerunning the "
            "same command resumes from it, a run with another learning rate starts afresh")


def _shared_param(modules: dict[str, nn.Module], plans: list[LayerPlan], group: str) -> nn.Parameter | None:
    """The codebook Parameter of `group` if one of its layers is already quantized."""
    for p in plans:
        if p.share == group and is_pq(modules[p.name]):
            return modules[p.name].codebook
    return None


def _learn_shared(teacher: nn.Module, plans: list[LayerPlan], done: int, calib: list[torch.Tensor],
                  config: QuantConfig) -> dict[str, torch.Tensor]:
    """Initial codebook of every share group none of whose layers is quantized yet (the first `done`
    plans are): the joint EM (em.kmeans_shared) on the members' weights under their pooled
    input statistics in the uncompressed model (one forward pass for all groups). Each member then
    gets its codes on its own sequential statistics in the layer loop."""
    started = {p.share for p in plans[:done]}
    seeds = {g: config.seed + 7919 * (gi + 1) for gi, g in enumerate(sorted(share_groups(plans)))}  # resume-stable
    groups = {g: ms for g, ms in share_groups(plans).items() if g not in started}
    if not groups:
        return {}
    if calib and module_device(teacher) != calib[0].device:   # the uncompressed model, where the images are
        teacher = copy.deepcopy(teacher).to(calib[0].device).eval()
    tm = dict(teacher.named_modules())
    layers = {p.name: (tm[p.name], p.block_size) for ms in groups.values() for p in ms}
    weights_only = config.em.objective == "weights"          # the weight-space baseline needs no data
    stats = {} if weights_only else collect_stats(teacher, layers, calib)
    for name, st in stats.items():
        dist.all_reduce_stats(st, f"the statistics of layer {name!r}")
    out = {}
    for g, ms in sorted(groups.items()):
        weights = [tm[p.name].weight.detach().cpu() for p in ms]
        d = ms[0].block_size
        grams = [torch.eye(d, dtype=torch.float64) if weights_only else stats[p.name].block_grams.sum(dim=(0, 1))
                 for p in ms]
        res = dist.on_main(lambda: kmeans_shared(weights, grams, ms[0].n_centroids, config.em, seed=seeds[g]),
                           f"the EM of shared codebook {g!r}")
        log.info("shared codebook %r (%d layers, K=%d, d=%d): relative pooled error %.4f", g, len(ms),
                 ms[0].n_centroids, ms[0].block_size, res.rel_error)
        out[g] = round_codebook(res.codebook, ms[0].codebook_bits)
    return out


def _save(folder, student: nn.Module, plans_done: list[LayerPlan], info: CompressionInfo, fp: RunKey, stage: str,
          step: int = 0, extra_tensors: dict[str, torch.Tensor] | None = None, extra: dict | None = None) -> None:
    if not dist.is_main():       # under torchrun rank 0 writes (every rank holds the same state)
        return
    tensors = dict(student.state_dict())
    tensors.update(extra_tensors or {})
    save_checkpoint(folder, tensors, {"fingerprint": fp.fingerprint, "settings": fp.settings, "stage": stage,
                                       "step": step,
                                       "done": [p.name for p in plans_done], "layers": info.layers,
                                       "reconstruct": info.extra.get("reconstruct", {}), **(extra or {})})


def _restore(student: nn.Module, plans: list[LayerPlan], ck, info: CompressionInfo) -> tuple[int, dict]:
    """Load a checkpoint into `student`; returns (layers done, resume state for the later stages)."""
    tensors, progress = ck
    done = progress["done"]
    if done != [p.name for p in plans[: len(done)]]:
        raise ValueError("checkpoint layer order does not match this run's plan")
    modules = dict(student.named_modules())
    for p in plans[: len(done)]:
        empty_like_plan(modules[p.name], p)
        if p.share is not None:
            owner = _shared_param(modules, plans[: len(done)], p.share)
            if owner is not None and owner is not modules[p.name].codebook:
                modules[p.name].codebook = owner
    own = student.state_dict()
    missing = [k for k in own if k not in tensors]
    if missing:
        raise ValueError(f"checkpoint lacks tensors {missing[:5]}; delete it to start over")
    student.load_state_dict({k: tensors[k] for k in own}, strict=True)
    info.layers.update(progress.get("layers", {}))
    if progress.get("reconstruct"):
        info.extra["reconstruct"] = dict(progress["reconstruct"])
    info.extra["resumed"] = {"stage": progress["stage"], "step": progress.get("step", 0), "layers": len(done)}
    resume = {"stage": progress["stage"], "step": progress.get("step", 0),
              "blocks_done": progress.get("blocks_done", 0), "global_finetune": progress.get("global_finetune")}
    resume["holdout_before"] = progress.get("holdout_before")
    n_held = sum(k.startswith(HOLDOUT_STATE) for k in tensors)
    resume["holdout_state"] = [tensors[f"{HOLDOUT_STATE}{i}"] for i in range(n_held)] if n_held else None
    if "optimizer" in progress:
        from .finetune import optimizer_state
        resume["optimizer"] = optimizer_state(tensors, progress["optimizer"])
    return len(done), resume
