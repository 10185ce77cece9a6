"""The block pipeline's memory mechanisms (issue 13, peak RSS): equal tensors share one copy in the TensorStore,
cached batches are stored one at a time, and forward passes run on pieces of a batch (QuantConfig.forward_mb)."""
from __future__ import annotations

import copy
import errno
import importlib
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bitdown
from bitdown import QuantConfig
from bitdown.blockio import (BlockIO, Cached, TensorStore, Unjoinable, cat_pieces, dependencies, piece_slices,
                             run_block, run_pieces, take_piece)
from bitdown.checkpoint import fingerprint

bc = importlib.import_module("bitdown.compress")


def test_equal_tensors_share_one_copy_until_the_last_holder_frees_it():
    store = TensorStore(1 << 30)
    a = torch.randn(4, 5)
    h1, h2 = store.put(a), store.put(a.clone())
    assert h1 is h2 and store.in_ram == a.numel() * 4
    store.free(h1)
    assert torch.equal(store.get(h2), a) and store.in_ram == a.numel() * 4
    store.free(h2)
    assert store.in_ram == 0
    h3 = store.put(a)                               # held again after the last free: a fresh copy
    assert h3 is not h1 and store.in_ram == a.numel() * 4


def test_same_checksum_different_values_are_kept_apart():
    store = TensorStore(1 << 30)
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0])      # equal sums, different tensors
    ha, hb = store.put(a), store.put(b)
    assert ha is not hb and store.in_ram == 16
    assert torch.equal(store.get(ha), a) and torch.equal(store.get(hb), b)
    hc = store.put(torch.tensor([1.0, 2.0], dtype=torch.float64))  # same values, another dtype
    assert hc is not ha


def test_spilled_duplicates_share_one_file():
    store = TensorStore(0)                          # everything spills to disk
    a = torch.randn(3, 3)
    h1, h2 = store.put(a), store.put(a.clone())
    assert h1 is h2 and h1[0] == "disk" and store.spilled == a.numel() * 4
    store.free(h1)
    assert os.path.exists(h1[1]) and torch.equal(store.get(h2), a)
    store.free(h2)
    assert not os.path.exists(h1[1])
    store.close()


def test_cached_stores_a_generator_one_batch_at_a_time():
    store = TensorStore(1 << 30)
    seen = []

    def batches():
        for k in range(3):
            seen.append(store.in_ram)               # what the store held when batch k was made
            yield torch.full((2, 4), float(k))
    c = Cached(store, batches(), torch.device("cpu"), torch.float32)
    assert seen == [0, 32, 64]                      # each batch was stored before the next one was made
    assert [float(c[k][0, 0]) for k in range(3)] == [0.0, 1.0, 2.0]


class TwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return y, self.scale * 1.0                  # a batch tensor and a 0-dim one


def test_run_pieces_equals_the_whole_batch():
    torch.manual_seed(0)
    m = TwoOut().eval()
    x = torch.randn(10, 3, 6, 6)
    with torch.no_grad():
        whole = run_block(m, ((x,), {}))
        args = ((x,), {})
        parts = run_pieces(lambda a: run_block(m, a), lambda sl: take_piece(args, sl, 10),
                           piece_slices(args, 3, 10), 10)                          # pieces of 3, 3, 3, 1
    assert parts[0].shape == whole[0].shape
    torch.testing.assert_close(parts[0], whole[0], rtol=1e-6, atol=1e-6)
    assert parts[1].dim() == 0 and float(parts[1]) == 2.0


def test_piece_slices_cut_only_common_batches():
    x = torch.zeros(10, 3)
    assert piece_slices(((x,), {}), 4, 10) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert piece_slices(((x,), {}), 0, 10) == [slice(None)]               # 0: whole batches
    assert piece_slices(((x,), {}), 10, 10) == [slice(None)]
    assert piece_slices(((x, torch.zeros(3, 3)), {}), 4, 10) == [slice(None)]   # a tensor without the batch dim
    assert piece_slices(((x,), {"t": torch.tensor(1.0)}), 4, 10) == [slice(None)]
    seq = torch.zeros(7, 10, 3)                     # (L, B, D): dim 0 is not the calibration batch
    assert piece_slices(((seq,), {}), 4, 10) == [slice(None)]
    assert piece_slices(((seq, x), {}), 4, 10) == [slice(None)]


