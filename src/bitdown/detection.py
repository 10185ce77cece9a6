"""Object detection support: letterbox inputs, YOLO labels, NMS, COCO mAP (for the YOLOv5 zoo model).

- :func:`letterbox` resizes an image so that its long side is ``size`` (PIL box filter when shrinking,
  bilinear when enlarging: YOLOv5's INTER_AREA / INTER_LINEAR), pads it to ``size x size`` with grey
  ``color`` and returns RGB / 255 plus the ``scale`` and ``(left, top)`` padding needed to map boxes back
  (:func:`boxes_to_original`).
- :class:`LetterboxDataset` reads images lazily from a folder or zip (any photos: calibration data) and,
  with ``labels=True``, YOLO label files (``class cx cy w h`` normalised, one object per line) matched to
  the images by file stem, e.g. the COCO128 layout ``images/val2017/X.jpg`` and
  ``object_detection/labels/val2017/X.txt``. A missing or empty label file means an image without objects;
  a malformed line or a class id outside ``0..nc-1`` is skipped, counted (``n_bad_labels``) and logged.
- :func:`non_max_suppression` is YOLOv5's (objectness x class confidence threshold, class-aware through
  per-class coordinate offsets, top ``max_nms`` candidates, ``max_det`` kept), with an exact greedy NMS
  in vectorised torch (:func:`nms`, no torchvision).
- :func:`evaluate_detection` runs a model over a labelled :class:`LetterboxDataset` in batches and scores
  the detections with pycocotools' COCOeval (mAP@0.5:0.95 and mAP@0.5, 101-point interpolation) against
  the YOLO labels converted in memory to a COCO ground truth (boxes in original-image pixels, areas from
  the boxes, iscrowd 0). ``yolo_ap=True`` also reports YOLOv5's own ``ap_per_class`` figures
  (:func:`yolo_map`) on the same detections.

Models: anything whose ``predict(x)`` gives decoded boxes ``(N, boxes, 5 + nc)`` (the zoo ``YOLOv5``), or
whose ``forward`` gives the raw head maps and that holds a ``Detect``-like submodule with ``decode``
(e.g. a compressed copy of a zoo detector), or whose forward already gives ``(N, boxes, 5 + nc)``.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
_MAX_LISTED = 5


# ----------------------------------------------------------------------------- letterbox

@dataclass(frozen=True)
class Letterboxed:
    """One letterboxed image: ``image`` float (3, S, S) RGB / 255; ``scale`` (original -> letterbox),
    ``pad`` = (left, top) in letterbox pixels, ``orig_size`` = (height, width) of the original image."""

    image: Tensor
    scale: float
    pad: tuple[int, int]
    orig_size: tuple[int, int]


def _letterbox_uint8(img: Image.Image, size: int, color: int) -> tuple[Tensor, float, tuple[int, int]]:
    img = img.convert("RGB")
    w0, h0 = img.size
    r = size / max(w0, h0)
    nw, nh = min(size, max(1, round(w0 * r))), min(size, max(1, round(h0 * r)))
    if (nw, nh) != (w0, h0):
        img = img.resize((nw, nh), Image.BOX if r < 1 else Image.BILINEAR)
    left, top = round((size - nw) / 2 - 0.1), round((size - nh) / 2 - 0.1)
    canvas = torch.full((3, size, size), int(color), dtype=torch.uint8)
    canvas[:, top:top + nh, left:left + nw] = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return canvas, r, (left, top)


def letterbox(img: Image.Image, size: int = 640, color: int = 114) -> tuple[Tensor, float, tuple[int, int]]:
    """(float (3, size, size) RGB / 255, scale, (left, top) padding) of a PIL image, YOLOv5-style."""
    x, scale, pad = _letterbox_uint8(img, size, color)
    return x.float().div_(255.0), scale, pad


def boxes_to_letterbox(boxes: Tensor, scale: float, pad: tuple[int, int]) -> Tensor:
    """xyxy boxes in original-image pixels -> letterbox pixels."""
    off = boxes.new_tensor([pad[0], pad[1], pad[0], pad[1]])
    return boxes * scale + off


def boxes_to_original(boxes: Tensor, scale: float, pad: tuple[int, int], orig_size: tuple[int, int] | None = None) -> Tensor:
    """xyxy boxes in letterbox pixels -> original-image pixels, clipped to the image when ``orig_size`` (h, w)."""
    off = boxes.new_tensor([pad[0], pad[1], pad[0], pad[1]])
    out = (boxes - off) / scale
    if orig_size is not None:
        h, w = orig_size
        out[:, 0::2] = out[:, 0::2].clamp(0, w)
        out[:, 1::2] = out[:, 1::2].clamp(0, h)
    return out


# ----------------------------------------------------------------------------- reading a folder / zip

class _Source:
    """Lists and reads files of a folder or zip (the zip handle is opened lazily, per process)."""

    def __init__(self, source: str | Path) -> None:
        self.path = Path(source)
        if not self.path.exists():
            raise FileNotFoundError(f"image source not found: {self.path}")
        self.is_zip = not self.path.is_dir()
        self._zf: zipfile.ZipFile | None = None

    def _zip(self) -> zipfile.ZipFile:
        if self._zf is None:
            try:
                self._zf = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as e:
                raise ValueError(f"{self.path} is not a readable folder or zip archive: {e}") from e
        return self._zf

    def names(self) -> list[str]:
        if self.is_zip:
            return [i.filename for i in self._zip().infolist() if not i.is_dir()]
        return [Path(root, f).relative_to(self.path).as_posix() for root, _, files in os.walk(self.path) for f in files]

    def read(self, name: str) -> bytes:
        return self._zip().read(name) if self.is_zip else (self.path / name).read_bytes()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zf": None}


def _hidden(name: str) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in PurePosixPath(name).parts)


def parse_yolo_labels(text: str, nc: int = 80) -> tuple[Tensor, list[str]]:
    """YOLO label text -> ((n, 5) float tensor ``class cx cy w h``, the rejected lines).

    A line is rejected when it does not hold exactly 5 numbers, its class is not an integer in
    ``0..nc-1``, a coordinate is outside [0, 1] or a width / height is not positive. Blank lines are ignored.
    """
    rows, bad = [], []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            bad.append(line)
            continue
        if len(vals) != 5 or not all(np.isfinite(vals)):
            bad.append(line)
            continue
        c, cx, cy, w, h = vals
        if c != int(c) or not 0 <= c < nc or not all(0.0 <= v <= 1.0 for v in (cx, cy, w, h)) or w <= 0 or h <= 0:
            bad.append(line)
            continue
        rows.append(vals)
    return torch.tensor(rows, dtype=torch.float32).view(-1, 5), bad


def _match_labels(image_names: list[str], label_names: list[str]) -> dict[str, str]:
    """image name -> label file name, by stem; ambiguous stems are settled by the path below
    ``images/`` vs ``labels/`` (YOLO layout), then by the parent folder name."""
    by_stem: dict[str, list[str]] = {}
    for n in label_names:
        by_stem.setdefault(PurePosixPath(n).stem, []).append(n)

    def tail(name: str, marker: str) -> str:
        parts = PurePosixPath(name).with_suffix("").parts
        idx = [i for i, p in enumerate(parts) if p == marker]
        return "/".join(parts[idx[-1] + 1:]) if idx else PurePosixPath(name).stem

    out = {}
    for img in image_names:
        cands = by_stem.get(PurePosixPath(img).stem, [])
        if len(cands) > 1:
            cands = [c for c in cands if tail(c, "labels") == tail(img, "images")] or \
                    [c for c in cands if PurePosixPath(c).parent.name == PurePosixPath(img).parent.name] or cands
            if len(cands) > 1:
                log.warning("%d label files match image %s; using %s", len(cands), img, cands[0])
        if cands:
            out[img] = cands[0]
    return out


def has_yolo_labels(source: str | Path) -> bool:
    """Whether a folder or zip holds YOLO box labels: a ``.txt`` file whose stem is an image's (detection data,
    e.g. COCO128), read from the listing only."""
    names = [n for n in _Source(source).names() if not _hidden(n)]
    stems = {PurePosixPath(n).stem for n in names if PurePosixPath(n).suffix.lower() in IMAGE_EXTENSIONS}
    return any(PurePosixPath(n).stem in stems for n in names if n.lower().endswith(".txt"))


class LetterboxDataset(Dataset):
    """Letterboxed images of a folder or zip, decoded lazily; with ``labels=True`` also their YOLO boxes.

    Items: the float (3, size, size) image, or ``(image, labels)`` with ``labels`` an (n, 5) tensor
    ``class cx cy w h`` (normalised to the original image) when ``labels=True``. :meth:`load` gives the
    :class:`Letterboxed` record (scale, padding, original size) needed to map predictions back.
    Label files are ``*.txt`` files of the same source (zip or folder) whose stem is the image's; with
    ``labels=True`` a source without any ``.txt`` file is an error, an image without one has no objects.
    ``cache=True`` keeps the letterboxed uint8 images in memory after their first read. ``train=True`` (the
    distillation stream of unlabelled photos; refused with labels) flips each image left-right with probability
    1/2, seeded by (``seed``, epoch, index) as :class:`bitdown.data.ImageDataset` (:meth:`set_epoch`).
    """

    def __init__(self, source: str | Path, size: int = 640, labels: bool = False, nc: int = 80,
                 color: int = 114, cache: bool = False, indices: Sequence[int] | None = None,
                 train: bool = False, seed: int = 0) -> None:
        if train and labels:
            raise ValueError("LetterboxDataset(train=True) flips images: it is for unlabelled photos, not labels")
        self.source, self.size, self.color, self.nc = str(source), int(size), int(color), int(nc)
        self.train, self.seed, self.epoch = bool(train), int(seed), 0
        self._src = _Source(source)
        all_files = [n for n in self._src.names() if not _hidden(n)]
        names = sorted(n for n in all_files if PurePosixPath(n).suffix.lower() in IMAGE_EXTENSIONS)
        if not names:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {source}")
        if indices is not None:
            bad = [i for i in indices if not 0 <= int(i) < len(names)]
            if bad:
                raise IndexError(f"indices {bad[:_MAX_LISTED]} out of range for {len(names)} images in {source}")
            names = [names[int(i)] for i in indices]
        self.names = names
        self.with_labels = bool(labels)
        self.labels: list[Tensor] | None = None
        self.n_bad_labels = 0
        self.n_missing_labels = 0
        if labels:
            self._read_labels([n for n in all_files if n.lower().endswith(".txt")])
        self._cache: dict[int, tuple[Tensor, float, tuple[int, int], tuple[int, int]]] | None = {} if cache else None

    def _read_labels(self, txt: list[str]) -> None:
        if not txt:
            raise ValueError(f"labels=True but {self.source} holds no .txt label files")
        match = _match_labels(self.names, txt)
        self.labels, bad_examples = [], []
        for name in self.names:
            if name not in match:
                self.n_missing_labels += 1
                self.labels.append(torch.zeros(0, 5))
                continue
            try:
                boxes, bad = parse_yolo_labels(self._src.read(match[name]).decode("utf-8"), self.nc)
            except UnicodeDecodeError:
                boxes, bad = torch.zeros(0, 5), ["<not UTF-8 text>"]
            self.n_bad_labels += len(bad)
            bad_examples += [f"{match[name]}: {b!r}" for b in bad]
            self.labels.append(boxes)
        if self.n_bad_labels:
            log.warning("skipped %d malformed label lines (or class ids outside 0..%d) in %s; first: %s",
                        self.n_bad_labels, self.nc - 1, self.source, "; ".join(bad_examples[:_MAX_LISTED]))
        if self.n_missing_labels:
            log.info("%d of %d images in %s have no label file (no objects)", self.n_missing_labels,
                     len(self.names), self.source)

    @property
    def n_boxes(self) -> int:
        return sum(len(b) for b in self.labels) if self.labels is not None else 0

    def __len__(self) -> int:
        return len(self.names)

    def _raw(self, i: int) -> tuple[Tensor, float, tuple[int, int], tuple[int, int]]:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        img = Image.open(io.BytesIO(self._src.read(self.names[i])))
        img = img.convert("RGB")
        x, scale, pad = _letterbox_uint8(img, self.size, self.color)
        rec = (x, scale, pad, (img.size[1], img.size[0]))
        if self._cache is not None:
            self._cache[i] = rec
        return rec

    def load(self, i: int) -> Letterboxed:
        x, scale, pad, orig = self._raw(i)
        return Letterboxed(x.float().div_(255.0), scale, pad, orig)

    def set_epoch(self, epoch: int) -> None:
        """Select the flip stream of ``epoch`` (train mode)."""
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> Tensor | tuple[Tensor, Tensor]:
        x = self.load(i).image
        if self.train:
            from .data import sample_generator

            if torch.rand((), generator=sample_generator(self.seed, self.epoch, int(i))) < 0.5:
                x = x.flip(-1)
        return (x, self.labels[i]) if self.with_labels else x


# ----------------------------------------------------------------------------- boxes and NMS

def xywh2xyxy(x: Tensor) -> Tensor:
    y = x.clone()
    y[..., 0] = x[..., 0] - x[..., 2] / 2
    y[..., 1] = x[..., 1] - x[..., 3] / 2
    y[..., 2] = x[..., 0] + x[..., 2] / 2
    y[..., 3] = x[..., 1] + x[..., 3] / 2
    return y


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU matrix (len(a), len(b)) of xyxy boxes."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(2)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-12)


def _overlapping_pairs(boxes: Tensor, iou_thres: float, chunk_rows: int = 256,
                       chunk_elems: int = 1 << 21) -> tuple[Tensor, Tensor]:
    """All unordered pairs (i, j) of boxes with IoU > iou_thres, as two index tensors.

    Boxes are swept in x1 order, in chunks of rows. A box j starting at or after box i (x1_j >= x1_i) can
    only reach IoU > t with it when x1_j < x2_i - t * w_i (IoU <= intersection width / w_i), so a row chunk
    only meets the columns from its first row up to the first x1 beyond that reach: boxes far apart, and
    boxes of other classes (offset by class * max_wh), are never compared."""
    n = boxes.shape[0]
    order = boxes[:, 0].argsort()
    b = boxes[order]
    x1 = b[:, 0].contiguous()
    t = min(max(float(iou_thres), 0.0), 1.0)
    reach = b[:, 2] - t * (b[:, 2] - b[:, 0])
    area = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    rows_i, rows_j = [], []
    start = 0
    while start < n:
        step = min(n - start, chunk_rows)
        while True:                       # shrink the row chunk until rows x reachable columns fits the budget
            end = start + step
            hi = max(end, int(torch.searchsorted(x1, reach[start:end].max().reshape(1))))
            if step == 1 or step * (hi - start) <= chunk_elems:
                break
            step //= 2
        r, c = b[start:end], b[start:hi]
        iw = (torch.minimum(r[:, None, 2], c[None, :, 2]) - torch.maximum(r[:, None, 0], c[None, :, 0])).clamp_(min=0)
        ih = (torch.minimum(r[:, None, 3], c[None, :, 3]) - torch.maximum(r[:, None, 1], c[None, :, 1])).clamp_(min=0)
        inter = iw.mul_(ih)
        union = (area[start:end, None] + area[None, start:hi]).sub_(inter)
        hit = inter > iou_thres * union   # IoU > t without a division (union > 0 wherever inter > 0)
        ri, ci = hit.nonzero(as_tuple=True)
        ri, ci = ri + start, ci + start
        keep = ci > ri
        rows_i.append(ri[keep])
        rows_j.append(ci[keep])
        start = end
    i = torch.cat(rows_i) if rows_i else torch.zeros(0, dtype=torch.long)
    j = torch.cat(rows_j) if rows_j else torch.zeros(0, dtype=torch.long)
    return order[i], order[j]


def nms(boxes: Tensor, scores: Tensor, iou_thres: float) -> Tensor:
    """Greedy NMS (torchvision.ops.nms semantics: a box is dropped when its IoU with a kept box of higher
    score is > iou_thres), exact, vectorised: indices of the kept boxes by decreasing score.

    The overlapping pairs are found once (sweep over x1, in chunks); then ``keep[j] = no kept higher-scored
    box overlaps j`` is iterated from "keep all" until it stops changing. That equation determines the greedy
    result uniquely (by induction over the score order), and the iteration fixes at least one more box per
    pass, so it ends on it; in practice after a few passes (the longest chain of suppressions)."""
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    rank_order = scores.argsort(descending=True, stable=True)
    rank = torch.empty_like(rank_order)
    rank[rank_order] = torch.arange(n, device=boxes.device)
    a, b = _overlapping_pairs(boxes.float(), iou_thres)
    ra, rb = rank[a], rank[b]
    sup = torch.where(ra < rb, ra, rb)           # the higher-scored box of each pair (rank space)
    tgt = torch.where(ra < rb, rb, ra)
    keep = torch.ones(n, dtype=torch.bool, device=boxes.device)
    for _ in range(n):
        suppressed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
        suppressed[tgt[keep[sup]]] = True
        new = ~suppressed
        if torch.equal(new, keep):
            break
        keep = new
    return rank_order[keep.nonzero(as_tuple=True)[0]]


def non_max_suppression(pred: Tensor, conf_thres: float = 0.25, iou_thres: float = 0.45, max_det: int = 300,
                        multi_label: bool = False, agnostic: bool = False, max_nms: int = 30000,
                        max_wh: float = 7680.0) -> list[Tensor]:
    """YOLOv5's NMS on decoded predictions (N, boxes, 5 + nc) -> per image an (n, 6) tensor
    ``x1, y1, x2, y2, conf, class`` (input pixels), by decreasing confidence.

    conf = objectness x class probability; candidates need objectness > conf_thres and conf > conf_thres.
    ``multi_label`` (YOLOv5 val.py) keeps every class above the threshold per box, else the best class
    (detect.py). Classes are kept apart by offsetting boxes by class * max_wh (unless ``agnostic``)."""
    out = []
    for x in pred:
        x = x[x[:, 4] > conf_thres].float()
        if not x.shape[0]:
            out.append(torch.zeros(0, 6, device=pred.device))
            continue
        cls_conf = x[:, 5:] * x[:, 4:5]
        box = xywh2xyxy(x[:, :4])
        if multi_label:
            i, j = (cls_conf > conf_thres).nonzero(as_tuple=True)
            x = torch.cat((box[i], cls_conf[i, j, None], j[:, None].float()), 1)
        else:
            conf, j = cls_conf.max(1, keepdim=True)
            x = torch.cat((box, conf, j.float()), 1)[conf.view(-1) > conf_thres]
        if x.shape[0] > max_nms:
            x = x[x[:, 4].argsort(descending=True)[:max_nms]]
        offset = x[:, 5:6] * (0.0 if agnostic else max_wh)
        keep = nms(x[:, :4] + offset, x[:, 4], iou_thres)[:max_det]
        out.append(x[keep])
    return out


# ----------------------------------------------------------------------------- models

def find_detect(model: nn.Module) -> nn.Module:
    """The model's detection head: the last submodule with a ``decode`` method and an ``anchors`` buffer."""
    heads = [m for m in model.modules() if callable(getattr(m, "decode", None)) and hasattr(m, "anchors")]
    if not heads:
        raise TypeError(f"{type(model).__name__} has no predict() and no Detect head with decode(): cannot "
                        "turn its output into boxes")
    return heads[-1]


