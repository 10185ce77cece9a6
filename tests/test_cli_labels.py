"""Eval labels are the model's class indices, not the sorted folder names of the eval data: a zip
holding only CIFAR-10's cat/ and dog/ folders is labelled 3 and 5 for a CIFAR-10 zoo model (file or
not), WNIDs index the ImageNet classes, a name the model does not know is an error naming it, and a
model without class names falls back to sorted folder names with a warning (or --classes)."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

from bitdown import serialize
from bitdown.data import ImageDataset, imagenet_wnids
from bitdown.zoo import CIFAR10_CLASSES, ZOO, class_names
from test_cli import COMPRESS, SPEC, assert_error, run, ws  # noqa: F401  (ws: the workspace fixture)

CAT = CIFAR10_CLASSES.index("cat")


def test_zoo_entries_know_their_classes():
    assert CIFAR10_CLASSES == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                               "truck")
    classifiers = [n for n in ZOO if n.endswith("_cifar10") or n.startswith(("resnet", "efficientnet"))]
    assert len(classifiers) == 9
    for name in classifiers:
        entry = ZOO[name]
        assert entry.classes is not None and len(entry.classes) == entry.num_classes, name
    assert ZOO["resnet20_cifar10"].classes == CIFAR10_CLASSES
    assert ZOO["efficientnet_lite0"].classes == imagenet_wnids() == class_names("imagenet1k")
    with pytest.raises(KeyError, match="unknown label set"):
        class_names("mnist")


# ----------------------------------------------------------------------------- the dataset's mapping

def test_folder_names_map_to_the_models_classes(tmp_path, make_image):
    for folder in ("cat", "Dog"):
        for i in range(2):
            make_image(tmp_path / "d" / folder / f"{i}.png")
    ds = ImageDataset(tmp_path / "d", "cifar10", labels="parent", classes=CIFAR10_CLASSES)
    assert ds.labels.tolist() == [5, 5, CAT, CAT] and ds.classes == list(CIFAR10_CLASSES)   # Dog/ lists first
    assert ImageDataset(tmp_path / "d", "cifar10", labels="parent").classes == ["Dog", "cat"]  # no classes: sorted
    make_image(tmp_path / "d" / "zebra" / "0.png")
    with pytest.raises(ValueError, match=r"folder 'zebra' \(e.g. 'zebra/0.png'\) .* not a class of the model"):
        ImageDataset(tmp_path / "d", "cifar10", labels="parent", classes=CIFAR10_CLASSES)


def test_wnids_map_to_the_models_classes(tmp_path, make_image):
    wnids = imagenet_wnids()
    make_image(tmp_path / "in" / wnids[7] / "ILSVRC2012_val_00000001.png")         # the usual val layout
    make_image(tmp_path / "in" / f"{wnids[3]}_x.png")                               # WNID in the file name
    ds = ImageDataset(tmp_path / "in", "cifar10", labels="wnid", classes=wnids)
    assert sorted(ds.labels.tolist()) == [3, 7]
    subset = [wnids[7], wnids[3]]                                                   # a model with 2 classes
    assert sorted(ImageDataset(tmp_path / "in", "cifar10", labels="wnid", classes=subset).labels.tolist()) == [0, 1]
    with pytest.raises(ValueError, match=wnids[3]):
        ImageDataset(tmp_path / "in", "cifar10", labels="wnid", classes=[wnids[7]])


# ----------------------------------------------------------------------------- the CLI

def _always_cat(ws):  # noqa: F811
    """resnet20_cifar10 weights whose prediction is always "cat"; and the images as a zip of cat/ and dog/."""
    model = ZOO["resnet20_cifar10"].build()
    with torch.no_grad():
        model.linear.weight.zero_()
        model.linear.bias.zero_()
        model.linear.bias[CAT] = 5.0
    torch.save(model.state_dict(), ws / "cat.pt")
    with zipfile.ZipFile(ws / "catdog.zip", "w") as zf:
        for p in sorted((ws / "imgs").rglob("*.png")):
            zf.write(p, p.relative_to(ws / "imgs").as_posix())
    return "cat.pt", "catdog.zip"


def _copy(ws, name: str) -> str:
    """The same file under another name: compress refuses one path for both --data and --eval-data."""
    (ws / f"eval-{name}").write_bytes((ws / name).read_bytes())
    return f"eval-{name}"


def test_cat_dog_zip_on_a_cifar_zoo_model(ws, capsys):  # noqa: F811
    weights, data = _always_cat(ws)
    rc, out, err = run(capsys, "eval", "--model", "resnet20_cifar10", "--weights", weights, "--data", data, "--json")
    assert rc == 0, err
    assert json.loads(out)["top1"] == 50.0                   # all 8 cats right; sorted folders would give 0.0

    rc, out, err = run(capsys, "compress", "--model", "resnet20_cifar10", "--weights", weights, "--data", data,
                       "--fast", "--calib-images", "16", "--em-iters", "2", "--eval-data", _copy(ws, data),
                       "--out", "r20.bitdown", "--json")
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["teacher_top1"] == 50.0 and res["top1"] == 50.0 and res["drop"] == 0.0
    rc, out, err = run(capsys, "eval", "r20.bitdown", "--data", data, "--json")
    assert rc == 0, err
    assert json.loads(out)["top1"] == 50.0                   # a file: its zoo name gives the classes


def test_unknown_folder_is_an_error(ws, capsys, make_image):  # noqa: F811
    weights, _ = _always_cat(ws)
    make_image(ws / "imgs" / "zebra" / "0.png", size=(32, 32))
    rc, out, err = run(capsys, "eval", "--model", "resnet20_cifar10", "--weights", weights, "--data", "imgs")
    assert_error(rc, err, "'zebra'", "not a class of the model", "airplane")


def test_classes_flag_for_a_user_model(ws, capsys, caplog, monkeypatch):  # noqa: F811
    import importlib
    import sys

    sys.modules.pop(SPEC.split(":")[0], None)
    model = importlib.import_module(SPEC.split(":")[0]).build()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))           # always output 2
    torch.save(model.state_dict(), ws / "w.pt")
    base = ["eval", "--model", SPEC, "--weights", "w.pt", "--preprocess", "cifar10", "--data", "imgs", "--json"]
    rc, out, err = run(capsys, *base)
    assert rc == 0 and json.loads(out)["top1"] == 0.0 and "sorted folder names" in caplog.text   # cat=0, dog=1
    rc, out, err = run(capsys, *base, "--classes", "bird,cat,dog")
    assert rc == 0 and json.loads(out)["top1"] == 50.0                                          # dog=2
    (ws / "classes.txt").write_text("bird\ncat\ndog\n")
    rc, out, err = run(capsys, *base, "--classes", "classes.txt")
    assert rc == 0 and json.loads(out)["top1"] == 50.0
    rc, out, err = run(capsys, *base, "--classes", "cat,dog")
    assert_error(rc, err, "3 outputs but 2 class names")
    rc, out, err = run(capsys, *base, "--classes", "cat,cat,dog")
    assert_error(rc, err, "more than once")

    # once the file format may record class names (serialize.ARCH_KEYS), compress --classes stores them
    monkeypatch.setattr(serialize, "ARCH_KEYS", (*serialize.ARCH_KEYS, "classes"))
    rc, out, err = run(capsys, *COMPRESS, "--weights", "w.pt", "--classes", "bird,cat,dog", "--out", "c.bitdown")
    assert rc == 0, err
    assert serialize.read(ws / "c.bitdown")[1]["arch"]["classes"] == ["bird", "cat", "dog"]
    rc, out, err = run(capsys, "eval", "c.bitdown", "--data", "imgs", "--json")
    assert rc == 0 and json.loads(out)["n"] == 16
