"""Fast tests for bitdown.data on tiny synthetic folders and zips."""

from __future__ import annotations

import logging
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from bitdown.data import (
    ImageDataset,
    augment,
    imagenet_wnids,
    list_images,
    make_loader,
    normalize,
    prepare,
    preprocess,
    split_indices,
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@pytest.fixture
def tree(tmp_path, make_image):
    """cls folders with images, plus things that must be ignored."""
    root = tmp_path / "imgs"
    make_image(root / "dog" / "b.png", fmt="PNG")
    make_image(root / "dog" / "a.JPG", fmt="JPEG")
    make_image(root / "cat" / "sub" / "c.jpeg", fmt="JPEG")
    make_image(root / "bird" / "d.bmp", fmt="BMP")
    make_image(root / "bird" / ".hidden.png", fmt="PNG")
    make_image(root / "__MACOSX" / "bird" / "._d.png", fmt="PNG")
    (root / "notes.txt").write_text("not an image")
    return root


def _zip_of(folder, zpath):
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, p.relative_to(folder).as_posix() + ("/" if p.is_dir() else ""))
    return zpath


EXPECTED = ["bird/d.bmp", "cat/sub/c.jpeg", "dog/a.JPG", "dog/b.png"]


def test_list_folder_recursive_sorted_filtered(tree):
    assert list_images(tree) == EXPECTED


def test_list_zip_skips_dirs_and_hidden(tree, tmp_path):
    z = _zip_of(tree, tmp_path / "imgs.zip")
    assert any(n.endswith("/") for n in zipfile.ZipFile(z).namelist())
    assert list_images(z) == EXPECTED


def test_list_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        list_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "missing")
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"this is not a zip")
    with pytest.raises(ValueError, match="bad.zip"):
        list_images(bad)


def test_parent_labels_and_subset(tree):
    ds = ImageDataset(tree, "cifar10", labels="parent")
    # the class is the immediate parent folder: bird, sub, dog, dog
    assert ds.classes == ["bird", "dog", "sub"]
    assert ds.labels.tolist() == [0, 2, 1, 1]
    sub = ImageDataset(tree, "cifar10", labels="parent", indices=[3, 0])
    assert sub.names == ["dog/b.png", "bird/d.bmp"]
    assert sub.labels.tolist() == [1, 0] and sub.classes == ds.classes
    x, y = sub[0]
    assert x.shape == (3, 32, 32) and y == 1


def test_wnid_labels(tmp_path, make_image):
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and len(set(wnids)) == 1000 and list(wnids) == sorted(wnids)
    make_image(tmp_path / "in" / "n01440764_tench.JPEG", size=(4, 4), fmt="JPEG")
    make_image(tmp_path / "in" / "n15075141_toilet_tissue.png", size=(4, 4), fmt="PNG")
    ds = ImageDataset(tmp_path / "in", "imagenet", labels="wnid")
    assert ds.labels.tolist() == [0, 999]
    assert ds[0][0].shape == (3, 224, 224)
    make_image(tmp_path / "in" / "n99999999_nothing.png", size=(4, 4), fmt="PNG")
    with pytest.raises(ValueError, match="n99999999_nothing.png"):
        ImageDataset(tmp_path / "in", "imagenet", labels="wnid")


def test_corrupt_image_skipped_and_counted(tmp_path, make_image, caplog):
    """cache=True (eager) decodes in the constructor and drops unreadable images there. (Since reading
    became lazy by default this test asks for eager mode; the lazy behaviour is in test_data_lazy.py.)"""
    make_image(tmp_path / "d" / "a" / "ok.png", fmt="PNG")
    (tmp_path / "d" / "a" / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    with caplog.at_level(logging.WARNING, logger="bitdown.data"):
        ds = ImageDataset(tmp_path / "d", "cifar10", labels="parent", cache=True)
    assert len(ds) == 1 and ds.n_skipped == 1 and ds.names == ["a/ok.png"]
    assert ds.labels.tolist() == [0]
    assert "1 unreadable" in caplog.text and "bad.jpg" in caplog.text
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "bad.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="could be read"):
        ImageDataset(tmp_path / "e", "cifar10", cache=True)


def test_preset_values(tmp_path, make_image):
    make_image(tmp_path / "p" / "c.png", size=(32, 32), color=(0, 128, 255), fmt="PNG")
    x = ImageDataset(tmp_path / "p", "cifar10")[0]
    want = torch.tensor([(v / 255 - m) / s for v, m, s in zip((0, 128, 255), MEAN, STD)])
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x, want.view(3, 1, 1).expand(3, 32, 32), atol=1e-5)
    img = Image.new("RGB", (50, 40), (127, 255, 0))
    e = preprocess(img, "efficientnet")
    assert e.shape == (3, 224, 224)
    assert torch.allclose(e[:, 100, 100], torch.tensor([0.0, 1.0, -127 / 128]))
    assert preprocess(img, "cifar10").shape == (3, 32, 32)  # non-32x32 input is resized
    i = preprocess(img, "imagenet")
    assert torch.allclose(i[:, 0, 0], torch.tensor([(v / 255 - m) / s for v, m, s in zip((127, 255, 0), MEAN, STD)]), atol=1e-5)


