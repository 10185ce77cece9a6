"""Block inputs and outputs over the calibration set: O(L) forwards instead of one prefix forward per layer.

`BlockIO` walks a model's blocks (blocks.py) in forward order and keeps, for every calibration batch,
the *outputs* of the blocks already done. The inputs of block i are obtained by running the model on
the batch with every earlier block replaced by its cached output (its `forward` patched to a lookup),
stopping right before block i: only the glue between blocks (pooling, activations, a stem's BatchNorm,
concatenations) is computed again, so a whole pass over the blocks costs about one forward of the
network whatever its depth (GPTQ's `opt_sequential` feeds each block the previous one's outputs; this
does the same for any data flow, skip connections across blocks and concatenations included).

Which cached outputs are still needed is found once by a probe on one image (`dependencies`): with all
blocks replaced by their outputs, perturbing block j's output changes the input of exactly the blocks
that read it. Block j's outputs are dropped once the last of those has its inputs; a block whose output
is no longer needed returns zeros of the right shape (an expanded scalar, no memory) if called again.

Tensors live in a `TensorStore`: in memory up to `budget_bytes`, then spilled to .npy files in a temporary
folder (a log line says so; read back through memory maps), never more than the budget in RAM. Equal tensors
share one stored copy; every read hands out a private copy (of one piece of a batch where the pipeline runs in
pieces), so an in-place op on what a block or the glue between blocks reads never reaches the store. Inputs
and outputs may be stored as float16 (`dtype`) to halve the memory; float32 keeps the statistics exact.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn

from .blocks import Block
from .stats import capture_call

log = logging.getLogger(__name__)

Args = tuple[tuple, dict]          # a module call's (args, kwargs)


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """`obj` with every tensor t inside (tuples, lists, dicts, nested) replaced by fn(t)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return type(obj)(*(map_tensors(o, fn) for o in obj)) if hasattr(obj, "_fields") else tuple(
            map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def tensors_of(obj: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    map_tensors(obj, lambda t: out.append(t))
    return out


def piece_slices(args: Any, n: int, batch: int) -> list[slice]:
    """Slices cutting `args` into pieces of at most `n` images along dim 0; one slice of everything when n <= 0,
    the batch is no larger, or some tensor inside does not have the calibration batch size `batch` as its dim 0
    (a block fed (L, B, D) sequences, a 0-dim scale: such arguments cannot be cut safely)."""
    ts = tensors_of(args)
    if n <= 0 or batch <= n or not ts or any(t.dim() == 0 or t.shape[0] != batch for t in ts):
        return [slice(None)]
    return [slice(i, min(i + n, batch)) for i in range(0, batch, n)]


def take_piece(obj: Any, sl: slice, batch: int) -> Any:
    """`obj` with every tensor inside whose dim 0 is `batch` long sliced along dim 0 (views, no copy)."""
    if sl == slice(None):
        return obj
    return map_tensors(obj, lambda t: t[sl] if t.dim() > 0 and t.shape[0] == batch else t)


class Unjoinable(Exception):
    """The pieces' results cannot be put back together unambiguously (`cat_pieces`)."""


def cat_pieces(objs: list[Any], sizes: list[int]) -> Any:
    """The objects computed on the pieces of one batch (`sizes` images each) put together: a tensor whose dim 0
    is its piece's size in every piece is concatenated along it, one equal in every piece (a scale, a mask) is
    taken once; anything else (a tensor whose dim 0 is not the batch, e.g. an (L, B, D) sequence) raises
    `Unjoinable`: the caller runs the whole batch instead."""
    first = objs[0]
    if len(objs) == 1:
        return first
    if isinstance(first, torch.Tensor):
        if not all(isinstance(o, torch.Tensor) for o in objs):
            raise Unjoinable
        if all(o.dim() > 0 and o.shape[0] == n for o, n in zip(objs, sizes)):
            return torch.cat(objs)
        if all(o.shape == first.shape and torch.equal(o, first) for o in objs[1:]):
            return first
        raise Unjoinable
    if isinstance(first, (tuple, list)) and not all(type(o) is type(first) and len(o) == len(first) for o in objs):
        raise Unjoinable
    if isinstance(first, tuple):
        parts = [cat_pieces([o[k] for o in objs], sizes) for k in range(len(first))]
        return type(first)(*parts) if hasattr(first, "_fields") else tuple(parts)
    if isinstance(first, list):
        return [cat_pieces([o[k] for o in objs], sizes) for k in range(len(first))]
    if isinstance(first, dict):
        if not all(isinstance(o, dict) and o.keys() == first.keys() for o in objs):
            raise Unjoinable
        return {k: cat_pieces([o[k] for o in objs], sizes) for k in first}
    try:                                            # anything else must be the same in every piece
        same = all(bool(o == first) for o in objs[1:])
    except (TypeError, ValueError, RuntimeError):
        same = False
    if not same:
        raise Unjoinable
    return first


def sizes_of(slices: list[slice], batch: int) -> list[int]:
    return [len(range(*sl.indices(batch))) for sl in slices]


def run_pieces(fn: Callable[[Any], Any], piece: Callable[[slice], Any], slices: list[slice], batch: int,
               what: str = "a block") -> Any:
    """fn over the pieces `piece(sl)` of one batch (one piece's activations alive at a time), put together with
    `cat_pieces`; when they cannot be (`Unjoinable`), fn over the whole batch `piece(slice(None))` instead."""
    if len(slices) > 1:
        try:
            return cat_pieces([fn(piece(sl)) for sl in slices], sizes_of(slices, batch))
        except Unjoinable:
            log.debug("%s's outputs on pieces of a batch cannot be joined: the whole batch is run", what)
    return fn(piece(slice(None)))


class TensorStore:
    """Tensors kept in RAM up to `budget_bytes`, the rest in memory-mapped files (read back lazily)."""

    def __init__(self, budget_bytes: int, dtype: torch.dtype | None = None, spill_dir: str | None = None) -> None:
        self.budget, self.dtype, self._spill_root = budget_bytes, dtype, spill_dir
        self.in_ram = 0
        self.peak_ram = 0
        self.spilled = 0
        self._dir: str | None = None
        self._n = 0
        self._held: dict[tuple, list[Any]] = {}     # _key -> handles held under it
        self._refs: dict[int, int] = {}             # id(handle) -> holders
        self._keys: dict[int, tuple] = {}           # id(handle) -> its _key
        self._maps: dict[str, np.ndarray] | None = None     # open memory maps inside `mapped()`

    def put(self, t: torch.Tensor, share: bool = True) -> Any:
        """A handle to a copy of `t` (detached; float tensors in `dtype` where given and finite). A tensor equal to
        one already held (same shape, dtype and values: e.g. the teacher's and the student's inputs before the
        first quantized layer) shares its copy: the handle counts its holders and `free` releases the copy with
        the last of them. `share=False`: a copy of its own, no look for an equal one (that costs a pass over `t`)
        and none later shares it."""
        t = t.detach()
        if self.dtype is not None and t.is_floating_point() and t.dtype != self.dtype:
            low = t.to(self.dtype)
            if bool(torch.isfinite(low).all()) or not bool(torch.isfinite(t).all()):
                t = low
        if not share:
            return self._put_new(t)
        key = self._key(t)
        for h in self._held.get(key, ()):
            if torch.equal(self.get(h), t):
                self._refs[id(h)] += 1
                return h
        h = self._put_new(t)
        self._held.setdefault(key, []).append(h)
        self._refs[id(h)] = 1
        self._keys[id(h)] = key
        return h

    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        """What two equal tensors share: shape, dtype, device and a checksum (candidates are compared in full)."""
        s = t.sum(dtype=torch.float64) if t.is_floating_point() or t.is_complex() else t.sum()
        return tuple(t.shape), t.dtype, str(t.device), float(s) if not t.is_complex() else complex(s)

    def _put_new(self, t: torch.Tensor) -> Any:
        size = t.numel() * t.element_size()
        if self.in_ram + size <= self.budget or t.device.type != "cpu":
            self.in_ram += size
            self.peak_ram = max(self.peak_ram, self.in_ram)
            return ("ram", t.clone(memory_format=torch.contiguous_format), size)
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="bitdown-blocks-", dir=self._spill_root)
            log.info("block activations exceed the %.0f MB memory budget: spilling to %s", self.budget / 2**20,
                     self._dir)
        path = os.path.join(self._dir, f"{self._n}.npy")
        self._n += 1
        try:                      # written, not a sparse memory map: a full disk is an OSError here, not a SIGBUS
            with open(path, "wb") as f:
                np.save(f, t.contiguous().numpy())
        except OSError as e:
            try:
                os.remove(path)
            except OSError:
                pass
            raise OSError(e.errno, f"spilling block activations to {self._dir} failed ({size} bytes needed for this "
                                   f"tensor, {self.spilled} already there): {e.strerror or e}; free disk space there, "
                                   "raise QuantConfig.cache_mb or lower forward_mb / the calibration images") from e
        self.spilled += size
        return ("disk", path, size)

    def get(self, h: Any) -> torch.Tensor:
        """The stored tensor itself (RAM) or a fresh copy (disk): for reads inside the store; a caller that may
        change what it gets uses `read`."""
        if h[0] == "ram":
            return h[1]
        return torch.from_numpy(np.array(self._map(h[1])))

    def read(self, h: Any, sl: slice = slice(None), batch: int = -1) -> torch.Tensor:
        """A copy of the stored tensor that no one else holds (a handle may be shared by equal tensors: the
        student's and the teacher's inputs; an in-place op of a block or of the glue between blocks must not reach
        the other holders), sliced along dim 0 by `sl` when that dim is `batch` long: one piece's worth."""
        src = h[1] if h[0] == "ram" else self._map(h[1])
        if sl != slice(None) and src.ndim > 0 and src.shape[0] == batch:
            src = src[sl]
        return src.clone() if h[0] == "ram" else torch.from_numpy(np.array(src))

    def _map(self, path: str) -> np.ndarray:
        """The spilled file's memory map: kept while `mapped()` is open (one per file and batch, not per piece)."""
        if self._maps is not None:
            if path not in self._maps:
                self._maps[path] = np.load(path, mmap_mode="r")
            return self._maps[path]
        return np.load(path, mmap_mode="r")

    @contextlib.contextmanager
    def mapped(self) -> Iterator[None]:
        """Context: spilled files are opened once and their maps dropped at the end (the pieces of one batch)."""
        outer = self._maps is not None
        if not outer:
            self._maps = {}
        try:
            yield
        finally:
            if not outer:
                self._maps = None

    def free(self, h: Any) -> None:
        """Release one holder of `h`; the copy goes with the last."""
        n = self._refs.get(id(h), 1) - 1
        if n > 0:
            self._refs[id(h)] = n
            return
        self._refs.pop(id(h), None)
        key = self._keys.pop(id(h), None)
        same = self._held.get(key, [])
        same[:] = [o for o in same if o is not h]
        if not same:
            self._held.pop(key, None)
        if h[0] == "ram":
            self.in_ram -= h[2]
        else:
            if self._maps is not None:
                self._maps.pop(h[1], None)
            try:
                os.remove(h[1])
            except OSError:
                pass

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __del__(self) -> None:
        self.close()


def _is_handle(o: Any) -> bool:
    return isinstance(o, tuple) and len(o) == 3 and o[0] in ("ram", "disk")


def _store_obj(store: TensorStore, obj: Any) -> Any:
    return map_tensors(obj, store.put)


def _load_obj(store: TensorStore, obj: Any, device: torch.device, dtype: torch.dtype, sl: slice = slice(None),
              batch: int = -1) -> Any:
    """The stored object with private copies of its tensors (`TensorStore.read`; sliced by `sl` where dim 0 is
    `batch` long), on `device`, floats in `dtype`."""
    if _is_handle(obj):
        t = store.read(obj, sl, batch)
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    if isinstance(obj, tuple):
        return tuple(_load_obj(store, o, device, dtype, sl, batch) for o in obj)
    if isinstance(obj, list):
        return [_load_obj(store, o, device, dtype, sl, batch) for o in obj]
    if isinstance(obj, dict):
        return {k: _load_obj(store, v, device, dtype, sl, batch) for k, v in obj.items()}
    return obj


def _free_obj(store: TensorStore, obj: Any) -> None:
    if _is_handle(obj):
        store.free(obj)
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            _free_obj(store, o)
    elif isinstance(obj, dict):
        for o in obj.values():
            _free_obj(store, o)


class _Patched:
    """Context: the given modules' forward replaced by fn(j) for module j."""

    def __init__(self, modules: dict[int, nn.Module], fn: Callable[[int], Callable]) -> None:
        self.modules, self.fn = modules, fn

    def __enter__(self) -> None:
        for j, m in self.modules.items():
            m.forward = self.fn(j)

    def __exit__(self, *exc) -> None:
        for m in self.modules.values():
            m.__dict__.pop("forward", None)


def dependencies(model: nn.Module, blocks: list[Block], x: torch.Tensor, seed: int = 0) -> list[int]:
    """For each block j, the index of the last block whose input reads j's output (j itself when none does),
    found by perturbing j's output on the probe batch `x` with all blocks replaced by their outputs."""
    modules = dict(model.named_modules())
    mods = {i: modules[b.name] for i, b in enumerate(blocks)}
    ins: dict[int, Any] = {}
    outs: dict[int, Any] = {}

    def rec_in(i):
        def fn(_m, args, kwargs):
            ins.setdefault(i, map_tensors((args, kwargs), lambda t: t.detach().clone()))
        return fn

    def rec_out(i):
        def fn(_m, _a, out):
            outs.setdefault(i, map_tensors(out, lambda t: t.detach().clone()))
        return fn

    hs = [m.register_forward_pre_hook(rec_in(i), with_kwargs=True) for i, m in mods.items()]
    hs += [m.register_forward_hook(rec_out(i)) for i, m in mods.items()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hs:
            h.remove()
    gen = torch.Generator().manual_seed(seed)
    last = list(range(len(blocks)))
    for j in range(len(blocks)):
        def noisy(t: torch.Tensor) -> torch.Tensor:
            if not t.is_floating_point():
                return t
            return t + (t.float().std().nan_to_num(1.0) + 1.0) * torch.randn(t.shape, generator=gen).to(t)
        bumped = map_tensors(outs[j], noisy)
        seen: dict[int, Any] = {}

        def lookup(i):
            return lambda *a, **k: bumped if i == j else outs[i]

        def rec(i):
            def fn(_m, args, kwargs):
                seen.setdefault(i, (args, kwargs))
            return fn

        hs = [mods[i].register_forward_pre_hook(rec(i), with_kwargs=True) for i in range(j + 1, len(blocks))]
        try:
            with _Patched(mods, lookup), torch.no_grad():
                model(x)
        finally:
            for h in hs:
                h.remove()
        for i in range(j + 1, len(blocks)):
            a, b = tensors_of(seen.get(i)), tensors_of(ins[i])
            if len(a) != len(b) or any(p.shape != q.shape or not torch.equal(p, q) for p, q in zip(a, b)):
                last[j] = i
    return last


class Cached:
    """Per-batch objects (tensors inside kept in a TensorStore), read back on `device` in `dtype`."""

    def __init__(self, store: TensorStore, objs: Iterable[Any], device: torch.device, dtype: torch.dtype) -> None:
        """`objs`: any iterable; a generator is stored one object at a time, so only one batch's objects
        exist outside the store at once."""
        self.store, self.device, self.dtype = store, device, dtype
        self._objs = [_store_obj(store, o) for o in objs]

    def __len__(self) -> int:
        return len(self._objs)

    def __getitem__(self, b: int) -> Any:
        """Batch b's object, its tensors private copies (an in-place op on them changes nothing stored)."""
        with self.store.mapped():
            return _load_obj(self.store, self._objs[b], self.device, self.dtype)

    def __iter__(self):
        return (self[b] for b in range(len(self)))

    def piece(self, b: int, sl: slice, batch: int) -> Any:
        """Batch b's object cut by `sl` along dim 0 where that dim is `batch` long (`take_piece`), private copies
        of the piece only (inside `store.mapped()` a spilled batch is opened once for all its pieces)."""
        return _load_obj(self.store, self._objs[b], self.device, self.dtype, sl, batch)

    def slices(self, b: int, n: int, batch: int) -> list[slice]:
        """`piece_slices` of batch b's object (from the stored shapes, nothing read)."""
        return piece_slices(_skeleton(self.store, self._objs[b], self.device, self.dtype), n, batch)

    def run(self, b: int, fn: Callable[[Any], Any], n: int, batch: int) -> Any:
        """fn over batch b's object in pieces of at most n of its `batch` images (`run_pieces`): the same values
        as fn(self[b]) up to float summation order, one piece's copies and activations alive at a time."""
        with self.store.mapped():
            return run_pieces(fn, lambda sl: self.piece(b, sl, batch), self.slices(b, n, batch), batch)

    def free(self) -> None:
        for o in self._objs:
            _free_obj(self.store, o)
        self._objs = []


class BlockIO:
    """Inputs and outputs of the blocks of one model (student or teacher) over the calibration batches.

    inputs(i): block i's (args, kwargs) per batch (needs the outputs of the blocks before i);
    set_outputs(i, outs): the outputs of block i per batch, kept until the last block reading them has
    its inputs. Values are returned on `device` in float32."""

    def __init__(self, model: nn.Module, blocks: list[Block], batches: list[torch.Tensor], store: TensorStore,
                 last_reader: list[int], piece: int = 0) -> None:
        """`piece`: the model runs on pieces of at most this many images of a batch (`piece_slices`; 0: whole)."""
        modules = dict(model.named_modules())
        self.piece = piece
        self.model, self.blocks, self.batches, self.store = model, blocks, batches, store
        self.mods = {i: modules[b.name] for i, b in enumerate(blocks)}
        self.last_reader = last_reader
        self._outputs: dict[int, Cached] = {}         # block -> its outputs per batch
        self._dead: dict[int, list[Any]] = {}
        self.device = batches[0].device
        self.dtype = batches[0].dtype

    def _lookup(self, b: int, sl: slice = slice(None)) -> Callable[[int], Callable]:
        def make(j: int) -> Callable:
            def fwd(*_a, **_k):
                batch = self.batches[b].shape[0]
                if j in self._outputs:
                    return self._outputs[j].piece(b, sl, batch)
                if j in self._dead:                     # zeros, materialised: the glue may work in place
                    return map_tensors(take_piece(self._dead[j][b], sl, batch), torch.clone)
                raise RuntimeError(f"block {self.blocks[j].name!r} has no output yet (blocks must go in order)")
            return fwd
        return make

    def inputs(self, i: int) -> Cached:
        """Block i's inputs on every batch (the earlier blocks replaced by their cached outputs)."""
        earlier = {j: m for j, m in self.mods.items() if j < i}

        def one(b: int, x: torch.Tensor) -> Args:
            def capture(xs: torch.Tensor, sl: slice) -> Args:
                with _Patched(earlier, self._lookup(b, sl)):
                    return capture_call(self.model, self.mods[i], xs)
            batch = x.shape[0]
            with self.store.mapped():            # each spilled output opened once for the batch's pieces
                return run_pieces(lambda sl: capture(take_piece(x, sl, batch), sl), lambda sl: sl,
                                  piece_slices(x, self.piece, batch), batch, self.blocks[i].name)
        cached = Cached(self.store, (one(b, x) for b, x in enumerate(self.batches)), self.device, self.dtype)
        for j in list(self._outputs):                # no later block reads these any more
            if self.last_reader[j] <= i:
                self.drop(j)
        return cached

    def set_outputs(self, i: int, outputs: Cached) -> None:
        """Block i's outputs per batch (the BlockIO owns `outputs` from now on)."""
        self._outputs[i] = outputs
        if self.last_reader[i] <= i:
            self.drop(i)

    def drop(self, j: int) -> None:
        if j in self._outputs:
            outs = self._outputs.pop(j)
            self._dead[j] = [_skeleton(self.store, o, self.device, self.dtype) for o in outs._objs]
            outs.free()

    def close(self) -> None:
        for j in list(self._outputs):
            self.drop(j)


def _skeleton(store: TensorStore, obj: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Zeros shaped like the stored object (expanded scalars: no memory)."""
    if _is_handle(obj):
        if obj[0] == "ram":
            t = obj[1]
            shape, dt = t.shape, t.dtype
        else:
            arr = store._map(obj[1])                  # the header only
            shape, dt = arr.shape, torch.from_numpy(np.zeros(0, dtype=arr.dtype)).dtype
        dt = dtype if dt.is_floating_point else dt
        return torch.zeros((), dtype=dt, device=device).expand(shape)
    if isinstance(obj, tuple):
        return tuple(_skeleton(store, o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [_skeleton(store, o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _skeleton(store, v, device, dtype) for k, v in obj.items()}
    return obj


def run_block(block: nn.Module, args: Args) -> Any:
    a, k = args
    return block(*a, **k)
