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

Reading is lazy by default: listing a source keeps only the image names (a zip's central directory is
parsed into names and a few integer arrays, not one ``ZipInfo`` per member), and an image is decoded on
first access, its prepared uint8 tensor kept up to ``cache_bytes`` (see :class:`ImageDataset`).
"""

from __future__ import annotations

import array
import functools
import io
import itertools
import logging
import os
import re
import struct
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
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


def _parts(name: str) -> list[str]:
    """The components of a posix path as PurePosixPath sees them (no empty or '.' parts), fast."""
    return [p for p in name.split("/") if p and p != "."]


def _is_image_name(name: str) -> bool:
    parts = _parts(name)
    if not parts or any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return False
    last = parts[-1]
    dot = last.rfind(".")
    return 0 < dot < len(last) - 1 and last[dot:].lower() in IMAGE_EXTENSIONS


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path} is not a readable folder or zip archive: {e}") from e


class _Source:
    """The sorted image names of a folder or zip and a way to read entry ``k``'s bytes.

    Memory: the names (Python strings) and, for a zip, six integer arrays (30 bytes an entry); no
    ``ZipInfo`` objects. The file is opened on the first read in each process and read with pread, so
    threads and forked workers share no file position. :meth:`subset` keeps only some entries."""

    def __init__(self, path: Path, names: list[str], table: dict[str, np.ndarray] | None) -> None:
        self.path, self.names, self.table = path, names, table
        self.is_zip = table is not None
        self._fd: int | None = None
        self._pid = -1
        self._lock = threading.Lock()
        self._zf: zipfile.ZipFile | None = None      # only for members compressed other than stored / deflate

    @classmethod
    def open(cls, source: str | Path) -> "_Source":
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"image source not found: {path}")
        if path.is_dir():
            names = sorted(n for n in _walk(path) if _is_image_name(n))
            table = None
        else:
            names, table = _zip_listing(path)
        if not names:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {path}")
        return cls(path, names, table)

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, positions: Sequence[int] | np.ndarray) -> "_Source":
        pos = np.asarray(positions, dtype=np.int64)
        names = [self.names[int(k)] for k in pos]
        table = None if self.table is None else {k: v[pos] for k, v in self.table.items()}
        return _Source(self.path, names, table)

    # -- reading

    def read(self, k: int) -> bytes:
        """The bytes of entry ``k`` (OSError / zipfile.BadZipFile / ValueError when unreadable)."""
        if not self.is_zip:
            return (self.path / self.names[k]).read_bytes()
        t = self.table
        offset, size, usize = int(t["offset"][k]), int(t["csize"][k]), int(t["usize"][k])
        method, flags, crc = int(t["method"][k]), int(t["flags"][k]), int(t["crc"][k])
        if flags & 0x1:
            raise ValueError(f"{self.names[k]!r} is encrypted")
        if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            return self._zipfile().read(self.names[k])
        header = self._pread(offset, 30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"bad local file header for {self.names[k]!r}")
        name_len, extra_len = struct.unpack_from("<2H", header, 26)
        data = self._pread(offset + 30 + name_len + extra_len, size)
        if len(data) != size:
            raise zipfile.BadZipFile(f"{self.names[k]!r} is truncated")
        if method == zipfile.ZIP_DEFLATED:
            try:
                data = zlib.decompress(data, -15)
            except zlib.error as e:
                raise zipfile.BadZipFile(f"{self.names[k]!r}: {e}") from None
        if len(data) != usize or zlib.crc32(data) != crc:
            raise zipfile.BadZipFile(f"bad CRC-32 or size for {self.names[k]!r}")
        return data

    def _pread(self, offset: int, n: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():
            with self._lock:
                if self._fd is None or self._pid != os.getpid():
                    self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                    self._pid = os.getpid()
        if hasattr(os, "pread"):
            chunks = []
            while n > 0:
                b = os.pread(self._fd, n, offset)
                if not b:
                    break
                chunks.append(b)
                n -= len(b)
                offset += len(b)
            return b"".join(chunks)
        with self._lock:                                 # pragma: no cover - no pread (Windows)
            os.lseek(self._fd, offset, os.SEEK_SET)
            return os.read(self._fd, n)

    def _zipfile(self) -> zipfile.ZipFile:
        with self._lock:
            if self._zf is None:
                self._zf = _open_zip(self.path)
            return self._zf

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None
        if self._zf is not None:
            self._zf.close()
            self._zf = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __getstate__(self) -> dict:
        return {"path": self.path, "names": self.names, "table": self.table}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["names"], state["table"])


def _walk(path: Path):
    """Posix paths, relative to ``path``, of every file below it (names only)."""
    for root, dirs, files in os.walk(path):
        rel = os.path.relpath(root, path)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        for f in files:
            yield prefix + f


_EOCD = struct.Struct("<4s4H2LH")          # end of central directory record
_EOCD64_LOC = struct.Struct("<4sLQL")      # zip64 end of central directory locator
_EOCD64 = struct.Struct("<4sQ2H2L4Q")      # zip64 end of central directory record
_CENTRAL = struct.Struct("<4s6H3L5H2L")    # central directory file header
_CHUNK = 1 << 22


def _zip_listing(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Sorted image names of a zip and their (offset, csize, usize, method, flags, crc) arrays.

    The central directory is parsed here, in 4 MiB pieces; an archive it does not understand (multi-disk,
    say) is read with zipfile instead (one ZipInfo per member for the time of the listing)."""
    try:
        with open(path, "rb") as f:
            return _parse_central_directory(f)
    except OSError as e:
        raise ValueError(f"{path} is not a readable folder or zip archive: {e}") from e
    except (_Unsupported, struct.error, zipfile.BadZipFile, UnicodeDecodeError):
        pass                                   # zipfile reads it, or says why it cannot
    with _open_zip(path) as zf:
        infos = [i for i in zf.infolist() if not i.is_dir() and _is_image_name(i.filename)]
    return _sorted_listing([i.filename for i in infos], {
        "offset": np.array([i.header_offset for i in infos], dtype=np.int64),
        "csize": np.array([i.compress_size for i in infos], dtype=np.int64),
        "usize": np.array([i.file_size for i in infos], dtype=np.int64),
        "method": np.array([i.compress_type for i in infos], dtype=np.uint16),
        "flags": np.array([i.flag_bits for i in infos], dtype=np.uint16),
        "crc": np.array([i.CRC for i in infos], dtype=np.uint32)})


