"""Quantization configuration: presets, per-layer overrides, and the resolved per-layer plan.

A `QuantConfig` says how every conv / linear layer of a model is product-quantized. The plan for
one layer is resolved with coremltools-style precedence:

    module name (regex, full match on the fully qualified name)  >  layer type  >  preset

Layer types are `conv1x1`, `convkxk` (any kernel larger than 1x1, depthwise included), `linear`,
or a class name (`Conv2d`, `Linear`, a user subclass name). A type-kind key wins over a class-name
key. The paper's presets (Stock et al. 2020, section 4.1):

    small: 3x3 (any kxk) convs d = kh*kw,   1x1 convs d = 4, linear d = 4
    large: kxk convs d = 2*kh*kw (at most the row: depthwise keeps d = kh*kw), 1x1 d = 8, linear d = 4
    256 centroids everywhere (one-byte codes), and K is clamped per layer to the largest power of
    two strictly below n_subvectors / 4.

The stem conv (the first conv in forward order) is left uncompressed by default, as in the paper.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch.nn as nn

log = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, int]] = {
    # kind -> block size; 'convkxk' is a multiplier of the kernel area (1 = one kernel per block)
    "small": {"convkxk": 1, "conv1x1": 4, "linear": 4},
    "large": {"convkxk": 2, "conv1x1": 8, "linear": 4},
}
LAYER_KINDS = ("conv1x1", "convkxk", "linear")
OVERRIDE_KEYS = ("block_size", "n_centroids", "skip", "codebook_bits", "share", "scalar_bits", "fp16")
SCALAR_BITS = (2, 3, 4, 8)  # per-output-channel scalar codes (scalar.py); 0 in a plan: product quantization
SENSITIVITY_NORMS = ("sum", "level")  # QuantConfig.alloc_sensitivity_norm (allocate.layer_sensitivity)
CAP_RULES = ("tightest", "measured")  # QuantConfig.alloc_cap_rule: which cap of an alloc_max_error list is used
SENSITIVITY_LOSSES = ("mse", "bce", "kl")  # QuantConfig.alloc_sensitivity_loss: finetune.distill_loss's losses
                                           # ('kl': class logits (N, C) only)
CODEBOOK_BITS = (16, 8)     # fp16 codebooks (the paper), or int8 with one fp16 scale per column
MAX_CENTROIDS = 1 << 15  # codes are stored as int16 at most
CHANNEL_WEIGHTINGS = ("none", "variance", "bn")


@dataclass
class EMConfig:
    """Options of the output-aware EM (see em.py). Unknown keys are rejected by `from_dict`."""

    n_iter: int = 30
    tol: float = 1e-5               # stop when the relative objective decrease is below this
    init: str = "kmeans++"          # 'kmeans++' | 'random' (random subset of the subvectors)
    n_restarts: int = 1             # several seeded inits, the best objective is kept
    objective: str = "pooled"       # 'pooled' (one Gram, the paper) | 'per_block' (one Gram per block position)
                                    # | 'weights' (plain k-means on the weights: the iPQ baseline, no data)
    # Beyond the paper, on the exact objective (full Gram). Defaults chosen on the real ResNet-20
    # (docs/DESIGN.md): EM-only top-1 69 % vs 17 % for the paper's pooled EM, 73 % vs 52 % after BN.
    error_feedback: bool = True     # GPTQ-style: assign codes block by block, pushing the error forward
    damp: float = 0.01              # relative diagonal damping of the full Gram for error feedback
    code_reopt: int = 1             # sweeps of code re-optimisation on the exact objective
    codebook_refit: bool = True     # refit the codebook on the exact objective after the codes
    teacher_target: bool = True     # quantize the weight that maps the compressed network's inputs to the
                                    # *uncompressed* layer's outputs (stats.teacher_target_weight); EM-only
                                    # top-1 ResNet-20 65.6 -> 77.8 %, EfficientNet-Lite0 0 -> 49 % (DESIGN.md)
    target_damp: float = 0.1        # its ridge strength (relative to the mean diagonal of X^T X)
    target_min_rows: float = 1.0    # the teacher target only where the calibration inputs give >= this many rows per
                                    # weight of an output row (rows of X >= target_min_rows * R); below, the layer's
                                    # own weight is quantized: an under-determined regression reproduces the teacher
                                    # on the calibration images alone (EfficientNet-Lite0's fc, 128 rows for 1,280
                                    # weights: 16x 60.4 % held-out with 1.0 vs 54.0 % with 0, the old behaviour)
    channel_weighting: str = "none"  # 'variance': weight each output channel's error by 1/Var(y_o), the
                                     # scale a following BatchNorm applies; 'bn': by (gamma_o / sqrt(var_o +
                                     # eps))^2 of the BatchNorm fed directly by the layer (its post-BN error;
                                     # weight 1 without one), in the EM and the allocator's distortion;
                                     # 'none': the paper's plain sum
    mean_correction: bool = False   # after each layer, move its output mean back to the teacher's through the
                                    # BatchNorm it feeds (running mean) or its bias (meancorrect.py); a later
                                    # BN re-estimation (bn_recalibrate) replaces the running means again

    def __post_init__(self) -> None:
        if self.n_iter < 0:
            raise ValueError(f"n_iter must be >= 0, got {self.n_iter}")
        if self.tol < 0:
            raise ValueError(f"tol must be >= 0, got {self.tol}")
        if self.init not in ("kmeans++", "random"):
            raise ValueError(f"init must be 'kmeans++' or 'random', got {self.init!r}")
        if self.n_restarts < 1:
            raise ValueError(f"n_restarts must be >= 1, got {self.n_restarts}")
        if self.objective not in ("pooled", "per_block", "weights"):
            raise ValueError(f"objective must be 'pooled', 'per_block' or 'weights', got {self.objective!r}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {self.damp}")
        if self.channel_weighting not in CHANNEL_WEIGHTINGS:
            raise ValueError(f"channel_weighting must be one of {CHANNEL_WEIGHTINGS}, got {self.channel_weighting!r}")
        if self.target_damp <= 0:
            raise ValueError(f"target_damp must be > 0, got {self.target_damp}")
        if isinstance(self.target_min_rows, bool) or not (self.target_min_rows >= 0
                                                          and math.isfinite(self.target_min_rows)):
            raise ValueError(f"target_min_rows must be a finite number >= 0, got {self.target_min_rows!r}")
        if self.code_reopt < 0:
            raise ValueError(f"code_reopt must be >= 0, got {self.code_reopt}")

    @property
    def needs_full_gram(self) -> bool:
        return self.error_feedback or self.code_reopt > 0 or self.codebook_refit

    @classmethod
    def paper(cls, **kw: Any) -> "EMConfig":
        """The paper's EM: pooled Gram objective only, no exact-objective refinements."""
        return cls(**{"error_feedback": False, "code_reopt": 0, "codebook_refit": False, "teacher_target": False,
                      **kw})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EMConfig":
        return cls(**_checked(d, {f.name for f in fields(cls)}, "EM option"))


