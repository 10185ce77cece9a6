"""EfficientNet-Lite0 top-1 against compression ratio, every method on one curve (issue 13, "compact networks").

Reads every committed result file benchmarks/results/*.json (nothing is run, no figure is typed in), keeps the
EfficientNet-Lite0 rows that have a held-out top-1 and a ratio (all on the seeded 500/500 split of the ImageNet
sample images: calibration on the first 500, top-1 and teacher agreement on the other 500), drops the copies a
merged file (budget.json) holds of another file's rows, sorts each row into a method, and writes

- benchmarks/results/effnet_curve.md: the table (method, ratio, held-out top-1 / agreement, top-1 / agreement on
  the seen images where the row has them, source file, the command that produced it: the recorded one, or for a
  budget.py row its flags rebuilt from the row's recorded settings) and, per method, the ratios of the 8-25x grid
  that have no point yet;
- benchmarks/results/effnet_curve.png: top-1 vs ratio, one line style per method, the teacher as a horizontal line.

Rerun it after new rows are committed: `python benchmarks/effnet_curve.py` (no torch needed).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "efficientnet_lite0"
GRID = (8, 10, 12, 14, 16, 20, 25)          # the ratios the curve should cover (issue 13: 8-25x)
GRID_TOL = 0.3                              # a row within this of a grid ratio covers it
MEASURED = "compact recipe (EM only: sensitivity allocation, measured error cap, rate menu)"      # since session 16
MEASURED_CAPS = (0.15, 0.2, 0.25, 0.3, 0.4)  # its caps; alloc_cap_rule 'measured' picks one by the network's KL
COMPACT = "compact recipe with cap list [0.2, 0.3] (sessions 14-15)"       # the tightest cap of the list
COMPACT_03 = "compact recipe with cap 0.3 (sessions 12-13)"                # the same with the single cap 0.3
CAP_LIST = (0.2, 0.3)                       # sessions 14-15's caps: the first the budget allows (0.2 to ~20x)
SESSION7 = "session-7 recipe (allocation, cap 0.3 + 150 global distillation steps)"
BLOCKS = "block pipeline with reconstruction"
GPTQ = "GPTQ-style per-channel scalar"
CML_PTP = "coremltools k-means palettization"
CML_SKM = "coremltools sensitive k-means"
MAIN = (MEASURED, COMPACT, COMPACT_03, SESSION7, BLOCKS, GPTQ, CML_PTP, CML_SKM)
STYLE = {MEASURED: ("k", "*", "-"), COMPACT: ("C0", "o", "-"), COMPACT_03: ("C0", "o", ":"), SESSION7: ("C1", "s", "-"), BLOCKS: ("C2", "^", "-"),
         GPTQ: ("C3", "D", "-"), CML_PTP: ("C4", "v", ":"), CML_SKM: ("C5", "P", ":")}
OTHER_COLORS = ("C6", "C7", "C8", "C9", "k", "0.55", "olive", "teal", "navy", "salmon", "gold")
MENU = ["int8", "int4", "int2", "fp16"]
NOT_PLOTTED = ("early PQ pipeline",)        # in the table only (sessions 1-5, superseded)
log = logging.getLogger("effnet_curve")


def _rows(doc: object) -> list[dict]:
    rows = doc.get("rows") if isinstance(doc, dict) else doc
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _budget_settings(r: dict) -> dict:
    """A budget.py row's recorded settings (defaults filled in for rows written before a key existed)."""
    cap = r.get("alloc_max_error")
    return {"method": r.get("method"), "weighting": r.get("alloc_weighting", "none"),
            "cap": tuple(cap) if isinstance(cap, list) else cap,
            "menu": list(r.get("alloc_menu") or []), "layer": r.get("layer_steps", 0),
            "global": r.get("global_steps", 0), "recon": r.get("reconstruct") or {}, "em": r.get("em") or {},
            "calib": r.get("calib_images"), "bits": r.get("codebook_bits"), "mixup": r.get("mixup") or 0.0,
            "positions": r.get("stats_positions") or 0, "device": r.get("device", "cpu"), "pool": r.get("train_pool"),
            "sens": r.get("alloc_sensitivity_loss", "mse"), "rule": r.get("alloc_cap_rule", "tightest")}


def _cap(c: float | tuple | None) -> str:
    """A recorded error cap as a flag value: '0.2', '0.2,0.3' (a list: the first the budget allows), 'none'."""
    return "none" if c is None else ",".join(f"{x:g}" for x in c) if isinstance(c, tuple) else f"{c:g}"


