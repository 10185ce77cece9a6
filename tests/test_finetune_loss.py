"""Distillation loss for any model output (KL on class logits, normalised MSE on anything else, sums over
tuple / list / dict outputs), the up-front output check, and the holdout guards of the global and per-layer
stages."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from bitdown.finetune import (FinetuneConfig, check_outputs, distill_loss, evaluate_holdout, finetune_global,
                              finetune_layer, global_params, teacher_outputs)
from bitdown.modules import quantize_module


def nmse(s, t):
    return float(((s - t) ** 2).sum() / (t ** 2).sum())


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.flatten(1))


class Detector(nn.Module):
    """A feature pyramid: a list of 3 maps at strides 1, 2, 4 (no class axis anywhere)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)

    def forward(self, x):
        p1 = torch.relu(self.bn1(self.conv1(x)))
        p2 = torch.relu(self.bn2(self.conv2(p1)))
        p3 = self.bn3(self.conv3(p2))
        return [p1, p2, p3]


def make(cls, seed=0):
    torch.manual_seed(seed)
    net = cls()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        if isinstance(net, Classifier):     # logits that differ from image to image: a meaningful top-1
            net.fc.weight.mul_(4)
    return net.eval()


def images(n, seed=1):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def coarse_student(teacher, layers=("conv2", "conv3"), k=2):
    """The teacher with `layers` quantized to k centroids of 9-dim subvectors."""
    student = copy.deepcopy(teacher)
    for name in layers:
        layer = getattr(student, name)
        sub = layer.weight.detach().reshape(-1, 9)
        cb = sub[torch.linspace(0, sub.shape[0] - 1, k).long()].clone()
        codes = torch.cdist(sub, cb).argmin(1).reshape(layer.weight.shape[0], -1)
        quantize_module(layer, cb, codes)
    return student.eval()


def params_of(student, cfg):
    return [p.detach().clone() for p in global_params(student, cfg)]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- the loss


def test_kl_on_class_logits():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    T = 2.0
    pt = F.softmax(zt / T, 1)
    ref = T * T * float((pt * (F.log_softmax(zt / T, 1) - F.log_softmax(zs / T, 1))).sum(1).mean())
    assert float(distill_loss(zs, zt, T)) == pytest.approx(ref, rel=1e-5)            # old positional call
    assert float(distill_loss(zs, zt, T, "kl")) == pytest.approx(ref, rel=1e-5)
    assert float(distill_loss(zs, zt, temperature=T, loss="auto")) == pytest.approx(ref, rel=1e-5)
    assert float(distill_loss(zs, zt, T, "mse")) == pytest.approx(nmse(zs, zt), rel=1e-5)
    assert float(distill_loss(zt, zt)) == pytest.approx(0.0, abs=1e-6)


def test_auto_is_normalised_mse_for_a_feature_map():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 4, 5, 5, generator=g)
    s = t + 0.3 * torch.randn(2, 4, 5, 5, generator=g)
    assert float(distill_loss(s, t)) == pytest.approx(nmse(s, t), rel=1e-5)
    assert float(distill_loss(100 * s, 100 * t)) == pytest.approx(nmse(s, t), rel=1e-4)   # scale-free
    # a single "class" (N, 1) is a regression output: a softmax over it would always give 0
    r_t, r_s = torch.randn(5, 1, generator=g), torch.randn(5, 1, generator=g)
    assert float(distill_loss(r_s, r_t)) == pytest.approx(nmse(r_s, r_t), rel=1e-5)
    assert float(distill_loss(torch.zeros(3, 2, 4), torch.zeros(3, 2, 4))) == 0.0           # eps: no 0/0


