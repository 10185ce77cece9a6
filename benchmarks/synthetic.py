"""Compression without data (issue 15): ResNet-20 at 20x calibrated and fine-tuned on images synthesised from
the teacher's BatchNorm statistics, against the same recipe on real training images.

    python benchmarks/synthetic.py main        # 2,048 synthetic images, the default recipe, all 10,000 test JPEGs
    python benchmarks/synthetic.py main --tag bn_only --synth-config '{"w_div": 0, "w_tv": 0, "jitter": 0, "flip": false}' \
        --finetune-config '{"holdout": 0}'     # the same with images from other SynthConfig keys: a row of its own
    python benchmarks/synthetic.py main-fast   # the same images, EM only (--fast)
    python benchmarks/synthetic.py effnet      # EfficientNet-Lite0: seconds per synthesis step (cost only)
    python benchmarks/synthetic.py effnet10 [--n 128]   # EfficientNet-Lite0 10x, compact recipe, synthetic only
    python benchmarks/synthetic.py ablation    # loss terms at a cheaper setting: EM only (--fast), 256 images
    python benchmarks/synthetic.py report      # rewrite synthetic.md from synthetic.json

Every run goes through the CLI, in a child process at one thread (OMP_NUM_THREADS=1, as the README's figures):

    bitdown synthesize --model resnet20_cifar10 --n 2048 --out WORK/main [--config JSON]
    bitdown compress --model resnet20_cifar10 --data WORK/main --target-ratio 20 --eval-data TEST --json ...

(`--data synthetic:2048 --synth-cache WORK/main` is the same thing in one command; the two steps are kept apart
here so the synthesis is timed on its own.) The synthesis's per-batch seconds and final loss terms come from the
folder's manifest. The real-data reference is budget_pool.json's ResNet-20 20x row (80.70 %, same recipe on the
50,000 training images). Writes benchmarks/results/synthetic.{json,md} and synthetic_grid.png (the first 100
images, one row per assigned class)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ASSETS = Path(os.environ.get("BITDOWN_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
TEST = ASSETS / "cifar10" / "cifar10-test-jpeg.zip"
REAL_20X = 80.70            # budget_pool.json: ResNet-20 20x, default recipe, 50,000 real training images
OUT_JSON = RESULTS / "synthetic.json"
EFF_JSON = RESULTS / "synthetic_effnet.json"     # its own file: an EfficientNet run may overlap a ResNet-20 one

# loss-term ablation: SynthConfig keys on top of the defaults
DEEPINVERSION = {"w_div": 0.1, "w_tv": 1e-3, "jitter": None, "flip": True}    # SynthConfig's defaults before session 15
ABLATION = {                                       # every key explicit: the defaults are the BatchNorm term alone since
    "BN only": {"w_div": 0.0, "w_tv": 0.0, "jitter": 0, "flip": False},              # session 15
    "BN + CE": {"w_div": 0.1, "w_tv": 0.0, "jitter": 0, "flip": False},
    "BN + CE + TV": {"w_div": 0.1, "w_tv": 1e-3, "jitter": 0, "flip": False},
    "BN + CE + TV + jitter/flip (default)": DEEPINVERSION,    # the name the committed rows carry (default then)
}


def _bitdown(*args: str, log: Path) -> dict:
    """Run the CLI in a child process at one thread; its last stdout line is the JSON summary."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "bitdown.cli", "-v", *args]
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=f, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed (exit {proc.returncode}); see {log}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["child_wall_s"] = time.perf_counter() - t0
    out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    out["command"] = "bitdown " + " ".join(args)
    return out


def _synth(folder: Path, n: int, config: dict, log: Path, model: str = "resnet20_cifar10", *extra: str) -> dict:
    """`bitdown synthesize` of `n` images of `model` into `folder` (SynthConfig keys `config`, CLI flags `extra`), with
    each batch's final loss terms and seconds and the resolved config read back from the folder's manifest."""
    args = ["synthesize", "--model", model, "--n", str(n), "--out", str(folder), "--json", *extra]
    if config:
        args += ["--config", json.dumps(config)]
    res = _bitdown(*args, log=log)
    manifest = json.loads((folder / "bitdown-synthesize.json").read_text())
    res["per_batch"] = [manifest["batches"][k] for k in sorted(manifest["batches"], key=int)]
    res["config"] = manifest["settings"]["config"]
    return res