def _differences(s: dict) -> str:
    """What a budget.py row does beyond the compact recipe, in words."""
    out = []
    if s["method"] != "alloc":
        out.append(f"{s['method']} preset")
    if s["weighting"] != "sensitivity":
        out.append("unweighted allocation")
    elif s["sens"] != "mse":
        out.append(f"{s['sens']} sensitivity")
    if s["cap"] != 0.3:
        out.append("no error cap" if s["cap"] is None else f"cap {_cap(s['cap'])}")
    if s["menu"] != MENU:
        out.append("no rate menu" if not s["menu"] else "menu " + "/".join(s["menu"]))
    if s["layer"] or s["global"]:
        out.append(f"{s['layer']} layer + {s['global']} global steps")
    out += [f"EM {k}={v}" for k, v in s["em"].items()]
    out += [f"{s['bits']}-bit codebooks"] if s["bits"] not in (8, None) else []
    out += [f"{s['calib']} calibration images"] if s["calib"] != 128 else []
    out += [f"mixup {s['mixup']:g}"] if s["mixup"] else []
    out += [f"Grams on {s['positions']} positions"] if s["positions"] else []
    out += [f"{s['pool']} training images"] if s["pool"] else []
    return ", ".join(out) or "compact recipe"


def _picked(r: dict) -> str:
    """How a measured-rule row got its cap: measured best, or the only one the budget allowed."""
    return "measured best" if r.get("cap_errors") else "(the only cap that fits)"


def method_of(r: dict) -> tuple[str, str]:
    """(method, detail) of a result row: one of MAIN, or 'other: ...' naming what differs."""
    if "recipe" in r:                                           # recipe_cli.py: the plain CLI command
        if r["recipe"] != "compact":
            return f"other: CLI recipe {r['recipe']}", "bitdown compress CLI"
        if r.get("alloc_cap_rule") == "measured" and r.get("alloc_caps") == list(MEASURED_CAPS):
            return MEASURED, f"bitdown compress CLI, cap {r.get('alloc_max_error')} " + _picked(r)
        if r.get("alloc_caps") is None and r.get("alloc_max_error") is not None:     # one cap given with --config
            cap = r["alloc_max_error"]                           # (session 17): 0.2 is what the cap list picks
            method = COMPACT if cap == 0.2 else COMPACT_03 if cap == 0.3 else f"other: compact recipe with cap {cap:g}"
            return method, f"bitdown compress CLI, --config alloc_max_error {cap:g}"
        listed = (r.get("alloc_caps") == list(CAP_LIST)          # recorded by recipe_cli.py since session 15,
                  or "cap list" in (r.get("tag") or ""))            # in the tag of the session-14 row
        return (COMPACT if listed else COMPACT_03), "bitdown compress CLI"
    if r.get("method") in ("ptp", "skm"):                       # peers.py
        return (CML_PTP if r["method"] == "ptp" else CML_SKM), f"{r['setting']}: {r.get('description', '')}"
    if str(r.get("method", "")).startswith("gptq"):
        return GPTQ, f"{r['method']}, {r.get('layer_steps', 0)} layer + {r.get('global_steps', 0)} global steps"
    if "stage" in r:                                            # accuracy.py (sessions 1-5)
        kind = "scalar round-to-nearest" if r["method"].startswith("scalar") else "early PQ pipeline"
        return f"other: {kind} (accuracy.py)", f"{r['method']} {r.get('preset', '-')}, stage {r['stage']}"
    s = _budget_settings(r)
    detail = _differences(s)
    if s["device"] != "cpu":
        return "other: GPU long distillation", f"{detail}, on {s['device']}"
    base = (s["method"] == "alloc" and s["weighting"] == "sensitivity" and s["sens"] == "mse" and not s["em"]
            and s["bits"] == 8 and s["calib"] == 128 and not s["mixup"] and not s["positions"] and not s["pool"])
    core = base and s["cap"] == 0.3
    if core and s["recon"]:
        return BLOCKS, detail + ", reconstruction " + ",".join(f"{k}={v}" for k, v in s["recon"].items())
    em_only = s["menu"] == MENU and not (s["recon"] or s["layer"] or s["global"])
    if base and em_only and s["rule"] == "measured" and s["cap"] == MEASURED_CAPS:
        return MEASURED, f"budget.py, cap {r.get('alloc_cap_used')} " + _picked(r)
    if base and em_only and s["rule"] == "tightest" and s["cap"] in (0.2, CAP_LIST):
        return COMPACT, f"budget.py, cap {_cap(s['cap'])}"     # 0.2: what the cap list picks up to ~20x
    if core and em_only:
        return COMPACT_03, "budget.py"
    if core and not s["menu"] and s["layer"] == 0 and s["global"] == 150:
        return SESSION7, "budget.py"
    return f"other: compact recipe with {detail}", "budget.py"


