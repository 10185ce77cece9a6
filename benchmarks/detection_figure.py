"""One COCO128 image with the boxes of the uncompressed YOLOv5n (left) and of a compressed file (right).

    python benchmarks/detection_figure.py FILE.bitdown [--image 0] [--size 640] [--out benchmarks/results/detection_boxes.png]

Both panels come from `bitdown detect` (cli_detect.cmd_detect: conf 0.25, NMS IoU 0.45, letterbox --size);
each is scaled to --width pixels and titled with its model, ratio and number of boxes.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

from PIL import Image, ImageDraw

from bitdown import serialize
from bitdown.cli_detect import cmd_detect
from bitdown.detection import LetterboxDataset

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("BITDOWN_ASSETS", ROOT.parent / "shared" / "assets"))
COCO128 = ASSETS / "coco" / "coco128-val2017.zip"


def panel(png: Path, title: str, width: int) -> Image.Image:
    with Image.open(png) as im:
        im = im.convert("RGB")
        im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
    out = Image.new("RGB", (width, im.height + 24), (255, 255, 255))
    out.paste(im, (0, 24))
    ImageDraw.Draw(out).text((6, 6), title, fill=(0, 0, 0))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="a compressed yolov5n_coco .bitdown file")
    p.add_argument("--image", type=int, default=0, help="index of the COCO128 image (sorted names)")
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--width", type=int, default=480)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "detection_boxes.png"))
    a = p.parse_args()
    name = LetterboxDataset(COCO128).names[a.image]
    _, meta = serialize.read(a.file)
    ratio = meta.get("size", {}).get("ratio")
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(COCO128) as zf:
        img = Path(tmp) / Path(name).name
        img.write_bytes(zf.read(name))
        found_t = cmd_detect("yolov5n_coco", img, Path(tmp) / "t.png", image_size=a.size)
        found_q = cmd_detect(a.file, img, Path(tmp) / "q.png", image_size=a.size)
        left = panel(Path(tmp) / "t.png", f"teacher fp32 (7.14 MB): {len(found_t)} boxes", a.width)
        right = panel(Path(tmp) / "q.png", f"bitdown {ratio:.1f}x ({Path(a.file).name}): {len(found_q)} boxes"
                      if ratio else f"{Path(a.file).name}: {len(found_q)} boxes", a.width)
    fig = Image.new("RGB", (left.width + right.width + 8, max(left.height, right.height)), (255, 255, 255))
    fig.paste(left, (0, 0))
    fig.paste(right, (left.width + 8, 0))
    buf = io.BytesIO()
    fig.save(buf, format="PNG", optimize=True)
    Path(a.out).write_bytes(buf.getvalue())
    print(json.dumps({"image": name, "out": a.out, "teacher": found_t, "compressed": found_q}, default=float))


if __name__ == "__main__":
    main()
