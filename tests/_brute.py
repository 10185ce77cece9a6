"""Brute-force reference for tests: a layer's input matrix built from one-hot filters, independent of unfold."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def brute_x(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(groups, rows, R) float64: the layer's input matrix, one row per output position of every image."""
    x = x.double()
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])[None]
    c_out = module.out_channels
    g = module.groups
    opg = c_out // g
    shape = module.weight.shape
    r_len = math.prod(shape[1:])
    cols = []
    for r in range(r_len):
        w = torch.zeros(c_out, r_len, dtype=torch.float64)
        w[:, r] = 1.0
        y = F.conv2d(x, w.reshape(shape), None, module.stride, module.padding, module.dilation, g)
        cols.append(torch.stack([y[:, gi * opg].reshape(-1) for gi in range(g)]))  # (g, rows)
    return torch.stack(cols, dim=-1)                                                  # (g, rows, R)
