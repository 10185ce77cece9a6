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
    16 calibration images: 3 on rank 0, 2 on rank 1, the last one short), with the default 4 gradient slices
    (batches of 15 and 7 rows: slices of unequal sizes). With the default K = 256 this random-weight model is
    compressed almost losslessly and its distillation loss (~1e-6) is rounding noise, which Adam's first,
    sign-like steps turn into other codebooks at the slightest float difference: the strictest case for equal
    results (before gradient slices: 98.6 % identical codes between 1 and 2 ranks)."""
    args = ["compress", "--model", "tinymodel:tiny", "--data", "imgs", "--preprocess", "cifar10", "--out", out,
            "--calib-images", "72", "--seed", str(seed), "--finetune-steps", "2", "--global-steps", str(global_steps),
            "--ft-batch-size", "15", "--checkpoint-every", "5",
            "--config", '{"batch_size": 16, "bn_images": 64}',
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
    """Fraction of identical codes over all layers, largest difference of the decoded weights and of any other
    tensor of the state (codebooks, BatchNorm), prediction agreement."""
    from bitdown.modules import is_pq
    from bitdown.size import size_report

    same = total = 0
    diff = 0.0
    for (_, m), (_, m2) in zip(a.named_modules(), b.named_modules()):
        if is_pq(m):
            same += int((m.codes == m2.codes).sum())
            total += m.codes.numel()
            diff = max(diff, float((m.dequantize() - m2.dequantize()).detach().abs().max()))
    sb = b.state_dict()
    state = max(float((v.double() - sb[k].double()).abs().max()) for k, v in a.state_dict().items() if v.numel())
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        agree = float((a(x).argmax(1) == b(x).argmax(1)).float().mean())
    return {"codes": same / total, "weight_diff": diff, "state_diff": state, "agreement": agree,
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
    # gradient slices: every float of the 2-rank file is the one-process file's (the issue asks >= 99 % codes)
    assert c["codes"] == 1.0 and c["weight_diff"] == 0 and c["state_diff"] == 0, c
    for stage in ("global_finetune", "reconstruct"):        # the losses and errors the stages reported too
        assert ref.bitdown.extra[stage] == two.bitdown.extra[stage], stage
    assert all(ref.bitdown.layers[k]["finetune"] == two.bitdown.layers[k]["finetune"] for k in ref.bitdown.layers)
    assert ref.bitdown.extra["calib_images"] == two.bitdown.extra["calib_images"] == 72
    # the finished 2-rank checkpoint, rerun by one process: nothing left to do, the same file
    _one_process(_args("two_again.bitdown", "ck2"), workdir)
    assert (workdir / "two_again.bitdown").read_bytes() == (workdir / "two.bitdown").read_bytes()


def test_torchrun_two_ranks_match_one_process_with_mixup_mse_qdrop_and_learned_codes(workdir: Path) -> None:
    """The paths the default recipe does not take: mixup (the whole batch mixed on every rank, then cut), the
    normalised MSE (the teacher energy gathered per slice), QDrop masks and learned (STE) codes in the block
    reconstruction: the 2-rank file still holds every tensor of the one-process file."""
    args = _args("OUT")
    args[args.index("--reconstruct") + 1] = '{"steps": 10, "batch_size": 7, "drop_prob": 0.5, "codes": "ste"}'
    args += ["--finetune-config", '{"mixup": 0.4}', "--distill-loss", "mse"]
    _one_process([a.replace("OUT", "one_x.bitdown") for a in args], workdir)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "bitdown", *[a.replace("OUT", "two_x.bitdown") for a in args]], cwd=workdir,
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = _load(workdir / "one_x.bitdown"), _load(workdir / "two_x.bitdown")
    c = _compare(one, two)
    assert c["codes"] == 1.0 and c["state_diff"] == 0 and c["ratio_a"] == c["ratio_b"], c
    assert one.bitdown.extra["reconstruct"] == two.bitdown.extra["reconstruct"]
    assert one.bitdown.extra["global_finetune"] == two.bitdown.extra["global_finetune"]


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
    assert dist.shard([1, 2, 3]) == [1, 2, 3] and dist.my_rows(7, 4) == slice(0, 7)
    assert dist.sum_slices(torch.tensor([[1.0, 2.0], [3.0, 4.0]])).tolist() == [4, 6]
    dist.check_same("k", "options")


def test_shard_interleave_and_gradient_slices(monkeypatch) -> None:
    items = list(range(11))
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    shards, mine = [], []
    for r in range(3):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        shards.append(dist.shard(items))
        mine.append(dist.my_slices(11, 6))
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert dist.interleave(shards) == items
    # the 6 slices of 11 rows are tensor_split's, whatever N; rank r holds slices 2r, 2r + 1
    assert [list(range(11))[s] for m in mine for s in m] == [c.tolist() for c in torch.arange(11).tensor_split(6)]
    assert dist.my_rows(11, 6) == slice(8, 11) and dist.slices(2, 4)[2:] == [slice(2, 2), slice(2, 2)]


def test_gradient_slices_the_processes_cannot_share_are_refused_before_any_work(monkeypatch) -> None:
    import importlib

    from bitdown.config import QuantConfig, ReconstructConfig
    from bitdown.finetune import FinetuneConfig

    def no_work(*a, **k):
        raise AssertionError("calibration started")
    C = importlib.import_module("bitdown.compress")       # the module (bitdown.compress is also the function)
    monkeypatch.setattr(C, "take_shard", no_work)
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    with pytest.raises(ValueError, match=r"fine-tuning: grad_slices=4 cannot be shared by 3 processes .* use a "
                                         r"multiple of 3, e\.g\. --grad-slices 12"):
        C.compress(model, [torch.rand(8, 3, 8, 8)], QuantConfig(), finetune=FinetuneConfig(global_steps=5))
    with pytest.raises(ValueError, match=r"block reconstruction: grad_slices=4 cannot be shared by 3 processes"):
        C.compress(model, [torch.rand(8, 3, 8, 8)], QuantConfig(reconstruct=ReconstructConfig(steps=5)))
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"grad_slices must be an integer >= 1, got {bad}"):
            FinetuneConfig(grad_slices=bad)
    with pytest.raises(ValueError, match="reconstruct grad_slices must be an integer >= 1, got 0"):
        ReconstructConfig(grad_slices=0)
    # a batch smaller than its slices: refused when the fine-tuning data is known, before the EM
    from bitdown.finetune import batch_rows
    monkeypatch.setattr(dist, "world_size", lambda: 1)
    with pytest.raises(ValueError, match=r"a batch of 3 images cannot be cut into grad_slices=4 gradient slices"):
        batch_rows(FinetuneConfig(layer_steps=1), torch.utils.data.TensorDataset(torch.rand(3, 3, 8, 8)))


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
    """The real CIFAR-10 ResNet-20, the default recipe (10 per-layer + 300 global distillation steps, the holdout
    guard, 512 calibration images), torchrun with 2 ranks vs one process, one thread per process in both.

    With the default gradient slices every distillation gradient is the same fixed sum of 4 slice gradients
    whatever the number of processes, so the issue's >= 99 % identical codes hold with fine-tuning (before:
    5.97 %, the fp32 sum of two half-batch gradients vs one full-batch backward, kept by Adam's sign-like first
    steps; docs/DESIGN.md, session 9), with the same ratio and top-1 on 2,000 held-out test images within 0.3 pt
    (measured: 100 % identical codes, 19/19 codebooks, top-1 80.75 vs 80.75 %).
    1 vs 2 *threads* is another matter (other float sums inside the convolutions): not compared here."""
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
    args = ["compress", "--model", "resnet20_cifar10", "--data", str(root / "cifar10-train-jpeg.zip"),
            "--calib-images", "512", "--seed", "0", "--finetune-steps", "10", "--global-steps", "300"]
    one = subprocess.run([sys.executable, "-m", "bitdown", *args, "--out", "one.bitdown"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "bitdown", *args, "--out", "two.bitdown"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=3600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = bitdown.load(tmp_path / "one.bitdown"), bitdown.load(tmp_path / "two.bitdown")
    pairs = [(m, m2) for (_, m), (_, m2) in zip(a.named_modules(), b.named_modules()) if is_pq(m)]
    same = sum(int((x.codes == y.codes).sum()) for x, y in pairs) / sum(x.codes.numel() for x, _ in pairs)
    cb = sum(torch.equal(x.codebook, y.codebook) for x, y in pairs)
    test = ImageDataset(root / "cifar10-test-jpeg.zip", "cifar10", labels="parent",
                        indices=split_indices(10000, [2000], 0)[0])
    top_a, top_b = evaluate(a, make_loader(test, 500))["top1"], evaluate(b, make_loader(test, 500))["top1"]
    print(f"default recipe: codes identical {same:.4f}, codebooks identical {cb}/{len(pairs)}, top-1 one process "
          f"{top_a:.2f} / two ranks {top_b:.2f}")
    assert size_report(a, a.bitdown.plans).ratio == size_report(b, b.bitdown.plans).ratio
    assert same >= 0.99, same
    assert abs(top_a - top_b) <= 0.3, (top_a, top_b)
