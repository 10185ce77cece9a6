"""Cost of the statistics pass with teacher targets, in teacher forwards of the calibration set: the block
pipeline (compress's block loop: blocks replayed from cached outputs, each layer's statistics from its
block run on cached inputs) against the layer-by-layer pass it replaced (one student prefix forward and
one teacher prefix forward per layer and batch, stats.run_until / stats.capture_input).

    python benchmarks/stats_speed.py --model efficientnet_lite0 --images 128
    python benchmarks/stats_speed.py --model resnet20_cifar10 --images 256 --profile   # where the time goes

--baseline REV also times the block pipeline with StatsCollector's hook as it was at git revision REV
(only the hook is swapped: the rest is today's code), alternating with today's in every repeat.

--profile times the block pipeline once with StatsCollector's hook timed per layer kind (kxk conv, 1x1 conv,
depthwise, linear; the rest is forwards and the EM stand-in) and prints torch.profiler's top operators; it
writes nothing.

The EM is replaced by a trivial quantizer (codes 0) in both, so only forwards and Grams are timed; the
three measurements (a plain teacher forward over the images, the layer pass, the block pipeline) run
alternately --repeats times, so a background load hits all alike; medians. The statistics do not depend on
the quantizer's choice, the forwards do not depend on the weights. Writes
benchmarks/results/stats_speed.{json,md} (the session-7 rows of the windowed teacher cache are in git history).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from accuracy import RESULTS, datasets, machine

from bitdown import compress
from bitdown.compress import forward_order, take_images
from bitdown.config import resolve_plan
from bitdown.data import make_loader
from bitdown.em import EMResult
from bitdown.recipes import zoo_config
from bitdown.stats import StatsCollector, capture_input, collect_stats, run_until
from bitdown.zoo import build_model

bc = importlib.import_module("bitdown.compress")


def trivial_kmeans(weight, block_grams, n_centroids, *a, **k) -> EMResult:
    """Codes 0 and a zero codebook: no EM time."""
    d = block_grams.shape[-1]
    codes = torch.zeros(weight.shape[0], weight[0].numel() // d, dtype=torch.long)
    return EMResult(torch.zeros(n_centroids, d), codes, 0.0, [0.0], 0, 0.0)


def teacher_pass(name: str, batches: list[torch.Tensor]) -> float:
    model = build_model(name).eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            model(x)
    return time.perf_counter() - t0


def layer_pass(name: str, batches: list[torch.Tensor]) -> float:
    """The pre-session-8 pass: per layer and batch a student prefix forward and a teacher prefix forward."""
    student, teacher = build_model(name).eval(), build_model(name).eval()
    plans = resolve_plan(student, zoo_config(name, "small"), forward_order(student, batches[0][:2]))[0]
    mods, tmods = dict(student.named_modules()), dict(teacher.named_modules())
    t0 = time.perf_counter()
    for p in plans:
        with StatsCollector(p.name, mods[p.name], p.block_size, full_gram=True, cross_gram=True) as col:
            for x in batches:
                col.reference = capture_input(teacher, tmods[p.name], x)
                run_until(student, [x], mods[p.name])
    return time.perf_counter() - t0


def block_pass(name: str, batches: list[torch.Tensor]) -> float:
    """compress's block loop (no reconstruction, no fine-tuning) with the trivial quantizer."""
    real = bc.kmeans
    bc.kmeans = trivial_kmeans
    try:
        t0 = time.perf_counter()
        compress(build_model(name).eval(), [torch.cat(batches)], zoo_config(
            name, "small", calib_images=sum(x.shape[0] for x in batches), batch_size=batches[0].shape[0]),
            progress=False)
        return time.perf_counter() - t0
    finally:
        bc.kmeans = real


def hook_at(rev: str):
    """StatsCollector._hook from src/bitdown/stats.py at git revision `rev` (loaded as its own module, so it
    uses that revision's helpers)."""
    root = Path(__file__).resolve().parent.parent
    text = subprocess.run(["git", "show", f"{rev}:src/bitdown/stats.py"], cwd=root, check=True, capture_output=True,
                          text=True).stdout
    path = Path(tempfile.mkdtemp()) / "stats_baseline.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("stats_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod                      # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod.StatsCollector._hook


def with_hook(hook, fn, *args):
    """fn(*args) with StatsCollector._hook replaced by `hook`."""
    current = StatsCollector._hook
    StatsCollector._hook = hook
    try:
        return fn(*args)
    finally:
        StatsCollector._hook = current


def gram_agreement(name: str, batches: list[torch.Tensor], old_hook) -> float:
    """Largest relative difference, over the quantized layers, between the full Grams of the teacher's
    first batch collected with `old_hook` and with today's hook (float summation order only)."""
    model = build_model(name).eval()
    mods = dict(model.named_modules())
    plans = resolve_plan(model, zoo_config(name, "small"), forward_order(model, batches[0][:2]))[0]
    layers = {p.name: (mods[p.name], p.block_size) for p in plans}
    new = collect_stats(model, layers, batches[:1], full_gram=True)
    old = with_hook(old_hook, collect_stats, model, layers, batches[:1], True)
    return max(float((new[k].full_gram - old[k].full_gram).abs().max() / old[k].full_gram.abs().max()) for k in layers)


