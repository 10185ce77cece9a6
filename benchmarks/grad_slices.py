"""Cost of gradient slices (FinetuneConfig / ReconstructConfig `grad_slices`) in one process, real ResNet-20.

Every distillation step computes its gradient as the sum of S slices of its batch, one backward each, so that
N processes (N dividing S) compute the same bits as one. This times, in one process at the given threads, the
per-layer distillation (`finetune_layer` on a first-stage and a last-stage conv: the backward runs from the
logits down to that layer) and the global distillation (`finetune_global`), batch 64, for S in 1, 2, 4, 8.
The settings are interleaved over `--rounds` rounds and each figure is the median of its rounds (the CPU is
shared with other jobs). The model: ResNet-20 compressed by the fast recipe (EM only) on `--images` images.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE PYTHONPATH=src python benchmarks/grad_slices.py

Writes benchmarks/results/grad_slices.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import RESULTS, machine  # noqa: E402

LAYERS = ("layer1.0.conv1", "layer3.2.conv2")


def compressed(images: int):
    """(teacher, EM-only student, augmented training set) for ResNet-20 on CIFAR-10."""
    import bitdown
    from bitdown.assets import assets_dir
    from bitdown.data import ImageDataset, make_loader, split_indices
    from bitdown.recipes import default_recipe, zoo_config
    from bitdown.zoo import build_model

    zips = assets_dir() / "cifar10"
    calib = ImageDataset(zips / "cifar10-train-jpeg.zip", "cifar10", indices=split_indices(50000, [images], 0)[0])
    quant, _ = default_recipe(fast=True)
    cfg = zoo_config("resnet20_cifar10", "small", **{**quant, "calib_images": images, "batch_size": 64})
    teacher = build_model("resnet20_cifar10")
    student = bitdown.compress(teacher, make_loader(calib, 64, shuffle=True, seed=0), cfg, progress=False)
    train = ImageDataset(zips / "cifar10-train-jpeg.zip", "cifar10", train=True, seed=0)
    return teacher, student, train


def time_one(kind: str, slices: int, steps: int, teacher, student, train) -> float:
    """Seconds per step of `kind` ('global' or a layer name) with `slices` gradient slices, on a copy of the
    student (the original is not trained)."""
    import copy

    from bitdown.finetune import FinetuneConfig, finetune_global, finetune_layer

    s = copy.deepcopy(student)
    if kind == "global":
        cfg = FinetuneConfig(global_steps=steps, batch_size=64, grad_slices=slices, checkpoint_every=10 ** 9)
        t0 = time.perf_counter()
        finetune_global(s, teacher, train, cfg, progress=False)
    else:
        cfg = FinetuneConfig(layer_steps=steps, batch_size=64, grad_slices=slices)
        t0 = time.perf_counter()
        finetune_layer(s, teacher, dict(s.named_modules())[kind], train, cfg)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--slices", default="1,2,4,8")
    ap.add_argument("--out", default=str(RESULTS / "grad_slices.json"))
    a = ap.parse_args()
    teacher, student, train = compressed(a.images)
    slices = [int(v) for v in a.slices.split(",")]
    kinds = [*LAYERS, "global"]
    times: dict[str, dict[int, list[float]]] = {k: {s: [] for s in slices} for k in kinds}
    for r in range(a.rounds):
        for k in kinds:
            for s in slices:
                times[k][s].append(time_one(k, s, a.steps, teacher, student, train))
                print(f"round {r} {k} S={s}: {1000 * times[k][s][-1]:.0f} ms/step", flush=True)
    med = {k: {s: statistics.median(v) for s, v in d.items()} for k, d in times.items()}
    out = {"machine": {**machine(), "note": "2-core x86 CPU, loaded by other jobs"}, "images": a.images,
           "steps": a.steps, "rounds": a.rounds, "batch_size": 64, "seconds_per_step": times, "median": med}
    Path(a.out).write_text(json.dumps(out, indent=1))
    lines = ["# Gradient slices: cost per step in one process (real ResNet-20, batch 64)", "",
             f"`benchmarks/grad_slices.py`; {torch.get_num_threads()} thread(s), 2-core x86 CPU loaded by other "
             f"jobs (load average at the end {machine()['loadavg']}); median of {a.rounds} interleaved rounds of "
             f"{a.steps} steps.", "",
             "| stage | " + " | ".join(f"S={s} ms/step" for s in slices) + " | " +
             " | ".join(f"S={s} / S=1" for s in slices[1:]) + " |",
             "|---" * (2 * len(slices)) + "|"]
    for k in kinds:
        base = med[k][slices[0]]
        lines.append(f"| {'global distillation' if k == 'global' else 'per-layer, ' + k} | "
                     + " | ".join(f"{1000 * med[k][s]:.0f}" for s in slices) + " | "
                     + " | ".join(f"{med[k][s] / base:.2f}x" for s in slices[1:]) + " |")
    Path(a.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
