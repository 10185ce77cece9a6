"""Model size, accounted exactly as the paper (Stock et al. 2020, kill-the-bits `compute_size`):

- MB = 2**20 bytes;
- a quantized layer costs its indices, log2(K) bits per subvector (log2(K)/d bits per weight),
  plus its codebook, K x d values in fp16 (or, with codebook_bits=8, K x d int8 values plus d fp16
  column scales: an extension of the paper's accounting, not in the paper);
- a codebook shared by several layers (LayerPlan.share) is counted once;
- beyond the paper, a layer with per-output-channel scalar codes (LayerPlan.scalar_bits = b, scalar.py)
  costs b bits per weight plus, per output channel, its fp16 scale and its b-bit zero point
  (16 + b bits); a layer kept in fp16 (LayerPlan.fp16) costs 16 bits per weight;
- every other parameter (stem conv, biases, BatchNorm weight/bias, ...) counts in fp32;
- buffers (BatchNorm running statistics) are not counted.

The ratio is the fp32 size of all parameters divided by that. The real bytes on disk (codes
bit-packed to ceil(log2 K) bits, fp16 codebooks, fp16 BatchNorm statistics, fp32 rest, index and JSON
metadata, all zlib-compressed in format version 3) are a separate figure: `file_bytes(model)` here, and
`bitdown info` reports both, "paper_bytes" (= "size_bytes") and "file_bytes".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch.nn as nn

from .config import LayerPlan

MB = float(1 << 20)


@dataclass
class LayerSize:
    name: str
    kind: str
    weight_shape: list[int]
    block_size: int
    n_centroids: int
    n_weights: int
    index_bytes: float
    codebook_bytes: float
    bits_per_weight: float      # index + codebook bits, per weight
    quantizer: str = "pq"       # LayerPlan.quantizer: 'pq', 'int2' ... 'int8' (index: the codes, codebook: the
                                # per-channel scales and zero points), 'fp16' (index: the fp16 weights)


@dataclass
class SizeReport:
    size_bytes: float           # paper-style compressed size
    uncompressed_bytes: float   # all parameters in fp32
    other_bytes: float          # the non-quantized parameters, fp32
    layers: list[LayerSize] = field(default_factory=list)

    @property
    def paper_bytes(self) -> float:
        """The paper-style size in bytes (= size_bytes; the bytes on disk are `file_bytes(model)`)."""
        return self.size_bytes

    @property
    def size_mb(self) -> float:
        return self.size_bytes / MB

    @property
    def uncompressed_mb(self) -> float:
        return self.uncompressed_bytes / MB

    @property
    def ratio(self) -> float:
        return self.uncompressed_bytes / self.size_bytes

    def to_json(self) -> dict:
        return {"size_mb": self.size_mb, "ratio": self.ratio, "size_bytes": self.size_bytes,
                "uncompressed_mb": self.uncompressed_mb, "other_bytes": self.other_bytes,
                "layers": [asdict(layer) for layer in self.layers]}


def codebook_bytes(n_centroids: int, block_size: int, codebook_bits: int = 16) -> int:
    """Bytes of one codebook: K x d fp16, or K x d int8 + d fp16 column scales."""
    if codebook_bits == 16:
        return n_centroids * block_size * 2
    return n_centroids * block_size + 2 * block_size


def scalar_bytes(n_weights: int, c_out: int, bits: int) -> tuple[float, float]:
    """(code bytes, per-channel bytes) of a layer with `bits`-bit scalar codes: bits per weight, and an
    fp16 scale plus a `bits`-bit zero point per output channel."""
    return n_weights * bits / 8, c_out * (16 + bits) / 8


def fp16_bytes(n_weights: int) -> int:
    """Bytes of a weight kept in fp16."""
    return 2 * n_weights


def layer_size(plan: LayerPlan, count_codebook: bool = True) -> LayerSize:
    """Paper-style bytes of one layer; `count_codebook=False` for a layer whose codebook is shared
    with a layer already counted."""
    n = 1
    for s in plan.weight_shape:
        n *= s
    if plan.fp16:
        index, codebook = float(fp16_bytes(n)), 0.0
    elif plan.scalar_bits:
        index, codebook = scalar_bytes(n, plan.weight_shape[0], plan.scalar_bits)
    else:
        index = plan.n_subvectors * plan.code_bits / 8
        codebook = codebook_bytes(plan.n_centroids, plan.block_size, plan.codebook_bits) if count_codebook else 0
    return LayerSize(plan.name, plan.kind, list(plan.weight_shape), plan.block_size, plan.n_centroids, n,
                     index, codebook, 8 * (index + codebook) / n, plan.quantizer)


def size_report(model: nn.Module, plans: list[LayerPlan]) -> SizeReport:
    """Paper-style size of `model` (dense or already compressed) quantized as `plans`."""
    skip = {f"{p.name}.{a}" for p in plans                  # what layer_size counts instead
            for a in (("weight", "scale") if p.scalar_bits else ("weight", "codebook"))}
    other = sum(p.numel() for n, p in model.named_parameters() if n not in skip) * 4
    seen: set[str] = set()          # a shared codebook is counted once, at its group's first layer
    layers = []
    for p in plans:
        layers.append(layer_size(p, count_codebook=p.share is None or p.share not in seen))
        if p.share is not None:
            seen.add(p.share)
    dense = other + sum(layer.n_weights * 4 for layer in layers)
    size = other + sum(layer.index_bytes + layer.codebook_bytes for layer in layers)
    return SizeReport(size, dense, other, layers)


def file_bytes(model: nn.Module, metadata: dict | None = None) -> int:
    """The exact bytes of the file `bitdown.save(model, path, metadata)` would write (codes packed,
    header and metadata included), computed in memory: nothing is written and the model is unchanged.
    `metadata` defaults to `model.bitdown.metadata()`, as for `save`."""
    from .serialize import file_size

    return file_size(model, metadata)