def test_cat_pieces_refuses_what_it_cannot_join():
    a, b = torch.randn(7, 2, 3), torch.randn(7, 2, 3)          # (L, piece, D) outputs of two pieces of 2
    with pytest.raises(Unjoinable):
        cat_pieces([a, b], [2, 2])
    mask = torch.ones(7, 7)
    out = cat_pieces([(torch.zeros(2, 3), mask), (torch.ones(2, 3), mask.clone())], [2, 2])
    assert out[0].shape == (4, 3) and out[1] is not None and torch.equal(out[1], mask)   # equal parts taken once


class SeqNet(nn.Module):
    """Images -> (L, B, D) tokens -> a batch_first=False encoder layer -> back to (B, ...): the encoder's dim 0
    is the sequence, not the batch."""
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).permute(2, 0, 1)          # (L=16, B, 8)
        return self.head(self.enc(t).mean(0))


def test_sequence_first_block_is_not_cut():
    torch.manual_seed(0)
    m = SeqNet().eval()
    x = torch.randn(6, 3, 8, 8)
    blocks = bc.find_blocks(m, x[:2], bc.forward_order(m, x[:2]))
    i = [b.name for b in blocks].index("enc")
    seen = []
    h = m.enc.register_forward_pre_hook(lambda _m, a: seen.append(a[0].clone()))
    with torch.no_grad():
        m(x)
    h.remove()
    last = dependencies(m, blocks, x[:1])
    for piece in (0, 4):                            # pieces 4 + 2 of the images
        io = BlockIO(m, blocks, [x], TensorStore(1 << 30), last, piece)
        mods = dict(m.named_modules())
        for j, b in enumerate(blocks):
            ins = io.inputs(j)
            if j == i:
                assert ins[0][0][0].shape == (16, 6, 8)
                torch.testing.assert_close(ins[0][0][0], seen[0], rtol=1e-5, atol=1e-6)
            with torch.no_grad():
                outs = Cached(io.store, [ins.run(0, lambda a: run_block(mods[b.name], a), piece, 6)], ins.device,
                              ins.dtype)
                if j == i:
                    ref = run_block(m.enc, ins[0])
                    assert outs[0].shape == (16, 6, 8)
                    torch.testing.assert_close(outs[0], ref, rtol=1e-5, atol=1e-6)
            io.set_outputs(j, outs)
    data = [torch.randn(12, 3, 8, 8)]               # compress in pieces of 5 images vs whole batches
    cfg = dict(n_centroids=4, calib_images=12, batch_size=12)
    whole = bitdown.compress(m, data, QuantConfig(forward_mb=0, **cfg), progress=False)
    piece = bitdown.compress(m, data, QuantConfig(forward_mb=3 * 64 * 4 * 5 / 2**20, **cfg), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(piece(data[0]), whole(data[0]), rtol=1e-3, atol=1e-4)


class InPlaceNet(nn.Module):
    """A stem, then glue that works in place on the stem's output (hardswish inplace), then convolutions; the
    last one also reads the stem's output (a skip)."""
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = F.hardswish(self.stem(x), inplace=True)
        return self.conv2(F.relu_(self.conv(h)) + h)


@pytest.mark.parametrize("piece", [0, 2])
def test_inputs_are_private_copies_under_in_place_glue(piece):
    """Student and teacher share one stored copy of equal outputs; the glue's in-place ops on what it reads must
    not reach the other side: both sides' block inputs equal a plain forward's."""
    torch.manual_seed(0)
    m = InPlaceNet().eval()
    t = copy.deepcopy(m)
    batches = list(torch.randn(10, 3, 6, 6).split(5))
    blocks = bc.find_blocks(m, batches[0][:2], bc.forward_order(m, batches[0][:2]))
    assert [b.name for b in blocks] == ["stem", "conv", "conv2"]
    seen: dict[str, list] = {}
    hs = [getattr(m, b.name).register_forward_pre_hook(lambda _m, a, n=b.name: seen.setdefault(n, []).append(
        a[0].clone())) for b in blocks]
    with torch.no_grad():
        for x in batches:
            m(x)
    for h in hs:
        h.remove()
    store = TensorStore(1 << 30)
    last = dependencies(m, blocks, batches[0][:1])
    ios = [BlockIO(net, blocks, batches, store, last, piece) for net in (m, t)]
    for j, b in enumerate(blocks):
        ins = [io.inputs(j) for io in ios]          # the student's first, as in the block loop
        for side in ins:
            for k in range(len(batches)):
                torch.testing.assert_close(side[k][0][0], seen[b.name][k], rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            for io, net, inp in zip(ios, (m, t), ins):
                mod = getattr(net, b.name)
                io.set_outputs(j, Cached(store, (inp.run(k, lambda a: run_block(mod, a), piece, len(x))
                                                 for k, x in enumerate(batches)), inp.device, inp.dtype))
        for inp in ins:
            inp.free()
        if j == 0:                                  # the stem's outputs: one copy for student and teacher
            assert ios[0]._outputs[0]._objs[0] is ios[1]._outputs[0]._objs[0]


def test_read_hands_out_a_private_copy():
    store = TensorStore(1 << 30)
    a = torch.randn(6, 3)
    h = store.put(a)
    assert store.put(a.clone()) is h
    store.read(h).mul_(0)
    store.read(h, slice(0, 2), 6).mul_(0)
    assert torch.equal(store.get(h), a)
    spilled = TensorStore(0)
    hd = spilled.put(a)
    spilled.read(hd, slice(2, 4), 6).mul_(0)
    assert torch.equal(spilled.read(hd), a) and spilled.read(hd, slice(2, 4), 6).shape == (2, 3)
    spilled.close()


def test_full_disk_is_a_clear_error(monkeypatch, tmp_path):
    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "save", full)
    store = TensorStore(0, spill_dir=str(tmp_path))
    with pytest.raises(OSError, match=r"spilling block activations to .*bitdown-blocks-.*\(48 bytes needed"):
        store.put(torch.randn(4, 3))
    assert not any(p.is_file() for p in tmp_path.rglob("*"))     # no partial file left
    store.close()


def test_spilled_batch_is_opened_once_for_its_pieces(monkeypatch):
    from test_blocks import skipnet_batches
    m, batches, blocks, mods = skipnet_batches(10, 5)
    last = dependencies(m, blocks, batches[0][:1])
    io = BlockIO(m, blocks, batches, TensorStore(0), last, 2)           # everything spilled; pieces 2, 2, 1
    loads = []
    real = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    for i, b in enumerate(blocks):
        ins = io.inputs(i)
        loads.clear()
        with torch.no_grad():
            outs = Cached(io.store, [ins.run(k, lambda a: run_block(mods[b.name], a), 2, 5) for k in range(2)],
                          ins.device, ins.dtype)
        assert len(loads) == len(set(loads))        # each spilled file read once (not once per piece)
        io.set_outputs(i, outs)
    io.store.close()


def test_block_inputs_in_pieces_equal_whole_batches():
    from test_blocks import skipnet_batches
    m, batches, blocks, mods = skipnet_batches(10, 5)
    last = dependencies(m, blocks, batches[0][:1])
    ios = [BlockIO(m, blocks, batches, TensorStore(1 << 30), last, piece) for piece in (0, 2)]
    for i, b in enumerate(blocks):
        ins = [io.inputs(i) for io in ios]
        for k in range(len(batches)):
            torch.testing.assert_close(ins[1][k][0][0], ins[0][k][0][0], rtol=1e-5, atol=1e-6)
        for io, inp in zip(ios, ins):
            with torch.no_grad():
                io.set_outputs(i, Cached(io.store, [inp.run(k, lambda a: run_block(mods[b.name], a), io.piece,
                                                            len(batches[k])) for k in range(len(inp))],
                                         inp.device, inp.dtype))


def test_forward_mb_sets_the_piece_and_is_checked():
    x = [torch.zeros(128, 3, 224, 224)]
    assert bc.piece_images(QuantConfig(), x) == 27                  # 16 MB of 224 px float32 images
    assert bc.piece_images(QuantConfig(), [torch.zeros(128, 3, 32, 32)]) == 1365    # CIFAR: whole batches
    assert bc.piece_images(QuantConfig(forward_mb=0), x) == 0
    for bad in (-1, float("nan"), "16", True, False):
        with pytest.raises(ValueError, match="forward_mb"):
            QuantConfig(forward_mb=bad)
    fp = [fingerprint(bc._fp_json(QuantConfig(forward_mb=v).to_json())) for v in (8, 8.0, 16)]
    assert fp[0] == fp[1] != fp[2]                  # 8 and 8.0: one setting
    assert QuantConfig(forward_mb=8).to_json()["forward_mb"] == 8.0 and isinstance(
        QuantConfig(forward_mb=8).to_json()["forward_mb"], float)


def test_cache_mb_is_not_in_the_fingerprint_and_main_checkpoints_resume():
    key = [fingerprint(bc._fp_json(QuantConfig(cache_mb=v).to_json())) for v in (0, 512, 4096, 10000)]
    assert len(set(key)) == 1                       # spills are read back exactly: no result changes
    before = QuantConfig().to_json()                # a checkpoint written before session 11: no forward_mb,
    del before["forward_mb"]                        # cache_mb at its old default
    before["cache_mb"] = 4096
    assert bc._fp_json(before) == bc._fp_json(QuantConfig().to_json())
    assert bc._fp_json(QuantConfig(forward_mb=0).to_json()) != bc._fp_json(before)    # whole batches: a new key


def test_compress_in_pieces_differs_by_float_order_only():
    from test_blocks import SkipNet
    torch.manual_seed(0)
    m = SkipNet().eval()
    data = [torch.randn(32, 3, 8, 8)]
    cfg = dict(n_centroids=4, calib_images=32, batch_size=16)
    whole = bitdown.compress(m, data, QuantConfig(forward_mb=0, **cfg), progress=False)
    piece = bitdown.compress(m, data, QuantConfig(forward_mb=3 * 64 * 4 * 5 / 2**20, **cfg), progress=False)
    assert bc.piece_images(QuantConfig(forward_mb=3 * 64 * 4 * 5 / 2**20), data) == 5     # pieces 5, 5, 5, 1
    with torch.no_grad():                           # the same network up to float summation order: k-means may
        torch.testing.assert_close(piece(data[0]), whole(data[0]), rtol=1e-3, atol=1e-3)   # flip a near tie
    sw, sp = whole.state_dict(), piece.state_dict()
    codes = [k for k in sw if not sw[k].is_floating_point() and sw[k].numel() > 1]
    assert codes
    agree = sum(int((sp[k] == sw[k]).sum()) for k in codes) / sum(sw[k].numel() for k in codes)
    assert agree >= 0.99, agree


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc")
def test_release_memory_returns_freed_heap_to_the_os():
    from bitdown.memtrim import release_memory
    if not release_memory():
        pytest.skip("the C library has no malloc_trim (not glibc)")
    big = torch.ones(16 * 2**20, dtype=torch.uint8)         # mmapped; its free raises glibc's mmap threshold
    del big                                                 # to 16 MB, so 1 MB blocks now come from the heap
    held = [torch.ones(2**20 // 4) for _ in range(300)]     # 300 x 1 MB
    keep = held[-1]
    start = _rss_mb()
    del held                                                # 299 MB freed, kept by malloc for reuse
    if _rss_mb() < start - 100:                             # MALLOC_MMAP_THRESHOLD_, jemalloc, ...: returned already
        pytest.skip("malloc returned the freed blocks itself: nothing left for malloc_trim to hand back")
    assert release_memory()
    assert _rss_mb() < start - 150                          # handed back to the OS
    assert float(keep.sum()) == 2**20 // 4                   # live tensors untouched
