"""User errors are one `error:` line and exit code 2, found before any work: a device torch does not
know, an input shape the model cannot take, a model whose forward returns no logits, output paths
that cannot be written (a folder, /dev/null, /proc, a missing or read-only folder) and missing data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import bitdown.cli as cli
from test_cli import COMPRESS, SPEC, assert_error, compressed, run, ws  # noqa: F401  (fixtures)

OUTPUTS_MODULE = "bitdown_outputs_cli"
OUTPUTS_SOURCE = '''
import torch
import torch.nn as nn


class Heads(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        z = self.fc(torch.relu(self.conv(x)).mean((2, 3)))
        if self.kind == "dict":
            return {"logits": z, "aux": z}
        if self.kind == "tuple":
            return z, z
        return z[:, :, None, None]            # a 4-D map


def build_dict():
    return Heads("dict")


def build_tuple():
    return Heads("tuple")


def build_map():
    return Heads("map")


def build_gray():
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.Flatten(1), nn.LazyLinear(2))
'''


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the CLI builds a model or reads images (errors must come first)."""
    def boom(*a, **k):
        raise AssertionError("work was done before the error")

    monkeypatch.setattr(cli, "resolve_model", boom)
    monkeypatch.setattr(cli, "_data", boom)
    monkeypatch.setattr(cli, "_load_file", boom)


# ----------------------------------------------------------------------------- devices, shapes, outputs

@pytest.mark.parametrize("device", ["tpu7", "meta", "cuda:x"])
def test_unknown_device(ws, capsys, no_work, device):  # noqa: F811
    rc, out, err = run(capsys, *COMPRESS, "--out", "d.bitdown", "--device", device)
    assert_error(rc, err, "--device", repr(device))
    assert not (ws / "d.bitdown").exists()


def test_export_input_shape_that_does_not_fit(compressed, capsys, ws):  # noqa: F811
    path, _ = compressed
    rc, out, err = run(capsys, "export", path, "--model", SPEC, "--out", "m.onnx", "--input-shape", "1,1,32,32")
    assert_error(rc, err, "input shape given by --input-shape (shape 1,1,32,32) does not fit the model", "channels")
    assert not (ws / "m.onnx").exists()
    for bad in ("1x3x32x32", "0,3,32,32", "3"):
        rc, out, err = run(capsys, "export", path, "--model", SPEC, "--out", "m.onnx", "--input-shape", bad)
        assert_error(rc, err, "--input-shape")


@pytest.mark.parametrize("fn, words", [("build_dict", ["dict", "'logits'"]), ("build_tuple", ["tuple of 2"]),
                                       ("build_map", ["shape (1, 2, 1, 1)"])])
def test_eval_model_without_logits(ws, capsys, fn, words):  # noqa: F811
    (ws / f"{OUTPUTS_MODULE}.py").write_text(OUTPUTS_SOURCE)
    sys.modules.pop(OUTPUTS_MODULE, None)
    rc, out, err = run(capsys, "eval", "--model", f"{OUTPUTS_MODULE}:{fn}", "--preprocess", "cifar10", "--data", "imgs")
    assert_error(rc, err, "(N, C) class logits", *words)
    # compress --eval-data: refused before compressing
    rc, out, err = run(capsys, "compress", "--model", f"{OUTPUTS_MODULE}:{fn}", "--preprocess", "cifar10", "--fast",
                       "--data", "imgs", "--eval-data", "eval_imgs", "--out", "o.bitdown")
    assert_error(rc, err, "(N, C) class logits")
    assert not (ws / "o.bitdown").exists()
    sys.modules.pop(OUTPUTS_MODULE, None)


def test_images_the_model_cannot_take(ws, capsys):  # noqa: F811
    """A 1-channel model fed RGB images: refused before compressing, with the shape, not a traceback."""
    (ws / f"{OUTPUTS_MODULE}.py").write_text(OUTPUTS_SOURCE)
    sys.modules.pop(OUTPUTS_MODULE, None)
    spec = f"{OUTPUTS_MODULE}:build_gray"
    rc, out, err = run(capsys, "compress", "--model", spec, "--preprocess", "cifar10", "--fast", "--data", "imgs",
                       "--out", "g.bitdown")
    assert_error(rc, err, "an image of imgs preprocessed as 'cifar10' (shape 1,3,32,32) does not fit the model")
    rc, out, err = run(capsys, "eval", "--model", spec, "--preprocess", "cifar10", "--data", "imgs")
    assert_error(rc, err, "(shape 1,3,32,32) does not fit the model")
    sys.modules.pop(OUTPUTS_MODULE, None)