class _Unsupported(Exception):
    """A zip layout the compact parser leaves to zipfile."""


def _parse_central_directory(f) -> tuple[list[str], dict[str, np.ndarray]]:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    tail_len = min(size, _EOCD.size + 0xFFFF + _EOCD64_LOC.size)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _EOCD.size > len(tail):
        raise zipfile.BadZipFile("File is not a zip file")  # zipfile's words; the caller names the path
    _, disk, cd_disk, _, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    eocd_pos = size - tail_len + at
    concat = eocd_pos - cd_size - cd_offset
    if count == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:
        loc = at - _EOCD64_LOC.size
        if loc < 0 or tail[loc:loc + 4] != b"PK\x06\x07":
            raise _Unsupported("zip64 locator not found")
        _, _, rec_offset, _ = _EOCD64_LOC.unpack_from(tail, loc)
        f.seek(rec_offset)
        rec = f.read(_EOCD64.size)
        if len(rec) != _EOCD64.size or rec[:4] != b"PK\x06\x06":
            raise _Unsupported("zip64 end record not found")
        _, _, _, _, disk, cd_disk, _, count, cd_size, cd_offset = _EOCD64.unpack(rec)
        concat = eocd_pos - _EOCD64.size - _EOCD64_LOC.size - cd_size - cd_offset
    if disk or cd_disk:
        raise _Unsupported("multi-disk archive")
    f.seek(cd_offset + concat)
    names: list[str] = []
    offsets, csizes, usizes = array.array("q"), array.array("q"), array.array("q")   # C integers, not
    methods, flag_bits, crcs = array.array("H"), array.array("H"), array.array("q")  # Python int objects
    buf, pos, left = b"", 0, cd_size
    for _ in range(count):
        if len(buf) - pos < _CENTRAL.size + 3 * 0xFFFF:          # room for a whole header
            more = f.read(min(left, _CHUNK))
            left -= len(more)
            buf, pos = buf[pos:] + more, 0
        (sig, _, _, flags, method, _, _, crc, csize, usize, n_len, e_len, c_len, _, _, _,
         offset) = _CENTRAL.unpack_from(buf, pos)
        if sig != b"PK\x01\x02":
            raise zipfile.BadZipFile("bad central directory entry")
        start = pos + _CENTRAL.size
        raw = buf[start:start + n_len]
        pos = start + n_len + e_len + c_len
        if len(raw) != n_len or pos > len(buf):
            raise zipfile.BadZipFile("truncated central directory")
        name = raw.decode("utf-8" if flags & 0x800 else "cp437").split("\x00", 1)[0]   # as zipfile
        if name.endswith("/") or not _is_image_name(name):
            continue
        if 0xFFFFFFFF in (csize, usize, offset):
            usize, csize, offset = _zip64_extra(buf[start + n_len:start + n_len + e_len], usize, csize, offset)
        names.append(name)
        offsets.append(offset + concat)
        csizes.append(csize)
        usizes.append(usize)
        methods.append(method)
        flag_bits.append(flags)
        crcs.append(crc)
    table = {"offset": np.frombuffer(offsets, np.int64), "csize": np.frombuffer(csizes, np.int64),
             "usize": np.frombuffer(usizes, np.int64), "method": np.frombuffer(methods, np.uint16),
             "flags": np.frombuffer(flag_bits, np.uint16), "crc": np.frombuffer(crcs, np.int64).astype(np.uint32)}
    return _sorted_listing(names, table)


