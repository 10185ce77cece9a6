"""Tests of the YOLOv5n zoo model and bitdown.detection (letterbox, YOLO labels, NMS, COCO mAP) and cli_detect."""
from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from bitdown.detection import (LetterboxDataset, box_iou, boxes_to_letterbox, boxes_to_original, coco_map,
                               detections_to_coco, evaluate_detection, labels_to_coco, letterbox, nms,
                               non_max_suppression, parse_yolo_labels, xywh2xyxy, yolo_map)
from bitdown.zoo import build_model, get_entry, load_weights
from bitdown.zoo.yolov5 import ANCHORS_PX, COCO_CLASSES, YOLOv5, yolov5n

WEIGHTS = "coco/yolov5n-coco-state_dict.pt"
COCO128 = "coco/coco128-val2017.zip"


# ----------------------------------------------------------------------------- model

def test_real_weights_load_strictly(assets_root):
    sd = torch.load(assets_root / WEIGHTS, map_location="cpu", weights_only=True)
    model = yolov5n()
    model.load_state_dict(sd, strict=True)
    assert sum(p.numel() for p in model.parameters()) == 1_872_157
    assert set(model.state_dict()) == set(sd)
    expected = torch.tensor(ANCHORS_PX, dtype=torch.float32).view(3, 3, 2) / torch.tensor([8.0, 16, 32]).view(3, 1, 1)
    assert torch.allclose(model.model[24].anchors, expected)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 for m in bns)


def test_zoo_entry():
    entry = get_entry("yolov5n_coco")
    assert entry.weights == WEIGHTS and entry.preprocess == "letterbox" and entry.num_classes == 80
    model = build_model("yolov5n_coco", weights=None)
    assert isinstance(model, YOLOv5) and not model.training
    assert isinstance(model.get_submodule(entry.classifier), nn.Module)
    assert len(COCO_CLASSES) == 80 and COCO_CLASSES[0] == "person" and COCO_CLASSES[-1] == "toothbrush"
    from bitdown.recipes import zoo_config

    zoo_config("yolov5n_coco", "small")           # a valid recipe: no classifier override


def test_output_shapes_and_modes():
    torch.manual_seed(0)
    model = yolov5n()
    x = torch.randn(2, 3, 320, 320)
    with torch.no_grad():
        model.eval()
        raw_eval = model(x)
        pred = model.predict(x)
        model.train()
        raw_train = model(x)
    assert [tuple(t.shape) for t in raw_eval] == [(2, 255, 40, 40), (2, 255, 20, 20), (2, 255, 10, 10)]
    assert pred.shape == (2, 3 * (40 * 40 + 20 * 20 + 10 * 10), 85)
    assert [t.shape for t in raw_train] == [t.shape for t in raw_eval]     # same structure in both modes
    assert ((pred[..., 4:] >= 0) & (pred[..., 4:] <= 1)).all()
    # distillation sees a list of 3 feature maps: normalised MSE on each
    from bitdown.finetune import describe_output

    assert describe_output(raw_eval) == "list of 3 tensors: mse"


def test_decode_grid_and_anchors():
    model = yolov5n().eval()
    raw = [torch.zeros(1, 255, s, s) for s in (8, 4, 2)]              # sigmoid(0) = 0.5 everywhere
    pred = model.decode(raw).view(-1, 85)
    first = pred[: 3 * 64].view(3, 8, 8, 85)                          # level 0: 3 anchors x 8 x 8
    # xy = (0.5 * 2 - 0.5 + grid) * stride = (grid + 0.5) * 8; wh = (0.5 * 2)^2 * anchor (pixels)
    assert torch.allclose(first[0, 2, 5, :2], torch.tensor([5.5 * 8, 2.5 * 8]))
    assert torch.allclose(first[1, 0, 0, 2:4], torch.tensor([16.0, 30.0]))
    last = pred[-1]                                                     # level 2, anchor 2, cell (1, 1)
    assert torch.allclose(last[:4], torch.tensor([1.5 * 32, 1.5 * 32, 373.0, 326.0]))
    assert torch.allclose(pred[:, 4:], torch.full_like(pred[:, 4:], 0.5))


# ----------------------------------------------------------------------------- NMS

def test_box_iou():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 10.0], [2.0, 2.0, 4.0, 4.0]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[50 / 150, 0.0, 1.0, 4 / 100]]))


