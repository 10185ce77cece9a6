"""Lazy reading in bitdown.data: decode on first access, a capped memo, unreadable images met mid-run,
the compact zip listing (checked against zipfile), and the memory of a 200,000-image listing."""

from __future__ import annotations

import io
import json
import logging
import pickle
import struct
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import bitdown.data as data
from bitdown.compress import take_images
from bitdown.data import ImageDataset, list_images, make_loader


def _png(seed: int, size=(8, 8)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    """12 random 8x8 PNGs in 3 class folders."""
    root = tmp_path / "imgs"
    for k in range(12):
        p = root / f"c{k % 3}" / f"{k:02d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_png(k))
    return root


@pytest.fixture
def decodes(monkeypatch):
    """The names of the images decoded so far (data.decode_image calls)."""
    calls = []
    real = data.decode_image

    def counting(b):
        calls.append(len(b))
        return real(b)

    monkeypatch.setattr(data, "decode_image", counting)
    return calls


def _all(ds):
    return [ds[i] for i in range(len(ds))]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, tuple):
            assert torch.equal(x[0], y[0]) and x[1] == y[1]
        else:
            assert torch.equal(x, y)


def test_lazy_decodes_on_first_access_only(folder, decodes):
    ds = ImageDataset(folder, "cifar10", labels="parent")
    assert ds.cache == "lazy" and len(ds) == 12 and decodes == []
    x = take_images(make_loader(ds, 4, shuffle=True, seed=0), 4, 4)
    assert len(decodes) == 4 and x[0].shape == (4, 3, 32, 32)
    take_images(make_loader(ds, 4, shuffle=True, seed=0), 4, 4)     # the same images again: memoised
    assert len(decodes) == 4
    _all(ds)
    _all(ds)
    assert len(decodes) == 12 and ds.cached_bytes > 12 * 3 * 32 * 32


def test_lazy_eager_none_give_the_same_items(folder):
    for kw in ({}, {"labels": "parent"}, {"train": True, "seed": 5}, {"labels": "parent", "indices": [7, 2, 11]}):
        lazy = ImageDataset(folder, "cifar10", **kw)
        eager = ImageDataset(folder, "cifar10", cache=True, **kw)
        none = ImageDataset(folder, "cifar10", cache="none", **kw)
        assert eager.cache == "eager" and none.cache == "none" and lazy.names == eager.names == none.names
        _same(_all(lazy), _all(eager))
        _same(_all(lazy), _all(none))
        _same(_all(lazy), _all(lazy))                     # memoised items are the same
        if kw.get("train"):
            for ds in (lazy, eager):
                ds.set_epoch(1)
            _same(_all(lazy), _all(eager))
    with pytest.raises(ValueError, match="cache must be"):
        ImageDataset(folder, "cifar10", cache="sometimes")


def test_memo_cap(folder, decodes):
    one = 3 * 32 * 32 + data._ITEM_OVERHEAD
    ds = ImageDataset(folder, "cifar10", cache_bytes=3 * one)
    _all(ds)
    assert len(decodes) == 12 and ds.cached_bytes == 3 * one
    _all(ds)
    assert len(decodes) == 12 + 9                         # 3 kept, 9 decoded on every access
    ds = ImageDataset(folder, "cifar10", cache="none")
    _all(ds)
    _all(ds)
    assert len(decodes) == 21 + 24 and ds.cached_bytes == 0


def test_unreadable_skipped_on_access_deterministically(folder, caplog, decodes):
    (folder / "c0" / "03.png").write_bytes(b"not a png")      # position 1 in sorted order
    (folder / "c2" / "11.png").write_bytes(b"\xff\xd8garbage")  # the last position: wraps round to 0
    eager = ImageDataset(folder, "cifar10", labels="parent", cache=True)
    assert len(eager) == 10 and eager.n_skipped == 2
    with caplog.at_level(logging.WARNING, logger="bitdown.data"):
        ds = ImageDataset(folder, "cifar10", labels="parent", train=True)
        assert len(ds) == 12 and ds.n_skipped == 0               # nothing read yet
        names = ds.names
        bad1, bad2 = names.index("c0/03.png"), names.index("c2/11.png")
        assert (bad1, bad2) == (1, 11)
        items = _all(ds)
    assert ds.n_skipped == 2
    assert "c0/03.png" in caplog.text and "c2/11.png" in caplog.text and "2 unreadable so far" in caplog.text
    good = ImageDataset(folder, "cifar10", labels="parent", train=True, cache="none")
    for i, j in ((bad1, bad1 + 1), (bad2, 0)):                   # served by the next readable image
        x, y = items[i]
        xj, yj = good[j]
        assert torch.equal(x, xj) and y == yj
    n = len(decodes)
    _same(_all(ds), items)                                       # deterministic; bad files not re-read
    assert len(decodes) == n
    clone = pickle.loads(pickle.dumps(ds))                       # workers: no memo, same answers
    assert clone.n_skipped == 2 and clone.cached_bytes == 0
    _same(_all(clone), items)


def test_unreadable_raise_and_none_readable(folder):
    (folder / "c1" / "04.png").write_bytes(b"nope")
    ds = ImageDataset(folder, "cifar10", unreadable="raise")
    i = ds.names.index("c1/04.png")
    ds[i - 1]
    with pytest.raises(ValueError, match=r"c1/04\.png"):
        ds[i]
    with pytest.raises(ValueError, match="unreadable must be"):
        ImageDataset(folder, "cifar10", unreadable="ignore")
    for p in folder.rglob("*.png"):
        p.write_bytes(b"nope")
    with pytest.raises(ValueError, match="none of the 12 images"):
        ImageDataset(folder, "cifar10")[3]


