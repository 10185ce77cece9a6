"""Locate the shared real assets (pretrained weights, image sets) outside the repository.

Resolution order: the ``BITDOWN_ASSETS`` environment variable, then ``<repo root>/../shared/assets``
(found relative to this file), then ``<cwd>/../shared/assets``. Asset files are never copied into
the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "BITDOWN_ASSETS"


def assets_dir() -> Path:
    """Return the assets directory (it may not exist; :func:`asset_path` checks files)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    repo_relative = Path(__file__).resolve().parents[2].parent / "shared" / "assets"
    if repo_relative.is_dir():
        return repo_relative
    return Path.cwd().parent / "shared" / "assets"


def asset_path(rel: str) -> Path:
    """Return ``assets_dir() / rel``, raising ``FileNotFoundError`` when it does not exist."""
    path = assets_dir() / rel
    if not path.exists():
        raise FileNotFoundError(
            f"asset not found: {path} (set {ENV_VAR} to the directory holding the shared assets)"
        )
    return path