def _brute_nms(boxes, scores, thr):
    """Greedy NMS, one box at a time (the textbook loop)."""
    iou = box_iou(boxes, boxes).tolist()
    keep = []
    for i in sorted(range(len(scores)), key=lambda k: -float(scores[k])):
        if all(iou[i][k] <= thr for k in keep):
            keep.append(i)
    return keep


def _random_boxes(g, n, extent=100.0):
    xy = torch.rand(n, 2, generator=g) * extent
    wh = torch.rand(n, 2, generator=g) * extent / 2 + 1
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("thr", [0.0, 0.3, 0.6, 0.9])
def test_nms_matches_brute_force(thr):
    g = torch.Generator().manual_seed(int(thr * 10))
    for n in (1, 2, 17, 150, 400):
        boxes, scores = _random_boxes(g, n), torch.rand(n, generator=g)
        cls = torch.randint(0, 4, (n,), generator=g).float()[:, None] * 1000.0
        assert nms(boxes + cls, scores, thr).tolist() == _brute_nms(boxes + cls, scores, thr)
    # tight clusters: long suppression chains
    base = _random_boxes(g, 5)
    boxes = base.repeat_interleave(60, 0) + torch.randn(300, 4, generator=g) * 3
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    scores = torch.rand(300, generator=g)
    assert nms(boxes, scores, thr).tolist() == _brute_nms(boxes, scores, thr)
    assert nms(torch.zeros(0, 4), torch.zeros(0), thr).shape == (0,)


def _brute_yolo_nms(p, conf, iou, max_det, multi_label):
    """Reference: YOLOv5's NMS written with Python loops, per class."""
    rows = []
    for b in p.tolist():
        if b[4] <= conf:
            continue
        cx, cy, w, h = b[:4]
        xyxy = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        cls_conf = [c * b[4] for c in b[5:]]
        cands = [k for k, c in enumerate(cls_conf) if c > conf] if multi_label else \
            [max(range(len(cls_conf)), key=lambda k: cls_conf[k])]
        rows += [xyxy + [cls_conf[k], float(k)] for k in cands if cls_conf[k] > conf]
    if not rows:
        return torch.zeros(0, 6)
    rows = torch.tensor(rows)
    kept = []
    for c in rows[:, 5].unique():
        idx = (rows[:, 5] == c).nonzero().view(-1)
        kept += [int(idx[k]) for k in _brute_nms(rows[idx, :4], rows[idx, 4], iou)]
    out = rows[kept]
    return out[out[:, 4].argsort(descending=True)][:max_det]


@pytest.mark.parametrize("multi_label", [False, True])
def test_non_max_suppression_matches_reference(multi_label):
    g = torch.Generator().manual_seed(3)
    n, nc = 300, 4
    cxcy = torch.rand(2, n, 2, generator=g) * 200
    wh = torch.rand(2, n, 2, generator=g) * 60 + 2
    probs = torch.rand(2, n, 1 + nc, generator=g)
    pred = torch.cat([cxcy, wh, probs], 2)
    out = non_max_suppression(pred, conf_thres=0.3, iou_thres=0.5, max_det=40, multi_label=multi_label)
    for p, o in zip(pred, out):
        ref = _brute_yolo_nms(p, 0.3, 0.5, 40, multi_label)
        assert o.shape == ref.shape and o.shape[0] > 0
        assert torch.allclose(o, ref, atol=1e-5)
    assert non_max_suppression(torch.zeros(1, 5, 5 + nc))[0].shape == (0, 6)


# ----------------------------------------------------------------------------- letterbox, labels

def test_letterbox_pixels_and_round_trip():
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    x, scale, pad = letterbox(img, 64)
    assert x.shape == (3, 64, 64) and scale == pytest.approx(64 / 200) and pad == (0, 16)
    assert torch.allclose(x[:, 0, 0], torch.full((3,), 114 / 255))        # grey padding above
    assert torch.allclose(x[:, 63, 0], torch.full((3,), 114 / 255))       # and below
    assert torch.allclose(x[:, 16:48, :], torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, 32, 64))
    boxes = torch.tensor([[10.0, 20.0, 150.0, 90.0], [0.0, 0.0, 200.0, 100.0]])
    lb = boxes_to_letterbox(boxes, scale, pad)
    assert torch.allclose(lb[1], torch.tensor([0.0, 16.0, 64.0, 48.0]))
    assert torch.allclose(boxes_to_original(lb, scale, pad, (100, 200)), boxes, atol=1e-4)
    clipped = boxes_to_original(torch.tensor([[-5.0, 0.0, 70.0, 64.0]]), scale, pad, (100, 200))
    assert clipped.tolist() == [[0.0, 0.0, 200.0, 100.0]]
    # tall image upscaled: pad left / right
    x, scale, pad = letterbox(Image.new("RGB", (10, 20)), 40)
    assert scale == 2.0 and pad == (10, 0)


