"""Shared pytest fixtures: import path for the src layout, real-asset lookup, tiny synthetic images."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("bitdown") is None:  # not installed: use the src layout directly
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


@pytest.fixture(autouse=True)
def _one_thread_for_fast_tests(request):
    """Fast tests run single-threaded: their tensors are tiny, and on a shared 2-core machine two
    OpenMP threads spin against other processes (measured up to 1000x slower). Slow real-asset
    tests keep torch's default."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
