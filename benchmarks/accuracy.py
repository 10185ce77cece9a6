"""Accuracy benchmark: bitdown (EM only, + per-layer FT, + global FT) against weight-space PQ and
per-channel scalar quantization, on the real models and images of ../shared/assets.

    python benchmarks/accuracy.py [--models resnet20_cifar10,resnet56_cifar10,efficientnet_lite0]
                                  [--presets small,large] [--layer-steps 20] [--global-steps 600]

- CIFAR ResNet-20/56: calibration and fine-tuning on the 50,000 CIFAR-10 training images (labels
  never read), top-1 on the 10,000 test images.
- EfficientNet-Lite0: a fixed seeded 500/500 split (seed 0) of the 1,000 ImageNet sample images:
  calibration/fine-tuning on the first 500, top-1 on the other 500.

Rows are appended to benchmarks/results/accuracy.json as they finish (a rerun skips rows already
measured with the same settings), then accuracy.md and accuracy.png are rebuilt from the JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import torch

from bitdown import compress, recalibrate_bn, save
from bitdown.baselines import scalar_quantize_, scalar_size_bytes
from bitdown.compress import take_images
from bitdown.config import EMConfig, resolve_plan
from bitdown.data import ImageDataset, make_loader, split_indices
from bitdown.evaluate import evaluate
from bitdown.finetune import FinetuneConfig, finetune_global
from bitdown.modules import round_codebooks_
from bitdown.recipes import zoo_config
from bitdown.size import size_report
from bitdown.zoo import build_model, get_entry

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ASSETS = Path(os.environ.get("BITDOWN_ASSETS", ROOT.parent / "shared" / "assets"))


CIFAR_TRAIN, CIFAR_TEST = ASSETS / "cifar10/cifar10-train-jpeg.zip", ASSETS / "cifar10/cifar10-test-jpeg.zip"
IMAGENET = ASSETS / "imagenet/imagenet-sample-images-256.zip"


def _pool_indices(name: str, pool: int | None) -> list[int]:
    """The training images a run with `pool` calibrates and fine-tunes on, as indices of the source: CIFAR a
    fixed seeded subset of the 50,000 (all of them, permuted, for None), EfficientNet the first `pool` of
    its 500 calibration images (the seeded 500/500 split of the 1,000)."""
    if get_entry(name).preprocess == "cifar10":
        return split_indices(50000, [pool or 50000], seed=0)[0]
    calib_idx = split_indices(1000, [500, 500], seed=0)[0]
    if pool is not None and pool > len(calib_idx):
        raise ValueError(f"{name} has {len(calib_idx)} calibration images, not {pool}")
    return calib_idx[:pool or len(calib_idx)]


def datasets(name: str, seed: int = 0, pool: int | None = None):
    """(calibration, augmented training stream, labelled evaluation) datasets for a zoo model.
    pool: calibration and training use only this many training images (`_pool_indices`); None: all."""
    pre = get_entry(name).preprocess
    if pre == "cifar10":
        idx = None if pool is None else _pool_indices(name, pool)        # None: the zip's own order
        return (ImageDataset(CIFAR_TRAIN, pre, indices=idx),
                ImageDataset(CIFAR_TRAIN, pre, indices=idx, train=True, seed=seed),
                ImageDataset(CIFAR_TEST, pre, labels="parent"))
    calib_idx, eval_idx = _pool_indices(name, pool), split_indices(1000, [500, 500], seed=0)[1]
    return (ImageDataset(IMAGENET, pre, indices=calib_idx), ImageDataset(IMAGENET, pre, indices=calib_idx, train=True,
                                                                         seed=seed),
            ImageDataset(IMAGENET, pre, labels="wnid", indices=eval_idx))


def train_eval_set(name: str, pool: int | None = None, n: int = 2000) -> ImageDataset:
    """Labelled (un-augmented) training images the compression saw: at most `n` of the pool `datasets`
    calibrates and fine-tunes on. Top-1 here against top-1 on the held-out images shows over-fitting."""
    pre = get_entry(name).preprocess
    src, labels = (CIFAR_TRAIN, "parent") if pre == "cifar10" else (IMAGENET, "wnid")
    return ImageDataset(src, pre, labels=labels, indices=_pool_indices(name, pool)[:n])


class Bench:
    def __init__(self, path: Path, settings: dict):
        self.path, self.settings = path, settings
        self.rows = json.loads(path.read_text())["rows"] if path.exists() else []

    def has(self, key: dict) -> bool:
        return any(all(r.get(k) == v for k, v in key.items()) for r in self.rows)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.path.write_text(json.dumps({"machine": machine(), "rows": self.rows}, indent=1))
        print(json.dumps({k: row[k] for k in ("model", "method", "preset", "stage", "top1", "ratio")}), flush=True)


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def measure(bench: Bench, key: dict, model, teacher, eval_loader, size_mb: float, ratio: float, disk: int | None,
            wall: float, images_seen: int, extra: dict | None = None) -> dict:
    res = evaluate(model, eval_loader, teacher=teacher, desc=key["stage"])
    row = dict(key, top1=res["top1"], agreement=res.get("agreement"), size_mb=size_mb, ratio=ratio,
               bytes_on_disk=disk, wall_s=wall, ft_images=images_seen, n_eval=res["n"], **(extra or {}))
    row["drop"] = bench.teacher_top1 - res["top1"] if bench.teacher_top1 is not None else 0.0
    bench.add(row)
    return row


def disk_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as d:
        return save(model, Path(d) / "m.bitdown").stat().st_size


PQ_METHODS = ("bitdown", "bitdown_s1", "bitdown_paper_em", "weight_pq", "bitdown_fp_depthwise")


def merge(bench: Bench, others: list[Path]) -> None:
    """Add the rows of other runs' JSON files that `bench` does not have yet (same key), then rebuild
    the report. Two runs must never write the same JSON at once; this is how parallel runs meet."""
    from report_accuracy import KEY, write_report
    for other in others:
        for row in json.loads(other.read_text())["rows"]:
            key = {k: row.get(k) for k in KEY}
            if not bench.has(key):
                bench.add(row)
    write_report(bench.path)


def run_pq(bench: Bench, name: str, preset: str, method: str, data, a) -> None:
    calib, aug, ev = data
    teacher = build_model(name)
    loader = make_loader(calib, 128, shuffle=True, seed=a.seed)
    eval_loader = make_loader(ev, 250)
    em = {"bitdown": EMConfig(), "bitdown_s1": EMConfig(teacher_target=False), "bitdown_paper_em": EMConfig.paper(),
          "weight_pq": EMConfig.paper(objective="weights"), "bitdown_fp_depthwise": EMConfig()}[method]
    extra = {}
    if method == "bitdown_fp_depthwise":   # diagnostic: depthwise convs (groups == channels) left uncompressed
        extra["name_overrides"] = {re.escape(n): {"skip": True} for n, m in teacher.named_modules()
                                   if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels}
    cfg = zoo_config(name, preset, calib_images=a.calib_images, seed=a.seed, em=em, bn_recalibrate=False, **extra)
    base = dict(model=name, method=method, preset=preset, layer_steps=a.layer_steps, global_steps=a.global_steps,
                calib_images=a.calib_images)
    arch = {"name": name, "source": "zoo", "preprocess": get_entry(name).preprocess}
    ft_cfg = zoo_config(name, preset, calib_images=a.calib_images, seed=a.seed, em=em, **extra)
    reuse = None      # without per-layer FT, the FT run starts from this very model: not compressed twice
    if not bench.has(dict(base, stage="em+bn")):
        t0 = time.perf_counter()
        q = compress(teacher, loader, cfg, arch=arch)
        t_em = time.perf_counter() - t0
        rep = size_report(q, q.bitdown.plans)
        measure(bench, dict(base, stage="em"), q, teacher, eval_loader, rep.size_mb, rep.ratio, None, t_em, 0)
        if not ft_cfg.recalibrates_bn:
            reuse = (copy.deepcopy(q), t_em)
        t0 = time.perf_counter()
        recalibrate_bn(q, take_images(loader, ft_cfg.bn_images, ft_cfg.batch_size))   # as compress() does it
        measure(bench, dict(base, stage="em+bn"), q, teacher, eval_loader, rep.size_mb, rep.ratio, disk_bytes(q),
                t_em + time.perf_counter() - t0, 0)
        if ft_cfg.recalibrates_bn:
            reuse = (q, t_em + time.perf_counter() - t0)
    if (a.layer_steps == 0 and a.global_steps == 0) or method == "bitdown_paper_em":
        return
    final = "em+layer_ft+global_ft" if a.layer_steps else "em+global_ft"
    if bench.has(dict(base, stage=final)):
        return
    ft = FinetuneConfig(layer_steps=a.layer_steps, batch_size=a.batch_size, seed=a.seed)
    t0 = time.perf_counter()
    if a.layer_steps == 0 and reuse is not None:
        q, t_layer = reuse
    else:
        q = compress(teacher, loader, ft_cfg, arch=arch, finetune=ft if a.layer_steps else None, train_data=aug)
        t_layer = time.perf_counter() - t0
    rep = size_report(q, q.bitdown.plans)
    seen = a.layer_steps * a.batch_size * len(q.bitdown.plans)
    if a.layer_steps:
        measure(bench, dict(base, stage="em+layer_ft"), q, teacher, eval_loader, rep.size_mb, rep.ratio,
                disk_bytes(q), t_layer, seen)
    if a.global_steps:
        t0 = time.perf_counter()
        gft = FinetuneConfig(global_steps=a.global_steps, batch_size=a.batch_size, seed=a.seed)
        finetune_global(q, teacher, aug, gft, seed=a.seed)
        round_codebooks_(q)
        measure(bench, dict(base, stage=final), q, teacher, eval_loader, rep.size_mb, rep.ratio,
                disk_bytes(q), t_layer + time.perf_counter() - t0, seen + a.global_steps * a.batch_size)


def run_scalar(bench: Bench, name: str, bits: int, data, a) -> None:
    calib, _, ev = data
    key = dict(model=name, method=f"scalar_{bits}bit", preset="-", stage="rtn")
    if bench.has(dict(key, stage="rtn+bn")):
        return
    teacher = build_model(name)
    q = copy.deepcopy(teacher)
    plans, _ = resolve_plan(q, zoo_config(name, "small"))
    t0 = time.perf_counter()
    scalar_quantize_(q, [p.name for p in plans], bits)
    size, dense = scalar_size_bytes(q, plans, bits)
    eval_loader = make_loader(ev, 250)
    measure(bench, key, q, teacher, eval_loader, size / 2**20, dense / size, None, time.perf_counter() - t0, 0)
    recalibrate_bn(q, take_images(make_loader(calib, 128, shuffle=True, seed=a.seed), 2048, 128))
    measure(bench, dict(key, stage="rtn+bn"), q, teacher, eval_loader, size / 2**20, dense / size, None,
            time.perf_counter() - t0, 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet20_cifar10,resnet56_cifar10,efficientnet_lite0")
    p.add_argument("--presets", default="small,large")
    p.add_argument("--methods", default="bitdown,bitdown_paper_em,weight_pq,scalar",
                   help="bitdown (default EM, teacher targets), bitdown_s1 (session-1 default: no teacher targets), "
                        "bitdown_paper_em, weight_pq, scalar, bitdown_fp_depthwise (diagnostic: depthwise convs uncompressed)")
    p.add_argument("--layer-steps", type=int, default=20)
    p.add_argument("--global-steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--calib-images", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "accuracy.json"))
    p.add_argument("--merge", help="comma-separated JSON files written by other runs (--out elsewhere, run in "
                                   "parallel): their rows not yet in --out are added and the report rebuilt; "
                                   "nothing is run")
    a = p.parse_args()
    methods = a.methods.split(",")
    unknown = set(methods) - set(PQ_METHODS) - {"scalar"}
    if unknown:
        p.error(f"unknown method(s) {sorted(unknown)}; known: {', '.join(PQ_METHODS)}, scalar")
    RESULTS.mkdir(parents=True, exist_ok=True)
    bench = Bench(Path(a.out), vars(a))
    if a.merge:
        merge(bench, [Path(f) for f in a.merge.split(",")])
        return
    for name in a.models.split(","):
        data = datasets(name, a.seed)
        teacher = build_model(name)
        key = dict(model=name, method="teacher", preset="-", stage="fp32")
        t = [r for r in bench.rows if all(r.get(k) == v for k, v in key.items())]
        if t:
            bench.teacher_top1 = t[0]["top1"]
        else:
            bench.teacher_top1 = None
            n = sum(p.numel() for p in teacher.parameters()) * 4
            row = measure(bench, key, teacher, None, make_loader(data[2], 250), n / 2**20, 1.0, None, 0.0, 0)
            bench.teacher_top1 = row["top1"]
        for preset in a.presets.split(","):
            for method in PQ_METHODS:
                if method in methods:
                    run_pq(bench, name, preset, method, data, a)
        if "scalar" in methods:
            for bits in (8, 4, 2):
                run_scalar(bench, name, bits, data, a)
    from report_accuracy import write_report
    write_report(Path(a.out))


if __name__ == "__main__":
    main()
