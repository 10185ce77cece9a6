"""Command-line interface: `bitdown compress | eval | export | info | size`.

Every user error (a bad flag, a missing or unwritable path, a model, file or data set that does not
fit) is one `error: ...` line on stderr and exit code 2, checked before any long work where it can
be; a traceback is a bug."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import math
import os
import re
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

log = logging.getLogger("bitdown.cli")

_SPEC_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_WNID_RE = re.compile(r"^n\d{8}$")


class UsageError(ValueError):
    """A user input the CLI refuses: one `error:` line on stderr, exit code 2."""


# ----------------------------------------------------------------------------- checks on inputs

def _check_out_path(path: str | os.PathLike, flag: str = "--out") -> Path:
    """`path` as a file this command may write, refused before any work when it is an existing
    folder or non-regular file (/dev/null, a FIFO; a symlink to a regular file is fine), or when its
    folder does not exist or cannot be written (checked with os.access and by creating and removing
    a probe file there, which catches /proc, read-only mounts and root's unlimited os.access)."""
    text = os.fspath(path)
    if not text:
        raise UsageError(f"{flag} is empty: give a file name")
    p = Path(text).expanduser()
    if p.is_dir():
        raise UsageError(f"{flag} {text} is a directory: give a file name (e.g. {p / 'model.bitdown'})")
    if p.exists() and not p.is_file():
        raise UsageError(f"{flag} {text} exists and is not a regular file (a device, pipe or socket): "
                         f"refusing to write to it")
    parent = p.parent
    if not parent.exists():
        raise UsageError(f"{flag} {text}: folder {str(parent)!r} does not exist (create it first)")
    if not parent.is_dir():
        raise UsageError(f"{flag} {text}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {text}: folder {str(parent)!r} is not writable")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{p.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{flag} {text}: cannot write in folder {str(parent)!r}: {e.strerror or e}") from None
    return p


def _check_source(path: str, flag: str) -> None:
    """An image folder or zip given to `flag` must exist (checked before any work)."""
    if not Path(path).expanduser().exists():
        raise UsageError(f"{flag} {path}: not found (give a folder or .zip of images)")


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_device(spec: str | None) -> torch.device | None:
    """The torch device `spec` names, refused up front when torch does not know it or cannot use it."""
    if spec is None:
        return None
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError) as e:
        raise UsageError(f"--device {spec!r} is not a device torch knows (e.g. cpu, cuda, cuda:1, mps): "
                         f"{str(e).splitlines()[0]}") from None
    if dev.type == "meta":
        raise UsageError(f"--device {spec!r}: the meta device holds no data; use e.g. cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec!r} asked for, but torch sees no CUDA device")
    try:
        torch.empty(1, device=dev)
    except Exception as e:             # a backend torch knows by name but cannot use here
        raise UsageError(f"--device {spec!r} cannot be used here: {str(e).splitlines()[0]}") from None
    return dev


def _parse_shape(text: str) -> list[int]:
    try:
        shape = [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--input-shape must be comma-separated integers like 1,3,224,224, got {text!r}") from None
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise UsageError(f"--input-shape must be (batch, ...) with positive sizes, e.g. 1,3,224,224, got {text!r}")
    return shape


def _forward(model: nn.Module, x: torch.Tensor, what: str) -> Any:
    """`model(x)` in eval mode without gradients (its mode restored); a RuntimeError there (an input
    of the wrong shape or channel count) is a UsageError saying which input: `what`."""
    from .modules import module_device

    was_training = model.training
    try:
        with torch.no_grad():
            return model.eval()(x.to(module_device(model)))
    except RuntimeError as e:
        raise UsageError(f"{what} (shape {','.join(map(str, x.shape))}) does not fit the model: "
                         f"{str(e).splitlines()[0]}") from None
    finally:
        model.train(was_training)


def _check_input_shape(model: nn.Module, shape: list[int], where: str) -> None:
    """One forward pass on zeros of `shape`: a shape the model cannot take is a clear error, not a
    traceback from inside the exporter."""
    _forward(model, torch.zeros(shape), f"the input shape {where}")


# ----------------------------------------------------------------------------- models

def _import_builder(spec: str):
    """The function `module:function` names (the current folder is importable, as for `python -m`)."""
    mod_name, fn_name = spec.split(":", 1)
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"cannot import {spec!r}: {e}") from None


def _build_user(spec: str) -> nn.Module:
    model = _import_builder(spec)()
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    return model


def resolve_model(spec: str, weights: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """A zoo name or `module:function` -> (model in eval mode, arch metadata). The arch of a user
    model records the spec as its name ({"name": "mypkg.models:build", "source": "user"}), so eval
    and export can rebuild it from the file."""
    from .zoo import ZOO, build_model, load_weights

    if spec in ZOO:
        entry = ZOO[spec]
        model = build_model(spec, weights if weights else "default")
        return model, {"name": spec, "source": "zoo", "preprocess": entry.preprocess}
    if ":" not in spec:
        raise UsageError(f"unknown model {spec!r}: give a zoo name ({', '.join(sorted(ZOO))}) or module:function")
    model = _build_user(spec)
    if weights:
        load_weights(model, weights)
    return model.eval(), {"name": spec, "source": "user"}


def _architecture(spec: str) -> nn.Module:
    """The dense architecture `spec` names, for loading a file into (no weights: the file has them)."""
    from .zoo import ZOO

    if spec in ZOO:
        return ZOO[spec].build()
    return resolve_model(spec, None)[0]


def _reimportable(spec: Any) -> bool:
    """Whether a user architecture recorded in a file may be imported again without --model: a
    plain `package.module:function` whose package is not the standard library (a file is not
    trusted to name arbitrary code; `--model` always can)."""
    if not isinstance(spec, str) or not _SPEC_RE.match(spec):
        return False
    top = spec.split(":", 1)[0].split(".", 1)[0]
    return top not in getattr(sys, "stdlib_module_names", ()) and top not in ("builtins", "__main__")


def _load_file(path: str, model_spec: str | None, frozen: bool = False) -> nn.Module:
    """Load a compressed file (`frozen`: as an inference-only model, bitdown.freeze). Its architecture:
    `model_spec` when given; else the zoo entry the file names; else the user's `module:function` the file
    records, imported again (said on stderr)."""
    from . import load, serialize
    from .zoo import ZOO

    if model_spec:
        return load(path, _architecture(model_spec), frozen=frozen)
    _, meta = serialize.read(path)
    arch = meta.get("arch", {})
    name = arch.get("name")
    if arch.get("source") == "zoo" and name in ZOO:
        return load(path, frozen=frozen)
    if arch.get("source") == "user" and _reimportable(name):
        try:
            model = _build_user(name)
        except UsageError as e:
            raise UsageError(f"{path}: architecture {name!r} is not in the zoo and its module:function cannot be "
                             f"rebuilt here ({e}): pass --model module:function (or run from the folder that "
                             f"holds the module)") from None
        print(f"bitdown: rebuilt the architecture with {name} (recorded in {path}); pass --model to use another",
              file=sys.stderr)
        return load(path, model, frozen=frozen)
    raise UsageError(f"{path}: architecture {name!r} is not in the zoo; pass --model module:function")


# ----------------------------------------------------------------------------- labels

def _read_classes(text: str) -> list[str]:
    """--classes: a text file with one class name per line, or comma-separated names, in the order
    of the model's outputs."""
    p = Path(text).expanduser()
    names = ([line.strip() for line in p.read_text().splitlines()] if p.is_file()
             else [t.strip() for t in text.split(",")])
    names = [n for n in names if n]
    if not names:
        raise UsageError(f"--classes {text!r} names no class")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"--classes names {dup[:5]} more than once")
    return names


def _model_classes(arch: dict[str, Any], classes_flag: str | None = None,
                   model_spec: str | None = None) -> list[str] | None:
    """The model's class names in output order: --classes; else the file's arch "classes"; else the
    zoo entry of the arch (or of --model); None when unknown."""
    from .zoo import ZOO

    if classes_flag:
        return _read_classes(classes_flag)
    if isinstance(arch.get("classes"), list) and arch["classes"]:
        return [str(c) for c in arch["classes"]]
    for name in (arch.get("name") if arch.get("source") == "zoo" else None, model_spec):
        entry = ZOO.get(name) if isinstance(name, str) else None
        if entry is not None and entry.classes:
            return list(entry.classes)
    return None


def _label_mode(labels: str | None, classes: Sequence[str] | None, preprocess: str) -> str:
    if labels:
        return labels
    if classes:
        return "wnid" if all(_WNID_RE.match(c) for c in classes) else "parent"
    return "wnid" if preprocess in ("imagenet", "efficientnet") else "parent"


def _eval_data(path: str, preprocess: str, labels: str | None, classes: Sequence[str] | None):
    """Labelled images whose labels index the model's classes (folder names / WNIDs mapped to them).
    Without class names: the sorted folder names, with a warning."""
    from .data import ImageDataset

    mode = _label_mode(labels, classes, preprocess)
    ds = ImageDataset(path, preprocess, labels=mode, classes=classes)
    if classes is None and mode == "parent":
        log.warning("the model records no class names: label i is the i-th of the sorted folder names of %s (%s); "
                    "pass --classes if its outputs are in another order", path, ", ".join(ds.classes[:10]))
    return ds


def _check_eval_model(model: nn.Module, ds, classes: Sequence[str] | None) -> None:
    """One forward pass on one image: the model must return (N, C) logits, with C = the number of
    class names when they are known (checked before long work)."""
    from .evaluate import check_logits

    out = check_logits(_forward(model, ds[0][0][None], f"an image of {ds.source} preprocessed as "
                                                       f"{ds.preset.name!r}"))
    if classes is not None and out.shape[1] != len(classes):
        raise UsageError(f"the model has {out.shape[1]} outputs but {len(classes)} class names")


def _data(path: str, preprocess: str, labels: str, train: bool = False, seed: int = 0, image_size: int = 640):
    if preprocess == LETTERBOX:                  # detectors: letterboxed photos (detection.py), train: random flips
        from .detection import LetterboxDataset

        return LetterboxDataset(path, size=image_size, labels=labels != "none", train=train, seed=seed)
    from .data import ImageDataset

    return ImageDataset(path, preprocess, labels=labels, train=train, seed=seed)


LETTERBOX = "letterbox"       # the detectors' preprocessing (zoo yolov5n_coco)
SYNTHETIC = "synthetic:"      # --data synthetic:N: images synthesised from the model (bitdown.synthesize)


def _synthetic_count(spec: str | None, flag: str) -> int | None:
    """N of `synthetic:N` (None for a path); a count that is not a positive integer is a clear error."""
    if spec is None or not spec.startswith(SYNTHETIC):
        return None
    text = spec[len(SYNTHETIC):]
    try:
        n = int(text)
    except ValueError:
        raise UsageError(f"{flag} {spec!r}: give synthetic:N with N a number of images, e.g. synthetic:2048") from None
    if n < 1:
        raise UsageError(f"{flag} {spec!r}: the number of synthetic images must be at least 1")
    return n


def _synth_config(a: argparse.Namespace, extra: dict[str, Any] | None = None):
    """SynthConfig from --synth-config / --config JSON, then the flags given (seed, steps, batch size)."""
    from .synthesize import SynthConfig

    given = {"seed": a.seed, "steps": getattr(a, "steps", None), "batch_size": getattr(a, "batch_size", None)}
    return SynthConfig.from_dict({**(extra or {}), **{k: v for k, v in given.items() if v is not None}})


def _synthetic_data(a: argparse.Namespace, model: nn.Module, preprocess: str, n: int, train: bool):
    """(calibration, fine-tuning or None) datasets of `n` images synthesised from `model`: in memory, or in
    --synth-cache (PNGs, resumed when rerun with the same settings)."""
    from .data import PixelDataset
    from .synthesize import synthesize

    if preprocess == LETTERBOX:
        raise UsageError("synthetic data needs a classification preprocessing preset (cifar10, imagenet, "
                         "efficientnet); detectors take real images")
    cfg = _synth_config(a, _json_object(a.synth_config, "--synth-config"))
    res = synthesize(model, n, preprocess, cfg, out=a.synth_cache, device=a.device)
    log.info("synthesised %d images in %.1f s", n, res.seconds)
    src = f"synthetic:{n}"
    calib = PixelDataset(res.images, preprocess, source=src)
    return calib, (PixelDataset(res.images, preprocess, train=True, seed=a.seed, source=src) if train else None)


def _compress_data(a: argparse.Namespace, model: nn.Module, preprocess: str, train: bool, image_size: int):
    """(calibration, fine-tuning or None) datasets of --data plus --extra-data, each a folder / zip of images
    or synthetic:N."""
    from .data import ConcatImages

    calibs, trains = [], []
    for spec, flag in ((a.data, "--data"), (a.extra_data, "--extra-data")):
        if spec is None:
            continue
        n = _synthetic_count(spec, flag)
        if n is not None:
            c, t = _synthetic_data(a, model, preprocess, n, train)
        else:
            c = _data(spec, preprocess, "none", image_size=image_size)
            t = _data(spec, preprocess, "none", train=True, seed=a.seed, image_size=image_size) if train else None
        calibs.append(c)
        trains.append(t)
    if len(calibs) == 1:
        return calibs[0], trains[0]
    return ConcatImages(calibs), (ConcatImages(trains) if train else None)


def _check_eval_task(path: str, detector: bool, what: str, flag: str) -> None:
    """Labelled data of the other task is refused before any work, naming both: a detector needs YOLO box labels
    (.txt files next to the images), a classifier class folders or WNID file names and no box labels."""
    from .detection import has_yolo_labels

    boxes = has_yolo_labels(path)
    if detector and not boxes:
        raise UsageError(f"{what} is a detector (task: detect, COCO mAP) but {flag} {path} holds no YOLO box labels "
                         "(.txt files named like the images, 'class cx cy w h' per line): it looks like "
                         "classification data")
    if not detector and boxes:
        raise UsageError(f"{what} is a classifier (task: classify, top-1) but {flag} {path} holds YOLO box labels "
                         "(detection data): give class-labelled images (class folders or ImageNet WNID file names)")


def _emit(obj: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=None, default=float))
    else:
        for k, v in obj.items():
            if not isinstance(v, (list, dict)):
                print(f"{k:>18}: {v:.4f}" if isinstance(v, float) else f"{k:>18}: {v}")


