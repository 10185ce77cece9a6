"""Judging a result from the CLI: `eval --model` on the uncompressed model, the compress summary with
teacher / compressed top-1, drop and agreement, `info` per-layer error / bits / bytes and `--plot`,
and a user's module:function rebuilt from the file's metadata on eval / export."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch

import bitdown
from bitdown import serialize
from bitdown.data import ImageDataset, make_loader
from bitdown.evaluate import evaluate
from test_cli import COMPRESS, MODULE, SPEC, assert_error, compressed, run, ws  # noqa: F401  (fixtures)


def _build():
    sys.modules.pop(MODULE, None)
    return importlib.import_module(MODULE).build().eval()


def _ref(model):
    return evaluate(model, make_loader(ImageDataset("imgs", "cifar10", labels="parent"), 4))


# ----------------------------------------------------------------------------- eval without a file

def test_eval_uncompressed_model(ws, capsys, caplog):  # noqa: F811
    rc, out, err = run(capsys, "eval", "--model", SPEC, "--preprocess", "cifar10", "--data", "imgs", "--json")
    assert rc == 0, err
    res = json.loads(out)
    ref = _ref(_build())
    assert res["n"] == 16 and res["top1"] == pytest.approx(ref["top1"]) and res["top5"] == pytest.approx(ref["top5"])
    assert "sorted folder names" in caplog.text              # a user model records no class names: warned

    model = _build()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))      # always class 1 = "dog" (sorted: cat, dog)
    torch.save(model.state_dict(), ws / "w.pt")
    rc, out, err = run(capsys, "eval", "--model", SPEC, "--weights", "w.pt", "--preprocess", "cifar10",
                       "--data", "imgs", "--json")
    assert rc == 0, err
    assert json.loads(out)["top1"] == 50.0                   # the weights were used


def test_eval_needs_a_file_or_a_model(ws, capsys, compressed):  # noqa: F811
    rc, out, err = run(capsys, "eval", "--data", "imgs")
    assert_error(rc, err, "FILE", "--model")
    path, _ = compressed
    rc, out, err = run(capsys, "eval", path, "--model", SPEC, "--weights", "w.pt", "--data", "imgs")
    assert_error(rc, err, "--weights")
    rc, out, err = run(capsys, "eval", "--model", SPEC, "--data", "imgs")
    assert_error(rc, err, "--preprocess")


def test_eval_file_with_architecture_flag_still_works(compressed, capsys):  # noqa: F811
    path, _ = compressed
    rc, out, err = run(capsys, "eval", path, "--model", SPEC, "--data", "imgs", "--json")
    assert rc == 0, err
    assert "rebuilt the architecture" not in err


# ----------------------------------------------------------------------------- compress summary

def test_compress_summary_judges_the_result(ws, capsys):  # noqa: F811
    rc, out, err = run(capsys, *COMPRESS, "--out", "j.bitdown", "--eval-data", "eval_imgs")
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    teacher = _ref(_build())["top1"]
    q = bitdown.load(ws / "j.bitdown", _build())
    assert res["teacher_top1"] == pytest.approx(teacher)
    assert res["top1"] == pytest.approx(_ref(q)["top1"])
    assert res["drop"] == pytest.approx(res["teacher_top1"] - res["top1"])
    ref = evaluate(q, make_loader(ImageDataset("imgs", "cifar10", labels="parent"), 4), teacher=_build())
    assert res["agreement"] == pytest.approx(ref["agreement"]) and res["eval_images"] == 16

    rc, out, err = run(capsys, *[a for a in COMPRESS if a != "--json"], "--out", "t.bitdown", "--eval-data", "eval_imgs")
    assert rc == 0, err
    for key in ("teacher_top1", "top1", "drop", "agreement"):
        assert f"{key}:" in out, out


# ----------------------------------------------------------------------------- info

def test_info_per_layer_error_bits_and_bytes(compressed, capsys):  # noqa: F811
    path, summary = compressed
    rc, out, err = run(capsys, "info", path, "--json")
    assert rc == 0, err
    info = json.loads(out)
    _, meta = serialize.read(path)
    per = info["per_layer"]
    assert list(per) == [p["name"] for p in info["layers"]]
    for p in info["layers"]:
        s = per[p["name"]]
        assert s["rel_error"] == pytest.approx(meta["em"][p["name"]]["rel_error"])
        n = 1
        for d in p["weight_shape"]:
            n *= d
        assert s["bits_per_weight"] == pytest.approx(8 * s["bytes"] / n)
        assert s["bytes"] == pytest.approx(s["index_bytes"] + s["codebook_bytes"])
    other = info["other_bytes"]
    assert other + sum(s["bytes"] for s in per.values()) == pytest.approx(info["size_bytes"])

    rc, text, err = run(capsys, "info", path)
    assert rc == 0, err
    assert "rel.err" in text and "bits/w" in text
    line = next(x for x in text.splitlines() if x.strip().startswith("conv2"))
    assert f"{per['conv2']['rel_error']:.4f}" in line and f"{per['conv2']['bits_per_weight']:.3f}" in line


def test_info_plot(compressed, capsys, ws, monkeypatch):  # noqa: F811
    pytest.importorskip("matplotlib")
    path, _ = compressed
    rc, out, err = run(capsys, "info", path, "--plot", "layers.png")
    assert rc == 0, err
    assert (ws / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)       # as if matplotlib were not installed
    rc, out, err = run(capsys, "info", path, "--plot", "again.png")
    assert_error(rc, err, "--plot needs matplotlib", "pip install")
    assert not (ws / "again.png").exists()
    rc, out, err = run(capsys, "info", path, "--plot", str(ws))
    assert_error(rc, err, "is a directory")


# ----------------------------------------------------------------------------- a user's model, rebuilt

def test_user_model_rebuilt_from_the_file(compressed, capsys, ws):  # noqa: F811
    path, _ = compressed
    assert serialize.read(path)[1]["arch"] == {"name": SPEC, "source": "user", "preprocess": "cifar10"}
    sys.modules.pop(MODULE, None)
    rc, out, err = run(capsys, "eval", path, "--data", "imgs", "--json")
    assert rc == 0, err
    assert f"rebuilt the architecture with {SPEC}" in err
    assert json.loads(out)["top1"] == pytest.approx(_ref(bitdown.load(path, _build()))["top1"])


def test_user_model_rebuilt_for_export(compressed, capsys, ws):  # noqa: F811
    pytest.importorskip("onnx")
    path, _ = compressed
    rc, out, err = run(capsys, "export", path, "--out", "m.onnx", "--no-check", "--json")
    assert rc == 0, err
    assert f"rebuilt the architecture with {SPEC}" in err and (ws / "m.onnx").stat().st_size > 0


def test_recorded_stdlib_or_odd_names_are_not_imported():
    from bitdown.cli import _reimportable

    assert _reimportable("mypkg.models:build") and _reimportable(SPEC)
    for spec in ("os:getcwd", "subprocess:run", "builtins:print", "a b:c", "mod:fn()", "x", None, "__main__:f"):
        assert not _reimportable(spec), spec