def budget_command(r: dict) -> str:
    """The budget.py command line that reproduces a row, rebuilt from its recorded settings."""
    s = _budget_settings(r)
    cmd = f"python benchmarks/budget.py --models {r['model']}"
    cmd += f" --ratios {r['target_ratio']:g}" if r.get("target_ratio") else ""
    cmd += f" --methods {s['method']}" + (f" --codebook-bits {s['bits']}" if s["bits"] else "")
    cmd += f" --layer-steps {s['layer']} --global-steps {s['global']} --batch-size {r['batch_size']}"
    cmd += f" --calib-images {s['calib']}"
    cmd += f" --seed {r['seed']}" if r.get("seed") else ""
    cmd += f" --alloc-weighting {s['weighting']}" if s["weighting"] != "none" else ""
    cmd += f" --alloc-sensitivity-loss {s['sens']}" if s["sens"] != "mse" else ""
    cmd += f" --alloc-max-error {_cap(s['cap'])}" if s["cap"] is not None else ""
    cmd += f" --alloc-cap-rule {s['rule']}" if s["rule"] != "tightest" else ""
    cmd += f" --alloc-menu {','.join(s['menu'])}" if s["menu"] else ""
    cmd += f" --em '{json.dumps(s['em'])}'" if s["em"] else ""
    cmd += f" --reconstruct '{json.dumps(s['recon'])}'" if s["recon"] else ""
    cmd += f" --stats-positions {s['positions']}" if s["positions"] else ""
    cmd += f" --mixup {s['mixup']:g}" if s["mixup"] else ""
    cmd += f" --train-pool {s['pool']}" if s["pool"] else ""
    cmd += " --device cuda" if s["device"] != "cpu" else ""
    cmd += f" --allocation benchmarks/results/{r['allocation_from']}" if r.get("allocation_from") else ""
    return cmd


def command_of(r: dict, doc: object) -> str:
    """The recorded command of a row ('' where its file records none)."""
    if r.get("command"):
        return r["command"]
    if "setting" in r and isinstance(doc, dict):                # peers.py: the run whose --settings list has it
        for run in doc.get("runs", []):
            words = run["command"].split()
            flags = dict(zip(words, words[1:]))
            if r["model"] in flags.get("--models", "").split(",") and \
                    r["setting"] in flags.get("--settings", "").split(","):
                return run["command"]
        return ""
    if "target_ratio" in r and "batch_size" in r and "stage" not in r:
        return budget_command(r)
    return ""


def _key(r: dict) -> tuple:
    """Identity of a measurement: a merged file's copy of a row has the same one."""
    return (r.get("method"), r.get("setting"), r.get("stage"), r.get("preset"), round(r["ratio"], 4), r["top1"],
            r.get("agreement"), r.get("train_top1"), r.get("bytes_on_disk"), round(r.get("wall_s") or 0, 1))


