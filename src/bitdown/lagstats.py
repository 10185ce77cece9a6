"""Exact input Grams of a stride-1 convolution from lagged products of its padded input (less im2col work).

For a stride-1 conv with kernel offsets a = (i*dh, j*dw), the patch matrix X (stats.py) has one column block
per offset. Extend X to X' with the rows of the *full* convolution (every output position whose patch
touches the input). Its Gram block between offsets a and b is then the same for every a:

    X'^T X' [a, b] = sum over all input positions q of x[q] x[q + delta]^T,   delta = b - a,

a lagged product of the input with itself, one matrix product per lag on the flattened zero-padded input
(the zero rows and columns between rows and images keep a shift from wrapping onto data). X is X' less the
border positions B of the full output grid, so X^T X = X'^T X' - X_B^T X_B, with X_B an im2col of the thin
border only; the cross Gram X^T T and the column sums follow the same way. Per chunk: (2kh-1)(2kw-1) lag
products of (C_in/g x positions) by (positions x C_in/g), half of them for the symmetric X^T X, against
(kh kw)^2 for X^T X on the full im2col: ~2.5x fewer multiply-adds on a 32 x 32 image, none on an 8 x 8 one
(`worth_it` picks the cheaper). Same sums as X^T X up to float32 summation order.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

LAG_CHUNK_ELEMENTS = 1 << 21   # padded input values per chunk of images (8 MB fp32)


class _Grid:
    """The flattened padded input: rows of wy values, images of hy rows, with enough zeros between them
    (padding by the kernel span) that a shift by any kernel lag lands on zeros when it leaves the image."""

    def __init__(self, module: nn.Conv2d, h: int, w: int):
        (self.kh, self.kw), (self.dh, self.dw) = module.kernel_size, module.dilation
        self.g, self.h, self.w = module.groups, h, w
        self.sh, self.sw = self.dh * (self.kh - 1), self.dw * (self.kw - 1)       # kernel spans
        self.hy, self.wy = h + self.sh, w + self.sw
        self.margin = self.sh * self.wy + self.sw                                 # the largest flat lag

    def lags(self, symmetric: bool) -> list[tuple[int, int]]:
        """Kernel-index lags (u, v); with `symmetric` only those with a non-negative flat offset."""
        every = [(u, v) for u in range(1 - self.kh, self.kh) for v in range(1 - self.kw, self.kw)]
        return [(u, v) for u, v in every if not symmetric or self.offset(u, v) >= 0]

    def offset(self, u: int, v: int) -> int:
        return u * self.dh * self.wy + v * self.dw

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, C, h, w) -> (g, C/g, margin + n*hy*wy + margin) float32, zero-padded, channels first."""
        n, c = x.shape[:2]
        k = n * self.hy * self.wy
        buf = torch.zeros(c, self.margin + k + self.margin, dtype=torch.float32, device=x.device)
        buf[:, self.margin:self.margin + k].view(c, n, self.hy, self.wy)[:, :, :self.h, :self.w].copy_(x.transpose(0, 1))
        return buf.view(self.g, c // self.g, -1)

    def shifted(self, buf: torch.Tensor, u: int, v: int) -> torch.Tensor:
        """(g, c, n*hy*wy): the flattened input at position q + lag (u, v) for every q (a view)."""
        start = self.margin + self.offset(u, v)
        return buf[..., start:start + buf.shape[-1] - 2 * self.margin]


def applies(module: nn.Module) -> bool:
    """A stride-1 conv with a kernel larger than 1x1 (1x1 convs need no im2col anyway)."""
    return isinstance(module, nn.Conv2d) and module.stride == (1, 1) and module.kernel_size != (1, 1)


def worth_it(module: nn.Conv2d, h: int, w: int, cross: bool) -> bool:
    """Whether the lagged products need clearly fewer multiply-adds than the plain patch products
    (lags over the padded grid plus the border patches, against every patch); < 0.6x."""
    grid, kk = _Grid(module, h, w), module.kernel_size[0] * module.kernel_size[1]
    ho, wo = h + 2 * module.padding[0] - grid.sh, w + 2 * module.padding[1] - grid.sw
    border = grid.hy * grid.wy - max(0, ho) * max(0, wo)
    n_lags = len(grid.lags(symmetric=True)) + (len(grid.lags(symmetric=False)) if cross else 0)
    per_gram = (1 + cross) * kk * kk
    return n_lags * grid.hy * grid.wy + per_gram * border < 0.6 * per_gram * ho * wo


def _add_lag(acc: torch.Tensor, grid: _Grid, u: int, v: int, block: torch.Tensor) -> None:
    """acc (g, R, R) += block (g, c, c) at every entry (a, a + (u, v)) with both offsets in the kernel."""
    g, r, _ = acc.shape
    c = r // (grid.kh * grid.kw)
    diag = acc.view(g, c, grid.kh, grid.kw, c, grid.kh, grid.kw).diagonal(u, 2, 5).diagonal(v, 2, 4)  # (g,c,c,ni,nj)
    diag += block[..., None, None]


def _border(module: nn.Conv2d, grid: _Grid, x: torch.Tensor,
            patch_view: Callable[..., torch.Tensor]) -> torch.Tensor:
    """The patches of the full-convolution output positions outside the conv's own output grid:
    (g, R, positions) float32 (four thin strips)."""
    v = patch_view(module, x, padding=(grid.sh, grid.sw))                     # (C, kh, kw, n, hy, wy)
    ph, pw = module.padding
    ho, wo = grid.h + 2 * ph - grid.sh, grid.w + 2 * pw - grid.sw
    r0, r1 = max(0, grid.sh - ph), min(grid.hy, grid.sh - ph + ho)           # the conv's own rows / cols
    c0, c1 = max(0, grid.sw - pw), min(grid.wy, grid.sw - pw + wo)
    strips = [v[..., :r0, :], v[..., r1:, :], v[..., r0:r1, :c0], v[..., r0:r1, c1:]]
    r = v.shape[0] // grid.g * v.shape[1] * v.shape[2]
    return torch.cat([s.reshape(grid.g, r, -1) for s in strips], 2).float()


def accumulate(module: nn.Conv2d, x: torch.Tensor, ref: torch.Tensor | None, full: torch.Tensor,
               in_sum: torch.Tensor, cross: torch.Tensor | None, ref_sum: torch.Tensor | None,
               patch_view: Callable[..., torch.Tensor]) -> int:
    """Adds this batch's X^T X to `full` (g, R, R), X's column sums to `in_sum` (g, R) and, with `ref` (the
    teacher's input), X^T T to `cross` and T's column sums to `ref_sum` (all float64). patch_view:
    stats.patch_view (with a padding override). Returns the number of rows of X (output positions)."""
    n, _, h, w = x.shape
    grid = _Grid(module, h, w)
    kk = grid.kh * grid.kw
    step = max(1, LAG_CHUNK_ELEMENTS // max(1, x[0].numel() * grid.hy * grid.wy // (h * w)))
    for i in range(0, n, step):
        a = grid.flat(x[i:i + step])
        body = grid.shifted(a, 0, 0)
        for u, v in grid.lags(symmetric=True):
            lag = torch.bmm(body, grid.shifted(a, u, v).transpose(1, 2)).double()   # (g, c, c)
            _add_lag(full, grid, u, v, lag)
            if (u, v) != (0, 0):                                                   # G[b, a] = G[a, b]^T
                _add_lag(full, grid, -u, -v, lag.transpose(1, 2))
        b = _border(module, grid, x[i:i + step], patch_view)                      # (g, R, M_border)
        full -= torch.bmm(b, b.transpose(1, 2)).double()
        in_sum += body.sum(-1).double().repeat_interleave(kk, 1) - b.sum(2).double()
        if cross is not None:
            t = grid.flat(ref[i:i + step])
            for u, v in grid.lags(symmetric=False):
                _add_lag(cross, grid, u, v, torch.bmm(body, grid.shifted(t, u, v).transpose(1, 2)).double())
            bt = _border(module, grid, ref[i:i + step], patch_view)
            cross -= torch.bmm(b, bt.transpose(1, 2)).double()
            ref_sum += grid.shifted(t, 0, 0).sum(-1).double().repeat_interleave(kk, 1) - bt.sum(2).double()
    ph, pw = module.padding
    return n * (h + 2 * ph - grid.sh) * (w + 2 * pw - grid.sw)