def test_train_stream_flips_seeded(tmp_path):
    for k in range(16):                 # left half dark, right half bright: a flip is visible
        img = Image.new("RGB", (32, 32), (0, 0, 0))
        img.paste((200, 200, 200), (16, 0, 32, 32))
        img.save(tmp_path / f"{k:02d}.png")
    plain = LetterboxDataset(tmp_path, size=32)
    train = LetterboxDataset(tmp_path, size=32, train=True, seed=3)
    flips = [bool(train[i][0, 0, 0] > plain[i][0, 0, 0]) for i in range(16)]
    assert 3 <= sum(flips) <= 13                                           # about half
    assert all(torch.equal(train[i], plain[i].flip(-1) if f else plain[i]) for i, f in enumerate(flips))
    assert flips == [bool(train[i][0, 0, 0] > plain[i][0, 0, 0]) for i in range(16)]      # deterministic
    train.set_epoch(1)
    assert flips != [bool(train[i][0, 0, 0] > plain[i][0, 0, 0]) for i in range(16)]      # another epoch
    with pytest.raises(ValueError, match="unlabelled"):
        LetterboxDataset(tmp_path, size=32, labels=True, train=True)


def test_parse_yolo_labels():
    boxes, bad = parse_yolo_labels("0 0.5 0.5 0.2 0.2\n\n79 0.1 0.2 0.1 0.1\n80 0.5 0.5 0.1 0.1\n"
                                   "-1 0.5 0.5 0.1 0.1\n1.5 0.5 0.5 0.1 0.1\n3 0.5 0.5\n3 a b c d\n"
                                   "2 0.5 0.5 0 0.1\n2 1.5 0.5 0.1 0.1\n")
    assert torch.allclose(boxes, torch.tensor([[0, 0.5, 0.5, 0.2, 0.2], [79, 0.1, 0.2, 0.1, 0.1]]))
    assert len(bad) == 7


def _labelled_zip(tmp_path, make_image):
    """images/val/{a,b,c,d}.jpg + labels/val/{a,b,d}.txt (d has a bad class id); c has no label file."""
    root = tmp_path / "set"
    for stem, size in [("a", (64, 48)), ("b", (32, 32)), ("c", (40, 80)), ("d", (50, 50))]:
        make_image(root / "images" / "val" / f"{stem}.jpg", size=size)
    lab = root / "labels" / "val"
    lab.mkdir(parents=True)
    (lab / "a.txt").write_text("1 0.5 0.5 0.5 0.5\n2 0.25 0.25 0.1 0.2\n")
    (lab / "b.txt").write_text("")
    (lab / "d.txt").write_text("3 0.5 0.5 0.2 0.2\n95 0.5 0.5 0.2 0.2\n")
    zpath = tmp_path / "set.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(root).as_posix())
    return root, zpath


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_label_reader(tmp_path, make_image, caplog, kind):
    root, zpath = _labelled_zip(tmp_path, make_image)
    with caplog.at_level(logging.WARNING, logger="bitdown.detection"):
        ds = LetterboxDataset(root if kind == "folder" else zpath, size=32, labels=True)
    assert [n.split("/")[-1] for n in ds.names] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert [len(b) for b in ds.labels] == [2, 0, 0, 1]
    assert ds.n_bad_labels == 1 and ds.n_missing_labels == 1 and ds.n_boxes == 3
    assert "95 0.5" in caplog.text
    x, lab = ds[0]
    assert x.shape == (3, 32, 32) and lab[0, 0] == 1
    item = ds.load(2)
    assert item.orig_size == (80, 40) and item.pad == (8, 0)
    # without labels: plain images (calibration), any photo folder
    ds = LetterboxDataset(root, size=16)
    assert len(ds) == 4 and ds[3].shape == (3, 16, 16) and ds.labels is None
    with pytest.raises(ValueError, match="no .txt label files"):
        LetterboxDataset(root / "images", labels=True)


