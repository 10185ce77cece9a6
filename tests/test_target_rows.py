"""EMConfig.target_min_rows: the teacher-target regression only where the calibration inputs determine it (rows of X
>= target_min_rows * R); an under-determined layer (a classifier with more inputs than calibration images) quantizes
its own weight. 0 keeps the target everywhere (the behaviour before session 17)."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

import bitdown
from bitdown import QuantConfig
from bitdown.config import EMConfig
from bitdown.stats import LayerStats, target_is_determined


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).eval()


def test_target_is_determined_counts_rows_per_weight():
    st = LayerStats(block_size=4, block_grams=torch.zeros(1, 4, 4, 4), full_gram=torch.zeros(1, 16, 16), n_rows=8)
    assert not target_is_determined(st, 1.0)
    assert target_is_determined(st, 0.5) and target_is_determined(st, 0.0)
    st.n_rows = 16
    assert target_is_determined(st, 1.0)


def test_config_checks_target_min_rows():
    for bad in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="target_min_rows"):
            EMConfig(target_min_rows=bad)


def test_an_under_determined_classifier_quantizes_its_own_weight(caplog):
    """32 calibration images for a Linear of 128 inputs: no teacher target there by default (logged, no target_shift
    recorded), while the conv (32 x 16 positions for 27 weights per row) keeps it; with target_min_rows 0 both do."""
    model = net()
    x = torch.randn(32, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    cfg = dict(n_centroids=4, calib_images=32, batch_size=32, quantize_stem=True, bn_recalibrate=False,
               name_overrides={"0": {"block_size": 3}, "4": {"block_size": 4}})
    with caplog.at_level(logging.INFO, logger="bitdown.compress"):
        q = bitdown.compress(model, [x], QuantConfig(**cfg), progress=False)
    assert "target_shift" not in q.bitdown.layers["4"] and "target_shift" in q.bitdown.layers["0"]
    assert any("4: no teacher target (32 calibration input rows for 128 weights" in r.getMessage()
               for r in caplog.records)
    old = bitdown.compress(model, [x], QuantConfig(**cfg, em=EMConfig(target_min_rows=0.0)), progress=False)
    assert "target_shift" in old.bitdown.layers["4"] and old.bitdown.layers["4"]["target_shift"] > 0
    assert not torch.equal(q.get_submodule("4").weight, old.get_submodule("4").weight)
