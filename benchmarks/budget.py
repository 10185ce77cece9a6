"""Size-budget benchmark: bitdown's rate-distortion allocation (`compress(target_ratio=R)`) against the
best uniform preset at the same size, each after the same fine-tuning budget, on the real models of
../shared/assets.

    python benchmarks/budget.py --models resnet20_cifar10 --ratios 10,15,20,25,30,40 \
        [--methods alloc,uniform] [--codebook-bits 16,8] [--layer-steps 10 --global-steps 300]

- alloc:   per-layer (block size, centroids) chosen by rate-distortion (allocate.py) for the budget.
- uniform: the paper's presets (small, large) with every layer's centroids divided by the same power
           of two until the model fits the budget; of the two presets, the one with the lower summed
           calibration distortion (the allocator's own rate-distortion table, calibration images only)
           is the "best uniform preset". Same EM, same fine-tuning.
- shared:  as uniform, but layers of the same kind and weight shape share one codebook
           (QuantConfig.share_same_shape): the codebooks saved buy more centroids at the same size.
- gptq4, gptq3, gptq2 (gptqB): the per-channel scalar baseline as GPTQ / BRECQ / AdaRound report it: every
           layer at B-bit per-output-channel codes (asymmetric, fp16 scale, GPTQ error feedback on the layer's
           full Gram; scalar.py), the first and the last layer at 8 bits (allocate.scalar_baseline_config).
           Same pipeline otherwise (statistics, teacher targets, block reconstruction, fine-tuning of the BN
           affine parameters), so the comparison isolates the quantizer. Its size is what B bits give: the
           row is measured once per model (its target ratio and codebook are "-"), whatever --ratios says.
- --codebook-bits 8: int8 codebooks with fp16 column scales (the accounting counts them so).

To run two at once, give the second its own --out and fold it in afterwards with
`--merge results/other.json`. Do not run two instances on the same --out file at once (each rewrites the whole JSON: a row was
lost that way in session 2). Rows are appended to benchmarks/results/budget.json (a rerun skips measured rows) and budget.md and
budget.png are rebuilt. Data splits as in accuracy.py (CIFAR: train for calibration/fine-tuning,
test for top-1; EfficientNet-Lite0: seeded 500/500 split of the ImageNet sample images).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import resource
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from accuracy import RESULTS, datasets, disk_bytes, machine, train_eval_set  # noqa: E402

from bitdown import compress  # noqa: E402
from bitdown.checkpoint import fingerprint  # noqa: E402
from bitdown.allocate import (_other_bytes, apply_allocation, budget_bytes, measure_options,  # noqa: E402
                              scalar_baseline_config)
from bitdown.compress import forward_order, take_images  # noqa: E402
from bitdown.config import EMConfig, QuantConfig, ReconstructConfig, resolve_plan  # noqa: E402
from bitdown.data import make_loader  # noqa: E402
from bitdown.evaluate import evaluate  # noqa: E402
from bitdown.finetune import FinetuneConfig  # noqa: E402
from bitdown.recipes import zoo_config  # noqa: E402
from bitdown.size import layer_size, size_report  # noqa: E402
from bitdown.zoo import build_model, get_entry  # noqa: E402


def _quantized_bytes(plans) -> float:
    """Paper-style bytes of the quantized layers (indices + codebooks, a shared codebook once)."""
    seen, total = set(), 0.0
    for p in plans:
        lay = layer_size(p, count_codebook=p.share is None or p.share not in seen)
        seen.add(p.share)
        total += lay.index_bytes + lay.codebook_bytes
    return total


def uniform_choice(name: str, teacher, order, budget: float, bits: int, options: dict, share: bool = False,
                   ) -> tuple[str, dict[str, tuple[int, int]], float]:
    """(preset, {layer: (d, K)}, summed distortion) of the best uniform preset fitting `budget` bytes.
    share: layers of one shape share a codebook (QuantConfig.share_same_shape); the distortion used to
    pick the preset is then the per-layer-codebook proxy of the RD table."""
    best = None
    for preset in ("small", "large"):
        plans, _ = resolve_plan(teacher, zoo_config(name, preset, codebook_bits=bits, share_same_shape=share), order)
        other = _other_bytes(teacher, plans)
        for shift in range(12):
            scaled = [dataclasses.replace(p, n_centroids=max(2, p.n_centroids >> shift)) for p in plans]
            size = other + _quantized_bytes(scaled)
            if size <= budget:
                break
        else:
            continue
        dist = 0.0
        for p in scaled:
            match = [o.distortion for o in options[p.name] if o.key == (p.block_size, p.n_centroids, 0, False)]
            dist += match[0] if match else math.inf
        if best is None or dist < best[2]:
            best = (preset, {p.name: (p.block_size, p.n_centroids) for p in scaled}, dist)
    if best is None:
        raise ValueError(f"no uniform preset fits {budget:.0f} bytes")
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet20_cifar10")
    p.add_argument("--ratios", default="20")
    p.add_argument("--methods", default="alloc,uniform")
    p.add_argument("--codebook-bits", default="16")
    p.add_argument("--layer-steps", type=int, default=10)
    p.add_argument("--global-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--calib-images", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-pool", type=int, help="calibrate and fine-tune on only this many training images (a "
                                                   "fixed seeded subset; default: all, CIFAR 50,000, EfficientNet 500)")
    p.add_argument("--alloc-weighting", default="none", choices=["none", "sensitivity"],
                   help="alloc: weight each layer's distortion by its measured sensitivity (QuantConfig.alloc_weighting)")
    p.add_argument("--alloc-max-error", help="alloc: no layer above this relative output error "
                                             "(QuantConfig.alloc_max_error); a comma list (e.g. 0.3,0.5,none): each "
                                             "ratio uses the first cap in it that the budget can satisfy")
    p.add_argument("--alloc-cap-rule", default="tightest", choices=["tightest", "measured"],
                   help="alloc: with 'measured' the --alloc-max-error list goes to QuantConfig as one list and "
                        "QuantConfig.alloc_cap_rule='measured' picks the cap (one row, recording each cap's error)")
    p.add_argument("--allocation", help="alloc: an allocation report (compress's allocation.json 'allocation', or "
                                        "its bare report) computed on the same calibration images, e.g. on another "
                                        "machine; its ratio, weighting and error cap must match the flags")
    p.add_argument("--alloc-menu", default="", help="alloc: options beyond PQ the allocator may pick "
                                                    "(QuantConfig.alloc_menu), comma-separated: int8,int4,int3,int2,fp16")
    p.add_argument("--em", default="{}", help='EM options on top of the default EMConfig, JSON')
    p.add_argument("--reconstruct", default="{}", help='block reconstruction options (QuantConfig.reconstruct, '
                                                        'config.ReconstructConfig), JSON, e.g. \'{"steps": 200}\'')
    p.add_argument("--alloc-sensitivity-loss", default="mse", choices=["mse", "kl", "bce"],
                   help="alloc with sensitivity weighting: how a layer's output noise is measured at the network's "
                        "output (QuantConfig.alloc_sensitivity_loss)")
    p.add_argument("--stats-positions", type=int, default=QuantConfig().stats_positions,
                   help="QuantConfig.stats_positions: output positions per image in a conv's Grams (0: all)")
    p.add_argument("--mixup", type=float, default=0.0, help="fine-tuning mixup alpha (FinetuneConfig.mixup; 0: off)")
    p.add_argument("--schedule", default="step", choices=["step", "cosine"],
                   help="the global stage's learning-rate schedule (FinetuneConfig.schedule)")
    p.add_argument("--device", default="cpu", help="where forward passes and fine-tuning run (cuda on a GPU machine)")
    p.add_argument("--checkpoint-root", help="each row's compression checkpoints (and size allocation) in a "
                                             "subfolder named by its settings: a killed run resumes")
    p.add_argument("--out", default=str(RESULTS / "budget.json"))
    p.add_argument("--merge", help="comma-separated JSON files of other runs (--out elsewhere, e.g. run in "
                                   "parallel): their rows are added to --out and the report rebuilt; nothing is run")
    a = p.parse_args()
    for method in a.methods.split(","):
        _scalar_method(method)                  # an unknown method is refused before any work
    path = Path(a.out)
    if a.merge:
        merge(path, [Path(f) for f in a.merge.split(",")])
        return
    doc = json.loads(path.read_text()) if path.exists() else {}
    rows, teachers = doc.get("rows", []), doc.get("teachers", {})
    em = json.loads(a.em)
    em_key = _em_key(em)
    rc = json.loads(a.reconstruct)
    rc_key = _rc_key(rc)
    menu = [m for m in a.alloc_menu.split(",") if m]
    for r in rows:
        _row_defaults(r)
    for name in a.models.split(","):
        calib, aug, ev = datasets(name, a.seed, a.train_pool)
        seen = train_eval_set(name, a.train_pool)
        teacher = build_model(name)
        if name not in teachers:
            teachers[name] = evaluate(teacher, make_loader(ev, 250))["top1"]      # on the CPU, as deployed
        loader = make_loader(calib, 128, shuffle=True, seed=a.seed)
        batches = order = options = None      # calibration images and RD table: once per model, if needed
        done_alloc: set = set()
        for ratio in [float(r) for r in a.ratios.split(",")]:
            for bits in [int(b) for b in a.codebook_bits.split(",")]:
                for method, cap in _method_caps(a.methods, a.alloc_max_error, a.alloc_cap_rule):
                    weighting = a.alloc_weighting if method == "alloc" else "none"
                    if method == "alloc" and (ratio, bits) in done_alloc:
                        continue                # a tighter cap of the list already gave this row
                    scalar_bits = _scalar_method(method)
                    key = dict(model=name, method=method, codebook_bits=None if scalar_bits else bits,
                               target_ratio=None if scalar_bits else ratio, em=em_key,
                               reconstruct=rc_key,
                               alloc_weighting=weighting, alloc_max_error=cap, mixup=a.mixup,
                               alloc_sensitivity_loss=a.alloc_sensitivity_loss if weighting != "none" else "mse",
                               alloc_menu=menu if method == "alloc" else [], stats_positions=a.stats_positions,
                               layer_steps=a.layer_steps, global_steps=a.global_steps, calib_images=a.calib_images,
                               batch_size=a.batch_size, seed=a.seed, train_pool=a.train_pool)
                    rule = a.alloc_cap_rule if method == "alloc" else "tightest"
                    key.update({k: v for k, v in (("schedule", a.schedule), ("alloc_cap_rule", rule))
                                if v != _DEFAULTS[k]})
                    # (at their defaults they stay out of the key: a --checkpoint-root folder of an older run resumes)
                    if any(all(r.get(k, _DEFAULTS.get(k)) == v for k, v in key.items()) for r in rows):
                        if method == "alloc":
                            done_alloc.add((ratio, bits))
                        continue
                    cfg = zoo_config(name, "small", calib_images=a.calib_images, seed=a.seed, codebook_bits=bits,
                                     em=EMConfig(**em), alloc_weighting=weighting, alloc_max_error=cap,
                                     alloc_cap_rule=rule,
                                     reconstruct=rc, alloc_menu=menu if method == "alloc" else [],
                                     stats_positions=a.stats_positions,
                                     alloc_sensitivity_loss=key["alloc_sensitivity_loss"])
                    extra, target, given = {}, ratio, None
                    if method == "alloc" and a.allocation:
                        given = _given_allocation(Path(a.allocation), ratio, weighting, cap, teacher, cfg)
                        cfg, target = apply_allocation(cfg, given), None
                        extra["allocation_from"] = Path(a.allocation).name
                    if method in ("uniform", "shared"):
                        if batches is None:
                            batches = take_images(loader, a.calib_images, 128)
                            order = forward_order(teacher, batches[0][:2])
                        plans, _ = resolve_plan(teacher, cfg, order)
                        budget = budget_bytes(teacher, plans, target_ratio=ratio)
                        if options is None:
                            options = measure_options(teacher, plans, batches, seed=a.seed)
                        share = method == "shared"
                        preset, choice, dist = uniform_choice(name, teacher, order, budget, bits, options, share)
                        cfg = zoo_config(name, preset, calib_images=a.calib_images, seed=a.seed, codebook_bits=bits,
                                         em=EMConfig(**em), share_same_shape=share, reconstruct=rc,
                                         stats_positions=a.stats_positions,
                                         name_overrides={re.escape(n): {"block_size": d, "n_centroids": k}
                                                         for n, (d, k) in choice.items()})
                        extra, target = {"preset": preset, "calib_distortion": dist}, None
                    if scalar_bits:             # every layer scalar: no budget, first and last layer at 8 bits
                        if batches is None:
                            batches = take_images(loader, a.calib_images, 128)
                            order = forward_order(teacher, batches[0][:2])
                        cfg = scalar_baseline_config(cfg, teacher, scalar_bits, order)
                        if not all(p.scalar_bits for p in resolve_plan(teacher, cfg, order)[0]):
                            raise SystemExit("this bitdown does not resolve scalar plans yet (config.resolve_layer "
                                             "ignores the scalar_bits override): the gptq baseline cannot run")
                        extra, target = {}, None
                    t0 = time.perf_counter()
                    ft = FinetuneConfig(layer_steps=a.layer_steps, global_steps=a.global_steps,
                                        batch_size=a.batch_size, seed=a.seed, mixup=a.mixup, schedule=a.schedule)
                    ck = None
                    if a.checkpoint_root:
                        ck = Path(a.checkpoint_root) / fingerprint(key, given)
                    try:
                        q = compress(teacher, loader, cfg,
                                     arch={"name": name, "source": "zoo", "preprocess": get_entry(name).preprocess},
                                     finetune=ft if ft.enabled else None, train_data=aug, target_ratio=target,
                                     device=a.device, checkpoint_dir=ck)
                    except ValueError as e:
                        if not isinstance(cap, float) or "no allocation keeps" not in str(e):
                            raise
                        print(f"{name} {ratio:g}x: cap {cap:g} infeasible ({e}); next cap", flush=True)
                        continue
                    if method == "alloc":
                        done_alloc.add((ratio, bits))
                    wall = time.perf_counter() - t0
                    q = q.cpu()                 # top-1 measured on the CPU, as deployed
                    if given is not None:
                        q.bitdown.extra["allocation"] = given
                    rep = size_report(q, q.bitdown.plans)
                    res = evaluate(q, make_loader(ev, 250), teacher=teacher)
                    res_seen = evaluate(q, make_loader(seen, 250), teacher=teacher)
                    n_layers = len(q.bitdown.plans)
                    guards = {k: q.bitdown.extra[f"{k}_finetune"]["holdout"] for k in ("layer", "global")
                              if "holdout" in q.bitdown.extra.get(f"{k}_finetune", {})}
                    if guards:          # what the holdout guards measured on their slice and kept
                        extra["holdout_guard"] = guards
                    if method == "alloc":
                        al = q.bitdown.extra["allocation"]
                        extra["calib_distortion"] = sum(v["rel_err2"] for v in al["layers"].values())
                        extra["alloc_cap_used"] = al.get("max_error")
                        if al.get("cap_errors"):
                            extra["cap_errors"] = al["cap_errors"]
                    rows.append(dict(key, **extra, teacher_top1=teachers[name], top1=res["top1"],
                                     drop=teachers[name] - res["top1"], agreement=res["agreement"],
                                     train_top1=res_seen["top1"], train_agreement=res_seen["agreement"],
                                     n_train_eval=res_seen["n"],
                                     size_mb=rep.size_mb, ratio=rep.ratio, bytes_on_disk=disk_bytes(q), wall_s=wall,
                                     peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                     timings={k: round(v, 1) for k, v in q.bitdown.timings.items()},
                                     ft_images=(a.layer_steps * n_layers + a.global_steps) * a.batch_size,
                                     device=_device_name(a.device),
                                     allocation={p.name: [p.block_size, p.n_centroids] if p.quantizer == "pq"
                                                 else p.quantizer for p in q.bitdown.plans}))
                    path.write_text(json.dumps({"machine": machine(), "teachers": teachers, "rows": rows}, indent=1))
                    print(json.dumps({k: rows[-1][k] for k in ("model", "method", "codebook_bits", "target_ratio",
                                                                "ratio", "top1", "drop")}), flush=True)
    path.write_text(json.dumps({"machine": machine(), "teachers": teachers, "rows": rows}, indent=1))
    write_report(path)


def _scalar_method(method: str) -> int:
    """B for the scalar baseline method 'gptqB' (0 for the other methods); SystemExit for an unknown method."""
    from bitdown.config import SCALAR_BITS

    if method in ("alloc", "uniform", "shared"):
        return 0
    m = re.fullmatch(r"gptq(\d+)", method)
    if m is None or int(m.group(1)) not in SCALAR_BITS:
        raise SystemExit(f"unknown method {method!r}: alloc, uniform, shared or gptqB with B in {SCALAR_BITS}")
    return int(m.group(1))


def _method_caps(methods: str, caps: str | None, rule: str = "tightest") -> list[tuple[str, float | list | None]]:
    """(method, error cap) in run order: alloc once per cap of the list (the first feasible one is kept), or with
    `rule` 'measured' once with the whole list (QuantConfig picks the cap); the other methods uncapped."""
    cap_list = [None if c in ("none", "") else float(c) for c in (caps or "none").split(",")]
    if rule == "measured":
        if None in cap_list or len(cap_list) < 2:
            raise SystemExit("--alloc-cap-rule measured needs --alloc-max-error as a list of at least two caps")
        cap_list = [cap_list]
    return [(m, c) for m in methods.split(",") for c in (cap_list if m == "alloc" else [None])]


_DEFAULTS = {"em": {}, "alloc_weighting": "none", "mixup": 0.0, "alloc_max_error": None, "train_pool": None,
             "reconstruct": {}, "alloc_menu": [], "stats_positions": 0, "alloc_sensitivity_loss": "mse",
             "schedule": "step", "alloc_cap_rule": "tightest"}    # the settings of rows written before a key existed


def _row_defaults(row: dict) -> None:
    """Fill the settings rows written before they existed, with the values those runs used, and drop EM
    options equal to EMConfig's defaults (a row asking teacher_target=True ran the default EM)."""
    for k, v in _DEFAULTS.items():
        row.setdefault(k, v)
    row["em"] = _em_key(row["em"])
    row["reconstruct"] = _rc_key(row["reconstruct"])


