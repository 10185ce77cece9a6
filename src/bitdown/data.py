"""Image datasets from a folder or a ``.zip``: listing, labels, preprocessing presets, seeded augmentation, splits.

No torchvision: decoding and resizing use PIL, everything after that is tensor ops on uint8 images.
Presets (the float output is (C, H, W)):

- ``'cifar10'``: 32x32 (resized bilinear only if the image is another size), RGB/255, ImageNet mean/std.
  Train: 4-pixel zero padding (black pixels, as torchvision's ``RandomCrop(32, padding=4)``),
  random 32x32 crop, random horizontal flip.
- ``'imagenet'``: shorter side resized to 256 (PIL bilinear, long side truncated as torchvision),
  center crop 224, /255, ImageNet mean/std. Train: random 224 crop of the resized image + flip.
- ``'efficientnet'``: as ``'imagenet'`` but normalised by (x - 127) / 128 on 0-255 pixels.

Augmentation is driven by an explicit ``torch.Generator``; :class:`ImageDataset` seeds one per sample
from (seed, epoch, image index), so the stream is reproducible whatever the DataLoader worker count.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
LabelMode = Literal["none", "parent", "wnid"]
_WNID_RE = re.compile(r"^(n\d{8})")
_MAX_LISTED = 5


# ----------------------------------------------------------------------------- listing / reading


def _is_image_name(name: str) -> bool:
    parts = PurePosixPath(name).parts
    if not parts or any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return False
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path} is not a readable folder or zip archive: {e}") from e


def list_images(source: str | Path) -> list[str]:
    """Sorted image names in ``source``: zip member names, or paths relative to the folder (posix form)."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"image source not found: {path}")
    if path.is_dir():
        names = [
            Path(root, f).relative_to(path).as_posix()
            for root, dirs, files in os.walk(path)
            for f in files
        ]
    else:
        with _open_zip(path) as zf:
            names = [i.filename for i in zf.infolist() if not i.is_dir()]
    images = sorted(n for n in names if _is_image_name(n))
    if not images:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {path}")
    return images


class _Reader:
    """Reads raw bytes of named images from a folder or zip; the zip handle is opened lazily per process."""

    def __init__(self, source: str | Path) -> None:
        self.path = Path(source)
        self.is_zip = not self.path.is_dir()
        self._zf: zipfile.ZipFile | None = None

    def read(self, name: str) -> bytes:
        if not self.is_zip:
            return (self.path / name).read_bytes()
        if self._zf is None:
            self._zf = _open_zip(self.path)
        return self._zf.read(name)

    def close(self) -> None:
        if self._zf is not None:
            self._zf.close()
            self._zf = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zf": None}


# ----------------------------------------------------------------------------- labels


@functools.lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k WNIDs in sorted order (class index = position)."""
    text = (Path(__file__).parent / "zoo" / "imagenet_wnids.txt").read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _class_index(classes: Sequence[str]) -> tuple[dict[str, int], dict[str, int]]:
    """(exact name -> index, lower-cased name -> index) for a model's class list."""
    exact = {c: i for i, c in enumerate(classes)}
    if len(exact) != len(classes):
        dup = sorted({c for c in classes if list(classes).count(c) > 1})
        raise ValueError(f"the model's class names are not unique: {dup[:_MAX_LISTED]}")
    folded: dict[str, int] = {}
    for c, i in exact.items():
        folded.setdefault(c.lower(), i)
    return exact, folded


def _unknown_classes(unknown: dict[str, str], classes: Sequence[str], source: str, what: str) -> ValueError:
    """The error for class names (key) the model does not know, each with an example image (value)."""
    names = sorted(unknown)
    shown = ", ".join(f"{n!r} (e.g. {unknown[n]!r})" for n in names[:_MAX_LISTED])
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    known = ", ".join(list(classes)[:10]) + (", ..." if len(classes) > 10 else "")
    verb = "are not classes" if len(names) > 1 else "is not a class"
    return ValueError(f"{what}{'s' if len(names) > 1 else ''} {shown}{more} in {source} {verb} of the model "
                      f"({len(classes)} classes: {known})")


def _wnid_of(name: str) -> str | None:
    """The WNID an image name carries: the file name's leading nXXXXXXXX, else its folder's name."""
    path = PurePosixPath(name)
    m = _WNID_RE.match(path.name)
    if m is None:
        m = _WNID_RE.fullmatch(path.parent.name)
    return None if m is None else m.group(1)


