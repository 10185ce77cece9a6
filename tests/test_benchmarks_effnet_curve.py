"""Fast checks of benchmarks/effnet_curve.py on small fake result files (no model, no torch): rows are sorted into
the right method, a merged file's copy of a row is dropped and named, commands are the recorded or rebuilt ones,
the grid ratios without a compact-recipe point are listed, and a teacher that differs between files is refused."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import effnet_curve as ec  # noqa: E402


def budget_row(**kw) -> dict:
    row = {"model": "efficientnet_lite0", "method": "alloc", "codebook_bits": 8, "target_ratio": 10.0, "em": {},
           "reconstruct": {}, "alloc_weighting": "sensitivity", "alloc_max_error": 0.3, "mixup": 0.0,
           "alloc_menu": ["int8", "int4", "int2", "fp16"], "layer_steps": 0, "global_steps": 0, "calib_images": 128,
           "batch_size": 64, "seed": 0, "teacher_top1": 87.8, "top1": 81.6, "agreement": 88.4, "train_top1": 83.8,
           "train_agreement": 91.4, "ratio": 10.0, "bytes_on_disk": 1, "wall_s": 100.0, "device": "cpu"}
    return {**row, **kw}


def write_results(tmp: Path, teacher: float = 87.8) -> Path:
    compact = budget_row()
    s7 = budget_row(alloc_menu=[], global_steps=150, batch_size=32, top1=77.2, bytes_on_disk=2)
    blocks = budget_row(target_ratio=16.0, ratio=16.0, reconstruct={"steps": 200}, top1=50.2, bytes_on_disk=3)
    gptq = budget_row(method="gptq4", codebook_bits=None, target_ratio=None, alloc_weighting="none",
                      alloc_max_error=None, alloc_menu=[], global_steps=150, ratio=5.87, top1=86.0, bytes_on_disk=4)
    mc = budget_row(target_ratio=16.0, ratio=16.0, em={"mean_correction": True}, top1=47.4, bytes_on_disk=5)
    no_menu = budget_row(alloc_menu=[], top1=78.6, bytes_on_disk=6)
    cap02 = budget_row(target_ratio=16.0, ratio=16.0, alloc_max_error=0.2, top1=54.0, bytes_on_disk=7)
    caps = budget_row(target_ratio=20.0, ratio=20.0, alloc_max_error=[0.2, 0.3], top1=30.0, bytes_on_disk=8)
    cap015 = budget_row(target_ratio=16.0, ratio=16.0, alloc_max_error=0.15, top1=45.2, bytes_on_disk=9)
    measured = budget_row(target_ratio=18.0, ratio=18.0, alloc_max_error=list(ec.MEASURED_CAPS),
                          alloc_cap_rule="measured", alloc_cap_used=0.25, top1=40.0, bytes_on_disk=10,
                          cap_errors={"0.2": 5.0, "0.25": 4.0})
    other_model = budget_row(model="resnet20_cifar10", teacher_top1=81.03)
    (tmp / "one.json").write_text(json.dumps({"teachers": {"efficientnet_lite0": 87.8}, "rows": [compact]}))
    (tmp / "merged.json").write_text(json.dumps({"teachers": {"efficientnet_lite0": teacher},
                                                 "rows": [compact, s7, blocks, gptq, mc, no_menu, other_model,
                                                          cap02, caps, cap015, measured]}))
    (tmp / "recipe_cli.json").write_text(json.dumps([
        {"model": "efficientnet_lite0", "recipe": "compact", "seed": 0, "ratio": 16.0, "top1": 47.8,
         "agreement": 50.4, "teacher_top1": 87.8, "command": "bitdown compress --target-ratio 16"},
        {"model": "efficientnet_lite0", "recipe": "compact", "seed": 0, "ratio": 10.0, "top1": 81.8, "agreement": 89.6,
         "teacher_top1": 87.8, "tag": "cap list [0.2, 0.3] (session 14 recipe)", "command": "bitdown compress"},
        {"model": "efficientnet_lite0", "recipe": "compact", "seed": 0, "ratio": 20.0, "top1": 31.0, "agreement": 33.0,
         "teacher_top1": 87.8, "tag": "", "alloc_caps": [0.2, 0.3], "alloc_max_error": 0.3,
         "command": "bitdown compress --target-ratio 20"},
        {"model": "efficientnet_lite0", "recipe": "compact", "seed": 0, "ratio": 14.0, "top1": 70.0, "agreement": 75.0,
         "teacher_top1": 87.8, "tag": "", "alloc_caps": list(ec.MEASURED_CAPS), "alloc_cap_rule": "measured",
         "alloc_max_error": 0.2, "command": "bitdown compress --target-ratio 14"},
        {"model": "efficientnet_lite0", "recipe": "compact", "seed": 0, "ratio": 25.0, "top1": 1.0, "agreement": 1.0,
         "teacher_top1": 87.8, "tag": "", "alloc_caps": list(ec.MEASURED_CAPS), "alloc_cap_rule": "measured",
         "alloc_max_error": 0.4, "command": "bitdown compress --target-ratio 25"},
        {"model": "efficientnet_lite0", "recipe": "compact", "seed": 0, "ratio": 16.0, "top1": 50.4, "agreement": 54.2,
         "teacher_top1": 87.8, "tag": "cap 0.2 fixed", "alloc_max_error": 0.2,
         "command": "bitdown compress --target-ratio 16 --config {\"alloc_max_error\": 0.2}"},
        {"model": "efficientnet_lite0", "recipe": "compact", "seed": 0, "ratio": 16.0, "top1": 49.0, "agreement": 52.0,
         "teacher_top1": 87.8, "tag": "", "alloc_max_error": 0.25,
         "command": "bitdown compress --target-ratio 16 --config {\"alloc_max_error\": 0.25}"}]))
    (tmp / "peers.json").write_text(json.dumps({
        "runs": [{"command": "python benchmarks/peers.py --models efficientnet_lite0 --settings b4g8,b2"}],
        "rows": [{"model": "efficientnet_lite0", "method": "skm", "setting": "b4g8", "top1": 68.0, "agreement": 70.4,
                  "ratio": 7.25, "description": "4-bit LUT"},
                 {"model": "efficientnet_lite0", "method": "teacher", "setting": "fp32", "top1": 87.8,
                  "ratio": 1.0}]}))
    (tmp / "notes.json").write_text(json.dumps({"machine": {"cpu": "x"}}))     # no rows: ignored
    return tmp


def test_rows_are_grouped_deduplicated_and_cite_their_file(tmp_path):
    rows, teacher = ec.collect(write_results(tmp_path))
    assert teacher == 87.8
    by = {(r["method"], r["top1"]): r for r in rows}
    assert len(rows) == 18                                      # the merged copy of `compact` and resnet20: gone
    assert by[(ec.COMPACT_03, 81.6)]["source"] == "one.json"
    assert by[(ec.COMPACT_03, 81.6)]["also_in"] == ["merged.json"]
    assert by[(ec.COMPACT_03, 47.8)]["command"] == "bitdown compress --target-ratio 16"    # untagged CLI row: cap 0.3
    assert (ec.COMPACT, 81.8) in by and (ec.COMPACT, 31.0) in by and by[(ec.COMPACT, 54.0)]["detail"] == "budget.py, cap 0.2"
    assert "--alloc-max-error 0.2,0.3 " in by[(ec.COMPACT, 30.0)]["command"]         # a list cap, as budget.py takes it
    assert "--alloc-max-error 0.15 " in by[("other: compact recipe with cap 0.15", 45.2)]["command"]
    assert (ec.SESSION7, 77.2) in by and (ec.BLOCKS, 50.2) in by and (ec.GPTQ, 86.0) in by
    assert (ec.CML_SKM, 68.0) in by and by[(ec.CML_SKM, 68.0)]["command"].endswith("--settings b4g8,b2")
    assert by[("other: compact recipe with EM mean_correction=True", 47.4)]["seen_top1"] == 83.8
    assert ("other: compact recipe with no rate menu", 78.6) in by
    s7 = by[(ec.SESSION7, 77.2)]["command"]
    assert "--global-steps 150" in s7 and "--alloc-menu" not in s7 and "--ratios 10" in s7
    assert "--ratios" not in by[(ec.GPTQ, 86.0)]["command"]
    assert ec.missing(rows, ec.COMPACT) == [8, 12, 14, 25]
    assert by[(ec.MEASURED, 70.0)]["detail"] == "bitdown compress CLI, cap 0.2 (the only cap that fits)"
    assert by[(ec.MEASURED, 1.0)]["detail"] == "bitdown compress CLI, cap 0.4 (the only cap that fits)"
    assert by[(ec.MEASURED, 40.0)]["detail"] == "budget.py, cap 0.25 measured best"
    assert "--alloc-max-error 0.15,0.2,0.25,0.3,0.4 --alloc-cap-rule measured" in by[(ec.MEASURED, 40.0)]["command"]
    assert ec.missing(rows, ec.MEASURED) == [8, 10, 12, 16, 20]
    assert ec.missing(rows, ec.COMPACT_03) == [8, 12, 14, 20, 25]
    # a single cap given with --config (session 17): 0.2 is the cap list's pick, another cap is 'other'
    assert by[(ec.COMPACT, 50.4)]["detail"] == "bitdown compress CLI, --config alloc_max_error 0.2"
    assert ("other: compact recipe with cap 0.25", 49.0) in by


def test_md_and_png_are_written(tmp_path):
    (tmp_path / "res").mkdir()
    res = write_results(tmp_path / "res")
    rows, teacher = ec.collect(res)
    ec.write_md(rows, teacher, tmp_path / "c.md")
    text = (tmp_path / "c.md").read_text()
    assert "| one.json (also in merged.json) |" in text
    assert f"- {ec.COMPACT}: 8x, 12x, 14x, 25x" in text
    assert "GPTQ-style variants measured: gptq4" in text
    pytest.importorskip("matplotlib")
    ec.write_png(rows, teacher, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_a_teacher_that_differs_between_files_is_refused(tmp_path):
    with pytest.raises(ValueError, match="teacher top-1 differs"):
        ec.collect(write_results(tmp_path, teacher=80.0))
