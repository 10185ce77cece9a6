"""Running compression on another device: `compress(..., device=)`, statistics that follow the
activations' device, EM on the CPU, and mixup in the distillation stream. The CUDA tests run only
where torch sees a GPU (the device machine; CI has none)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import bitdown
from bitdown.finetune import FinetuneConfig, mix_batch
from bitdown.modules import is_pq
from bitdown.stats import StatsCollector, collect_stats

from test_compress import LAYERS, assert_same_state, batches, cfg, images, make_net

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_explicit_cpu_device_is_the_default():
    a = bitdown.compress(make_net(), batches(), cfg(), progress=False)
    b = bitdown.compress(make_net(), batches(), cfg(), progress=False, device="cpu")
    assert_same_state(a, b)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA device"):
        bitdown.compress(make_net(), batches(), cfg(), progress=False, device="cuda")


def test_unknown_device_string_refused():
    with pytest.raises(RuntimeError):
        bitdown.compress(make_net(), batches(), cfg(), progress=False, device="not-a-device")


def test_stats_to_moves_every_tensor_and_collect_stats_returns_cpu():
    net = make_net()
    with StatsCollector("conv3", net.conv3, 4, full_gram=True, output_stats=True) as col, torch.no_grad():
        net(images(8))
    st = col.stats
    moved = st.to("cpu")
    for k in ("block_grams", "full_gram", "out_sum", "out_sqsum"):
        assert torch.equal(getattr(moved, k), getattr(st, k))
    assert (moved.n_rows, moved.n_images) == (st.n_rows, st.n_images)
    out = collect_stats(net, {"conv3": (net.conv3, 4)}, batches(16, 8))
    assert out["conv3"].block_grams.device.type == "cpu"


# ----------------------------------------------------------------------------- mixup


def test_mix_batch_deterministic_convex_and_off_at_zero():
    x = torch.randn(16, 3, 4, 4)
    assert mix_batch(x, 0.0, seed=1, step=3) is x
    a, b = mix_batch(x, 0.4, seed=1, step=3), mix_batch(x, 0.4, seed=1, step=3)
    assert torch.equal(a, b) and a.shape == x.shape
    assert not torch.equal(a, mix_batch(x, 0.4, seed=1, step=4))        # another step, another mix
    assert not torch.equal(a, x)
    # every mixed image is a convex combination of two images of the batch: within their range
    assert (a <= x.max(0).values + 1e-6).all() and (a >= x.min(0).values - 1e-6).all()
    one = torch.randn(1, 3, 4, 4)
    assert mix_batch(one, 0.4, 0, 0) is one                              # nothing to mix with


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_mixup_config_checked(bad):
    with pytest.raises(ValueError, match="mixup"):
        FinetuneConfig(mixup=bad)


def test_mixup_changes_training_and_stays_deterministic():
    x = images(64)
    def run(mix):
        ft = FinetuneConfig(layer_steps=2, global_steps=4, batch_size=16, mixup=mix)
        return bitdown.compress(make_net(), batches(), cfg(), progress=False, finetune=ft,
                                train_data=TensorDataset(x))
    a, b, c = run(0.4), run(0.4), run(0.0)
    assert_same_state(a, b)
    assert not torch.equal(a.conv3.codebook, c.conv3.codebook)


# ----------------------------------------------------------------------------- CUDA


@cuda
def test_compress_on_cuda_matches_cpu_and_leaves_the_model_alone(tmp_path):
    net = make_net()
    ft = FinetuneConfig(layer_steps=3, global_steps=6, batch_size=16)
    kw = dict(progress=False, finetune=ft, train_data=TensorDataset(images(64)))
    conf = cfg(em={"n_iter": 10, "teacher_target": True})
    q = bitdown.compress(net, batches(), conf, device="cuda", checkpoint_dir=tmp_path / "ck", **kw)
    assert all(p.device.type == "cpu" for p in net.parameters())          # the user's model did not move
    assert_same_state(net, make_net())
    assert {n for n, m in q.named_modules() if is_pq(m)} == set(LAYERS)
    assert all(t.device.type == "cuda" for t in q.state_dict().values())
    ref = bitdown.compress(make_net(), batches(), conf, **kw)
    path = bitdown.save(q, tmp_path / "m.bitdown")                        # saved straight from the GPU
    x = images(32, seed=5)
    with torch.no_grad():
        yc, yr, yt = q.cpu()(x), ref(x), net(x)
    err_cuda, err_cpu = (yc - yt).norm() / yt.norm(), (yr - yt).norm() / yt.norm()
    assert err_cuda < 1.5 * err_cpu + 0.02, (err_cuda, err_cpu)           # same quality as the CPU run
    same = [float((getattr(q, n).codes == getattr(ref, n).codes).float().mean()) for n in LAYERS]
    assert min(same) > 0.5, same                                           # mostly the same codes
    back = bitdown.load(path, make_net())                                 # and loads on the CPU
    with torch.no_grad():
        assert torch.allclose(back(x), yc, atol=1e-5)


@cuda
def test_resume_on_cuda(tmp_path, monkeypatch):
    ft = FinetuneConfig(global_steps=6, batch_size=16, checkpoint_every=2)
    kw = dict(progress=False, finetune=ft, train_data=TensorDataset(images(64)), device="cuda")
    full = bitdown.compress(make_net(), batches(), cfg(), **kw)
    seen, resumed = interrupted_then_resumed(tmp_path, monkeypatch, 5, **kw)
    assert seen == [4, 5]                                   # Adam state restored onto the GPU, 2 steps replayed
    for k, v in full.state_dict().items():                  # cuDNN backward is not bit-deterministic
        assert torch.allclose(v.float(), resumed.state_dict()[k].float(), atol=1e-4), k


@cuda
def test_evaluate_uses_the_model_device():
    from bitdown.evaluate import evaluate
    net = make_net().cuda()
    x, y = images(32), torch.randint(0, 10, (32,))
    res = evaluate(net, [(x, y)])
    assert res["n"] == 32


@cuda
def test_shared_codebooks_on_cuda():
    import test_share as ts
    q = bitdown.compress(ts.make_net(), ts.batches(), ts.cfg(share_same_shape=True), progress=False, device="cuda")
    owners = {id(m.codebook) for m in q.modules() if is_pq(m)}
    assert len(owners) < sum(1 for m in q.modules() if is_pq(m))          # some layers share one Parameter
    assert all(m.codebook.device.type == "cuda" for m in q.modules() if is_pq(m))


def test_stream_prefetch_yields_every_step_in_order():
    from bitdown.finetune import batch_at, stream
    ds = TensorDataset(images(40))
    got = list(stream(ds, 3, 9, 8, seed=2))
    assert [s for s, _ in got] == list(range(3, 9))
    for s, x in got:
        assert torch.equal(x, batch_at(ds, s, 8, 2))
    assert list(stream(ds, 5, 5, 8, seed=2)) == []


def interrupted_then_resumed(tmp_path, monkeypatch, stop_at: int, **kw):
    """A run killed at global step `stop_at`, then rerun: (steps the rerun trained, the resumed model)."""
    import importlib
    bf = importlib.import_module("bitdown.finetune")
    real, seen = bf._step, []

    def failing(*a):            # _step(student, teacher, x, opt, cfg, step, seed, n)
        if a[5] == stop_at:
            raise RuntimeError("interrupted")
        return real(*a)
    monkeypatch.setattr(bf, "_step", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        bitdown.compress(make_net(), batches(), cfg(), checkpoint_dir=tmp_path, **kw)
    monkeypatch.setattr(bf, "_step", lambda *a: seen.append(a[5]) or real(*a))
    resumed = bitdown.compress(make_net(), batches(), cfg(), checkpoint_dir=tmp_path, **kw)
    monkeypatch.setattr(bf, "_step", real)
    return seen, resumed


def test_mixup_resume_is_identical(tmp_path, monkeypatch):
    ft = FinetuneConfig(global_steps=6, batch_size=16, checkpoint_every=2, mixup=0.4)
    kw = dict(progress=False, finetune=ft, train_data=TensorDataset(images(64)))
    ref = bitdown.compress(make_net(), batches(), cfg(), **kw)
    seen, resumed = interrupted_then_resumed(tmp_path, monkeypatch, 5, **kw)
    assert seen == [4, 5]                                   # replayed from the step-4 checkpoint
    assert resumed.bitdown.extra["resumed"]["stage"] == "global"
    assert_same_state(resumed, ref)


def test_stream_stops_its_worker_when_the_loop_fails():
    from bitdown.finetune import stream

    class Counting(TensorDataset):
        calls = 0

        def __getitem__(self, i):
            Counting.calls += 1
            return super().__getitem__(i)
    ds = Counting(images(40))
    it = stream(ds, 0, 100, 8, seed=0)
    next(it)
    it.close()                                              # as `closing` does when the training step raises
    n = Counting.calls
    assert n <= 2 * 8                                       # at most the batch in flight was built
    import time
    time.sleep(0.05)
    assert Counting.calls == n                              # and nothing after
