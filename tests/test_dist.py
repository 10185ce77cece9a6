"""Distributed compression (issue 14): `torchrun -m bitdown compress` with 2 gloo CPU ranks against one
process, a rank killed with SIGKILL (the other stops with a clear error, the checkpoint resumes with another
number of processes), ranks started with different options, and the sharding helpers in-process."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _tiny import tiny_workdir

from bitdown import dist

SRC = Path(__file__).resolve().parents[1] / "src"


def _args(out: str, ckpt: str | None = None, global_steps: int = 30, seed: int = 3) -> list[str]:
    """The default recipe cut down: EM, block reconstruction, per-layer and global distillation (5 batches of
    16 calibration images: 3 on rank 0, 2 on rank 1, the last one short). K = 8: with the default 256 this
    random-weight model is compressed almost losslessly, its distillation loss (~1e-6) is rounding noise that
    Adam's first, sign-like steps of the per-layer distillation turn into other codebooks (measured: 98.6 %
    identical codes between 1 and 2 ranks, 100 % with K = 8)."""
    args = ["compress", "--model", "tinymodel:tiny", "--data", "imgs", "--preprocess", "cifar10", "--out", out,
            "--calib-images", "72", "--seed", str(seed), "--finetune-steps", "2", "--global-steps", str(global_steps),
            "--ft-batch-size", "15", "--checkpoint-every", "5",
            "--config", '{"batch_size": 16, "bn_images": 64, "n_centroids": 8}',
            "--reconstruct", '{"steps": 10, "batch_size": 7}']
    return args + (["--checkpoint-dir", ckpt] if ckpt else [])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    return dict(env, OMP_NUM_THREADS="1", PYTHONPATH=str(SRC), **extra)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args_per_rank: list[list[str]], cwd: Path, **env: str) -> list[subprocess.Popen]:
    """Start one process per rank with the variables torchrun sets (no agent: what a rank does alone shows);
    rank r's stderr goes to cwd/rank{r}.err."""
    port, n = str(_free_port()), len(args_per_rank)
    return [subprocess.Popen([sys.executable, "-m", "bitdown", *a], cwd=cwd, stdout=subprocess.DEVNULL,
                             stderr=(cwd / f"rank{r}.err").open("w"),
                             env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env))
            for r, a in enumerate(args_per_rank)]


def _stderr(cwd: Path, r: int) -> str:
    return (cwd / f"rank{r}.err").read_text()[-3000:]