def _zip64_extra(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    """The 64-bit sizes / offset a zip64 extra field holds for the fields set to 0xFFFFFFFF."""
    i = 0
    while i + 4 <= len(extra):
        tag, ln = struct.unpack_from("<2H", extra, i)
        if tag == 1:
            vals = list(struct.unpack_from(f"<{ln // 8}Q", extra, i + 4))
            if usize == 0xFFFFFFFF:
                usize = vals.pop(0)
            if csize == 0xFFFFFFFF:
                csize = vals.pop(0)
            if offset == 0xFFFFFFFF:
                offset = vals.pop(0)
            return usize, csize, offset
        i += 4 + ln
    raise zipfile.BadZipFile("zip64 sizes missing")


def _sorted_listing(names: list[str], table: dict[str, np.ndarray]) -> tuple[list[str], dict[str, np.ndarray]]:
    if all(a < b for a, b in zip(names, itertools.islice(names, 1, None))):   # zips are usually in order
        return names, table
    order = np.argsort(np.array(names, dtype=object), kind="stable")
    return [names[i] for i in order], {k: v[order] for k, v in table.items()}


def list_images(source: str | Path) -> list[str]:
    """Sorted image names in ``source``: zip member names, or paths relative to the folder (posix form)."""
    return _Source.open(source).names


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


def _parent_name(name: str) -> str:
    parts = _parts(name)
    return parts[-2] if len(parts) > 1 else ""


def _wnid_of(name: str) -> str | None:
    """The WNID an image name carries: the file name's leading nXXXXXXXX, else its folder's name."""
    parts = _parts(name)
    m = _WNID_RE.match(parts[-1]) if parts else None
    if m is None:
        m = _WNID_RE.fullmatch(parts[-2] if len(parts) > 1 else "")
    return None if m is None else m.group(1)


def _keys(names: list[str], key) -> list:
    """key(name) per name, each distinct key one shared string (a 1.28M-name listing holds 1,000)."""
    shared: dict = {}
    return [shared.setdefault(k, k) for k in map(key, names)]


def _labels_for(names: list[str], mode: str, source: str, classes: Sequence[str] | None = None,
                ) -> tuple[list[str], np.ndarray | None]:
    """Return (classes, label per name as an int64 array) for a label mode over the full listing of ``source``.

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
        keys = _keys(names, _parent_name)
        orphans = [n for n, k in zip(names, keys) if not k]
        if orphans:
            raise ValueError(f"labels='parent' but {orphans[0]!r} in {source} is not inside a class folder")
        if classes is None:
            classes = sorted(set(keys))
    else:
        keys = _keys(names, _wnid_of)
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
    index, unknown = {}, {}
    for n, k in zip(names, keys):
        if k in index or k in unknown:
            continue
        i = exact.get(k)
        if i is None:
            i = folded.get(k.lower())
        if i is None:
            unknown[k] = n
        else:
            index[k] = i
    if unknown:
        raise _unknown_classes(unknown, classes, source, "folder" if mode == "parent" else "WNID")
    return classes, np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys))


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
CACHE_BYTES = 1 << 30          # default memory cap of a lazy dataset's decoded images
_ITEM_OVERHEAD = 400           # bytes a memoised tensor costs beyond its pixels (object, storage, dict slot)
CacheMode = Literal["lazy", "eager", "none"]


def _cache_mode(cache: bool | str) -> str:
    if cache is True or cache == "eager":
        return "eager"
    if cache is False or cache == "none":
        return "none"
    if cache == "lazy":
        return "lazy"
    raise ValueError(f"cache must be 'lazy', 'eager', 'none' (or True = 'eager', False = 'none'), got {cache!r}")


class ImageDataset(Dataset):
    """Images of a folder or zip with a preprocessing preset.

    Items are the float (C, H, W) tensor when ``labels='none'``, else ``(tensor, label)``. ``indices``
    selects positions in :func:`list_images` order (classes are always derived from the whole source,
    so subsets share class indices). With ``train=True`` the augmentation of image ``i`` at epoch ``e``
    is seeded by (seed, e, i); call :meth:`set_epoch`. ``classes``: the model's class names in output
    order; labels are then positions in it (folder names / WNIDs mapped to them, an unknown one is a
    ValueError naming it) instead of the sorted folder names, so a folder holding only some of the
    classes is labelled right.

    ``cache`` (when images are decoded; the listing itself holds only names, whatever the mode):

    - ``'lazy'`` (default): an image is decoded on first access and its prepared uint8 tensor kept
      while the kept tensors total at most ``cache_bytes`` (1 GiB by default; beyond it, images are
      decoded on every access). Calibration decodes only the images it takes; fine-tuning's epochs
      over a small set decode each image once.
    - ``'eager'`` (or ``True``): every image is decoded in the constructor (no cap): unreadable ones
      are dropped from the dataset then (``names``, ``labels`` and ``len`` exclude them), counted in
      ``n_skipped`` with a warning; none readable is a ValueError.
    - ``'none'`` (or ``False``): decoded on every access, nothing kept.

    ``unreadable`` (lazy and none modes, where an image is first read mid-run): ``'skip'`` (default)
    serves image ``i``'s place with the next readable image (``i+1``, ``i+2``, ... wrapping round:
    deterministic, its own label and augmentation seed), logs a warning naming the file and counts it
    in ``n_skipped`` (distinct unreadable images met so far), so a long run neither crashes late nor
    skips silently; ``'raise'``: a ValueError naming the file. With no readable image at all, access
    is a ValueError. An evaluation over a set holding unreadable images counts the replacements
    twice; read ``n_skipped`` after it (or use ``unreadable='raise'``).
    """

    def __init__(
        self,
        source: str | Path,
        preset: str,
        labels: LabelMode = "none",
        indices: Sequence[int] | None = None,
        train: bool = False,
        seed: int = 0,
        cache: bool | CacheMode = "lazy",
        classes: Sequence[str] | None = None,
        cache_bytes: int = CACHE_BYTES,
        unreadable: Literal["skip", "raise"] = "skip",
    ) -> None:
        self.cache = _cache_mode(cache)
        if unreadable not in ("skip", "raise"):
            raise ValueError(f"unreadable must be 'skip' or 'raise', got {unreadable!r}")
        self.source = str(source)
        self.preset = get_preset(preset)
        self.train, self.seed, self.epoch = train, seed, 0
        self.cache_bytes, self.unreadable = int(cache_bytes), unreadable
        listing = _Source.open(source)
        n_all = len(listing)
        self.classes, all_labels = _labels_for(listing.names, labels, self.source, classes)
        if indices is None:
            idx = np.arange(n_all, dtype=np.int64)
            src = listing
        else:
            idx = np.asarray([int(i) for i in indices], dtype=np.int64)
            bad = [int(i) for i in idx if not 0 <= i < n_all]
            if bad:
                raise IndexError(f"indices {bad[:_MAX_LISTED]} out of range for {n_all} images in {source}")
            src = listing.subset(idx)
        self._src = src
        self._images: Tensor | list[Tensor] | None = None
        self._index = idx                                 # positions in the whole listing (augmentation seeds)
        self.labels = None if all_labels is None else torch.from_numpy(np.ascontiguousarray(all_labels[idx]))
        self.n_skipped = 0
        self._init_lazy_state()
        if self.cache == "eager":
            self._decode_all()

    @property
    def names(self) -> list[str]:
        return self._src.names

    def _init_lazy_state(self) -> None:
        self._memo: dict[int, Tensor] = {}
        self._memo_bytes = 0
        self._bad: dict[int, str] = {}                   # position -> why it is unreadable
        self._lock = threading.Lock()

    def _prepared(self, i: int) -> Tensor:
        """Decode and prepare item ``i`` (raises one of _UNREADABLE)."""
        return prepare(decode_image(self._src.read(i)), self.preset, self.train)

    def _decode_all(self) -> None:
        kept, images, failed = [], [], []
        for i in tqdm(range(len(self._src)), desc=f"decode {Path(self.source).name}", unit="img", disable=None,
                      leave=False):
            try:
                images.append(self._prepared(i))
                kept.append(i)
            except _UNREADABLE:
                failed.append(self._src.names[i])
        self._src.close()
        self.n_skipped = len(failed)
        if failed:
            log.warning("skipped %d unreadable images in %s (first: %s)", len(failed), self.source, failed[:_MAX_LISTED])
        if not images:
            raise ValueError(f"none of the {len(self._src)} images in {self.source} could be read")
        if failed:
            self._src = self._src.subset(kept)
            self._index = self._index[kept]
            if self.labels is not None:
                self.labels = self.labels[torch.as_tensor(kept, dtype=torch.long)]
        same = all(t.shape == images[0].shape for t in images)
        self._images = torch.stack(images) if same else images

    def _lazy(self, i: int) -> tuple[int, Tensor]:
        """(position actually served, its prepared image) for item ``i`` in lazy / none mode."""
        n = len(self._src)
        for step in range(n):
            j = i + step if i + step < n else i + step - n
            x = self._memo.get(j)
            if x is not None:
                return j, x
            if j in self._bad:
                continue
            try:
                x = self._prepared(j)
            except _UNREADABLE as e:
                self._unreadable(j, e)
                continue
            if self.cache == "lazy":
                cost = x.untyped_storage().nbytes() + _ITEM_OVERHEAD
                with self._lock:
                    if j not in self._memo and self._memo_bytes + cost <= self.cache_bytes:
                        self._memo[j] = x
                        self._memo_bytes += cost
            return j, x
        raise ValueError(f"none of the {n} images in {self.source} could be read "
                         f"(first: {next(iter(self._bad.values()), '?')})")

    def _unreadable(self, j: int, e: Exception) -> None:
        name = self._src.names[j]
        if self.unreadable == "raise":
            raise ValueError(f"unreadable image {name!r} in {self.source}: {e}") from e
        with self._lock:
            if j in self._bad:
                return
            self._bad[j] = f"{name}: {e}"
            self.n_skipped = len(self._bad)
            count = self.n_skipped
        if count <= _MAX_LISTED or count & (count - 1) == 0:       # the first few, then at powers of two
            log.warning("unreadable image %r in %s (%s): served by the next readable one; %d unreadable so far "
                        "(ImageDataset.n_skipped)", name, self.source, e, count)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (train mode)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, i: int) -> Tensor | tuple[Tensor, int]:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        if self._images is not None:
            j, x = i, self._images[i]
        else:
            j, x = self._lazy(i)
        if self.train:
            x = augment(x, self.preset, sample_generator(self.seed, self.epoch, int(self._index[j])))
        x = normalize(x, self.preset)
        return x if self.labels is None else (x, int(self.labels[j]))

    @property
    def cached_bytes(self) -> int:
        """Bytes held by the lazily decoded images (an estimate: pixels plus a per-tensor overhead)."""
        return self._memo_bytes

    def __getstate__(self) -> dict:
        """Pickled (DataLoader workers, spawn) without the lazily decoded images nor the lock."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("_memo", "_memo_bytes", "_lock", "_bad")}
        state["_bad_items"] = dict(self._bad)
        return state

    def __setstate__(self, state: dict) -> None:
        bad = state.pop("_bad_items", {})
        self.__dict__.update(state)
        self._init_lazy_state()
        self._bad.update(bad)


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
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed))
        for start in range(0, self.n, 1 << 16):          # not one list of n Python ints (46 MB for 1.28M)
            yield from perm[start:start + (1 << 16)].tolist()

    def __len__(self) -> int:
        return self.n


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False) -> DataLoader:
    """Single-process DataLoader. shuffle: one permutation seeded with ``seed``, the same on every
    pass (a rerun, a second `compress` on the same loader, or a resumed run read the same images)."""
    sampler = SeededPermutation(len(dataset), seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=0, drop_last=drop_last)


