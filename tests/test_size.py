"""Size accounting, exactly the paper's (Stock et al. 2020): the published MB figures and ratios."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from bitdown.cli import main
from bitdown.config import LayerPlan, QuantConfig, resolve_plan
from bitdown.modules import quantize_module
from bitdown.recipes import zoo_config
from bitdown.size import MB, layer_size, size_report
from bitdown.zoo import get_entry


def cli_size(capsys, arch, preset):
    assert main(["size", arch, "--preset", preset, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("arch, preset, mb", [
    ("resnet18", "small", 1.541),
    ("resnet18", "large", 1.029),
    ("resnet50", "small", 5.091),
    ("resnet50", "large", 3.184),
])
def test_paper_sizes_from_cli(capsys, arch, preset, mb):
    out = cli_size(capsys, arch, preset)
    assert out["size_mb"] == pytest.approx(mb, abs=0.002)
    assert out["ratio"] == pytest.approx(out["uncompressed_mb"] / out["size_mb"])
    assert out["skipped"] == {"conv1": "stem conv (quantize_stem=False)"}


def test_resnet18_uncompressed_is_fp32_params(capsys):
    out = cli_size(capsys, "resnet18", "small")
    assert out["uncompressed_mb"] == pytest.approx(11_689_512 * 4 / MB)


def test_cifar_resnet20_ratios(capsys):
    small = cli_size(capsys, "resnet20_cifar10", "small")
    large = cli_size(capsys, "resnet20_cifar10", "large")
    assert round(small["ratio"], 1) == 13.5
    assert round(large["ratio"], 1) == 12.3
    assert large["ratio"] < small["ratio"]


def test_size_text_output(capsys):
    assert main(["size", "resnet20_cifar10"]) == 0
    text = capsys.readouterr().out
    assert "13.5x smaller" in text and "resnet20_cifar10 (small)" in text


def test_python_api_matches_cli(capsys):
    model = get_entry("resnet20_cifar10").build()
    plans, _ = resolve_plan(model, zoo_config("resnet20_cifar10", "large"))
    rep = size_report(model, plans)
    assert rep.size_mb == pytest.approx(cli_size(capsys, "resnet20_cifar10", "large")["size_mb"])


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)                  # stem: fp32, 108 + 4 params
        self.bn = nn.BatchNorm2d(4)                     # 8 params (running stats not counted)
        self.q = nn.Conv2d(4, 64, 3, bias=False)        # 2304 weights, d = 9 -> 256 subvectors
        self.fc = nn.Linear(64, 16)                     # 1024 weights, d = 4 -> 256 subvectors, + 16 bias


def test_size_by_hand():
    model = Small()
    plans, skipped = resolve_plan(model, QuantConfig())
    assert [(p.name, p.block_size, p.n_centroids) for p in plans] == [("q", 9, 32), ("fc", 4, 32)]
    rep = size_report(model, plans)
    other = (108 + 4 + 8 + 16) * 4
    q_bytes = 256 * 5 / 8 + 32 * 9 * 2                  # 5-bit indices + fp16 codebook
    fc_bytes = 256 * 5 / 8 + 32 * 4 * 2
    assert rep.other_bytes == other
    assert rep.size_bytes == other + q_bytes + fc_bytes
    assert rep.uncompressed_bytes == other + (2304 + 1024) * 4
    assert rep.ratio == pytest.approx(rep.uncompressed_bytes / rep.size_bytes)
    ls = {layer.name: layer for layer in rep.layers}
    assert ls["q"].index_bytes == 160 and ls["q"].codebook_bytes == 576
    assert ls["q"].bits_per_weight == pytest.approx(8 * (160 + 576) / 2304)
    js = rep.to_json()
    assert js["size_mb"] == pytest.approx(rep.size_bytes / 2 ** 20) and len(js["layers"]) == 2


def test_same_size_for_compressed_model():
    model = Small()
    plans, _ = resolve_plan(model, QuantConfig())
    dense = size_report(model, plans)
    quantize_module(model.q, torch.zeros(32, 9), torch.zeros(64, 4, dtype=torch.long))
    quantize_module(model.fc, torch.zeros(32, 4), torch.zeros(16, 16, dtype=torch.long))
    assert size_report(model, plans) == dense


def test_layer_size_non_byte_codes():
    size = layer_size(LayerPlan("x", "linear", (8, 16), 4, 2))   # 32 subvectors x 1 bit
    assert size.index_bytes == 4 and size.codebook_bytes == 16 and size.n_weights == 128


def test_file_bytes_and_info_report_both_sizes(tmp_path, capsys):
    """The paper-style size and the bytes on disk, side by side: size.file_bytes and `bitdown info`."""
    import bitdown
    from bitdown.size import file_bytes
    from test_packing import random_q

    model, meta = random_q()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n = file_bytes(model, meta)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())   # nothing changed
    path = bitdown.save(model, tmp_path / "m.bitdown", metadata=meta)
    assert path.stat().st_size == n
    rep = size_report(model, [LayerPlan.from_json(p) for p in meta["layers"]])
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["file_bytes"] == info["bytes_on_disk"] == n
    assert info["paper_bytes"] == info["size_bytes"] == rep.paper_bytes == rep.size_bytes
