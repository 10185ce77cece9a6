"""Blocks: the units the pipeline quantizes and reconstructs one after another.

A block is a module that the model's forward calls exactly once, holding one or more of the layers to
quantize: a residual unit (ResNet BasicBlock / Bottleneck, MBConv / InvertedResidual, YOLO C3), or any
module the user names (`QuantConfig.blocks`: regexes, full match on fully qualified module names; the
outermost match wins). A quantizable layer outside every block is a block of its own.

Default discovery walks the module tree from the root and, for each child that holds quantizable layers:

    a Conv2d / Linear                                   -> a block of its own
    a container (ModuleList, ModuleDict, or a Sequential
      with two or more children holding layers, at
      least one of them composite, i.e. a stage of
      blocks rather than a block made of layers)         -> looked into (its children are the candidates)
    a module holding more than MAX_BLOCK_LAYERS layers   -> looked into (a whole backbone is not a block)
    any other module                                     -> a block

So torchvision/timm ResNets give `layer1.0`, `layer1.1`, ..., MobileNetV2 `features.1` ..., the zoo's
EfficientNet-Lite0 `_blocks.0` ... `_blocks.15` with `_conv_stem`, `_conv_head` and `_fc` as one-layer
blocks, a YOLO-style `nn.Sequential` model `model.0`, `model.1`, ... One probe forward then checks that
every block is called exactly once; a candidate called more than once is looked into (a module whose
weights are used twice cannot be replaced by one cached output), one never called is dropped (its layers
are skipped by the plan as "not called").
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import layer_kind

log = logging.getLogger(__name__)

MAX_BLOCK_LAYERS = 16


@dataclass
class Block:
    name: str                 # fully qualified module name
    layers: list[str]         # fully qualified names of its quantizable layers, in forward order

    def to_json(self) -> dict:
        return {"name": self.name, "layers": list(self.layers)}


def _n_layers(module: nn.Module) -> int:
    return sum(layer_kind(m) is not None for m in module.modules())


def _is_container(module: nn.Module) -> bool:
    """Look into ModuleList/ModuleDict always; into a Sequential only when it is a stage of blocks: two or more
    children holding layers, at least one of them composite (not a bare Conv2d/Linear). A Sequential made of
    bare layers (conv, bn, relu, conv, bn: a unit written as a Sequential) is a block."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return True
    if isinstance(module, nn.Sequential):
        holders = [c for c in module.children() if _n_layers(c) > 0]
        return len(holders) >= 2 and any(layer_kind(c) is None for c in holders)
    return False


def _default_candidates(module: nn.Module, prefix: str) -> list[str]:
    out: list[str] = []
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        n = _n_layers(child)
        if n == 0:
            continue
        if layer_kind(child) is not None:
            out.append(full)
        elif _is_container(child) or n > MAX_BLOCK_LAYERS:
            out += _default_candidates(child, full)
        else:
            out.append(full)
    return out


def _named_candidates(model: nn.Module, patterns: list[str]) -> list[str]:
    """Outermost modules matching a pattern, then every quantizable layer outside them."""
    compiled = [(p, re.compile(p)) for p in patterns]
    hits = {p: 0 for p in patterns}
    chosen: list[str] = []
    for name, _ in model.named_modules():
        if not name or any(name == c or name.startswith(c + ".") for c in chosen):
            continue
        matched = [p for p, rx in compiled if rx.fullmatch(name)]
        for p in matched:
            hits[p] += 1
        if matched:
            chosen.append(name)
    unmatched = [p for p, n in hits.items() if n == 0]
    if unmatched:
        raise ValueError(f"blocks pattern(s) {unmatched} match no module name of the model "
                         f"(e.g. {[n for n, _ in list(model.named_modules())[1:6]]})")
    for name, m in model.named_modules():
        if layer_kind(m) is not None and not any(name == c or name.startswith(c + ".") for c in chosen):
            chosen.append(name)
    return chosen


def call_order(model: nn.Module, names: list[str], x: torch.Tensor) -> tuple[dict[str, int], list[str]]:
    """How often forward() calls each module of `names`, and the order of their first calls."""
    modules = dict(model.named_modules())
    count = {n: 0 for n in names}
    first: list[str] = []

    def hook(n: str):
        def fn(_m, _a) -> None:
            count[n] += 1
            if count[n] == 1:
                first.append(n)
        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return count, first


def find_blocks(model: nn.Module, x: torch.Tensor, layer_order: list[str],
                patterns: list[str] | None = None) -> list[Block]:
    """The blocks of `model` in the order forward() first calls them (see the module docstring).
    x: an example input batch (one or two images); layer_order: quantizable layers in forward order."""
    modules = dict(model.named_modules())
    candidates = _named_candidates(model, patterns) if patterns else _default_candidates(model, "")
    for _ in range(8):                       # look into candidates called more than once
        count, first = call_order(model, candidates, x)
        repeated = [n for n in candidates if count[n] > 1]
        if not repeated:
            break
        expanded: list[str] = []
        for n in candidates:
            if n not in repeated:
                expanded.append(n)
            elif layer_kind(modules[n]) is not None:
                raise ValueError(f"layer {n!r} is called {count[n]} times per forward (shared weights): the block "
                                 "pipeline needs each quantizable layer called once")
            else:
                inner = _default_candidates(modules[n], n) if not patterns else [
                    f"{n}.{c}" for c, m in modules[n].named_children() if _n_layers(m) > 0]
                log.info("block %r is called %d times per forward: its children are blocks instead", n, count[n])
                expanded += inner
        candidates = expanded
    else:
        raise ValueError(f"modules called more than once per forward: {repeated}")
    rank = {n: i for i, n in enumerate(layer_order)}
    blocks = []
    for n in first:                          # forward order; never-called candidates are dropped
        m = modules[n]
        inner = [n] if layer_kind(m) is not None else [f"{n}.{s}" for s, c in m.named_modules()
                                                         if s and layer_kind(c) is not None]
        inner = sorted((ln for ln in inner if ln in rank), key=rank.__getitem__)
        if inner:
            blocks.append(Block(n, inner))
    for n in candidates:
        if count[n] == 0:
            log.info("block %r is not called by forward() on the calibration images: skipped", n)
    return blocks
