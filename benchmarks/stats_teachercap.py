"""One teacher block run per block for the teacher-side layer inputs (issue 13, session 13; src/bitdown/teachercap.py):
is the file unchanged, and what does it save?

    python benchmarks/stats_teachercap.py cost --model efficientnet_lite0 --images 32 --repeats 3
    python benchmarks/stats_teachercap.py identity --model resnet20_cifar10 --src /tmp/main_src/src --label main@da207ec

`cost`: stats_speed.py's measurement (compress's block loop with the EM replaced by a trivial quantizer, in
units of one plain teacher forward over the same images) with the recorded teacher inputs turned off
(`teachercap.plan_capture` patched to None: the per-layer teacher runs, main's path) and on, alternated in every
repeat in one process; medians; process CPU time and wall time. It also checks that the two runs quantized the
same (the trivial quantizer's inputs: every layer's full and cross Grams bit for bit).

`identity`: the real EM-only compression (`python -m bitdown compress ... --fast`) with this checkout's code and
with the code under `--src` (e.g. main's `src` taken out with `git archive`), one run after the other, and the
sha256 of the two files. ResNet-20: `--target-ratio 20` on 1,024 CIFAR-10 training images; EfficientNet-Lite0:
`--calib-images 32` with the committed 10x menu allocation passed as name overrides (PQ, int8/4/2 and fp16 layers).

Rows go to benchmarks/results/stats_teachercap_s13.{json,md} (with the machine's load average).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from accuracy import CIFAR_TRAIN, IMAGENET, RESULTS, datasets, machine
from stats_speed import block_pass, teacher_pass

from bitdown.compress import take_images
from bitdown.data import make_loader

tc = importlib.import_module("bitdown.teachercap")
bc = importlib.import_module("bitdown.compress")
OUT = RESULTS / "stats_teachercap_s13.json"
ROOT = Path(__file__).resolve().parent.parent
ALLOC = RESULTS / "alloc_efficientnet_lite0_10_sensitivity_0.3_menu-int8-int4-int2-fp16.json"


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def cpu() -> float:
    return time.process_time()


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


class Grams:
    """Records a hash of every layer's full and cross Gram as the teacher target reads them, in quantization order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.real = bc.teacher_target_weight

    def __call__(self, weight, st, damp=0.1):
        self.calls.append((digest(st.full_gram), digest(st.cross_gram)))
        return self.real(weight, st, damp)


def timed_pass(name: str, batches: list[torch.Tensor], recorded: bool) -> tuple[float, float, Grams, int]:
    """(wall s, CPU s, Grams seen, pieces taken from the record) of stats_speed.block_pass, teacher inputs recorded
    or per layer."""
    real_plan, real_ttw, real_put = bc.plan_capture, bc.teacher_target_weight, tc.TeacherInputs.piece
    grams = Grams()
    used = [0]

    def counted(self, *a, **k):
        t = real_put(self, *a, **k)
        used[0] += t is not None
        return t
    bc.teacher_target_weight = grams
    tc.TeacherInputs.piece = counted
    if not recorded:
        bc.plan_capture = lambda *a, **k: None
    try:
        w0, c0 = time.perf_counter(), cpu()
        block_pass(name, batches)
        return time.perf_counter() - w0, cpu() - c0, grams, used[0]
    finally:
        bc.plan_capture, bc.teacher_target_weight, tc.TeacherInputs.piece = real_plan, real_ttw, real_put


def cost(a) -> None:
    calib = datasets(a.model)[0]
    batches = take_images(make_loader(calib, 128, shuffle=True, seed=0), a.images, a.batch_size)
    keys = ("teacher forward", "per layer", "recorded")
    wall: dict[str, list[float]] = {k: [] for k in keys}
    cpus: dict[str, list[float]] = {k: [] for k in keys}
    same, used, loads = True, 0, [load()]
    for _ in range(a.repeats):
        c0 = cpu()
        wall["teacher forward"].append(teacher_pass(a.model, batches))
        cpus["teacher forward"].append(cpu() - c0)
        w, c, g_old, _ = timed_pass(a.model, batches, recorded=False)
        wall["per layer"].append(w)
        cpus["per layer"].append(c)
        w, c, g_new, used = timed_pass(a.model, batches, recorded=True)
        wall["recorded"].append(w)
        cpus["recorded"].append(c)
        same = same and len(g_old.calls) > 0 and g_old.calls == g_new.calls
        loads.append(load())
        print(json.dumps({k: round(v[-1], 2) for k, v in wall.items()} | {"cpu": {k: round(v[-1], 2) for k, v in
                                                                               cpus.items()}}), flush=True)
    med = {k: statistics.median(v) for k, v in wall.items()}
    cmed = {k: statistics.median(v) for k, v in cpus.items()}
    row = dict(kind="cost", model=a.model, images=a.images, batch_size=a.batch_size, threads=torch.get_num_threads(),
               repeats=a.repeats, load=loads, pieces_recorded=used, grams_identical=same,
               wall_s=med, cpu_s=cmed,
               forwards_wall={k: med[k] / med["teacher forward"] for k in ("per layer", "recorded")},
               forwards_cpu={k: cmed[k] / cmed["teacher forward"] for k in ("per layer", "recorded")})
    save(row, ("kind", "model", "images"))


