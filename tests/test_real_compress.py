"""Real-asset checks of the whole pipeline (pytest -m slow): the real CIFAR-10 ResNet-20 compressed
on unlabelled training images, evaluated on 2,000 test images never used for calibration."""
from __future__ import annotations

import pytest
import torch

import bitdown
from bitdown.assets import assets_dir
from bitdown.config import EMConfig
from bitdown.data import ImageDataset, make_loader, split_indices
from bitdown.evaluate import evaluate
from bitdown.recipes import zoo_config
from bitdown.zoo import build_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cifar():
    root = assets_dir() / "cifar10"
    if not (root / "cifar10-train-jpeg.zip").exists():
        pytest.skip(f"CIFAR-10 assets not found under {root}")
    calib = ImageDataset(root / "cifar10-train-jpeg.zip", "cifar10", indices=split_indices(50000, [2048], 0)[0])
    test = ImageDataset(root / "cifar10-test-jpeg.zip", "cifar10", labels="parent",
                        indices=split_indices(10000, [2000], 0)[0])
    return make_loader(calib, 128, shuffle=True, seed=0), make_loader(test, 500)


def _compress(calib, em: EMConfig) -> torch.nn.Module:
    teacher = build_model("resnet20_cifar10")
    cfg = zoo_config("resnet20_cifar10", "small", calib_images=512, em=em, bn_images=2048)
    return bitdown.compress(teacher, calib, cfg, arch={"name": "resnet20_cifar10", "source": "zoo",
                                                        "preprocess": "cifar10"}, progress=False)


def test_resnet20_small_default_beats_paper_em(cifar, tmp_path):
    calib, test = cifar
    ours = _compress(calib, EMConfig())
    paper = _compress(calib, EMConfig.paper())
    top_ours = evaluate(ours, test)["top1"]
    top_paper = evaluate(paper, test)["top1"]
    # measured ~78 % (teacher targets, EM only) vs ~53 % (paper EM + BN) on 10k test images (teacher 81 %)
    # at 13.5x: require a clear margin, not the exact figure
    assert top_ours >= 65.0, top_ours
    assert top_ours >= top_paper + 8.0, (top_ours, top_paper)
    # the file holds exactly the evaluated model
    path = bitdown.save(ours, tmp_path / "r20.bitdown")
    again = bitdown.load(path)
    assert evaluate(again, test)["top1"] == top_ours
    assert bitdown.size_report(again, again.bitdown.plans).ratio == pytest.approx(13.53, abs=0.01)