def test_auto_sums_over_tuple_and_nested_dict_outputs():
    g = torch.Generator().manual_seed(0)
    maps_t = [torch.randn(2, 4, 8 // 2 ** i, 8 // 2 ** i, generator=g) for i in range(3)]
    maps_s = [m + 0.2 * torch.randn(m.shape, generator=g) for m in maps_t]
    logits_t, logits_s = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    expected = sum(nmse(a, b) for a, b in zip(maps_s, maps_t))
    assert float(distill_loss(tuple(maps_s), tuple(maps_t))) == pytest.approx(expected, rel=1e-5)
    assert float(distill_loss(maps_s, maps_t)) == pytest.approx(expected, rel=1e-5)

    kl = float(distill_loss(logits_s, logits_t))
    idx = torch.tensor([1, 2])
    t = {"logits": logits_t, "fpn": {"p3": maps_t[0], "p4": maps_t[1]}, "aux": None, "stride": 8, "idx": idx}
    s = {"stride": 8, "idx": idx + 1, "aux": None, "fpn": {"p4": maps_s[1], "p3": maps_s[0]}, "logits": logits_s}
    got = float(distill_loss(s, t))                  # paired by key, not by order; integer tensors skipped
    assert got == pytest.approx(kl + nmse(maps_s[0], maps_t[0]) + nmse(maps_s[1], maps_t[1]), rel=1e-5)
    with pytest.raises(ValueError, match="non-tensor values differ"):
        distill_loss({**s, "stride": 16}, t)
    with pytest.raises(ValueError, match="same keys"):
        distill_loss({k: v for k, v in s.items() if k != "aux"}, t)
    with pytest.raises(ValueError, match="shape"):
        distill_loss(maps_s[:2] + [maps_s[0]], maps_t)
    with pytest.raises(ValueError, match="list of 3"):
        distill_loss(maps_s[:2], maps_t)


def test_kl_refuses_anything_but_class_logits():
    t = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match=r"\(2, 4, 5, 5\)"):
        distill_loss(t, t, 1.0, "kl")
    with pytest.raises(ValueError, match=r"\[1\].*\(2, 4, 5, 5\)"):
        distill_loss((torch.randn(2, 3), t), (torch.randn(2, 3), t), loss="kl")
    with pytest.raises(ValueError, match="'auto', 'kl', 'mse'"):
        distill_loss(t, t, 1.0, "l1")
    with pytest.raises(ValueError, match="'auto', 'kl', 'mse'"):
        FinetuneConfig(loss="l2")
    assert FinetuneConfig().loss == "auto" and FinetuneConfig().to_json()["loss"] == "auto"
    assert FinetuneConfig.from_dict({"loss": "mse"}).loss == "mse"


def test_unsupported_outputs_are_type_errors():
    with pytest.raises(TypeError, match="str"):
        distill_loss("cat", "cat")

    class Box:
        pass

    with pytest.raises(TypeError, match="Box"):
        distill_loss([torch.ones(2, 3), Box()], [torch.ones(2, 3), Box()])
    with pytest.raises(TypeError, match="no floating-point tensor"):
        distill_loss((None, 3), (None, 3))


# ----------------------------------------------------------------------------- check_outputs


class Wrap(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_check_outputs_describes_and_refuses_before_any_work():
    x = images(4)
    assert check_outputs(make(Classifier), x) == "tensor (N, 10): kl"
    assert check_outputs(make(Classifier), x, "mse") == "tensor (N, 10): mse"
    assert check_outputs(make(Detector), x) == "list of 3 tensors: mse"
    assert check_outputs(Wrap(lambda x: tuple(Detector.forward(make(Detector), x))), x) == "tuple of 3 tensors: mse"
    assert check_outputs(Wrap(lambda x: {"a": x.mean((2, 3)), "b": x}), x) == "dict of 2 tensors: kl + mse"
    with pytest.raises(ValueError, match=r"\(2, 8, 8, 8\)"):          # run on 2 images only
        check_outputs(make(Detector), x, "kl")
    words = Wrap(lambda x: "a cat")
    words.train()
    with pytest.raises(TypeError, match="str"):
        check_outputs(words, x)
    assert words.training                                               # mode restored
    with pytest.raises(TypeError, match="no floating-point tensor"):
        check_outputs(Wrap(lambda x: (x.shape[0], None)), x)


# ----------------------------------------------------------------------------- training on a detector


def test_detector_finetune_with_auto_lowers_the_mse():
    teacher = make(Detector)
    student = coarse_student(teacher)
    x = images(64)
    with torch.no_grad():
        before = float(distill_loss(student(x), teacher(x)))
    assert math.isfinite(before) and before > 0.05
    cfg = FinetuneConfig(global_steps=30, batch_size=32, global_lr=1e-2)
    res = finetune_global(student, teacher, TensorDataset(x), cfg, progress=False)
    with torch.no_grad():
        after = float(distill_loss(student(x), teacher(x)))
    assert math.isfinite(res["last_loss"]) and math.isfinite(after)
    assert after < 0.7 * before
    # cfg.loss reaches the training step: kl on feature maps fails at the first step, nothing trained
    student2 = coarse_student(teacher)
    p0 = params_of(student2, cfg)
    with pytest.raises(ValueError, match="'kl' needs"):
        finetune_global(student2, teacher, TensorDataset(x), FinetuneConfig(global_steps=3, loss="kl"),
                        progress=False)
    assert same(p0, params_of(student2, cfg))


def test_bce_is_the_bernoulli_kl_of_sigmoid_outputs():
    torch.manual_seed(0)
    t = [torch.randn(2, 6, 4, 4) * 4, torch.randn(2, 6, 2, 2)]
    s = [a + 0.3 * torch.randn_like(a) for a in t]
    assert float(distill_loss(t, t, loss="bce")) == pytest.approx(0.0, abs=1e-4)
    p, q = [torch.sigmoid(a) for a in t], [torch.sigmoid(a) for a in s]
    want = sum(float((pi * (pi / qi).log() + (1 - pi) * ((1 - pi) / (1 - qi)).log()).sum()) / 2 for pi, qi in zip(p, q))
    assert float(distill_loss(s, t, loss="bce")) == pytest.approx(want, rel=1e-3)
    # a raw error where the sigmoid saturates costs little, the same error near 0.5 costs much
    far = torch.full((1, 1, 2, 2), -12.0)
    assert float(distill_loss(far + 2, far, loss="bce")) < 1e-3 * float(distill_loss(far * 0 + 2, far * 0, loss="bce"))
    teacher = make(Detector)                   # and it trains: the loss falls on a detector-shaped model
    student = coarse_student(teacher)
    x = images(64)
    with torch.no_grad():
        before = float(distill_loss(student(x), teacher(x), loss="bce"))
    finetune_global(student, teacher, TensorDataset(x), FinetuneConfig(global_steps=30, batch_size=32, global_lr=1e-2,
                                                                       loss="bce"), progress=False)
    with torch.no_grad():
        assert float(distill_loss(student(x), teacher(x), loss="bce")) < 0.7 * before


# ----------------------------------------------------------------------------- holdout guard


def test_holdout_guard_restores_when_training_hurts(caplog):
    teacher = make(Classifier)
    student = coarse_student(teacher)
    x, hold = images(64), images(48, seed=2)
    cfg = FinetuneConfig(global_steps=4, batch_size=16, optimizer="sgd", global_lr=10.0)
    p0 = params_of(student, cfg)
    ref = evaluate_holdout(student, teacher, hold, cfg)
    ckpt = []

    def on_checkpoint(step, opt):
        ckpt.append((step, params_of(student, cfg)))

    with caplog.at_level(logging.WARNING, logger="bitdown.finetune"):
        res = finetune_global(student, teacher, TensorDataset(x), cfg, progress=False, holdout=hold,
                              on_checkpoint=on_checkpoint)
    h = res["holdout"]
    assert h["kept"] == "before" and h["n"] == 48
    assert h["loss_after"] > h["loss_before"] == pytest.approx(ref["loss"])
    assert h["agreement_before"] == pytest.approx(ref["agreement"]) and 0 <= h["agreement_after"] <= 1
    assert same(p0, params_of(student, cfg))                       # exactly the state before the stage
    assert [s for s, _ in ckpt] == [4] and same(p0, ckpt[0][1])   # the final checkpoint holds it, only it
    assert any("restored" in r.message and r.levelno == logging.WARNING for r in caplog.records)


def test_holdout_guard_keeps_training_that_helps():
    teacher = make(Classifier)
    student = coarse_student(teacher)
    x, hold = images(64), images(48, seed=2)
    cfg = FinetuneConfig(global_steps=30, batch_size=32, global_lr=1e-2)
    p0 = params_of(student, cfg)
    res = finetune_global(student, teacher, TensorDataset(x), cfg, progress=False, holdout=hold)
    h = res["holdout"]
    assert h["kept"] == "finetuned"
    assert h["loss_after"] < h["loss_before"]
    assert h["agreement_after"] >= h["agreement_before"]
    assert not same(p0, params_of(student, cfg))
    assert evaluate_holdout(student, teacher, hold, cfg)["loss"] == pytest.approx(h["loss_after"])
    # detector outputs: a loss, no agreement
    det = make(Detector)
    h = finetune_global(coarse_student(det), det, TensorDataset(x), cfg, progress=False, holdout=hold)["holdout"]
    assert h["agreement_before"] is None and h["agreement_after"] is None and h["kept"] == "finetuned"


def test_holdout_guard_on_a_resumed_run_compares_but_cannot_restore(caplog):
    teacher = make(Classifier)
    student = coarse_student(teacher)
    x, hold = images(64), images(32, seed=2)
    cfg = FinetuneConfig(global_steps=6, batch_size=16, global_lr=1e-2)
    before = {"n": 32, "loss": 0.0, "agreement": 1.0}              # nothing can beat it
    with caplog.at_level(logging.WARNING, logger="bitdown.finetune"):
        res = finetune_global(student, teacher, TensorDataset(x), cfg, start=3, progress=False, holdout=hold,
                              holdout_before=before)
    h = res["holdout"]
    assert h["loss_before"] == 0.0 and h["loss_after"] > 0 and h["kept"] == "finetuned"
    assert any("resumed" in r.message for r in caplog.records)
    with pytest.raises(ValueError, match="holdout_before"):
        finetune_global(student, teacher, TensorDataset(x), cfg, start=3, progress=False, holdout=hold,
                        holdout_before={"loss_before": 1.0})


def test_layer_guard_restores_the_codebook_when_the_steps_hurt(caplog):
    teacher = make(Classifier)
    student = coarse_student(teacher, k=64)                        # close to the teacher: large steps hurt
    x, hold = images(64), images(48, seed=2)
    cfg = FinetuneConfig(layer_steps=4, batch_size=16, layer_lr=0.3)
    cb0 = student.conv3.codebook.detach().clone()
    ref = evaluate_holdout(student, teacher, hold, cfg)
    with caplog.at_level(logging.WARNING, logger="bitdown.finetune"):
        res = finetune_layer(student, teacher, student.conv3, TensorDataset(x), cfg, holdout=hold, name="layer 'conv3'")
    h = res["holdout"]
    assert h["kept"] == "before" and h["loss_after"] > h["loss_before"] == pytest.approx(ref["loss"])
    assert torch.equal(student.conv3.codebook, cb0)                 # exactly the codebook from before the steps
    assert evaluate_holdout(student, teacher, hold, cfg)["loss"] == ref["loss"]
    warn = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and "'conv3'" in warn[0] and "restored" in warn[0]
    assert f"{h['loss_before']:.4g} -> {h['loss_after']:.4g}" in warn[0]      # both figures


def test_layer_guard_keeps_steps_that_help_and_can_be_turned_off():
    teacher = make(Classifier)
    x, hold = images(64), images(48, seed=2)
    cfg = FinetuneConfig(layer_steps=30, batch_size=32, layer_lr=1e-2)
    student = coarse_student(teacher)
    targets = teacher_outputs(teacher, hold, cfg)
    assert len(targets) == 2 and torch.allclose(targets[0], teacher(hold[:32]), atol=1e-5)
    assert evaluate_holdout(student, teacher, hold, cfg, targets) == evaluate_holdout(student, teacher, hold, cfg)
    res = finetune_layer(student, teacher, student.conv3, TensorDataset(x), cfg, holdout=hold, targets=targets)
    h = res["holdout"]
    assert h["kept"] == "finetuned" and h["loss_after"] < h["loss_before"]
    assert evaluate_holdout(student, teacher, hold, cfg)["loss"] == pytest.approx(h["loss_after"])
    off = coarse_student(teacher)                                   # no guard: the same steps, nothing measured
    res_off = finetune_layer(off, teacher, off.conv3, TensorDataset(x), FinetuneConfig(**{**cfg.to_json(),
                             "layer_guard": False}), holdout=hold)
    assert "holdout" not in res_off and torch.equal(off.conv3.codebook, student.conv3.codebook)
    with pytest.raises(ValueError, match="teacher_outputs"):
        evaluate_holdout(student, teacher, hold, cfg, targets[:1])
    with pytest.raises(ValueError, match="layer_guard"):
        FinetuneConfig(layer_guard=1)
    estimate = 2 * 32 * 10 * 4                  # bytes: the first batch's output times the number of batches
    assert teacher_outputs(teacher, hold, cfg, max_bytes=estimate - 1) is None     # too large: not kept
    assert len(teacher_outputs(teacher, hold, cfg, max_bytes=estimate)) == 2
    det = make(Detector)                                            # nested outputs: kept as they are
    d_t = teacher_outputs(det, hold, cfg)
    assert evaluate_holdout(coarse_student(det), det, hold, cfg, d_t) == evaluate_holdout(coarse_student(det), det,
                                                                                          hold, cfg)


def test_finished_run_rerun_keeps_last_loss():
    teacher = make(Classifier)
    student = coarse_student(teacher)
    x = images(32)
    cfg = FinetuneConfig(global_steps=5, batch_size=16)
    calls = []
    res = finetune_global(student, teacher, TensorDataset(x), cfg, start=5, progress=False, last_loss=0.125,
                          on_checkpoint=lambda s, o: calls.append(s))
    assert res["last_loss"] == 0.125 and res["steps"] == 5 and calls == []
    assert finetune_global(student, teacher, TensorDataset(x), cfg, start=5, progress=False)["last_loss"] is None
    res = finetune_global(student, teacher, TensorDataset(x), cfg, start=3, progress=False, last_loss=0.125,
                          on_checkpoint=lambda s, o: calls.append(s))
    assert res["last_loss"] != 0.125 and math.isfinite(res["last_loss"]) and calls == [5]
