"""The teacher-side inputs of a block's planned layers, recorded during the one teacher block run per batch.

With teacher targets (`EMConfig.teacher_target`) every layer's cross Gram needs the layer's input in the
*teacher* next to the student's. The teacher never changes, so these inputs do not depend on which layers are
already quantized: instead of one teacher block run per layer and batch, up to that layer (`stats.capture_input`),
pre-hooks on the teacher block's planned layers record all of them while the block runs once per batch — the run
compress makes anyway for the block's reconstruction targets and the next blocks' teacher inputs (GPTQ's
`add_batch` hooks, on the teacher). The student side is unchanged: its inputs change as each layer is quantized,
so its block is still rerun per layer.

The recorded inputs go into the block cache's `TensorStore` and must fit its RAM budget: `plan_capture` measures
the inputs' bytes per image (and the block output's, which the targets and the student's outputs will need) on a
one-image teacher block run before anything is stored, and returns None when they would not fit; the caller then
keeps the per-layer path. `TeacherInputs.piece` answers None as well (the caller falls back for that layer and
batch) unless the recorded run cut the batch into the very pieces the statistics ask for, each layer called once
per piece: the recorded values are then exactly those the per-layer runs compute.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
import torch.nn as nn

from .blockio import Cached, TensorStore, run_block, tensors_of

log = logging.getLogger(__name__)


def _nbytes(obj: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_of(obj))


class TeacherInputs:
    """The inputs of the teacher block's planned layers `modules` (name -> teacher module) per batch and piece,
    kept in `store`; `recording(b, slices)` around the teacher block run of batch b fills them."""

    def __init__(self, store: TensorStore, modules: dict[str, nn.Module]) -> None:
        self.store, self.modules = store, modules
        self._held: dict[tuple[str, int], list[Any]] = {}       # (layer, batch) -> handles, one per piece
        self._slices: dict[int, list[slice]] = {}               # batch -> the pieces its recorded run used
        self.used = 0                                           # pieces answered from the record (tests, logs)

    @contextlib.contextmanager
    def recording(self, b: int, slices: list[slice]) -> Iterator[None]:
        """Context: every call of a planned layer stores its input as the next piece of batch b (`slices`: the
        pieces the run inside cuts batch b into)."""
        self._slices[b] = list(slices)

        def hook(name: str):
            def fn(_m: nn.Module, inputs: tuple) -> None:
                self._held.setdefault((name, b), []).append(self.store.put(inputs[0], share=False))
            return fn

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in self.modules.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def piece(self, name: str, b: int, slices: list[slice], k: int, device: torch.device) -> torch.Tensor | None:
        """Layer `name`'s teacher input on piece k of batch b cut into `slices`, on `device`, or None when the record
        cannot stand for it: another cut, or not one call of the layer per piece (a block whose pieces could not be
        joined was rerun whole, so its layers were called once more). Read-only: in RAM it is the stored tensor
        itself, not a copy (the statistics only read the teacher's input)."""
        held = self._held.get((name, b), [])
        if self._slices.get(b) != list(slices) or len(held) != len(slices):
            return None
        self.used += 1
        return self.store.get(held[k]).to(device)

    def free(self) -> None:
        for held in self._held.values():
            for h in held:
                self.store.free(h)
        self._held, self._slices = {}, {}


def plan_capture(store: TensorStore, t_block: nn.Module, t_in: Cached, modules: dict[str, nn.Module],
                 batch_sizes: list[int]) -> TeacherInputs | None:
    """A `TeacherInputs` for the teacher block's planned layers `modules` if their inputs over all batches
    (`batch_sizes` images each), plus the block's outputs twice (the teacher's targets and the student's outputs,
    stored next to them during the block), fit what is left of the store's RAM budget; None otherwise (logged),
    and None for a float16 store (its rounding would change the statistics). The sizes come from the teacher block
    run on one image of batch 0 (the whole batch if its arguments cannot be cut), before anything is stored."""
    if not modules or not batch_sizes:
        return None
    if store.dtype is not None:
        log.debug("float16 block cache: teacher inputs taken per layer")
        return None
    batch = batch_sizes[0]
    sl = slice(0, 1) if len(t_in.slices(0, 1, batch)) > 1 else slice(None)
    probe_images = 1 if sl != slice(None) else batch
    sizes: dict[str, int] = {}

    def hook(name: str):
        def fn(_m: nn.Module, inputs: tuple) -> None:
            sizes[name] = sizes.get(name, 0) + _nbytes(inputs[0])
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad(), store.mapped():
            out = run_block(t_block, t_in.piece(0, sl, batch))
    finally:
        for h in handles:
            h.remove()
    if set(sizes) != set(modules):
        log.debug("teacher block probe: layers %s not called; teacher inputs taken per layer",
                  sorted(set(modules) - set(sizes)))
        return None
    images = sum(batch_sizes)
    need = (sum(sizes.values()) + 2 * _nbytes(out)) * images // probe_images
    left = store.budget - store.in_ram
    if need > left:
        log.info("the teacher inputs of %d layers need ~%.0f MB with the block's outputs, %.0f MB of the block cache "
                 "budget are left: taken per layer instead", len(modules), need / 2**20, left / 2**20)
        return None
    return TeacherInputs(store, modules)


def block_run(t_block: nn.Module, t_in: Cached, b: int, n: int, batch: int, rec: TeacherInputs | None) -> Any:
    """The teacher block's outputs on batch b in pieces of at most n of its `batch` images (`Cached.run`),
    recording its planned layers' inputs into `rec` when given."""
    if rec is None:
        return t_in.run(b, lambda a: run_block(t_block, a), n, batch)
    with rec.recording(b, t_in.slices(b, n, batch)):
        return t_in.run(b, lambda a: run_block(t_block, a), n, batch)

