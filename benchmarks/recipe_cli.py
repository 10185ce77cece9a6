"""The CLI's automatic recipe, run as a new user runs it: `bitdown compress --model M --data D --target-ratio R
--eval-data E --json` with no other flag, on the real assets, and its JSON line (held-out top-1, ratio, wall time,
recipe) appended to benchmarks/results/recipe_cli.{json,md}.

EfficientNet-Lite0: D and E are zips written into a temporary folder from the seeded 500/500 split of the 1,000
ImageNet sample images (the split every EfficientNet figure of benchmarks/ uses: calibration on the first 500,
top-1 on the other 500, never seen); the CLI then picks its recipe by itself (a depthwise conv: the compact recipe).
ResNet-20: D is the CIFAR-10 training zip, E the test zip.

    python benchmarks/recipe_cli.py --model efficientnet_lite0 --ratio 10 [--seed 0] [--out OTHER.json] [-- extra CLI flags]
    python benchmarks/recipe_cli.py --merge OTHER.json[,...]     # append runs made with their own --out
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bitdown.assets import assets_dir  # noqa: E402
from bitdown.data import _Source, split_indices  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _split_zips(src: Path, tmp: Path) -> tuple[Path, Path]:
    """(calibration zip, evaluation zip) of the seeded 500/500 split of the 1,000 ImageNet images (indices into
    the sorted names, as accuracy.py's `datasets`)."""
    names = _Source.open(src).names
    calib_idx, eval_idx = split_indices(len(names), [500, 500], seed=0)
    out = []
    with zipfile.ZipFile(src) as zin:
        for tag, idx in (("calib", calib_idx), ("eval", eval_idx)):
            path = tmp / f"imagenet-{tag}.zip"
            with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
                for i in idx:
                    zout.writestr(names[i], zin.read(names[i]))
            out.append(path)
    return out[0], out[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--ratio", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="a note for the table (what differs from the plain command)")
    p.add_argument("--out", default=str(RESULTS / "recipe_cli.json"))
    p.add_argument("--merge", help="comma-separated JSON files of other runs to append to --out (runs nothing)")
    p.add_argument("extra", nargs="*", help="extra CLI flags after --")
    a = p.parse_args()
    if a.merge:
        merge(Path(a.out), [Path(f) for f in a.merge.split(",")])
        return
    assets = assets_dir()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        if a.model.startswith("resnet") and a.model.endswith("cifar10"):
            data, ev = assets / "cifar10/cifar10-train-jpeg.zip", assets / "cifar10/cifar10-test-jpeg.zip"
            data_note = "CIFAR-10 train zip (50,000) / test zip (10,000)"
        else:
            data, ev = _split_zips(assets / "imagenet/imagenet-sample-images-256.zip", tmp)
            data_note = "ImageNet sample images, seeded 500/500 split (calibration / held-out)"
        cmd = [sys.executable, "-m", "bitdown", "compress", "--model", a.model, "--data", str(data),
               "--target-ratio", f"{a.ratio:g}", "--eval-data", str(ev), "--seed", str(a.seed),
               "--out", str(tmp / "m.bitdown"), "--json", *a.extra]
        shown = " ".join(["bitdown", *cmd[3:]]).replace(str(tmp), "$TMP").replace(str(assets), "$ASSETS")
        print(shown, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"bitdown compress failed (exit {proc.returncode})")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    row = {"model": a.model, "target": a.ratio, "seed": a.seed, "tag": a.tag, "command": shown, "data": data_note,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_1min": os.getloadavg()[0],
           "threads": os.environ.get("OMP_NUM_THREADS", "all"), "wall_s": round(wall, 1),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
           **{k: res[k] for k in ("recipe", "ratio", "size_mb", "bytes_on_disk", "top1", "teacher_top1", "drop",
                                  "agreement", "eval_images", "alloc_max_error", "cap_errors") if k in res}}
    if res.get("recipe") == "compact" and "--config" not in a.extra:     # the recipe's cap list and rule when it ran
        from bitdown.recipes import compact_recipe                      # (`alloc_max_error`: the cap used)
        quant = compact_recipe()[0]
        row["alloc_caps"] = quant["alloc_max_error"]
        row["alloc_cap_rule"] = quant.get("alloc_cap_rule", "tightest")
    out = Path(a.out)
    rows = json.loads(out.read_text()) if out.exists() else []
    rows.append(row)
    write(rows, out)
    print(json.dumps(row))


def _note(r: dict) -> str:
    """The row's tag, and for a measured error cap the one the allocation used."""
    parts = [r["tag"]] if r.get("tag") else []
    if r.get("alloc_cap_rule") == "measured" and r.get("cap_errors"):
        parts.append(f"cap {r['alloc_max_error']:g} measured best of {'/'.join(f'{c:g}' for c in r['alloc_caps'])}")
    return "; ".join(parts) or "-"


def write(rows: list[dict], out: Path) -> None:
    """The rows as out (JSON) and its .md table."""
    out.write_text(json.dumps(rows, indent=1) + "\n")
    md = ["# The CLI's automatic recipe (generated by benchmarks/recipe_cli.py)", "",
          "`bitdown compress --model M --data D --target-ratio R --eval-data E` with no method flag: the recipe is "
          "picked by the CLI (`default`, `compact` for a model with a depthwise conv, `detector`). Top-1 on images "
          "never used for calibration. Wall time of the whole command (load = 1-min load average at the end; other "
          "jobs shared the 2 cores; peak RSS of the compress process, '-': not measured then).", "",
          "| model | recipe | seed | target | ratio | bytes on disk | top-1 % | teacher % | drop (pt) | agreement % | "
          "wall s | peak RSS MB | threads | load | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r.get('recipe', '-')} | {r['seed']} | {r['target']:g}x | {r.get('ratio', 0):.2f}x | "
                  f"{r.get('bytes_on_disk', 0):,} | {r.get('top1', float('nan')):.2f} | "
                  f"{r.get('teacher_top1', float('nan')):.2f} | {r.get('drop', float('nan')):.2f} | "
                  f"{r.get('agreement', float('nan')):.1f} | {r['wall_s']:.0f} | {r.get('peak_rss_mb', '-')} | {r['threads']} | "
                  f"{r['load_1min']:.1f} | {_note(r)} |")
    md += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in rows]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")


def merge(out: Path, others: list[Path]) -> None:
    """Append the rows of `others` (runs given their own --out, e.g. two at once) to `out`, rebuilding its table."""
    rows = json.loads(out.read_text()) if out.exists() else []
    for o in others:
        rows += [r for r in json.loads(o.read_text()) if r not in rows]
    write(rows, out)


if __name__ == "__main__":
    main()
