#!/usr/bin/env python3
"""Quantizer race on one synthetic conv layer: bitdown's EM vs a materialised-activation reference EM.

    python benchmarks/em_layer.py --case conv256|conv64 [--json] [--config best|paper] [--ref-iters 1]

Builds the seeded layer of ../shared/bench/layer_inputs.py (env BITDOWN_BENCH overrides the folder),
times the Gram statistics over all images (`stats_s`, full Gram only when the config needs it) and
bitdown's quantizer (block 9, 256 centroids, `em_s`), and measures out_rel_err on all images. In the
same process it times `--ref-iters` iterations of a straightforward reimplementation of the original
code's EM (kill-the-bits): per step `1000 // C_out` random im2col rows stacked over the block positions,
and for every centroid c the materialised ||X~ (m - c)||^2 over all subvectors m (chunked over
centroids/subvectors, same arithmetic as the original); M-step = mean of the assigned subvectors.
Writes benchmarks/results/em_layer_{case}.json (one entry per config).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads collapse on a shared 2-core CPU
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bitdown.config import EMConfig
from bitdown.em import kmeans

from _common import RESULTS, conv_stats, load_layer_inputs, machine

BLOCK, K = 9, 256
PLAIN = dict(init="kmeans++", n_restarts=1, objective="pooled", error_feedback=False, code_reopt=0,
             codebook_refit=False)  # explicit: EMConfig's defaults change over time
CONFIGS = {
    "paper": EMConfig(**{**PLAIN, "init": "random"}),  # the paper's pooled objective, random init from the weights
    "best": EMConfig(**{**PLAIN, "objective": "per_block", "error_feedback": True, "code_reopt": 1,
                        "n_iter": 5}),  # the best within the em_s target, see results/em_ablation.md
}
PAPER = {"conv256": (1127.0, 10, 0.3919), "conv64": (228.0, 100, 0.3300)}  # original: EM s, iterations, error
TARGETS = {"conv256": (2.0, 0.37), "conv64": (1.0, 0.32)}                   # em_s, out_rel_err
CHUNK = 1 << 19  # elements of one materialised (rows, centroids x subvectors) block (cache-sized)


# ----------------------------------------------------------------------------- reference EM (original's algorithm)

def ref_subvectors(w: torch.Tensor, d: int) -> torch.Tensor:
    """(C_out, ...) -> the original's unrolled M (d, nb * C_out): column b * C_out + o = block b of filter o."""
    m = w.reshape(w.shape[0], -1).t()                                      # (R, C_out)
    return m.reshape(-1, d, m.shape[1]).permute(1, 0, 2).reshape(d, -1)