def _em_key(em: dict) -> dict:
    """The EM options of `em` that differ from EMConfig's defaults (what a row's settings record)."""
    return _non_default(em, EMConfig)


def _rc_key(rc: dict) -> dict:
    """The block reconstruction options of `rc` that differ from off (ReconstructConfig's defaults)."""
    return _non_default(rc, ReconstructConfig)


def _non_default(d: dict, cls) -> dict:
    default = dataclasses.asdict(cls())
    return {k: v for k, v in d.items() if default.get(k, object()) != v}


def _caps(row: dict) -> str:
    """'0.3', or for a list of caps '0.2/0.3 measured: 0.3' (the rule and the cap the allocation used)."""
    c = row["alloc_max_error"]
    if not isinstance(c, list):
        return f"{c:g}"
    used = row.get("alloc_cap_used")
    return ("/".join(f"{x:g}" for x in c) + f" {row.get('alloc_cap_rule', 'tightest')}"
            + (f": {used:g}" if used is not None else ""))


def _given_allocation(path: Path, ratio: float, weighting: str, cap: float | None, model, cfg) -> dict:
    """The allocation report in `path`, refused unless it was made for this ratio, weighting and cap and
    names exactly the layers `cfg` quantizes in `model`."""
    doc = json.loads(path.read_text())
    rep = doc.get("allocation", doc)
    got = (rep.get("target_ratio"), rep.get("weighting"), rep.get("max_error"))
    caps = cap if isinstance(cap, list) else [cap]          # a list of caps: the report names the one it used
    if got[:2] != (ratio, weighting) or got[2] not in caps:
        raise SystemExit(f"{path}: made for (ratio, weighting, max error) {got}, not {(ratio, weighting, cap)}")
    names = {p.name for p in resolve_plan(model, cfg)[0]}
    if set(rep.get("layers", {})) != names:
        raise SystemExit(f"{path}: its layers are not the ones this model quantizes (differ in "
                         f"{sorted(set(rep.get('layers', {})) ^ names)[:3]})")
    return rep