# Gradient slices per step of the distillation and block reconstruction (FinetuneConfig / ReconstructConfig
# grad_slices): measured cost and why this default in docs/DESIGN.md, "Session 10: rank-count-independent
# fine-tuning".
GRAD_SLICES = 4


@dataclass
class ReconstructConfig:
    """Block output reconstruction (reconstruct.py), run after each block's layers are quantized."""

    steps: int = 0              # Adam steps per block (0: off)
    lr: float = 1e-4            # codebooks and biases; BatchNorm affine too
    batch_size: int = 32        # images per step, drawn from the cached calibration batches
    drop_prob: float = 0.0      # QDrop: probability that an input value is the teacher's (0: off)
    train_bn: bool = True       # BatchNorm affine parameters inside the block
    train_bias: bool = True     # conv / linear biases inside the block
    codes: str = "fixed"        # 'fixed': codes stay the EM's; 'ste': learned too (a latent weight per subvector,
                                # its nearest codeword in the forward, straight-through gradient)
    latent_lr: float = 1e-2     # 'ste': the latent weights' Adam lr, relative to each layer's weight RMS
    reassign: int = 0           # rounds of: new codes for the block's layers under the reconstructed codebooks
                                # (GPTQ assignment on their new input statistics), then `steps` more steps
    grad_slices: int = GRAD_SLICES  # each step's gradient: the sum of this many slices of its rows, in order
                                    # (the same file for any number of processes that divides it)

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"reconstruct steps must be >= 0, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"reconstruct lr must be a finite number > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"reconstruct batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.drop_prob <= 1:
            raise ValueError(f"reconstruct drop_prob must be in [0, 1], got {self.drop_prob}")
        if self.codes not in ("fixed", "ste"):
            raise ValueError(f"reconstruct codes must be 'fixed' or 'ste', got {self.codes!r}")
        if not (self.latent_lr > 0 and math.isfinite(self.latent_lr)):
            raise ValueError(f"reconstruct latent_lr must be a finite number > 0, got {self.latent_lr}")
        if self.reassign < 0:
            raise ValueError(f"reconstruct reassign must be >= 0, got {self.reassign}")
        check_int(self.grad_slices, "reconstruct grad_slices", 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReconstructConfig":
        return cls(**_checked(d, {f.name for f in fields(cls)}, "reconstruct option"))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LayerPlan:
    """The resolved quantization of one layer (what the quantizer does and what the file stores).

    Three quantizers (`quantizer`):
      'pq'      product quantization: (C_out, R/d) codes into a (K, d) codebook (scalar_bits 0, fp16 False);
      'int{b}'  scalar_bits b in SCALAR_BITS: one b-bit code per weight, w = s_o (q - z_o) with one fp16
                scale s_o and one b-bit zero point z_o per output channel (scalar.py). Such a plan has
                block_size 1 and n_centroids 2**b, so n_subvectors (= weights) and code_bits (= b) keep
                their meaning for the codes; its accounting (size.py) has its own rule: no codebook;
      'fp16'    fp16=True: the weight kept in fp16 (block_size 1, n_centroids 1: no codes).
    Build those with `LayerPlan.scalar` / `LayerPlan.half`. Plans written before these fields existed
    (without the keys) load as PQ plans."""

    name: str
    kind: str                 # conv1x1 | convkxk | linear
    weight_shape: tuple[int, ...]
    block_size: int
    n_centroids: int          # after clamping
    groups: int = 1
    codebook_bits: int = 16   # 16: fp16 codebook; 8: int8 codebook + (d,) fp16 column scales
    share: str | None = None  # name of the group of layers sharing one codebook (None: its own codebook)
    scalar_bits: int = 0      # 0: product quantization; 2/3/4/8: per-output-channel scalar codes
    fp16: bool = False        # the weight kept in fp16

    def __post_init__(self) -> None:
        if self.scalar_bits not in (0,) + SCALAR_BITS or isinstance(self.scalar_bits, bool):
            raise ValueError(f"layer {self.name!r}: scalar_bits must be 0 (product quantization) or one of "
                             f"{SCALAR_BITS}, got {self.scalar_bits!r}")
        if not isinstance(self.fp16, bool):
            raise TypeError(f"layer {self.name!r}: fp16 must be a bool, got {self.fp16!r}")
        if self.scalar_bits and self.fp16:
            raise ValueError(f"layer {self.name!r}: a layer is either scalar-quantized or kept in fp16, not both")
        if self.scalar_bits or self.fp16:
            k = 1 << self.scalar_bits if self.scalar_bits else 1
            if (self.block_size, self.n_centroids, self.codebook_bits, self.share) != (1, k, 16, None):
                raise ValueError(f"layer {self.name!r}: a {self.quantizer} plan has block_size 1, n_centroids {k}, "
                                 f"no codebook bits and no share group, got block_size {self.block_size}, "
                                 f"n_centroids {self.n_centroids}, codebook_bits {self.codebook_bits}, "
                                 f"share {self.share!r} (use LayerPlan.scalar / LayerPlan.half)")

    @classmethod
    def scalar(cls, name: str, kind: str, weight_shape: tuple[int, ...], bits: int, groups: int = 1) -> "LayerPlan":
        """A per-output-channel scalar plan with `bits`-bit codes."""
        return cls(name, kind, tuple(weight_shape), 1, 1 << bits, groups, scalar_bits=bits)

    @classmethod
    def half(cls, name: str, kind: str, weight_shape: tuple[int, ...], groups: int = 1) -> "LayerPlan":
        """A plan keeping the layer's weight in fp16."""
        return cls(name, kind, tuple(weight_shape), 1, 1, groups, fp16=True)

    @property
    def quantizer(self) -> str:
        """'pq', 'int2' / 'int3' / 'int4' / 'int8', or 'fp16'."""
        return "fp16" if self.fp16 else f"int{self.scalar_bits}" if self.scalar_bits else "pq"

    @property
    def row_length(self) -> int:
        return math.prod(self.weight_shape[1:])

    @property
    def n_subvectors(self) -> int:
        return math.prod(self.weight_shape) // self.block_size

    @property
    def code_bits(self) -> float:
        return math.log2(self.n_centroids)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["weight_shape"] = list(self.weight_shape)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LayerPlan":
        d = dict(d)
        d["weight_shape"] = tuple(d["weight_shape"])
        if d.get("share") is not None and not isinstance(d["share"], str):
            raise TypeError(f"share must be a group name or null, got {d['share']!r}")
        return cls(**d)


@dataclass
class QuantConfig:
    """How to quantize a model: a preset, global settings, overrides, and the EM options.

    `name_overrides` / `type_overrides` map a regex (full match on the module's fully qualified
    name) / a layer type to a dict with any of `block_size`, `n_centroids`, `skip`.
    """

    preset: str = "small"
    n_centroids: int = 256
    codebook_bits: int = 16         # 16: fp16 codebooks (the paper); 8: int8 codebooks with fp16 column scales
    quantize_stem: bool = False
    name_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    type_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    em: EMConfig = field(default_factory=EMConfig)
    seed: int = 0
    calib_images: int = 1024        # images used for the statistics of each layer
    batch_size: int = 128
    bn_recalibrate: bool | None = None  # re-estimate BatchNorm running statistics after quantization;
                                        # None: only when em.teacher_target is off (measured in docs/DESIGN.md:
                                        # with teacher targets the teacher's statistics are the better ones)
    bn_images: int = 2048           # images used for that
    share_same_shape: bool = False  # one codebook per (kind, weight shape) group of layers
    alloc_weighting: str = "none"   # with a target size: 'none' minimises sum_l D_l (relative output errors);
                                    # 'sensitivity' weights each D_l by how much it reaches the network output
    alloc_sensitivity_loss: str = "mse"  # with alloc_weighting 'sensitivity': how a layer's output noise is measured
                                    # at the network's output: 'mse' (normalised, per output tensor), 'bce'
                                    # (Bernoulli KL of sigmoid outputs: what a YOLO head's decode reads) or 'kl'
                                    # (the KL of a classifier's softmax: what its top-1 reads)
    alloc_sensitivity_norm: str = "sum"  # with the 'bce' sensitivity: 'sum' (the KL summed over every element of
                                    # every output tensor: a detector's P3 map, 16x the cells of P5, dominates) or
                                    # 'level' (each output tensor's KL averaged over its elements: every level counts
                                    # alike). 'mse' already normalises each tensor by its own energy: 'sum' only
    alloc_max_error: float | list[float] | None = None  # with a target size: no layer gets an option whose
                                          # relative output error D_l exceeds this (e.g. 0.3), whatever the weighting
                                          # says; a list (e.g. [0.15, 0.2, 0.3]): the first cap the budget satisfies,
                                          # or with alloc_cap_rule 'measured' the best of those it satisfies
    alloc_cap_rule: str = "tightest"      # with a list of caps: 'tightest' (the first the budget satisfies) or
                                          # 'measured' (each satisfiable cap's allocation quantized by the allocator's
                                          # fast quantizer; the one whose network output is closest to the teacher's on
                                          # the calibration images (KL for class logits, else normalised MSE) wins:
                                          # allocate.measured_cap)
    alloc_menu: list[str] = field(default_factory=list)  # with a target size: options beyond PQ the allocator may
                                    # pick per layer: 'int8', 'int4', 'int3', 'int2' (per-channel scalar), 'fp16'
    blocks: list[str] | None = None  # regexes naming the blocks (blocks.py); None: found by the default rules
    reconstruct: ReconstructConfig = field(default_factory=ReconstructConfig)
    cache_dtype: str = "float32"    # block inputs/outputs kept as 'float32' (exact) or 'float16' (half the memory)
    cache_mb: int = 512             # RAM for cached block activations; beyond it they spill to temporary files (read
                                    # back exactly; EfficientNet-Lite0 at 500 images spills ~0.9 GB at its first
                                    # blocks): the cache sits idle under each layer's distillation, so a larger
                                    # budget only raises the peak RSS (session 11: 4096 -> 512). Not in a
                                    # checkpoint's fingerprint (compress.NEUTRAL_KEYS)
    forward_mb: float = 16.0        # the forward passes over a calibration batch (statistics, block inputs/outputs,
                                    # the allocation's pass) run on pieces of at most this many MB of input images
                                    # (ImageNet 224 px: 27 images; CIFAR batches stay whole), so only one piece's
                                    # activations exist at a time; results change by float summation order only.
                                    # 0: whole batches
    stats_positions: int = 0        # 0: every output position enters a layer's Grams (exact); N > 0: a conv with more
                                    # than N output positions per image uses N of them (seeded, the same for student
                                    # and teacher inputs), more when the calibration set is small
                                    # (stats.subsample_positions). N = 256: accuracy neutral but ~0-3 % faster on
                                    # ResNet-20 / EfficientNet-Lite0 (session 11), so off by default

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        _check_centroids(self.n_centroids, "n_centroids")
        _check_bits(self.codebook_bits, "codebook_bits")
        if isinstance(self.em, dict):
            self.em = EMConfig.from_dict(self.em)
        if isinstance(self.reconstruct, dict):
            self.reconstruct = ReconstructConfig.from_dict(self.reconstruct)
        if self.blocks is not None:
            if isinstance(self.blocks, str) or not all(isinstance(b, str) for b in self.blocks) or not self.blocks:
                raise ValueError(f"blocks must be a non-empty list of regexes (or None), got {self.blocks!r}")
            for pattern in self.blocks:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"blocks pattern {pattern!r} is not a valid regex: {e}") from None
            self.blocks = list(self.blocks)
        bad = [m for m in self.alloc_menu if m not in ("int8", "int4", "int3", "int2", "fp16")]
        if isinstance(self.alloc_menu, str) or bad:
            raise ValueError(f"alloc_menu entries must be 'int8', 'int4', 'int3', 'int2' or 'fp16', got {self.alloc_menu!r}")
        self.alloc_menu = list(self.alloc_menu)
        if self.cache_dtype not in ("float32", "float16"):
            raise ValueError(f"cache_dtype must be 'float32' or 'float16', got {self.cache_dtype!r}")
        if self.cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0, got {self.cache_mb}")
        if (isinstance(self.forward_mb, bool) or not isinstance(self.forward_mb, (int, float))
                or not math.isfinite(self.forward_mb) or self.forward_mb < 0):
            raise ValueError(f"forward_mb must be a finite number >= 0 (0: whole batches), got {self.forward_mb!r}")
        self.forward_mb = float(self.forward_mb)        # 8 and 8.0: one setting, one fingerprint
        check_int(self.stats_positions, "stats_positions", 0)          # 0: every position
        for pattern, ov in self.name_overrides.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"name override {pattern!r} is not a valid regex: {e}") from None
            _check_override(ov, f"name override {pattern!r}")
        for key, ov in self.type_overrides.items():
            _check_override(ov, f"type override {key!r}")
        if self.alloc_weighting not in ("none", "sensitivity"):
            raise ValueError(f"alloc_weighting must be 'none' or 'sensitivity', got {self.alloc_weighting!r}")
        check_sensitivity_loss(self.alloc_sensitivity_loss, "alloc_sensitivity_loss", self.alloc_sensitivity_norm,
                               "alloc_sensitivity_norm")
        if self.alloc_max_error is not None:
            given = self.alloc_max_error
            caps = list(given) if isinstance(given, (list, tuple)) else [given]
            if not caps or any(isinstance(c, bool) or not isinstance(c, (int, float)) or not (0 < c and math.isfinite(c))
                               for c in caps):
                raise ValueError(f"alloc_max_error must be a finite number > 0, a non-empty list of them (the first cap "
                                 f"the budget satisfies is used, or with alloc_cap_rule 'measured' the best), or None; "
                                 f"got {given!r}")
            if any(b <= a for a, b in zip(caps, caps[1:])):
                raise ValueError(f"alloc_max_error as a list must be strictly ascending (tightest cap first: a "
                                 f"looser cap before a tighter one would always win), got {caps!r}")
            self.alloc_max_error = caps if len(caps) > 1 else caps[0]
        if self.alloc_cap_rule not in CAP_RULES:
            raise ValueError(f"alloc_cap_rule must be one of {', '.join(repr(r) for r in CAP_RULES)}, "
                             f"got {self.alloc_cap_rule!r}")
        for k in ("calib_images", "batch_size", "bn_images"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")

    @property
    def alloc_caps(self) -> list[float]:
        """alloc_max_error as a list of caps, tried in order (empty: no cap)."""
        c = self.alloc_max_error
        return [] if c is None else [float(x) for x in c] if isinstance(c, (list, tuple)) else [float(c)]

    @property
    def recalibrates_bn(self) -> bool:
        return (not self.em.teacher_target) if self.bn_recalibrate is None else bool(self.bn_recalibrate)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        d = _checked(d, {f.name for f in fields(cls)}, "config key")
        return cls(**d)


def check_int(value: Any, what: str, minimum: int) -> None:
    """The one rule for integer settings: an int (not a bool, not a float) >= minimum, else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")


def check_sensitivity_loss(loss: Any, what: str, norm: Any = "sum", norm_what: str = "norm") -> None:
    """A layer-sensitivity loss (allocate.layer_sensitivity) is one of SENSITIVITY_LOSSES and its normalisation
    one of SENSITIVITY_NORMS ('level' with 'bce' only), else a ValueError."""
    if loss not in SENSITIVITY_LOSSES:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, SENSITIVITY_LOSSES))}, got {loss!r}")
    if norm not in SENSITIVITY_NORMS:
        raise ValueError(f"{norm_what} must be one of {', '.join(map(repr, SENSITIVITY_NORMS))}, got {norm!r}")
    if norm == "level" and loss != "bce":
        raise ValueError(f"{norm_what}='level' needs {what}='bce' (got {loss!r}): 'mse' already normalises each "
                         "output tensor by its own energy")


def _checked(d: dict[str, Any], allowed: set[str], what: str) -> dict[str, Any]:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; allowed: {sorted(allowed)}")
    return dict(d)


def _check_centroids(k: int, what: str) -> None:
    if not isinstance(k, int) or k < 2 or k > MAX_CENTROIDS or k & (k - 1):
        raise ValueError(f"{what} must be a power of two in [2, {MAX_CENTROIDS}], got {k!r}")


def _check_bits(bits: Any, what: str) -> None:
    if bits not in CODEBOOK_BITS or isinstance(bits, bool):
        raise ValueError(f"{what} must be one of {CODEBOOK_BITS}, got {bits!r}")


def _check_override(ov: dict[str, Any] | None, what: str) -> None:
    if ov is None:
        return
    if not isinstance(ov, dict):
        raise ValueError(f"{what} must be a dict with keys {OVERRIDE_KEYS}, got {type(ov).__name__}")
    unknown = sorted(set(ov) - set(OVERRIDE_KEYS))
    if unknown:
        raise ValueError(f"{what}: unknown key(s) {unknown}; allowed: {list(OVERRIDE_KEYS)}")
    if "block_size" in ov and (not isinstance(ov["block_size"], int) or ov["block_size"] < 1):
        raise ValueError(f"{what}: block_size must be a positive int, got {ov['block_size']!r}")
    if "n_centroids" in ov:
        _check_centroids(ov["n_centroids"], f"{what}: n_centroids")
    if "codebook_bits" in ov:
        _check_bits(ov["codebook_bits"], f"{what}: codebook_bits")
    if "share" in ov and ov["share"] is not None and (not isinstance(ov["share"], str) or not ov["share"]):
        raise ValueError(f"{what}: share must be a non-empty group name (str) or None, got {ov['share']!r}")
    if "scalar_bits" in ov and (ov["scalar_bits"] not in (0,) + SCALAR_BITS or isinstance(ov["scalar_bits"], bool)):
        raise ValueError(f"{what}: scalar_bits must be 0 (product quantization) or one of {SCALAR_BITS}, "
                         f"got {ov['scalar_bits']!r}")
    if "fp16" in ov and not isinstance(ov["fp16"], bool):
        raise ValueError(f"{what}: fp16 must be true or false, got {ov['fp16']!r}")
    if ov.get("scalar_bits") or ov.get("fp16"):
        clash = sorted(k for k in ("block_size", "n_centroids", "codebook_bits") if k in ov)
        clash += ["share"] if ov.get("share") is not None else []
        clash += ["fp16"] if ov.get("scalar_bits") and ov.get("fp16") else []
        if clash:
            raise ValueError(f"{what}: {'scalar_bits' if ov.get('scalar_bits') else 'fp16'} cannot be combined "
                             f"with {clash} (a scalar or fp16 layer has no block size, centroids or codebook)")


_UNSET = object()   # a layer's `share` not set by any override


def layer_kind(module: nn.Module) -> str | None:
    """`conv1x1`, `convkxk`, `linear`, or None for a module bitdown does not quantize."""
    if isinstance(module, nn.Conv2d):
        return "conv1x1" if tuple(module.kernel_size) == (1, 1) else "convkxk"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Conv2d / Linear, in registration order (use forward_order for forward order)."""
    return [(n, m) for n, m in model.named_modules() if layer_kind(m) is not None]


def clamp_centroids(n_centroids: int, n_subvectors: int) -> int:
    """The paper's clamp: K at most the largest power of two strictly below n_subvectors / 4."""
    limit = n_subvectors / 4
    k = 1
    while k * 2 < limit:
        k *= 2
    return min(n_centroids, k)


def _apply_override(st: dict[str, Any], ov: dict[str, Any] | None, label: str) -> None:
    """Apply one override (None = skip the layer) to the layer's settings `st`, in place."""
    if ov is None:
        st["skip"], st["reason"] = True, f"{label} is None"
        return
    if "block_size" in ov:
        st["block_size"], st["forced"] = ov["block_size"], True
    st["n_centroids"] = ov.get("n_centroids", st["n_centroids"])
    st["codebook_bits"] = ov.get("codebook_bits", st["codebook_bits"])
    st["share"] = ov.get("share", st["share"])
    if "scalar_bits" in ov or "fp16" in ov:          # this override says how the layer is quantized
        st["scalar_bits"], st["fp16"] = ov.get("scalar_bits", 0), ov.get("fp16", False)
    elif "block_size" in ov or "n_centroids" in ov:  # a PQ override after a scalar / fp16 one: PQ again
        st["scalar_bits"], st["fp16"] = 0, False
    if "skip" in ov:
        st["skip"], st["reason"] = bool(ov["skip"]), label


def resolve_layer(name: str, module: nn.Module, config: QuantConfig, is_stem: bool = False,
                  ) -> tuple[LayerPlan | None, str]:
    """The plan for one layer, or (None, reason) when it stays uncompressed.

    Raises ValueError when a block size was forced by an override and does not divide the layer.
    """
    kind = layer_kind(module)
    if kind is None:
        return None, "not a Conv2d/Linear"
    weight = module.weight
    shape = tuple(weight.shape)
    row = math.prod(shape[1:])
    if kind == "convkxk":
        kh, kw = module.kernel_size  # whole kernels per block, at most one row (depthwise: one kernel)
        block_size = min(PRESETS[config.preset]["convkxk"] * kh * kw, row)
    else:
        block_size = PRESETS[config.preset][kind]

    st = {"block_size": block_size, "n_centroids": config.n_centroids, "codebook_bits": config.codebook_bits,
          "forced": False, "share": _UNSET, "scalar_bits": 0, "fp16": False,
          "skip": is_stem and not config.quantize_stem,
          "reason": "stem conv (quantize_stem=False)" if is_stem and not config.quantize_stem else ""}
    for key in (type(module).__name__, kind):  # a kind key wins over a class-name key
        if key in config.type_overrides:
            _apply_override(st, config.type_overrides[key], f"type override {key!r}")
    for pattern, ov in config.name_overrides.items():
        if re.fullmatch(pattern, name):
            _apply_override(st, ov, f"name override {pattern!r}")
    block_size, n_centroids, forced, skip, reason = (st[k] for k in ("block_size", "n_centroids", "forced",
                                                                       "skip", "reason"))
    if skip:
        return None, reason or "skipped by override"
    if st["fp16"] or st["scalar_bits"]:            # no block size, centroids or share group
        groups = module.groups if isinstance(module, nn.Conv2d) else 1
        if st["fp16"]:
            return LayerPlan.half(name, kind, shape, groups), ""
        return LayerPlan.scalar(name, kind, shape, st["scalar_bits"], groups), ""
    if row % block_size:
        msg = (f"layer {name!r}: block_size {block_size} does not divide its row length {row} "
               f"(weight {list(shape)})")
        if forced:
            raise ValueError(msg)
        return None, msg
    n_sub = math.prod(shape) // block_size
    share = st["share"]            # an explicit None opts a layer out of share_same_shape
    if share is _UNSET:
        share = f"{kind}:{'x'.join(map(str, shape))}" if config.share_same_shape else None
    if share is not None:   # the group's clamp (on all its subvectors) is applied by resolve_plan
        groups = module.groups if isinstance(module, nn.Conv2d) else 1
        return LayerPlan(name, kind, shape, block_size, n_centroids, groups, st["codebook_bits"], share), ""
    k = clamp_centroids(n_centroids, n_sub)
    if k < 2:
        return None, f"layer {name!r}: only {n_sub} subvectors, too few for 2 centroids"
    if k != n_centroids:
        log.debug("%s: n_centroids clamped %d -> %d (%d subvectors)", name, n_centroids, k, n_sub)
    groups = module.groups if isinstance(module, nn.Conv2d) else 1
    return LayerPlan(name, kind, shape, block_size, k, groups, st["codebook_bits"]), ""


def resolve_plan(model: nn.Module, config: QuantConfig, order: list[str] | None = None,
                 ) -> tuple[list[LayerPlan], dict[str, str]]:
    """Plans for every quantizable layer (in `order` if given) and the reasons for those skipped.

    The stem is the first conv in `order` (forward order) or, without it, in registration order.
    """
    layers = dict(quantizable_layers(model))
    if not layers:
        raise ValueError("the model has no Conv2d or Linear layer to quantize")
    names = order if order is not None else list(layers)
    unknown = [n for n in names if n not in layers]
    if unknown:
        raise ValueError(f"layers {unknown} are not Conv2d/Linear modules of the model")
    convs = [n for n in names if isinstance(layers[n], nn.Conv2d)]
    stem = convs[0] if convs else None
    _check_patterns_match(config, layers)
    plans, skipped = [], {}
    for name in names:
        plan, reason = resolve_layer(name, layers[name], config, is_stem=(name == stem))
        if plan is None:
            skipped[name] = reason
            log.info("leaving %s uncompressed: %s", name, reason)
        else:
            plans.append(plan)
    plans = _resolve_shared(plans, skipped)
    if not plans:
        raise ValueError(f"no layer left to quantize; skipped: {skipped}")
    return plans, skipped


def share_groups(plans: list[LayerPlan]) -> dict[str, list[LayerPlan]]:
    """group name -> its member plans (in `plans` order) for the layers that share a codebook."""
    groups: dict[str, list[LayerPlan]] = {}
    for p in plans:
        if p.share is not None:
            groups.setdefault(p.share, []).append(p)
    return groups


def share_owner(members: list[str]) -> str:
    """The member whose name holds a shared codebook in files (the first in sorted name order)."""
    return min(members)


def _resolve_shared(plans: list[LayerPlan], skipped: dict[str, str]) -> list[LayerPlan]:
    """Check that every share group agrees on block size, centroids and codebook bits; clamp the
    group's centroids on all its subvectors; a group of one layer is an ordinary layer (clamped, or
    skipped into `skipped` when it has too few subvectors, as any layer)."""
    out: dict[str, LayerPlan | None] = {p.name: p for p in plans}
    for group, members in share_groups(plans).items():
        for key in ("block_size", "n_centroids", "codebook_bits"):
            values = {getattr(p, key) for p in members}
            if len(values) > 1:
                raise ValueError(f"share group {group!r}: its layers disagree on {key} "
                                 f"({ {p.name: getattr(p, key) for p in members} }); a shared codebook needs one")
        n_sub = sum(p.n_subvectors for p in members)
        k = clamp_centroids(members[0].n_centroids, n_sub)
        if len(members) == 1 and k < 2:
            p = members[0]
            skipped[p.name] = f"layer {p.name!r}: only {n_sub} subvectors, too few for 2 centroids"
            log.info("leaving %s uncompressed: %s", p.name, skipped[p.name])
            out[p.name] = None
            continue
        if k < 2:
            raise ValueError(f"share group {group!r}: only {n_sub} subvectors, too few for 2 centroids")
        single = len(members) == 1
        for p in members:
            out[p.name] = replace(p, n_centroids=k if not single else clamp_centroids(k, p.n_subvectors),
                                  share=None if single else group)
    return [out[p.name] for p in plans if out[p.name] is not None]


def _check_patterns_match(config: QuantConfig, layers: dict[str, nn.Module]) -> None:
    names = list(layers)
    for pattern in config.name_overrides:
        if not any(re.fullmatch(pattern, n) for n in names):
            raise ValueError(f"name override {pattern!r} matches no Conv2d/Linear layer; "
                             f"layers are e.g. {names[:5]}")
    types = {layer_kind(m) for m in layers.values()} | {type(m).__name__ for m in layers.values()}
    for key in config.type_overrides:
        if key not in types:
            raise ValueError(f"type override {key!r} matches no layer; types here: {sorted(types)}")
