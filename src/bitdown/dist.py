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
- distillation and block reconstruction: every rank takes its slice (`part`) of the same (seed, step)
  batch, the codebook / BatchNorm gradients and the loss are summed over ranks (`sum_grads_`);
- checkpoints: rank 0 writes them, rank 0 reads them and broadcasts (`on_main`), so any N resumes;
- a peer that died or stopped answering within the process-group timeout (BITDOWN_DIST_TIMEOUT seconds,
  default 1800: longer than any one layer's EM, during which the other ranks wait) is a `DistError` naming
  the rank and the step, not a hang.

All-reduces are counted in `COUNTERS` (bytes and calls in all, and bytes per "what" under "bytes:<what>"), for
benchmarks/distributed.py.
"""
from __future__ import annotations

import datetime
import logging
import os
import pickle
from collections import Counter
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as td

log = logging.getLogger(__name__)

TIMEOUT_ENV = "BITDOWN_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
COUNTERS: Counter = Counter()        # "all_reduce_bytes", "all_reduce_calls", "stats_bytes", "bytes:<what>"

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


def sum_grads_(params: Sequence[torch.Tensor], loss: torch.Tensor, what: str = "gradient all-reduce") -> torch.Tensor:
    """Sum the gradients of `params` (a missing one counts as zero) and the scalar `loss` over ranks;
    returns the summed loss. Each rank's loss must already be its share of the global loss."""
    if not active():
        return loss.detach()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    total = loss.detach().float().reshape(1).clone()
    grads = [p.grad for p in params]
    if grads and any(g.dtype != torch.float32 for g in grads):
        raise TypeError("sum_grads_ needs float32 gradients")
    all_reduce_(grads + [total], what)
    return total[0]


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


def part(n: int) -> slice:
    """This rank's contiguous slice of n rows (sizes as torch.tensor_split: the first n % N ranks get one more)."""
    w, r = world_size(), rank()
    q, extra = divmod(n, w)
    lo = r * q + min(r, extra)
    return slice(lo, lo + q + (1 if r < extra else 0))


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