def _labels_for(names: list[str], mode: str, source: str, classes: Sequence[str] | None = None,
                ) -> tuple[list[str], list[int] | None]:
    """Return (classes, label per name) for a label mode over the full listing of ``source``.

    ``classes``: the model's class names in output order (label = position). With them, 'parent'
    maps each image's folder name to its class (exact name, else case-insensitive), and 'wnid' each
    image's WNID (leading the file name, else the folder name); a name the model does not know is a
    ValueError naming it. Without them, 'parent' numbers the sorted folder names and 'wnid' uses the
    1,000 ImageNet-1k WNIDs in sorted order."""
    if mode == "none":
        return [], None
    if mode not in ("parent", "wnid"):
        raise ValueError(f"unknown labels mode {mode!r}; use 'none', 'parent' or 'wnid'")
    if mode == "parent":
        keys = [PurePosixPath(n).parent.name for n in names]
        orphans = [n for n, k in zip(names, keys) if not k]
        if orphans:
            raise ValueError(f"labels='parent' but {orphans[0]!r} in {source} is not inside a class folder")
        if classes is None:
            classes = sorted(set(keys))
    else:
        keys = [_wnid_of(n) for n in names]
        missing = [n for n, k in zip(names, keys) if k is None]
        if missing:
            raise ValueError(f"{missing[0]!r} in {source} does not start with a known ImageNet-1k WNID "
                             f"(nor is it in a folder named by one)")
        if classes is None:
            classes = imagenet_wnids()
            known = set(classes)
            unknown = {k: n for n, k in zip(names, keys) if k not in known}
            if unknown:
                first = sorted(unknown)[0]
                raise ValueError(f"{unknown[first]!r} in {source} does not start with a known ImageNet-1k WNID")
    classes = list(classes)
    exact, folded = _class_index(classes)
    labels, unknown = [], {}
    for n, k in zip(names, keys):
        i = exact.get(k)
        if i is None:
            i = folded.get(k.lower())
        if i is None:
            unknown.setdefault(k, n)
            continue
        labels.append(i)
    if unknown:
        raise _unknown_classes(unknown, classes, source, "folder" if mode == "parent" else "WNID")
    return classes, labels


# ----------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preset:
    """A preprocessing recipe. ``resize``: shorter side (None: fixed ``crop``x``crop`` input)."""

    name: str
    crop: int
    resize: int | None
    train_pad: int
    mean: tuple[float, float, float]  # on the 0-255 scale
    std: tuple[float, float, float]  # on the 0-255 scale


_IMNET_MEAN = tuple(255 * m for m in (0.485, 0.456, 0.406))
_IMNET_STD = tuple(255 * s for s in (0.229, 0.224, 0.225))
PRESETS: dict[str, Preset] = {
    "cifar10": Preset("cifar10", 32, None, 4, _IMNET_MEAN, _IMNET_STD),
    "imagenet": Preset("imagenet", 224, 256, 0, _IMNET_MEAN, _IMNET_STD),
    "efficientnet": Preset("efficientnet", 224, 256, 0, (127.0,) * 3, (128.0,) * 3),
}


def get_preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}") from None


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to a fully loaded RGB PIL image."""
    img = Image.open(io.BytesIO(data))
    return img.convert("RGB")


def prepare(img: Image.Image, preset: str | Preset, train: bool = False) -> Tensor:
    """Deterministic, cacheable stage: resize (and center-crop when not training) to a uint8 (3, H, W) tensor."""
    p = get_preset(preset)
    w, h = img.size
    if p.resize is None:
        if (w, h) != (p.crop, p.crop):
            img = img.resize((p.crop, p.crop), Image.BILINEAR)
    else:
        short, long = (w, h) if w <= h else (h, w)
        if short != p.resize:
            new_long = int(p.resize * long / short)
            img = img.resize((p.resize, new_long) if w <= h else (new_long, p.resize), Image.BILINEAR)
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
    if p.resize is not None and not train:
        x = center_crop(x, p.crop)
    return x.contiguous()


def center_crop(x: Tensor, size: int) -> Tensor:
    """Center ``size``x``size`` crop of a (C, H, W) tensor (offsets rounded as torchvision)."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"image {h}x{w} is smaller than the {size}x{size} crop")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def augment(x: Tensor, preset: str | Preset, generator: torch.Generator) -> Tensor:
    """Train augmentation on a prepared uint8 (3, H, W) image: [zero pad], random crop, random horizontal flip."""
    p = get_preset(preset)
    if p.train_pad:
        x = torch.nn.functional.pad(x, (p.train_pad,) * 4)
    h, w = x.shape[-2:]
    if h < p.crop or w < p.crop:
        raise ValueError(f"image {h}x{w} is smaller than the {p.crop}x{p.crop} crop")
    top = int(torch.randint(0, h - p.crop + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - p.crop + 1, (1,), generator=generator))
    x = x[..., top : top + p.crop, left : left + p.crop]
    if bool(torch.rand((), generator=generator) < 0.5):
        x = x.flip(-1)
    return x


def normalize(x: Tensor, preset: str | Preset) -> Tensor:
    """uint8 (..., 3, H, W) -> normalised float32."""
    p = get_preset(preset)
    mean = torch.tensor(p.mean).view(3, 1, 1)
    std = torch.tensor(p.std).view(3, 1, 1)
    return (x.float() - mean) / std


