"""Would the holdout guard catch it? One compression with global distillation, run as budget.py runs it, with the
student captured right before and right after the global stage (the guard's own `saved` state and the trained
parameters it is about to judge). Both are evaluated image by image on the held-out evaluation images (never used
for calibration or fine-tuning): top-1 against the labels, top-1 match with the teacher, KL to the teacher. Then
the guard's rules are applied to many random slices of n of those images (n = the slice sizes a guard gets,
16..256): how often the loss-only rule (sessions 9-12), the loss + agreement rule (`finetune._worse`, session
13: more than one image lost) and two candidate bands (more than one binomial sd sqrt(n p (1-p)) of the count
lost, or more than sqrt(flips), the sign test's sd of the paired difference) would undo the stage. A stage that lowers held-out top-1 should be undone often, one that raises it rarely.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/guard_slices.py --model efficientnet_lite0 --ratio 10 \
        --layer-steps 0 --global-steps 150 --calib-images 128 --alloc-weighting sensitivity --alloc-max-error 0.3 \
        --alloc-menu int8,int4,int2,fp16 --allocation results/alloc_efficientnet_lite0_10_sensitivity_0.3_menu-...json

Writes results/guard_slices_<model>.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import RESULTS, datasets, machine  # noqa: E402
from budget import _given_allocation  # noqa: E402

import bitdown.finetune as ft  # noqa: E402
from bitdown import compress  # noqa: E402
from bitdown.allocate import apply_allocation  # noqa: E402
from bitdown.data import make_loader  # noqa: E402
from bitdown.modules import round_codebooks_  # noqa: E402
from bitdown.recipes import zoo_config  # noqa: E402
from bitdown.zoo import build_model, get_entry  # noqa: E402

SIZES = (16, 32, 50, 64, 128, 256)


def capture_guard() -> dict:
    """Wrap finetune._guard: record the parameters before the stage (`saved`), after it, and the guard's slice."""
    got: dict = {}
    orig = ft._guard

    def spy(student, teacher, holdout, cfg, params, before, saved):
        got.update(before=[v.detach().cpu().clone() for v in saved],
                   after=[p.detach().cpu().clone() for p in params], holdout=holdout.cpu().clone())
        return orig(student, teacher, holdout, cfg, params, before, saved)

    ft._guard = spy
    return got


def with_params(model, cfg: ft.FinetuneConfig, values: list[torch.Tensor]):
    m = copy.deepcopy(model)
    params = ft.global_params(m, cfg)
    if [tuple(p.shape) for p in params] != [tuple(v.shape) for v in values]:
        raise RuntimeError("the captured parameters do not match the model's global_params")
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    round_codebooks_(m)            # what the file holds
    return m.eval()


@torch.no_grad()
def per_image(model, teacher, loader) -> dict[str, torch.Tensor]:
    """(N,) top-1 correct (labels: -1 when none), top-1 match with the teacher, KL(teacher || model)."""
    correct, match, kl = [], [], []
    for batch in loader:
        x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        x = ft.nhwc(x)
        zs, zt = model(x), teacher(x)
        if y is not None:
            correct.append(zs.argmax(1) == y)
        match.append(zs.argmax(1) == zt.argmax(1))
        kl.append(F.kl_div(F.log_softmax(zs, 1), F.log_softmax(zt, 1), reduction="none", log_target=True).sum(1))
    return {"correct": torch.cat(correct) if correct else None, "match": torch.cat(match), "kl": torch.cat(kl)}


def undo_rates(b: dict, a: dict, sizes: tuple[int, ...], draws: int, seed: int) -> list[dict]:
    """For each slice size n: the fraction of `draws` random n-image slices on which each rule undoes the stage."""
    g = torch.Generator().manual_seed(seed)
    N = b["kl"].shape[0]
    out = []
    for n in sizes:
        if n > N:
            continue
        idx = torch.stack([torch.randperm(N, generator=g)[:n] for _ in range(draws)])       # (draws, n)
        loss_up = a["kl"][idx].double().mean(1) > b["kl"][idx].double().mean(1)
        lost = b["match"][idx].sum(1) - a["match"][idx].sum(1)                          # top-1 matches lost
        agree = lost > ft.AGREEMENT_TOL_IMAGES
        p0 = b["match"][idx].double().mean(1)
        binom = lost > torch.clamp((n * p0 * (1 - p0)).sqrt(), min=1.0)       # band: one binomial sd of the count
        flips = (b["match"][idx] != a["match"][idx]).sum(1).double()           # images whose match changed
        paired = lost > torch.clamp(flips.sqrt(), min=1.0)                     # band: the paired (sign test) sd
        out.append({"n": n, "draws": draws, "loss_rule": float(loss_up.double().mean()),
                    "loss_or_agreement_rule": float((loss_up | agree).double().mean()),
                    "agreement_alone": float(agree.double().mean()),
                    "loss_or_binomial_band": float((loss_up | binom).double().mean()),
                    "loss_or_paired_band": float((loss_up | paired).double().mean()),
                    "mean_lost": float(lost.double().mean()), "sd_lost": float(lost.double().std()),
                    "mean_flips": float(flips.mean())})
    return out


