"""Resume after a real kill: `bitdown compress --checkpoint-dir` is SIGKILLed mid-run, rerun with the
same command, and must write a file byte-identical to an uninterrupted run with the same seed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _tiny import tiny_workdir


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    return tiny_workdir(tmp_path, per_class=48, size=32)


def _cmd(out: str, ckpt: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "bitdown.cli", "compress", "--model", "tinymodel:tiny", "--data", "imgs",
           "--preprocess", "cifar10", "--out", out, "--calib-images", "64", "--seed", "3",
           "--finetune-steps", "3", "--global-steps", "60", "--ft-batch-size", "16", "--checkpoint-every", "5",
           "--config",
           '{"batch_size": 16, "bn_images": 64}']
    return cmd + (["--checkpoint-dir", ckpt] if ckpt else [])


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    return env


def test_kill_and_resume_is_byte_identical(workdir: Path) -> None:
    env = _env()
    ref = subprocess.run(_cmd("ref.bitdown", None), cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]

    state = workdir / "ck" / "state.safetensors"
    kills = 0
    for _ in range(2):  # kill twice: once during/after the layer stage, once in the global stage
        p = subprocess.Popen(_cmd("resumed.bitdown", "ck"), cwd=workdir, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = state.stat().st_mtime_ns if state.exists() else 0
        t0 = time.time()
        while time.time() - t0 < 600 and p.poll() is None:
            if state.exists() and state.stat().st_mtime_ns != before:
                time.sleep(0.3)
                break
            time.sleep(0.02)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
    assert kills >= 1, "the run finished before it could be killed: make it longer"
    assert state.exists()
    assert not (workdir / "resumed.bitdown").exists() or kills < 2
    cmd = _cmd("resumed.bitdown", "ck")
    cmd.insert(cmd.index("compress"), "--verbose")
    final = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    assert "resuming from ck" in final.stderr           # it did resume, it did not start over
    assert (workdir / "resumed.bitdown").read_bytes() == (workdir / "ref.bitdown").read_bytes()


def test_checkpoint_of_another_run_is_refused(workdir: Path) -> None:
    env = _env()
    first = subprocess.run(_cmd("a.bitdown", "ck"), cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    other = _cmd("b.bitdown", "ck")
    other[other.index("--seed") + 1] = "4"
    res = subprocess.run(other, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    assert "belongs to another run" in res.stderr
