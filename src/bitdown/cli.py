"""Command-line interface: `bitdown compress | eval | info | size`."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

log = logging.getLogger("bitdown.cli")


# ----------------------------------------------------------------------------- helpers

def resolve_model(spec: str, weights: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """A zoo name or `module:function` -> (model in eval mode, arch metadata)."""
    from .zoo import ZOO, build_model, load_weights

    if spec in ZOO:
        entry = ZOO[spec]
        model = build_model(spec, weights if weights else "default")
        return model, {"name": spec, "source": "zoo", "preprocess": entry.preprocess}
    if ":" not in spec:
        raise SystemExit(f"error: unknown model {spec!r}: give a zoo name ({', '.join(sorted(ZOO))}) "
                         f"or module:function")
    mod_name, fn_name = spec.split(":", 1)
    sys.path.insert(0, str(Path.cwd()))
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"error: cannot import {spec!r}: {e}") from None
    model = fn()
    if not isinstance(model, nn.Module):
        raise SystemExit(f"error: {spec} returned {type(model).__name__}, not an nn.Module")
    if weights:
        load_weights(model, weights)
    return model.eval(), {"name": spec, "source": "user"}


def _data(path: str, preprocess: str, labels: str, train: bool = False, seed: int = 0):
    from .data import ImageDataset

    return ImageDataset(path, preprocess, labels=labels, train=train, seed=seed)


def _emit(obj: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=None, default=float))
    else:
        for k, v in obj.items():
            if not isinstance(v, (list, dict)):
                print(f"{k:>18}: {v:.4f}" if isinstance(v, float) else f"{k:>18}: {v}")


# ----------------------------------------------------------------------------- commands

def cmd_size(a: argparse.Namespace) -> int:
    from .config import resolve_plan
    from .recipes import zoo_config
    from .size import size_report
    from .zoo import get_entry

    entry = get_entry(a.arch)
    model = entry.build()
    plans, skipped = resolve_plan(model, zoo_config(a.arch, a.preset, codebook_bits=a.codebook_bits,
                                                    share_same_shape=a.share_same_shape))
    rep = size_report(model, plans)
    out = rep.to_json()
    out["skipped"] = skipped
    if a.json:
        print(json.dumps(out))
    else:
        print(f"{a.arch} ({a.preset}): {rep.size_mb:.3f} MB, {rep.ratio:.1f}x smaller than "
              f"{rep.uncompressed_mb:.2f} MB fp32; {len(plans)} layers quantized, {len(skipped)} kept")
    return 0


def cmd_compress(a: argparse.Namespace) -> int:
    from . import compress, save
    from .data import make_loader
    from .evaluate import evaluate
    from .finetune import FinetuneConfig
    from .size import size_report

    torch.manual_seed(a.seed)
    model, arch = resolve_model(a.model, a.weights)
    preprocess = a.preprocess or arch.get("preprocess")
    if preprocess is None:
        raise SystemExit("error: --preprocess is required for a module:function model")
    arch["preprocess"] = preprocess
    config = _quant_config(a, arch)
    if a.target_ratio is not None or a.target_size is not None:    # an impossible budget: refused before reading data
        from .allocate import check_budget
        check_budget(model, config, a.target_ratio, a.target_size)
    if a.device is not None:                 # a device torch cannot use: refused before reading data
        from .compress import resolve_device
        resolve_device(model, a.device)
    calib = _data(a.data, preprocess, "none")
    ft_extra = _json_object(a.finetune_config, "--finetune-config")
    ft = FinetuneConfig.from_dict({"layer_steps": a.finetune_steps, "global_steps": a.global_steps, "seed": a.seed,
                                   "batch_size": a.ft_batch_size, "checkpoint_every": a.checkpoint_every,
                                   **ft_extra})
    train = _data(a.data, preprocess, "none", train=True, seed=a.seed) if ft.enabled else None
    t0 = time.perf_counter()
    q = compress(model, make_loader(calib, config.batch_size, shuffle=True, seed=a.seed), config, arch=arch,
                 checkpoint_dir=a.checkpoint_dir, finetune=ft if ft.enabled else None, train_data=train,
                 target_ratio=a.target_ratio, target_size=a.target_size, device=a.device)
    wall = time.perf_counter() - t0
    path = save(q, a.out)
    rep = size_report(q, q.bitdown.plans)
    out = {"out": str(path), "size_mb": rep.size_mb, "ratio": rep.ratio, "bytes_on_disk": path.stat().st_size,
           "layers": len(q.bitdown.plans), "wall_s": wall}
    if a.eval_data:
        labels = "wnid" if preprocess in ("imagenet", "efficientnet") else "parent"
        ev = _data(a.eval_data, preprocess, labels)
        out["top1"] = evaluate(q, make_loader(ev, 256))["top1"]
    _emit(out, a.json)
    return 0


def _json_object(text: str | None, flag: str) -> dict[str, Any]:
    """The JSON object given to `flag` ({} when absent); anything else is a clear error."""
    try:
        obj = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{flag} must be a JSON object")
    return obj


def _quant_config(a: argparse.Namespace, arch: dict[str, Any]):
    """QuantConfig from the flags, then `--config` JSON on top (its "em" dict merges into the EM options)."""
    from .config import EMConfig, QuantConfig
    from .recipes import zoo_config

    extra = _json_object(a.config, "--config")
    em = {"n_iter": a.em_iters, "n_restarts": a.restarts}
    if a.paper_em:
        em.update(error_feedback=False, code_reopt=0, codebook_refit=False, teacher_target=False)
    em.update(extra.pop("em", {}) or {})
    kw = {"seed": a.seed, "calib_images": a.calib_images, "codebook_bits": a.codebook_bits,
          "share_same_shape": bool(getattr(a, "share_same_shape", False)), **extra,
          "em": EMConfig.from_dict(em)}
    if arch["source"] == "zoo":
        return zoo_config(a.model, extra.pop("preset", a.preset), **{k: v for k, v in kw.items() if k != "preset"})
    return QuantConfig.from_dict({"preset": a.preset, **kw})


def _load_file(path: str, model_spec: str | None, weights: str | None = None) -> nn.Module:
    from . import load

    model = resolve_model(model_spec, None)[0] if model_spec else None
    return load(path, model)


def cmd_eval(a: argparse.Namespace) -> int:
    from .data import make_loader
    from .evaluate import evaluate

    q = _load_file(a.file, a.model)
    preprocess = a.preprocess or q.bitdown.arch.get("preprocess")
    if preprocess is None:
        raise SystemExit("error: the file records no preprocessing; pass --preprocess")
    labels = a.labels or ("wnid" if preprocess in ("imagenet", "efficientnet") else "parent")
    ds = _data(a.data, preprocess, labels)
    res = evaluate(q, make_loader(ds, a.batch_size))
    res["n_skipped"] = ds.n_skipped
    _emit(res, a.json)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .data import get_preset
    from .export import export_onnx

    q = _load_file(a.file, a.model)
    if a.input_shape:
        try:
            shape = [int(v) for v in a.input_shape.split(",")]
        except ValueError:
            raise ValueError(f"--input-shape must be comma-separated integers like 1,3,224,224, got "
                             f"{a.input_shape!r}") from None
    else:
        preprocess = q.bitdown.arch.get("preprocess")
        if preprocess is None:
            raise SystemExit("error: the file records no preprocessing; pass --input-shape")
        crop = get_preset(preprocess).crop
        shape = [1, 3, crop, crop]
    path = export_onnx(q, a.out, shape, check=not a.no_check)
    _emit({"out": str(path), "bytes_on_disk": path.stat().st_size, "bitdown_bytes": Path(a.file).stat().st_size,
           "input_shape": shape}, a.json)
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from . import serialize

    tensors, meta = serialize.read(a.file)
    layers = meta["layers"]
    out = {"file": a.file, "bytes_on_disk": Path(a.file).stat().st_size, "format_version": meta["format_version"],
           "arch": meta.get("arch"), **meta.get("size", {}), "n_layers": len(layers), "layers": layers,
           "skipped": meta.get("skipped", {}), "config": meta.get("config"),
           "allocation": meta.get("extra", {}).get("allocation")}
    if a.json:
        print(json.dumps(out, default=float))
    else:
        print(f"{a.file}: {out['arch'].get('name')} — {out.get('size_mb', float('nan')):.4f} MB paper-style, "
              f"{out.get('ratio', float('nan')):.1f}x, {out['bytes_on_disk']} bytes on disk")
        for p in layers:
            cb = " int8-codebook" if p.get("codebook_bits", 16) == 8 else ""
            cb += f" shared:{p['share']}" if p.get("share") else ""
            print(f"  {p['name']:<40} {p['kind']:<8} d={p['block_size']:<3} K={p['n_centroids']:<5} "
                  f"{'x'.join(map(str, p['weight_shape']))}{cb}")
        for n, why in out["skipped"].items():
            print(f"  {n:<40} kept: {why}")
        if out["allocation"]:
            al = out["allocation"]
            print(f"  allocation: budget {al['budget_bytes'] / 2**20:.4f} MB, achieved "
                  f"{al['achieved_bytes'] / 2**20:.4f} MB ({al['ratio']:.1f}x)")
    return 0


# ----------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitdown", description="Output-aware product quantization of CNNs.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("size", help="paper-style size of a zoo architecture under a preset (no weights needed)")
    s.add_argument("arch")
    s.add_argument("--preset", default="small", choices=["small", "large"])
    s.add_argument("--codebook-bits", type=int, default=16, choices=[16, 8])
    s.add_argument("--share-same-shape", action="store_true", help="one codebook per group of same-shape layers")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_size)

    c = sub.add_parser("compress", help="compress a model on unlabelled images")
    c.add_argument("--model", required=True, help="zoo name or module:function returning an nn.Module")
    c.add_argument("--weights", help="checkpoint (.pt/.pth/.th via weights_only, or .safetensors)")
    c.add_argument("--data", required=True, help="folder or zip of unlabelled calibration images")
    c.add_argument("--preprocess", help="data preset (cifar10|imagenet|efficientnet); zoo models know theirs")
    c.add_argument("--preset", default="small", choices=["small", "large"])
    budget = c.add_mutually_exclusive_group()
    budget.add_argument("--target-ratio", type=float, help="choose per-layer d and K to be R times smaller")
    budget.add_argument("--target-size", help="choose per-layer d and K to fit e.g. 100KB or 1.5MB (paper-style)")
    c.add_argument("--out", required=True)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--calib-images", type=int, default=1024)
    c.add_argument("--codebook-bits", type=int, default=16, choices=[16, 8],
                   help="16: fp16 codebooks (the paper); 8: int8 codebooks with fp16 column scales")
    c.add_argument("--share-same-shape", action="store_true",
                   help="layers of the same kind and weight shape share one codebook (saves codebook bytes)")
    c.add_argument("--em-iters", type=int, default=30)
    c.add_argument("--restarts", type=int, default=1)
    c.add_argument("--paper-em", action="store_true",
                   help="the paper's pooled EM only (default adds GPTQ-style feedback, code re-opt, codebook refit)")
    c.add_argument("--finetune-steps", type=int, default=0, help="per-layer distillation steps (0: off)")
    c.add_argument("--global-steps", type=int, default=0, help="global distillation steps (0: off)")
    c.add_argument("--ft-batch-size", type=int, default=64, help="fine-tuning batch size")
    c.add_argument("--checkpoint-dir", help="save progress here; rerunning the same command resumes")
    c.add_argument("--checkpoint-every", type=int, default=100, help="global fine-tuning steps between checkpoints")
    c.add_argument("--config", help="JSON of extra QuantConfig keys, e.g. '{\"name_overrides\": {...}}'")
    c.add_argument("--finetune-config", help="JSON of extra fine-tuning keys (finetune.FinetuneConfig), e.g. "
                                             "'{\"global_lr\": 3e-4, \"optimizer\": \"sgd\", \"temperature\": 2}'")
    c.add_argument("--device", help="where the forward passes and fine-tuning run, e.g. cuda (default: cpu); "
                                    "the EM runs on the CPU and the file is the same format")
    c.add_argument("--eval-data", help="labelled images to report top-1 on after compression")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_compress)

    e = sub.add_parser("eval", help="top-1 of a compressed file on labelled images")
    e.add_argument("file")
    e.add_argument("--data", required=True)
    e.add_argument("--model", help="module:function for a non-zoo architecture")
    e.add_argument("--preprocess")
    e.add_argument("--labels", choices=["parent", "wnid"])
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("export", help="write a compressed file as ONNX (codebooks and codes kept compact)")
    x.add_argument("file")
    x.add_argument("--out", required=True, help="the .onnx file to write")
    x.add_argument("--model", help="module:function for a non-zoo architecture")
    x.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224 (default: from the file's "
                                         "preprocessing; the batch axis stays dynamic)")
    x.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison with the model")
    x.add_argument("--json", action="store_true")
    x.set_defaults(fn=cmd_export)

    i = sub.add_parser("info", help="what a compressed file holds")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from .serialize import BitdownFileError

    try:
        return a.fn(a)
    except (BitdownFileError, ValueError, FileNotFoundError, KeyError, TypeError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` etc.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