def test_resize_shorter_side_and_center_crop():
    cols = np.tile((np.arange(300) % 256).astype(np.uint8), (256, 1))  # w=300, h=256: no resize needed
    img = Image.fromarray(np.stack([cols] * 3, -1))
    x = prepare(img, "imagenet")
    assert x.shape == (3, 224, 224) and x.dtype == torch.uint8
    assert int(x[0, 0, 0]) == 38  # left offset round((300 - 224) / 2)
    assert prepare(Image.new("RGB", (300, 400)), "imagenet", train=True).shape == (3, 341, 256)
    assert prepare(Image.new("RGB", (400, 300)), "efficientnet", train=True).shape == (3, 256, 341)


def test_augment_deterministic_and_valid():
    x = torch.arange(3 * 32 * 32, dtype=torch.int32).view(3, 32, 32).to(torch.uint8)
    a = augment(x, "cifar10", torch.Generator().manual_seed(1))
    b = augment(x, "cifar10", torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (3, 32, 32)
    outs = {augment(x, "cifar10", torch.Generator().manual_seed(s)).numpy().tobytes() for s in range(20)}
    assert len(outs) > 5
    padded = torch.nn.functional.pad(x, (4,) * 4)
    windows = [padded[:, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
    assert any(torch.equal(a, w) or torch.equal(a, w.flip(-1)) for w in windows)


def test_train_dataset_seeded(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
    stack = lambda ds: torch.stack([ds[i] for i in range(len(ds))])  # noqa: E731
    a = ImageDataset(tmp_path, "cifar10", train=True, seed=3)
    b = ImageDataset(tmp_path, "cifar10", train=True, seed=3, cache=False)
    e = ImageDataset(tmp_path, "cifar10", train=True, seed=3, cache=True)
    assert torch.equal(stack(a), stack(e))
    c = ImageDataset(tmp_path, "cifar10", train=True, seed=4)
    assert torch.equal(stack(a), stack(b))
    assert not torch.equal(stack(a), stack(c))
    first = stack(a)
    a.set_epoch(1)
    assert not torch.equal(first, stack(a))
    a.set_epoch(0)
    assert torch.equal(first, stack(a))


def test_uncached_zip_matches_cached_and_pickles(tree, tmp_path):
    z = _zip_of(tree, tmp_path / "imgs.zip")
    cached = ImageDataset(z, "imagenet", labels="parent", cache=True)
    lazy = ImageDataset(z, "imagenet", labels="parent", cache=False)
    assert torch.equal(cached[2][0], lazy[2][0])
    clone = pickle.loads(pickle.dumps(lazy))
    assert torch.equal(clone[1][0], lazy[1][0])


def test_normalize_batch_shape():
    assert normalize(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "efficientnet").shape == (2, 3, 4, 4)


def test_split_indices():
    a, b = split_indices(100, [30, 50], seed=0)
    assert len(a) == 30 and len(b) == 50 and not set(a) & set(b)
    assert set(a) | set(b) <= set(range(100))
    assert split_indices(100, [30, 50], seed=0) == [a, b]
    assert split_indices(100, [30, 50], seed=1)[0] != a
    with pytest.raises(ValueError):
        split_indices(10, [6, 5], seed=0)


def test_make_loader_seeded_shuffle():
    ds = torch.utils.data.TensorDataset(torch.arange(20))
    order = lambda: torch.cat([b[0] for b in make_loader(ds, 4, shuffle=True, seed=5)]).tolist()  # noqa: E731
    assert order() == order() and sorted(order()) == list(range(20))
    assert torch.cat([b[0] for b in make_loader(ds, 4)]).tolist() == list(range(20))


def test_make_loader_same_images_on_every_pass():
    """A shuffled loader read twice (two compress calls, or calibration then BN re-estimation) yields
    the same seeded order both times; another seed gives another order."""
    ds = torch.utils.data.TensorDataset(torch.arange(50))
    loader = make_loader(ds, 8, shuffle=True, seed=3)
    first = torch.cat([b[0] for b in loader]).tolist()
    assert torch.cat([b[0] for b in loader]).tolist() == first != list(range(50))
    assert sorted(first) == list(range(50))
    assert torch.cat([b[0] for b in make_loader(ds, 8, shuffle=True, seed=4)]).tolist() != first