def _one_process(args: list[str], cwd: Path) -> None:
    """`bitdown ...` in this process (no torchrun: no process group)."""
    from bitdown.cli import main

    old = Path.cwd()
    os.chdir(cwd)
    sys.path.insert(0, str(cwd))
    try:
        assert main(args) == 0
    finally:
        sys.path.remove(str(cwd))
        os.chdir(old)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Images, the model, and the one-process reference file ref.bitdown."""
    root = tiny_workdir(tmp_path_factory.mktemp("dist"), per_class=40, size=16)
    torch.set_num_threads(1)
    _one_process(_args("ref.bitdown"), root)
    return root


def _load(path: Path):
    import bitdown

    sys.path.insert(0, str(path.parent))
    try:
        from tinymodel import tiny
        return bitdown.load(path, tiny())
    finally:
        sys.path.remove(str(path.parent))


def _compare(a, b) -> dict[str, float]:
    """Fraction of identical codes over all layers, largest codebook difference, prediction agreement."""
    from bitdown.modules import is_pq
    from bitdown.size import size_report

    same = total = 0
    diff = 0.0
    for (_, m), (_, m2) in zip(a.named_modules(), b.named_modules()):
        if is_pq(m):
            same += int((m.codes == m2.codes).sum())
            total += m.codes.numel()
            diff = max(diff, float((m.dequantize() - m2.dequantize()).detach().abs().max()))
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        agree = float((a(x).argmax(1) == b(x).argmax(1)).float().mean())
    return {"codes": same / total, "weight_diff": diff, "agreement": agree,
            "ratio_a": size_report(a, a.bitdown.plans).ratio, "ratio_b": size_report(b, b.bitdown.plans).ratio}


def test_torchrun_two_ranks_match_one_process_and_resume_with_one(workdir: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "bitdown", "-v", *_args("two.bitdown", "ck2")], cwd=workdir, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[rank 1/2] bitdown.compress: calibration: 72 images in 2 batches on this rank" in run.stderr
    assert "[rank 0/2] bitdown.compress: calibration: 72 images in 3 batches on this rank" in run.stderr
    assert run.stderr.count("0/30 [00:00<?, ?step/s]") == 1 and run.stdout.count("ratio") == 1   # bar, summary: rank 0
    ref, two = _load(workdir / "ref.bitdown"), _load(workdir / "two.bitdown")
    c = _compare(ref, two)
    assert c["ratio_a"] == c["ratio_b"]
    assert c["codes"] >= 0.99, c
    assert c["weight_diff"] < 0.05 and c["agreement"] >= 0.95, c
    assert ref.bitdown.extra["calib_images"] == two.bitdown.extra["calib_images"] == 72
    # the finished 2-rank checkpoint, rerun by one process: nothing left to do, the same file
    _one_process(_args("two_again.bitdown", "ck2"), workdir)
    assert (workdir / "two_again.bitdown").read_bytes() == (workdir / "two.bitdown").read_bytes()


def _progress(ckpt: Path) -> dict | None:
    from safetensors import safe_open

    try:
        with safe_open(str(ckpt / "state.safetensors"), framework="pt") as f:
            return json.loads(f.metadata()["progress"])
    except Exception:
        return None


def test_killed_rank_stops_the_other_with_a_clear_error_and_one_process_resumes(workdir: Path) -> None:
    args = _args("killed.bitdown", "ck_kill", global_steps=60)
    procs = _launch([args, args], workdir, BITDOWN_DIST_TIMEOUT="60")
    t0 = time.time()
    while time.time() - t0 < 300 and all(p.poll() is None for p in procs):
        prog = _progress(workdir / "ck_kill")
        if prog is not None and prog["stage"] == "global" and prog["step"] >= 5:
            break
        time.sleep(0.05)
    if not all(p.poll() is None for p in procs):
        for p in procs:
            p.kill()
            p.wait()
        pytest.fail("a rank ended before it could be killed: " + _stderr(workdir, 0))
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    procs[0].wait(timeout=120)
    assert time.time() - killed_at < 60
    procs[1].wait()
    err = _stderr(workdir, 0)
    assert procs[0].returncode == 1, err
    assert "error: rank 0 of 2:" in err and "another rank stopped" in err and "resumes" in err, err
    prog = _progress(workdir / "ck_kill")                  # intact, and from the middle of the global stage
    assert prog is not None and prog["stage"] == "global" and 5 <= prog["step"] < 60
    # resumed by one process: the 2-rank statistics and codes, then the rest of the same batch stream
    _one_process(args, workdir)
    c = _compare(_load(workdir / "ref.bitdown"), _load(workdir / "killed.bitdown"))
    assert c["codes"] >= 0.99 and c["ratio_a"] == c["ratio_b"], c


def test_ranks_started_with_other_options_are_refused(workdir: Path) -> None:
    procs = _launch([_args("x.bitdown"), _args("x.bitdown", seed=4)], workdir, BITDOWN_DIST_TIMEOUT="60")
    for r, p in enumerate(procs):
        p.wait(timeout=300)
        err = _stderr(workdir, r)
        assert p.returncode == 2, err
        assert "ranks [1] were started with other command-line options than rank 0" in err, err[-2000:]
    assert not (workdir / "x.bitdown").exists()


# ----------------------------------------------------------------------------- in-process helpers

def test_without_torchrun_every_hook_is_a_no_op(monkeypatch) -> None:
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert not dist.active() and not dist.launched() and dist.is_main() and dist.world_size() == 1
    assert dist.init("cpu") == torch.device("cpu") and not dist.active()
    t = torch.arange(4.0)
    dist.all_reduce_([t])
    assert t.tolist() == [0, 1, 2, 3]
    obj = {"a": 1}
    assert dist.broadcast_object(obj) is obj and dist.on_main(lambda: obj, "x") is obj
    assert dist.shard([1, 2, 3]) == [1, 2, 3] and dist.part(7) == slice(0, 7)
    dist.check_same("k", "options")


def test_shard_part_interleave(monkeypatch) -> None:
    items = list(range(11))
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    shards, parts = [], []
    for r in range(3):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        shards.append(dist.shard(items))
        parts.append(dist.part(11))
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert dist.interleave(shards) == items
    assert [list(range(11))[p] for p in parts] == [list(c) for c in torch.arange(11).tensor_split(3)]


def test_more_processes_than_calibration_batches_is_a_clear_error(monkeypatch) -> None:
    from bitdown.compress import take_shard

    monkeypatch.setattr(dist, "world_size", lambda: 4)
    with pytest.raises(ValueError, match=r"4 processes, but the 40 calibration images make only 3 batches of 16: "
                                         r"each process needs one; start at most 3 processes"):
        take_shard([torch.rand(40, 3, 4, 4)], 64, 16)


def test_log_lines_name_the_rank(monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    handler = logging.StreamHandler()
    dist.install_log_filter([handler])
    handler.setFormatter(logging.Formatter(dist.log_format()))
    rec = logging.LogRecord("bitdown.x", logging.INFO, __file__, 1, "hello", None, None)
    handler.filter(rec)
    assert handler.format(rec) == "INFO [rank 1/2] bitdown.x: hello"


def test_timeout_setting(monkeypatch) -> None:
    monkeypatch.setenv(dist.TIMEOUT_ENV, "12.5")
    assert dist.timeout_s() == 12.5
    monkeypatch.setenv(dist.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="BITDOWN_DIST_TIMEOUT='soon' is not a number"):
        dist.timeout_s()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")
def test_nccl_one_rank_on_cuda(workdir: Path) -> None:
    """`torchrun --nproc-per-node 1 ... --device cuda`: an NCCL group of one, every collective on the GPU."""
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                          "-m", "bitdown", "-v", *_args("cuda.bitdown"), "--device", "cuda"], cwd=workdir,
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "(nccl, local rank 0, cuda:0)" in run.stderr
    c = _compare(_load(workdir / "ref.bitdown"), _load(workdir / "cuda.bitdown"))
    assert c["ratio_a"] == c["ratio_b"] and c["codes"] >= 0.9, c       # TF32 statistics: close, not identical


@pytest.mark.slow
def test_real_resnet20_two_ranks_match_one(tmp_path: Path) -> None:
    """The real CIFAR-10 ResNet-20, torchrun with 2 ranks vs one process, one thread per process in both.

    What is rank-count-independent, and asserted: the EM (float64 statistics summed over the ranks): 100 %
    identical codes and codebooks; the ratio. What is not: the per-layer distillation. Its gradient under 2
    ranks is g(rows 0..31) + g(rows 32..63) in fp32, in one process one backward over 64 rows: other float
    sums (~1e-7 relative), which Adam's first, sign-like steps keep, and which now and then put a codeword on
    the other side of an int8 rounding boundary; every later layer's EM then starts from other inputs and, its
    codeword labels being arbitrary, ends with other codes (measured, 256 images, 10 per-layer steps: 100 %
    identical without the holdout, with it the first codebook difference is one quantum (0.00256) at layer
    2.1.conv2, then 55 %, 6 %, ~1 % identical codes downstream, 20 % overall; a one-process run computing the
    gradient as that same sum of the two half-batch slices reproduces the 2-rank file). So for the default
    recipe (10 per-layer + 300 global steps, 512 images): the same ratio and top-1 on 2,000 held-out test
    images within 0.3 pt (the issue's bound) (measured 80.55 vs 80.45; 1 vs 2 threads in one process: 80.3 vs 80.0), not
    identical codes (measured 5.97 %)."""
    import bitdown
    from bitdown.assets import assets_dir
    from bitdown.data import ImageDataset, make_loader, split_indices
    from bitdown.evaluate import evaluate
    from bitdown.modules import is_pq
    from bitdown.size import size_report

    root = assets_dir() / "cifar10"
    if not (root / "cifar10-train-jpeg.zip").exists():
        pytest.skip(f"CIFAR-10 assets not found under {root}")
    env = _env(OMP_WAIT_POLICY="PASSIVE")

    def both(tag: str, *extra: str):
        args = ["compress", "--model", "resnet20_cifar10", "--data", str(root / "cifar10-train-jpeg.zip"),
                "--calib-images", "512", "--seed", "0", *extra]
        one = subprocess.run([sys.executable, "-m", "bitdown", *args, "--out", f"{tag}-one.bitdown"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600)
        assert one.returncode == 0, one.stderr[-3000:]
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                              "2", "-m", "bitdown", *args, "--out", f"{tag}-two.bitdown"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=3600)
        assert two.returncode == 0, two.stderr[-3000:]
        a, b = bitdown.load(tmp_path / f"{tag}-one.bitdown"), bitdown.load(tmp_path / f"{tag}-two.bitdown")
        pairs = [(m, m2) for (_, m), (_, m2) in zip(a.named_modules(), b.named_modules()) if is_pq(m)]
        same = sum(int((x.codes == y.codes).sum()) for x, y in pairs) / sum(x.codes.numel() for x, _ in pairs)
        cb = all(torch.equal(x.codebook, y.codebook) for x, y in pairs)
        assert size_report(a, a.bitdown.plans).ratio == size_report(b, b.bitdown.plans).ratio
        return a, b, same, cb

    a, b, same, cb = both("em", "--finetune-steps", "0", "--global-steps", "0")
    print(f"EM only: codes identical {same:.4f}, codebooks identical {cb}")
    assert same == 1.0 and cb
    a, b, same, _ = both("ft", "--finetune-steps", "10", "--global-steps", "300")
    test = ImageDataset(root / "cifar10-test-jpeg.zip", "cifar10", labels="parent",
                        indices=split_indices(10000, [2000], 0)[0])
    top_a, top_b = evaluate(a, make_loader(test, 500))["top1"], evaluate(b, make_loader(test, 500))["top1"]
    print(f"default recipe: codes identical {same:.4f}, top-1 one process {top_a:.2f} / two ranks {top_b:.2f}")
    assert abs(top_a - top_b) <= 0.3, (top_a, top_b)
