"""Multi-process compression under torchrun / torch.distributed: one rank per process.

    torchrun --standalone --nproc-per-node N -m bitdown compress ...       # one machine
    torchrun --nnodes M --nproc-per-node N --rdzv-endpoint HOST:PORT ...    # several, via rendezvous

`init` joins the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT): gloo on the CPU, NCCL with `--device cuda` (rank r uses cuda:LOCAL_RANK). Without those
variables nothing is initialised and every function here is a no-op (`active()` is False), so a plain run
is byte-identical to one without this module. The scheme (docs/DESIGN.md, "Distributed runs"):

- calibration: rank r holds the global calibration batches r, r + N, r + 2N, ... (`shard`); every batch
  is the same whatever N, so the per-layer statistics, summed over ranks in float64 (`all_reduce_stats`),
  differ from a one-process run only by the order of the float sums;
- EM: run once per layer on rank 0 on those statistics, its result broadcast (`on_main`);
- distillation and block reconstruction: every step's (seed, step) batch is cut into S fixed gradient slices
  (`slices`, S a config value that N must divide: `check_slices`); rank r holds S/N of them (`my_slices`), each
  slice's gradient comes from its own backward, and `sum_slices` gathers every slice's gradient and loss and
  adds them in slice order, so the step's gradient has the same bits for any N (1 included);
- checkpoints: rank 0 writes them, rank 0 reads them and broadcasts (`on_main`), so any N resumes;
- a peer that died or stopped answering within the process-group timeout (BITDOWN_DIST_TIMEOUT seconds,
  default 1800: longer than any one layer's EM, during which the other ranks wait) is a `DistError` naming
  the rank and the step, not a hang.

All-reduces and slice gathers are counted in `COUNTERS` (bytes and calls in all, and bytes per "what" under
"bytes:<what>"; a gather counts the bytes every rank receives), for benchmarks/distributed.py.
"""
from __future__ import annotations

import datetime
import logging
import math
import os
import pickle
from collections import Counter
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as td

log = logging.getLogger(__name__)

TIMEOUT_ENV = "BITDOWN_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
COUNTERS: Counter = Counter()   # "all_reduce_bytes", "all_reduce_calls", "all_gather_bytes", "stats_bytes", "bytes:<what>"

T = TypeVar("T")


class DistError(RuntimeError):
    """A collective failed: a peer process died, or did not answer within the timeout."""


# ----------------------------------------------------------------------------- state

