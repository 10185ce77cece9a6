"""Output-aware product quantization of one layer: an EM (k-means) on the weight subvectors.

A weight W is (C_out, R) after flattening each output filter in (C_in, kh, kw) order; each row is
cut into nb = R / d subvectors m_{o,b} of d consecutive entries, and each is replaced by a
codeword c_{k(o,b)} of a codebook C (K, d). With X the layer's input patches (stats.py), the
paper's objective is the error of the layer's outputs,

    ||X (W - W_hat)^T||^2 = sum_o (w_o - w_hat_o)^T H (w_o - w_hat_o),    H = X^T X  (R x R).

Dropping the cross-block terms of H gives the two objectives the EM minimises exactly:

    pooled     sum_{o,b} (m_{o,b} - c)^T G (m_{o,b} - c),      G = sum_b H_bb         (the paper's)
    per_block  sum_{o,b} (m_{o,b} - c)^T H_bb (m_{o,b} - c),   one Gram per block position

E-step: argmin_k  -2 (G m)^T c_k + c_k^T G c_k  (one matmul, G m computed once).
M-step: c_k = (sum_{m in S_k} G_m)^-1 sum_{m in S_k} G_m m  (the mean for the pooled objective).
Empty clusters are refilled by splitting the most populated one.

Beyond the paper (all on the full H, the exact objective; options of EMConfig):
- error_feedback: GPTQ/GPTVQ-style assignment, block after block, pushing each block's output
  error onto the blocks not yet quantized through the Cholesky factor of H^-1;
- codebook_refit: the codebook minimising the exact objective for fixed codes (conjugate gradient);
- code_reopt: coordinate descent over the codes on the exact objective.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from .config import EMConfig

log = logging.getLogger(__name__)

ROW_CHUNK = 1 << 20  # E-step scores per chunk (4 MB of float32: the (chunk, K) matrix stays in cache)


@dataclass
class EMResult:
    codebook: torch.Tensor          # (K, d) float32
    codes: torch.Tensor             # (C_out, nb) int64
    objective: float                # final value of the minimised objective
    history: list[float] = field(default_factory=list)  # objective after every EM iteration
    n_iter: int = 0
    rel_error: float = float("nan")  # sqrt(objective / energy): relative output error on calibration data
    exact: bool = False             # whether `objective` is the exact (full-H) one

    def weight(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self.codebook[self.codes].reshape(shape)


def subvectors(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """(C_out, ...) weight -> (C_out, nb, d) subvectors of consecutive row entries."""
    rows = weight.detach().reshape(weight.shape[0], -1)                    # (C_out, R)
    if rows.shape[1] % block_size:
        raise ValueError(f"block_size {block_size} does not divide the row length {rows.shape[1]} "
                         f"of a weight of shape {list(weight.shape)}")
    return rows.reshape(rows.shape[0], -1, block_size)                     # (C_out, nb, d)


def check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    if not torch.isfinite(weight).all():
        raise ValueError(f"{name} has non-finite (NaN/inf) values")


class _Metric:
    """The per-subvector Gram metric: G_p for every subvector's block position p = (group, b)."""

    def __init__(self, grams: torch.Tensor, c_out: int, pooled: bool):
        # grams: (g, nb, d, d) float64; a pooled metric is one Gram expanded to (1, nb, d, d)
        self.grams = grams
        self.pooled = pooled
        self.g = grams.shape[0]
        self.c_out = c_out

    def split(self, m: torch.Tensor) -> torch.Tensor:
        return m.reshape(self.g, self.c_out // self.g, *m.shape[1:])        # (g, opg, nb, d)

    def apply(self, m: torch.Tensor) -> torch.Tensor:
        """G_p m for every subvector: (C_out, nb, d) -> (C_out, nb, d)."""
        gm = torch.einsum("gobd,gbde->gobe", self.split(m), self.grams.to(m.dtype))
        return gm.reshape(m.shape)

    def quad(self, c: torch.Tensor) -> torch.Tensor:
        """c_k^T G_p c_k for every position: (K, d) -> (g, nb, K), or (1, 1, K) when pooled."""
        if self.pooled:
            return torch.einsum("kd,de,ke->k", c, self.grams[0, 0].to(c.dtype), c)[None, None]
        return torch.einsum("kd,gbde,ke->gbk", c, self.grams.to(c.dtype), c)


def _assign(mg: torch.Tensor, metric: _Metric, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E-step. mg: (C_out, nb, d) = G m. Returns codes (C_out, nb) and the score minimum (C_out, nb),
    where score = -2 (G m)^T c + c^T G c = cost - m^T G m. Scores are float32 (an argmin)."""
    c = codebook.float()                                                   # (K, d)
    cgc = metric.quad(codebook.double()).float()                           # (g, nb, K) or (1, 1, K)
    g, (c_out, nb, d) = metric.g, mg.shape
    k = c.shape[0]
    opg = c_out // g
    codes = torch.empty(c_out, nb, dtype=torch.long)
    best = torch.empty(c_out, nb, dtype=torch.float32)
    rows_per_chunk = max(1, ROW_CHUNK // (nb * k))                          # keeps the scores in cache
    for o0 in range(0, c_out, rows_per_chunk):
        o1 = min(c_out, o0 + rows_per_chunk)
        x = mg[o0:o1].float().reshape(-1, d)                               # (rows*nb, d)
        if metric.pooled:
            scores = torch.addmm(cgc[0, 0], x, c.T, alpha=-2.0)            # (rows*nb, K)
        else:
            scores = (x @ c.T).view(o1 - o0, nb, k).mul_(-2.0)             # (rows, nb, K)
            scores = scores.add_(cgc[torch.arange(o0, o1) // opg]).view(-1, k)
        val, idx = scores.min(dim=1)                                       # (rows*nb,)
        best[o0:o1], codes[o0:o1] = val.view(o1 - o0, nb), idx.view(o1 - o0, nb)
    return codes, best


def _update(m: torch.Tensor, mg: torch.Tensor, codes: torch.Tensor, metric: _Metric, codebook: torch.Tensor,
            pooled: bool, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M-step: the exact minimiser for each non-empty cluster (lambda-weighted). Returns (codebook, counts)."""
    k, d = codebook.shape
    flat = codes.reshape(-1)                                               # (N,)
    counts = torch.bincount(flat, minlength=k)                             # (K,)
    new = codebook.clone().to(m.dtype)                                     # (K, d)
    nonempty = counts > 0
    w = lam.repeat_interleave(m.shape[1])                                  # (N,) weight of each subvector
    if pooled:
        sums = torch.zeros(k, d, dtype=m.dtype).index_add_(0, flat, m.reshape(-1, d) * w[:, None])  # (K, d)
        wsum = torch.zeros(k, dtype=m.dtype).index_add_(0, flat, w)                                # (K,)
        new[nonempty] = sums[nonempty] / wsum[nonempty, None]
    else:
        g, nb = metric.g, metric.grams.shape[1]
        pos = (torch.arange(m.shape[0]) // (m.shape[0] // g))[:, None] * nb + torch.arange(nb)[None, :]
        pc = torch.bincount(flat * (g * nb) + pos.reshape(-1), weights=w, minlength=k * g * nb)  # (K*P,)
        a = torch.einsum("kp,pde->kde", pc.reshape(k, g * nb).double(),
                         metric.grams.reshape(g * nb, d, d))                # (K, d, d)
        rhs = torch.zeros(k, d, dtype=torch.float64).index_add_(0, flat, (mg.reshape(-1, d) * w[:, None]).double())
        idx = nonempty.nonzero().squeeze(1)
        a_ne = a[idx]                                                      # (K', d, d)
        ridge = 1e-9 * a_ne.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
        a_ne = a_ne + ridge[:, None, None] * torch.eye(d, dtype=torch.float64)
        sol = torch.linalg.solve(a_ne, rhs[idx].unsqueeze(-1)).squeeze(-1)  # (K', d)
        new[idx] = sol.to(m.dtype)
    return new, counts


def _split_empty(codebook: torch.Tensor, counts: torch.Tensor) -> int:
    """Refill every empty cluster by splitting the currently most populated one (in place)."""
    counts = counts.clone()
    empty = (counts == 0).nonzero().squeeze(1).tolist()
    eps = 1.0 / 1024
    sign = torch.ones(codebook.shape[1], dtype=codebook.dtype)
    sign[1::2] = -1                                                        # (d,)
    for e in empty:
        j = int(counts.argmax())
        if counts[j] <= 1:
            break
        c = codebook[j].clone()
        scale = c.abs().clamp_min(c.abs().max() * 1e-3 + 1e-12)
        codebook[e] = c + eps * sign * scale
        codebook[j] = c - eps * sign * scale
        counts[e] = counts[j] // 2
        counts[j] -= counts[e]
    return len(empty)


def _whitener(gram: torch.Tensor) -> torch.Tensor:
    """L with L L^T = G (+ a tiny ridge), float64 (d, d)."""
    d = gram.shape[0]
    ridge = 1e-8 * gram.diagonal().mean().clamp_min(1e-30)
    return torch.linalg.cholesky(gram + ridge * torch.eye(d, dtype=gram.dtype))


def _init(points: torch.Tensor, k: int, method: str, gen: torch.Generator, weights: torch.Tensor | None = None,
          ) -> torch.Tensor:
    """Initial codebook rows chosen among `points` (N, d) (whitened, Euclidean). Returns indices (K,)."""
    n = points.shape[0]
    if method == "random":
        return torch.randperm(n, generator=gen)[:k]
    # k-means++ (Arthur & Vassilvitskii 2007), on the whitened subvectors, D^2 weighted by `weights`
    w = torch.ones(n) if weights is None else weights                      # (N,)
    idx = torch.empty(k, dtype=torch.long)
    idx[0] = torch.randint(n, (1,), generator=gen)
    d2 = (points - points[idx[0]]).pow(2).sum(1) * w                       # (N,)
    for i in range(1, k):
        total = d2.sum()
        if total <= 0:                                                      # fewer distinct points than k
            idx[i] = torch.randint(n, (1,), generator=gen)
        else:
            u = torch.rand(1, generator=gen, dtype=torch.float64) * total
            idx[i] = torch.searchsorted(torch.cumsum(d2.double(), 0), u).clamp_max(n - 1)
        d2 = torch.minimum(d2, (points - points[idx[i]]).pow(2).sum(1) * w)
    return idx


def kmeans(weight: torch.Tensor, block_grams: torch.Tensor, n_centroids: int, config: EMConfig | None = None,
           seed: int = 0, full_gram: torch.Tensor | None = None, row_weights: torch.Tensor | None = None) -> EMResult:
    """Quantize `weight` (C_out, ...) with `n_centroids` codewords of size d, minimising the output
    error under the input statistics. block_grams: (groups, nb, d, d) from stats.LayerStats;
    full_gram: (groups, R, R), needed by error_feedback / code_reopt / codebook_refit.
    row_weights: (C_out,) positive weights lambda_o of each output channel's error (e.g. 1 / Var(y_o),
    the scale a following BatchNorm applies); they leave every argmin unchanged and weight the
    M-step means, the codebook refit and the objective."""
    if config is None:  # the best that the given statistics allow
        config = EMConfig() if full_gram is not None else EMConfig.paper()
    check_weight(weight)
    g, nb, d, _ = block_grams.shape
    m = subvectors(weight, d).double()                                     # (C_out, nb, d)
    c_out = m.shape[0]
    if m.shape[1] != nb or c_out % g:
        raise ValueError(f"statistics of shape {list(block_grams.shape)} do not match a weight of shape "
                         f"{list(weight.shape)} with block_size {d}")
    if not torch.isfinite(block_grams).all():
        raise ValueError("input statistics contain NaN/inf")
    if config.needs_full_gram and full_gram is None:
        raise ValueError("error_feedback / code_reopt / codebook_refit need the full input Gram (full_gram)")
    if full_gram is not None:
        r = nb * d
        if tuple(full_gram.shape) != (g, r, r):
            raise ValueError(f"full_gram has shape {list(full_gram.shape)}, expected {[g, r, r]} for a weight of "
                             f"shape {list(weight.shape)} with {g} groups")
        if not torch.isfinite(full_gram).all():
            raise ValueError("full_gram contains NaN/inf")
    pooled = config.objective in ("pooled", "weights")
    if config.objective == "weights":                                      # weight-space baseline: G = I
        gram = torch.eye(d, dtype=torch.float64)
    else:
        gram = block_grams.sum(dim=(0, 1))                                  # (d, d)
    metric = _Metric(gram.expand(1, nb, d, d) if pooled else block_grams, c_out, pooled)
    mg = metric.apply(m)                                                   # (C_out, nb, d)
    lam = _row_weights(row_weights, c_out)                                 # (C_out,) float64
    energy = float((lam[:, None] * (m * mg).sum(-1)).sum())                # sum lambda_o m^T G m
    n = c_out * nb
    if n_centroids < 1:
        raise ValueError(f"n_centroids must be >= 1, got {n_centroids}")

    if n <= n_centroids:  # degenerate: every subvector gets its own codeword
        log.warning("%d subvectors for %d centroids: exact copy, %d codewords unused", n, n_centroids, n_centroids - n)
        codebook = torch.zeros(n_centroids, d, dtype=torch.float64)
        codebook[:n] = m.reshape(-1, d)
        res = EMResult(codebook.float(), torch.arange(n).reshape(c_out, nb), 0.0, [0.0], 0, 0.0)
    else:
        white = m.reshape(-1, d) @ _whitener(gram)                         # (N, d): ||.||^2 = pooled metric
        best: EMResult | None = None
        for r in range(config.n_restarts):
            gen = torch.Generator().manual_seed(seed * 1000003 + r)
            idx = _init(white.float(), n_centroids, config.init, gen,
                        lam.repeat_interleave(nb).float() if row_weights is not None else None)
            res = _em(m, mg, metric, m.reshape(-1, d)[idx].clone(), config, pooled, energy, lam)
            log.debug("restart %d: objective %.6g after %d iterations", r, res.objective, res.n_iter)
            if best is None or res.objective < best.objective:
                best = res
        res = best
    if config.needs_full_gram:
        res = _refine_exact(weight, res, full_gram, config, lam)
    return res


def assign_pooled(weight: torch.Tensor, gram: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Codes (C_out, nb) of the nearest codeword of every subvector of `weight` under the pooled
    metric `gram` (d, d): argmin_k (m - c_k)^T G (m - c_k) (one E-step)."""
    d = codebook.shape[1]
    m = subvectors(weight, d).double()                                     # (C_out, nb, d)
    metric = _Metric(gram.double().expand(1, m.shape[1], d, d), m.shape[0], pooled=True)
    return _assign(metric.apply(m), metric, codebook)[0]


def _row_weights(row_weights: torch.Tensor | None, c_out: int) -> torch.Tensor:
    if row_weights is None:
        return torch.ones(c_out, dtype=torch.float64)
    lam = row_weights.detach().double().reshape(-1)
    if lam.numel() != c_out or not torch.isfinite(lam).all() or (lam <= 0).any():
        raise ValueError(f"row_weights must be {c_out} positive finite values")
    return lam


def _em(m, mg, metric, codebook, config: EMConfig, pooled: bool, energy: float, lam: torch.Tensor) -> EMResult:
    history: list[float] = []
    codes, score = _assign(mg, metric, codebook)
    history.append(energy + float((lam[:, None] * score.double()).sum()))
    it = 0
    for it in range(1, config.n_iter + 1):
        codebook, counts = _update(m, mg, codes, metric, codebook, pooled, lam)
        n_empty = _split_empty(codebook, counts)
        codes, score = _assign(mg, metric, codebook)
        obj = energy + float((lam[:, None] * score.double()).sum())
        history.append(obj)
        prev = history[-2]
        if n_empty == 0 and prev - obj <= config.tol * max(abs(prev), 1e-30):
            break
    obj = max(history[-1], 0.0)
    return EMResult(codebook.float(), codes, obj, history, it, math.sqrt(obj / energy) if energy > 0 else 0.0)


# ----------------------------------------------------------------------------- exact objective (full H)

def _damped(full_gram: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) * I per group, with dead inputs (zero diagonal) given a unit diagonal."""
    h = full_gram.clone()                                                  # (g, R, R)
    diag = h.diagonal(dim1=1, dim2=2)                                      # (g, R) view
    dead = diag == 0
    diag[dead] = 1.0
    diag += damp * diag.mean(dim=1, keepdim=True)
    return h


def exact_objective(weight: torch.Tensor, weight_hat: torch.Tensor, full_gram: torch.Tensor,
                    row_weights: torch.Tensor | None = None) -> tuple[float, float]:
    """sum_o lambda_o (w_o - w_hat_o)^T H_g(o) (w_o - w_hat_o) and sum_o lambda_o w_o^T H w_o: the
    (channel-weighted) output error of the layer on the calibration inputs (bias excluded), and its energy."""
    g = full_gram.shape[0]
    w = weight.detach().reshape(g, weight.shape[0] // g, -1).double()         # (g, opg, R)
    e = w - weight_hat.detach().reshape(w.shape).double()                     # (g, opg, R)
    lam = _row_weights(row_weights, weight.shape[0]).reshape(g, -1)          # (g, opg)
    err = float(torch.einsum("go,gor,grs,gos->", lam, e, full_gram, e))
    energy = float(torch.einsum("go,gor,grs,gos->", lam, w, full_gram, w))
    return err, energy


def _refine_exact(weight: torch.Tensor, res: EMResult, full_gram: torch.Tensor, config: EMConfig,
                  lam: torch.Tensor) -> EMResult:
    k, d = res.codebook.shape
    g = full_gram.shape[0]
    c_out = weight.shape[0]
    w = weight.detach().reshape(g, c_out // g, -1).double()                   # (g, opg, R)
    h = _damped(full_gram, config.damp) if config.error_feedback else full_gram
    codebook = res.codebook.double()                                         # (K, d)
    codes = res.codes.reshape(g, c_out // g, -1).clone()                     # (g, opg, nb)
    if config.error_feedback:
        codes = _gptq_assign(w, codebook, h)
    lam_g = lam.reshape(g, c_out // g)                                       # (g, opg)
    if config.codebook_refit:
        codebook = _refit_codebook(w, codebook, codes, full_gram, lam_g)
    for _ in range(config.code_reopt):
        codes = _reopt_codes(w, codebook, codes, full_gram)
        if config.codebook_refit:
            codebook = _refit_codebook(w, codebook, codes, full_gram, lam_g)
    err, energy = exact_objective(weight, codebook[codes].reshape(weight.shape), full_gram, lam)
    err = max(err, 0.0)             # a rank-deficient Gram (few images) can round a zero error below zero
    history = res.history + [err]
    return EMResult(codebook.float(), codes.reshape(c_out, -1), err, history, res.n_iter,
                    math.sqrt(err / energy) if energy > 0 else 0.0, exact=True)


def _gptq_assign(w: torch.Tensor, codebook: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Codes chosen block by block with GPTQ error feedback. w: (g, opg, R); h: damped (g, R, R).
    All groups at once (depthwise convs have one group per channel)."""
    g, opg, r = w.shape
    d = codebook.shape[1]
    codes = torch.empty(g, opg, r // d, dtype=torch.long)
    eye = torch.eye(r, dtype=h.dtype).expand(g, r, r)
    hinv = torch.cholesky_solve(eye, torch.linalg.cholesky(h))              # (g, R, R)
    u = torch.linalg.cholesky(hinv, upper=True)                             # (g, R, R), H^-1 = U^T U
    wg = w.clone()                                                          # (g, opg, R)
    for b in range(r // d):
        s = slice(b * d, (b + 1) * d)
        u_inv = torch.linalg.inv(u[:, s, s])                                # (g, d, d)
        wb = wg[:, :, s]                                                    # (g, opg, d)
        cw = torch.einsum("kd,gde->gke", codebook, u_inv)                   # (g, K, d) whitened codewords
        ww = wb @ u_inv                                                     # (g, opg, d)
        dist = cw.pow(2).sum(-1)[:, None, :] - 2 * ww @ cw.transpose(1, 2)  # (g, opg, K) (+|ww|^2, constant)
        cb = dist.argmin(-1)                                                # (g, opg)
        codes[:, :, b] = cb
        err = (wb - codebook[cb]) @ u_inv                                   # (g, opg, d)
        wg[:, :, (b + 1) * d:] -= err @ u[:, s, (b + 1) * d:]               # push the error forward
    return codes


def _refit_codebook(w: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor, h: torch.Tensor,
                    lam: torch.Tensor, n_steps: int = 25, rtol: float = 1e-5) -> torch.Tensor:
    """Codebook minimising sum_o lambda_o (w_o - C[codes_o])^T H (w_o - C[codes_o]) for fixed codes,
    by conjugate gradient on the normal equations A C = B (the objective is a quadratic in C; one
    H-product per step; stops when the residual norm falls below rtol times the initial one). lam: (g, opg)."""
    k, d = codebook.shape
    flat = codes.reshape(-1)                                                # (N,)

    def scatter_h(x: torch.Tensor) -> torch.Tensor:                         # (g, opg, R) -> (K, d)
        hx = torch.einsum("gor,grs->gos", x, h) * lam[:, :, None]           # (g, opg, R)
        return torch.zeros(k, d, dtype=x.dtype).index_add_(0, flat, hx.reshape(-1, d))

    c = codebook.clone()
    r = -scatter_h(c[codes].reshape(w.shape) - w)                           # B - A C   (K, d)
    p = r.clone()
    rr = rr0 = float((r * r).sum())
    for _ in range(n_steps):
        if rr <= rtol * rtol * rr0 or rr <= 1e-30:
            break
        ap = scatter_h(p[codes].reshape(w.shape))                           # A p   (K, d)
        curv = float((p * ap).sum())
        if curv <= 0:
            break
        alpha = rr / curv
        c += alpha * p
        r -= alpha * ap
        rr_new = float((r * r).sum())
        p = r + (rr_new / rr) * p
        rr = rr_new
    return c


def _reopt_codes(w: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """One sweep of coordinate descent over blocks: each code re-chosen on the exact objective with
    the other blocks of its row fixed. Never increases the objective."""
    g, opg, r = w.shape
    k, d = codebook.shape
    codes = codes.clone()
    resid = codebook[codes].reshape(w.shape) - w                           # (g, opg, R)
    hr = torch.einsum("gor,grs->gos", resid, h)                            # (g, opg, R)
    for b in range(r // d):
        s = slice(b * d, (b + 1) * d)
        hbb = h[:, s, s]                                                    # (g, d, d)
        cur = codebook[codes[:, :, b]]                                      # (g, opg, d)
        lin = hr[:, :, s] - torch.einsum("gde,goe->god", hbb, cur)          # (g, opg, d)
        chc = torch.einsum("kd,gde,ke->gk", codebook, hbb, codebook)        # (g, K)
        score = 2 * lin @ codebook.T + chc[:, None, :]                      # (g, opg, K)
        new = score.argmin(-1)                                              # (g, opg)
        delta = codebook[new] - cur                                         # (g, opg, d)
        codes[:, :, b] = new
        hr += torch.einsum("god,grd->gor", delta, h[:, :, s])               # H is symmetric
    return codes


# ----------------------------------------------------------------------------- shared codebooks

def kmeans_shared(weights: list[torch.Tensor], grams: list[torch.Tensor], n_centroids: int,
                  config: EMConfig | None = None, seed: int = 0) -> EMResult:
    """One codebook (K, d) for several layers: the EM on the sum of their *relative* pooled output errors,

        sum_l  sum_{i in l} (m_i - c_k(i))^T G_l (m_i - c_k(i)) / E_l,     E_l = sum_{i in l} m_i^T G_l m_i,

    so every layer counts by its relative error, whatever the scale of its activations.
    weights: L tensors (C_out_l, ...); grams: L pooled Grams (d, d) (sum of a layer's block Grams).
    E-step per layer under its own metric; M-step c_k = (sum_l n_lk G_l/E_l)^-1 sum_l G_l/E_l sum_{i in k,l} m_i.
    Returns the codebook, the codes of all layers concatenated (sum_l C_out_l * nb_l,) and the objective
    (the summed relative error); split them with `split_codes`."""
    config = config or EMConfig.paper()
    if len(weights) != len(grams) or not weights:
        raise ValueError("kmeans_shared needs one pooled Gram per weight, and at least one weight")
    d = grams[0].shape[0]
    ms, gs = [], []
    for w, g in zip(weights, grams):
        check_weight(w)
        if tuple(g.shape) != (d, d) or not torch.isfinite(g).all():
            raise ValueError(f"every Gram must be a finite ({d}, {d}) matrix, got {list(g.shape)}")
        m = subvectors(w, d).reshape(-1, d).double()                       # (N_l, d)
        g = g.double()
        energy = float(((m @ g) * m).sum())
        ms.append(m)
        gs.append(g / energy if energy > 0 else g)                          # (d, d) relative metric
    sizes = [m.shape[0] for m in ms]
    n = sum(sizes)
    mgs = [m @ g for m, g in zip(ms, gs)]                                   # (N_l, d) each
    base = sum(float((m * mg).sum()) for m, mg in zip(ms, mgs))            # the objective with W_hat = 0
    white = torch.cat([m @ _whitener(g) for m, g in zip(ms, gs)])           # (N, d) for the initialisation
    allm = torch.cat(ms)                                                    # (N, d)
    if n <= n_centroids:
        codebook = torch.zeros(n_centroids, d, dtype=torch.float64)
        codebook[:n] = allm
        return EMResult(codebook.float(), torch.arange(n), 0.0, [0.0], 0, 0.0)
    gen = torch.Generator().manual_seed(seed * 1000003)
    codebook = allm[_init(white.float(), n_centroids, config.init, gen)].clone()  # (K, d)
    layer_of = torch.repeat_interleave(torch.arange(len(ms)), torch.tensor(sizes))  # (N,)

    def assign(cb: torch.Tensor) -> tuple[torch.Tensor, float]:
        codes, total = [], base
        for mg, g in zip(mgs, gs):
            metric = _Metric(g.expand(1, 1, d, d), mg.shape[0], pooled=True)
            c, score = _assign(mg[:, None, :], metric, cb)                  # (N_l, 1)
            codes.append(c.reshape(-1))
            total += float(score.double().sum())
        return torch.cat(codes), total                                      # (N,)

    codes, obj = assign(codebook)
    history = [obj]
    it = 0
    for it in range(1, config.n_iter + 1):
        counts = torch.bincount(codes, minlength=n_centroids)                # (K,)
        a = torch.zeros(n_centroids, d, d, dtype=torch.float64)             # (K, d, d) sum_l n_lk G_l
        rhs = torch.zeros(n_centroids, d, dtype=torch.float64)              # (K, d)   sum_l G_l sum m_i
        for li, (mg, g) in enumerate(zip(mgs, gs)):
            sel = codes[layer_of == li]                                      # (N_l,)
            a += torch.bincount(sel, minlength=n_centroids).double()[:, None, None] * g
            rhs.index_add_(0, sel, mg)
        idx = (counts > 0).nonzero().squeeze(1)
        a_ne = a[idx]
        ridge = 1e-9 * a_ne.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
        a_ne = a_ne + ridge[:, None, None] * torch.eye(d, dtype=torch.float64)
        codebook[idx] = torch.linalg.solve(a_ne, rhs[idx].unsqueeze(-1)).squeeze(-1)
        n_empty = _split_empty(codebook, counts)
        codes, obj = assign(codebook)
        history.append(obj)
        if n_empty == 0 and history[-2] - obj <= config.tol * max(abs(history[-2]), 1e-30):
            break
    obj = max(history[-1], 0.0)
    return EMResult(codebook.float(), codes, obj, history, it, math.sqrt(obj / base) if base > 0 else 0.0)


def assign_codes(weight: torch.Tensor, codebook: torch.Tensor, block_grams: torch.Tensor,
                 config: EMConfig | None = None, full_gram: torch.Tensor | None = None,
                 row_weights: torch.Tensor | None = None) -> EMResult:
    """Codes of `weight` for a *fixed* codebook (a shared one): the pooled E-step, then, when the
    config asks for it and `full_gram` is given, GPTQ error feedback and code re-optimisation on the
    exact objective (never a codebook refit: the codebook belongs to other layers too)."""
    config = config or EMConfig.paper()
    check_weight(weight)
    g, nb, d, _ = block_grams.shape
    if codebook.shape[1] != d:
        raise ValueError(f"codebook of block size {codebook.shape[1]} for statistics of block size {d}")
    gram = torch.eye(d, dtype=torch.float64) if config.objective == "weights" else block_grams.sum(dim=(0, 1))
    codes = assign_pooled(weight, gram, codebook.double())                  # (C_out, nb)
    m = subvectors(weight, d).double()                                      # (C_out, nb, d)
    e = m - codebook.double()[codes]
    obj = float(torch.einsum("obd,de,obe->", e, gram.double(), e))
    energy = float(torch.einsum("obd,de,obe->", m, gram.double(), m))
    res = EMResult(codebook.float(), codes, obj, [obj], 0, math.sqrt(obj / energy) if energy > 0 else 0.0)
    if full_gram is not None and (config.error_feedback or config.code_reopt > 0):
        fixed = EMConfig(**{**config.__dict__, "codebook_refit": False})
        res = _refine_exact(weight, res, full_gram, fixed, _row_weights(row_weights, weight.shape[0]))
    return res


def split_codes(codes: torch.Tensor, weights: list[torch.Tensor], block_size: int) -> list[torch.Tensor]:
    """kmeans_shared's concatenated codes -> one (C_out_l, nb_l) tensor per weight."""
    sizes = [w.numel() // block_size for w in weights]
    return [c.reshape(w.shape[0], -1) for c, w in zip(codes.split(sizes), weights)]
