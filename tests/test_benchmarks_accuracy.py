"""Fast checks of benchmarks/accuracy.py's bookkeeping (no model is run): unknown methods are refused
before anything is read or written, and --merge adds only the rows a results file lacks."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import accuracy  # noqa: E402

ROW = dict(model="m", method="bitdown", preset="small", layer_steps=0, global_steps=0, calib_images=8, top1=50.0,
           agreement=60.0, size_mb=0.1, ratio=10.0, bytes_on_disk=1000, wall_s=1.0, ft_images=0, n_eval=10, drop=1.0)


def test_unknown_method_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "acc.json"
    monkeypatch.setattr(sys, "argv", ["accuracy.py", "--methods", "bitdown,foo", "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        accuracy.main()
    assert e.value.code == 2
    assert "unknown method(s) ['foo']" in capsys.readouterr().err
    assert not out.exists()


def test_merge_adds_only_missing_rows(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"machine": {}, "rows": [dict(ROW, stage="em")]}))
    b.write_text(json.dumps({"machine": {}, "rows": [dict(ROW, stage="em", top1=1.0), dict(ROW, stage="em+bn")]}))
    accuracy.merge(accuracy.Bench(a, {}), [b])
    rows = json.loads(a.read_text())["rows"]
    assert [(r["stage"], r["top1"]) for r in rows] == [("em", 50.0), ("em+bn", 50.0)]   # the row a had is kept
    assert "| m | bitdown | small | em+bn |" in (tmp_path / "a.md").read_text()
