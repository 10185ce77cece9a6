"""The paper's per-architecture settings for zoo models (Stock et al. 2020, section 4.1 and the
kill-the-bits scripts): the classifier's number of centroids, and ResNet-18 `large` keeping
1x1 convs at d = 4. `zoo_config` merges them under any user overrides."""
from __future__ import annotations

from typing import Any

from .config import QuantConfig
from .zoo import get_entry

EXTRA_TYPE_OVERRIDES: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("resnet18", "large"): {"conv1x1": {"block_size": 4}},
}


def zoo_config(name: str, preset: str = "small", **kwargs: Any) -> QuantConfig:
    """A QuantConfig for zoo model `name` with the paper's settings; kwargs as QuantConfig's
    (their name_overrides / type_overrides take precedence over the recipe's)."""
    entry = get_entry(name)
    names = dict(kwargs.pop("name_overrides", {}) or {})
    types = dict(kwargs.pop("type_overrides", {}) or {})
    k = entry.classifier_centroids.get(preset)
    if k:
        names = {entry.classifier: {"n_centroids": k}, **names}
    types = {**EXTRA_TYPE_OVERRIDES.get((name, preset), {}), **types}
    return QuantConfig.from_dict(dict(preset=preset, name_overrides=names, type_overrides=types, **kwargs))