def _compress(folder: Path, out: Path, fast: bool, log: Path, calib_images: int | None = None,
              finetune: dict | None = None) -> dict:
    args = ["compress", "--model", "resnet20_cifar10", "--data", str(folder), "--target-ratio", "20",
            "--out", str(out), "--eval-data", str(TEST), "--json"]
    args += ["--fast"] if fast else []
    args += ["--calib-images", str(calib_images)] if calib_images else []
    args += ["--finetune-config", json.dumps(finetune)] if finetune else []
    return _bitdown(*args, log=log)


def _load() -> dict:
    return json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {}


def _save(results: dict) -> None:
    _write_json(OUT_JSON, results)
    report(results)


def grid(folder: Path, path: Path, per_class: int = 10, classes: int = 10, scale: int = 1) -> None:
    """The first `per_class` images of each assigned class (image i has class perm[i mod C]), one row each."""
    import numpy as np
    from PIL import Image

    from bitdown.synthesize import class_targets, image_name

    manifest = json.loads((folder / "bitdown-synthesize.json").read_text())
    n, seed = manifest["settings"]["n"], manifest["settings"]["config"]["seed"]
    y = class_targets(n, classes, seed).tolist()
    rows = []
    for c in range(classes):
        idx = [i for i in range(n) if y[i] == c][:per_class]
        rows.append(np.concatenate([np.asarray(Image.open(folder / image_name(i)).convert("RGB")) for i in idx], 1))
    img = Image.fromarray(np.concatenate(rows, 0))
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path, optimize=True)


def _bn_reference(model_name: str, real) -> dict:
    """The BatchNorm term of the synthesis objective (w_bn = 1) of `model_name` on the batch `real` and on as many
    seeded Gaussian-noise inputs of its shape: the scale the synthetic figures are read against."""
    import torch

    from bitdown.synthesize import _BNLoss, batchnorms
    from bitdown.zoo import build_model

    torch.set_num_threads(1)
    model = build_model(model_name)
    hooks = _BNLoss(batchnorms(model), 1.0)
    out = {}
    with torch.no_grad():
        model(real)
        out["real"] = float(hooks.take())
        model(torch.randn(real.shape, generator=torch.Generator().manual_seed(0)))
        out["noise"] = float(hooks.take())
    hooks.remove()
    return {"images": real.shape[0], **out}


def reference_bn(n: int = 256) -> dict:
    """ResNet-20's BatchNorm term on `n` real training images (every 97th of the zip, as calibration would see
    them) and on `n` noise inputs (_bn_reference)."""
    import torch

    from bitdown.data import ImageDataset

    ds = ImageDataset(ASSETS / "cifar10" / "cifar10-train-jpeg.zip", "cifar10")
    return _bn_reference("resnet20_cifar10", torch.stack([ds[i * 97] for i in range(n)]))


