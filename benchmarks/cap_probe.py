"""Which per-layer error cap should the allocation use? A check of the proxy behind QuantConfig.alloc_cap_rule
'measured' (allocate.measured_cap) against the held-out top-1 that full compressions measured.

For EfficientNet-Lite0 (the compact recipe's settings: sensitivity-weighted allocation, rate menu, int8 codebooks,
128 calibration images of the seeded 500) and each (ratio, cap): the allocation under that cap, every layer quantized
with its chosen option by the allocator's fast quantizer (allocate.quantize_option, on the teacher's full Grams),
then the network's output error against the teacher on the calibration images (the logits' normalised MSE and the
softmax KL; 128 images) and, for reference, this proxy model's own top-1 on the held-out 500. The full compressions'
top-1 per cap (budget.py rows) are in results/budget_effnet16_s14.md, budget_s16.md and recipe_cli.md.

    python benchmarks/cap_probe.py [--out benchmarks/results/cap_probe.json]     # ~60 min at one thread, loaded

Session 16: written out of the scratch probe that produced results/cap_probe.json (same computation).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from accuracy import RESULTS, datasets, machine  # noqa: E402
from bitdown.allocate import (_choose, alloc_em, budget_bytes, capped, layer_sensitivity, measure_options,  # noqa: E402
                              quantize_option, size_bounds)
from bitdown.compress import forward_order, take_images  # noqa: E402
from bitdown.config import resolve_plan  # noqa: E402
from bitdown.data import make_loader  # noqa: E402
from bitdown.evaluate import evaluate  # noqa: E402
from bitdown.finetune import distill_loss  # noqa: E402
from bitdown.recipes import zoo_config  # noqa: E402
from bitdown.stats import collect_stats  # noqa: E402
from bitdown.zoo import build_model  # noqa: E402

GRID = ((16, (0.15, 0.2, 0.25, 0.3, None)), (20, (0.2, 0.25, 0.3, 0.4)), (10, (0.2, 0.3)), (25, (0.3, 0.4, 0.5)))
MENU = ["int8", "int4", "int2", "fp16"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(RESULTS / "cap_probe.json"))
    a = p.parse_args()
    torch.manual_seed(0)
    name = "efficientnet_lite0"
    t = build_model(name).eval()
    calib, _, ev = datasets(name)
    batches = take_images(make_loader(calib, 128, shuffle=True, seed=0), 128, 128)
    cfg = zoo_config(name, "small", calib_images=128, seed=0, codebook_bits=8, alloc_weighting="sensitivity",
                     alloc_max_error=0.3, alloc_menu=MENU)
    plans, _ = resolve_plan(t, cfg, forward_order(t, batches[0][:2]))
    t0 = time.time()
    options = measure_options(t, plans, batches, em=alloc_em(cfg.em), seed=0, extra=MENU, progress=False)
    sens = layer_sensitivity(t, plans, batches, seed=0, progress=False)
    mods = dict(t.named_modules())
    stats = collect_stats(t, {q.name: (mods[q.name], 1) for q in plans}, batches, full_gram=True)
    print(f"table, sensitivities, Grams: {time.time() - t0:.0f} s", flush=True)
    x = torch.cat(batches)[:128]
    with torch.no_grad():
        ref = t(x)
    _, _, other = size_bounds(t, plans, MENU)
    rows = []
    for ratio, caps in GRID:
        budget = budget_bytes(t, plans, ratio, None, MENU)
        for cap in caps:
            opts = capped(options, cap) if cap is not None else options
            smallest = other + sum(min(o.bytes for o in v) for v in opts.values())
            if smallest > budget:
                print(ratio, cap, "infeasible", flush=True)
                continue
            q = copy.deepcopy(t)
            qm = dict(q.named_modules())
            with torch.no_grad():
                for n, o in _choose(opts, sens, budget, other).items():
                    if not o.keep:
                        qm[n].weight.copy_(quantize_option(mods[n].weight.detach(), stats[n].full_gram, o,
                                                           alloc_em(cfg.em), 0))
                y = q(x)
            r = evaluate(q, make_loader(ev, 50), teacher=t)
            rows.append(dict(ratio=ratio, cap=cap, headroom=budget / smallest,
                             mse=float(distill_loss([y], [ref], loss="mse")),
                             kl=float(distill_loss([y], [ref], loss="kl")),
                             calib_agree=float((y.argmax(1) == ref.argmax(1)).float().mean()),
                             heldout_top1=r["top1"], heldout_agree=r["agreement"]))
            print(json.dumps(rows[-1]), flush=True)
    out = Path(a.out)
    out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    write_md(out)


def write_md(path: Path) -> None:
    doc = json.loads(path.read_text())
    rows = doc["rows"] if isinstance(doc, dict) else doc
    lines = ["# Error-cap proxy on EfficientNet-Lite0 (generated by benchmarks/cap_probe.py)", "",
             "Each cap's allocation quantized by the allocator's fast quantizer; output error against the teacher on "
             "the 128 calibration images; the proxy model's own top-1 on the held-out 500. Headroom: budget / the "
             "smallest model the cap allows. Bold: the least KL per ratio (alloc_cap_rule 'measured' measures the "
             "same KL on 64 of these images).",
             "", "| ratio | cap | headroom | MSE (logits) | KL (softmax) | agreement calib % | proxy top-1 held-out % |",
             "|---|---|---|---|---|---|---|"]
    for ratio in sorted({r["ratio"] for r in rows}):
        rr = [r for r in rows if r["ratio"] == ratio]
        best = min(r["kl"] for r in rr)
        for r in rr:
            kl = f"**{r['kl']:.3f}**" if r["kl"] == best else f"{r['kl']:.3f}"
            cap = "none" if r["cap"] is None else f"{r['cap']:g}"
            lines.append(f"| {ratio}x | {cap} | {r['headroom']:.2f} | {r['mse']:.3f} | {kl} | "
                         f"{100 * r['calib_agree']:.1f} | {r['heldout_top1']:.1f} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--md"]:
        write_md(Path(sys.argv[2]))
    else:
        main()
