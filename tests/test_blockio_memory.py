"""The block pipeline's memory mechanisms (issue 13, peak RSS): equal tensors share one copy in the TensorStore,
cached batches are stored one at a time, and forward passes run on pieces of a batch (QuantConfig.forward_mb)."""
from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn as nn

import bitdown
from bitdown import QuantConfig
from bitdown.blockio import BlockIO, Cached, TensorStore, dependencies, piece_slices, run_block, split_run

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


def test_split_run_equals_the_whole_batch():
    torch.manual_seed(0)
    m = TwoOut().eval()
    x = torch.randn(10, 3, 6, 6)
    with torch.no_grad():
        whole = run_block(m, ((x,), {}))
        parts = split_run(lambda a: run_block(m, a), ((x,), {}), 3)      # pieces of 3, 3, 3, 1
    assert parts[0].shape == whole[0].shape
    torch.testing.assert_close(parts[0], whole[0], rtol=1e-6, atol=1e-6)
    assert parts[1].dim() == 0 and float(parts[1]) == 2.0


def test_piece_slices_cut_only_common_batches():
    x = torch.zeros(10, 3)
    assert piece_slices(((x,), {}), 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert piece_slices(((x,), {}), 0) == [slice(None)]               # 0: whole batches
    assert piece_slices(((x,), {}), 10) == [slice(None)]
    assert piece_slices(((x, torch.zeros(3, 3)), {}), 4) == [slice(None)]   # a tensor without the batch dim
    assert piece_slices(((x,), {"t": torch.tensor(1.0)}), 4) == [slice(None)]


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
                io.set_outputs(i, Cached(io.store, [split_run(lambda a: run_block(mods[b.name], a), inp[k], io.piece)
                                                    for k in range(len(inp))], inp.device, inp.dtype))


def test_forward_mb_sets_the_piece_and_is_checked():
    x = [torch.zeros(128, 3, 224, 224)]
    assert bc.piece_images(QuantConfig(), x) == 27                  # 16 MB of 224 px float32 images
    assert bc.piece_images(QuantConfig(), [torch.zeros(128, 3, 32, 32)]) == 1365    # CIFAR: whole batches
    assert bc.piece_images(QuantConfig(forward_mb=0), x) == 0
    for bad in (-1, float("nan"), "16"):
        with pytest.raises(ValueError, match="forward_mb"):
            QuantConfig(forward_mb=bad)


def test_compress_in_pieces_differs_by_float_order_only():
    from test_blocks import SkipNet
    torch.manual_seed(0)
    m = SkipNet().eval()
    data = [torch.randn(32, 3, 8, 8)]
    cfg = dict(n_centroids=4, calib_images=32, batch_size=16)
    whole = bitdown.compress(m, data, QuantConfig(forward_mb=0, **cfg), progress=False)
    piece = bitdown.compress(m, data, QuantConfig(forward_mb=3 * 64 * 4 * 5 / 2**20, **cfg), progress=False)
    assert bc.piece_images(QuantConfig(forward_mb=3 * 64 * 4 * 5 / 2**20), data) == 5     # pieces 5, 5, 5, 1
    sw, sp = whole.state_dict(), piece.state_dict()
    for k in sw:
        if sw[k].is_floating_point():
            torch.testing.assert_close(sp[k], sw[k], rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(sp[k], sw[k]), k


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
    assert _rss_mb() > start - 100                          # (what the call is for: malloc kept them)
    assert release_memory()
    assert _rss_mb() < start - 150                          # handed back to the OS
    assert float(keep.sum()) == 2**20 // 4                   # live tensors untouched
