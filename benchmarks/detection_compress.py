"""YOLOv5n compressed to a size budget, evaluated on the 128 COCO images (issue 17).

    python benchmarks/detection_compress.py --ratios 26 [--methods alloc,gptq4] [--calib-size 320]
        [--calib-images 128] [--config JSON] [--finetune JSON] [--eval-sizes 640,320] [--tag NAME]
        [--checkpoint-root DIR] [--allocation DIR/allocation.json]

Calibration and distillation use the unlabelled ImageNet sample photos (imagenet-sample-images-256.zip,
letterboxed to --calib-size, a seeded subset of --calib-images for the statistics, all 1,000 with random
left-right flips for the distillation stream); the 128 COCO val2017 images are only ever evaluated on (mAP50-95 / mAP50 with
pycocotools at each --eval-size, YOLOv5 val settings: conf 0.001, NMS IoU 0.6).

- alloc:  bitdown's detector recipe (recipes.detector_recipe: the allocation's menu, kept layers, block
          reconstruction, distillation of the raw head maps) with --config / --finetune JSON on top, sized by
          --target-ratio R (allocate.py).
- gptqB:  the per-channel scalar baseline (every layer at B bits, first and last at 8; GPTQ error feedback,
          allocate.scalar_baseline_config) through the same pipeline; its size is what B bits give.

EM-only rows: --config '{"reconstruct": {"steps": 0}}' --finetune '{"global_steps": 0}'. Rows of several ratios in
one process share one rate-distortion sweep (the allocator keeps its table). --allocation reuses the allocation
an earlier row wrote into its --checkpoint-root folder (its "allocation_from" is that report's fingerprint), so
an EM option (e.g. {"em": {"channel_weighting": "bn"}}) is measured on the same per-layer sizes.

Every run appends a row to benchmarks/results/detection.json (a rerun of the same settings is skipped) and
rebuilds detection.md / detection.png. Compressed files go to --files (default /tmp/bitdown-det), never into
the repository.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from bitdown import compress, save  # noqa: E402
from bitdown.allocate import apply_allocation, scalar_baseline_config  # noqa: E402
from bitdown.checkpoint import fingerprint  # noqa: E402
from bitdown.compress import forward_order  # noqa: E402
from bitdown.config import QuantConfig  # noqa: E402
from bitdown.data import make_loader  # noqa: E402
from bitdown.detection import LetterboxDataset, evaluate_detection  # noqa: E402
from bitdown.finetune import FinetuneConfig  # noqa: E402
from bitdown.recipes import detector_recipe, zoo_config  # noqa: E402
from bitdown.size import size_report  # noqa: E402
from bitdown.zoo import build_model, get_entry  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ASSETS = Path(os.environ.get("BITDOWN_ASSETS", ROOT.parent / "shared" / "assets"))
COCO128 = ASSETS / "coco" / "coco128-val2017.zip"
PHOTOS = ASSETS / "imagenet" / "imagenet-sample-images-256.zip"
MODEL = "yolov5n_coco"


def machine() -> dict:
    return {"cpu_cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def teacher_maps(teacher, sizes: list[int], doc: dict) -> dict:
    cache = doc.setdefault("teacher", {})
    for s in sizes:
        if str(s) not in cache:
            res = evaluate_detection(teacher, LetterboxDataset(COCO128, size=s, labels=True), progress=False)
            cache[str(s)] = {"map50_95": res["map50_95"], "map50": res["map50"]}
    return cache


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", default="26")
    p.add_argument("--methods", default="alloc")
    p.add_argument("--calib-size", type=int, default=None, help="letterbox size of the calibration / distillation "
                                                                 "photos (default: the recipe's)")
    p.add_argument("--calib-images", type=int, default=None, help="default: the recipe's")
    p.add_argument("--config", default="{}", help="QuantConfig keys on top of the detector recipe, JSON; a JSON "
                                                  "list of such: variants run in one process (one rate-distortion "
                                                  "sweep), with --tag 'A|B|...' naming them")
    p.add_argument("--finetune", default="{}", help="FinetuneConfig keys on top of the detector recipe, JSON")
    p.add_argument("--eval-sizes", default="640")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="", help="a label for the row (e.g. what the run tests)")
    p.add_argument("--files", default="/tmp/bitdown-det", help="folder for the compressed files")
    p.add_argument("--checkpoint-root", help="per-row checkpoints here (a killed run resumes)")
    p.add_argument("--from-checkpoint", help="a checkpoint folder of an earlier row saved at the start of its global "
                                              "stage (stage 'global', step 0): only the global stage runs, with "
                                              "--finetune; the block stage it holds is what this row's settings give "
                                              "(same QuantConfig, images and seeds), so the row is the full run's")
    p.add_argument("--from-finetune", help="with --from-checkpoint: the FinetuneConfig JSON of the run that wrote it")
    p.add_argument("--allocation", help="alloc: this allocation report (allocation.json of an earlier row's "
                                         "--checkpoint-root folder) instead of a new one for --config's EM: "
                                         "separates an EM option's effect on the codes from its effect on the "
                                         "allocation (one ratio, the report's)")
    p.add_argument("--out", default=str(RESULTS / "detection.json"))
    p.add_argument("--report-only", action="store_true", help="rebuild detection.md / .png from --out and stop")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    path = Path(a.out)
    doc = json.loads(path.read_text()) if path.exists() else {"rows": []}
    if a.report_only:
        write_report(path, doc)
        return
    recipe_q, recipe_ft, recipe_data = detector_recipe()
    calib_size = a.calib_size or recipe_data["calib_size"]
    calib_images = a.calib_images or recipe_data["calib_images"]
    extra_ft = json.loads(a.finetune)
    variants = json.loads(a.config)
    variants = variants if isinstance(variants, list) else [variants]
    tags = a.tag.split("|")
    if len(tags) != len(variants):
        raise SystemExit(f"--tag: one tag per --config variant ('|'-separated), got {len(tags)} for {len(variants)}")
    sizes = [int(s) for s in a.eval_sizes.split(",")]
    teacher = build_model(MODEL)
    t_maps = teacher_maps(teacher, sizes, doc)
    Path(a.files).mkdir(parents=True, exist_ok=True)
    photos = LetterboxDataset(PHOTOS, size=calib_size)
    loader = make_loader(photos, 32, shuffle=True, seed=a.seed)
    train = LetterboxDataset(PHOTOS, size=calib_size, train=True, seed=a.seed)     # random flips
    entry = get_entry(MODEL)
    for ratio in [float(r) for r in a.ratios.split(",")]:
        for method, (extra_q, tag) in [(m, v) for m in a.methods.split(",") for v in zip(variants, tags)]:
            bits = int(method[4:]) if re.fullmatch(r"gptq\d", method) else 0
            if method != "alloc" and not bits:
                raise SystemExit(f"unknown method {method!r}: alloc or gptqB")
            qkeys = _merge({**recipe_q, "calib_images": calib_images, "seed": a.seed}, extra_q)
            ftkeys = _merge({**recipe_ft, "seed": a.seed}, extra_ft)
            key = dict(method=method, target_ratio=None if bits else ratio, calib_size=calib_size, config=qkeys,
                       finetune=ftkeys)
            if a.allocation and method == "alloc":
                key["allocation_from"] = fingerprint(json.loads(Path(a.allocation).read_text()).get("allocation"))
            if any(all(r.get(k) == v for k, v in key.items()) for r in doc["rows"]):
                print(f"skip (measured): {method} {ratio:g}x", flush=True)
                continue
            cfg = zoo_config(MODEL, **qkeys)
            target = ratio
            if bits:
                order = forward_order(teacher, photos[0][None])
                cfg = scalar_baseline_config(cfg, teacher, bits, order)
                target = None
            if a.allocation and method == "alloc":
                from budget import _given_allocation

                given = _given_allocation(Path(a.allocation), ratio, cfg.alloc_weighting, cfg.alloc_max_error,
                                          teacher, cfg)
                cfg, target = apply_allocation(cfg, given), None
            ft = FinetuneConfig.from_dict(ftkeys)
            ck = None
            if a.checkpoint_root:
                ck = Path(a.checkpoint_root) / fingerprint(key)
            if a.from_checkpoint:
                ck, ft = _continue(Path(a.from_checkpoint), Path(a.files) / "from", ft, a.from_finetune)
            t0, c0 = time.perf_counter(), time.process_time()
            q = compress(teacher, loader, cfg, arch={"name": MODEL, "source": "zoo", "preprocess": entry.preprocess},
                         finetune=ft if ft.enabled else None, train_data=train if ft.enabled else None,
                         target_ratio=target, checkpoint_dir=ck)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            name = f"y{'gptq' + str(bits) if bits else f'{ratio:g}x'}-{tag or 'run'}.bitdown"
            out_file = save(q, Path(a.files) / name)
            rep = size_report(q, q.bitdown.plans)
            maps = {}
            t1 = time.perf_counter()
            for s in sizes:
                res = evaluate_detection(q, LetterboxDataset(COCO128, size=s, labels=True), progress=False)
                maps[str(s)] = {"map50_95": res["map50_95"], "map50": res["map50"]}
            eval_s = time.perf_counter() - t1
            if a.from_checkpoint:
                key["global_stage_from"] = a.from_checkpoint
            row = dict(key, tag=tag, ratio=rep.ratio, size_mb=rep.size_mb, bytes_on_disk=out_file.stat().st_size,
                       maps=maps, teacher=t_maps, compress_wall_s=round(wall, 1), compress_cpu_s=round(cpu, 1),
                       eval_wall_s=round(eval_s, 1), threads=a.threads, file=str(out_file),
                       peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                       timings={k: round(v, 1) for k, v in q.bitdown.timings.items()},
                       reconstruct=q.bitdown.extra.get("reconstruct"),
                       global_finetune=q.bitdown.extra.get("global_finetune"),
                       layers={p.name: [p.block_size, p.n_centroids] if p.quantizer == "pq" else p.quantizer
                               for p in q.bitdown.plans},
                       kept=sorted(q.bitdown.skipped), machine=machine())
            if path.exists():                       # rows another process wrote meanwhile are kept
                doc = {**json.loads(path.read_text()), "teacher": doc.get("teacher", {})}
            doc["rows"].append(row)
            path.write_text(json.dumps(doc, indent=1) + "\n")
            print(json.dumps({k: row[k] for k in ("method", "tag", "ratio", "maps", "compress_wall_s")}), flush=True)
            write_report(path, doc)


def _continue(src: Path, dst: Path, ft: FinetuneConfig, written_by: str) -> tuple[Path, FinetuneConfig]:
    """A copy of checkpoint folder `src` (stage 'global', step 0) and a FinetuneConfig that is `ft` but presents
    itself to compress' resume fingerprint as the config of the run that wrote the checkpoint: compress then
    restores the finished block stage and runs only the global stage, with `ft`'s settings."""
    import shutil

    from safetensors import safe_open

    with safe_open(str(src / "state.safetensors"), "pt") as f:
        progress = json.loads(f.metadata()["progress"])
    if (progress["stage"], progress.get("step")) != ("global", 0):
        raise SystemExit(f"{src}: checkpoint at stage {progress['stage']} step {progress.get('step')}, not at the "
                         "start of the global stage")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    shown = FinetuneConfig.from_dict(json.loads(written_by)).to_json()

    class Continued(FinetuneConfig):
        def to_json(self) -> dict:
            return dict(shown)

    return dst, Continued(**ft.to_json())


