"""Calibration statistics of a layer's inputs, accumulated by a forward hook, never raw activations.

For a layer with weight rows of length R = C_in/groups * kh * kw (conv, in (C_in, kh, kw) order)
or R = in_features (linear), let X be the matrix whose rows are the layer's input patches: one row
per output position of every calibration image (conv: `unfold` honouring stride, padding, dilation
and groups; linear: one row per input row). A subvector is `block_size` = d consecutive entries of
a weight row, so X splits into nb = R / d column blocks X_b. We accumulate, in float64:

    block_grams[g, b] = X_{g,b}^T X_{g,b}         (groups, nb, d, d)   per block position
    gram              = sum_{g,b} block_grams      (d, d)               the paper's pooled Gram
    full_gram[g]      = X_g^T X_g                  (groups, R, R)       only when asked (GPTQ-style)
    cross_gram[g]     = X_g^T T_g                  (groups, R, R)       only with a reference input:
                                                   T are the same images' patches at the same layer
                                                   of the *uncompressed* model (teacher_target_weight)
    in_sum[g], ref_sum[g] = column sums of X_g, T_g (groups, R)         with the full / cross Gram:
                                                   the layer's mean output for any weight (output_mean)

plus the number of rows. Sums accumulate on the device of the activations (the model's device);
`LayerStats.to('cpu')` hands them to the EM, which always runs on the CPU in float64 (float64 is slow
on most GPUs). On a GPU the statistics themselves differ slightly from a CPU run's (cuDNN convolutions
use TF32 by default), so GPU and CPU runs give close, not identical, codebooks.
Products are computed in float32 on chunks of output positions (so each partial sum covers a bounded
number of rows) and accumulated in float64: CHUNK_ELEMENTS patch values at a time, each chunk of the
patch matrix copied once from a strided view of the padded input (1x1 convs and linear layers: a plain
transpose, no im2col). With the full Gram, a stride-1 conv on images large enough for it to pay takes
lagged products of its input instead (lagstats.py: no im2col but for a thin border, ~2.5x fewer
multiply-adds on 32 x 32 images).
Sums and counts only, so two `LayerStats` merge by addition (and can be
all-reduced across processes).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import lagstats

log = logging.getLogger(__name__)

MIN_ROWS_PER_INPUT = 64     # a subsampled layer keeps >= this many patch rows per entry of its weight row (R) ...
MIN_SAMPLES_PER_CENTROID = 16   # ... and >= this many subvector samples per centroid
CHUNK_ELEMENTS = 1 << 20  # at most ~1M input-patch values (4 MB fp32) per product: cache-sized, 2-3x faster than 64 MB


@dataclass
class LayerStats:
    block_size: int
    block_grams: torch.Tensor            # (groups, nb, d, d) float64
    full_gram: torch.Tensor | None       # (groups, R, R) float64, or None
    n_rows: int = 0                      # rows of X per group (output positions x images)
    n_images: int = 0
    out_sum: torch.Tensor | None = None    # (C_out,) float64: sum of the layer's outputs (bias excluded)
    out_sqsum: torch.Tensor | None = None  # (C_out,) float64: sum of their squares
    cross_gram: torch.Tensor | None = None  # (groups, R, R) float64: X^T T (student x teacher patches)
    in_sum: torch.Tensor | None = None      # (groups, R) float64: column sums of X (with the full Gram)
    ref_sum: torch.Tensor | None = None     # (groups, R) float64: column sums of T (with the cross Gram)

    def output_variance(self) -> torch.Tensor:
        """Per-output-channel variance of the layer's outputs (bias excluded), (C_out,) float64."""
        if self.out_sum is None or self.n_rows == 0:
            raise ValueError("output statistics were not collected (StatsCollector(output_stats=True))")
        mean = self.out_sum / self.n_rows
        return (self.out_sqsum / self.n_rows - mean * mean).clamp_min(0.0)

    def to(self, device: str | torch.device) -> "LayerStats":
        """The same statistics with every tensor on `device` (tensors already there are shared, not copied)."""
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)
        return LayerStats(self.block_size, mv(self.block_grams), mv(self.full_gram), self.n_rows, self.n_images,
                          mv(self.out_sum), mv(self.out_sqsum), mv(self.cross_gram), mv(self.in_sum),
                          mv(self.ref_sum))

    def output_mean(self, weight: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """Mean over the calibration rows of the layer's output (bias excluded) with `weight`:
        mean(X) W^T per group, or mean(T) W^T with `reference` (the teacher's inputs). (C_out,) float64."""
        s = self.ref_sum if reference else self.in_sum
        if s is None or self.n_rows == 0:
            raise ValueError("input means were not collected (StatsCollector(full_gram=True), and cross_gram=True "
                             "for the reference)")
        g, r = s.shape
        w = weight.detach().to(s.device).reshape(g, -1, r).double()             # (g, C_out/g, R)
        return torch.einsum("gor,gr->go", w, s / self.n_rows).reshape(-1)       # (C_out,)

    def blocks_from_full(self) -> None:
        """block_grams := the diagonal d x d blocks of the full Gram (when there is one)."""
        fg = self.full_gram
        if fg is not None:                   # block_grams[g, b] = full_gram[g, b*d:(b+1)*d, b*d:(b+1)*d]
            g, r, _ = fg.shape
            nb, d = r // self.block_size, self.block_size
            diag = torch.diagonal(fg.view(g, nb, d, nb, d), dim1=1, dim2=3)     # (g, d, d, nb)
            self.block_grams = diag.permute(0, 3, 1, 2).contiguous()            # (g, nb, d, d)

    @property
    def gram(self) -> torch.Tensor:
        """The pooled d x d Gram sum_b X_b^T X_b, float64."""
        return self.block_grams.sum(dim=(0, 1))  # (d, d)

    def merge(self, other: "LayerStats") -> "LayerStats":
        if self.block_grams.shape != other.block_grams.shape:
            raise ValueError(f"cannot merge statistics of shapes {tuple(self.block_grams.shape)} "
                             f"and {tuple(other.block_grams.shape)}")
        def add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            return a + b if a is not None and b is not None else None
        return LayerStats(self.block_size, self.block_grams + other.block_grams, add(self.full_gram, other.full_gram),
                          self.n_rows + other.n_rows, self.n_images + other.n_images,
                          add(self.out_sum, other.out_sum), add(self.out_sqsum, other.out_sqsum),
                          add(self.cross_gram, other.cross_gram), add(self.in_sum, other.in_sum),
                          add(self.ref_sum, other.ref_sum))


def subsample_positions(cap: int, row_length: int, block_size: int, n_centroids: int, n_images: int) -> int:
    """Output positions per image that a conv's statistics use under QuantConfig.stats_positions = `cap` (0: all):
    `cap`, raised where `n_images` calibration images would then give the layer fewer than MIN_ROWS_PER_INPUT x R
    patch rows or fewer than MIN_SAMPLES_PER_CENTROID subvector samples per centroid (a small calibration set
    keeps more positions per image)."""
    if cap <= 0:
        return 0
    rows = max(MIN_ROWS_PER_INPUT * row_length, -(-MIN_SAMPLES_PER_CENTROID * n_centroids * block_size // row_length))
    return max(cap, -(-rows // max(1, n_images)))


def _conv_geometry(module: nn.Conv2d) -> None:
    """Refuses the padding modes a strided view of the zero-padded input cannot express."""
    if module.padding_mode != "zeros":
        raise ValueError(f"padding_mode {module.padding_mode!r} is not supported (only 'zeros')")
    if isinstance(module.padding, str):
        raise ValueError("string padding ('same'/'valid') is not supported; use integer padding")


def patch_view(module: nn.Module, x: torch.Tensor, padding: tuple[int, int] | None = None) -> torch.Tensor:
    """The layer's input patches as a strided view of the (zero-padded) input, no im2col copy:
    (C_in, kh, kw, N, H_out, W_out); a linear layer's (in_features, 1, 1, 1, rows, 1). `padding` replaces
    a conv's own."""
    if isinstance(module, nn.Conv2d):
        _conv_geometry(module)
        ph, pw = module.padding if padding is None else padding
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph))
        (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
        n, c, hp, wp = x.shape
        ho, wo = _output_size(module, hp, wp)
        s0, s1, s2, s3 = x.stride()
        return x.as_strided((c, kh, kw, n, ho, wo), (s1, dh * s2, dw * s3, s0, sh * s2, sw * s3), x.storage_offset())
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).T[:, None, None, None, :, None]
    raise TypeError(f"no input statistics for {type(module).__name__}")


def _position_chunks(view: torch.Tensor) -> Iterator[tuple[slice, slice]]:
    """(image, output-row) slices of a patch_view covering every output position once, each holding at most
    about CHUNK_ELEMENTS patch values (whole images when they fit, else bands of output rows)."""
    c, kh, kw, n, ho, wo = view.shape
    positions = max(1, CHUNK_ELEMENTS // (c * kh * kw))
    if positions >= ho * wo:
        step = positions // (ho * wo)
        yield from ((slice(i, i + step), slice(None)) for i in range(0, n, step))
    else:
        rows = max(1, positions // wo)
        yield from ((slice(i, i + 1), slice(r, r + rows)) for i in range(n) for r in range(0, ho, rows))


def _output_size(module: nn.Conv2d, hp: int, wp: int) -> tuple[int, int]:
    """(H_out, W_out) of conv `module` on an input already padded to hp x wp."""
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    return (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1


def _positions(module: nn.Conv2d, x: torch.Tensor) -> int:
    """Output positions per image of conv `module` on input `x` (its own zero padding applied)."""
    ph, pw = module.padding
    ho, wo = _output_size(module, x.shape[2] + 2 * ph, x.shape[3] + 2 * pw)
    return ho * wo


def _layer_output(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's output without bias, one row per output position: (rows, C_out)."""
    if isinstance(module, nn.Conv2d):
        y = F.conv2d(x, module.weight, None, module.stride, module.padding, module.dilation, module.groups)
        return y.transpose(0, 1).reshape(y.shape[1], -1).T                   # (N*H*W, C_out)
    return F.linear(x.reshape(-1, x.shape[-1]), module.weight)               # (rows, C_out)


def _gram(p: torch.Tensor) -> torch.Tensor:
    """p p^T for p (g, R, M), computing the lower-right block once: 3/4 of the multiply-adds (measured
    10-20 % faster for R >= 144 at one thread)."""
    h = p.shape[1] // 2
    if h < 72:
        return torch.bmm(p, p.transpose(1, 2))
    top = torch.bmm(p[:, :h], p.transpose(1, 2))                        # (g, h, R)
    low = torch.bmm(p[:, h:], p[:, h:].transpose(1, 2))                 # (g, R-h, R-h)
    return torch.cat([top, torch.cat([top[:, :, h:].transpose(1, 2), low], 2)], 1)


class StatsCollector:
    """Accumulates `LayerStats` for one module through a forward hook. Use as a context manager
    (the hook is removed on exit), or call `remove()`."""

    def __init__(self, name: str, module: nn.Module, block_size: int, full_gram: bool = False,
                 output_stats: bool = False, cross_gram: bool = False, positions: int = 0, seed: int = 0):
        """positions > 0: a conv with more output positions per image uses only that many of them, drawn per
        batch (the same for every image of the batch and for the teacher's input) from a generator seeded with
        (`seed`, the batch's index `self.batch`, which the caller sets to the global batch index so any number
        of ranks draws the same positions for a batch); the output statistics still see every position."""
        weight = module.weight
        row = math.prod(weight.shape[1:])
        if row % block_size:
            raise ValueError(f"{name}: block_size {block_size} does not divide the row length {row}")
        self.name, self.module, self.d = name, module, block_size
        self.positions, self.seed, self.batch = positions, seed, 0
        g = module.groups if isinstance(module, nn.Conv2d) else 1
        nb = row // block_size
        f64 = {"dtype": torch.float64, "device": weight.device}       # sums live where the activations are
        self.stats = LayerStats(block_size, torch.zeros(g, nb, block_size, block_size, **f64),
                                torch.zeros(g, row, row, **f64) if full_gram else None)
        if full_gram:
            self.stats.in_sum = torch.zeros(g, row, **f64)
        if cross_gram:
            if not full_gram:
                raise ValueError("cross_gram needs full_gram")
            self.stats.cross_gram = torch.zeros(g, row, row, **f64)
            self.stats.ref_sum = torch.zeros(g, row, **f64)
        self.reference: torch.Tensor | None = None     # the teacher's input for the coming batch
        if output_stats:
            c_out = weight.shape[0]
            self.stats.out_sum = torch.zeros(c_out, **f64)
            self.stats.out_sqsum = torch.zeros(c_out, **f64)
        self._handle = module.register_forward_pre_hook(self._hook)

    @torch.no_grad()
    def _hook(self, module: nn.Module, inputs: tuple) -> None:
        x = inputs[0].detach()
        if x.numel() and not torch.isfinite(torch.stack(torch.aminmax(x))).all():   # NaN propagates to min/max
            raise ValueError(f"non-finite (NaN/inf) input activations reach layer {self.name!r}")
        st = self.stats
        ref = self.reference
        if st.cross_gram is not None and (ref is None or ref.shape != x.shape):
            raise ValueError(f"layer {self.name!r}: cross statistics need the teacher's input of the same shape "
                             f"as the student's {list(x.shape)}, got {None if ref is None else list(ref.shape)}")
        if isinstance(module, nn.Conv2d):
            _conv_geometry(module)          # string padding / other padding modes: a clear error, whatever path
        subsampled = isinstance(module, nn.Conv2d) and 0 < self.positions < _positions(module, x)
        if (st.full_gram is not None and not subsampled and lagstats.applies(module)
                and lagstats.worth_it(module, x.shape[2], x.shape[3], st.cross_gram is not None)):
            st.n_rows += lagstats.accumulate(module, x, ref, st.full_gram, st.in_sum, st.cross_gram, st.ref_sum,
                                             patch_view)
        else:
            self._patch_products(module, x, ref)
        if st.out_sum is not None:
            y = _layer_output(module, x.float())                            # (rows, C_out)
            st.out_sum += y.sum(0).double()
            st.out_sqsum += y.pow(2).sum(0).double()
        st.n_images += x.shape[0] if isinstance(module, nn.Conv2d) else 0

    def _patch_products(self, module: nn.Module, x: torch.Tensor, ref: torch.Tensor | None) -> None:
        """The Grams from the patch matrix itself, a cache-sized chunk of output positions at a time, each
        chunk copied once from a strided view of the input (1x1 convs and linear layers: no im2col)."""
        st, d = self.stats, self.d
        g = module.groups if isinstance(module, nn.Conv2d) else 1
        view = patch_view(module, x)                                          # (C_in, kh, kw, N, H_out, W_out)
        ref_view = patch_view(module, ref) if st.cross_gram is not None else None
        ho, wo = view.shape[4:]
        if isinstance(module, nn.Conv2d) and 0 < self.positions < ho * wo:   # seeded whole positions (rows of X, T)
            draws = torch.Generator().manual_seed(self.seed * 1_000_003 + self.batch)
            pick = torch.randperm(ho * wo, generator=draws)[:self.positions].sort().values.to(x.device)
            view = view[:, :, :, :, pick // wo, pick % wo].unsqueeze(-1)      # (C_in, kh, kw, N, P, 1)
            ref_view = None if ref_view is None else ref_view[:, :, :, :, pick // wo, pick % wo].unsqueeze(-1)
        r = view.shape[0] // g * view.shape[1] * view.shape[2]
        for imgs, rows in _position_chunks(view):
            p = view[:, :, :, imgs, rows].reshape(g, r, -1).float()          # (g, R, M): one copy
            if st.full_gram is None:      # with the full Gram, the block Grams are its diagonal blocks (remove())
                blocks = p.reshape(g * (r // d), d, -1)                           # (g*nb, d, M)
                st.block_grams += torch.bmm(blocks, blocks.transpose(1, 2)).view(g, r // d, d, d).double()
            else:
                st.full_gram += _gram(p).double()                                # (g, R, R)
                st.in_sum += p.sum(2).double()                                   # (g, R)
                if ref_view is not None:
                    pt = ref_view[:, :, :, imgs, rows].reshape(g, r, -1).float()  # (g, R, M)
                    st.cross_gram += torch.bmm(p, pt.transpose(1, 2)).double()   # (g, R, R)
                    st.ref_sum += pt.sum(2).double()                             # (g, R)
            st.n_rows += p.shape[2]

    def remove(self) -> None:
        self._handle.remove()
        self.stats.blocks_from_full()

    def __enter__(self) -> "StatsCollector":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def target_is_determined(stats: LayerStats, min_rows: float) -> bool:
    """Whether a layer's teacher-target regression (`teacher_target_weight`) is fitted: its calibration inputs give
    at least `min_rows` rows of X per weight of an output row (n_rows >= min_rows * R). With fewer rows than weights the
    ridge regression can map the student's inputs onto the teacher's outputs on the calibration images themselves and
    nowhere else: EfficientNet-Lite0's fc (one row per image, R = 1,280) at 16x kept 95.4 % teacher agreement on 500
    calibration images and 54.4 % on held-out ones (docs/DESIGN.md, session 17)."""
    r = stats.full_gram.shape[-1] if stats.full_gram is not None else 0
    return stats.n_rows >= min_rows * r


def teacher_target_weight(weight: torch.Tensor, stats: LayerStats, damp: float = 0.1) -> torch.Tensor:
    """The weight that best maps the *student's* inputs X to the *teacher's* outputs T W^T:

        W* = argmin_V ||X V^T - T W^T||^2 + lam ||V - W||^2  =  W + W (C^T - H) (H + lam I)^-1

    with H = X^T X, C = X^T T, lam = damp * mean(diag H) per group. Quantizing W* under H instead of W
    makes each layer undo the error that the already-quantized layers upstream pushed into its input
    (the paper quantizes W, so errors accumulate layer after layer). The ridge term pulls towards W,
    so directions the calibration inputs never excite are left unchanged.
    weight: (C_out, C_in/g, ...) -> same shape, float32."""
    if stats.full_gram is None or stats.cross_gram is None:
        raise ValueError("teacher_target_weight needs full and cross Grams (StatsCollector(cross_gram=True))")
    h, c = stats.full_gram, stats.cross_gram                                  # (g, R, R) each
    g, r, _ = h.shape
    w = weight.detach().to(h.device).reshape(g, -1, r).double()               # (g, C_out/g, R)
    lam = damp * torch.diagonal(h, dim1=1, dim2=2).mean(1).clamp_min(1e-12)   # (g,)
    hd = h + lam[:, None, None] * torch.eye(r, dtype=h.dtype, device=h.device)  # (g, R, R)
    rhs = (c - h) @ w.transpose(1, 2)                                         # (g, R, C_out/g)
    delta = torch.linalg.solve(hd, rhs).transpose(1, 2)                       # (g, C_out/g, R)
    return (w + delta).reshape(weight.shape).to(torch.float32)


def capture_call(model, module: nn.Module, x) -> tuple[tuple, dict]:
    """`module`'s (args, kwargs) when `model(x)` runs (the forward stops right there); `model` may be any
    callable, e.g. a block run on its cached arguments."""
    box: list[tuple[tuple, dict]] = []

    def grab(_m, args, kwargs):
        box.append((args, kwargs))
        raise StopForward

    handle = module.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(x)
    except StopForward:
        pass
    finally:
        handle.remove()
    if not box:
        raise ValueError("the module was not called by the model's forward()")
    return box[0]


def capture_input(model, module: nn.Module, x) -> torch.Tensor:
    """`module`'s input when `model` runs on `x` (the forward stops right there)."""
    return capture_call(model, module, x)[0][0].detach()


class StopForward(Exception):
    """Raised by a hook to end a forward pass early once the layers of interest have run."""


def run_until(model: nn.Module, batches: Iterable[torch.Tensor], last: nn.Module,
              progress: Callable[[int], None] | None = None) -> int:
    """Forward every batch through `model`, stopping each pass right before `last` computes (its
    earlier-registered pre-hooks, e.g. a StatsCollector, still run). Returns the number of images seen."""
    def stop(*_):
        raise StopForward

    handle = last.register_forward_pre_hook(stop)
    n = 0
    try:
        with torch.no_grad():
            for x in batches:
                try:
                    model(x)
                except StopForward:
                    pass
                n += x.shape[0]
                if progress is not None:
                    progress(x.shape[0])
    finally:
        handle.remove()
    return n


def collect_stats(model: nn.Module, layers: dict[str, tuple[nn.Module, int]], batches: Iterable[torch.Tensor],
                  full_gram: bool = False, stop_after: nn.Module | None = None) -> dict[str, LayerStats]:
    """Statistics of several layers in one pass over `batches`, on the CPU whatever the model's device.
    `layers`: name -> (module, block_size)."""
    collectors = [StatsCollector(n, m, d, full_gram) for n, (m, d) in layers.items()]
    try:
        if stop_after is not None:
            run_until(model, batches, stop_after)
        else:
            with torch.no_grad():
                for x in batches:
                    model(x)
    finally:
        for c in collectors:
            c.remove()
    out = {c.name: c.stats.to("cpu") for c in collectors}
    for name, st in out.items():
        if st.n_rows == 0:
            raise ValueError(f"layer {name!r} received no input: is it used in forward()?")
    return out