# ----------------------------------------------------------------------------- mAP

def _toy_truth():
    labels = [torch.tensor([[0, 0.5, 0.5, 0.4, 0.4], [3, 0.2, 0.3, 0.1, 0.2]]), torch.zeros(0, 5),
              torch.tensor([[3, 0.6, 0.6, 0.3, 0.2]])]
    sizes = [(100, 200), (50, 50), (80, 60)]
    return labels, sizes


def _as_dets(labels, sizes, shift=0.0):
    out = []
    for lab, (h, w) in zip(labels, sizes):
        xyxy = xywh2xyxy(lab[:, 1:] * torch.tensor([w, h, w, h])) + shift
        out.append(torch.cat([xyxy, torch.full((len(lab), 1), 0.9), lab[:, :1]], 1))
    return out


def test_coco_map_perfect_and_imperfect():
    labels, sizes = _toy_truth()
    gt = labels_to_coco(labels, sizes)
    assert len(gt["images"]) == 3 and len(gt["annotations"]) == 3
    ann = gt["annotations"][0]
    assert ann["bbox"] == pytest.approx([60.0, 30.0, 80.0, 40.0]) and ann["area"] == pytest.approx(3200.0)
    assert ann["category_id"] == 1 and ann["iscrowd"] == 0
    perfect = _as_dets(labels, sizes)
    assert coco_map(gt, detections_to_coco(perfect)) == pytest.approx((1.0, 1.0))
    gt_px = [torch.cat([lab[:, :1], d[:, :4]], 1) for lab, d in zip(labels, perfect)]
    # YOLOv5's compute_ap gives 0.995 for a perfect detector (np.interp at recall 1 falls on the appended
    # (1, 0) sentinel, so the last of the 101 points counts half); kept as YOLOv5 computes it
    assert yolo_map(perfect, gt_px) == pytest.approx((0.995, 0.995))
    shifted = _as_dets(labels, sizes, shift=2.0)                   # IoU in (0.5, 0.95) for every box
    m, m50 = coco_map(gt, detections_to_coco(shifted))
    assert m < 0.9 and m50 == pytest.approx(1.0)
    ym, ym50 = yolo_map(shifted, gt_px)
    assert ym < 0.9 and ym50 == pytest.approx(0.995)
    # a wrong class: nothing found
    wrong = [d.clone() for d in perfect]
    for d in wrong:
        d[:, 5] = 7
    assert coco_map(gt, detections_to_coco(wrong)) == pytest.approx((0.0, 0.0))
    assert coco_map(gt, []) == (0.0, 0.0)


class _Oracle(nn.Module):
    """A 'detector' whose predict() returns the ground truth of the image it is shown (by its pixels)."""

    def __init__(self, ds: LetterboxDataset) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.truth = []
        for i in range(len(ds)):
            it = ds.load(i)
            h, w = it.orig_size
            xyxy = boxes_to_letterbox(xywh2xyxy(ds.labels[i][:, 1:] * torch.tensor([w, h, w, h])), it.scale, it.pad)
            row = torch.zeros(len(xyxy), 85)
            row[:, :2], row[:, 2:4] = (xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]
            row[:, 4] = 1.0
            row[torch.arange(len(xyxy)), 5 + ds.labels[i][:, 0].long()] = 0.8
            self.truth.append((it.image, row))

    def predict(self, x):
        out = torch.zeros(len(x), 5, 85)
        for k, img in enumerate(x):
            row = next(r for im, r in self.truth if torch.equal(im, img))
            out[k, : len(row)] = row
        return out