def predict(model: nn.Module, x: Tensor) -> Tensor:
    """Decoded boxes (N, boxes, 5 + nc) of ``model`` on a batch (see the module docstring)."""
    if callable(getattr(model, "predict", None)):
        return model.predict(x)
    out = model(x)
    if isinstance(out, Tensor) and out.dim() == 3:
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor) and out[0].dim() == 3:
        return out[0]                                       # YOLOv5 eval mode: (decoded, raw)
    return find_detect(model).decode(out)


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def detect_batches(model: nn.Module, dataset: LetterboxDataset, batch_size: int = 8, conf: float = 0.001,
                   iou: float = 0.6, max_det: int = 300, multi_label: bool = True,
                   progress: bool | None = None) -> tuple[list[Tensor], list[tuple[int, int]]]:
    """Run ``model`` over ``dataset`` in batches: (per image an (n, 6) tensor ``x1, y1, x2, y2, conf, class``
    in original-image pixels, per image its original (height, width))."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    dev = _device(model)
    dets: list[Tensor] = []
    sizes: list[tuple[int, int]] = []
    try:
        with torch.no_grad():
            starts = range(0, len(dataset), batch_size)
            for s in tqdm(starts, desc="detect", unit="batch", disable=None if progress is None else not progress,
                          leave=False):
                items = [dataset.load(i) for i in range(s, min(s + batch_size, len(dataset)))]
                x = torch.stack([it.image for it in items]).to(dev)
                preds = non_max_suppression(predict(model, x), conf, iou, max_det, multi_label=multi_label)
                for it, p in zip(items, preds):
                    p = p.cpu()
                    p[:, :4] = boxes_to_original(p[:, :4], it.scale, it.pad, it.orig_size)
                    dets.append(p)
                    sizes.append(it.orig_size)
    finally:
        model.train(was_training)
    return dets, sizes


# ----------------------------------------------------------------------------- COCO mAP

def labels_to_coco(labels: Sequence[Tensor], sizes: Sequence[tuple[int, int]]) -> dict:
    """A COCO ground-truth dict from YOLO labels ((n, 5) ``class cx cy w h`` normalised) and image sizes
    (h, w): image id = position, category id = class + 1, bbox [x, y, w, h] in pixels, area w * h, iscrowd 0."""
    images, anns = [], []
    for img_id, (lab, (h, w)) in enumerate(zip(labels, sizes)):
        images.append({"id": img_id, "height": int(h), "width": int(w)})
        for c, cx, cy, bw, bh in lab.tolist():
            bw, bh = bw * w, bh * h
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": int(c) + 1,
                         "bbox": [cx * w - bw / 2, cy * h - bh / 2, bw, bh], "area": bw * bh, "iscrowd": 0})
    ncls = max([int(a["category_id"]) for a in anns], default=0)
    return {"info": {}, "licenses": [], "images": images, "annotations": anns,
            "categories": [{"id": k, "name": str(k - 1)} for k in range(1, max(ncls, 80) + 1)]}


def detections_to_coco(dets: Sequence[Tensor]) -> list[dict]:
    """Per-image (n, 6) xyxy detections in pixels -> COCO result dicts (image id = position, category = class + 1)."""
    out = []
    for img_id, d in enumerate(dets):
        for x1, y1, x2, y2, score, c in d.tolist():
            out.append({"image_id": img_id, "category_id": int(c) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": float(score)})
    return out


def coco_map(gt: dict, results: list[dict]) -> tuple[float, float]:
    """(mAP@0.5:0.95, mAP@0.5) of COCO results against a COCO ground-truth dict, by pycocotools' COCOeval."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        raise ImportError("COCO mAP needs pycocotools: pip install pycocotools (or bitdown[detect])") from e
    if not results or not gt["annotations"]:
        return 0.0, 0.0
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    log.debug("COCOeval:\n%s", buf.getvalue())
    return float(ev.stats[0]), float(ev.stats[1])