def test_index_errors(folder):
    ds = ImageDataset(folder, "cifar10")
    assert torch.equal(ds[-1], ds[11])
    with pytest.raises(IndexError):
        ds[12]


# ----------------------------------------------------------------------------- the zip listing


def _check_like_zipfile(path):
    zf = zipfile.ZipFile(path)
    want = sorted((i for i in zf.infolist() if not i.is_dir() and data._is_image_name(i.filename)),
                  key=lambda i: i.filename)
    src = data._Source.open(path)
    assert src.names == [i.filename for i in want] == list_images(path)
    for k in range(len(src)):
        assert src.read(k) == zf.read(want[k].filename)
    return src


def test_zip_listing_matches_zipfile(tmp_path):
    """Stored and deflated members, unsorted order, directories, utf-8 names, a comment, data
    prepended to the archive (a self-extracting layout), zip64 end records."""
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("z/", b"")
        zf.writestr("z/b.png", _png(1), compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr("a/é.png", _png(2))
        zf.writestr("a/.hidden.png", _png(3))
        zf.writestr("notes.txt", b"x")
        zf.writestr(zipfile.ZipInfo("a/plain.JPG"), _png(4))
        zf.comment = b"an archive comment"
    _check_like_zipfile(path)
    sfx = tmp_path / "sfx.zip"
    sfx.write_bytes(b"#!/bin/sh\nexit 0\n" * 10 + path.read_bytes())
    _check_like_zipfile(sfx)
    z64 = tmp_path / "z64.zip"
    with zipfile.ZipFile(z64, "w") as zf:
        for k in range(3):
            with zf.open(f"d/{k}.png", "w", force_zip64=True) as f:
                f.write(_png(k))
    _check_like_zipfile(z64)


def test_zip64_extra_field():
    extra = struct.pack("<2H", 0x5455, 1) + b"x" + struct.pack("<2H3Q", 1, 24, 5 << 32, 6 << 32, 7 << 32)
    full = 0xFFFFFFFF
    assert data._zip64_extra(extra, full, full, full) == (5 << 32, 6 << 32, 7 << 32)
    assert data._zip64_extra(struct.pack("<2HQ", 1, 8, 9 << 32), 10, 11, full) == (10, 11, 9 << 32)
    with pytest.raises(zipfile.BadZipFile):
        data._zip64_extra(b"", full, 1, 2)


def test_corrupt_member_and_bad_archive(tmp_path):
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a/ok.png", _png(1))
        zf.writestr("a/bad.png", _png(2))
    raw = bytearray(path.read_bytes())
    at = raw.find(_png(2)) + 40
    raw[at] ^= 0xFF                                              # a flipped byte inside a stored member
    path.write_bytes(bytes(raw))
    ds = ImageDataset(path, "cifar10", cache="eager")
    assert ds.names == ["a/ok.png"] and ds.n_skipped == 1        # bad CRC-32: unreadable
    (tmp_path / "trunc.zip").write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(ValueError, match="trunc.zip"):
        list_images(tmp_path / "trunc.zip")


def test_folder_listing_is_relative_posix(folder):
    (folder / "c0" / "deep" / "er").mkdir(parents=True)
    (folder / "c0" / "deep" / "er" / "x.bmp").write_bytes(_png(0))
    names = list_images(folder)
    assert len(names) == 13 and names == sorted(names) and "c0/deep/er/x.bmp" in names


# ----------------------------------------------------------------------------- memory at scale


BIG_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time
    def hwm_mb():   # this process image's peak RSS: ru_maxrss survives execve, so it can count the forking parent
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import torch
    torch.set_num_threads(1)
    from bitdown.compress import take_images
    from bitdown.data import ImageDataset, make_loader
    t0 = time.perf_counter()
    ds = ImageDataset(sys.argv[1], "cifar10", labels="parent")
    t1 = time.perf_counter()
    x = take_images(make_loader(ds, 64, shuffle=True, seed=0), 64, 64)
    print(json.dumps({"n": len(ds), "shape": list(x[0].shape), "cached": ds.cached_bytes, "build_s": t1 - t0,
                      "take_s": time.perf_counter() - t1,
                      "rss_mb": hwm_mb()}))
""")


def test_200k_image_zip_stays_small(tmp_path):
    """A 200,000-image zip (one 8x8 PNG's bytes under every name): building the dataset and taking 64
    calibration images stays under 500 MB of peak RSS (torch's import alone is about 220 MB)."""
    png = _png(0)
    path = tmp_path / "big.zip"
    t = time.perf_counter()
    with zipfile.ZipFile(path, "w") as zf:
        for k in range(200_000):
            zf.writestr(zipfile.ZipInfo(f"c{k % 10}/{k:06d}.png", date_time=(2020, 1, 1, 0, 0, 0)), png)
    write_s = time.perf_counter() - t
    with open(path, "rb") as f:                                  # > 65,535 entries: zip64 end records
        tail = f.read()[-200:]
    assert b"PK\x06\x06" in tail and b"PK\x06\x07" in tail
    src = data._Source.open(path)
    assert src.names == sorted(f"c{k % 10}/{k:06d}.png" for k in range(200_000))
    assert all(src.read(k) == png for k in (0, 65_535, 65_536, 199_999))
    del src
    out = subprocess.run([sys.executable, "-c", BIG_SCRIPT, str(path)], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["n"] == 200_000 and res["shape"] == [64, 3, 32, 32]
    assert res["cached"] <= 64 * (3 * 32 * 32 + data._ITEM_OVERHEAD)       # only what was taken
    assert res["rss_mb"] < 500, (res, write_s)
