"""Data-free images (synthesize.py): the objective falls, runs are seeded and resumable, PNGs read back as the
in-memory pixels do, bad input is refused, and `compress --data synthetic:N` plugs into the pipeline."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import bitdown
from bitdown.data import ConcatImages, ImageDataset, PixelDataset
from bitdown.synthesize import MANIFEST, SynthConfig, canvas_size, class_targets, image_name, synthesize
from bitdown.data import get_preset
from test_cli import SPEC, run, ws  # noqa: F401  (ws: the workspace fixture)


class BNNet(nn.Module):
    """A toy classifier with BatchNorm running statistics that are not those of noise."""

    def __init__(self, n_out: int = 5, spatial_out: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, n_out, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(n_out)
        self.spatial_out = spatial_out
        torch.manual_seed(0)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return x if self.spatial_out else x.mean((2, 3))


def _model(**kw) -> nn.Module:
    torch.manual_seed(0)
    return BNNet(**kw).eval()


FAST = dict(batch_size=4, steps=4, lr=0.1)


def test_objective_falls_and_pixels_are_in_range():
    m = _model()
    short = synthesize(m, 4, "cifar10", SynthConfig(batch_size=4, steps=1, lr=0.3), progress=False)
    long = synthesize(m, 4, "cifar10", SynthConfig(batch_size=4, steps=20, lr=0.3), progress=False)
    assert long.batches[0]["bn"] < 0.75 * short.batches[0]["bn"]            # 6.93 -> 4.6 when written
    assert long.images.dtype == torch.uint8 and long.images.shape == (4, 3, 32, 32)
    assert long.classes.tolist() == class_targets(4, 5, 0).tolist()
    assert all(not p.requires_grad or p.grad is None for p in m.parameters())      # the model is untouched


def test_seeded_deterministic_and_batches_independent():
    m = _model()
    a = synthesize(m, 6, "cifar10", SynthConfig(**FAST), progress=False).images
    b = synthesize(m, 6, "cifar10", SynthConfig(**FAST), progress=False).images
    c = synthesize(m, 6, "cifar10", SynthConfig(**FAST, seed=1), progress=False).images
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = synthesize(m, 4, "cifar10", SynthConfig(**FAST), progress=False).images     # batch 0 alone
    assert torch.equal(a[:4], d)


def test_class_targets_are_balanced():
    y = class_targets(40, 10, seed=3)
    assert torch.bincount(y, minlength=10).tolist() == [4] * 10
    assert sorted(y[:10].tolist()) == list(range(10))               # every block of C images holds each class


def test_folder_resume_and_png_round_trip(tmp_path):
    m = _model()
    out = tmp_path / "imgs"
    first = synthesize(m, 6, "cifar10", SynthConfig(**FAST), out=out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST] + [image_name(i) for i in range(6)])
    (out / image_name(5)).unlink()                                   # batch 1 (images 4, 5) lost
    again = synthesize(m, 6, "cifar10", SynthConfig(**FAST), out=out, progress=False)
    assert [bool(b.get("resumed")) for b in again.batches] == [True, False]
    assert torch.equal(first.images, again.images)
    for train in (False, True):                                      # the PNGs read as the in-memory pixels
        disk = ImageDataset(out, "cifar10", train=train, seed=2)
        mem = PixelDataset(first.images, "cifar10", train=train, seed=2)
        disk.set_epoch(1)
        mem.set_epoch(1)
        assert all(torch.equal(disk[i], mem[i]) for i in range(6))


def test_resize_preset_canvas_reads_back_through_the_centre_crop(tmp_path):
    """ImageNet-style presets synthesise the 256 px canvas the loader crops 224 from."""
    m = _model()
    res = synthesize(m, 1, "imagenet", SynthConfig(batch_size=1, steps=1), out=tmp_path / "i", progress=False)
    assert res.images.shape[-1] == canvas_size(get_preset("imagenet")) == 256
    disk = ImageDataset(tmp_path / "i", "imagenet")
    assert disk[0].shape == (3, 224, 224) and torch.equal(disk[0], PixelDataset(res.images, "imagenet")[0])
    # the 16 px frame the model never saw (jitter 0) is the reflection of the centre, not leftover noise
    inner = res.images[..., 16:240, 16:240].float()
    assert torch.equal(res.images.float(), torch.nn.functional.pad(inner, (16, 16, 16, 16), mode="reflect"))
    wide = synthesize(m, 1, "imagenet", SynthConfig(batch_size=1, steps=1, jitter=16), progress=False)
    w_inner = wide.images[..., 16:240, 16:240].float()          # jitter 16 reaches the whole canvas: nothing filled
    assert not torch.equal(wide.images.float(), torch.nn.functional.pad(w_inner, (16, 16, 16, 16), mode="reflect"))


def test_entropy_diversity_for_non_classifier_outputs():
    res = synthesize(_model(spatial_out=True), 4, "cifar10", SynthConfig(**FAST, w_div=0.1), progress=False)
    assert res.classes is None and res.batches[0]["div"] != 0.0
    plain = synthesize(_model(spatial_out=True), 4, "cifar10", SynthConfig(**FAST), progress=False)
    assert plain.batches[0]["div"] == plain.batches[0]["tv"] == 0.0      # default: the BatchNorm term alone (ZeroQ)
    with pytest.raises(ValueError, match="classes"):
        synthesize(_model(spatial_out=True), 4, "cifar10", SynthConfig(**FAST, diversity="classes"), progress=False)


def test_bad_input_is_refused(tmp_path):
    m = _model()
    for n in (0, -3, True, 2.5):
        with pytest.raises(ValueError, match="positive integer"):
            synthesize(m, n, "cifar10", SynthConfig(**FAST), progress=False)
    with pytest.raises(ValueError, match="BatchNorm"):
        synthesize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2)), 2, progress=False)
    broken = _model()
    with torch.no_grad():
        broken.conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        synthesize(broken, 2, "cifar10", SynthConfig(**FAST), progress=False)
    for bad in ({"steps": 0}, {"batch_size": -1}, {"lr": 0}, {"w_tv": float("nan")}, {"diversity": "x"},
                {"jitter": -1}, {"betas": [0.5]}):
        with pytest.raises(ValueError, match="SynthConfig"):
            SynthConfig.from_dict(bad)
    with pytest.raises(ValueError, match="unknown SynthConfig key"):
        SynthConfig.from_dict({"stepz": 3})
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files"):
        synthesize(m, 2, "cifar10", SynthConfig(**FAST), out=busy, progress=False)
    synthesize(m, 2, "cifar10", SynthConfig(**FAST), out=busy, overwrite=True, progress=False)
    assert (busy / "notes.txt").read_text() == "mine" and (busy / image_name(1)).exists()
    done = tmp_path / "done"
    synthesize(m, 2, "cifar10", SynthConfig(**FAST), out=done, progress=False)
    with pytest.raises(ValueError, match="other settings: n: 2 in the folder, 3 now"):   # another run's folder
        synthesize(m, 3, "cifar10", SynthConfig(**FAST), out=done, progress=False)
    with pytest.raises(ValueError, match=r"config\.w_div: 0\.1 in .*, 0\.0 now.*DeepInversion's terms: --config"):
        synthesize(m, 2, "cifar10", SynthConfig(**FAST, w_div=0.1), out=tmp_path / "old", progress=False)
        synthesize(m, 2, "cifar10", SynthConfig(**FAST), out=tmp_path / "old", progress=False)


def test_concat_images_forwards_the_epoch():
    pix = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    parts = [PixelDataset(pix, "cifar10", train=True), PixelDataset(pix, "cifar10", train=True, seed=1)]
    both = ConcatImages(parts)
    assert len(both) == 6
    both.set_epoch(4)
    assert all(p.epoch == 4 for p in parts)


# ----------------------------------------------------------------------------- CLI

SYNTH = {"batch_size": 8, "steps": 2}


def test_cli_compress_on_synthetic_and_mixed_data(ws, capsys):  # noqa: F811
    base = ["compress", "--model", SPEC, "--preprocess", "cifar10", "--calib-images", "16", "--em-iters", "3",
            "--fast", "--json", "--synth-config", json.dumps(SYNTH)]
    rc, out, err = run(capsys, *base, "--data", "synthetic:16", "--out", "s.bitdown")
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["layers"] == 3
    rc, out, err = run(capsys, *base, "--data", "imgs", "--extra-data", "synthetic:8", "--synth-cache", "cache",
                       "--out", "m.bitdown")
    assert rc == 0, err
    assert len(list((ws / "cache").glob("synth_*.png"))) == 8
    for bad in (["--data", "synthetic:0"], ["--data", "synthetic:-2"], ["--data", "synthetic:many"],
                ["--data", "synthetic:4", "--extra-data", "synthetic:4"], ["--data", "imgs", "--synth-cache", "c"],
                ["--data", "synthetic:4", "--extra-data", "imgs", "--eval-data", "imgs"]):
        rc, _, err = run(capsys, *base, *bad, "--out", "x.bitdown")
        assert rc == 2 and ("synthetic" in err or "--extra-data and --eval-data are the same" in err), err


def test_cli_synthesize_writes_pngs_and_refuses_bad_input(ws, capsys):  # noqa: F811
    common = ["synthesize", "--model", SPEC, "--preprocess", "cifar10", "--steps", "2", "--batch-size", "4"]
    rc, out, err = run(capsys, *common, "--n", "5", "--out", "syn", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["images"] == 5 and len(list((ws / "syn").glob("*.png"))) == 5
    assert len(ImageDataset(ws / "syn", "cifar10")) == 5
    for n in ("0", "-4"):
        rc, _, err = run(capsys, *common, "--n", n, "--out", "syn2")
        assert rc == 2 and "--n" in err
    rc, _, err = run(capsys, *common, "--n", "5", "--out", "imgs")              # a folder of other images
    assert rc == 2 and "other files" in err and "--overwrite" in err
    rc, _, err = run(capsys, *common, "--n", "5", "--out", "syn", "--seed", "3")  # another synthesis there
    assert rc == 2 and "other settings" in err
    rc, _, err = run(capsys, "synthesize", "--model", "bitdown_tinynet_cli:not_a_model", "--preprocess", "cifar10",
                     "--n", "2", "--out", "syn3")
    assert rc == 2 and "error:" in err


def test_public_api():
    assert bitdown.synthesize is synthesize and bitdown.SynthConfig is SynthConfig