def test_usage_errors_exit_2(ws, capsys):  # noqa: F811
    rc, out, err = run(capsys, "compress", "--model", SPEC)                         # argparse
    assert rc == 2 and "required" in err
    rc, out, err = run(capsys, "compress", "--model", "resnet9000", "--data", "imgs", "--out", "x.bitdown")
    assert_error(rc, err, "unknown model 'resnet9000'")
    rc, out, err = run(capsys, *COMPRESS, "--out", "x.bitdown", "--config", "[1]")
    assert_error(rc, err, "--config must be a JSON object")
    rc, out, err = run(capsys, "size", "resnet9000")
    assert_error(rc, err, "unknown model 'resnet9000'")
    assert not err.startswith("error: \"")                                          # a KeyError, unquoted


# ----------------------------------------------------------------------------- paths, before any work

@pytest.mark.parametrize("target, words", [
    ("adir", ["is a directory"]),
    ("/dev/null", ["not a regular file"]),
    ("/proc/x.bitdown", ["cannot write"]),
    ("missing/x.bitdown", ["folder 'missing' does not exist"]),
    ("m.txt/x.bitdown", ["is not a folder"]),
])
def test_compress_out_refused_first(ws, capsys, no_work, target, words):  # noqa: F811
    (ws / "adir").mkdir()
    (ws / "m.txt").write_text("x")
    if target.startswith("/") and not Path(target).parent.exists():
        pytest.skip(f"{Path(target).parent} does not exist here")
    rc, out, err = run(capsys, *COMPRESS, "--out", target)
    assert_error(rc, err, "--out", *words)


def test_export_out_refused_first(compressed, capsys, no_work, ws):  # noqa: F811
    path, _ = compressed
    for target, words in ((ws, ["is a directory"]), ("/dev/null", ["not a regular file"]),
                          ("nope/m.onnx", ["does not exist"]), (path, ["is the input file"])):
        rc, out, err = run(capsys, "export", path, "--out", target)
        assert_error(rc, err, "--out", *words)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_folder_refused(ws, capsys, no_work):  # noqa: F811
    ro = ws / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, out, err = run(capsys, *COMPRESS, "--out", ro / "x.bitdown")
        assert_error(rc, err, "not writable")
    finally:
        ro.chmod(0o755)


def test_check_out_path(tmp_path, monkeypatch):
    target = tmp_path / "real.bitdown"
    target.write_bytes(b"old")
    (tmp_path / "link.bitdown").symlink_to(target)
    assert cli._check_out_path(tmp_path / "link.bitdown") == tmp_path / "link.bitdown"   # a link to a file: fine
    assert cli._check_out_path(target) == target                                           # overwriting: fine
    (tmp_path / "dangling").symlink_to("/dev/null")
    with pytest.raises(cli.UsageError, match="not a regular file"):
        cli._check_out_path(tmp_path / "dangling")
    monkeypatch.setattr(os, "access", lambda *a, **k: False)                               # a read-only folder
    with pytest.raises(cli.UsageError, match="not writable"):
        cli._check_out_path(tmp_path / "new.bitdown")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "link.bitdown", "real.bitdown"]  # no probe left


def test_missing_data_refused_first(ws, capsys, no_work):  # noqa: F811
    rc, out, err = run(capsys, *COMPRESS, "--out", "x.bitdown", "--eval-data", "nope-eval")
    assert_error(rc, err, "--eval-data nope-eval", "not found")
    rc, out, err = run(capsys, "compress", "--model", SPEC, "--data", "nope", "--out", "x.bitdown")
    assert_error(rc, err, "--data nope", "not found")
    rc, out, err = run(capsys, "eval", "m.bitdown", "--data", "nope")
    assert_error(rc, err, "--data nope", "not found")
    assert not (ws / "x.bitdown").exists()


def test_out_is_the_teacher_weights(ws, capsys, no_work):  # noqa: F811
    (ws / "w.pt").write_bytes(b"weights")
    rc, out, err = run(capsys, *COMPRESS, "--weights", "w.pt", "--out", "w.pt")
    assert_error(rc, err, "would overwrite")
    assert (ws / "w.pt").read_bytes() == b"weights"