def launched() -> bool:
    """Whether this process was started by torchrun (or sets its variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    """Whether a process group is initialised (then every hook here communicates)."""
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if active() else 0


def world_size() -> int:
    return td.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0 seconds, got {text!r}")
    return value


def init(device: str | torch.device | None = None) -> torch.device | None:
    """Join torchrun's process group (no-op without torchrun, or when already joined). Returns the device
    this rank computes on: cuda:LOCAL_RANK for a 'cuda' device without an index, else `device`."""
    if not launched():
        return None if device is None else torch.device(device)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank())
        torch.cuda.set_device(dev)
    if not active():
        if not td.is_available():
            raise ValueError("torchrun started this process, but this torch build has no torch.distributed")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        td.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s()))
        log.info("joined the process group: rank %d of %d (%s, local rank %d, %s)", rank(), world_size(), backend,
                 local_rank(), dev)
    return dev


def close() -> None:
    """Leave the process group (end of a command)."""
    if active():
        td.destroy_process_group()


def _comm_device() -> torch.device:
    if td.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _call(what: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except RuntimeError as e:      # DistBackendError, gloo's "Connection closed by peer", timeouts
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise DistError(f"rank {rank()} of {world_size()}: {what} failed: another rank stopped or did not "
                        f"answer within {timeout_s():.0f} s ({TIMEOUT_ENV}) [{first}]. Every rank stops; the last "
                        "checkpoint (--checkpoint-dir) is intact and rerunning the command resumes from it, with "
                        "any number of processes") from None


# ----------------------------------------------------------------------------- collectives

def all_reduce_(tensors: Sequence[torch.Tensor], what: str = "all-reduce") -> None:
    """Sum `tensors` (one dtype) over ranks in place, as one flat buffer (one collective)."""
    if not active() or not tensors:
        return
    dev = _comm_device()
    flat = torch.cat([t.detach().reshape(-1).to(dev) for t in tensors])
    _call(what, lambda: td.all_reduce(flat))
    COUNTERS["all_reduce_bytes"] += flat.numel() * flat.element_size()
    COUNTERS["all_reduce_calls"] += 1
    COUNTERS[f"bytes:{what}"] += flat.numel() * flat.element_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view(t.shape))
        offset += n


_STAT_FIELDS = ("block_grams", "full_gram", "out_sum", "out_sqsum", "cross_gram", "in_sum", "ref_sum")


def all_reduce_stats(stats: Any, what: str = "statistics") -> Any:
    """Sum a `stats.LayerStats` over ranks (float64 sums, row and image counts), in place; returns it."""
    if not active():
        return stats
    counts = torch.tensor([stats.n_rows, stats.n_images], dtype=torch.float64, device=stats.block_grams.device)
    fields = _STAT_FIELDS[1:] if stats.full_gram is not None else _STAT_FIELDS   # block Grams: its diagonal
    tensors = [t for t in (getattr(stats, f) for f in fields) if t is not None]
    before = COUNTERS["all_reduce_bytes"]
    all_reduce_(tensors + [counts], what)
    COUNTERS["stats_bytes"] += COUNTERS["all_reduce_bytes"] - before
    stats.n_rows, stats.n_images = int(counts[0]), int(counts[1])
    stats.blocks_from_full()
    return stats


def broadcast_object(obj: T, src: int = 0, what: str = "broadcast") -> T:
    """`obj` of rank `src` on every rank (pickled; tensors must be on the CPU)."""
    if not active():
        return obj
    box = [obj]
    _call(what, lambda: td.broadcast_object_list(box, src=src, device=_comm_device()))
    return box[0]


def all_gather_object(obj: Any, what: str = "all-gather") -> list[Any]:
    """Every rank's `obj`, in rank order."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    _call(what, lambda: td.all_gather_object(out, obj))
    return out


def on_main(fn: Callable[[], T], what: str) -> T:
    """fn() run on rank 0 only, its result broadcast to every rank; an exception raised there is raised on
    every rank (the same type and message), so no rank is left waiting. Without a group: fn()."""
    if not active():
        return fn()
    result: tuple[bool, Any] = (True, None)
    if is_main():
        try:
            result = (True, fn())
        except Exception as e:          # sent to every rank, raised there as well
            try:
                pickle.dumps(e)
            except Exception:
                e = RuntimeError(f"{type(e).__name__}: {e}")
            result = (False, e)
    ok, value = broadcast_object(result, 0, what)
    if not ok:
        raise value
    return value


def barrier(what: str = "barrier") -> None:
    if active():
        _call(what, lambda: td.barrier())


def check_same(key: str, what: str) -> None:
    """Refuse ranks that were started differently: every rank's `key` (a hash) must be rank 0's."""
    keys = all_gather_object(key, f"comparing the {what}")
    bad = [r for r, k in enumerate(keys) if k != keys[0]]
    if bad:
        raise ValueError(f"ranks {bad} were started with other {what} than rank 0 (hashes "
                         f"{', '.join(f'{r}: {k}' for r, k in enumerate(keys))}): start every rank with the same "
                         "command and files")


# ----------------------------------------------------------------------------- sharding

def shard(items: Sequence[T]) -> list[T]:
    """This rank's items: r, r + N, r + 2N, ... (round robin, so item i lives on rank i % N)."""
    return list(items[rank()::world_size()])