def summary(d: dict) -> dict:
    return {"top1": float(d["correct"].double().mean() * 100) if d["correct"] is not None else None,
            "agreement": float(d["match"].double().mean() * 100), "kl": float(d["kl"].double().mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20_cifar10")
    p.add_argument("--ratio", type=float, default=20)
    p.add_argument("--codebook-bits", type=int, default=8)
    p.add_argument("--layer-steps", type=int, default=10)
    p.add_argument("--global-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--calib-images", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alloc-weighting", default="none", choices=["none", "sensitivity"])
    p.add_argument("--alloc-max-error", type=float)
    p.add_argument("--alloc-menu", default="")
    p.add_argument("--allocation", help="an allocation report for these settings (budget.py --allocation)")
    p.add_argument("--eval-images", type=int, help="evaluate on only the first this many held-out images")
    p.add_argument("--draws", type=int, default=4000)
    p.add_argument("--out", help="default: results/guard_slices_<model>.json")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    calib, aug, ev = datasets(a.model, a.seed)
    if a.eval_images:
        ev = torch.utils.data.Subset(ev, range(a.eval_images))
    teacher = build_model(a.model).eval()
    menu = [m for m in a.alloc_menu.split(",") if m]
    cfg = zoo_config(a.model, "small", calib_images=a.calib_images, seed=a.seed, codebook_bits=a.codebook_bits,
                     alloc_weighting=a.alloc_weighting, alloc_max_error=a.alloc_max_error, alloc_menu=menu)
    target = a.ratio
    if a.allocation:
        cfg, target = apply_allocation(cfg, _given_allocation(Path(a.allocation), a.ratio, a.alloc_weighting,
                                                              a.alloc_max_error, teacher, cfg)), None
    fcfg = ft.FinetuneConfig(layer_steps=a.layer_steps, global_steps=a.global_steps, batch_size=a.batch_size,
                             seed=a.seed)
    got = capture_guard()
    t0 = time.perf_counter()
    q = compress(teacher, make_loader(calib, 128, shuffle=True, seed=a.seed), cfg,
                 arch={"name": a.model, "source": "zoo", "preprocess": get_entry(a.model).preprocess},
                 finetune=fcfg, train_data=aug, target_ratio=target).cpu().eval()
    wall = time.perf_counter() - t0
    before, after = with_params(q, fcfg, got["before"]), with_params(q, fcfg, got["after"])
    loader = make_loader(ev, 250)
    b, af, kept = per_image(before, teacher, loader), per_image(after, teacher, loader), per_image(q, teacher, loader)
    hb, ha = per_image(before, teacher, got["holdout"].split(a.batch_size)), \
        per_image(after, teacher, got["holdout"].split(a.batch_size))
    guard = q.bitdown.extra["global_finetune"]["holdout"]
    res = {"settings": vars(a), "machine": machine(), "wall_s": wall, "n_eval": int(b["match"].shape[0]),
           "guard": guard, "guard_slice": {"before": summary(hb), "after": summary(ha)},
           "eval": {"before": summary(b), "after": summary(af), "kept": summary(kept)},
           "layer_guard": q.bitdown.extra.get("layer_finetune", {}).get("holdout"),
           "undo_rates": undo_rates(b, af, SIZES, a.draws, a.seed)}
    out = Path(a.out) if a.out else RESULTS / f"guard_slices_{a.model}.json"
    out.write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(report(res))
    print(report(res))


def report(r: dict) -> str:
    s, e, g = r["settings"], r["eval"], r["guard"]
    lines = [f"# Would the holdout guard undo the global stage? {s['model']} {s['ratio']:g}x", "",
             f"`benchmarks/guard_slices.py` {json.dumps({k: v for k, v in s.items() if v not in (None, '')})}; "
             f"{r['machine'].get('cpu')}, {r['wall_s'] / 60:.0f} min.", "",
             f"| on the {r['n_eval']} held-out images | top-1 % | agreement % | KL |", "|---|---|---|---|"]
    for k, what in (("before", "before the global stage"), ("after", "after it"), ("kept", "kept by the guard")):
        v = e[k]
        top1 = "-" if v["top1"] is None else f"{v['top1']:.2f}"
        lines.append(f"| {what} | {top1} | {v['agreement']:.2f} | {v['kl']:.4f} |")
    gs = r["guard_slice"]
    lines += ["", f"The guard's own slice ({g['n']} fine-tuning images): loss {g['loss_before']:.4g} -> "
              f"{g['loss_after']:.4g}, agreement {100 * g['agreement_before']:.1f} -> {100 * g['agreement_after']:.1f} %"
              f" (recomputed: {gs['before']['agreement']:.1f} -> {gs['after']['agreement']:.1f} %); kept: "
              f"**{g['kept']}**.", "",
              f"Random slices of the held-out images ({r['undo_rates'][0]['draws'] if r['undo_rates'] else 0} "
              "draws each): how often each rule undoes the stage.", "",
              "| slice n | loss rule | loss or agreement (> 1 image lost) | agreement alone | loss or > max(1, "
              "sqrt(n p (1-p))) lost | loss or > max(1, sqrt(flips)) lost | matches lost: mean (sd) | flips |",
              "|---|---|---|---|---|---|---|---|"]
    for u in r["undo_rates"]:
        lines.append(f"| {u['n']} | {100 * u['loss_rule']:.1f} % | {100 * u['loss_or_agreement_rule']:.1f} % | "
                     f"{100 * u['agreement_alone']:.1f} % | {100 * u['loss_or_binomial_band']:.1f} % | "
                     f"{100 * u['loss_or_paired_band']:.1f} % | {u['mean_lost']:.2f} ({u['sd_lost']:.2f}) | "
                     f"{u['mean_flips']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