def ref_sample_rows(x: torch.Tensor, k: int, stride: int, padding: int, n: int, d: int,
                    gen: torch.Generator) -> torch.Tensor:
    """n random im2col rows (R,) of x, cut into d-blocks stacked over block positions: (nb * n, d)."""
    oh, ow = (x.shape[2] + 2 * padding - k) // stride + 1, (x.shape[3] + 2 * padding - k) // stride + 1
    rows = []
    for i in torch.randint(0, x.shape[0] * oh * ow, (n,), generator=gen).tolist():
        img, (r, c) = i // (oh * ow), divmod(i % (oh * ow), ow)
        rows.append(F.pad(x[img], (padding,) * 4)[:, r * stride:r * stride + k, c * stride:c * stride + k].reshape(-1))
    rows = torch.stack(rows)                                               # (n, R) in (C_in, kh, kw) order
    return torch.cat(rows.chunk(rows.shape[1] // d, dim=1), dim=0)         # (nb * n, d)


def ref_distances(a: torch.Tensor, m: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """||a (m_j - c_k)||^2 for all centroids k and subvectors j, materialised: (K, n_sub)."""
    (n_rows, d), n_sub = a.shape, m.shape[1]
    sub = max(1, min(n_sub, CHUNK // n_rows))                               # subvectors per chunk
    kc = max(1, CHUNK // (n_rows * sub))                                    # centroids per chunk
    out = torch.empty(centroids.shape[0], n_sub)
    for j in range(0, n_sub, sub):
        mj = m[:, j:j + sub]                                                # (d, s)
        for c in range(0, centroids.shape[0], kc):
            diff = (mj[None] - centroids[c:c + kc, :, None]).transpose(0, 1)   # (d, kc, s): m - c
            y = a @ diff.reshape(d, -1)                                     # (rows, kc * s): X~ (m - c)
            out[c:c + kc, j:j + sub] = y.pow_(2).sum(0).view(-1, mj.shape[1])
    return out


def ref_step(a: torch.Tensor, m: torch.Tensor, centroids: torch.Tensor, gen: torch.Generator,
             eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One EM step of the original: E-step, split empty clusters (recomputing the E-step), mean M-step."""
    k = centroids.shape[0]
    codes = ref_distances(a, m, centroids).argmin(0)
    counts = torch.bincount(codes, minlength=k)
    n_empty = int((counts == 0).sum())
    while (counts == 0).any():
        e, big = int((counts == 0).nonzero()[0]), int(counts.argmax())
        noise = torch.randn(m.shape[0], generator=gen) * eps
        centroids[e] = centroids[big] + noise
        centroids[big] -= noise
        codes = ref_distances(a, m, centroids).argmin(0)
        counts = torch.bincount(codes, minlength=k)
    centroids = torch.zeros_like(centroids).index_add_(0, codes, m.t()) / counts[:, None]
    return centroids, codes, n_empty


def reference_em(inp: dict, n_centroids: int, n_iter: int, d: int = BLOCK, n_samples: int = 1000,
                 seed: int = 0) -> tuple[torch.Tensor, list[float], int]:
    """The original's EM for n_iter steps. Returns (W_hat, seconds per step, empty clusters met)."""
    w, x = inp["W"], inp["X"]
    gen = torch.Generator().manual_seed(seed)
    m = ref_subvectors(w, d)                                               # (d, n_sub)
    # distinct random subvectors (the original's randint may pick duplicates: each one costs an extra E-step)
    centroids = m[:, torch.randperm(m.shape[1], generator=gen)[:n_centroids]].t().clone()  # (K, d)
    codes, times, empties = None, [], 0
    for _ in range(n_iter):
        t0 = time.perf_counter()
        a = ref_sample_rows(x, inp["k"], inp["stride"], inp["padding"], n_samples // w.shape[0], d, gen)
        centroids, codes, n_empty = ref_step(a, m, centroids, gen)
        times.append(time.perf_counter() - t0)
        empties += n_empty
    w_hat = centroids[codes].t().reshape(d, -1, w.shape[0]).permute(2, 1, 0).reshape(w.shape)
    return w_hat, times, empties


# ----------------------------------------------------------------------------- the race

def run_case(case: str, config: str = "best", ref_iters: int = 1, n_centroids: int = K, repeats: int = 3) -> dict:
    """Times are the best of `repeats` runs (the machine is shared); the reference runs once."""
    li = load_layer_inputs()
    load0 = machine()["loadavg"]
    inp = li.make_inputs(*li.CASES[case])
    w, x, cfg = inp["W"], inp["X"], CONFIGS[config]
    stats_runs, em_runs = [], []
    for _ in range(repeats):
        stats, s = conv_stats(inp, BLOCK, cfg.needs_full_gram)
        t0 = time.perf_counter()
        res = kmeans(w, stats.block_grams, n_centroids, cfg, seed=0, full_gram=stats.full_gram)
        em_runs.append(time.perf_counter() - t0)
        stats_runs.append(s)
    stats_s, em_s = min(stats_runs), min(em_runs)
    err = li.out_rel_err(w, res.weight(w.shape), x, inp["stride"], inp["padding"])
    load1 = machine()["loadavg"]
    w_ref, ref_times, ref_empty = reference_em(inp, n_centroids, ref_iters)
    ref_iter_s = sum(ref_times) / len(ref_times)
    em_iter_s = em_s / max(res.n_iter, 1)
    out = {"case": case, "stats_s": round(stats_s, 3), "em_s": round(em_s, 3), "out_rel_err": round(err, 4),
           "n_iter": res.n_iter, "config": config, "em_s_runs": [round(t, 3) for t in em_runs], "em_config": asdict(cfg), "full_gram": cfg.needs_full_gram,
           "block_size": BLOCK, "n_centroids": n_centroids, "em_iter_s": round(em_iter_s, 4),
           "ref_iters": ref_iters, "ref_iter_s": round(ref_iter_s, 3), "ref_empty_clusters": ref_empty,
           "ref_out_rel_err": round(li.out_rel_err(w, w_ref, x, inp["stride"], inp["padding"]), 4),
           "speedup_per_iter": round(ref_iter_s / em_iter_s, 1)}
    if case in PAPER:
        p_s, p_it, p_err = PAPER[case]
        out.update(paper_em_s=p_s, paper_iters=p_it, paper_iter_s=round(p_s / p_it, 2), paper_out_rel_err=p_err,
                   speedup_vs_paper_run=round(p_s / em_s, 1),
                   speedup_vs_paper_run_with_stats=round(p_s / (em_s + stats_s), 1))
    if case in TARGETS:
        t_s, t_err = TARGETS[case]
        out.update(target_em_s=t_s, target_out_rel_err=t_err, meets_target=em_s <= t_s and err <= t_err)
    m = machine()
    m.update(loadavg_start=load0, loadavg_after_em=load1, loadavg_end=m.pop("loadavg"),
             omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
    out["machine"] = m
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=sorted(PAPER), required=True)
    p.add_argument("--config", choices=sorted(CONFIGS), default="best")
    p.add_argument("--ref-iters", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="bitdown timings: best of this many runs")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    a = p.parse_args()
    out = run_case(a.case, a.config, a.ref_iters, repeats=a.repeats)
    path = RESULTS / f"em_layer_{a.case}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    saved = json.loads(path.read_text()) if path.is_file() else {}
    saved[a.config] = out
    path.write_text(json.dumps(saved, indent=1) + "\n")
    print(json.dumps(out) if a.json else "\n".join(f"{k}: {v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
