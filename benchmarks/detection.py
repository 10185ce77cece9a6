"""COCO mAP of the uncompressed YOLOv5n teacher on COCO128 (val2017), the detection reference.

    python benchmarks/detection.py [--size 640] [--threads 1] [--batch-size 8] [--images N]

Letterbox to `size` (grey 114, RGB / 255), conf 0.001, NMS IoU 0.6, at most 300 detections per image
(YOLOv5 val.py settings, multi-label NMS). mAP by pycocotools' COCOeval against the YOLO labels converted
to a COCO ground truth, and YOLOv5's own 101-point AP (ap_per_class) on the same detections. The assets'
reference (YOLOv5 val) is mAP@0.5 0.497, mAP@0.5:0.95 0.334 at 640 px.

Writes benchmarks/results/detection_teacher.json (machine, wall time, figures).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from bitdown.detection import LetterboxDataset, evaluate_detection
from bitdown.zoo import build_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ASSETS = Path(os.environ.get("BITDOWN_ASSETS", ROOT.parent / "shared" / "assets"))
COCO128 = ASSETS / "coco" / "coco128-val2017.zip"
REFERENCE = {"map50_95": 0.334, "map50": 0.497, "size": 640, "source": "shared/assets/README.md (YOLOv5 val)"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--images", type=int, default=None, help="only the first N images (default: all 128)")
    p.add_argument("--out", default=str(RESULTS / "detection_teacher.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    model = build_model("yolov5n_coco")
    ds = LetterboxDataset(COCO128, size=a.size, labels=True,
                          indices=range(a.images) if a.images else None)
    t0 = time.perf_counter()
    res = evaluate_detection(model, ds, batch_size=a.batch_size, conf=0.001, iou=0.6, max_det=300, yolo_ap=True)
    wall = time.perf_counter() - t0
    out = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "loadavg": [round(x, 2) for x in os.getloadavg()]},
        "model": "yolov5n_coco", "data": "coco128 val2017 (" + COCO128.name + ")",
        "settings": {"size": a.size, "letterbox_color": 114, "conf": 0.001, "iou": 0.6, "max_det": 300,
                     "multi_label": True, "batch_size": a.batch_size},
        **res,
        "n_bad_labels": ds.n_bad_labels, "n_missing_labels": ds.n_missing_labels,
        "wall_s": round(wall, 2), "s_per_image": round(wall / len(ds), 3),
        "reference": REFERENCE,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
