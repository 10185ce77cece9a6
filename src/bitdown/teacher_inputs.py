"""The uncompressed model's input at each layer, for teacher targets, computed a window of layers at a time.

With teacher targets every layer needs, for every calibration batch, its input in the *uncompressed*
network (stats.py cross Gram). Capturing it with one prefix forward per layer and batch
(`stats.capture_input`) costs as much as the student's own prefix forward: on EfficientNet-Lite0 it was
~45 % of the sequential statistics pass. The teacher never changes, so one forward can capture the inputs
of many layers at once: `TeacherInputs` keeps those of a window of consecutive layers (in forward order)
whose cached inputs fit in `budget_bytes` and recomputes the next window, with one forward per batch
stopped right before its last layer computes, when the loop moves past it (a layer is dropped once its
statistics are done). A layer whose inputs alone exceed the budget is captured one batch at a time, as
before. The cache lives where the activations are (the GPU with `device="cuda"`), so it adds up to the
budget to the peak memory there during the layer loop, and nothing after it. The tensors are exactly those
`capture_input` returns (same forward, same batch), so the statistics do not change.
A layer called twice per forward keeps its first call's input, as `run_until` does.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn

from .stats import StopForward, capture_input

log = logging.getLogger(__name__)

# bytes of cached teacher inputs: 1 GiB, or BITDOWN_TEACHER_CACHE_MB (0: one prefix forward per layer and
# batch, the memory of session 6). On EfficientNet-Lite0 with 128 calibration images (3.7 GB of layer inputs in all)
# that is ~5 windows instead of 49 forwards per batch.
def _budget_from_env() -> int:
    text = os.environ.get("BITDOWN_TEACHER_CACHE_MB", "1024")
    try:
        mb = float(text)
    except ValueError:
        mb = -1.0
    if not mb >= 0:
        raise ValueError(f"BITDOWN_TEACHER_CACHE_MB must be a number of MB >= 0, got {text!r}")
    return int(mb * 2**20)


DEFAULT_BUDGET = _budget_from_env()


class TeacherInputs:
    """`get(i, b)`: the teacher's input of `layers[i]` on `batches[b]`; `release(i)` once layer i is done."""

    def __init__(self, teacher: nn.Module, layers: list[nn.Module], batches: list[torch.Tensor],
                 budget_bytes: int | None = None) -> None:
        self.teacher, self.layers, self.batches = teacher, layers, batches
        self.budget = DEFAULT_BUDGET if budget_bytes is None else budget_bytes
        self._window: dict[int, list[torch.Tensor]] = {}
        self._bytes: list[int] | None = None      # per layer, its input on all the batches
        self.forwards = 0                          # teacher forwards run (for tests and logs)

    def get(self, i: int, b: int) -> torch.Tensor:
        if i in self._window:
            return self._window[i][b]
        if self._sizes()[i] > self.budget:         # too big to keep for all batches: one batch at a time
            self.forwards += 1
            return capture_input(self.teacher, self.layers[i], self.batches[b])
        self._fill(i)
        return self._window[i][b]

    def release(self, i: int) -> None:
        """Free layer i's cached inputs (its statistics are done)."""
        self._window.pop(i, None)

    def _sizes(self) -> list[int]:
        """Bytes of each layer's input over all batches, from one probe forward on one image."""
        if self._bytes is None:
            per_image: dict[int, int] = {}
            x = self.batches[0][:1]

            def size(i):
                def hook(_m, inputs) -> None:        # returns None: the input is left as it is
                    per_image.setdefault(i, inputs[0].numel() * inputs[0].element_size())
                return hook

            handles = [m.register_forward_pre_hook(size(i)) for i, m in enumerate(self.layers)]
            try:
                with torch.no_grad():
                    self.teacher(x)
            finally:
                for h in handles:
                    h.remove()
            self.forwards += 1
            n = sum(x.shape[0] for x in self.batches)
            self._bytes = [per_image.get(i, 0) * n for i in range(len(self.layers))]
        return self._bytes

    def _fill(self, start: int) -> None:
        """Cache the inputs of layers start.. (as many as fit the budget) with one forward per batch, stopped
        right before the window's last layer computes. Copies, not views: a later in-place op of the
        forward cannot change them, and they do not keep larger buffers alive."""
        self._window = {}
        sizes = self._sizes()
        stop, total = start, 0
        while stop < len(self.layers) and total + sizes[stop] <= self.budget:
            total += sizes[stop]
            stop += 1
        window = list(range(start, stop))
        got: dict[int, list[torch.Tensor]] = {i: [] for i in window}
        last = self.layers[window[-1]]
        batch = 0

        def grab(i):
            def hook(module, inputs) -> None:
                if len(got[i]) == batch:                  # first call of this forward only
                    got[i].append(inputs[0].detach().clone())
                if module is last:
                    raise StopForward
            return hook

        handles = [self.layers[i].register_forward_pre_hook(grab(i)) for i in window]
        try:
            with torch.no_grad():
                for batch, x in enumerate(self.batches):
                    try:
                        self.teacher(x)
                    except StopForward:
                        pass
                    self.forwards += 1
                    missing = [i for i in window if len(got[i]) != batch + 1]
                    if missing:
                        raise ValueError(f"layer {missing[0]} of the plan was not called by the model's forward()")
        finally:
            for h in handles:
                h.remove()
        self._window = got
        log.debug("teacher inputs of layers %d..%d cached (%.0f MB)", start, stop - 1, total / 2**20)
