"""Peer baseline: Apple coremltools post-training palettization on the same models, images and size accounting
as benchmarks/accuracy.py (issue 13 item 5).

    python benchmarks/peers.py [--models resnet20_cifar10,efficientnet_lite0] [--methods ptp,skm]
                               [--settings b4,b3,b2,b2g4,...] [--skm-samples 512] [--skm-loss labels|teacher]

Methods (coremltools.optimize.torch.palettization, no fine-tuning: the EM-only equivalent):
- `ptp`: PostTrainingPalettizer, plain k-means (exact 1-D k-means, kmeans1d) of each weight tensor or group
  of output channels, with the library's defaults (fast k-means mode: weights rounded to fp16, 4 decimals).
- `skm`: SKMPalettizer, sensitivity-weighted k-means (SqueezeLLM): the k-means is weighted by a diagonal
  Fisher (squared per-sample gradients) computed on training images only (`--skm-samples` single-image
  samples of the pool `accuracy._pool_indices` gives: a seeded subset of the 50,000 CIFAR training
  images; the first N of the 500 calibration images of the seeded 500/500 ImageNet split). Loss:
  cross-entropy on the training images' labels (`labels`, the library's documented "training loss") or
  on the teacher's own top-1 (`teacher`, label-free). The model is in eval mode for the gradients
  (BatchNorm running statistics, no dropout). The sensitivity is computed once per model and reused.

Settings: `b<n_bits>[g<group_size>][v<cluster_dim>][s][a]`: per tensor (`b2`), per grouped channel along the
output channels (`b2g4`: one LUT per 4 output channels), vector palettization (`b3v2`: LUT entries are
2-vectors along the output channels, 1.5 bits per weight), `s`: per-output-channel scale (enable_per_channel_scale).
Every nn.Conv2d and nn.Linear is palettized except the first conv, kept fp32 as bitdown keeps it (suffix `a`:
all layers, the library default); a layer the library refuses (channels not divisible by the group size /
cluster_dim) stays fp32, and is counted so.

Size: as bitdown's size_report (src/bitdown/size.py): a palettized weight costs log2(K)/cluster_dim bits per
weight of indices plus its LUTs in fp16 (K x cluster_dim values each); per-channel scales (`s`) fp16, one per
output channel; every other parameter fp32; buffers (BatchNorm statistics) not counted; MB = 2^20 bytes; the
ratio is the fp32 size of all parameters over that. The evaluated weights are rounded to fp16 (the LUTs are
counted in fp16), and each group is checked to hold at most K distinct values.

Evaluation: exactly accuracy.py's sets (`datasets(name, pool=...)`): CIFAR ResNet top-1 on the 10,000 CIFAR-10
test JPEGs; EfficientNet-Lite0 top-1 on the held-out 500 of the seeded 500/500 split of the 1,000 ImageNet
sample images. Rows go to benchmarks/results/peers.json (a rerun skips rows already there with the same key),
then peers.md and peers.png are rebuilt from it.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import datasets, train_eval_set  # noqa: E402  (the project's own splits and loaders)

from bitdown.data import make_loader  # noqa: E402
from bitdown.size import MB, codebook_bytes  # noqa: E402
from bitdown.zoo import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_SETTINGS = "b4,b3,b3g8,b2,b2g4,b2g8,b2g16,b4v2,b3v2,b1"
KEY = ("model", "method", "setting", "skm_samples", "skm_loss")
METHOD_NAMES = {"ptp": "coremltools PostTrainingPalettizer (k-means)",
                "skm": "coremltools SKMPalettizer (sensitive k-means)"}


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    n_bits: int
    group_size: int | None = None      # None: per tensor
    cluster_dim: int = 1
    channel_scale: bool = False
    all_layers: bool = False            # False: the first conv stays fp32 (bitdown's layer set); True: library default

    @classmethod
    def parse(cls, s: str) -> "Setting":
        m = re.fullmatch(r"b(\d+)(?:g(\d+))?(?:v(\d+))?(s)?(a)?", s)
        if not m:
            raise ValueError(f"bad setting {s!r}: expected b<bits>[g<group>][v<cluster_dim>][s][a], e.g. b2g4")
        return cls(int(m[1]), int(m[2]) if m[2] else None, int(m[3]) if m[3] else 1, bool(m[4]), bool(m[5]))

    @property
    def name(self) -> str:
        return (f"b{self.n_bits}" + (f"g{self.group_size}" if self.group_size else "")
                + (f"v{self.cluster_dim}" if self.cluster_dim > 1 else "") + ("s" if self.channel_scale else "") + ("a" if self.all_layers else ""))

    def describe(self) -> str:
        gran = f"groups of {self.group_size} out-channels" if self.group_size else "per tensor"
        vec = f", {self.cluster_dim}-d vectors" if self.cluster_dim > 1 else ""
        return (f"{self.n_bits}-bit LUT, {gran}{vec}" + (", per-channel scale" if self.channel_scale else "")
                + (", all layers (first conv too)" if self.all_layers else ", first conv fp32"))

    def module_config(self) -> dict:
        cfg = {"n_bits": self.n_bits, "granularity": "per_grouped_channel" if self.group_size else "per_tensor",
               "group_size": self.group_size, "enable_per_channel_scale": self.channel_scale}
        if self.cluster_dim > 1:
            cfg["cluster_dim"] = self.cluster_dim
        return cfg


# ----------------------------------------------------------------------------- size accounting


@dataclass(frozen=True)
class Palette:
    """How one parameter is palettized: `n_luts` lookup tables of `n_entries` entries, each a `cluster_dim`-vector
    (fp16), `n_scales` fp16 per-channel scales (0: none)."""
    n_luts: int
    n_entries: int
    cluster_dim: int = 1
    n_scales: int = 0


def palette_layout(model: nn.Module) -> dict[str, Palette]:
    """The palettized parameters of a coremltools-palettized model (full parameter name -> Palette), read from the
    compression metadata buffers coremltools registers (`_COREML_/<param>/lut`, `.../palettization_scale`).
    LUTs quantized to int8 (lut_dtype) are refused: not counted here."""
    out: dict[str, Palette] = {}
    for mod_name, mod in model.named_modules():
        bufs = dict(mod.named_buffers(recurse=False))
        for key, lut in bufs.items():
            parts = key.split("/")
            if len(parts) != 3 or parts[0] != "_COREML_" or parts[2] != "lut":
                continue
            param = parts[1]
            if f"_COREML_/{param}/quantization_n_bits" in bufs:
                raise ValueError(f"{mod_name}.{param}: LUT quantized (lut_dtype): not supported by this accounting")
            scale = bufs.get(f"_COREML_/{param}/palettization_scale")
            full = f"{mod_name}.{param}" if mod_name else param
            out[full] = Palette(n_luts=math.prod(lut.shape[:-2]), n_entries=int(lut.shape[-2]),
                                cluster_dim=int(lut.shape[-1]), n_scales=0 if scale is None else scale.numel())
    return out


def palette_size(model: nn.Module, layout: dict[str, Palette]) -> dict:
    """Paper-style size of `model` palettized as `layout`, counted as bitdown's size_report: indices log2(K) bits per
    LUT entry (log2(K)/cluster_dim bits per weight), LUTs K x cluster_dim fp16 values each, per-channel scales fp16,
    every other parameter fp32, buffers not counted, MB = 2^20 B; ratio = fp32 bytes of all parameters / size."""
    params = dict(model.named_parameters())
    unknown = sorted(set(layout) - set(params))
    if unknown:
        raise KeyError(f"palettized parameters not in the model: {unknown}")
    dense = sum(p.numel() for p in params.values()) * 4
    other = sum(p.numel() for n, p in params.items() if n not in layout) * 4
    index = lut = scale = 0.0
    for name, pal in layout.items():
        n = params[name].numel()
        if pal.n_entries < 2 or pal.n_entries & (pal.n_entries - 1) or n % pal.cluster_dim:
            raise ValueError(f"{name}: {pal} does not fit {n} weights")
        index += n // pal.cluster_dim * math.log2(pal.n_entries) / 8
        lut += pal.n_luts * codebook_bytes(pal.n_entries, pal.cluster_dim)      # K x d fp16
        scale += pal.n_scales * 2
    size = other + index + lut + scale
    return {"size_bytes": size, "size_mb": size / MB, "uncompressed_bytes": dense, "ratio": dense / size,
            "index_bytes": index, "lut_bytes": lut, "scale_bytes": scale, "other_bytes": other,
            "bits_per_palettized_weight": 8 * (index + lut + scale) / max(1, sum(params[n].numel() for n in layout))}


def unpalettized_weights(model: nn.Module, layout: dict[str, Palette]) -> list[str]:
    """Conv/linear weights the palettizer left in fp32 (refused or skipped)."""
    return [f"{n}.weight" for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and f"{n}.weight" not in layout]


@torch.no_grad()
def round_palettes_fp16_(model: nn.Module, layout: dict[str, Palette]) -> None:
    """Round the palettized weights (= LUT values) to fp16, as the LUTs are counted, and check that every LUT group
    holds at most K distinct values (scalar palettes without per-channel scale; output-channel groups)."""
    params = dict(model.named_parameters())
    for name, pal in layout.items():
        w = params[name]
        w.copy_(w.half().float())
        if pal.cluster_dim == 1 and pal.n_scales == 0:
            for g in w.reshape(pal.n_luts, -1):
                n = g.unique().numel()
                if n > pal.n_entries:
                    raise AssertionError(f"{name}: a group holds {n} distinct values > {pal.n_entries}")


# ----------------------------------------------------------------------------- the peer


def _quiet_coremltools() -> None:
    """coremltools logs every k-means step at INFO; keep its warnings (a layer refused) and errors."""
    import coremltools  # noqa: F401  (sets up its loggers on import)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("coremltools"):
            logging.getLogger(name).setLevel(logging.WARNING)


def palettize(method: str, teacher: nn.Module, setting: Setting, sensitivity_path: str | None = None) -> nn.Module:
    """A palettized copy of `teacher` (the teacher is left unchanged)."""
    from coremltools.optimize.torch.palettization import (PostTrainingPalettizer, PostTrainingPalettizerConfig,
                                                          SKMPalettizer, SKMPalettizerConfig)
    cfg: dict = {"global_config": setting.module_config()}
    if not setting.all_layers:        # bitdown's layer set: the first conv stays fp32
        first = next(n for n, m in teacher.named_modules() if isinstance(m, nn.Conv2d))
        cfg["module_name_configs"] = {re.escape(first): None}
    if method == "ptp":
        return PostTrainingPalettizer(teacher, PostTrainingPalettizerConfig.from_dict(cfg)).compress()
    if method == "skm":
        return SKMPalettizer(teacher, SKMPalettizerConfig.from_dict(cfg)).compress(sensitivity_path=sensitivity_path)
    raise ValueError(f"unknown method {method!r}")


def compute_sensitivity(teacher: nn.Module, samples: list, loss: str, path: str) -> float:
    """SKM's Fisher sensitivity from `samples` [(x (1, C, H, W), y (1,))], one backward per image, saved to `path`."""
    from coremltools.optimize.torch.palettization import SKMPalettizer, SKMPalettizerConfig

    def loss_fn(model, data):
        x, y = data
        model.eval()            # BatchNorm running statistics, no dropout
        return F.cross_entropy(model(x), y)

    if loss == "teacher":
        with torch.no_grad():
            samples = [(x, teacher(x).argmax(1)) for x, _ in samples]
    t0 = time.perf_counter()
    skm = SKMPalettizer(copy.deepcopy(teacher), SKMPalettizerConfig(calibration_nsamples=len(samples)))
    skm.compute_sensitivity(samples, loss_fn, sensitivity_path=path)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- measuring