def write_report(path: Path, doc: dict) -> None:
    rows = doc["rows"]
    lines = ["# YOLOv5n on COCO128: compression to a size budget (benchmarks/detection_compress.py)", "",
             "mAP50-95 / mAP50 (pycocotools) on the 128 COCO val2017 images, never used for calibration; "
             "calibration and distillation on the unlabelled ImageNet sample photos, letterboxed. Ratio = "
             "paper-style size vs fp32 (7.14 MB). CPU s = process CPU time of the compression (2-core x86-64 "
             "CPU shared with other jobs, torch 2.13 CPU).", ""]
    t = doc.get("teacher", {})
    lines.append("Teacher: " + ", ".join(f"{s} px {v['map50_95']:.4f} / {v['map50']:.4f}" for s, v in t.items()))
    lines += ["", "| method | tag | ratio | calib px | calib imgs | mAP50-95 @640 | mAP50 @640 | @320 | recon steps "
              "| global steps | loss | compress wall s | CPU s |", "|" + "---|" * 13]
    for r in rows:
        if r.get("allocation_from"):
            r = dict(r, tag=r["tag"] + f" (allocation given, {r['allocation_from']})")
        if r.get("global_stage_from"):
            r = dict(r, tag=r["tag"] + " (times: global stage only, block stage from a checkpoint)")
        m640, m320 = r["maps"].get("640"), r["maps"].get("320")
        lines.append(f"| {r['method']} | {r['tag']} | {r['ratio']:.1f}x | {r['calib_size']} | "
                     f"{r['config'].get('calib_images')} | {m640['map50_95']:.4f} | {m640['map50']:.4f} | "
                     if m640 else f"| {r['method']} | {r['tag']} | {r['ratio']:.1f}x | {r['calib_size']} | "
                     f"{r['config'].get('calib_images')} | - | - | ")
        lines[-1] += (f"{m320['map50_95']:.4f} | " if m320 else "- | ") + (
            f"{r['config'].get('reconstruct', {}).get('steps', 0)} | {r['finetune'].get('global_steps', 0)} | "
            f"{r['finetune'].get('loss', 'auto')} | {r['compress_wall_s']:.0f} | {r['compress_cpu_s']:.0f} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(path.with_suffix(".png"), rows, t)


def _label(r: dict) -> str:
    """A row's series in the plot: the method, its stages, the EM's channel weighting and the allocator's
    sensitivity weighting."""
    if r["method"].startswith("gptq"):
        return r["method"]
    steps = r["finetune"].get("global_steps", 0)
    bn = r["config"].get("em", {}).get("channel_weighting") == "bn"
    sens = (f", sensitivity {r['config'].get('alloc_sensitivity_loss', 'mse')}"
            if r["config"].get("alloc_weighting") == "sensitivity" else "")
    sens += ", level-normalised" if sens and r["config"].get("alloc_sensitivity_norm") == "level" else ""
    menu = f", menu {'/'.join(r['config']['alloc_menu'])}" if r["config"].get("alloc_menu") else ""
    return (("PQ, EM only" if not steps else f"PQ, recon + {steps} steps {r['finetune'].get('loss', 'auto')}")
            + (", post-BN weighted" if bn else "") + sens + menu)


def _plot(png: Path, rows: list[dict], teacher: dict) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return
    pts = [r for r in rows if "640" in r["maps"]]
    if not pts:
        return
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    series: dict[str, list[tuple[float, float]]] = {}
    for r in pts:                           # rows on a given allocation (ablations): unconnected markers
        label = _label(r) + (", allocation given" if r.get("allocation_from") else "")
        series.setdefault(label, []).append((r["ratio"], r["maps"]["640"]["map50_95"]))
    for label, xy in series.items():
        xs, ys = zip(*sorted(xy))
        style = ("s" if label.startswith("gptq") else "o") + ("" if label.endswith("given") else "-")
        ax.plot(xs, ys, style, label=label, **({"mfc": "none"} if label.endswith("given") else {}))
    if "640" in teacher:
        ax.axhline(teacher["640"]["map50_95"], color="gray", ls="--", label="teacher fp32")
        ax.axhline(0.75 * teacher["640"]["map50_95"], color="gray", ls=":", label="75 % of the teacher")
    ax.set_xlabel("compression ratio (paper-style size vs fp32)")
    ax.set_ylabel("mAP50-95, COCO128 at 640 px")
    ax.set_title("YOLOv5n compressed on unlabelled photos", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    main()
