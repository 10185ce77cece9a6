"""The pipeline `bitdown.compress`: sequential statistics, forward order, errors, determinism, resume,
BatchNorm re-estimation, and distillation fine-tuning (per layer and global)."""

from __future__ import annotations

import copy
import logging
import math
import importlib

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import bitdown
from bitdown import QuantConfig
from bitdown.compress import recalibrate_bn
from bitdown.finetune import FinetuneConfig, distill_loss, finetune_global, finetune_layer
from bitdown.modules import is_pq, quantize_module
from bitdown.stats import StatsCollector, run_until

bc = importlib.import_module("bitdown.compress")   # the module (bitdown.compress is also the function)
bf = importlib.import_module("bitdown.finetune")


class Net(nn.Module):
    """stem conv + three quantizable convs (3x3 strided, 3x3, 1x1) with BatchNorm + a linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.conv4 = nn.Conv2d(16, 32, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        x = torch.relu(self.bn4(self.conv4(x)))
        return self.fc(x.mean((2, 3)))


LAYERS = ["conv2", "conv3", "conv4", "fc"]


def make_net(seed=0):
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():   # non-trivial BatchNorm statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def images(n=64, seed=0):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def batches(n=64, bs=32, seed=0):
    return list(images(n, seed).split(bs))


CFG = dict(em={"n_iter": 10}, calib_images=64, batch_size=32, bn_images=64)


def cfg(**kw):
    return QuantConfig(**{**CFG, **kw})


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def record_kmeans(monkeypatch, fail_on: int | None = None):
    """Wrap compress.kmeans: records (weight shape, block_grams) per call; raises on call `fail_on`."""
    calls = []
    real = bc.kmeans

    def wrapped(weight, block_grams, *a, **kw):
        calls.append((tuple(weight.shape), block_grams.clone()))
        if fail_on is not None and len(calls) == fail_on:
            raise RuntimeError("interrupted")
        return real(weight, block_grams, *a, **kw)

    monkeypatch.setattr(bc, "kmeans", wrapped)
    return calls


# ----------------------------------------------------------------------------- basics


def test_compress_result():
    net = make_net()
    before = copy.deepcopy(net.state_dict())
    q = bitdown.compress(net, batches(), cfg(), progress=False)
    assert q is not net
    assert_same_state(net, make_net())                      # the original model is untouched
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert not any(is_pq(m) for m in net.modules())
    assert [p.name for p in q.bitdown.plans] == LAYERS
    assert {n for n, m in q.named_modules() if is_pq(m)} == set(LAYERS)
    assert q.bitdown.skipped == {"conv1": "stem conv (quantize_stem=False)"}
    assert not q.training
    for name in LAYERS:
        layer = getattr(q, name)
        assert torch.equal(layer.codebook, layer.codebook.half().float())   # fp16-exact, like the file
        assert 0 < q.bitdown.layers[name]["rel_error"] < 1
    assert q.bitdown.extra["calib_images"] == 64
    x = images(8, seed=1)
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()


def test_inplace():
    net = make_net()
    ref = bitdown.compress(make_net(), batches(), cfg(), progress=False)
    q = bitdown.compress(net, batches(), cfg(), inplace=True, progress=False)
    assert q is net and is_pq(net.conv2)
    assert_same_state(q, ref)          # teacher targets still come from the original weights


def test_data_forms_are_equivalent():
    x = images()
    a = bitdown.compress(make_net(), list(x.split(32)), cfg(), progress=False)
    b = bitdown.compress(make_net(), DataLoader(TensorDataset(x, torch.zeros(64)), batch_size=16), cfg(),
                         progress=False)
    c = bitdown.compress(make_net(), [{"image": x}], cfg(), progress=False)
    assert_same_state(a, b)
    assert_same_state(a, c)


def test_deterministic_given_seed():
    a = bitdown.compress(make_net(), batches(), cfg(seed=3), progress=False)
    b = bitdown.compress(make_net(), batches(), cfg(seed=3), progress=False)
    assert_same_state(a, b)
    c = bitdown.compress(make_net(), batches(), cfg(seed=4), progress=False)
    assert any(not torch.equal(getattr(a, n).codebook, getattr(c, n).codebook) for n in LAYERS)


def test_statistics_are_sequential(monkeypatch):
    """Layer conv3's statistics come from the student whose conv2 is already quantized."""
    teacher = make_net()
    calls = record_kmeans(monkeypatch)
    x = batches()
    q = bitdown.compress(teacher, x, cfg(bn_recalibrate=False), progress=False)
    assert [c[0] for c in calls] == [(16, 8, 3, 3), (16, 16, 3, 3), (32, 16, 1, 1), (10, 32)]
    conv3_grams = calls[1][1]

    def conv3_stats(model):
        with StatsCollector("conv3", model.conv3, 9) as col:
            run_until(model, x, model.conv3)
        return col.stats.block_grams

    from_teacher = conv3_stats(teacher)
    assert not torch.allclose(conv3_grams, from_teacher, rtol=1e-3)
    partial = copy.deepcopy(teacher)
    quantize_module(partial.conv2, q.conv2.codebook, q.conv2.codes)   # only the upstream layer quantized
    # (compress takes the block Grams from the full Gram's diagonal: float32 products summed another way)
    torch.testing.assert_close(conv3_grams, conv3_stats(partial), rtol=1e-5, atol=1e-6)
    # and the first quantized layer's statistics are the teacher's
    with StatsCollector("conv2", teacher.conv2, 9) as col:
        run_until(teacher, x, teacher.conv2)
    torch.testing.assert_close(calls[0][1], col.stats.block_grams, rtol=1e-5, atol=1e-6)


