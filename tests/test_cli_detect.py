"""`bitdown compress` on a detector picks the detector recipe (recipes.detector_recipe) from the zoo entry's task:
calibration images letterboxed at the recipe's size, its calibration count, distillation of the raw head maps;
evaluation data of the other task, and calibrating on the evaluation images, are refused before any work."""

from __future__ import annotations

import pytest
import torch

import bitdown
import bitdown.recipes as recipes
from bitdown.zoo.yolov5 import yolov5n
from test_cli import COMPRESS, SPEC, assert_error, run, ws  # noqa: F401  (ws: the workspace fixture)
from test_cli_errors import no_work  # noqa: F401  (fixture)


def _yolo_folder(root, make_image):
    """A YOLO-labelled detection folder: images/x.jpg + labels/x.txt."""
    for stem in ("a", "b"):
        make_image(root / "images" / f"{stem}.jpg", size=(48, 32))
        (root / "labels").mkdir(parents=True, exist_ok=True)
        (root / "labels" / f"{stem}.txt").write_text("0 0.5 0.5 0.2 0.3\n")
    return root


def test_calibrating_on_the_eval_images_is_refused(ws, capsys, no_work):  # noqa: F811
    rc, _, err = run(capsys, *COMPRESS, "--out", "x.bitdown", "--eval-data", "imgs")
    assert_error(rc, err, "--data and --eval-data are the same", "imgs")
    rc, _, err = run(capsys, *COMPRESS, "--out", "x.bitdown", "--eval-data", "./imgs/../imgs")   # same folder
    assert_error(rc, err, "the same")
    assert not (ws / "x.bitdown").exists()


def test_eval_data_of_the_other_task_is_refused(ws, capsys, make_image):  # noqa: F811
    _yolo_folder(ws / "det", make_image)
    rc, _, err = run(capsys, "eval", "--model", SPEC, "--preprocess", "cifar10", "--data", "det")
    assert_error(rc, err, "is a classifier (task: classify", "YOLO box labels", "det")
    rc, _, err = run(capsys, *COMPRESS, "--out", "x.bitdown", "--eval-data", "det")
    assert_error(rc, err, "is a classifier", "detection data")
    rc, _, err = run(capsys, "eval", "--model", SPEC, "--preprocess", "letterbox", "--data", "imgs")
    assert_error(rc, err, "is a detector (task: detect", "no YOLO box labels", "classification data")
    assert not (ws / "x.bitdown").exists()


class Stop(Exception):
    """Raised by the stand-in compress: the test only looks at what the CLI passed."""


def test_detector_gets_the_detector_recipe(ws, capsys, monkeypatch):  # noqa: F811
    torch.manual_seed(0)
    torch.save(yolov5n().state_dict(), ws / "y.pt")
    seen = {}

    def fake_compress(model, data, config, **kw):
        seen.update(config=config, finetune=kw.get("finetune"), data=data, train=kw.get("train_data"))
        raise Stop

    monkeypatch.setattr(bitdown, "compress", fake_compress)
    with pytest.raises(Stop):
        bitdown.cli.main(["compress", "--model", "yolov5n_coco", "--weights", str(ws / "y.pt"), "--data", "imgs",
                          "--target-ratio", "26", "--out", "y.bitdown"])
    quant, ft, data = recipes.detector_recipe()
    config, finetune = seen["config"], seen["finetune"]
    assert config.calib_images == data["calib_images"] and config.codebook_bits == quant["codebook_bits"]
    assert seen["data"].dataset.size == data["calib_size"] and seen["train"].size == data["calib_size"]
    assert finetune.loss == "auto" and finetune.global_steps == ft["global_steps"]
    assert finetune.batch_size == ft["batch_size"] and finetune.layer_steps == ft["layer_steps"]
    for k, v in quant.items():
        got = getattr(config, k)
        assert (got.to_json() if hasattr(got, "to_json") else got) == (
            {**got.to_json(), **v} if hasattr(got, "to_json") else v), k
    # flags still win over the recipe
    with pytest.raises(Stop):
        bitdown.cli.main(["compress", "--model", "yolov5n_coco", "--weights", str(ws / "y.pt"), "--data", "imgs",
                          "--calib-size", "64", "--calib-images", "4", "--fast", "--out", "y.bitdown"])
    assert seen["config"].calib_images == 4 and seen["data"].dataset.size == 64 and seen["finetune"] is None