class PixelDataset(Dataset):
    """Images held in memory as uint8 (N, 3, H, W) pixels (e.g. synthesised ones, :mod:`bitdown.synthesize`),
    served exactly as :class:`ImageDataset` serves the same pixels read from PNG files with ``preset``:
    centre crop for a resize preset (eval), seeded augmentation by (seed, epoch, index) with ``train``, then
    normalisation. Items are float (C, H, W) tensors (no labels)."""

    def __init__(self, pixels: Tensor, preset: str | Preset, train: bool = False, seed: int = 0,
                 source: str = "pixels") -> None:
        if not isinstance(pixels, Tensor) or pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be a uint8 (N, 3, H, W) tensor, got "
                             f"{getattr(pixels, 'dtype', type(pixels).__name__)} {tuple(getattr(pixels, 'shape', ()))}")
        if len(pixels) == 0:
            raise ValueError("no images: pixels is empty")
        self.pixels, self.preset = pixels, get_preset(preset)
        self.train, self.seed, self.epoch, self.source = train, seed, 0, source
        self.names = None
        self.n_skipped = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> Tensor:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        x = self.pixels[i]
        if self.train:
            x = augment(x, self.preset, sample_generator(self.seed, self.epoch, i))
        elif self.preset.resize is not None:
            x = center_crop(x, self.preset.crop)
        return normalize(x, self.preset)


class ConcatImages(torch.utils.data.ConcatDataset):
    """Several image datasets as one (e.g. real and synthetic images); ``set_epoch`` reaches each part."""

    def __init__(self, parts: Sequence[Dataset]) -> None:
        super().__init__(parts)
        self.source = " + ".join(str(getattr(p, "source", type(p).__name__)) for p in parts)
        self.train = getattr(parts[0], "train", None)
        self.seed = getattr(parts[0], "seed", None)

    @property
    def names(self) -> list | None:
        return [getattr(p, "names", None) for p in self.datasets]

    def set_epoch(self, epoch: int) -> None:
        for p in self.datasets:
            if hasattr(p, "set_epoch"):
                p.set_epoch(epoch)