def layer_kind(module: torch.nn.Module) -> str:
    """kxk conv, 1x1 conv, depthwise (one input channel per group) or linear."""
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if module.groups > 1 and module.groups == module.in_channels:
        return "depthwise"
    return "1x1 conv" if module.kernel_size == (1, 1) else "kxk conv"


def profile(name: str, batches: list[torch.Tensor]) -> None:
    """The block pipeline once, StatsCollector's hook timed per layer kind, then torch.profiler's top ops."""
    spent: dict[str, float] = defaultdict(float)
    hook = StatsCollector._hook

    def timed(self, module, inputs):
        t0 = time.perf_counter()
        try:
            return hook(self, module, inputs)
        finally:
            spent[layer_kind(module)] += time.perf_counter() - t0

    t_teacher = teacher_pass(name, batches)
    total = with_hook(timed, block_pass, name, batches)
    print(json.dumps({"teacher forward s": round(t_teacher, 2), "block pipeline s": round(total, 2),
                      "hook s by layer kind": {k: round(v, 2) for k, v in spent.items()},
                      "rest s": round(total - sum(spent.values()), 2)}), flush=True)
    from torch.profiler import ProfilerActivity, profile as tprofile
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        block_pass(name, batches)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--skip-layer-pass", action="store_true", help="only the teacher forward and the block pipeline")
    p.add_argument("--profile", action="store_true", help="time per layer kind and top operators; writes nothing")
    p.add_argument("--baseline", help="git revision whose StatsCollector hook is timed alongside today's")
    a = p.parse_args()
    calib = datasets(a.model)[0]
    batches = take_images(make_loader(calib, 128, shuffle=True, seed=0), a.images, a.batch_size)
    if a.profile:
        return profile(a.model, batches)
    times: dict[str, list[float]] = {"teacher forward": [], "layer pass": [], "block pipeline": [],
                                     "baseline block pipeline": []}
    old_hook = hook_at(a.baseline) if a.baseline else None
    for _ in range(a.repeats):
        times["teacher forward"].append(teacher_pass(a.model, batches))
        if not a.skip_layer_pass:
            times["layer pass"].append(layer_pass(a.model, batches))
        if old_hook is not None:
            times["baseline block pipeline"].append(with_hook(old_hook, block_pass, a.model, batches))
        times["block pipeline"].append(block_pass(a.model, batches))
        print(json.dumps({k: round(v[-1], 2) for k, v in times.items() if v}), flush=True)
    row = dict(model=a.model, images=a.images, batch_size=a.batch_size, threads=torch.get_num_threads(),
               repeats=a.repeats, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               baseline=a.baseline, **{f"{k} s": statistics.median(v) if v else None for k, v in times.items()})
    if old_hook is not None:
        row["gram max rel diff vs baseline"] = gram_agreement(a.model, batches, old_hook)
        print(json.dumps({"gram max rel diff vs baseline": row["gram max rel diff vs baseline"]}), flush=True)
    path = RESULTS / "stats_speed.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = [r for r in rows if "block pipeline s" in r and (r["model"], r["images"]) != (a.model, a.images)] + [row]
    path.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    write_report(path)


def write_report(path) -> None:
    doc = json.loads(path.read_text())
    m = doc["machine"]
    lines = ["# Statistics pass in teacher forwards (generated by benchmarks/stats_speed.py)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores (2-core x86 CPU, loaded by other jobs), torch {m['torch']}. Full + cross Grams of every quantized "
             "layer (teacher targets on), the EM replaced by a trivial quantizer. 'layer pass': one student and one "
             "teacher prefix forward per layer and batch (before session 8); 'block pipeline': compress's block loop "
             "(replay from cached block outputs, statistics from each block run on its cached inputs). Costs in "
             "units of one plain teacher forward over the same images; medians of the alternated repeats. "
             "'baseline': the same block pipeline with StatsCollector's hook as it was at that git revision; "
             "'Gram diff': the largest relative difference between the two hooks' full Grams of any quantized layer "
             "on the first batch.", "",
             "| model | images | threads | repeats | teacher forward s | layer pass s (forwards) | baseline: block "
             "pipeline s (forwards) | block pipeline s (forwards) | Gram diff | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        t = r["teacher forward s"]

        def cell(key: str, label: str = "") -> str:
            v = r.get(key)
            return f"{label}{v:.1f} ({v / t:.1f})" if v else "-"
        diff = f"{r['gram max rel diff vs baseline']:.1e}" if r.get("gram max rel diff vs baseline") else "-"
        lines.append(f"| {r['model']} | {r['images']} | {r['threads']} | {r.get('repeats', 1)} | {t:.2f} | "
                     f"{cell('layer pass s')} | {cell('baseline block pipeline s', (r.get('baseline') or '') + ': ')} | "
                     f"{cell('block pipeline s')} | {diff} | "
                     f"{r['peak_rss_mb']:.0f} |")
    (path.parent / "stats_speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
