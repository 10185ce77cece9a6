"""Which blocks of a compressed YOLOv5n kill the boxes (issue 17): mAP with one block put back to the teacher's.

    python benchmarks/detection_sensitivity.py --file y16x.bitdown [--modes restore,only] [--blocks 1-24]
        [--groups '1-10;13-24'] [--eval-size 320] [--tag NAME] [--out benchmarks/results/detection_sensitivity.json] [--report-only]

For every block model.i with weights (Upsample / Concat blocks are skipped) of the compressed model (`--file`, a .bitdown written by detection_compress.py):
- restore: the compressed model with block i replaced by the teacher's (dense fp32 weights, its BatchNorm);
- only:    the teacher with block i replaced by the compressed one (only that block quantized);
- group:   (--groups) the compressed model with several blocks put back together (e.g. the whole neck).
mAP50-95 / mAP50 (pycocotools, YOLOv5 val settings) on the 128 COCO val2017 images at --eval-size; the
images are never used for calibration. Rows are keyed by (file, mode, block, size): a rerun skips what is
measured, so several processes with disjoint --blocks may write the same --out (the file is locked while
a row is appended). Rebuilds detection_sensitivity.md / .png next to --out.
"""
from __future__ import annotations

import argparse
import copy
import fcntl
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import bitdown  # noqa: E402
from bitdown.assets import assets_dir  # noqa: E402
from bitdown.detection import LetterboxDataset, evaluate_detection  # noqa: E402
from bitdown.zoo import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ASSETS = assets_dir()           # BITDOWN_ASSETS, else ../shared/assets beside the repo
COCO128 = ASSETS / "coco" / "coco128-val2017.zip"
MODEL = "yolov5n_coco"


def parse_blocks(text: str, n: int) -> list[int]:
    """'1-24' / '2,9,17' -> block indices, each in 1..n-1 (model.0, the fp32 stem, is not a block)."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    bad = [b for b in out if not 0 < b < n]
    if bad:
        raise SystemExit(f"blocks {bad} outside 1..{n - 1}")
    return out


def swapped(base: torch.nn.Module, donor: torch.nn.Module, blocks: list[int]) -> torch.nn.Module:
    """A copy of `base` whose model[i] for i in `blocks` are copies of `donor`'s (none: `base` as is)."""
    if not blocks:
        return base
    m = copy.deepcopy(base)
    for b in blocks:
        m.model[b] = copy.deepcopy(donor.model[b])
    return m


