"""Shared helpers of the EM benchmarks: the bench inputs module, machine info, timed layer statistics."""
from __future__ import annotations

import importlib.util
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn as nn

from bitdown.stats import LayerStats, StatsCollector

RESULTS = Path(__file__).resolve().parent / "results"
BENCH_DIR = Path(os.environ.get("BITDOWN_BENCH", Path(__file__).resolve().parents[1].parent / "shared" / "bench"))


def load_layer_inputs():
    """The shared `layer_inputs` module (seeded synthetic conv layers), from BENCH_DIR."""
    path = BENCH_DIR / "layer_inputs.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (set BITDOWN_BENCH to the folder holding layer_inputs.py)")
    spec = importlib.util.spec_from_file_location("layer_inputs", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def machine() -> dict:
    return {"cpu_cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def conv_module(inp: dict) -> nn.Conv2d:
    """An nn.Conv2d holding the bench weight W (no bias)."""
    w = inp["W"]
    conv = nn.Conv2d(w.shape[1], w.shape[0], inp["k"], stride=inp["stride"], padding=inp["padding"], bias=False)
    with torch.no_grad():
        conv.weight.copy_(w)
    return conv


def conv_stats(inp: dict, block_size: int, full_gram: bool, batch: int = 64) -> tuple[LayerStats, float]:
    """Gram statistics over all images and pixels of the bench input (batches of `batch` images), and seconds."""
    conv, x = conv_module(inp), inp["X"]
    t0 = time.perf_counter()
    with StatsCollector("bench", conv, block_size, full_gram=full_gram) as col, torch.no_grad():
        for i in range(0, x.shape[0], batch):
            conv(x[i:i + batch])
    return col.stats, time.perf_counter() - t0