def _device_name(device: str) -> str:
    """What ran the forward passes and fine-tuning: 'cpu', or the GPU's name."""
    import torch
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def merge(path: Path, others: list[Path]) -> None:
    """Add the rows of `others` to `path` (a row measured twice with the same settings: the newer one)."""
    doc = json.loads(path.read_text())
    for r in doc["rows"]:
        _row_defaults(r)
    settings = ("model", "method", "codebook_bits", "target_ratio", "em", "reconstruct", "alloc_weighting",
                "alloc_max_error", "alloc_cap_rule", "alloc_menu", "alloc_sensitivity_loss",
                "mixup", "schedule", "layer_steps",
                "global_steps", "calib_images", "batch_size", "seed", "train_pool")
    for other in others:
        od = json.loads(other.read_text())
        doc["teachers"].update(od["teachers"])
        for row in od["rows"]:
            _row_defaults(row)
            row.setdefault("machine", od["machine"])    # rows measured elsewhere keep their machine
            doc["rows"] = [r for r in doc["rows"] if any(r.get(k) != row.get(k) for k in settings)] + [row]
    path.write_text(json.dumps(doc, indent=1))
    write_report(path)


def _dist(r: dict) -> str:
    """The summed calibration distortion, '-' where none is known (a shared codebook has no per-layer
    entry in the rate-distortion table)."""
    v = r.get("calib_distortion")
    return f"{v:.3f}" if v is not None and math.isfinite(v) else "-"


