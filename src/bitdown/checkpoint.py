"""Resumable progress: the student's full-precision state plus a JSON progress record, written
atomically, so a killed run restarts where it stopped and ends byte-identical to an uninterrupted one
(on the CPU; on a GPU, cuDNN's backward passes are not deterministic by default, so a resumed run is
close to, not identical with, an uninterrupted one).

A checkpoint folder holds `state.safetensors` (every tensor of the student, fp32 codebooks
included, plus optimizer/RNG tensors the caller adds) whose metadata carries the progress JSON.
The progress records a fingerprint of the run (config, model, data) and a resume is refused when
it differs, so a checkpoint is never silently applied to another run. It also records the run's readable
settings (`RunKey.settings`: the quantization and fine-tuning configs as fingerprinted), so the refusal names
the keys that changed (e.g. a recipe's step count) rather than only saying that something did.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class RunKey:
    """What identifies a run: `fingerprint` (a hash of everything that must match to resume: configs, model,
    weights, data) and `settings`, the readable part of it (JSON: the configs), kept to name what changed."""
    fingerprint: str
    settings: dict[str, Any] = field(default_factory=dict)


def settings_diff(old: Any, new: Any, path: str = "", where: str = "the checkpoint") -> list[str]:
    """'key: OLD in `where`, NEW now' for every leaf where two settings trees differ (dicts by key)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{k}" if path else str(k)
            if k not in old:
                out.append(f"{sub}: not set in {where}, {json.dumps(new[k], default=str)} now")
            elif k not in new:
                out.append(f"{sub}: {json.dumps(old[k], default=str)} in {where}, not set now")
            else:
                out += settings_diff(old[k], new[k], sub, where)
        return out
    if json.dumps(old, sort_keys=True, default=str) == json.dumps(new, sort_keys=True, default=str):
        return []
    return [f"{path or 'settings'}: {json.dumps(old, default=str)} in {where}, {json.dumps(new, default=str)} now"]


def summarise_diff(diff: list[str], limit: int) -> str:
    """The first `limit` lines of a settings_diff joined by '; ', and how many more there are."""
    return "; ".join(diff[:limit]) + (f"; and {len(diff) - limit} more" if len(diff) > limit else "")


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


def load_checkpoint(folder: str | Path, expect: str | RunKey) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, progress) of the checkpoint in `folder`, None if there is none. `expect`: the run's
    fingerprint, or its RunKey (then a refusal names the settings that differ).

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
    key = expect if isinstance(expect, RunKey) else RunKey(expect)
    if progress.get("fingerprint") != key.fingerprint:
        if "settings" not in progress or not isinstance(expect, RunKey):
            why = "different model, data or config" + ("; it records no settings (written by an older bitdown)"
                                                       if isinstance(expect, RunKey) else "")
        else:
            diff = settings_diff(progress["settings"], key.settings)
            why = ("changed settings: " + summarise_diff(diff, 8) if diff
                   else "same settings, but different model weights, architecture or calibration data")
        raise ValueError(f"checkpoint {path} belongs to another run ({why}); pass the run's settings again to "
                         f"resume it, or delete it or choose another checkpoint folder to start over")
    return tensors, progress
