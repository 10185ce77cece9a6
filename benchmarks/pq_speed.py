"""Forward time of a loaded PQ model against the dense model with the same weights, CPU, 1 thread.

    python benchmarks/pq_speed.py                      # rows "after" (this checkout's modules.py)
    PYTHONPATH=/path/to/old/src python benchmarks/pq_speed.py --variant before

The demo's architecture (zoo resnet20_cifar10, random init) has every conv product-quantized with a random
codebook (K=256, d=9: the decoded weight is dense-sized, its values do not change the conv's cost), is
saved with bitdown.save and read back with bitdown.load (the model timed is the loaded one, in eval mode
under torch.no_grad); the dense model is the loaded one with each PQ layer replaced by `to_dense()`
(identical weights, plain Parameters). Per batch size (1 and 256): `--rounds` rounds; in each round the two
models run alternately, one forward each, `--runs` times (so a background load hits both alike), and the
round's figure is each model's median; the result is the best (lowest) round median of each, and the
ratio PQ / dense of those (`--clock cpu`: times are the thread's CPU time, not the wall clock, for a
machine shared with other jobs). Where this checkout has `bitdown.freeze` (session 13), the frozen inference model
(`bitdown.load(path, frozen=True)`: plain layers holding the decoded weights) runs in the same rotation and its
ratio frozen / dense is reported the same way. Also timed: one access of `.weight` of a PQ conv (the eval-mode cache check)
against the dense conv's. The machine's load average is recorded before and after.

Writes benchmarks/results/pq_speed.{json,md}, keeping the rows (and notes) of the other variants already there;
each row records `uptime` before it ran.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
import timeit
from pathlib import Path

import torch
import torch.nn as nn

import bitdown
from bitdown.compress import CompressionInfo
from bitdown.config import LayerPlan
from bitdown.modules import is_pq, quantize_module
from bitdown.zoo import build_model

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "resnet20_cifar10"


def quantized_model(k: int = 256, seed: int = 0) -> nn.Module:
    """The zoo ResNet-20 with every conv product-quantized (random codebooks and codes), with metadata."""
    model = build_model(MODEL, None)
    g = torch.Generator().manual_seed(seed)
    plans = []
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Conv2d):
            row = m.weight[0].numel()
            d = 9 if row % 9 == 0 else 1
            shape = tuple(m.weight.shape)
            quantize_module(m, torch.randn(k, d, generator=g) * 0.1,
                            torch.randint(0, k, (shape[0], row // d), generator=g))
            plans.append(LayerPlan(name, "conv1x1" if m.kernel_size == (1, 1) else "convkxk", shape, d, k))
    model.bitdown = CompressionInfo({"name": MODEL, "source": "zoo", "preprocess": "cifar10"}, {}, plans, {})
    return model


def dense_copy(model: nn.Module) -> nn.Module:
    dense = copy.deepcopy(model)
    for parent in list(dense.modules()):
        for name, child in list(parent.named_children()):
            if is_pq(child):
                setattr(parent, name, child.to_dense())
    return dense


CLOCKS = {"wall": time.perf_counter,   # wall clock: includes the time the thread waits while other jobs run
          "cpu": time.thread_time}      # this thread's CPU time: not the waits (cache pollution still counts)


def interleaved(models: dict[str, nn.Module], x: torch.Tensor, runs: int, rounds: int,
                clock: str = "wall") -> dict[str, list[float]]:
    """Per model, its median forward time (ms, on `clock`) of each round; models alternate forward by
    forward, in an order rotated at each run (no model always runs right after the same other one)."""
    now = CLOCKS[clock]
    out: dict[str, list[float]] = {k: [] for k in models}
    items = list(models.items())
    with torch.no_grad():
        for m in models.values():            # warm-up (allocations, oneDNN primitives, the PQ caches)
            m(x)
            m(x)
        for _ in range(rounds):
            times: dict[str, list[float]] = {k: [] for k in models}
            for r in range(runs):
                for k, m in items[r % len(items):] + items[:r % len(items)]:
                    t = now()
                    m(x)
                    times[k].append(now() - t)
            for k in models:
                out[k].append(statistics.median(times[k]) * 1e3)
    return out


def weight_access_us(pq: nn.Module, dense: nn.Module, rounds: int = 30, number: int = 20000) -> dict[str, float]:
    """Best time (us) of one `.weight` access of the same conv in both models, eval and no_grad."""
    name = [n for n, m in pq.named_modules() if is_pq(m)][5]
    layers = {"pq": pq.get_submodule(name), "dense": dense.get_submodule(name)}
    best = {k: float("inf") for k in layers}
    with torch.no_grad():
        for _ in range(rounds):
            for k, layer in layers.items():
                best[k] = min(best[k], timeit.timeit(lambda: layer.weight, number=number) / number * 1e6)
    return {k: round(v, 3) for k, v in best.items()}


class _NoCheck:
    """Reference only (unsafe): a PQ layer whose `weight` returns its eval cache without any check, to
    show the floor the cache check sits on (timing noise, the cost of the check itself)."""

    @property
    def weight(self) -> torch.Tensor:
        return self.__dict__["_pq_cache"].weight


def no_check_copy(model: nn.Module, x: torch.Tensor) -> nn.Module:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref(x)                                # builds every layer's cache
    for m in ref.modules():
        if is_pq(m):
            m.__class__ = type(f"NoCheck{type(m).__name__}", (_NoCheck, type(m)), {})
    return ref


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def write_md(doc: dict, path: Path) -> None:
    m = doc["machine"]
    lines = ["# PQ model vs dense model forward time (generated by benchmarks/pq_speed.py)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} thread. Model: {MODEL}, "
             "every conv PQ (K=256, d=9), saved and loaded; dense = the loaded model's `to_dense()` layers.",
             "Each figure: the best of the rounds' medians; PQ, dense (and frozen) forwards interleaved; clock "
             "wall = perf_counter, cpu = the thread's CPU time (immune to waiting for a busy CPU).", "",
             "| variant | batch | runs x rounds, clock | dense ms | PQ ms | PQ / dense | no-check reference / dense | "
             "frozen / dense | load avg (1 min) before, after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        ref = f"{r['no_check_ratio']:.3f}" if "no_check_ratio" in r else "-"
        frozen = f"**{r['frozen_ratio']:.3f}** ({r['frozen_ms']:.3f} ms)" if "frozen_ratio" in r else "-"
        lines.append(f"| {r['variant']} | {r['batch']} | {r['runs']} x {r['rounds']} {r.get('clock', 'wall')} | "
                     f"{r['dense_ms']:.3f} | "
                     f"{r['pq_ms']:.3f} | {r['ratio']:.3f} | {ref} | {frozen} | "
                     f"{r['loadavg_before'][0]:.2f}, {r['loadavg_after'][0]:.2f} |")
    lines += ["", "`.weight` access of one conv (eval, no_grad), best of 30 x 20,000:", "",
              "| variant | dense us | PQ us |", "|---|---|---|"]
    for v, w in doc.get("weight_access_us", {}).items():
        lines.append(f"| {v} | {w['dense']:.3f} | {w['pq']:.3f} |")
    notes = doc.get("notes") or {}
    if notes:
        lines += ["", "Notes:", ""] + [f"- {v}: {n}" for v, n in notes.items()]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="after", help="name of this run's rows (rows of other variants or batch "
                                                       "sizes already in --out are kept)")
    p.add_argument("--batches", default="1,256")
    p.add_argument("--runs", default="500,15", help="forwards per model and round, per batch size")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall (perf_counter) or cpu (the thread's CPU time, for a machine shared with other jobs)")
    p.add_argument("--out", default=str(RESULTS / "pq_speed.json"))
    p.add_argument("--notes", default=None, help="a line for the markdown about this variant (e.g. how the "
                                                   "machine was loaded)")
    p.add_argument("--no-check-reference", action="store_true",
                   help="also time the PQ model with the cache check removed (unsafe; a reference for the noise "
                        "floor and the check's cost)")
    a = p.parse_args()
    torch.set_num_threads(1)
    batches = [int(b) for b in a.batches.split(",")]
    runs = [int(r) for r in a.runs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = bitdown.save(quantized_model(), Path(tmp) / "r20.bitdown")
        pq = bitdown.load(path).eval()
        frozen = bitdown.load(path, frozen=True) if hasattr(bitdown, "freeze") else None
    dense = dense_copy(pq).eval()
    x0 = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pq(x0), dense(x0))          # the same function
        if frozen is not None and not torch.equal(frozen(x0), pq(x0)):
            raise AssertionError("the frozen model's outputs differ from the PQ model's")
    rows = []
    for bs, n in zip(batches, runs):
        x = torch.randn(bs, 3, 32, 32, generator=torch.Generator().manual_seed(bs))
        uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        load0 = [round(v, 2) for v in os.getloadavg()]
        models = {"dense": dense, "pq": pq}
        if a.no_check_reference:
            models["no_check"] = no_check_copy(pq, x)
        if frozen is not None:
            models["frozen"] = frozen
        t = interleaved(models, x, n, a.rounds, a.clock)
        load1 = [round(v, 2) for v in os.getloadavg()]
        row = {"variant": a.variant, "batch": bs, "runs": n, "rounds": a.rounds, "clock": a.clock,
               "dense_ms": min(t["dense"]), "pq_ms": min(t["pq"]), "ratio": min(t["pq"]) / min(t["dense"]),
               "dense_round_ms": t["dense"], "pq_round_ms": t["pq"],
               "loadavg_before": load0, "loadavg_after": load1, "uptime_before": uptime}
        if a.no_check_reference:
            row.update(no_check_ms=min(t["no_check"]), no_check_ratio=min(t["no_check"]) / min(t["dense"]),
                       no_check_round_ms=t["no_check"])
        if frozen is not None:
            row.update(frozen_ms=min(t["frozen"]), frozen_ratio=min(t["frozen"]) / min(t["dense"]),
                       frozen_round_ms=t["frozen"])
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("round_ms")}))
    access = weight_access_us(pq, dense)
    print("weight access us", access)
    out = Path(a.out)
    doc = json.loads(out.read_text()) if out.exists() else {"rows": [], "weight_access_us": {}}
    doc["machine"] = machine()
    done = {(r["variant"], r["batch"]) for r in rows}
    doc["rows"] = sorted([r for r in doc["rows"] if (r["variant"], r["batch"]) not in done] + rows,
                         key=lambda r: (r["variant"] != "before", r["variant"], r["batch"]))
    doc["weight_access_us"][a.variant] = access
    if isinstance(doc.get("notes"), str):        # one note before session 13: the variant it was written for
        doc["notes"] = {"s11 quiet #1": doc["notes"]}
    if a.notes:
        doc.setdefault("notes", {})[a.variant] = a.notes
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    write_md(doc, out.with_suffix(".md"))


if __name__ == "__main__":
    main()