class Reordered(nn.Module):
    """Registered fc, late, early; forward runs early -> mid -> late -> fc. `unused` is never called."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 10)
        self.late = nn.Conv2d(16, 32, 1)
        self.unused = nn.Linear(32, 32)
        self.mid = nn.Conv2d(8, 16, 3, padding=1)
        self.early = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.early(x))
        x = torch.relu(self.mid(x))
        x = torch.relu(self.late(x))
        return self.fc(x.mean((2, 3)))


def test_forward_order(monkeypatch):
    torch.manual_seed(0)
    calls = record_kmeans(monkeypatch)
    q = bitdown.compress(Reordered(), batches(), cfg(), progress=False)
    assert [p.name for p in q.bitdown.plans] == ["mid", "late", "fc"]
    assert [c[0] for c in calls] == [(16, 8, 3, 3), (32, 16, 1, 1), (10, 32)]
    assert "stem" in q.bitdown.skipped["early"] and not is_pq(q.early)    # the stem is the first *called* conv
    assert "not called" in q.bitdown.skipped["unused"] and not is_pq(q.unused)


def test_bn_recalibration():
    x = batches()
    q = bitdown.compress(make_net(), x, cfg(bn_recalibrate=True), progress=False)
    plain = bitdown.compress(make_net(), x, cfg(bn_recalibrate=False), progress=False)
    auto = bitdown.compress(make_net(), x, cfg(), progress=False)      # teacher targets: statistics kept
    teacher = make_net()
    kept = teacher.bn3.running_mean.half().float()       # the file stores BatchNorm statistics in fp16
    assert torch.equal(plain.bn3.running_mean, kept)
    assert torch.equal(auto.bn3.running_mean, kept)
    paper = bitdown.compress(make_net(), x, cfg(em=bitdown.EMConfig.paper(n_iter=5)), progress=False)
    assert not torch.allclose(paper.bn3.running_mean, teacher.bn3.running_mean)   # paper EM: re-estimated
    assert not torch.allclose(q.bn3.running_mean, teacher.bn3.running_mean)
    # the re-estimated statistics are those of the quantized network on the data
    again = copy.deepcopy(plain)
    assert recalibrate_bn(again, x) == 4
    for bn in ("bn1", "bn2", "bn3", "bn4"):                     # q's statistics are rounded to fp16 (the file's)
        torch.testing.assert_close(getattr(again, bn).running_var, getattr(q, bn).running_var, rtol=1e-3, atol=1e-4)
    with torch.no_grad():                                      # the stem's BN sees the true batch mean
        ref = torch.cat([q.conv1(b) for b in x]).mean((0, 2, 3))
    torch.testing.assert_close(q.bn1.running_mean, ref, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_rejected(value):
    net = make_net()
    with torch.no_grad():
        net.conv3.weight[0, 0, 0, 0] = value
    with pytest.raises(ValueError, match=r"'conv3.weight'.*non-finite"):
        bitdown.compress(net, batches(), cfg(), progress=False)


def test_non_finite_images_rejected():
    x = images()
    x[5, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        bitdown.compress(make_net(), [x], cfg(), progress=False)


def test_non_finite_activations_rejected():
    net = make_net()
    with torch.no_grad():
        net.bn2.running_var[3] = -1.0        # sqrt of a negative variance: NaN activations after bn2
    with pytest.raises(ValueError, match=r"non-finite.*'conv3'"):
        bitdown.compress(net, batches(), cfg(), progress=False)


def test_too_few_calibration_samples():
    # fc: 16 centroids but one image gives 1 row x 8 blocks = 8 subvector samples
    with pytest.raises(ValueError, match=r"layer 'fc'.*16 centroids.*at least 2 images"):
        bitdown.compress(make_net(), [images(1)], cfg(), progress=False)


class Selected(nn.Module):
    """A linear layer on the positions whose first channel is positive: its rows per image depend on the image."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 64)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)                  # (N, HW, 4)
        return self.fc(t[t[..., 0] > 0]).sum(0, keepdim=True)