def preprocess(
    img: Image.Image, preset: str | Preset, train: bool = False, generator: torch.Generator | None = None
) -> Tensor:
    """Full pipeline for one PIL image: prepare, [augment], normalize -> float (3, H, W)."""
    x = prepare(img.convert("RGB"), preset, train)
    if train:
        x = augment(x, preset, generator if generator is not None else torch.Generator().manual_seed(0))
    return normalize(x, preset)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator seeded from (seed, epoch, index), independent of worker layout."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


# ----------------------------------------------------------------------------- dataset


_UNREADABLE = (OSError, ValueError, SyntaxError, zipfile.BadZipFile, Image.DecompressionBombError)


class ImageDataset(Dataset):
    """Images of a folder or zip with a preprocessing preset; decoded once into uint8 tensors when ``cache``.

    Items are the float (C, H, W) tensor when ``labels='none'``, else ``(tensor, label)``. ``indices``
    selects positions in :func:`list_images` order (classes are always derived from the whole source,
    so subsets share class indices). Unreadable images are skipped and counted (``n_skipped``) when
    caching; with ``cache=False`` an unreadable image raises on access. With ``train=True`` the
    augmentation of image ``i`` at epoch ``e`` is seeded by (seed, e, i); call :meth:`set_epoch`.
    ``classes``: the model's class names in output order; labels are then positions in it (folder
    names / WNIDs mapped to them, an unknown one is a ValueError naming it) instead of the sorted
    folder names, so a folder holding only some of the classes is labelled right.
    """

    def __init__(
        self,
        source: str | Path,
        preset: str,
        labels: LabelMode = "none",
        indices: Sequence[int] | None = None,
        train: bool = False,
        seed: int = 0,
        cache: bool = True,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.source = str(source)
        self.preset = get_preset(preset)
        self.train, self.seed, self.epoch = train, seed, 0
        all_names = list_images(source)
        self.classes, all_labels = _labels_for(all_names, labels, self.source, classes)
        if indices is None:
            idx = list(range(len(all_names)))
        else:
            idx = [int(i) for i in indices]
            bad = [i for i in idx if not 0 <= i < len(all_names)]
            if bad:
                raise IndexError(f"indices {bad[:_MAX_LISTED]} out of range for {len(all_names)} images in {source}")
        self._reader = _Reader(source)
        self._images: Tensor | list[Tensor] | None = None
        self.n_skipped = 0
        if cache:
            idx = self._decode_all(all_names, idx)
        self._index = idx
        self.names = [all_names[i] for i in idx]
        self.labels = None if all_labels is None else torch.tensor([all_labels[i] for i in idx], dtype=torch.long)

    def _decode_all(self, all_names: list[str], idx: list[int]) -> list[int]:
        kept, images, failed = [], [], []
        for i in tqdm(idx, desc=f"decode {Path(self.source).name}", unit="img", disable=None, leave=False):
            try:
                images.append(prepare(decode_image(self._reader.read(all_names[i])), self.preset, self.train))
                kept.append(i)
            except _UNREADABLE:
                failed.append(all_names[i])
        self._reader.close()
        self.n_skipped = len(failed)
        if failed:
            log.warning("skipped %d unreadable images in %s (first: %s)", len(failed), self.source, failed[:_MAX_LISTED])
        if not images:
            raise ValueError(f"none of the {len(idx)} images in {self.source} could be read")
        same = all(t.shape == images[0].shape for t in images)
        self._images = torch.stack(images) if same else images
        return kept

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (train mode)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> Tensor | tuple[Tensor, int]:
        if self._images is not None:
            x = self._images[i]
        else:
            x = prepare(decode_image(self._reader.read(self.names[i])), self.preset, self.train)
        if self.train:
            x = augment(x, self.preset, sample_generator(self.seed, self.epoch, self._index[i]))
        x = normalize(x, self.preset)
        return x if self.labels is None else (x, int(self.labels[i]))


def split_indices(n: int, sizes: Sequence[int], seed: int) -> list[list[int]]:
    """Cut a seeded random permutation of ``range(n)`` into disjoint pieces of the given sizes."""
    if any(s < 0 for s in sizes) or sum(sizes) > n:
        raise ValueError(f"split sizes {list(sizes)} (sum {sum(sizes)}) do not fit in {n} items")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    out, start = [], 0
    for s in sizes:
        out.append(perm[start : start + s])
        start += s
    return out


class SeededPermutation(torch.utils.data.Sampler):
    """The same seeded permutation of range(n) on every iteration, so a shuffled calibration loader
    yields the same images however often it is read (torch's shuffle draws a new one each time)."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed = n, seed

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).tolist())

    def __len__(self) -> int:
        return self.n


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False) -> DataLoader:
    """Single-process DataLoader. shuffle: one permutation seeded with ``seed``, the same on every
    pass (a rerun, a second `compress` on the same loader, or a resumed run read the same images)."""
    sampler = SeededPermutation(len(dataset), seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=0, drop_last=drop_last)