# ----------------------------------------------------------------------------- configs

def _json_object(text: str | None, flag: str) -> dict[str, Any]:
    """The JSON object given to `flag` ({} when absent); anything else is a clear error."""
    try:
        obj = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise UsageError(f"{flag} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{flag} must be a JSON object")
    return obj


def _is_detector(arch: dict[str, Any]) -> bool:
    """A detector: a zoo entry whose task is 'detect', or any model fed letterboxed images."""
    from .zoo import ZOO

    entry = ZOO.get(arch.get("name")) if arch.get("source") == "zoo" else None
    return (entry is not None and entry.task == "detect") or arch.get("preprocess") == LETTERBOX


def _recipe(a: argparse.Namespace, kind: str = "default", ratio: float | None = None
            ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(QuantConfig keys, FinetuneConfig keys, data keys) of recipe `kind` (recipes.recipe_kind: 'default',
    'compact' or 'detector') under --fast, for a budget of `ratio` (allocate.budget_ratio; None: no budget)."""
    from .recipes import recipe

    return recipe(kind, fast=bool(getattr(a, "fast", False)), ratio=ratio, synthetic=_data_is_synthetic(a))


def _log_long_recipe(a: argparse.Namespace, kind: str, ratio: float | None, global_steps: int) -> None:
    """Say so when the budget switched the default recipe to its long distillation (recipes.long_distillation)
    and nothing the user gave changed the step count."""
    from .recipes import LONG_GLOBAL_STEPS, LONG_RATIO, long_distillation

    if kind == "default" and not a.fast and long_distillation(ratio) and global_steps == LONG_GLOBAL_STEPS:
        log.info("budget %.1fx is above %gx: the default recipe distils %d global steps (--global-steps N to change)",
                 ratio, LONG_RATIO, global_steps)


def _data_is_synthetic(a: argparse.Namespace) -> bool:
    """Whether --data is images synthesised by bitdown: `synthetic:N`, or a folder `bitdown synthesize` wrote (its
    manifest is there) — not mixed with real --extra-data."""
    from .synthesize import MANIFEST

    data, extra = getattr(a, "data", None), getattr(a, "extra_data", None)
    if data is None or extra is not None:
        return False
    return _synthetic_count(data, "--data") is not None or (Path(data).expanduser() / MANIFEST).is_file()


def _detector_calib_size(a: argparse.Namespace) -> int:
    """Letterbox size of a detector run's calibration / distillation images: --calib-size, else the detector
    recipe's (its calibration image count comes with the recipe's other data keys, `_quant_config`)."""
    from .recipes import detector_recipe

    return a.calib_size or detector_recipe()[2]["calib_size"]


def _quant_config(a: argparse.Namespace, arch: dict[str, Any], kind: str = "default"):
    """QuantConfig: the recipe's keys (none depends on the budget), then the flags the user gave, then `--config` JSON
    on top (its "em" dict merges into the EM options, its "reconstruct" dict over the recipe's and --reconstruct's)."""
    from .config import EMConfig, QuantConfig
    from .recipes import zoo_config

    recipe, _, data = _recipe(a, kind)
    extra = _json_object(a.config, "--config")
    em = {"n_iter": a.em_iters, "n_restarts": a.restarts}
    if a.paper_em:
        em.update(error_feedback=False, code_reopt=0, codebook_refit=False, teacher_target=False)
    em.update(_sub_object(extra.pop("em", None), "--config's \"em\""))
    recon = {**(recipe.pop("reconstruct", None) or {}),
             **({"grad_slices": a.grad_slices} if getattr(a, "grad_slices", None) is not None else {}),
             **_json_object(getattr(a, "reconstruct", None), "--reconstruct"),
             **_sub_object(extra.pop("reconstruct", None), "--config's \"reconstruct\"")}
    flags: dict[str, Any] = {"seed": a.seed}
    calib_images = a.calib_images if a.calib_images is not None else data.get("calib_images")
    if calib_images is not None:
        flags["calib_images"] = calib_images
    if getattr(a, "codebook_bits", None) is not None:
        flags["codebook_bits"] = a.codebook_bits
    if getattr(a, "share_same_shape", False):
        flags["share_same_shape"] = True
    if getattr(a, "blocks", None):
        flags["blocks"] = list(a.blocks)
    kw = {**recipe, **flags, **extra, "em": EMConfig.from_dict(em), "reconstruct": recon}
    if arch["source"] == "zoo":
        return zoo_config(a.model, kw.pop("preset", a.preset), **kw)
    return QuantConfig.from_dict({"preset": a.preset, **kw})


def _sub_object(obj: Any, what: str) -> dict[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise UsageError(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


def _finetune_config(a: argparse.Namespace, kind: str = "default", ratio: float | None = None):
    """FinetuneConfig: the recipe's keys (for a budget of `ratio`), then the flags the user gave, then
    `--finetune-config` on top."""
    from .finetune import FinetuneConfig

    _, recipe, _ = _recipe(a, kind, ratio)
    given = {"layer_steps": a.finetune_steps, "global_steps": a.global_steps, "batch_size": a.ft_batch_size,
             "loss": getattr(a, "distill_loss", None), "grad_slices": getattr(a, "grad_slices", None)}
    return FinetuneConfig.from_dict({**recipe, "seed": a.seed, "checkpoint_every": a.checkpoint_every,
                                     **{k: v for k, v in given.items() if v is not None},
                                     **_json_object(a.finetune_config, "--finetune-config")})


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
    from . import compress, dist, save
    from .checkpoint import fingerprint
    from .data import make_loader
    from .evaluate import eval_batch_size, evaluate
    from .modules import module_device
    from .recipes import recipe_kind
    from .size import size_report

    # paths and device first: nothing is built or read before they are known to be usable
    out_path = _check_out_path(a.out, "--out")
    for spec, flag in ((a.data, "--data"), (a.extra_data, "--extra-data")):
        if spec is not None and _synthetic_count(spec, flag) is None:
            _check_source(spec, flag)
    n_synthetic = sum(_synthetic_count(spec, flag) is not None for spec, flag in ((a.data, "--data"),
                                                                                  (a.extra_data, "--extra-data")))
    if n_synthetic > 1:
        raise UsageError("synthetic:N is given to both --data and --extra-data: give it once (the two would be the "
                         "same images)")
    for flag, value in (("--synth-cache", a.synth_cache), ("--synth-config", a.synth_config)):
        if value is not None and not n_synthetic:
            raise UsageError(f"{flag} is for synthetic data: give --data or --extra-data synthetic:N")
    if a.synth_cache is not None and Path(a.synth_cache).expanduser().exists() \
            and not Path(a.synth_cache).expanduser().is_dir():
        raise UsageError(f"--synth-cache {a.synth_cache}: exists and is not a folder")
    if a.eval_data:
        _check_source(a.eval_data, "--eval-data")
        for spec, flag in ((a.data, "--data"), (a.extra_data, "--extra-data")):
            if spec is not None and _same_file(spec, a.eval_data):
                raise UsageError(f"{flag} and --eval-data are the same ({a.eval_data}): calibrating on the "
                                 "evaluation images makes the reported figures meaningless; give separate images")
    if a.weights and _same_file(a.weights, out_path):
        raise UsageError(f"--out {a.out} is the --weights file: it would overwrite the model being compressed")
    _check_device(a.device)
    device = dist.init(a.device)            # torchrun: join the process group (cuda: this rank's GPU)
    if dist.active():                       # every rank must have been given the same command
        dist.check_same(fingerprint({k: v for k, v in sorted(vars(a).items()) if k != "fn"}), "command-line options")
        a.device = None if device is None else str(device)

    torch.manual_seed(a.seed)
    model, arch = resolve_model(a.model, a.weights)
    preprocess = a.preprocess or arch.get("preprocess")
    if preprocess is None:
        raise UsageError("--preprocess is required for a module:function model")
    arch["preprocess"] = preprocess
    classes = _model_classes(arch, a.classes)
    if a.classes and "classes" in _arch_keys():
        arch["classes"] = classes
    detector = _is_detector(arch)
    if detector and preprocess != LETTERBOX:
        raise UsageError(f"{a.model} is a detector: it needs --preprocess {LETTERBOX} (got {preprocess!r})")
    kind = recipe_kind(model, detector)
    config = _quant_config(a, arch, kind)
    ratio = None
    if a.target_ratio is not None or a.target_size is not None:    # an impossible budget: refused before reading data
        from .allocate import budget_ratio
        ratio = budget_ratio(model, config, a.target_ratio, a.target_size, extra=config.alloc_menu)
    ft = _finetune_config(a, kind, ratio)
    _log_long_recipe(a, kind, ratio, ft.global_steps)
    calib_size = _detector_calib_size(a) if detector else None
    if a.device is not None:                 # a device torch cannot use: refused before reading data
        from .compress import resolve_device
        resolve_device(model, a.device)
    ev = None
    if a.eval_data:
        _check_eval_task(a.eval_data, detector, a.model, "--eval-data")
    if a.eval_data and detector:             # a detector: COCO mAP on YOLO-labelled images
        ev = _data(a.eval_data, preprocess, "yolo", image_size=a.image_size)
    elif a.eval_data:                        # labels and the model's output checked before compressing
        ev = _eval_data(a.eval_data, preprocess, a.labels, classes)
        _check_eval_model(model, ev, classes)
    calib, train = _compress_data(a, model, preprocess, ft.enabled, calib_size or a.image_size)
    _forward(model, calib[0][None], f"an image of {a.data} preprocessed as {preprocess!r}")
    log.info("recipe %s%s: %s; fine-tuning %s", kind, " (--fast)" if a.fast else "", config.to_json(), ft.to_json())
    t0 = time.perf_counter()
    q = compress(model, make_loader(calib, config.batch_size, shuffle=True, seed=a.seed), config, arch=arch,
                 checkpoint_dir=a.checkpoint_dir, finetune=ft if ft.enabled else None, train_data=train,
                 target_ratio=a.target_ratio, target_size=a.target_size, device=a.device)
    wall = time.perf_counter() - t0
    if not dist.is_main():                  # rank 0 writes the file and reports
        return 0
    path = save(q, out_path)
    rep = size_report(q, q.bitdown.plans)
    out = {"out": str(path), "size_mb": rep.size_mb, "ratio": rep.ratio, "bytes_on_disk": path.stat().st_size,
           "layers": len(q.bitdown.plans), "recipe": kind + (" fast" if a.fast else ""), "wall_s": wall}
    alloc = q.bitdown.extra.get("allocation")
    if isinstance(alloc, dict) and "max_error" in alloc:     # the error cap the allocation used (of a list: the one
        out["alloc_max_error"] = alloc["max_error"]          # alloc_cap_rule picked) and, measured, each cap's error
        if alloc.get("cap_errors"):
            out["cap_errors"] = alloc["cap_errors"]
    if ev is not None and detector:
        from .detection import evaluate_detection
        teacher_map = evaluate_detection(model.to(module_device(q)), ev, batch_size=8)
        res = evaluate_detection(q, ev, batch_size=8)
        out.update(teacher_map50_95=teacher_map["map50_95"], map50_95=res["map50_95"], map50=res["map50"],
                   eval_images=res["n_images"])
    elif ev is not None:
        res = evaluate(q, make_loader(ev, eval_batch_size(ev[0][0].shape)), teacher=model.to(module_device(q)))
        out.update(teacher_top1=res["teacher_top1"], top1=res["top1"], drop=res["teacher_top1"] - res["top1"],
                   agreement=res["agreement"], eval_images=res["n"])
    _emit(out, a.json)
    return 0


def _arch_keys() -> tuple[str, ...]:
    from . import serialize

    return tuple(getattr(serialize, "ARCH_KEYS", ()))


def cmd_eval(a: argparse.Namespace) -> int:
    from .data import make_loader
    from .evaluate import eval_batch_size, evaluate

    if a.file is None and a.model is None:
        raise UsageError("give a compressed FILE, or --model (zoo name or module:function) to evaluate an "
                         "uncompressed model")
    if a.file is not None and a.weights:
        raise UsageError("--weights is for an uncompressed model (no FILE): a compressed file holds its own weights")
    _check_source(a.data, "--data")
    if a.file is not None:
        model = _load_file(a.file, a.model, frozen=True)     # inference only: the dense model's speed
        arch = dict(model.bitdown.arch)
    else:
        model, arch = resolve_model(a.model, a.weights)
    preprocess = a.preprocess or arch.get("preprocess")
    if preprocess is None:
        raise UsageError(("the file records no preprocessing" if a.file else f"{a.model} has no known preprocessing")
                         + "; pass --preprocess")
    detector = _is_detector({**arch, "preprocess": preprocess})
    _check_eval_task(a.data, detector, a.file or a.model, "--data")
    if detector:                                 # a detector: COCO mAP (pycocotools) on YOLO-labelled images
        from .cli_detect import evaluate_file_or_model
        evaluate_file_or_model(model, a.data, a.json, a.image_size)
        return 0
    classes = _model_classes(arch, a.classes, a.model)
    ds = _eval_data(a.data, preprocess, a.labels, classes)
    _check_eval_model(model, ds, classes)
    res = evaluate(model, make_loader(ds, a.batch_size or eval_batch_size(ds[0][0].shape)))
    res["n_skipped"] = ds.n_skipped
    _emit(res, a.json)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .data import get_preset
    from .export import export_onnx

    out_path = _check_out_path(a.out, "--out")
    if _same_file(a.file, out_path):
        raise UsageError(f"--out {a.out} is the input file: it would be overwritten")
    shape = _parse_shape(a.input_shape) if a.input_shape else None
    q = _load_file(a.file, a.model)
    where = "given by --input-shape"
    if shape is None:
        preprocess = q.bitdown.arch.get("preprocess")
        if preprocess is None:
            raise UsageError("the file records no preprocessing; pass --input-shape")
        crop = a.image_size if preprocess == LETTERBOX else get_preset(preprocess).crop
        shape, where = [1, 3, crop, crop], f"of the file's preprocessing {preprocess!r} (pass --input-shape)"
    _check_input_shape(q, shape, where)
    path = export_onnx(q, out_path, shape, check=not a.no_check)
    _emit({"out": str(path), "bytes_on_disk": path.stat().st_size, "bitdown_bytes": Path(a.file).stat().st_size,
           "input_shape": shape}, a.json)
    return 0


def _layer_stats(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per layer: relative output error (the EM's, from the file's "em" metadata; None when not
    recorded), paper-style bits per weight and bytes (a shared codebook counted at its first layer)."""
    from .config import LayerPlan
    from .size import layer_size

    em = meta.get("em") or {}
    seen: set[str] = set()
    out = {}
    for d in meta["layers"]:
        p = LayerPlan.from_json(d)
        ls = layer_size(p, count_codebook=p.share is None or p.share not in seen)
        if p.share is not None:
            seen.add(p.share)
        err = (em.get(p.name) or {}).get("rel_error")
        err = float(err) if isinstance(err, (int, float)) and math.isfinite(err) else None
        out[p.name] = {"quantizer": getattr(p, "quantizer", "pq"), "rel_error": err,
                       "bits_per_weight": ls.bits_per_weight, "bytes": ls.index_bytes + ls.codebook_bytes,
                       "index_bytes": ls.index_bytes, "codebook_bytes": ls.codebook_bytes, "n_weights": ls.n_weights}
    return out