def test_too_few_samples_found_by_the_statistics_uses_the_same_rule():
    net = Selected().eval()
    with torch.no_grad():
        net.stem.weight.zero_()
        net.stem.bias.zero_()
        net.stem.weight[0, 0, 0, 0] = 1.0                           # channel 0 of the stem = channel 0 of x
    x = -torch.ones(8, 3, 4, 4)
    x[0, 0, 0, :] = 1.0                 # image 0: 4 selected positions; the others: none
    plan = bc.LayerPlan("fc", "linear", (64, 4), block_size=4, n_centroids=8)
    assert bc.min_calib_images(plan, 4, 1) == 2 and bc.min_calib_images(plan, 4, 8) == 16
    bc.check_samples(plan, 8, 1, 1)
    # the probe sees one (N, 4) row per image, so 8 images pass it; the statistics find 4 samples in all
    with pytest.raises(ValueError, match=r"8 calibration images are too few: layer 'fc'.*8 centroids \(4 from 8 "
                                         r"images\), i.e. at least 16 images"):
        bitdown.compress(net, [x], cfg(n_centroids=8, calib_images=8), progress=False)
    with pytest.raises(ValueError, match=r"7 calibration images are too few: layer 'fc'.*\(1 from 1 image\), i.e. "
                                         r"at least 8 images"):                   # the probe, before any work
        bitdown.compress(net, [x[:7]], cfg(n_centroids=8, calib_images=7), progress=False)


def test_empty_data():
    with pytest.raises(ValueError, match="empty"):
        bitdown.compress(make_net(), [], cfg(), progress=False)
    with pytest.raises(ValueError, match="empty"):
        bitdown.compress(make_net(), DataLoader(TensorDataset(torch.zeros(0, 3, 8, 8)), batch_size=4), cfg(),
                         progress=False)


def test_non_float_images_rejected():
    with pytest.raises(TypeError, match="float"):
        bitdown.compress(make_net(), [torch.zeros(4, 3, 8, 8, dtype=torch.uint8)], cfg(), progress=False)


def test_model_without_quantizable_layers():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten())
    with pytest.raises(ValueError, match="no Conv2d or Linear"):
        bitdown.compress(model, batches(), cfg(), progress=False)


def test_already_quantized_model_rejected():
    q = bitdown.compress(make_net(), batches(), cfg(), progress=False)
    with pytest.raises(ValueError, match="already"):
        bitdown.compress(q, batches(), cfg(), progress=False)


# ----------------------------------------------------------------------------- resume


def test_resume_after_interruption_is_identical(monkeypatch, tmp_path):
    ref = bitdown.compress(make_net(), batches(), cfg(), progress=False)
    ref_file = bitdown.save(ref, tmp_path / "ref.bitdown")

    ck = tmp_path / "ck"
    calls = record_kmeans(monkeypatch, fail_on=3)
    with pytest.raises(RuntimeError, match="interrupted"):
        bitdown.compress(make_net(), batches(), cfg(), checkpoint_dir=ck, progress=False)
    assert len(calls) == 3 and (ck / "state.safetensors").exists()

    calls = record_kmeans(monkeypatch)
    resumed = bitdown.compress(make_net(), batches(), cfg(), checkpoint_dir=ck, progress=False)
    assert [c[0] for c in calls] == [(32, 16, 1, 1), (10, 32)]     # only the layers not done yet
    assert resumed.bitdown.extra["resumed"]["layers"] == 2
    assert_same_state(resumed, ref)
    assert bitdown.save(resumed, tmp_path / "resumed.bitdown").read_bytes() == ref_file.read_bytes()

    calls = record_kmeans(monkeypatch)                              # a finished run: nothing left to do
    again = bitdown.compress(make_net(), batches(), cfg(), checkpoint_dir=ck, progress=False)
    assert calls == []
    assert_same_state(again, ref)


