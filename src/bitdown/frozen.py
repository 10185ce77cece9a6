"""A frozen inference model: every compressed layer replaced by a plain layer holding its decoded weight.

    model = bitdown.load("model.bitdown", frozen=True)     # or bitdown.freeze(bitdown.load("model.bitdown"))

A loaded PQ model decodes each layer's weight once and caches it, but must check on every access that the
codebook and the codes did not change (modules.py), which costs 3-6 % of a batch-1 forward
(benchmarks/results/pq_speed.md). A frozen model has nothing to check: each PQ, scalar-code or fp16 layer
becomes an instance of its original class (nn.Conv2d, nn.Linear or the user's subclass) whose weight is
`layer.to_dense()`'s, the same values as the compressed layer's eval forward uses, so the outputs are
identical bit for bit and the forward costs what the dense model's does.

The contract that buys this: a frozen model is read-only. It is in eval mode, its parameters do not require
gradients, and `train()` / `train(True)` and `load_state_dict` on it or on any of its modules raise
FrozenModelError before anything is changed (so it can never drift from the file it was loaded from, and
code that restores a mode in a `finally` keeps working: `eval()` and `train(False)` are allowed). To
fine-tune, resume or save, load the file without `frozen=True`.

`freeze` works in place (like `quantize_module` and `serialize.apply`: a copy would hold the model twice);
`copy.deepcopy(model)` first to keep the compressed one. The guards are instance attributes of each module
(`_Refuse`, shadowing the class's `train` / `load_state_dict`); the modules keep their classes, so torch.fx, Conv-BN
fusion and anything keyed by `type(m)` see the same model as before. A guard holds its module by weak reference:
no module refers to itself, so a frozen model is freed as soon as its last reference goes (no reference cycle
left for the cycle collector). A guard pickles as (its module, its method) (`__reduce__`), so a frozen model
deep-copies, pickles and `torch.save`s as one, and the copy's guards hold the copy.
"""
from __future__ import annotations

import logging
import weakref

import torch.nn as nn

from .scalar import is_quantized

__all__ = ["freeze", "is_frozen", "refuse_frozen", "FrozenModelError"]

log = logging.getLogger(__name__)

_FIX = ("load the file without frozen=True (bitdown.load(path)) to fine-tune, resume, save or export it; "
        "a frozen model is for inference only")


class FrozenModelError(RuntimeError):
    """An operation that would change a frozen (inference-only) model: training mode, load_state_dict."""


class _Refuse:
    """Stands in for `module.train` / `module.load_state_dict` on a frozen module (an instance attribute
    shadows the class's method): `train(False)` (= `eval()`) goes through, anything that would change the
    module raises FrozenModelError before touching it. Holds its module by weak reference (no cycle)."""

    __slots__ = ("_module", "method")

    def __init__(self, module: nn.Module, method: str) -> None:
        self._module, self.method = weakref.ref(module), method

    @property
    def module(self) -> nn.Module:
        return self._module()

    def __call__(self, *args, **kwargs):
        if self.method == "train":
            mode = args[0] if args else kwargs.get("mode", True)
            if not mode:
                return nn.Module.train(self.module, False)
            raise FrozenModelError(f"cannot put a frozen model in training mode: {_FIX}")
        raise FrozenModelError(f"cannot load a state dict into a frozen model (it would no longer be what its file "
                               f"holds): {_FIX}")

    def __reduce__(self):                # pickle / deepcopy: a guard of the copied module (found in the memo)
        return (_Refuse, (self.module, self.method))


def is_frozen(model: nn.Module) -> bool:
    """Whether `model` was made by `freeze` (or `bitdown.load(..., frozen=True)`)."""
    return isinstance(model.__dict__.get("train"), _Refuse)


def refuse_frozen(model: nn.Module, what: str) -> None:
    """FrozenModelError naming `what` (e.g. "save") when `model` is frozen: it holds no codes to write."""
    if is_frozen(model):
        raise FrozenModelError(f"cannot {what} a frozen model (its layers hold decoded weights, not codes): {_FIX}")


def freeze(model: nn.Module) -> nn.Module:
    """`model` (compressed by bitdown, or loaded) as a frozen inference model, in place; returns it.

    Every product-quantized, scalar-code or fp16 layer is replaced by its `to_dense()` layer (forward hooks
    and other hook dicts are moved over to it); the model is put in eval mode, its parameters stop requiring
    gradients, and every module refuses `train(True)` and `load_state_dict` (FrozenModelError). A model that
    is itself one compressed layer is returned as a new dense layer. Freezing a frozen model returns it."""
    if is_frozen(model):
        return model
    dense: dict[int, nn.Module] = {}

    def dense_of(layer: nn.Module) -> nn.Module:
        if id(layer) not in dense:                 # a layer at two places in the model stays one layer
            d = dense[id(layer)] = layer.to_dense()
            for k, v in layer.__dict__.items():    # the same hook dicts: handles taken before still remove them
                if k.endswith("hooks") or k.startswith(("_forward", "_backward")) or k == "_is_full_backward_hook":
                    d.__dict__[k] = v
        return dense[id(layer)]

    if is_quantized(model):
        model = dense_of(model)
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and is_quantized(child):
                parent._modules[name] = dense_of(child)
    nn.Module.train(model, False)
    model.requires_grad_(False)
    for m in model.modules():
        m.train = _Refuse(m, "train")
        m.load_state_dict = _Refuse(m, "load_state_dict")
    log.debug("froze %s: %d compressed layers now dense", type(model).__name__, len(dense))
    return model