def _plot_layers(path: Path, title: str, stats: dict[str, dict[str, Any]]) -> None:
    """A per-layer bar chart: relative output error and bits per weight."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'bitdown[bench]' (or pip install matplotlib)") from None
    names = list(stats)
    errs = [s["rel_error"] if s["rel_error"] is not None else float("nan") for s in stats.values()]
    bpw = [s["bits_per_weight"] for s in stats.values()]
    n = len(names)
    fig = Figure(figsize=(max(6.0, 0.3 * n + 2), 6.5))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.bar(range(n), errs, color="tab:red")
    ax1.set_ylabel("relative output error")
    ax1.set_title(title, fontsize=10)
    ax2.bar(range(n), bpw, color="tab:blue")
    ax2.set_ylabel("bits per weight")
    ax2.set_xticks(range(n))
    ax2.set_xticklabels(names, rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cmd_info(a: argparse.Namespace) -> int:
    from . import serialize

    plot = _check_out_path(a.plot, "--plot") if a.plot else None
    tensors, meta = serialize.read(a.file)
    layers = meta["layers"]
    stats = _layer_stats(meta)
    out = {"file": a.file, "bytes_on_disk": Path(a.file).stat().st_size, "format_version": meta["format_version"],
           "arch": meta.get("arch"), **meta.get("size", {}), "n_layers": len(layers), "layers": layers,
           "per_layer": stats, "skipped": meta.get("skipped", {}), "config": meta.get("config"),
           "allocation": meta.get("extra", {}).get("allocation")}
    if plot is not None:
        _plot_layers(plot, f"{Path(a.file).name}: {out['arch'].get('name')}", stats)
        out["plot"] = str(plot)
    if a.json:
        print(json.dumps(out, default=float))
        return 0
    print(f"{a.file}: {out['arch'].get('name')} — {out.get('size_mb', float('nan')):.4f} MB paper-style, "
          f"{out.get('ratio', float('nan')):.1f}x, {out['bytes_on_disk']} bytes on disk")
    print(f"  {'layer':<40} {'kind':<8} {'d, K':<13} {'shape':<14} {'rel.err':>7} {'bits/w':>7} {'bytes':>10}")
    for p in layers:
        s = stats[p["name"]]
        cb = " int8-codebook" if p.get("codebook_bits", 16) == 8 else ""
        cb += f" shared:{p['share']}" if p.get("share") else ""
        err = f"{s['rel_error']:.4f}" if s["rel_error"] is not None else "-"
        how = (f"d={p['block_size']:<3} K={p['n_centroids']:<5}" if s["quantizer"] == "pq"
               else f"{s['quantizer']:<13}")
        print(f"  {p['name']:<40} {p['kind']:<8} {how} {'x'.join(map(str, p['weight_shape'])):<14} {err:>7} "
              f"{s['bits_per_weight']:>7.3f} {s['bytes']:>10,.0f}{cb}")
    for n, why in out["skipped"].items():
        print(f"  {n:<40} kept: {why}")
    if out["allocation"]:
        al = out["allocation"]
        print(f"  allocation: budget {al['budget_bytes'] / 2**20:.4f} MB, achieved "
              f"{al['achieved_bytes'] / 2**20:.4f} MB ({al['ratio']:.1f}x)")
    if plot is not None:
        print(f"  plot: {plot}")
    return 0


# ----------------------------------------------------------------------------- parser

class _Help(argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help (unless the text already says it, or there is none);
    descriptions and example epilogs kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" in text or "default:" in text or not action.option_strings
                or action.default is None or action.default is False or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _recipe_text() -> tuple[dict[str, Any], dict[str, Any], str]:
    from .recipes import (LONG_GLOBAL_STEPS, LONG_RATIO, SYNTHETIC_FINETUNE, compact_recipe, default_recipe,
                          detector_recipe)

    quant, ft = default_recipe()
    fast, _ = default_recipe(fast=True)
    dq, dft, ddata = detector_recipe()
    cq, _, cdata = compact_recipe()
    text = (f"Defaults are the recipe (recipes.default_recipe): QuantConfig {json.dumps(quant)}, fine-tuning "
            f"{json.dumps(ft)} ({LONG_GLOBAL_STEPS} global steps for a budget above {LONG_RATIO:g}x); --fast: "
            f"{json.dumps(fast)} and no fine-tuning (the EM only). Images synthesised by bitdown (--data "
            f"synthetic:N, or a folder `bitdown synthesize` wrote) add {json.dumps(SYNTHETIC_FINETUNE)}. Each flag given "
            f"overrides its part of the recipe; --config / --finetune-config JSON go on top of everything.")
    det = (f"Detectors (a zoo entry with task 'detect', e.g. yolov5n_coco, or --preprocess letterbox) get "
           f"recipes.detector_recipe instead: QuantConfig {json.dumps(dq)}, fine-tuning {json.dumps(dft)} "
           f"(normalised MSE on the raw head maps), calibration {json.dumps(ddata)} (letterbox px, images).")
    compact = (f"Compact networks (a depthwise conv: MobileNet/EfficientNet-style) get recipes.compact_recipe: "
               f"QuantConfig {json.dumps(cq)} (of the error caps the budget allows, the one whose fast-quantized "
               f"network is closest to the teacher on the calibration images), no fine-tuning (the EM only; "
               f"distillation on few images cost EfficientNet-Lite0 ~3 pt), calibration {json.dumps(cdata)}.")
    return quant, ft, "\n\n".join(textwrap.fill(t, 100) for t in (text, compact, det))


def build_parser() -> argparse.ArgumentParser:
    from .config import GRAD_SLICES
    from .recipes import LONG_GLOBAL_STEPS, LONG_RATIO

    quant, ft, recipe_text = _recipe_text()
    recon = quant.get("reconstruct", {})
    p = argparse.ArgumentParser(
        prog="bitdown", formatter_class=_Help,
        description="Output-aware product quantization of CNNs. User errors exit with code 2.",
        epilog="example:\n  bitdown compress --model resnet20_cifar10 --data train.zip --eval-data test.zip "
               "--out r20.bitdown\n  bitdown COMMAND --help   (each command's options, defaults and an example)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details (INFO)")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser(
        "size", formatter_class=_Help, help="paper-style size of a zoo architecture under a preset (no weights needed)",
        description="Paper-style size of a zoo architecture under a preset (no weights needed).",
        epilog="example:\n  bitdown size resnet50 --preset small --json")
    s.add_argument("arch", help="zoo name, e.g. resnet20_cifar10, resnet50, efficientnet_lite0")
    s.add_argument("--preset", default="small", choices=["small", "large"], help="the paper's block sizes")
    s.add_argument("--codebook-bits", type=int, default=16, choices=[16, 8],
                   help="16: fp16 codebooks (the paper); 8: int8 codebooks with fp16 column scales")
    s.add_argument("--share-same-shape", action="store_true", help="one codebook per group of same-shape layers")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(fn=cmd_size)

    c = sub.add_parser(
        "compress", formatter_class=_Help, help="compress a model on unlabelled images",
        description="Compress a model on unlabelled images.\n\n" + recipe_text,
        epilog="examples:\n"
               "  bitdown compress --model resnet20_cifar10 --data cifar10-train.zip --eval-data cifar10-test.zip \\\n"
               "      --out r20.bitdown    # the default recipe; prints teacher/compressed top-1, drop, agreement\n"
               "  bitdown compress --model mypkg.models:build --weights model.pth --preprocess imagenet \\\n"
               "      --data imgs/ --fast --out m.bitdown     # your own model, EM only\n"
               "  bitdown compress --model yolov5n_coco --data photos.zip --target-ratio 26 --out y.bitdown \\\n"
               "      --eval-data coco128.zip               # a detector: its recipe; prints teacher/compressed mAP")
    c.add_argument("--model", required=True, help="zoo name or module:function returning an nn.Module")
    c.add_argument("--weights", help="checkpoint (.pt/.pth/.th via weights_only, or .safetensors); default: "
                                     "a zoo model's own weights, a module:function model's initialisation")
    c.add_argument("--data", required=True, help="folder or zip of unlabelled calibration images, or synthetic:N: N "
                                                 "images synthesised from the model's BatchNorm statistics (no data; "
                                                 "see bitdown synthesize)")
    c.add_argument("--extra-data", metavar="DATA", help="more images mixed with --data for calibration and "
                                                        "fine-tuning: a folder / zip, or synthetic:N")
    c.add_argument("--synth-config", metavar="JSON", help="synthesis options for synthetic:N (synthesize.SynthConfig: "
                                                          "steps, batch_size, lr, w_div, w_tv, jitter, ...)")
    c.add_argument("--synth-cache", metavar="DIR", help="synthetic:N: write the images to this folder as PNGs (a "
                                                        "rerun with the same settings reads them back); default: "
                                                        "in memory")
    c.add_argument("--preprocess", help="data preset (cifar10|imagenet|efficientnet); default: a zoo model's own "
                                        "(required for a module:function model)")
    c.add_argument("--preset", default="small", choices=["small", "large"],
                   help="the paper's block sizes: small = d 9 (3x3) / 4 (1x1, linear), large = 18 / 8 / 4")
    budget = c.add_mutually_exclusive_group()
    budget.add_argument("--target-ratio", type=float, help="choose per-layer d and K to be R times smaller")
    budget.add_argument("--target-size", help="choose per-layer d and K to fit e.g. 100KB or 1.5MB (paper-style)")
    c.add_argument("--out", required=True, help="the .bitdown file to write (its folder must exist)")
    c.add_argument("--seed", type=int, default=0, help="seeds the image order, the EM and fine-tuning")
    c.add_argument("--calib-images", type=int,
                   help="calibration images for each layer's statistics (default: 1024); the compact and the "
                        "detector recipes: 128")
    c.add_argument("--calib-size", type=int,
                   help="detectors: letterbox size of the calibration and distillation images (default: the "
                        "detector recipe's 320; --image-size is the evaluation size)")
    c.add_argument("--fast", action="store_true",
                   help="the EM only: no block reconstruction, no distillation (minutes instead of hours on a CPU)")
    c.add_argument("--codebook-bits", type=int, choices=[16, 8],
                   help=f"16: fp16 codebooks (the paper); 8: int8 codebooks with fp16 column scales "
                        f"(default: the recipe's {quant.get('codebook_bits', 16)})")
    c.add_argument("--share-same-shape", action="store_true",
                   help="layers of the same kind and weight shape share one codebook (saves codebook bytes)")
    c.add_argument("--em-iters", type=int, default=30, help="EM iterations per layer")
    c.add_argument("--restarts", type=int, default=1, help="seeded EM initialisations per layer (the best is kept)")
    c.add_argument("--paper-em", action="store_true",
                   help="the paper's pooled EM only (default adds GPTQ-style feedback, code re-opt, codebook refit)")
    c.add_argument("--blocks", action="append", metavar="REGEX",
                   help="a regex naming the modules that form one block (repeat for several); default: residual "
                        "units and containers found by the default rules")
    c.add_argument("--reconstruct", metavar="JSON",
                   help=f"block reconstruction options (config.ReconstructConfig: steps, lr, batch_size, drop_prob, "
                        f"codes, ...) merged over the recipe's (default: {json.dumps(recon)}; --fast: steps 0)")
    c.add_argument("--finetune-steps", type=int,
                   help=f"per-layer distillation steps, 0: off (default: the recipe's {ft.get('layer_steps', 0)})")
    c.add_argument("--global-steps", type=int,
                   help=f"global distillation steps, 0: off (default: the recipe's {ft.get('global_steps', 0)}, "
                        f"{LONG_GLOBAL_STEPS} for a budget above {LONG_RATIO:g}x; --fast: 0)")
    c.add_argument("--ft-batch-size", type=int,
                   help=f"fine-tuning batch size (default: the recipe's {ft.get('batch_size', 64)})")
    c.add_argument("--grad-slices", type=int, metavar="S",
                   help="distillation and block reconstruction: each step's gradient is the sum of S fixed slices of "
                        "its batch, added in order, so N processes (torchrun; N must divide S) write the same file "
                        f"as one (default: {GRAD_SLICES}; a run differs from one with another S by float rounding)")
    c.add_argument("--distill-loss", choices=["auto", "kl", "mse", "bce"],
                   help="distillation loss: kl on class logits, mse on anything else, bce on sigmoid outputs (e.g. "
                        "a YOLO head) (default: the recipe's; auto: kl for (N, C) logits and mse otherwise)")
    c.add_argument("--checkpoint-dir", help="save progress here; rerunning the same command resumes")
    c.add_argument("--checkpoint-every", type=int, default=100, help="global fine-tuning steps between checkpoints")
    c.add_argument("--config", help="JSON of extra QuantConfig keys, e.g. '{\"name_overrides\": {...}}'")
    c.add_argument("--finetune-config", help="JSON of extra fine-tuning keys (finetune.FinetuneConfig), e.g. "
                                             "'{\"global_lr\": 3e-4, \"optimizer\": \"sgd\", \"temperature\": 2}'")
    c.add_argument("--device", help="where the forward passes and fine-tuning run, e.g. cuda (default: cpu); "
                                    "the EM runs on the CPU and the file is the same format")
    c.add_argument("--eval-data", help="labelled images (class folders, or ImageNet WNIDs in file names): reports "
                                       "teacher and compressed top-1, the drop and the top-1 agreement")
    c.add_argument("--labels", choices=["parent", "wnid"],
                   help="how --eval-data is labelled: parent folder name, or WNID (default: wnid for ImageNet "
                        "classes, else parent)")
    c.add_argument("--classes", help="the model's class names in output order: a text file (one per line) or "
                                     "comma-separated; default: a zoo model's own, else the sorted folder names")
    c.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    c.set_defaults(fn=cmd_compress)

    e = sub.add_parser(
        "eval", formatter_class=_Help,
        help="top-1 of a compressed file, or of an uncompressed model, on labelled images",
        description="Top-1 / top-5 on labelled images of a compressed FILE, or of an uncompressed model\n"
                    "(--model, no FILE). Labels are the model's class indices: folder names (or ImageNet WNIDs in\n"
                    "file names) are mapped to the model's classes (a zoo model's own, --classes, or else the\n"
                    "sorted folder names, with a warning); a name the model does not know is an error.",
        epilog="examples:\n"
               "  bitdown eval r20.bitdown --data cifar10-test.zip --json          # a compressed file\n"
               "  bitdown eval --model resnet20_cifar10 --data cifar10-test.zip    # the uncompressed model")
    e.add_argument("file", nargs="?", help="the compressed .bitdown file; omit it to evaluate --model uncompressed")
    e.add_argument("--data", required=True, help="folder or zip of labelled images")
    e.add_argument("--model", help="without FILE: the uncompressed model to evaluate (zoo name or module:function). "
                                   "With FILE: the file's architecture (default: the zoo model it names, or the "
                                   "module:function it records, imported again)")
    e.add_argument("--weights", help="without FILE: weights for --model (default: a zoo model's own)")
    e.add_argument("--preprocess", help="data preset (default: the file's or zoo model's own)")
    e.add_argument("--labels", choices=["parent", "wnid"],
                   help="parent folder name, or WNID (default: wnid for ImageNet classes, else parent)")
    e.add_argument("--classes", help="the model's class names in output order: a text file (one per line) or "
                                     "comma-separated; default: a zoo model's own, else the sorted folder names")
    e.add_argument("--batch-size", type=int, help="images per forward pass (default: 256 at 32x32 px, fewer for "
                                                   "larger images, at least 16: evaluate.eval_batch_size)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser(
        "export", formatter_class=_Help, help="write a compressed file as ONNX (codebooks and codes kept compact)",
        description="Write a compressed file as ONNX with its codebooks and codes kept compact; checked against "
                    "PyTorch\nwith onnxruntime when it is installed.",
        epilog="example:\n  bitdown export r20.bitdown --out r20.onnx")
    x.add_argument("file", help="the compressed .bitdown file")
    x.add_argument("--out", required=True, help="the .onnx file to write (its folder must exist)")
    x.add_argument("--model", help="module:function for a non-zoo architecture (default: the one the file records)")
    x.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224 (default: from the file's "
                                         "preprocessing; the batch axis stays dynamic)")
    x.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison with the model")
    x.add_argument("--json", action="store_true", help="print one JSON object")
    x.set_defaults(fn=cmd_export)

    i = sub.add_parser(
        "info", formatter_class=_Help, help="what a compressed file holds",
        description="What a compressed file holds: per layer its d, K, relative output error, bits per weight and "
                    "bytes\n(paper-style); --json adds the whole metadata.",
        epilog="example:\n  bitdown info r20.bitdown --plot r20-layers.png")
    i.add_argument("file", help="the compressed .bitdown file")
    i.add_argument("--plot", metavar="PNG", help="draw a per-layer bar chart (relative error, bits per weight) to "
                                                 "this image file (needs matplotlib: the bench extra)")
    i.add_argument("--json", action="store_true", help="print the whole metadata as one JSON object")
    i.set_defaults(fn=cmd_info)

    y = sub.add_parser(
        "synthesize", formatter_class=_Help,
        help="images synthesised from a model's own BatchNorm statistics (compress without data)",
        description="Write N images synthesised from a trained model alone (DeepInversion / ZeroQ): each batch is "
                    "optimised\nfrom noise with Adam to match every BatchNorm layer's input mean and variance to its "
                    "running\nstatistics (ZeroQ; measured best). DeepInversion's class-balanced cross-entropy, total-variation "
                    "prior\nand random jitter / flips are options (--config). PNGs in the model's input space: read them back "
                    "with\n--data FOLDER and the same preprocessing. Seeded; identical at one thread; a rerun into the "
                    "same\nfolder resumes.",
        epilog="example:\n  bitdown synthesize --model resnet20_cifar10 --n 2048 --out synth/\n"
               "  bitdown compress --model resnet20_cifar10 --data synth/ --out r20.bitdown   # or --data synthetic:2048")
    y.add_argument("--model", required=True, help="zoo name or module:function returning an nn.Module")
    y.add_argument("--weights", help="checkpoint for the model (default: a zoo model's own)")
    y.add_argument("--preprocess", help="data preset (cifar10|imagenet|efficientnet); default: a zoo model's own "
                                        "(required for a module:function model)")
    y.add_argument("--n", type=int, default=2048, help="number of images")
    y.add_argument("--out", required=True, help="folder for the PNGs (created; one holding other files is refused)")
    y.add_argument("--overwrite", action="store_true", help="write into a folder that holds other files or another "
                                                            "synthesis (that synthesis's images are removed)")
    y.add_argument("--seed", type=int, default=0, help="seeds the noise, jitter and class assignment")
    y.add_argument("--steps", type=int, help="Adam steps per batch (default: SynthConfig's 50)")
    y.add_argument("--batch-size", type=int, help="images optimised together (default: SynthConfig's 256)")
    y.add_argument("--config", help="JSON of SynthConfig keys, e.g. '{\"lr\": 0.1, \"w_tv\": 0.001}'")
    y.add_argument("--device", help="where the model runs, e.g. cuda (default: cpu)")
    y.add_argument("--json", action="store_true", help="print one JSON object")
    y.set_defaults(fn=cmd_synthesize)

    d = sub.add_parser(
        "detect", formatter_class=_Help, help="draw a detector's boxes on one image",
        description="Detect objects in one image with a detector (a .bitdown file or a zoo name such as "
                    "yolov5n_coco), draw the boxes\nwith class names and scores, and save a PNG.",
        epilog="example:\n  bitdown detect y26.bitdown photo.jpg --out boxes.png")
    d.add_argument("model", help="a compressed .bitdown detector or a zoo detector name")
    d.add_argument("image", help="the image file")
    d.add_argument("--out", required=True, help="the PNG to write")
    d.add_argument("--conf", type=float, default=0.25, help="score threshold")
    d.add_argument("--json", action="store_true", help="print the detections as one JSON object")
    d.set_defaults(fn=cmd_detect)
    for sp in (c, e, x, d):
        sp.add_argument("--image-size", type=int, default=640, help="detectors: letterbox size in pixels")
    return p


def cmd_synthesize(a: argparse.Namespace) -> int:
    from .synthesize import synthesize

    if a.n < 1:
        raise UsageError(f"--n {a.n}: give a positive number of images")
    out = Path(a.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {a.out}: exists and is not a folder (give a folder for the images)")
    if not out.exists() and not out.parent.is_dir():
        raise UsageError(f"--out {a.out}: folder {str(out.parent)!r} does not exist (create it first)")
    for flag in ("steps", "batch_size"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1")
    cfg = _synth_config(a, _json_object(a.config, "--config"))
    _check_device(a.device)
    model, arch = resolve_model(a.model, a.weights)
    preprocess = a.preprocess or arch.get("preprocess")
    if preprocess is None:
        raise UsageError("--preprocess is required for a module:function model")
    if preprocess == LETTERBOX:
        raise UsageError("synthesis needs a classification preprocessing preset (cifar10, imagenet, efficientnet)")
    res = synthesize(model, a.n, preprocess, cfg, out=out, overwrite=a.overwrite, device=a.device)
    last = res.batches[-1]
    _emit({"out": str(a.out), "images": a.n, "batches": len(res.batches), "steps": cfg.steps,
           "batch_size": cfg.batch_size, "seconds": res.seconds, "seconds_per_image": res.seconds / a.n,
           "resumed_batches": sum(1 for b in res.batches if b.get("resumed")), "final_loss": last["loss"],
           "final_bn_loss": last["bn"]}, a.json)
    return 0


def cmd_detect(a: argparse.Namespace) -> int:
    from .cli_detect import cmd_detect as detect

    _check_source(a.image, "image")
    out_path = _check_out_path(a.out, "--out")
    found = detect(a.model, a.image, out_path, conf=a.conf, image_size=a.image_size)
    _emit({"out": str(out_path), "n_boxes": len(found), "boxes": found}, a.json)
    return 0


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    return str(e) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    from . import dist

    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format=dist.log_format())
    dist.install_log_filter()                # "[rank r/N]" in every line under torchrun
    torch.set_num_threads(max(1, torch.get_num_threads()))

    try:
        return a.fn(a)
    except BrokenPipeError:  # output piped into `head` etc.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except dist.DistError as e:          # a peer process died or stopped answering (torchrun)
        print(f"error: {_message(e)}", file=sys.stderr)
        return 1
    except (ValueError, OSError, KeyError, TypeError, FloatingPointError, ImportError) as e:
        # ValueError covers UsageError and BitdownFileError; OSError a file that cannot be read or written
        print(f"error: {_where()}{_message(e)}", file=sys.stderr)
        return 2
    finally:
        dist.close()


def _where() -> str:
    """'rank r of N: ' under torchrun, else ''."""
    from . import dist

    return f"rank {dist.rank()} of {dist.world_size()}: " if dist.launched() and dist.active() else ""


if __name__ == "__main__":
    sys.exit(main())
