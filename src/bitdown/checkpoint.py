"""Resumable progress: the student's full-precision state plus a JSON progress record, written
atomically, so a killed run restarts where it stopped and ends byte-identical to an uninterrupted one
(on the CPU; on a GPU, cuDNN's backward passes are not deterministic by default, so a resumed run is
close to, not identical with, an uninterrupted one).

A checkpoint folder holds `state.safetensors` (every tensor of the student, fp32 codebooks
included, plus optimizer/RNG tensors the caller adds) whose metadata carries the progress JSON.
The progress records a fingerprint of the run (config, model, data) and a resume is refused when
it differs, so a checkpoint is never silently applied to another run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

STATE = "state.safetensors"


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts and tensors (e.g. the config and the teacher's weights)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(p, dict) and p and all(isinstance(v, torch.Tensor) for v in p.values()):
            for k in sorted(p):
                h.update(k.encode())
                h.update(p[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def save_checkpoint(folder: str | Path, tensors: dict[str, torch.Tensor], progress: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=STATE, suffix=".tmp")
    os.close(fd)
    try:
        out, seen = {}, set()
        for k, v in tensors.items():        # a shared codebook appears under several names: one copy each
            t = v.detach().cpu().contiguous()
            out[k] = t.clone() if t.data_ptr() in seen else t
            seen.add(t.data_ptr())
        save_file(out, tmp, metadata={"progress": json.dumps(progress)})
        os.replace(tmp, folder / STATE)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(folder: str | Path, expect_fingerprint: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, progress) of the checkpoint in `folder`, None if there is none.

    Raises ValueError when it belongs to another run or cannot be read."""
    from safetensors import safe_open

    path = Path(folder) / STATE
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            progress = json.loads((f.metadata() or {})["progress"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"checkpoint {path} is unreadable ({e}); delete it to start over") from None
    if progress.get("fingerprint") != expect_fingerprint:
        raise ValueError(f"checkpoint {path} belongs to another run (different model, data or config); "
                         f"delete it or choose another checkpoint folder")
    return tensors, progress
