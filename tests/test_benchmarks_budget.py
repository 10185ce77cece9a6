"""Fast checks of benchmarks/budget.py's bookkeeping (no model is run): the error-cap list, the
training-pool option and the report's 'seen images' column."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import accuracy  # noqa: E402
import budget  # noqa: E402

ROW = dict(model="m", method="alloc", codebook_bits=8, target_ratio=20.0, layer_steps=0, global_steps=10,
           calib_images=8, batch_size=4, seed=0, top1=50.0, teacher_top1=60.0, drop=10.0, agreement=70.0,
           size_mb=0.1, ratio=20.0, bytes_on_disk=1000, wall_s=1.0)


def test_method_caps_tries_alloc_caps_in_order_others_uncapped():
    assert budget._method_caps("alloc,uniform", "0.3,0.5,none") == [
        ("alloc", 0.3), ("alloc", 0.5), ("alloc", None), ("uniform", None)]
    assert budget._method_caps("uniform,alloc", None) == [("uniform", None), ("alloc", None)]
    assert budget._method_caps("alloc", "0.25") == [("alloc", 0.25)]


def test_pool_larger_than_the_calibration_split_refused():
    with pytest.raises(ValueError, match="500 calibration images, not 600"):
        accuracy.datasets("efficientnet_lite0", pool=600)


def test_report_shows_pool_and_seen_images_top1(tmp_path):
    path = tmp_path / "b.json"
    rows = [dict(ROW), dict(ROW, train_pool=500, train_top1=97.25, top1=40.0)]
    path.write_text(json.dumps({"machine": {"cpu": "x", "cores": 2, "torch": "t"}, "teachers": {"m": 60.0},
                                "rows": rows}))
    budget.write_report(path)
    md = (tmp_path / "b.md").read_text()
    assert "| m | alloc, 500 training images | int8 | 20x |" in md
    assert "| 40.00 | 60.00 | 10.00 | 70.0 | 97.2 |" in md        # the seen-images column
    assert "| 50.00 | 60.00 | 10.00 | 70.0 | - |" in md            # not measured for the older row


def test_merge_keeps_rows_that_differ_only_in_pool(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    doc = {"machine": {"cpu": "x", "cores": 2, "torch": "t"}, "teachers": {"m": 60.0}}
    a.write_text(json.dumps(dict(doc, rows=[dict(ROW)])))
    b.write_text(json.dumps(dict(doc, rows=[dict(ROW, train_pool=500, top1=40.0)])))
    budget.merge(a, [b])
    rows = json.loads(a.read_text())["rows"]
    assert sorted((r["top1"], r.get("train_pool")) for r in rows) == [(40.0, 500), (50.0, None)]


def test_measured_cap_rule_runs_the_list_once_and_labels_the_cap_used():
    assert budget._method_caps("alloc,uniform", "0.2,0.3", "measured") == [("alloc", [0.2, 0.3]), ("uniform", None)]
    for bad in ("0.3", "0.2,none"):
        with pytest.raises(SystemExit, match="at least two caps"):
            budget._method_caps("alloc", bad, "measured")
    row = {"alloc_max_error": [0.2, 0.3], "alloc_cap_rule": "measured", "alloc_cap_used": 0.3}
    assert budget._caps(row) == "0.2/0.3 measured: 0.3" and budget._caps({"alloc_max_error": 0.2}) == "0.2"