def test_checkpoint_of_another_config_refused(monkeypatch, tmp_path):
    record_kmeans(monkeypatch, fail_on=2)
    with pytest.raises(RuntimeError, match="interrupted"):
        bitdown.compress(make_net(), batches(), cfg(), checkpoint_dir=tmp_path, progress=False)
    monkeypatch.undo()
    for other, named in ((cfg(seed=1), "quant.seed: 0 in the checkpoint, 1 now"),     # the refusal names the key
                         (cfg(preset="large"), 'quant.preset: "small" in the checkpoint, "large" now'),
                         (cfg(em={"n_iter": 11}), "quant.em.n_iter: ")):
        with pytest.raises(ValueError, match="belongs to another run") as e:
            bitdown.compress(make_net(), batches(), other, checkpoint_dir=tmp_path, progress=False)
        assert named in str(e.value)
    with pytest.raises(ValueError, match="belongs to another run.*same settings, but different model"):  # another model
        bitdown.compress(make_net(seed=1), batches(), cfg(), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="belongs to another run"):        # other data
        bitdown.compress(make_net(), batches(seed=1), cfg(), checkpoint_dir=tmp_path, progress=False)


def test_checkpoint_of_other_data_beyond_first_batch_refused(monkeypatch, tmp_path):
    x = images()
    record_kmeans(monkeypatch, fail_on=2)
    with pytest.raises(RuntimeError, match="interrupted"):
        bitdown.compress(make_net(), list(x.split(32)), cfg(), checkpoint_dir=tmp_path, progress=False)
    monkeypatch.undo()
    other = x.clone()
    other[40:] += 1.0                                        # same first batch, different second batch
    with pytest.raises(ValueError, match="belongs to another run"):
        bitdown.compress(make_net(), list(other.split(32)), cfg(), checkpoint_dir=tmp_path, progress=False)