def test_evaluate_detection_and_cli_pieces(tmp_path, make_image, capsys):
    from bitdown.cli_detect import cmd_detect, evaluate_file_or_model

    root, zpath = _labelled_zip(tmp_path, make_image)
    # distinct images so the oracle can tell them apart
    for k, stem in enumerate("abcd"):
        p = next(root.rglob(f"{stem}.jpg"))
        Image.new("RGB", Image.open(p).size, (40 * k, 10, 200 - 30 * k)).save(p)
    ds = LetterboxDataset(root, size=64, labels=True)
    oracle = _Oracle(ds)
    res = evaluate_detection(oracle, ds, batch_size=3, yolo_ap=True)
    assert res["map50_95"] == pytest.approx(1.0) and res["map50"] == pytest.approx(1.0)
    assert res["map50_95_yolo"] == pytest.approx(0.995) and res["n_images"] == 4 and res["n_boxes"] == 3

    out = evaluate_file_or_model(oracle, root, json_out=True, image_size=64)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["map50_95"] == pytest.approx(1.0) and printed["n_images"] == 4 and out["n_bad_labels"] == 1

    png = tmp_path / "out" / "a.png"
    found = cmd_detect(oracle, next(root.rglob("a.jpg")), png, conf=0.25, image_size=64)
    assert [f["name"] for f in found] == ["bicycle", "car"] and png.is_file()
    assert found[0]["box"] == pytest.approx([16.0, 12.0, 48.0, 36.0], abs=0.5)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (64, 48)


# ----------------------------------------------------------------------------- real assets

# Measured once (torch 2.13 CPU, this code): the teacher on the first 8 COCO128 images at 320 px.
TEACHER_320_8 = {"map50_95": 0.3651, "map50": 0.5715}


@pytest.mark.slow
def test_teacher_map_small(assets_root):
    torch.set_num_threads(1)
    model = yolov5n()
    load_weights(model, assets_root / WEIGHTS)
    ds = LetterboxDataset(assets_root / COCO128, size=320, labels=True, indices=range(8))
    res = evaluate_detection(model, ds, batch_size=4)
    assert res["n_images"] == 8 and res["n_boxes"] == 54
    assert res["map50_95"] == pytest.approx(TEACHER_320_8["map50_95"], abs=0.01)
    assert res["map50"] == pytest.approx(TEACHER_320_8["map50"], abs=0.01)


@pytest.mark.slow
def test_detect_draws_real_objects(assets_root, tmp_path):
    from bitdown.cli_detect import cmd_detect

    ds = LetterboxDataset(assets_root / COCO128, size=320, labels=True, indices=range(1))
    with zipfile.ZipFile(assets_root / COCO128) as zf:
        (tmp_path / "img.jpg").write_bytes(zf.read(ds.names[0]))
    found = cmd_detect(build_model("yolov5n_coco"), tmp_path / "img.jpg", tmp_path / "det.png", image_size=320)
    truth = {COCO_CLASSES[int(c)] for c in ds.labels[0][:, 0]}
    assert found and {f["name"] for f in found} & truth


@pytest.mark.slow
def test_cli_compresses_the_detector(assets_root, tmp_path, capsys):
    """The detector recipe through `bitdown compress` (EM only, small preset) on 16 unlabelled ImageNet photos at
    320 px, then COCO mAP on 8 COCO128 images the calibration never saw; the file loads and detects."""
    from bitdown.cli import main

    photos, coco = tmp_path / "photos", tmp_path / "coco"
    with zipfile.ZipFile(assets_root / "imagenet" / "imagenet-sample-images-256.zip") as zf:
        for name in sorted(n for n in zf.namelist() if n.lower().endswith(".jpeg"))[:16]:
            (photos / Path(name).name).parent.mkdir(parents=True, exist_ok=True)
            (photos / Path(name).name).write_bytes(zf.read(name))
    ds = LetterboxDataset(assets_root / COCO128, size=320, labels=True, indices=range(8))
    with zipfile.ZipFile(assets_root / COCO128) as zf:
        for name in ds.names:
            stem = Path(name).stem
            (coco / "images" / f"{stem}.jpg").parent.mkdir(parents=True, exist_ok=True)
            (coco / "images" / f"{stem}.jpg").write_bytes(zf.read(name))
            (coco / "labels").mkdir(exist_ok=True)
            label = next((n for n in zf.namelist() if n.endswith(f"labels/val2017/{stem}.txt")), None)
            (coco / "labels" / f"{stem}.txt").write_bytes(zf.read(label) if label else b"")
    out = tmp_path / "y.bitdown"
    rc = main(["compress", "--model", "yolov5n_coco", "--data", str(photos), "--calib-images", "16", "--fast",
               "--eval-data", str(coco), "--image-size", "320", "--out", str(out), "--json"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and out.is_file() and res["ratio"] == pytest.approx(17.7, abs=0.1)
    assert res["teacher_map50_95"] == pytest.approx(TEACHER_320_8["map50_95"], abs=0.01)
    assert 0 < res["map50_95"] < res["teacher_map50_95"] and res["eval_images"] == 8