def _compute_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """YOLOv5's compute_ap: precision envelope, 101-point interpolation, trapezoidal integral."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))
    x = np.linspace(0, 1, 101)
    return float(np.trapezoid(np.interp(x, mrec, mpre), x))


def yolo_map(dets: Sequence[Tensor], gt_boxes: Sequence[Tensor]) -> tuple[float, float]:
    """(mAP@0.5:0.95, mAP@0.5) as YOLOv5's val.py (process_batch + ap_per_class) computes them.

    ``dets``: per image (n, 6) ``x1 y1 x2 y2 conf class``; ``gt_boxes``: per image (m, 5) ``class x1 y1 x2 y2``
    in the same pixels. Matching per IoU threshold (0.5:0.05:0.95): candidate pairs of the same class with
    IoU >= t, greedy by decreasing IoU, one detection per label and one label per detection. AP per class
    (classes having labels) over all images by decreasing confidence; mean over classes."""
    iouv = np.linspace(0.5, 0.95, 10)
    tps, confs, pcls, tcls = [], [], [], []
    for d, g in zip(dets, gt_boxes):
        d, g = d.double(), g.double()
        correct = np.zeros((len(d), len(iouv)), dtype=bool)
        if len(d) and len(g):
            iou = box_iou(g[:, 1:], d[:, :4]).numpy()
            same = (g[:, 0:1] == d[:, 5][None]).numpy()
            for k, t in enumerate(iouv):
                li, di = np.nonzero((iou >= t) & same)
                if len(li):
                    m = np.stack([li, di, iou[li, di]], 1)
                    if len(li) > 1:
                        m = m[m[:, 2].argsort()[::-1]]
                        m = m[np.unique(m[:, 1], return_index=True)[1]]
                        m = m[np.unique(m[:, 0], return_index=True)[1]]
                    correct[m[:, 1].astype(int), k] = True
        tps.append(correct)
        confs.append(d[:, 4].numpy())
        pcls.append(d[:, 5].numpy())
        tcls.append(g[:, 0].numpy())
    tp, conf, pred_cls = np.concatenate(tps, 0), np.concatenate(confs), np.concatenate(pcls)
    target_cls = np.concatenate(tcls)
    classes = np.unique(target_cls)
    if not len(classes):
        return 0.0, 0.0
    order = np.argsort(-conf, kind="stable")
    tp, pred_cls = tp[order], pred_cls[order]
    ap = np.zeros((len(classes), len(iouv)))
    for ci, c in enumerate(classes):
        sel = pred_cls == c
        n_l, n_p = int((target_cls == c).sum()), int(sel.sum())
        if not n_p:
            continue
        tpc = tp[sel].cumsum(0)
        fpc = (1 - tp[sel]).cumsum(0)
        recall = tpc / (n_l + 1e-16)
        precision = tpc / (tpc + fpc)
        for k in range(len(iouv)):
            ap[ci, k] = _compute_ap(recall[:, k], precision[:, k])
    return float(ap.mean()), float(ap[:, 0].mean())


def _gt_pixels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """(n, 5) ``class cx cy w h`` normalised -> ``class x1 y1 x2 y2`` in pixels of an (h, w) image."""
    h, w = size
    out = labels.clone()
    out[:, 1:] = xywh2xyxy(labels[:, 1:] * labels.new_tensor([w, h, w, h]))
    return out


def evaluate_detection(model: nn.Module, dataset: LetterboxDataset, batch_size: int = 8, conf: float = 0.001,
                       iou: float = 0.6, max_det: int = 300, yolo_ap: bool = False,
                       progress: bool | None = None) -> dict[str, Any]:
    """COCO mAP of ``model`` on a labelled :class:`LetterboxDataset` (YOLOv5 val.py settings by default).

    Returns ``{"map50_95", "map50", "n_images", "n_boxes"}`` (COCOeval), plus ``"map50_95_yolo"`` and
    ``"map50_yolo"`` (YOLOv5's own AP, :func:`yolo_map`) when ``yolo_ap``."""
    if dataset.labels is None:
        raise ValueError("evaluate_detection needs a LetterboxDataset with labels=True")
    dets, sizes = detect_batches(model, dataset, batch_size, conf, iou, max_det, multi_label=True, progress=progress)
    gt = labels_to_coco(dataset.labels, sizes)
    m, m50 = coco_map(gt, detections_to_coco(dets))
    out: dict[str, Any] = {"map50_95": m, "map50": m50, "n_images": len(dataset), "n_boxes": dataset.n_boxes}
    if yolo_ap:
        out["map50_95_yolo"], out["map50_yolo"] = yolo_map(dets, [_gt_pixels(l, s) for l, s in zip(dataset.labels, sizes)])
    return out