def test_unreadable_checkpoint_refused(tmp_path):
    (tmp_path / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable"):
        bitdown.compress(make_net(), batches(), cfg(), checkpoint_dir=tmp_path, progress=False)


# ----------------------------------------------------------------------------- fine-tuning


def loss_on(model, teacher, x):
    with torch.no_grad():
        return float(distill_loss(model(x), teacher(x)))


def coarse_student(teacher, layers=("conv3",), k=2):
    """The teacher with `layers` quantized to k centroids (codebook from a few rows of the weight)."""
    student = copy.deepcopy(teacher)
    for name in layers:
        layer = getattr(student, name)
        w = layer.weight.detach()
        d = 9 if layer.weight.dim() == 4 and layer.kernel_size == (3, 3) else 4
        sub = w.reshape(-1, d)
        cb = sub[torch.linspace(0, sub.shape[0] - 1, k).long()].clone()
        codes = torch.cdist(sub, cb).argmin(1).reshape(w.shape[0], -1)
        quantize_module(layer, cb, codes)
    return student.eval()


def test_layer_finetune_lowers_loss_and_touches_only_that_codebook():
    teacher = make_net()
    student = coarse_student(teacher, ("conv2", "conv3"))
    x = images(64)
    before = copy.deepcopy(student.state_dict())
    loss0 = loss_on(student, teacher, x)
    res = finetune_layer(student, teacher, student.conv3, TensorDataset(x),
                         FinetuneConfig(layer_steps=30, batch_size=32, layer_lr=1e-2))
    assert loss_on(student, teacher, x) < 0.9 * loss0
    assert res["last_loss"] < res["first_loss"]
    after = student.state_dict()
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert changed == ["conv3.codebook"]
    assert all(p.requires_grad for p in student.parameters())             # flags restored
    assert all(p.grad is None or k == "conv3.codebook" for k, p in student.named_parameters())


def test_layer_finetune_needs_a_pq_layer():
    teacher = make_net()
    with pytest.raises(TypeError, match="product-quantized"):
        finetune_layer(copy.deepcopy(teacher), teacher, teacher.conv3, TensorDataset(images(8)),
                       FinetuneConfig(layer_steps=1))


@pytest.mark.parametrize("bn_affine,bias", [(True, False), (False, False), (False, True)])
def test_global_finetune(bn_affine, bias):
    teacher = make_net()
    student = coarse_student(teacher, ("conv2", "conv3", "conv4", "fc"), k=4)
    x = images(64)
    before = copy.deepcopy(student.state_dict())
    loss0 = loss_on(student, teacher, x)
    cfg_ft = FinetuneConfig(global_steps=30, batch_size=32, global_lr=1e-2, train_bn_affine=bn_affine,
                            train_bias=bias)
    res = finetune_global(student, teacher, TensorDataset(x), cfg_ft, progress=False)
    assert res["steps"] == 30 and res["images_seen"] == 30 * 32
    assert loss_on(student, teacher, x) < 0.8 * loss0
    after = student.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    trainable = {"conv2.codebook", "conv3.codebook", "conv4.codebook", "fc.codebook"}
    if bn_affine:
        trainable |= {f"bn{i}.{p}" for i in range(1, 5) for p in ("weight", "bias")}
    if bias:
        trainable.add("fc.bias")       # the compressed layers' biases (the convs here have none)
    assert changed == trainable        # running statistics, the stem and the biases otherwise stay as they were


def test_compress_with_finetune():
    x = images()
    plain = bitdown.compress(make_net(), list(x.split(32)), cfg(n_centroids=4), progress=False)
    ft = FinetuneConfig(layer_steps=4, global_steps=12, batch_size=32, holdout=0)    # the guard: tests below
    tuned = bitdown.compress(make_net(), list(x.split(32)), cfg(n_centroids=4), progress=False,
                             finetune=ft, train_data=TensorDataset(x))
    teacher = make_net()
    assert loss_on(tuned, teacher, x) < loss_on(plain, teacher, x)
    for name in LAYERS:
        assert set(tuned.bitdown.layers[name]["finetune"]) == {"first_loss", "last_loss"}
        assert torch.equal(getattr(tuned, name).codebook, getattr(tuned, name).codebook.half().float())
    assert tuned.bitdown.extra["global_finetune"]["steps"] == 12
    # BN affine trained in the global stage
    assert not torch.equal(tuned.bn2.weight, teacher.bn2.weight)


def test_finetune_without_train_data_on_batch_list():
    try:
        q = bitdown.compress(make_net(), batches(), cfg(), progress=False,
                             finetune=FinetuneConfig(layer_steps=2, batch_size=16))
    except (ValueError, TypeError) as e:          # a clear error is acceptable too
        assert "train_data" in str(e)
    else:
        assert all(is_pq(getattr(q, n)) for n in LAYERS)


def fail_at_global_step(monkeypatch, fail_step: int) -> list[int]:
    """finetune._step raises at step `fail_step` (an interruption); returns the list of steps it was called with."""
    real_step = bf._step
    seen = []

    def failing(student, teacher, xb, opt, ft_cfg, step, seed, n):
        seen.append(step)
        if step == fail_step:
            raise RuntimeError("interrupted")
        return real_step(student, teacher, xb, opt, ft_cfg, step, seed, n)

    monkeypatch.setattr(bf, "_step", failing)
    return seen


def test_global_finetune_resume_is_identical(monkeypatch, tmp_path):
    x = images()
    ft = FinetuneConfig(global_steps=8, batch_size=16, checkpoint_every=3)
    data = list(x.split(32))
    ref = bitdown.compress(make_net(), data, cfg(), progress=False, finetune=ft, train_data=TensorDataset(x),
                           checkpoint_dir=tmp_path / "a")

    real_step = bf._step
    seen = fail_at_global_step(monkeypatch, 7)
    with pytest.raises(RuntimeError, match="interrupted"):
        bitdown.compress(make_net(), data, cfg(), progress=False, finetune=ft, train_data=TensorDataset(x),
                         checkpoint_dir=tmp_path / "b")
    seen.clear()
    monkeypatch.setattr(bf, "_step", lambda *a: seen.append(a[5]) or real_step(*a))      # a[5]: the step
    resumed = bitdown.compress(make_net(), data, cfg(), progress=False, finetune=ft, train_data=TensorDataset(x),
                               checkpoint_dir=tmp_path / "b")
    assert seen == [6, 7]                                  # resumed from the step-6 checkpoint
    assert resumed.bitdown.extra["resumed"]["stage"] == "global"
    assert_same_state(resumed, ref)


# ----------------------------------------------------------------------------- holdout guard (issue 16 item 3)

HURT = dict(global_steps=20, batch_size=16, global_lr=0.5, holdout=16)   # a learning rate far too high


def test_holdout_guard_returns_the_model_from_before_a_harmful_global_stage(tmp_path, caplog):
    x = images(96)
    data = list(x[:64].split(32))
    plain = bitdown.compress(make_net(), data, cfg(), progress=False)        # = the state before the global stage
    ft = FinetuneConfig(**HURT)
    with caplog.at_level(logging.WARNING, logger="bitdown.finetune"):
        q = bitdown.compress(make_net(), data, cfg(), progress=False, finetune=ft, train_data=TensorDataset(x))
    h = q.bitdown.extra["global_finetune"]["holdout"]
    assert h["kept"] == "before" and h["n"] == 16
    assert h["loss_after"] > h["loss_before"] and h["agreement_after"] <= h["agreement_before"]
    assert_same_state(q, plain)                                   # not worse on the holdout: exactly as before
    _, hold = bf.split_holdout(TensorDataset(x), ft)
    assert loss_on(q, make_net(), hold) == pytest.approx(h["loss_before"], rel=0.05)   # BN stats then fp16
    assert any("restored" in r.message for r in caplog.records)
    assert bitdown.load(bitdown.save(q, tmp_path / "q.bitdown"), make_net()).bitdown.extra["global_finetune"]["holdout"] == h


def test_holdout_images_are_never_trained_on(monkeypatch):
    x = images(80)
    ft = FinetuneConfig(layer_steps=2, global_steps=6, batch_size=16, holdout=0.1)
    _, hold = bf.split_holdout(TensorDataset(x), ft)
    assert hold.shape[0] == 16                                    # 10 % of 80 -> the minimum 16 (<= a quarter)
    seen = []
    real_step = bf._step
    monkeypatch.setattr(bf, "_step", lambda st, te, xb, *a: seen.append(xb) or real_step(st, te, xb, *a))
    q = bitdown.compress(make_net(), list(x[:64].split(32)), cfg(), progress=False, finetune=ft,
                         train_data=TensorDataset(x))
    trained = torch.cat(seen)
    assert trained.shape[0] == (4 * 2 + 6) * 16
    dist = torch.cdist(hold.flatten(1), trained.flatten(1))
    assert dist.min() > 0                                         # no holdout image in any training batch
    assert q.bitdown.extra["global_finetune"]["holdout"]["n"] == 16
    off = bitdown.compress(make_net(), list(x[:64].split(32)), cfg(), progress=False,
                           finetune=FinetuneConfig(global_steps=2, batch_size=16, holdout=0),
                           train_data=TensorDataset(x))
    assert "holdout" not in off.bitdown.extra["global_finetune"]


def test_holdout_guard_restores_after_a_resume_and_the_file_is_identical(monkeypatch, tmp_path):
    x = images(96)
    data = list(x[:64].split(32))
    ft = FinetuneConfig(**HURT, checkpoint_every=5)
    ref = bitdown.compress(make_net(), data, cfg(), progress=False, finetune=ft, train_data=TensorDataset(x))
    assert ref.bitdown.extra["global_finetune"]["holdout"]["kept"] == "before"
    fail_at_global_step(monkeypatch, 12)
    with pytest.raises(RuntimeError, match="interrupted"):
        bitdown.compress(make_net(), data, cfg(), progress=False, finetune=ft, train_data=TensorDataset(x),
                         checkpoint_dir=tmp_path / "ck")
    monkeypatch.undo()
    resumed = bitdown.compress(make_net(), data, cfg(), progress=False, finetune=ft, train_data=TensorDataset(x),
                               checkpoint_dir=tmp_path / "ck")
    assert resumed.bitdown.extra["resumed"]["step"] == 10
    assert resumed.bitdown.extra["global_finetune"] == ref.bitdown.extra["global_finetune"]
    assert (bitdown.save(resumed, tmp_path / "r.bitdown").read_bytes()
            == bitdown.save(ref, tmp_path / "ref.bitdown").read_bytes())


# per-layer guard: a good EM (2 centroids, teacher targets) that large per-layer steps spoil; normalised MSE
LAYER_FT = dict(layer_steps=6, batch_size=16, holdout=16, loss="mse")


def layer_run(lr: float, **kw):
    x = images(96)
    ft = FinetuneConfig(**{**LAYER_FT, "layer_lr": lr, **kw.pop("ft", {})})
    return bitdown.compress(make_net(), list(x[:64].split(32)), cfg(n_centroids=2), progress=False, finetune=ft,
                            train_data=TensorDataset(x), **kw)


def test_layer_guard_undoes_harmful_per_layer_steps_exactly(tmp_path, caplog):
    plain = bitdown.compress(make_net(), list(images(96)[:64].split(32)), cfg(n_centroids=2), progress=False)
    with caplog.at_level(logging.WARNING, logger="bitdown.finetune"):
        q = layer_run(0.3)
    assert q.bitdown.extra["layer_finetune"]["holdout"] == {"n": 16, "n_layers": 4, "n_layers_undone": 4,
                                                            "undone": LAYERS}
    for name in LAYERS:
        h = q.bitdown.layers[name]["finetune"]["holdout"]
        assert h["kept"] == "before" and h["loss_after"] > h["loss_before"]
    assert_same_state(q, plain)            # every layer's steps undone: exactly the EM-only model, bit for bit
    warn = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 4 and all(f"layer '{n}'" in w and "restored" in w for n, w in zip(LAYERS, warn))
    back = bitdown.load(bitdown.save(q, tmp_path / "q.bitdown"), make_net())
    assert back.bitdown.extra["layer_finetune"] == q.bitdown.extra["layer_finetune"]


def test_layer_guard_keeps_helpful_steps_and_changes_nothing_then():
    q = layer_run(1e-3)
    assert q.bitdown.extra["layer_finetune"]["holdout"]["n_layers_undone"] == 0
    assert all(q.bitdown.layers[n]["finetune"]["holdout"]["loss_after"] < q.bitdown.layers[n]["finetune"]["holdout"]
               ["loss_before"] for n in LAYERS)
    off = layer_run(1e-3, ft={"layer_guard": False})         # the same streams, no guard
    assert_same_state(q, off)
    assert "layer_finetune" not in off.bitdown.extra
    assert all(set(off.bitdown.layers[n]["finetune"]) == {"first_loss", "last_loss"} for n in LAYERS)


def test_layer_guard_resume_is_identical(monkeypatch, tmp_path):
    ref = layer_run(1e-2)
    assert ref.bitdown.extra["layer_finetune"]["holdout"]["undone"] == ["conv3", "fc"]    # both sides of the stop
    record_kmeans(monkeypatch, fail_on=3)
    with pytest.raises(RuntimeError, match="interrupted"):
        layer_run(1e-2, checkpoint_dir=tmp_path / "ck")
    monkeypatch.undo()
    resumed = layer_run(1e-2, checkpoint_dir=tmp_path / "ck")
    assert resumed.bitdown.extra["resumed"]["layers"] == 2
    assert resumed.bitdown.extra["layer_finetune"] == ref.bitdown.extra["layer_finetune"]
    assert (bitdown.save(resumed, tmp_path / "r.bitdown").read_bytes()
            == bitdown.save(ref, tmp_path / "ref.bitdown").read_bytes())


def test_holdout_setting_is_checked():
    for bad in (-1, 1.0, 1.5, -0.1, True, "10", float("nan")):
        with pytest.raises(ValueError, match="holdout"):
            FinetuneConfig(holdout=bad)
    assert [bf.holdout_size(n, 0.1) for n in (8, 40, 100, 1000, 50_000)] == [2, 10, 16, 100, 256]
    assert bf.holdout_size(100, 0) == bf.holdout_size(100, 0.0) == 0 and bf.holdout_size(100, 50) == 50
    with pytest.raises(ValueError, match="at most 32"):               # refused before any work
        bitdown.compress(make_net(), batches(), cfg(), progress=False, train_data=TensorDataset(images(64)),
                         finetune=FinetuneConfig(global_steps=2, holdout=33))


def test_nan_loss_raises_floating_point_error():
    x = images()
    bad = x.clone()
    bad[:, :, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite distillation loss"):
        bitdown.compress(make_net(), list(x.split(32)), cfg(), progress=False,
                         finetune=FinetuneConfig(global_steps=3, batch_size=16), train_data=TensorDataset(bad))
    teacher = make_net()
    student = coarse_student(teacher)
    with pytest.raises(FloatingPointError):
        finetune_layer(student, teacher, student.conv3, TensorDataset(bad), FinetuneConfig(layer_steps=2))


def test_nan_loss_says_what_was_kept(tmp_path):
    x = images()
    bad = x.clone()
    bad[:, :, 0, 0] = float("nan")
    ft = FinetuneConfig(global_steps=3, batch_size=16)
    with pytest.raises(FloatingPointError, match="nothing was saved"):
        bitdown.compress(make_net(), list(x.split(32)), cfg(), progress=False, finetune=ft,
                         train_data=TensorDataset(bad))
    with pytest.raises(FloatingPointError, match="last good checkpoint is kept in") as err:
        bitdown.compress(make_net(), list(x.split(32)), cfg(), progress=False, finetune=ft,
                         train_data=TensorDataset(bad), checkpoint_dir=tmp_path / "c")
    assert str(tmp_path / "c") in str(err.value)
    with pytest.raises(FloatingPointError, match="nothing was saved"):      # per-layer stage: no layer kept yet
        bitdown.compress(make_net(), list(x.split(32)), cfg(), progress=False,
                         finetune=FinetuneConfig(layer_steps=2, batch_size=16), train_data=TensorDataset(bad),
                         checkpoint_dir=tmp_path / "d")


def test_one_shot_stream_bn_falls_back_to_calibration():
    x = images()
    q = bitdown.compress(make_net(), iter(list(x.split(32))), cfg(bn_recalibrate=True), progress=False)
    assert all(torch.isfinite(b.running_mean).all() for b in q.modules() if isinstance(b, torch.nn.BatchNorm2d))


def test_finetune_config_from_dict():
    assert FinetuneConfig.from_dict({"global_lr": 3e-4}).global_lr == 3e-4
    with pytest.raises(ValueError, match="unknown fine-tuning key"):
        FinetuneConfig.from_dict({"lr": 1e-3})


@pytest.mark.parametrize("kw", [{"layer_steps": -1}, {"batch_size": 0}, {"global_lr": 0.0}, {"optimizer": "lbfgs"},
                                {"milestones": (0.5, 1.0)}, {"checkpoint_every": 0}, {"schedule": "linear"}])
def test_finetune_config_validation(kw):
    with pytest.raises(ValueError):
        FinetuneConfig(**kw)


def test_lr_schedules():
    """'step': global_lr x gamma at each milestone passed; 'cosine': global_lr at step 0, half at mid-run, -> 0."""
    from bitdown.finetune import _lr_at
    step = FinetuneConfig(global_steps=10, global_lr=1.0, milestones=(0.5, 0.8), gamma=0.1)
    assert [round(_lr_at(s, step), 6) for s in (0, 4, 5, 7, 8, 9)] == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    cos = FinetuneConfig(global_steps=10, global_lr=2.0, schedule="cosine")
    lrs = [_lr_at(s, cos) for s in range(10)]
    assert lrs[0] == 2.0 and lrs[5] == pytest.approx(1.0) and 0 < lrs[9] < 0.06
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_empty_finetune_data_rejected():
    teacher = make_net()
    student = coarse_student(teacher)
    with pytest.raises(ValueError, match="empty"):
        finetune_layer(student, teacher, student.conv3, TensorDataset(torch.zeros(0, 3, 8, 8)),
                       FinetuneConfig(layer_steps=1))


def test_too_few_calibration_images_refused_before_work(monkeypatch):
    """The fc layer (K=16 codewords, 8 subvectors per image) needs 2 images: 1 is refused before any EM,
    naming the minimum; 2 run to the end (a rank-deficient Gram no longer ends in 'math domain error')."""
    calls = record_kmeans(monkeypatch)
    with pytest.raises(ValueError, match=r"layer 'fc'.*at least 2 images"):
        bitdown.compress(make_net(), [images(1)], cfg(calib_images=1), progress=False)
    assert calls == []
    q = bitdown.compress(make_net(), [images(2)], cfg(calib_images=2), progress=False)
    assert all(math.isfinite(v["rel_error"]) for v in q.bitdown.layers.values())


def test_reconstruction_slices_enter_the_checkpoint_key_only_when_reconstruction_runs():
    """Checkpoints of runs without block reconstruction (made before grad_slices existed) still resume;
    with reconstruction the slices change the numbers, so they are part of the key."""
    from bitdown.compress import _fp_json
    from bitdown.config import ReconstructConfig

    off = _fp_json(QuantConfig(reconstruct=ReconstructConfig(steps=0, grad_slices=2)).to_json())
    assert "grad_slices" not in off["reconstruct"]
    assert off == _fp_json(QuantConfig(reconstruct=ReconstructConfig(steps=0)).to_json())
    on = _fp_json(QuantConfig(reconstruct=ReconstructConfig(steps=5, grad_slices=2)).to_json())
    assert on["reconstruct"]["grad_slices"] == 2


def test_stats_positions_floor_for_small_calibration_sets(monkeypatch):
    """stats_positions reaches the layers through stats.subsample_positions: 64 images lift a cap of 4 positions
    to every position (the same result as exact statistics); without the floor the cap cuts and changes it."""
    exact = bitdown.compress(make_net(), batches(), cfg(), progress=False)
    lifted = bitdown.compress(make_net(), batches(), cfg(stats_positions=4), progress=False)
    assert_same_state(exact, lifted)
    monkeypatch.setattr(bitdown.stats, "MIN_ROWS_PER_INPUT", 1)
    monkeypatch.setattr(bitdown.stats, "MIN_SAMPLES_PER_CENTROID", 1)
    cut = bitdown.compress(make_net(), batches(), cfg(stats_positions=4), progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(exact.state_dict().values(), cut.state_dict().values()))