def _codebook(bits: int | None) -> str:
    """A row's codebook column: '-' for the scalar baseline (no codebook)."""
    return "-" if not bits else "int8" if bits == 8 else "fp16"


def _target(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.0f}x"


def write_report(path: Path) -> None:
    doc = json.loads(path.read_text())
    rows = sorted(doc["rows"], key=lambda r: (r["model"], r["global_steps"], r["target_ratio"] or 0,
                                              r["codebook_bits"] or 0, r["method"]))
    m = doc["machine"]
    lines = ["# Size budgets (generated by benchmarks/budget.py)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}. Paper-style size accounting "
             "(bitdown size). `alloc`: per-layer block size and centroids chosen by rate-distortion for the "
             "budget; `uniform`: the best paper preset (small/large, by calibration distortion) with every "
             "layer's centroids divided by the same power of two to fit; `shared`: the same with one codebook per "
             "group of same-shape layers (share_same_shape); `gptqB`: the per-channel scalar baseline (every layer "
             "B-bit codes with GPTQ error feedback, first and last layer 8-bit; no target, codebook '-'). "
             "All then get the same fine-tuning "
             "(layer steps per layer + global steps, batch size as stated; labels never used). Top-1 on images "
             "never used for calibration (CIFAR-10 test set; EfficientNet-Lite0: the held-out 500). "
             "EM options are listed where they differ from EMConfig's defaults (teacher targets on). "
             "'top-1 on seen images': top-1 on (at most 2,000 of) the unlabelled training images the "
             "compression calibrated and fine-tuned on, against their labels (over-fitting shows as a gap to the "
             "held-out top-1; '-': not measured then). "
             "'run on': where the forward passes and fine-tuning ran (a GPU row: EM on that machine's CPU, "
             "top-1 on its CPU); wall s is that machine's, and since session 6 a later row of the same model in "
             "one process reuses its rate-distortion table (minutes on the 2-core CPU).", "",
             "| model | method | codebook | target | ratio | MB | bytes on disk | top-1 % | teacher % | drop (pt) | "
             "agreement % | top-1 on seen images % | calib. distortion | FT steps (layer/global x batch) | run on | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        meth = r["method"] + (f" ({r['preset']})" if r.get("preset") else "")
        meth += ", sensitivity-weighted" if r.get("alloc_weighting", "none") != "none" else ""
        meth += f" ({r['alloc_sensitivity_loss']} sensitivity)" if r.get("alloc_sensitivity_loss", "mse") != "mse" else ""
        meth += "".join(f", {k}={v}" for k, v in r.get("em", {}).items())
        meth += (", block reconstruction " + ",".join(f"{k}={v}" for k, v in r["reconstruct"].items())
                 if r.get("reconstruct") else "")
        meth += f", max error {_caps(r)}" if r.get("alloc_max_error") else ""
        meth += f", menu {'/'.join(r['alloc_menu'])}" if r.get("alloc_menu") else ""
        meth += f", mixup {r['mixup']:g}" if r.get("mixup") else ""
        meth += f", {r['schedule']} lr" if r.get("schedule", "step") != "step" else ""
        meth += f", {r['train_pool']} training images" if r.get("train_pool") else ""
        meth += f", Grams on {r['stats_positions']} positions per image" if r.get("stats_positions") else ""
        seen = f"{r['train_top1']:.1f}" if r.get("train_top1") is not None else "-"
        lines.append(f"| {r['model']} | {meth} | {_codebook(r['codebook_bits'])} | {_target(r['target_ratio'])} | "
                     f"{r['ratio']:.2f}x | {r['size_mb']:.4f} | {r['bytes_on_disk']:,} | "
                     f"{r['top1']:.2f} | {r['teacher_top1']:.2f} | {r['drop']:.2f} | {r['agreement']:.1f} | {seen} | "
                     f"{_dist(r)} | {r['layer_steps']}/{r['global_steps']} x "
                     f"{r['batch_size']} | {r.get('device', 'cpu')} | {r['wall_s']:.0f} |")
    (path.parent / (path.stem + ".md")).write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 5.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        mr = [r for r in rows if r["model"] == model]
        def group(r):
            meth = r["method"] + ("+sens" if r.get("alloc_weighting", "none") != "none" else "")
            meth += f"+cap{_caps(r)}" if r.get("alloc_max_error") else ""
            meth += f"+mixup{r['mixup']:g}" if r.get("mixup") else ""
            meth += f"+{r['schedule']}" if r.get("schedule", "step") != "step" else ""
            meth += f"+pool{r['train_pool']}" if r.get("train_pool") else ""
            meth += "+recon" + ",".join(f"{k}={v}" for k, v in r["reconstruct"].items()) if r.get("reconstruct") else ""
            meth += " (GPU)" if r.get("device", "cpu") != "cpu" else ""
            return meth, r["codebook_bits"] or 0, r["global_steps"], json.dumps(r.get("em", {}), sort_keys=True)
        for (meth, bits, steps, em) in sorted({group(r) for r in mr}):
            pts = sorted((r["size_mb"] * 1024, r["top1"]) for r in mr if group(r) == (meth, bits, steps, em))
            em_label = "" if em == "{}" else " " + ",".join(f"{k}={v}" for k, v in json.loads(em).items())
            ax.plot(*zip(*pts), marker="o",
                    label=f"{meth}{em_label} {_codebook(bits)} cb, {steps} global steps")
        ax.axhline(doc["teachers"][model], color="k", ls="--", lw=1, label="teacher")
        ax.set_xscale("log")
        ax.set_xlabel("paper-style size (KB)")
        ax.set_ylabel("top-1 %")
        ax.set_title(model)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.tight_layout()
    fig.savefig(path.parent / (path.stem + ".png"), dpi=110)


if __name__ == "__main__":
    main()
