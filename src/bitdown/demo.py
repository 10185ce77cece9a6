"""`make demo`: compress the real CIFAR-10 ResNet-20 and compare it with its teacher.

Calibration and fine-tuning use the 50,000 CIFAR-10 *training* images without their labels;
top-1 is measured on the 10,000 *test* images, never seen during compression.

    python -m bitdown.demo --assets ../shared/assets [--preset small] [--global-steps 300]
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from . import compress, load, save
from .data import ImageDataset, make_loader
from .evaluate import evaluate
from .finetune import FinetuneConfig
from .recipes import zoo_config
from .size import size_report
from .zoo import build_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", default="../shared/assets")
    p.add_argument("--model", default="resnet20_cifar10")
    p.add_argument("--preset", default="small", choices=["small", "large"])
    p.add_argument("--calib-images", type=int, default=1024)
    p.add_argument("--finetune-steps", type=int, default=10, help="per-layer distillation steps")
    p.add_argument("--global-steps", type=int, default=300, help="global distillation steps")
    p.add_argument("--paper-em", action="store_true", help="the paper's EM instead of bitdown's default")
    p.add_argument("--out", default="out/demo.bitdown")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=lambda v: float(v) if "." in v else int(v), default=FinetuneConfig.holdout,
                   help="fine-tuning images kept out for the global stage's guard: a count or a fraction (0: off)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(a.seed)
    cifar = Path(a.assets) / "cifar10"
    t_start = time.perf_counter()
    teacher = build_model(a.model, "default")
    train = ImageDataset(cifar / "cifar10-train-jpeg.zip", "cifar10")                      # unlabelled
    train_aug = ImageDataset(cifar / "cifar10-train-jpeg.zip", "cifar10", train=True, seed=a.seed)
    test = ImageDataset(cifar / "cifar10-test-jpeg.zip", "cifar10", labels="parent")
    test_loader = make_loader(test, 500)

    from .config import EMConfig
    config = zoo_config(a.model, a.preset, calib_images=a.calib_images, seed=a.seed,
                        em=EMConfig.paper() if a.paper_em else EMConfig())
    ft = FinetuneConfig(layer_steps=a.finetune_steps, global_steps=a.global_steps, seed=a.seed, holdout=a.holdout)
    t0 = time.perf_counter()
    student = compress(teacher, make_loader(train, 128, shuffle=True, seed=a.seed), config,
                       arch={"name": a.model, "source": "zoo", "preprocess": "cifar10"},
                       finetune=ft if ft.enabled else None, train_data=train_aug)
    t_compress = time.perf_counter() - t0
    path = save(student, a.out)
    reloaded = load(path, frozen=True)        # evaluate what the file holds, not the in-memory model
    res_t = evaluate(teacher, test_loader, desc="teacher")
    res_s = evaluate(reloaded, test_loader, teacher=teacher, desc="compressed")
    rep = size_report(reloaded, reloaded.bitdown.plans)
    rows = {
        "model": a.model, "preset": a.preset, "teacher_top1": res_t["top1"], "compressed_top1": res_s["top1"],
        "drop": res_t["top1"] - res_s["top1"], "agreement": res_s["agreement"],
        "size_mb": rep.size_mb, "uncompressed_mb": rep.uncompressed_mb, "ratio": rep.ratio,
        "bytes_on_disk": path.stat().st_size, "compress_s": t_compress,
        "wall_s": time.perf_counter() - t_start, "calib_images": a.calib_images,
        "finetune_steps": a.finetune_steps, "global_steps": a.global_steps,
        "eval_images": res_s["n"], "threads": torch.get_num_threads(),
        "holdout": student.bitdown.extra.get("global_finetune", {}).get("holdout"),   # the global stage's guard
    }
    print(f"\nbitdown demo: {a.model}, preset {a.preset}, calibrated on unlabelled CIFAR-10 train images,"
          f" evaluated on the {res_s['n']} test images\n")
    print("| model | top-1 % | size (paper MB) | ratio | bytes on disk |")
    print("|---|---|---|---|---|")
    print(f"| teacher (fp32) | {res_t['top1']:.2f} | {rep.uncompressed_mb:.3f} | 1.0x | - |")
    print(f"| bitdown {a.preset} | {res_s['top1']:.2f} | {rep.size_mb:.4f} | {rep.ratio:.1f}x | "
          f"{path.stat().st_size:,} |")
    print(f"\ntop-1 drop {rows['drop']:.2f} pt, agreement with teacher {res_s['agreement']:.1f} %, "
          f"compression {t_compress:.0f} s, total wall time {rows['wall_s']:.0f} s "
          f"({torch.get_num_threads()} threads); file: {path}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