@torch.no_grad()
def predictions(model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    preds, labels = [], []
    for x, y in loader:
        preds.append(model(x).argmax(1))
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def machine() -> dict:
    import coremltools
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "coremltools": coremltools.__version__, "threads": torch.get_num_threads(),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


class Results:
    def __init__(self, path: Path):
        self.path = path
        data = json.loads(path.read_text()) if path.exists() else {}
        self.rows: list[dict] = data.get("rows", [])
        self.runs: list[dict] = data.get("runs", [])

    def get(self, key: dict) -> dict | None:
        for r in self.rows:
            if all(r.get(k) == v for k, v in key.items()):
                return r
        return None

    def add(self, row: dict) -> None:
        self.rows = [r for r in self.rows if any(r.get(k) != row.get(k) for k in KEY)] + [row]
        self.save()
        print(json.dumps({k: row.get(k) for k in ("model", "method", "setting", "ratio", "top1", "agreement",
                                                   "compress_s", "eval_s")}), flush=True)

    def save(self) -> None:
        self.path.write_text(json.dumps({"machine": machine(), "runs": self.runs, "rows": self.rows}, indent=1))


def run_model(res: Results, name: str, methods: list[str], settings: list[Setting], a) -> None:
    teacher = build_model(name)
    calib_n = a.skm_samples if name != "efficientnet_lite0" else min(a.skm_samples, 500)
    _, _, ev = datasets(name, a.seed, pool=calib_n)          # the evaluation set is the same for any pool
    loader = make_loader(ev, 250)
    t0 = time.perf_counter()
    t_pred, labels = predictions(teacher, loader)
    t_eval = time.perf_counter() - t0
    dense = palette_size(teacher, {})
    res.add(dict(model=name, method="teacher", setting="fp32", skm_samples=None, skm_loss=None,
                 top1=100.0 * (t_pred == labels).float().mean().item(), agreement=100.0, n_eval=len(labels),
                 size_mb=dense["size_mb"], ratio=1.0, compress_s=0.0, eval_s=t_eval, unpalettized=[]))
    teacher_top1 = res.rows[-1]["top1"]
    sens_path, sens_s = None, None
    tmp = tempfile.TemporaryDirectory()
    for method in methods:
        for s in settings:
            key = dict(model=name, method=method, setting=s.name, skm_samples=calib_n if method == "skm" else None,
                       skm_loss=a.skm_loss if method == "skm" else None)
            if res.get(key) and not a.force:
                continue
            if method == "skm" and sens_path is None:
                calib = train_eval_set(name, pool=calib_n, n=calib_n)     # labelled training images only
                samples = [(calib[i][0][None], torch.tensor([calib[i][1]])) for i in range(len(calib))]
                sens_path = os.path.join(tmp.name, "sensitivity.pt")
                sens_s = compute_sensitivity(teacher, samples, a.skm_loss, sens_path)
                print(f"{name}: SKM sensitivity on {len(samples)} training images ({a.skm_loss} loss): {sens_s:.0f} s",
                      flush=True)
            t0 = time.perf_counter()
            q = palettize(method, teacher, s, sens_path)
            t_comp = time.perf_counter() - t0
            layout = palette_layout(q)
            round_palettes_fp16_(q, layout)
            size = palette_size(q, layout)
            t0 = time.perf_counter()
            pred, _ = predictions(q, loader)
            t_eval = time.perf_counter() - t0
            top1 = 100.0 * (pred == labels).float().mean().item()
            res.add(dict(key, description=s.describe(), n_bits=s.n_bits, group_size=s.group_size,
                         cluster_dim=s.cluster_dim, channel_scale=s.channel_scale, top1=top1,
                         drop=teacher_top1 - top1, agreement=100.0 * (pred == t_pred).float().mean().item(),
                         n_eval=len(labels), size_mb=size["size_mb"], ratio=size["ratio"],
                         size_bytes=size["size_bytes"], lut_bytes=size["lut_bytes"], other_bytes=size["other_bytes"],
                         bits_per_palettized_weight=size["bits_per_palettized_weight"],
                         palettized=len(layout), unpalettized=unpalettized_weights(q, layout),
                         compress_s=t_comp, sensitivity_s=sens_s if method == "skm" else None, eval_s=t_eval))
    tmp.cleanup()


# ----------------------------------------------------------------------------- report

TARGETS = (10.0, 14.0, 20.0)
DATA = {"resnet20_cifar10": "top-1 on the 10,000 CIFAR-10 test JPEGs; SKM calibration on CIFAR-10 training images",
        "efficientnet_lite0": "top-1 on the held-out 500 of the seeded (seed 0) 500/500 split of the 1,000 ImageNet "
                              "sample images; SKM calibration on the other 500 (the calibration half)"}


def bitdown_reference(path: Path = RESULTS / "accuracy.json") -> list[dict]:
    """bitdown's own EM-only rows (method bitdown, stage em) from accuracy.json, for the side-by-side (read only)."""
    if not path.exists():
        return []
    return [r for r in json.loads(path.read_text())["rows"] if r.get("method") == "bitdown" and r.get("stage") == "em"]


def nearest(rows: list[dict], target: float) -> list[dict]:
    """Per method, the best top-1 among settings within 12 % of `target`x."""
    best: dict[str, dict] = {}
    for r in rows:
        if abs(r["ratio"] / target - 1) <= 0.12 and (r["method"] not in best or r["top1"] > best[r["method"]]["top1"]):
            best[r["method"]] = r
    return list(best.values())


def write_report(path: Path) -> None:
    data = json.loads(path.read_text())
    rows, mach = data["rows"], data["machine"]
    ref = bitdown_reference()
    lines = ["# Peer baseline: coremltools post-training palettization (generated by benchmarks/peers.py)", "",
             f"Machine: {mach['cores']}-core CPU ({mach['cpu']}), torch {mach['torch']}, coremltools "
             f"{mach['coremltools']}, {mach['threads']} thread(s).",
             "Methods: `ptp` = " + METHOD_NAMES["ptp"] + "; `skm` = " + METHOD_NAMES["skm"] + " (diagonal Fisher from "
             "single-image gradients on training images). Post-training only: no fine-tuning, no BatchNorm "
             "re-estimation (the counterpart of bitdown's `em` stage). Every conv and linear layer is palettized "
             "except the first conv, kept fp32 as bitdown keeps it (settings ending in `a`: all layers, the library "
             "default), and except layers the library refuses (channels not divisible by the group size): those stay "
             "fp32 and are counted fp32 (column `refused`: the layers the library left fp32 besides the first conv).",
             "Settings: `bN` N-bit LUT per tensor; `gG` one LUT per G output channels; `vD` D-dim vector entries "
             "(N/D bits per weight); `s` per-output-channel scale; `a` all layers palettized.",
             "Size: paper-style MB (2^20 B) as bitdown's size_report: indices log2 K bits per LUT entry, LUTs fp16, "
             "scales fp16, other parameters fp32, BatchNorm statistics not counted; ratio = fp32 size of all "
             "parameters / size. Evaluated weights rounded to fp16.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        lines += [f"## {model}", "", DATA.get(model, "") + ".", "",
                  "| method | setting | description | MB | ratio | top-1 % | drop (pt) | agreement % | refused | "
                  "compress s | eval s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(mrows, key=lambda r: (r["method"] != "teacher", r["method"], -r["ratio"])):
            first = next(iter(r.get("unpalettized") or []), None) if not r["setting"].endswith("a") else None
            refused = [n.removesuffix(".weight") for n in r.get("unpalettized") or [] if n != first]
            skip = ", ".join(refused) if refused else "-"
            extra = f" ({r['skm_loss']} loss, {r['skm_samples']} images)" if r["method"] == "skm" else ""
            lines.append(f"| {r['method']}{extra} | {r['setting']} | {r.get('description', 'fp32 teacher')} | "
                         f"{r['size_mb']:.4f} | {r['ratio']:.2f}x | {r['top1']:.2f} | {r.get('drop', 0.0):.2f} | "
                         f"{r['agreement']:.1f} | {skip} | "
                         f"{r['compress_s']:.0f} | {r['eval_s']:.0f} |")
        lines += ["", "Best top-1 per method within 12 % of each target ratio:", "",
                  "| target | method | setting | ratio | top-1 % |", "|---|---|---|---|---|"]
        peer = [r for r in mrows if r["method"] != "teacher"]
        for t in TARGETS:
            hits = nearest(peer, t) + nearest([dict(r, method="bitdown (em, accuracy.json)", setting=r["preset"])
                                               for r in ref if r["model"] == model], t)
            if not hits:
                lines.append(f"| {t:.0f}x | - | none measured | - | - |")
            for r in hits:
                lines.append(f"| {t:.0f}x | {r['method']} | {r['setting']} | {r['ratio']:.2f}x | {r['top1']:.2f} |")
        bd = [r for r in ref if r["model"] == model]
        if bd:
            lines += ["", "bitdown's own EM-only rows (accuracy.json, method `bitdown`, stage `em`, not re-measured "
                      "here; same images and size accounting): " + "; ".join(
                          f"preset {r['preset']} {r['ratio']:.2f}x {r['top1']:.2f} %" for r in bd) + "."]
        lines.append("")
    for run in data.get("runs", []):
        lines.append(f"Run: `{run['command']}`: {run['wall_s'] / 60:.1f} min (load average {run.get('loadavg')}).")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, ref, path.with_suffix(".png"))


def plot(rows: list[dict], ref: list[dict], out: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        mrows = [r for r in rows if r["model"] == model]
        for r in mrows:
            if r["method"] == "teacher":
                ax.axhline(r["top1"], color="grey", ls="--", lw=1, label=f"fp32 teacher {r['top1']:.2f} %")
        for method, marker in (("ptp", "o"), ("skm", "s")):
            pts = sorted((r for r in mrows if r["method"] == method), key=lambda r: r["ratio"])
            if pts:
                ax.scatter([r["ratio"] for r in pts], [r["top1"] for r in pts], marker=marker, label=METHOD_NAMES[method])
                for r in pts:
                    ax.annotate(r["setting"], (r["ratio"], r["top1"]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        bd = [r for r in ref if r["model"] == model]
        if bd:
            ax.scatter([r["ratio"] for r in bd], [r["top1"] for r in bd], marker="*", s=120, color="k",
                       label="bitdown EM only (accuracy.json)")
        for t in TARGETS:
            ax.axvline(t, color="lightgrey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks([4, 6, 8, 10, 14, 20, 30])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
        ax.set_xlabel("compression ratio (paper-style size)")
        ax.set_ylabel("top-1 %")
        ax.set_title(model)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet20_cifar10,efficientnet_lite0")
    p.add_argument("--methods", default="ptp,skm")
    p.add_argument("--settings", default=DEFAULT_SETTINGS, help="comma-separated b<bits>[g<group>][v<dim>][s]")
    p.add_argument("--skm-samples", type=int, default=512,
                   help="training images for SKM's Fisher, one gradient each (EfficientNet: at most its 500)")
    p.add_argument("--skm-loss", choices=("labels", "teacher"), default="labels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true", help="re-measure rows already in --out")
    p.add_argument("--out", default=str(RESULTS / "peers.json"))
    p.add_argument("--report-only", action="store_true", help="rebuild peers.md/png from --out, measure nothing")
    a = p.parse_args()
    methods = a.methods.split(",")
    if set(methods) - set(METHOD_NAMES):
        p.error(f"unknown method(s) {sorted(set(methods) - set(METHOD_NAMES))}; known: {', '.join(METHOD_NAMES)}")
    try:
        settings = [Setting.parse(s) for s in a.settings.split(",")]
    except ValueError as e:
        p.error(str(e))
    out = Path(a.out)
    if a.report_only:
        write_report(out)
        return
    torch.set_num_threads(a.threads)
    _quiet_coremltools()
    out.parent.mkdir(parents=True, exist_ok=True)
    res = Results(out)
    t0 = time.perf_counter()
    for name in a.models.split(","):
        run_model(res, name, methods, settings, a)
    res.runs.append({"command": "python benchmarks/peers.py " + " ".join(sys.argv[1:]),
                     "wall_s": time.perf_counter() - t0, "loadavg": [round(x, 2) for x in os.getloadavg()]})
    res.save()
    write_report(out)


if __name__ == "__main__":
    main()
