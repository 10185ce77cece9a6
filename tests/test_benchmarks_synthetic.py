"""Fast checks of benchmarks/synthetic.py without running anything: its ablation rows name their whole objective
(SynthConfig's defaults changed in session 15, so no row may lean on them), and the EfficientNet-Lite0 section
reads its reference from recipe_cli.json and judges the 3 pt target from the recorded figures."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import synthetic as sb  # noqa: E402

from bitdown.synthesize import SynthConfig  # noqa: E402


def test_ablation_rows_set_every_objective_key():
    keys = {"w_div", "w_tv", "jitter", "flip"}
    configs = [SynthConfig(**cfg) for cfg in sb.ABLATION.values()]
    assert all(set(cfg) == keys for cfg in sb.ABLATION.values())
    assert len({json.dumps(asdict(c), sort_keys=True) for c in configs}) == len(configs)      # four objectives
    assert asdict(SynthConfig(**sb.ABLATION["BN only"])) == asdict(SynthConfig())        # the default since session 15
    assert SynthConfig(**sb.DEEPINVERSION).w_div > 0 and SynthConfig(**sb.DEEPINVERSION).flip


def _fake(tmp: Path, top1: float) -> Path:
    path = tmp / "eff.json"
    path.write_text(json.dumps({
        "reference_bn": {"images": 64, "real": 3726.0, "noise": 20686.0},
        "synthesis": {"command": "bitdown synthesize", "config": {"steps": 50}, "batch_size": 64, "seconds": 2000.0,
                      "seconds_per_image": 16.0, "per_batch": [{"bn": 5393.0}, {"bn": 5271.0}], "images": 128},
        "compress": {"command": "bitdown compress", "ratio": 10.0, "top1": top1, "teacher_top1": 87.8,
                     "drop": 87.8 - top1, "agreement": 86.4, "child_wall_s": 1394.0}}))
    return path


def test_effnet10_section_judges_the_target_against_recipe_cli(tmp_path, monkeypatch):
    real = sb.real_effnet10()
    assert real["model"] == "efficientnet_lite0" and real["target"] == 10 and real["recipe"] == "compact"
    monkeypatch.setattr(sb, "EFF_JSON", _fake(tmp_path, real["top1"] - 2.9))
    text = "\n".join(sb._effnet10_lines())
    assert "**met**" in text and f"| {real['top1']:.2f} |" in text and "5393, 5271" in text
    monkeypatch.setattr(sb, "EFF_JSON", _fake(tmp_path, real["top1"] - 3.1))
    assert "**missed**" in "\n".join(sb._effnet10_lines())
