"""Peak RSS of `bitdown compress` traced by stage: the CLI runs in this process while a thread samples
/proc/self/status (VmRSS) every 0.2 s; the library's stage functions are wrapped so that each sample is
attributed to the innermost stage running (allocation, block inputs, statistics, EM, per-layer distillation,
teacher outputs, global distillation, saving, evaluation, ...). The block cache's RAM (blockio.TensorStore) is
sampled too.

    python benchmarks/memory_stages.py run --tag default -- compress --model efficientnet_lite0 \
        --data /tmp/effsplit/calib --target-ratio 10 --out /tmp/x.bitdown [--eval-data /tmp/effsplit/eval]
    python benchmarks/memory_stages.py report --tags default,short     # table + plot of the recorded runs

`run` writes benchmarks/results/memory_stages_<tag>.json (samples, stage intervals, per-stage peak and time,
the CLI's output); `report` writes memory_stages.md and memory_stages.png from the JSON files.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MB = 2**20

# (module, attribute, stage label): functions wrapped so that their run is a stage; nested calls make nested
# stages, a sample belongs to the innermost one
STAGES = [
    ("bitdown.compress", "take_shard", "read calibration images"),
    ("bitdown.compress", "_allocation", "allocation (rate-distortion table)"),
    ("bitdown.compress", "dependencies", "block dependencies probe"),
    ("bitdown.blockio.BlockIO", "inputs", "block inputs (blockio)"),
    ("bitdown.compress._BlockRun", "_layer_stats", "statistics"),
    ("bitdown.compress", "kmeans", "EM"),
    ("bitdown.compress", "assign_codes", "EM"),
    ("bitdown.compress", "quantize_scalar", "EM"),
    ("bitdown.compress", "reconstruct_block", "reconstruction"),
    ("bitdown.finetune", "teacher_outputs", "teacher outputs (holdout)"),
    ("bitdown.finetune", "finetune_layer", "per-layer distillation (+guard)"),
    ("bitdown.finetune", "holdout_baseline", "holdout baseline (global guard)"),
    ("bitdown.finetune", "finetune_global", "global distillation"),
    ("bitdown.compress", "recalibrate_bn", "BatchNorm re-estimation"),
    ("bitdown.compress", "_save", "checkpoint"),
    ("bitdown", "save", "save file"),
    ("bitdown.evaluate", "evaluate", "evaluation"),
]
BLOCK_LOOP = "block loop (targets, outputs)"      # _BlockRun.run outside the stages above


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Tracer:
    """The stage stack, the samples and the TensorStores alive."""

    def __init__(self, period: float = 0.2) -> None:
        self.stack: list[str] = ["setup"]
        self.samples: list[tuple[float, float, str, float]] = []     # (t, rss MB, stage, block cache MB)
        self.intervals: list[tuple[str, float, float]] = []
        self.stores: list = []
        self.period, self.t0 = period, time.perf_counter()
        self.live: Path | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def sample(self) -> None:
        cache = sum(s.in_ram for s in self.stores) / MB
        self.samples.append((self.now(), rss_mb(), self.stack[-1], cache))

    def _loop(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(self.period):
            self.sample()
            if self.live is not None and time.perf_counter() - last > 30:    # a partial trace for a long run
                last = time.perf_counter()
                self.live.write_text(json.dumps({"stages": summarise(self), "stack": self.stack,
                                                 "last": self.samples[-1]}, indent=0))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @contextlib.contextmanager
    def stage(self, label: str):
        self.sample()
        self.stack.append(label)
        t = self.now()
        try:
            yield
        finally:
            self.sample()
            self.stack.pop()
            self.intervals.append((label, t, self.now()))


def _resolve(path: str):
    import importlib
    parts = path.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        obj = sys.modules[".".join(parts[:k])]
        for p in parts[k:]:
            obj = getattr(obj, p)
        return obj
    raise ImportError(path)


def instrument(tr: Tracer) -> None:
    import importlib
    blockio = importlib.import_module("bitdown.blockio")
    compress = importlib.import_module("bitdown.compress")    # the module (bitdown.compress is also a function)

    for owner, attr, label in STAGES:
        obj = _resolve(owner)
        fn = getattr(obj, attr)

        def wrapped(*a, __fn=fn, __label=label, **k):
            with tr.stage(__label):
                return __fn(*a, **k)
        functools.update_wrapper(wrapped, fn)
        setattr(obj, attr, wrapped)
    run = compress._BlockRun.run

    def run_wrapped(self, *a, **k):
        with tr.stage(BLOCK_LOOP):
            return run(self, *a, **k)
    compress._BlockRun.run = run_wrapped
    init = blockio.TensorStore.__init__

    def store_init(self, *a, **k):
        init(self, *a, **k)
        tr.stores.append(self)
    blockio.TensorStore.__init__ = store_init


def summarise(tr: Tracer) -> list[dict]:
    rows: dict[str, dict] = {}
    for t, rss, stage, cache in tr.samples:
        r = rows.setdefault(stage, {"stage": stage, "peak_rss_mb": 0.0, "block_cache_mb_at_peak": 0.0, "first_s": t})
        if rss > r["peak_rss_mb"]:
            r["peak_rss_mb"], r["block_cache_mb_at_peak"], r["peak_at_s"] = rss, cache, t
    for label, a, b in tr.intervals:
        if label in rows:
            r = rows[label]
            r["calls"] = r.get("calls", 0) + 1
            r["total_s"] = r.get("total_s", 0.0) + (b - a)
    return sorted(rows.values(), key=lambda r: r["first_s"])


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def cmd_run(a: argparse.Namespace, cli_args: list[str]) -> None:
    """The CLI under the tracer; SIGUSR1 / SIGTERM, or --stop-after seconds, interrupt it (the CLI returns 130) and
    the trace so far is written (a background job started by a shell ignores SIGINT)."""
    import signal
    sys.path.insert(0, str(ROOT / "src"))
    signal.signal(signal.SIGUSR1, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    if a.stop_after:      # SIGUSR1 to itself (interrupt_main's SIGINT is ignored in a background job)
        timer = threading.Timer(a.stop_after, os.kill, (os.getpid(), signal.SIGUSR1))
        timer.daemon = True
        timer.start()
    tr = Tracer(a.period)
    tr.live = Path(f"/tmp/memory_stages_{a.tag}.live.json")
    instrument(tr)
    from bitdown.cli import main as cli_main
    tr.start()
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        rc = cli_main(cli_args)
    wall = time.perf_counter() - t0
    tr.stop()
    sys.stdout.write(out.getvalue())
    rows = summarise(tr)
    peak = max(rows, key=lambda r: r["peak_rss_mb"])
    res = {"tag": a.tag, "command": "bitdown " + " ".join(cli_args), "rc": rc, "wall_s": wall,
           "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "peak_stage": peak["stage"], "threads": os.environ.get("OMP_NUM_THREADS"),
           "load_before": a.load_before, "load_after": os.getloadavg(),
           "machine": {"cpu": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()},
           "note": a.note, "stages": rows, "cli_output": out.getvalue(),
           "intervals": [(lab, round(s, 2), round(e, 2)) for lab, s, e in tr.intervals
                         if lab not in ("checkpoint",)],
           "samples": [(round(t, 2), round(r, 1), s, round(c, 1)) for t, r, s, c in tr.samples]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"memory_stages_{a.tag}.json"
    path.write_text(json.dumps(res))
    print(f"peak RSS {res['ru_maxrss_mb']:.0f} MB in stage {peak['stage']!r}; wall {wall:.0f} s -> {path}")


def cmd_report(a: argparse.Namespace) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads((RESULTS / f"memory_stages_{t}.json").read_text()) for t in a.tags.split(",")]
    lines = ["# Peak RSS of `bitdown compress` by stage (generated by benchmarks/memory_stages.py)", "",
             "RSS sampled every 0.2 s in the compressing process (VmRSS); a sample belongs to the innermost stage "
             "running. `block cache` = the block pipeline's TensorStore RAM at that stage's peak. Target: 4 GiB "
             "(4096 MB).", ""]
    for r in runs:
        lines += [f"## {r['tag']}", "", f"`{r['command']}`", "",
                  f"{r['note']}", "",
                  f"OMP_NUM_THREADS={r['threads']}, {r['machine']['cores']}-core CPU, load average before "
                  f"{r['load_before']}, after {[round(x, 1) for x in r['load_after']]}; wall {r['wall_s']:.0f} s; "
                  f"ru_maxrss {r['ru_maxrss_mb']:.0f} MB, peak in **{r['peak_stage']}**.", "",
                  "| stage | peak RSS MB | block cache MB at peak | calls | total s |", "|---|---|---|---|---|"]
        for s in r["stages"]:
            lines.append(f"| {s['stage']} | {s['peak_rss_mb']:.0f} | {s['block_cache_mb_at_peak']:.0f} | "
                         f"{s.get('calls', '-')} | {s.get('total_s', float('nan')):.1f} |")
        lines.append("")
    (RESULTS / "memory_stages.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 3.2 * len(runs)), squeeze=False)
    everything = sorted({s[2] for r in runs for s in r["samples"]})         # one colour per stage in all runs
    cmap = plt.get_cmap("tab20")
    colour = {s: cmap(i % 20) for i, s in enumerate(everything)}
    for ax, r in zip(axes[:, 0], runs):
        t = [s[0] for s in r["samples"]]
        ax.plot(t, [s[1] for s in r["samples"]], lw=0.5, color="0.6", label="RSS")
        ax.plot(t, [s[3] for s in r["samples"]], lw=0.8, color="black", label="block cache (RAM)")
        ax.axhline(4096, color="red", ls="--", lw=0.8, label="4 GiB (target)")
        stages = sorted({s[2] for s in r["samples"]})
        ax.scatter(t, [s[1] for s in r["samples"]], s=4, c=[colour[s[2]] for s in r["samples"]], zorder=3)
        for s in stages:
            ax.scatter([], [], s=12, color=colour[s], label=s)
        ax.set_title(f"{r['tag']}: peak {r['ru_maxrss_mb']:.0f} MB ({r['peak_stage']})", fontsize=9)
        ax.set_xlabel("s")
        ax.set_ylabel("MB")
        ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(RESULTS / "memory_stages.png", dpi=110)
    print((RESULTS / "memory_stages.md").read_text())


def main() -> None:
    argv = sys.argv[1:]
    cli_args: list[str] = []
    if "--" in argv:
        k = argv.index("--")
        argv, cli_args = argv[:k], argv[k + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--tag", required=True)
    r.add_argument("--period", type=float, default=0.2)
    r.add_argument("--note", default="")
    r.add_argument("--stop-after", type=float, default=0, help="seconds: interrupt the run then (0: never)")
    r.add_argument("--load-before", default=str([round(x, 1) for x in os.getloadavg()]))
    rep = sub.add_parser("report")
    rep.add_argument("--tags", required=True)
    a = p.parse_args(argv)
    if a.cmd == "run":
        cmd_run(a, cli_args)
    else:
        cmd_report(a)


if __name__ == "__main__":
    main()