def _compress_cmd(model: str, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "bitdown", "compress", "--model", model, "--fast", "--out", str(out)]
    if model == "resnet20_cifar10":
        return cmd + ["--data", str(CIFAR_TRAIN), "--target-ratio", "20"]
    from bitdown.allocate import apply_allocation
    from bitdown.config import QuantConfig
    rep = json.loads(ALLOC.read_text())
    over = apply_allocation(QuantConfig(), rep.get("allocation", rep)).name_overrides
    return cmd + ["--data", str(IMAGENET), "--calib-images", "32",
                  "--config", json.dumps({"name_overrides": over,
                                          "alloc_menu": ["int8", "int4", "int2", "fp16"]})]


def identity(a) -> None:
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, src in ((a.label, a.src), ("this branch", str(ROOT / "src"))):
            out = Path(tmp) / f"{len(runs)}.bitdown"
            env = dict(os.environ, PYTHONPATH=src)
            l0, w0 = load(), time.perf_counter()
            r = subprocess.run(_compress_cmd(a.model, out), env=env, capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"{label}: compress failed:\n{r.stderr[-3000:]}")
            runs.append(dict(code=label, src=src, wall_s=time.perf_counter() - w0, load=[l0, load()],
                             sha256=hashlib.sha256(out.read_bytes()).hexdigest(), bytes=out.stat().st_size))
            print(json.dumps(runs[-1]), flush=True)
    cmd = " ".join(_compress_cmd(a.model, Path("OUT"))[1:])
    row = dict(kind="identity", model=a.model, command=re.sub(r"--config \S.*", "--config <allocation>", cmd),
               runs=runs, identical=runs[0]["sha256"] == runs[1]["sha256"])
    save(row, ("kind", "model"))


def save(row: dict, key: tuple[str, ...]) -> None:
    rows = json.loads(OUT.read_text())["rows"] if OUT.exists() else []
    rows = [r for r in rows if tuple(r.get(k) for k in key) != tuple(row[k] for k in key)] + [row]
    OUT.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    report(rows)


def report(rows: list[dict]) -> None:
    m = machine()
    lines = ["# One teacher block run per block (generated by benchmarks/stats_teachercap.py)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, shared with other jobs (load averages 1/5/15 min in the "
             f"rows), torch {m['torch']}.", "",
             "## Cost of the statistics pass (EM stand-in), in plain teacher forwards of the same images", "",
             "'per layer': each layer's teacher input from a teacher block run up to it (main); 'recorded': all of a "
             "block's teacher layer inputs recorded by hooks in the block's one teacher run. Alternated in one "
             "process, medians.", "",
             "| model | images | threads | repeats | teacher fwd s | per layer s (fwd) | recorded s (fwd) | CPU fwd "
             "per layer -> recorded | Grams identical | pieces recorded | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "cost":
            continue
        w, f, c = r["wall_s"], r["forwards_wall"], r["forwards_cpu"]
        lines.append(f"| {r['model']} | {r['images']} | {r['threads']} | {r['repeats']} | {w['teacher forward']:.2f} | "
                     f"{w['per layer']:.1f} ({f['per layer']:.1f}) | {w['recorded']:.1f} ({f['recorded']:.1f}) | "
                     f"{c['per layer']:.1f} -> {c['recorded']:.1f} | {r['grams_identical']} | {r['pieces_recorded']} | "
                     f"{r['load'][0]} .. {r['load'][-1]} |")
    lines += ["", "## The compressed file, this branch against the code under `src`", "",
              "| model | command | code | sha256 | bytes | wall s | load before / after | identical |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "identity":
            continue
        for run in r["runs"]:
            lines.append(f"| {r['model']} | `{r['command']}` | {run['code']} | `{run['sha256'][:16]}` | {run['bytes']} | "
                         f"{run['wall_s']:.0f} | {run['load'][0]} / {run['load'][1]} | {r['identical']} |")
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--model", default="efficientnet_lite0")
    c.add_argument("--images", type=int, default=32)
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--repeats", type=int, default=3)
    i = sub.add_parser("identity")
    i.add_argument("--model", default="resnet20_cifar10", choices=["resnet20_cifar10", "efficientnet_lite0"])
    i.add_argument("--src", required=True, help="the other code's src folder (PYTHONPATH of its run)")
    i.add_argument("--label", default="other", help="what --src is, for the report (e.g. main@da207ec)")
    a = p.parse_args()
    cost(a) if a.cmd == "cost" else identity(a)


if __name__ == "__main__":
    main()
