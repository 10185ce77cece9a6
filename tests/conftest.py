"""Shared pytest fixtures: import path for the src layout, real-asset lookup, tiny synthetic images."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("bitdown") is None:  # not installed: use the src layout directly
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


@pytest.fixture
def assets_root() -> Path:
    """The shared real-assets directory; skips the test when it is not there."""
    from bitdown.assets import assets_dir

    root = assets_dir()
    if not root.is_dir():
        pytest.skip(f"real assets not found at {root} (set BITDOWN_ASSETS)")
    return root


@pytest.fixture
def make_image():
    """``make_image(path, size=(w, h), color=(r, g, b), fmt=None)`` writes a constant-colour image."""
    from PIL import Image

    def _make(path: Path, size=(8, 8), color=(10, 20, 30), fmt=None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, color).save(path, format=fmt)
        return path

    return _make
