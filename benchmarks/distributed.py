"""Issue 14: one process at 2 threads vs 2 gloo ranks at 1 thread each, on this 2-core CPU.

Real ResNet-20 (CIFAR-10, small preset, the fast recipe's EM: int8 codebooks, teacher targets), calibration
images from the CIFAR-10 training zip; for each setting:
- the layer stage of `compress` (block inputs, per-layer statistics with their all-reduce, EM on rank 0):
  `stats_s` (sum over layers of the statistics, all-reduce included), `quantize_s` (the whole stage);
- 300 global distillation steps (batch 64 global: 32 per rank with 2 ranks) on the compressed model;
- peak RSS per rank (VmHWM), bytes all-reduced per layer (statistics) and gathered per distillation step (the
  gradient slices: every rank receives the gradient and loss of all S slices, float32).
Also the statistics bytes each ResNet-50 layer would all-reduce (the same formula, checked against the
ResNet-20 measurement), for the 8-GPU estimate in docs/DESIGN.md.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=src python benchmarks/distributed.py [--images 512 --steps 300]

Writes benchmarks/results/distributed.{json,md}. Each setting runs in fresh processes (ranks launched with
the variables torchrun sets; one process without them for the baseline).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import RESULTS, machine  # noqa: E402

SETTINGS = [{"name": "1 process x 2 threads", "ranks": 1, "threads": 2},
            {"name": "2 ranks x 1 thread", "ranks": 2, "threads": 1}]


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stats_bytes(model: torch.nn.Module, plans) -> dict[str, int]:
    """Bytes one statistics all-reduce moves per layer with the default EM (full + cross Gram, column sums, two
    counts, float64; the block Grams are the full Gram's diagonal and are not sent)."""
    modules = dict(model.named_modules())
    out = {}
    for p in plans:
        m = modules[p.name]
        g = m.groups if isinstance(m, torch.nn.Conv2d) else 1
        r = p.row_length
        out[p.name] = 8 * (2 * g * r * r + 2 * g * r + 2)
    return out


def worker(a: argparse.Namespace) -> None:
    import bitdown
    from bitdown import dist
    from bitdown.assets import assets_dir
    from bitdown.data import ImageDataset, make_loader, split_indices
    from bitdown.finetune import FinetuneConfig, finetune_global, global_params
    from bitdown.recipes import default_recipe, zoo_config
    from bitdown.zoo import build_model

    torch.set_num_threads(a.threads)
    dist.init("cpu")
    zips = assets_dir() / "cifar10"
    calib = ImageDataset(zips / "cifar10-train-jpeg.zip", "cifar10", indices=split_indices(50000, [a.images], 0)[0])
    quant, _ = default_recipe(fast=True)
    cfg = zoo_config("resnet20_cifar10", "small", **{**quant, "calib_images": a.images, "batch_size": 64})
    teacher = build_model("resnet20_cifar10")
    t0 = time.perf_counter()
    q = bitdown.compress(teacher, make_loader(calib, 64, shuffle=True, seed=0), cfg, progress=False)
    compress_s = time.perf_counter() - t0
    layer_bytes = {k[len("bytes:the statistics of layer "):].strip("'"): v for k, v in dist.COUNTERS.items()
                   if k.startswith("bytes:the statistics of layer ")}
    train = ImageDataset(zips / "cifar10-train-jpeg.zip", "cifar10", train=True, seed=0)
    ft = FinetuneConfig(global_steps=a.steps, batch_size=64, checkpoint_every=10 ** 9)
    before = dist.COUNTERS["bytes:gradient slices"]
    dist.barrier()
    t0 = time.perf_counter()
    res = finetune_global(q, teacher, train, ft, progress=False)
    ft_s = time.perf_counter() - t0
    grad_numel = sum(p.numel() for p in global_params(q, ft))
    row = {"rank": dist.rank(), "world_size": dist.world_size(), "threads": torch.get_num_threads(),
           "compress_s": compress_s, "stats_s": q.bitdown.timings["stats_s"],
           "quantize_s": q.bitdown.timings["quantize_s"],
           "em_s": sum(v.get("em_s", 0.0) for v in q.bitdown.layers.values()),
           "finetune_s": ft_s, "finetune_step_ms": 1000 * ft_s / a.steps, "last_loss": res["last_loss"],
           "peak_rss_mb": _peak_rss_mb(), "stats_bytes_per_layer": layer_bytes,
           "stats_bytes_formula": stats_bytes(teacher, q.bitdown.plans),
           "grad_bytes_per_step": (dist.COUNTERS["bytes:gradient slices"] - before) / a.steps,
           "trainable_params": grad_numel, "grad_slices": ft.grad_slices,
           "codes": {n: m.codes.flatten().tolist() for n, m in q.named_modules() if hasattr(m, "codes")}}
    rows = dist.all_gather_object(row, "the benchmark rows")
    if dist.is_main():
        Path(a.worker).write_text(json.dumps(rows))
    dist.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_setting(setting: dict, a: argparse.Namespace) -> list[dict]:
    out = Path(tempfile.mkdtemp(prefix="bitdown-dist-bench-")) / "rows.json"
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    base.update(PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS=str(setting["threads"]),
                OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    cmd = [sys.executable, __file__, "--worker", str(out), "--threads", str(setting["threads"]),
           "--images", str(a.images), "--steps", str(a.steps)]
    n, port = setting["ranks"], str(_free_port())
    envs = [base] if n == 1 else [dict(base, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for r in range(n)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=e) for e in envs]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{setting['name']}: exit codes {codes}")
    rows = json.loads(out.read_text())
    for r in rows:
        r["process_wall_s"] = time.perf_counter() - t0
    return rows


def resnet50_bytes() -> dict:
    from bitdown.config import resolve_plan
    from bitdown.finetune import FinetuneConfig, global_params
    from bitdown.recipes import zoo_config
    from bitdown.scalar import empty_like_plan
    from bitdown.zoo import build_model

    model = build_model("resnet50", None)
    plans, _ = resolve_plan(model, zoo_config("resnet50", "small"))
    per_layer = stats_bytes(model, plans)
    modules = dict(model.named_modules())
    for p in plans:
        empty_like_plan(modules[p.name], p)
    grads = sum(p.numel() for p in global_params(model, FinetuneConfig())) * 4 + 4
    return {"layers": len(plans), "stats_bytes_total": sum(per_layer.values()),
            "stats_bytes_max": max(per_layer.values()), "stats_bytes_max_layer": max(per_layer, key=per_layer.get),
            "grad_bytes_per_step": grads}


def report(rows: dict[str, list[dict]], r50: dict, a: argparse.Namespace) -> str:
    one, two = rows[SETTINGS[0]["name"]][0], rows[SETTINGS[1]["name"]]
    main = two[0]
    same = total = 0
    for name, c in one["codes"].items():
        same += sum(x == y for x, y in zip(c, main["codes"][name]))
        total += len(c)
    lines = [f"# Distributed compression on the 2-core CPU (issue 14)", "",
             f"Real ResNet-20 (small preset, fast recipe: int8 codebooks, teacher targets, EM only), {a.images} "
             f"calibration images (batches of 64), then {a.steps} global distillation steps of 64 images (2 ranks: "
             f"32 each). `PYTHONPATH=src python benchmarks/distributed.py --images {a.images} --steps {a.steps}`; "
             f"load average at the start {machine()['loadavg']}.", "",
             "| setting | rank | statistics s | layer stage s | EM s (rank 0 runs it, others wait) | 300 steps s | "
             "ms/step | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for s in SETTINGS:
        for r in rows[s["name"]]:
            lines.append(f"| {s['name']} | {r['rank']} | {r['stats_s']:.1f} | {r['quantize_s']:.1f} | {r['em_s']:.1f} | "
                         f"{r['finetune_s']:.1f} | {r['finetune_step_ms']:.0f} | {r['peak_rss_mb']:.0f} |")
    sb = main["stats_bytes_per_layer"]
    lines += ["", f"Codes identical between the two settings: {100 * same / total:.2f} % of {total}.",
              f"Statistics all-reduced: {sum(sb.values()) / 2**20:.2f} MiB over {len(sb)} layers (float64 full + "
              f"cross Gram + column sums + counts; per layer {min(sb.values()) / 1024:.1f} to "
              f"{max(sb.values()) / 1024:.1f} KiB; the formula in `stats_bytes` gives the same bytes: "
              f"{sb == {k: v for k, v in main['stats_bytes_formula'].items() if k in sb}}).",
              f"Gradient slices gathered per distillation step: {main['grad_bytes_per_step'] / 1024:.1f} KiB "
              f"({main['grad_slices']} slices x ({main['trainable_params']} codebook and BatchNorm parameters + the "
              "loss), float32).", "",
              "| layer | statistics bytes |", "|---|---|"]
    lines += [f"| {k} | {v:,} |" for k, v in sb.items()]
    lines += ["", f"ResNet-50 (small preset, same formula): {r50['layers']} layers, "
              f"{r50['stats_bytes_total'] / 2**30:.2f} GiB of statistics in all, at most "
              f"{r50['stats_bytes_max'] / 2**20:.0f} MiB for one layer ({r50['stats_bytes_max_layer']}); "
              f"{r50['grad_bytes_per_step'] / 2**20:.2f} MiB of gradients per gradient slice (x S per step)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    rows = {s["name"]: run_setting(s, a) for s in SETTINGS}
    r50 = resnet50_bytes()
    RESULTS.mkdir(exist_ok=True)
    slim = {k: [{kk: vv for kk, vv in r.items() if kk != "codes"} for r in v] for k, v in rows.items()}
    md = report(rows, r50, a)
    (RESULTS / "distributed.json").write_text(json.dumps({"machine": machine(), "images": a.images, "steps": a.steps,
                                                          "settings": slim, "resnet50": r50}, indent=1))
    (RESULTS / "distributed.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
