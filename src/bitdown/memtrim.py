"""Freed memory handed back to the operating system between pipeline stages.

PyTorch's CPU tensors come from the C library's malloc. glibc keeps freed blocks in its heap for reuse, and
after a large tensor is freed it raises its mmap threshold (up to 32 MB), so later tensors of up to that size
come from the heap too: after a distillation step on EfficientNet-Lite0 (16 images at 224 px) the process
keeps ~1.2 GB of freed activations (RSS 1.5 GB against 0.3 GB live; `benchmarks/results/memory_stages.md`).
That memory is reused by the next step, but it also sits under whatever the next stage allocates, so the
peak RSS is live data plus the previous stage's leftovers. `release_memory` calls glibc's `malloc_trim(0)`,
which returns every free page of the heap; it costs 0.3-0.9 s after such a step, so the pipeline calls it
between stages (after a block, before and after a layer's distillation), not between steps. Elsewhere (macOS,
musl) it does nothing.
"""
from __future__ import annotations

import ctypes
import sys
from typing import Any

_TRIM: Any = None      # the malloc_trim function, False where there is none, None before the first look


def _malloc_trim() -> Any:
    global _TRIM
    if _TRIM is None:
        _TRIM = False
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None).malloc_trim          # the process's C library; missing on musl
                fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
                _TRIM = fn
            except (OSError, AttributeError):
                pass
    return _TRIM


def release_memory() -> bool:
    """Return the C heap's free pages to the operating system (glibc `malloc_trim(0)`); False where the C library
    has no such call. Changes no value: only where freed memory lives."""
    fn = _malloc_trim()
    if not fn:
        return False
    fn(0)
    return True