def interleave(per_rank: Sequence[Sequence[T]]) -> list[T]:
    """The global list from every rank's `shard` (all_gather_object of them): inverse of `shard`."""
    n = sum(len(s) for s in per_rank)
    w = len(per_rank)
    return [per_rank[i % w][i // w] for i in range(n)]


# ----------------------------------------------------------------------------- gradient slices

def check_slices(count: int, what: str = "the gradient slices") -> None:
    """Refuse a slice count the processes cannot share: every rank holds count / N slices, so the number of
    processes N must divide `count` (a ValueError naming both numbers)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{what}: grad_slices must be an integer >= 1, got {count!r}")
    n = world_size()
    if count % n:
        raise ValueError(f"{what}: grad_slices={count} cannot be shared by {n} processes (each holds the same "
                         f"number of slices): use a multiple of {n}, e.g. --grad-slices {count * n // math.gcd(count, n)}, "
                         "the same in every run whose files should be identical")


def slices(n: int, count: int) -> list[slice]:
    """The `count` gradient slices of a batch of n rows, in order (sizes as torch.tensor_split: the first
    n % count get one row more; some are empty when n < count)."""
    q, extra = divmod(n, count)
    bounds = [i * q + min(i, extra) for i in range(count + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(count)]


def my_slices(n: int, count: int) -> list[slice]:
    """This rank's gradient slices of a batch of n rows (row positions in the batch): of `slices(n, count)`, rank
    r of N holds the contiguous run r * count/N .. (r + 1) * count/N - 1. `check_slices` first."""
    check_slices(count)
    k = count // world_size()
    return slices(n, count)[rank() * k:(rank() + 1) * k]


def my_rows(n: int, count: int) -> slice:
    """The rows of a batch of n that this rank's gradient slices cover (one contiguous run)."""
    mine = my_slices(n, count)
    return slice(mine[0].start, mine[-1].stop)


def sum_slices(rows: torch.Tensor, what: str = "gradient slices") -> torch.Tensor:
    """The sum over every rank's slices of a per-slice quantity. `rows` (S/N, m): one row per slice this rank
    holds (my_slices order). Every rank's rows are gathered (all_gather, in rank order: slice order), then added
    one after another in slice order, so the result has the same bits whatever the number of processes."""
    if active():
        local = rows.detach().to(_comm_device()).contiguous()
        parts = [torch.empty_like(local) for _ in range(world_size())]
        _call(what, lambda: td.all_gather(parts, local))
        rows = torch.cat(parts).to(rows.device)
        COUNTERS["all_gather_bytes"] += rows.numel() * rows.element_size()
        COUNTERS[f"bytes:{what}"] += rows.numel() * rows.element_size()
    total = rows[0].clone()
    for row in rows[1:]:          # a fixed left-to-right order (S is small): not a reduction kernel's
        total += row
    return total


# ----------------------------------------------------------------------------- logging

class RankFilter(logging.Filter):
    """Adds `record.rank` ("0/2"; "-" outside torchrun) for a format such as '%(levelname)s [rank %(rank)s] ...'."""

    def filter(self, record: logging.LogRecord) -> bool:
        if active():
            record.rank = f"{rank()}/{world_size()}"
        else:
            record.rank = f"{os.environ['RANK']}/{os.environ['WORLD_SIZE']}" if launched() else "-"
        return True


def log_format(base: str = "%(levelname)s %(name)s: %(message)s") -> str:
    """`base` with the rank after the level when started by torchrun."""
    return base.replace("%(levelname)s", "%(levelname)s [rank %(rank)s]", 1) if launched() else base


def install_log_filter(handlers: Sequence[logging.Handler] | None = None) -> None:
    """Put a RankFilter on `handlers` (default: the root logger's)."""
    for h in handlers if handlers is not None else logging.getLogger().handlers:
        if not any(isinstance(f, RankFilter) for f in h.filters):
            h.addFilter(RankFilter())