def collect(results: Path = RESULTS) -> tuple[list[dict], float]:
    """Every distinct EfficientNet-Lite0 row of results/*.json as a flat record, and the teacher's top-1.

    Files are read most specific first (fewest rows), so a row both in its own file and in a merged one cites its
    own file ('also_in' names the others). A teacher top-1 that differs between files is an error."""
    docs = []
    for path in sorted(results.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a readable JSON file ({e})") from e
        docs.append((path.name, doc, _rows(doc)))
    docs.sort(key=lambda t: (len(t[2]), t[0]))
    teachers, seen, out = set(), {}, []
    for name, doc, rows in docs:
        if isinstance(doc, dict) and MODEL in (doc.get("teachers") or {}):
            teachers.add(round(doc["teachers"][MODEL], 2))
        for r in rows:
            if r.get("model") != MODEL or not isinstance(r.get("top1"), (int, float)) or \
                    not isinstance(r.get("ratio"), (int, float)):
                continue
            if r.get("method") == "teacher":
                teachers.add(round(r["top1"], 2))
                continue
            if r.get("teacher_top1") is not None:
                teachers.add(round(r["teacher_top1"], 2))
            k = _key(r)
            if k in seen:
                if name not in seen[k]["also_in"] and name != seen[k]["source"]:
                    seen[k]["also_in"].append(name)
                continue
            method, detail = method_of(r)
            rec = {"method": method, "detail": detail, "ratio": r["ratio"], "top1": r["top1"],
                   "agreement": r.get("agreement"), "seen_top1": r.get("train_top1"),
                   "seen_agreement": r.get("train_agreement"), "seed": r.get("seed", 0), "source": name,
                   "also_in": [], "command": command_of(r, doc)}
            seen[k] = rec
            out.append(rec)
    if len(teachers) != 1:
        raise ValueError(f"EfficientNet-Lite0 teacher top-1 differs between result files (or is missing): "
                         f"{sorted(teachers)}")
    order = {m: i for i, m in enumerate(MAIN)}
    out.sort(key=lambda r: (order.get(r["method"], len(MAIN)), r["method"], round(r["ratio"], 2), r["seed"], r["source"]))
    return out, teachers.pop()


def missing(rows: list[dict], method: str) -> list[int]:
    """The GRID ratios with no row of `method` within GRID_TOL."""
    have = [r["ratio"] for r in rows if r["method"] == method]
    return [g for g in GRID if not any(abs(x - g) <= GRID_TOL for x in have)]


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def write_md(rows: list[dict], teacher: float, path: Path) -> None:
    cmds: list[str] = []
    for r in rows:
        if r["command"] and r["command"] not in cmds:
            cmds.append(r["command"])
    lines = [
        "# EfficientNet-Lite0: top-1 vs compression ratio (generated by benchmarks/effnet_curve.py)",
        "",
        f"Every row read from a committed file of benchmarks/results/ (column 'source'; 'also in': a merged copy). "
        f"Seeded 500/500 split of the ImageNet sample images: top-1 and teacher agreement on the held-out 500 "
        f"(teacher **{teacher:.2f} %**), 'seen': the same on the 500 calibration images the compression used "
        f"('-': not measured in that row). Ratio: paper-style size accounting. 'cmd': the command below; for a "
        f"budget.py row its flags rebuilt from the settings the row records ('-': the file records none). "
        f"One plot: effnet_curve.png.",
        "",
        "| method | detail | seed | ratio | top-1 held-out % | agreement held-out % | top-1 seen % | "
        "agreement seen % | source | cmd |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        src = r["source"] + (f" (also in {', '.join(r['also_in'])})" if r["also_in"] else "")
        cmd = f"c{cmds.index(r['command']) + 1}" if r["command"] else "-"
        lines.append(f"| {r['method']} | {r['detail']} | {r['seed']} | {r['ratio']:.2f}x | {r['top1']:.1f} | "
                     f"{_f(r['agreement'])} | {_f(r['seen_top1'])} | {_f(r['seen_agreement'])} | {src} | {cmd} |")
    variants = sorted({r["detail"].split(",")[0] for r in rows if r["method"] == GPTQ})
    lines += ["", f"GPTQ-style variants measured: {', '.join(variants) or 'none'} (gptq4/3/2 are budget.py methods)."]
    lines += ["", f"Grid ratios ({', '.join(f'{g}x' for g in GRID)}) with no point yet, per method:", ""]
    for m in MAIN:
        gaps = missing(rows, m)
        lines.append(f"- {m}: " + (", ".join(f"{g}x" for g in gaps) if gaps else "none"))
    lines += ["", "Commands:", ""] + [f"- c{i + 1}: `{c}`" for i, c in enumerate(cmds)]
    path.write_text("\n".join(lines) + "\n")


def write_png(rows: list[dict], teacher: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 6))
    others = sorted(m for m in {r["method"] for r in rows} - set(MAIN) if not any(s in m for s in NOT_PLOTTED))
    for i, m in enumerate(list(MAIN) + others):
        pts = [r for r in rows if r["method"] == m]
        if not pts:
            continue
        color, marker, ls = STYLE.get(m, (OTHER_COLORS[i % len(OTHER_COLORS)], "xo*h<>dp"[i % 8], "none"))
        ratios = sorted({round(r["ratio"], 2) for r in pts})     # seeds of one ratio: their mean on the line
        means = [sum(r["top1"] for r in pts if round(r["ratio"], 2) == x) /
                 sum(1 for r in pts if round(r["ratio"], 2) == x) for x in ratios]
        ax.plot(ratios, means, color=color, marker=marker, ls=ls, ms=6 if m in MAIN else 4,
                label=m if m in MAIN else m.removeprefix("other: "))
        ax.scatter([r["ratio"] for r in pts], [r["top1"] for r in pts], color=color, marker=marker, s=10, alpha=0.5)
    ax.axhline(teacher, color="k", ls="--", lw=1, label=f"teacher fp32 {teacher:.1f} %")
    ax.axvspan(GRID[0], GRID[-1], color="0.93", zorder=0)
    ax.set_xscale("log")
    ticks = [4, 6, 8, 10, 12, 16, 20, 25, 30]
    ax.set(xticks=ticks, xticklabels=[f"{t}x" for t in ticks], ylim=(-2, 100),
           xlabel="compression ratio (paper-style size)", ylabel="top-1 % on the held-out 500",
           title="EfficientNet-Lite0 (shaded: issue 13's 8-25x)")
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(RESULTS), help="folder of the result JSON files")
    p.add_argument("--out", default=str(RESULTS / "effnet_curve"), help="output path without .md/.png")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows, teacher = collect(Path(a.results))
    out = Path(a.out)
    write_md(rows, teacher, out.with_suffix(".md"))
    write_png(rows, teacher, out.with_suffix(".png"))
    log.info("%d rows, teacher %.2f %%; compact recipe missing at %s", len(rows), teacher, missing(rows, MEASURED))


if __name__ == "__main__":
    main()
