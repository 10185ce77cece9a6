"""Detection pieces of the command line (wired into `bitdown.cli` by its owner):

- :func:`evaluate_file_or_model`: COCO mAP of a detector (a module, a zoo name or a ``.bitdown`` file) on
  YOLO-labelled images (e.g. COCO128), printed as JSON or as aligned lines;
- :func:`cmd_detect`: draw a detector's boxes, class names and scores on one image and save a PNG.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import nn

from .detection import LetterboxDataset, boxes_to_original, evaluate_detection, letterbox, non_max_suppression, predict

_PALETTE = ((255, 56, 56), (255, 157, 151), (255, 112, 31), (255, 178, 29), (207, 210, 49), (72, 249, 10),
            (146, 204, 23), (61, 219, 134), (26, 147, 52), (0, 212, 187), (44, 153, 168), (0, 194, 255),
            (52, 69, 147), (100, 115, 255), (0, 24, 236), (132, 56, 255), (82, 0, 133), (203, 56, 255),
            (255, 149, 200), (255, 55, 199))


def resolve_detector(model: nn.Module | str | Path) -> nn.Module:
    """An nn.Module as it is; a zoo name -> the zoo model with its default weights; a path -> ``bitdown.load(path,
    frozen=True)`` (a compressed file of a zoo architecture, as an inference-only model)."""
    if isinstance(model, nn.Module):
        return model.eval()
    from .zoo import ZOO, build_model

    if str(model) in ZOO:
        return build_model(str(model))
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"{model} is neither a zoo model ({', '.join(sorted(ZOO))}) nor a file")
    from . import load

    return load(path, frozen=True)                # inference only: the dense model's speed


def _print(obj: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print(json.dumps(obj, default=float))
        return
    for k, v in obj.items():
        print(f"{k:>18}: {v:.4f}" if isinstance(v, float) else f"{k:>18}: {v}")


def evaluate_file_or_model(model: nn.Module | str | Path, data_path: str | Path, json_out: bool = False,
                           image_size: int = 640, batch_size: int = 8, conf: float = 0.001, iou: float = 0.6,
                           max_det: int = 300) -> dict[str, Any]:
    """COCO mAP (pycocotools) of a detector on the YOLO-labelled images of ``data_path`` (folder or zip),
    letterboxed to ``image_size``; prints ``{"map50_95", "map50", "n_images", "n_boxes"}`` and returns it."""
    det = resolve_detector(model)
    ds = LetterboxDataset(data_path, size=image_size, labels=True)
    res = evaluate_detection(det, ds, batch_size=batch_size, conf=conf, iou=iou, max_det=max_det)
    if ds.n_bad_labels:
        res["n_bad_labels"] = ds.n_bad_labels
    _print(res, json_out)
    return res


def cmd_detect(model: nn.Module | str | Path, image_path: str | Path, out_png: str | Path, conf: float = 0.25,
               iou: float = 0.45, image_size: int = 640, names: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Detect objects in one image (YOLOv5 detect.py settings: best class per box, conf 0.25, NMS IoU 0.45),
    draw the boxes with class names and scores, save ``out_png`` (PNG) and return the detections
    (``{"class", "name", "score", "box": [x1, y1, x2, y2]}`` in image pixels, by decreasing score)."""
    det = resolve_detector(model)
    if names is None:
        names = getattr(det, "names", None)
        if names is None:
            from .zoo.yolov5 import COCO_CLASSES

            names = COCO_CLASSES
    with Image.open(image_path) as im:
        img = im.convert("RGB")
    x, scale, pad = letterbox(img, image_size)
    dev = next(iter(det.parameters()), torch.empty(0)).device
    with torch.no_grad():
        boxes = non_max_suppression(predict(det, x[None].to(dev)), conf, iou, max_det=300)[0].cpu()
    boxes[:, :4] = boxes_to_original(boxes[:, :4], scale, pad, (img.height, img.width))
    draw = ImageDraw.Draw(img)
    found = []
    for x1, y1, x2, y2, score, c in boxes.tolist():
        c = int(c)
        name = names[c] if 0 <= c < len(names) else str(c)
        color = _PALETTE[c % len(_PALETTE)]
        label = f"{name} {score:.2f}"
        draw.rectangle((x1, y1, x2, y2), outline=color, width=max(2, round(0.003 * max(img.size))))
        tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), label)
        th, tw = ty1 - ty0 + 4, tx1 - tx0 + 4
        top = y1 - th if y1 - th >= 0 else y1
        draw.rectangle((x1, top, x1 + tw, top + th), fill=color)
        draw.text((x1 + 2, top + 2 - ty0), label, fill=(255, 255, 255))
        found.append({"class": c, "name": name, "score": score, "box": [x1, y1, x2, y2]})
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, format="PNG")
    return found