def effnet_cost(images: int = 16, steps: int = 3) -> dict:
    """Seconds per synthesis step of EfficientNet-Lite0 (256 px canvas, 224 px input) on `images` images at one
    thread: the cost side only (its compression on synthetic images is not measured on this CPU)."""
    import torch

    from bitdown.synthesize import SynthConfig, synthesize
    from bitdown.zoo import build_model

    torch.set_num_threads(1)
    model = build_model("efficientnet_lite0")
    res = synthesize(model, images, "efficientnet", SynthConfig(batch_size=images, steps=steps, **DEEPINVERSION),
                     progress=False)          # the objective the committed row measured (the defaults then)
    b = res.batches[0]
    return {"images": images, "steps": steps, "seconds": b["seconds"], "seconds_per_step": b["seconds"] / steps,
            "seconds_per_image_step": b["seconds"] / steps / images, "final_bn": b["bn"],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def run_main(work: Path, n: int) -> None:
    log = work / "main.log"
    folder = work / "main"
    results = _load()
    results["reference_bn"] = reference_bn()
    syn = _synth(folder, n, DEEPINVERSION, log)       # the main row: DeepInversion's terms, as committed
    results["main"] = {"synthesis": syn}
    _save(results)
    grid(folder, RESULTS / "synthetic_grid.png")
    comp = _compress(folder, work / "r20_synth.bitdown", fast=False, log=log)
    results["main"]["compress"] = comp
    _save(results)


def run_variant(work: Path, n: int, tag: str, config: dict, finetune: dict | None) -> None:
    """The main run (n images, default recipe at 20x) with images synthesised under SynthConfig keys `config`
    (on top of SynthConfig's defaults), recorded as its own row `variants[tag]` beside the main one. `finetune`: extra
    FinetuneConfig keys for the compression (e.g. {"holdout": 0}: no holdout guard, as the main row was measured
    before the guard existed). A synthesis already recorded under `tag` with the same keys and count is reused;
    a rerun with other `finetune` keys is recorded beside the first (`compress_other`)."""
    log = work / f"{tag}.log"
    folder = work / tag
    results = _load()
    row = results.setdefault("variants", {}).get(tag, {})
    if row.get("config_keys") != config or row.get("synthesis", {}).get("images") != n:
        row = {"config_keys": config, "synthesis": _synth(folder, n, config, log)}
        results["variants"][tag] = row
        _save(results)
        grid(folder, RESULTS / f"synthetic_grid_{tag}.png")
    comp = _compress(folder, work / f"r20_synth_{tag}.bitdown", fast=False, log=log, finetune=finetune)
    if "compress" in row and row.get("finetune_keys") != (finetune or {}):     # a second fine-tuning setting
        row.setdefault("compress_other", {})[json.dumps(finetune or {})] = comp
    else:
        row["finetune_keys"], row["compress"] = finetune or {}, comp
    _save(results)


def run_main_fast(work: Path, tag: str | None = None) -> None:
    """The main run's 2,048 images (or variant `tag`'s) with the EM only (--fast): what calibration alone gives,
    without distillation."""
    results = _load()
    row = results["variants"][tag] if tag else results["main"]
    name = tag or "main"
    row["compress_fast"] = _compress(work / name, work / f"r20_synth_fast_{name}.bitdown", fast=True,
                                     log=work / f"{name}.log")
    _save(results)


def effnet_reference_bn(n: int = 64) -> dict:
    """EfficientNet-Lite0's BatchNorm term on a batch of `n` real images (the first `n` of the seeded calibration
    500, centre crop) and on `n` noise inputs (_bn_reference)."""
    import torch

    from bitdown.data import ImageDataset, split_indices

    ds = ImageDataset(ASSETS / "imagenet" / "imagenet-sample-images-256.zip", "efficientnet")
    calib_idx, _ = split_indices(len(ds), [500, 500], seed=0)
    return _bn_reference("efficientnet_lite0", torch.stack([ds[int(i)] for i in calib_idx[:n]]))


def run_effnet10(work: Path, n: int, batch_size: int = 64) -> None:
    """EfficientNet-Lite0 at 10x with no real image: `n` images synthesised from the teacher (SynthConfig defaults,
    batches of `batch_size`), then the plain CLI (the compact recipe: EM only on 128 calibration images), top-1 on
    the held-out 500 of the seeded split; the reference is the same command on the 500 real images (real_effnet10).
    Written to synthetic_effnet.json."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from recipe_cli import _split_zips

    log, folder = work / "effnet10.log", work / "effnet10"
    res = json.loads(EFF_JSON.read_text()) if EFF_JSON.exists() else {}
    res["reference_bn"] = effnet_reference_bn(batch_size)
    res["synthesis"] = _synth(folder, n, {}, log, "efficientnet_lite0", "--batch-size", str(batch_size))
    _write_json(EFF_JSON, res)
    with tempfile.TemporaryDirectory() as tmp:
        _, ev = _split_zips(ASSETS / "imagenet" / "imagenet-sample-images-256.zip", Path(tmp))
        comp = _bitdown("compress", "--model", "efficientnet_lite0", "--data", str(folder), "--target-ratio", "10",
                        "--eval-data", str(ev), "--seed", "0", "--out", str(work / "effnet10.bitdown"), "--json",
                        log=log)
        comp["command"] = comp["command"].replace(str(ev), "$TMP/imagenet-eval.zip")
    res["compress"] = comp
    _write_json(EFF_JSON, res)
    report(_load())


def _write_json(path: Path, obj: dict) -> None:
    """`obj` as JSON at `path`, atomically (a report in another process never reads half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def real_effnet10() -> dict:
    """The reference of the EfficientNet-Lite0 target: recipe_cli.json's plain-CLI 10x row of the current compact
    recipe (the cap list), seed 0, calibrated on the 500 real images of the seeded split."""
    rows = json.loads((RESULTS / "recipe_cli.json").read_text())
    for r in rows:
        if r["model"] == "efficientnet_lite0" and r["target"] == 10 and r["seed"] == 0 and r.get("recipe") == "compact" \
                and (r.get("alloc_caps") == [0.2, 0.3] or "cap list" in (r.get("tag") or "")):
            return r
    raise LookupError("recipe_cli.json has no EfficientNet-Lite0 10x seed-0 row of the cap-list compact recipe")


def _effnet10_lines() -> list[str]:
    if not EFF_JSON.exists():
        return []
    res = json.loads(EFF_JSON.read_text())
    syn, comp, ref = res.get("synthesis"), res.get("compress"), res.get("reference_bn", {})
    if not syn:
        return []
    pb = syn["per_batch"]
    lines = ["## EfficientNet-Lite0 at 10x on synthetic images only (`synthetic.py effnet10`)", "",
             f"- synthesis: `{syn['command']}` (SynthConfig: `{json.dumps(syn['config'])}`)",
             f"- {len(pb)} batches of {syn['batch_size']}: {syn['seconds']:.0f} s in all, "
             f"{syn['seconds_per_image']:.2f} s per image "
             f"({syn['seconds_per_image'] / syn['config']['steps']:.2f} s per image and step; loadavg at the end "
             f"{syn.get('loadavg_after')})",
             "- final BatchNorm term per batch: " + ", ".join(f"{b['bn']:.0f}" for b in pb)
             + (f" (a batch of {ref['images']} real calibration images: {ref['real']:.0f}; of Gaussian noise: "
                f"{ref['noise']:.0f})" if ref else ""), ""]
    if comp:
        real = real_effnet10()
        lines += [f"- compression: `{comp['command']}` (the plain CLI: the compact recipe, EM only on 128 "
                  f"calibration images; loadavg at the end {comp.get('loadavg_after')})", "",
                  "| calibration data | ratio | top-1 % | teacher % | drop | agreement % | compress wall s |",
                  "|---|---|---|---|---|---|---|",
                  f"| {syn['images']} synthetic images (no real image) | {comp['ratio']:.1f}x | {comp['top1']:.2f} | "
                  f"{comp['teacher_top1']:.2f} | {comp['drop']:.2f} | {comp['agreement']:.2f} | "
                  f"{comp['child_wall_s']:.0f} |",
                  f"| real images: the calibration 500 of the split (the recipe calibrates on 128; recipe_cli.json) | "
                  f"{real['ratio']:.1f}x | {real['top1']:.2f} | "
                  f"{real['teacher_top1']:.2f} | {real['drop']:.2f} | {real['agreement']:.2f} | {real['wall_s']:.0f} |",
                  "", f"Target (within 3 pt of real, >= {real['top1'] - 3:.1f} %): "
                  f"**{'met' if comp['top1'] >= real['top1'] - 3 else 'missed'}** "
                  f"({comp['top1'] - real['top1']:+.2f} pt).", ""]
    return lines


def run_ablation(work: Path, n: int) -> None:
    log = work / "ablation.log"
    results = _load()
    rows = results.setdefault("ablation", {})
    real = f"{n} real training images (reference)"
    if real not in rows:
        rows[real] = {"compress": _compress(ASSETS / "cifar10" / "cifar10-train-jpeg.zip", work / "ablation_real.bitdown",
                                            fast=True, log=log, calib_images=n)}
        _save(results)
    for k, (name, cfg) in enumerate(ABLATION.items()):
        if name in rows:
            continue
        folder = work / f"ablation{k}"
        syn = _synth(folder, n, cfg, log)
        comp = _compress(folder, work / f"ablation{k}.bitdown", fast=True, log=log, calib_images=n)
        rows[name] = {"synthesis": syn, "compress": comp}
        _save(results)


def _synth_lines(syn: dict, results: dict) -> list[str]:
    """The bullets describing one synthesis run: command, config, time per batch, final loss terms."""
    pb = syn["per_batch"]
    fresh = [b for b in pb if not b.get("resumed")]
    return [f"- synthesis: `{syn['command']}`", f"- config: `{json.dumps(syn['config'])}`",
            f"- {len(pb)} batches of {syn['batch_size']}, {syn['steps']} Adam steps each: "
            f"{syn['seconds']:.0f} s in all, {syn['seconds_per_image'] * 1000:.0f} ms per image; "
            f"a batch of 256 took {min(b['seconds'] for b in fresh):.0f}-{max(b['seconds'] for b in fresh):.0f} s "
            f"(1-, 5-, 15-min loadavg at the end: {syn.get('loadavg_after')})"
            if fresh else "- (all batches read back from an earlier run)",
            "- final loss terms per batch (BatchNorm / diversity CE / TV): "
            + ", ".join(f"{b['bn']:.1f} / {b['div']:.2f} / {b['tv']:.3f}" for b in pb)
            + (" (BatchNorm term of {images} real training images: {real:.1f}; of Gaussian noise: {noise:.1f})"
               .format(**results["reference_bn"]) if "reference_bn" in results else ""), ""]


TABLE_HEAD = ["| calibration + fine-tuning data | ratio | top-1 % | teacher % | drop | agreement % | compress wall s |",
              "|---|---|---|---|---|---|---|"]


def _row(label: str, comp: dict) -> str:
    """One compression result as a row of TABLE_HEAD."""
    return (f"| {label} | {comp['ratio']:.1f}x | {comp['top1']:.2f} | {comp['teacher_top1']:.2f} | "
            f"{comp['drop']:.2f} | {comp['agreement']:.2f} | {comp['wall_s']:.0f} |")


def _variant_lines(results: dict) -> list[str]:
    """One section per `main --tag T --synth-config J` run: its synthesis and its row beside the main one."""
    lines = []
    main = results.get("main", {}).get("compress")
    for tag, v in results.get("variants", {}).items():
        syn, comp = v["synthesis"], v.get("compress")
        lines += [f"## {syn['images']:,} synthetic images from SynthConfig keys {json.dumps(v['config_keys'])} "
                  f"(`{tag}`), default recipe", "",
                  "`python benchmarks/synthetic.py main --tag " + tag + " --synth-config '"
                  + json.dumps(v["config_keys"]) + "'"
                  + (" --finetune-config '" + json.dumps(v["finetune_keys"]) + "'" if v.get("finetune_keys") else "")
                  + "`: the main run with only the synthesis objective changed"
                  + (" (FinetuneConfig " + json.dumps(v["finetune_keys"]) + ": the main row was measured before "
                     "the holdout guard existed, i.e. fine-tuned on all its images, unguarded)"
                     if v.get("finetune_keys", {}).get("holdout") == 0 else "") + ".", ""] + _synth_lines(syn, results)
        if comp:
            lines += [f"- compression: `{comp['command']}` (loadavg at the end: {comp.get('loadavg_after')})", "",
                      *TABLE_HEAD, _row(f"{syn['images']:,} synthetic images, `{tag}`", comp)]
            for keys, other in v.get("compress_other", {}).items():
                lines.append(_row(f"the same images, FinetuneConfig {keys}" if keys != "{}" else
                                  "the same images, FinetuneConfig defaults (global-stage holdout guard on)", other))
            if v.get("compress_fast"):
                lines.append(_row("the same images, EM only (`--fast`)", v["compress_fast"]))
            if main:
                lines.append(_row(f"{syn['images']:,} synthetic images, DeepInversion terms (main row above)", main))
            if main and results["main"].get("compress_fast"):
                lines.append(_row("the DeepInversion-term images, EM only (`--fast`)", results["main"]["compress_fast"]))
            lines += ["", f"Target (>= {REAL_20X - 2:.1f} %): **{'met' if comp['top1'] >= REAL_20X - 2 else 'missed'}** "
                      f"({comp['top1'] - REAL_20X:+.2f} pt from real)"
                      + (f"; {comp['top1'] - main['top1']:+.2f} pt against DeepInversion's terms (main row)." if main else "."),
                      "", f"![{tag} images](synthetic_grid_{tag}.png)", "",
                      f"`synthetic_grid_{tag}.png`: the first 100 images in the main grid's layout"
                      + (" (without the class term no image is pushed towards its row's class)"
                         if v["config_keys"].get("w_div") == 0 else "") + ".", ""]
    return lines


def report(results: dict) -> None:
    lines = ["# Compression without data (issue 15)", "",
             "ResNet-20 (CIFAR-10, teacher top-1 81.03 % on the 10,000 test JPEGs) compressed to 20x by the default "
             "recipe (allocation, int8 codebooks, teacher targets, 10 per-layer + 300 global distillation steps "
             "of 64) on images synthesised from the teacher alone (`bitdown synthesize`; the main row with DeepInversion's "
             "terms, SynthConfig's defaults before session 15; since then the defaults are the BatchNorm term alone, "
             "the `bn_only` rows). Top-1 on all 10,000 test JPEGs, never used for anything else. One thread "
             "(OMP_NUM_THREADS=1) of the shared 2-core CPU; `loadavg` says how busy it was. Written by "
             "`benchmarks/synthetic.py`.", ""]
    main = results.get("main")
    if main:
        syn = main["synthesis"]
        lines += [f"## {syn['images']:,} synthetic images, default recipe", ""] + _synth_lines(syn, results)
        comp = main.get("compress")
        if comp:
            lines += [f"- compression: `{comp['command']}` (loadavg at the end: {comp.get('loadavg_after')})", "",
                      *TABLE_HEAD, _row(f"{syn['images']:,} synthetic images (no real image)", comp),
                      f"| 50,000 real training images (budget_pool.json) | 20.0x | {REAL_20X:.2f} | 81.03 | "
                      f"{81.03 - REAL_20X:.2f} | 87.85 | - |"]
            fast = main.get("compress_fast")
            if fast:
                lines.append(_row(f"the same {syn['images']:,} synthetic images, EM only (`--fast`)", fast))
            lines += ["",
                      f"Target (within 2 pt of real, >= {REAL_20X - 2:.1f} %): "
                      f"**{'met' if comp['top1'] >= REAL_20X - 2 else 'missed'}** "
                      f"({comp['top1'] - REAL_20X:+.2f} pt).", ""]
        lines += ["![synthetic images](synthetic_grid.png)", "",
                  "`synthetic_grid.png`: the first ten images of each assigned class (rows: airplane, automobile, "
                  "bird, cat, deer, dog, frog, horse, ship, truck), 32 px each.", ""]
    lines += _variant_lines(results)
    eff = results.get("effnet_cost")
    if eff:
        lines += ["## EfficientNet-Lite0: cost only", "",
                  f"{eff['images']} images on the 256 px canvas (224 px input), {eff['steps']} steps: "
                  f"{eff['seconds_per_step']:.1f} s per step, {eff['seconds_per_image_step']:.2f} s per image and step "
                  f"(loadavg {eff['loadavg_after']}). At the default 50 steps a batch of 256 would take "
                  f"~{eff['seconds_per_image_step'] * 256 * 50 / 3600:.1f} h here (DeepInversion's terms, the "
                  "defaults then; the BatchNorm term alone on a quieter CPU: the next section).", ""]
    lines += _effnet10_lines()
    abl = results.get("ablation")
    if abl:
        lines += ["## Loss-term ablation (EM only, --fast, 20x, calibration on the same number of images)", "",
                  "Each row: `bitdown synthesize --n 256 --config JSON` (SynthConfig keys switched off as named), "
                  "then `bitdown compress --fast --target-ratio 20 --calib-images 256` on those images; the "
                  "reference row calibrates on 256 real training images instead. BN term: the final BatchNorm term "
                  "of the synthesis.", "",
                  "| synthesis objective | BN term | top-1 % (EM only) | agreement % | synthesis s |",
                  "|---|---|---|---|---|"]
        for name, r in abl.items():
            c = r["compress"]
            if "synthesis" not in r:
                lines.append(f"| {name} | - | {c['top1']:.2f} | {c['agreement']:.2f} | - |")
                continue
            pb = r["synthesis"]["per_batch"]
            bn = sum(b["bn"] for b in pb) / len(pb)
            lines.append(f"| {name} | {bn:.1f} | {c['top1']:.2f} | {c['agreement']:.2f} | "
                         f"{r['synthesis']['seconds']:.0f} |")
        lines.append("")
    (RESULTS / "synthetic.md").write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["main", "main-fast", "ablation", "report", "reference", "effnet", "effnet10"])
    p.add_argument("--work", default="/tmp/bitdown-synthetic", help="folder for the images, files and logs")
    p.add_argument("--n", type=int, help="images (default: 2048 for main, 256 for the ablation)")
    p.add_argument("--synth-config", help="main only: SynthConfig keys (JSON) over the defaults (the BatchNorm term alone since session 15), e.g. "
                   '\'{"w_div": 0, "w_tv": 0, "jitter": 0, "flip": false}\'; needs --tag')
    p.add_argument("--tag", help="main only: the row's name in synthetic.json's variants (and the work folder)")
    p.add_argument("--finetune-config", help="with --tag: FinetuneConfig keys (JSON) for the compression, e.g. "
                   "'{\"holdout\": 0}' (the main row predates the holdout guard)")
    a = p.parse_args()
    if a.what == "main" and (a.synth_config is None) != (a.tag is None) or a.what not in ("main", "main-fast") and (
            a.tag or a.synth_config) or a.what == "main-fast" and a.synth_config:
        p.error("--synth-config and --tag go together, with `main` only (main-fast takes --tag alone)")
    config = json.loads(a.synth_config) if a.synth_config else None
    finetune = json.loads(a.finetune_config) if a.finetune_config else None
    if not all(v is None or isinstance(v, dict) for v in (config, finetune)):
        p.error("--synth-config and --finetune-config must be JSON objects")
    if finetune is not None and a.tag is None:
        p.error("--finetune-config goes with --tag")
    if a.tag is not None and (not a.tag.isidentifier() or a.tag == "main"):
        p.error(f"--tag must be a plain name other than `main`, got {a.tag!r}")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.what == "main" and a.tag:
        run_variant(work, a.n or 2048, a.tag, config, finetune)
    elif a.what == "main":
        run_main(work, a.n or 2048)
    elif a.what == "main-fast":
        run_main_fast(work, a.tag)
    elif a.what == "ablation":
        run_ablation(work, a.n or 256)
    elif a.what == "effnet":                     # EfficientNet-Lite0's cost per step (a minute)
        results = _load()
        results["effnet_cost"] = effnet_cost()
        _save(results)
    elif a.what == "effnet10":                   # EfficientNet-Lite0 10x on synthetic images (~1 h at one thread)
        run_effnet10(work, a.n or 128)
    elif a.what == "reference":                  # the BatchNorm-term scale alone (seconds)
        results = _load()
        results["reference_bn"] = reference_bn()
        _save(results)
    else:
        report(_load())


if __name__ == "__main__":
    main()
