"""bitdown: output-aware product quantization of neural networks ("And the Bit Goes Down",
Stock et al. 2020), stored as fp16 codebooks + uint8 codes in one safetensors file, run on CPU.

    model = bitdown.compress(model, unlabelled_loader, bitdown.QuantConfig(preset="small"))
    bitdown.save(model, "model.bitdown")
    model = bitdown.load("model.bitdown")             # zoo architectures
    model = bitdown.load("model.bitdown", my_model)   # any nn.Module of the same architecture
    model = bitdown.load("model.bitdown", frozen=True)   # inference only: dense layers, the dense model's speed
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch.nn as nn

from .compress import CompressionInfo, compress, recalibrate_bn
from .config import EMConfig, LayerPlan, QuantConfig
from .frozen import FrozenModelError, freeze, is_frozen
from .modules import PQConv2d, PQLinear
from .serialize import BitdownFileError, save
from .size import size_report
from .synthesize import SynthConfig, synthesize

__all__ = ["compress", "save", "load", "QuantConfig", "EMConfig", "LayerPlan", "PQConv2d", "PQLinear",
           "BitdownFileError", "CompressionInfo", "size_report", "recalibrate_bn", "synthesize", "SynthConfig",
           "freeze", "is_frozen", "FrozenModelError"]
__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())


def load(path: str | Path, model: nn.Module | None = None, frozen: bool = False) -> nn.Module:
    """Load a compressed model. `model`: the dense architecture (random or any weights); without it
    the architecture is built from the zoo name recorded in the file.

    frozen=True: an inference-only model (`bitdown.freeze`): plain layers holding the decoded weights, as
    fast as the dense model, refusing train(True) and load_state_dict. The default keeps the compressed
    layers, which fine-tuning, resuming, `save` and the ONNX export need."""
    from . import serialize
    from .frozen import refuse_frozen
    from .zoo import ZOO

    if model is not None:                    # before anything in it is replaced
        refuse_frozen(model, "load a file into")
    tensors, meta = serialize.read(path)
    arch = meta.get("arch", {})
    if model is None:
        name = arch.get("name")
        if arch.get("source") != "zoo" or name not in ZOO:
            raise BitdownFileError(f"{path}: architecture {name!r} is not in the zoo; pass the model "
                                   f"(Python: bitdown.load(path, model); CLI: --model module:function)")
        model = ZOO[name].build()
    serialize.apply(model, tensors, meta, path)
    model.bitdown = CompressionInfo(arch, meta.get("config", {}), [LayerPlan.from_json(p) for p in meta["layers"]],
                                    meta.get("skipped", {}), meta.get("em", {}), meta.get("timings", {}),
                                    meta.get("extra", {}))
    return freeze(model) if frozen else model