def append_row(path: Path, row: dict) -> None:
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = json.loads(path.read_text()) if path.exists() else {"rows": []}
        doc["rows"].append(row)
        path.write_text(json.dumps(doc, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", help="the compressed detector (.bitdown)")
    p.add_argument("--modes", default="restore", help="restore,only")
    p.add_argument("--blocks", default="1-24")
    p.add_argument("--groups", default="", help="also restore these groups of blocks together, ';'-separated "
                                                "(e.g. '1-10;13-23;13-24')")
    p.add_argument("--eval-size", type=int, default=320)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="", help="what the compressed file is (e.g. 'EM only 16x')")
    p.add_argument("--out", default=str(RESULTS / "detection_sensitivity.json"))
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args()
    path = Path(a.out)
    if a.report_only:
        write_report(path)
        return
    if not a.file:
        raise SystemExit("--file is required")
    torch.set_num_threads(a.threads)
    teacher = build_model(MODEL).eval()
    q = bitdown.load(a.file).eval()
    data = LetterboxDataset(COCO128, size=a.eval_size, labels=True)
    modes = a.modes.split(",")
    for mode in modes:
        if mode not in ("restore", "only"):
            raise SystemExit(f"unknown mode {mode!r}: restore or only")
    blocks = [b for b in parse_blocks(a.blocks, len(q.model)) if any(True for _ in q.model[b].parameters())]
    jobs = [("restore", None), ("teacher", None)] + [(m, b) for m in modes for b in blocks]  # weightless: same
    jobs += [("group", g) for g in a.groups.split(";") if g]
    for mode, block in jobs:
        key = dict(file=Path(a.file).name, mode=mode, block=block, size=a.eval_size)
        doc = json.loads(path.read_text()) if path.exists() else {"rows": []}
        if any(all(r.get(k) == v for k, v in key.items()) for r in doc["rows"]):
            continue
        if mode == "teacher":
            key["file"] = None
            if any(all(r.get(k) == v for k, v in key.items()) for r in doc["rows"]):
                continue
        chosen = ([] if block is None else parse_blocks(block, len(q.model)) if mode == "group" else [block])
        model = (teacher if mode == "teacher" else swapped(teacher, q, chosen) if mode == "only"
                 else swapped(q, teacher, chosen))
        t0 = time.perf_counter()
        res = evaluate_detection(model, data, progress=False)
        row = dict(key, tag=a.tag, name=None if block is None else f"model.{block}",
                   block_type=None if block is None or mode == "group" else type(q.model[block]).__name__,
                   map50_95=res["map50_95"], map50=res["map50"], eval_wall_s=round(time.perf_counter() - t0, 1),
                   threads=a.threads, loadavg=[round(x, 2) for x in os.getloadavg()],
                   processor=platform.processor() or platform.machine(), torch=torch.__version__,
                   command="python " + " ".join(sys.argv))
        append_row(path, row)
        print(json.dumps({k: row[k] for k in ("mode", "block", "size", "map50_95", "eval_wall_s")}), flush=True)
    write_report(path)


def write_report(path: Path) -> None:
    """detection_sensitivity.md (one table per compressed file and size) and .png (bars: mAP50-95 per block)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(path.read_text())["rows"]
    teacher = {r["size"]: r for r in rows if r["mode"] == "teacher"}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["mode"] not in ("teacher", "group"):
            groups.setdefault((r["file"], r["size"]), []).append(r)
    lines = ["# Which blocks of a compressed YOLOv5n kill the boxes (benchmarks/detection_sensitivity.py)", "",
             "mAP50-95 / mAP50 (pycocotools) on the 128 COCO val2017 images (never used for calibration). "
             "restore: the compressed model with that one block put back to the teacher's (dense fp32); only: the "
             "teacher with only that block compressed. Gain = restore - compressed model.", ""]
    fig, axes = plt.subplots(len(groups) or 1, 1, figsize=(11, 3.2 * max(1, len(groups))), squeeze=False)
    for ax, ((file, size), rs) in zip(axes[:, 0], sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1]))):
        base = next((r for r in rs if r["block"] is None), None)
        t = teacher.get(size)
        tag = next((r["tag"] for r in rs if r["tag"]), "")
        lines += [f"## {file} ({tag}), {size} px", "",
                  f"Compressed model: {base['map50_95']:.4f} / {base['map50']:.4f}" if base else "",
                  f"Teacher: {t['map50_95']:.4f} / {t['map50']:.4f}" if t else "", "",
                  "| block | type | restore mAP50-95 | gain | restore mAP50 | only mAP50-95 | only loss |",
                  "|---|---|---|---|---|---|---|"]
        blocks = sorted({r["block"] for r in rs if r["block"] is not None})
        res = {r["block"]: r for r in rs if r["mode"] == "restore" and r["block"] is not None}
        only = {r["block"]: r for r in rs if r["mode"] == "only"}
        for b in blocks:
            rr, oo = res.get(b), only.get(b)
            lines.append("| model.%d | %s | %s | %s | %s | %s | %s |" % (
                b, (rr or oo)["block_type"],
                f"{rr['map50_95']:.4f}" if rr else "-",
                f"{rr['map50_95'] - base['map50_95']:+.4f}" if rr and base else "-",
                f"{rr['map50']:.4f}" if rr else "-",
                f"{oo['map50_95']:.4f}" if oo else "-",
                f"{oo['map50_95'] - t['map50_95']:+.4f}" if oo and t else "-"))
        lines.append("")
        gs = [r for r in rows if r["mode"] == "group" and (r["file"], r["size"]) == (file, size)]
        if gs:
            lines += ["Groups of blocks restored together:", "", "| blocks | mAP50-95 | gain | mAP50 |", "|---|---|---|---|"]
            lines += [f"| {r['block']} | {r['map50_95']:.4f} | {r['map50_95'] - base['map50_95']:+.4f} | "
                      f"{r['map50']:.4f} |" for r in gs]
            lines.append("")
        xs = list(range(len(blocks)))
        ax.bar([x - 0.2 for x in xs], [res[b]["map50_95"] if b in res else 0 for b in blocks], 0.4,
               label="restore (block dense)")
        if only:
            ax.bar([x + 0.2 for x in xs], [only[b]["map50_95"] if b in only else 0 for b in blocks], 0.4,
                   label="only (block compressed)")
        if base:
            ax.axhline(base["map50_95"], color="k", ls="--", lw=1, label="compressed model")
        if t:
            ax.axhline(t["map50_95"], color="g", ls=":", lw=1, label="teacher")
        ax.set_xticks(xs, [str(b) for b in blocks])
        ax.set_xlabel("block model.i")
        ax.set_ylabel(f"mAP50-95 @{size}")
        ax.set_title(f"{file} ({tag}) at {size} px", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
