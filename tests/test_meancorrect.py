"""Output-mean correction (EMConfig.mean_correction, meancorrect.py): which BatchNorm a layer feeds,
the shift measured from the statistics, and that after compression each corrected layer's mean
output equals the teacher's again, through the BatchNorm or the bias."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import bitdown
from bitdown import QuantConfig
from bitdown.config import EMConfig
from bitdown.meancorrect import correct_mean, following_batchnorm, output_mean_shift
from bitdown.stats import StatsCollector, run_until


class Net(nn.Module):
    """conv->bn (direct), conv->relu->bn (not direct), a grouped conv->bn, a linear with bias."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.bn2(torch.relu(self.conv2(x)))      # a ReLU between: conv2 does not feed bn2 directly
        x = torch.relu(self.bn3(self.dw(x)))
        return self.fc(x.mean((2, 3)))


def make_net(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def test_following_batchnorm_finds_direct_pairs_only():
    net = make_net()
    found = following_batchnorm(net, torch.randn(2, 4, 8, 8), ["conv1", "conv2", "dw", "fc"])
    assert found == {"conv1": "bn1", "dw": "bn3"}
    assert not net.training                        # the model's mode is restored (it was eval)
    net.train()
    following_batchnorm(net, torch.randn(2, 4, 8, 8), ["conv1"])
    assert net.training


@pytest.mark.parametrize("name", ["conv1", "dw", "fc"])
def test_output_mean_shift_matches_the_real_outputs(name):
    net = make_net()
    module = dict(net.named_modules())[name]
    x = torch.randn(6, 4, 8, 8)
    with StatsCollector(name, module, 3 if name == "dw" else 4, full_gram=True) as col:
        run_until(net, [x], module)
    outs = []
    h = module.register_forward_hook(lambda m, i, o: outs.append(o.detach()))
    net(x)
    h.remove()
    y = outs[0] - (module.bias if getattr(module, "bias", None) is not None else 0)
    mean = (y.mean((0, 2, 3)) if y.dim() == 4 else y.mean(0)).double()
    torch.testing.assert_close(col.stats.output_mean(module.weight), mean, rtol=1e-4, atol=1e-5)
    w2 = module.weight.detach() * 0.5
    torch.testing.assert_close(output_mean_shift(col.stats, w2, module.weight), -0.5 * mean, rtol=1e-4, atol=1e-5)


def test_correct_mean_prefers_batchnorm_then_bias():
    conv, bn, fc = nn.Conv2d(2, 3, 1, bias=False), nn.BatchNorm2d(3), nn.Linear(2, 3)
    delta = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    b0 = fc.bias.detach().clone()
    assert correct_mean(conv, bn, delta) == "batchnorm"
    torch.testing.assert_close(bn.running_mean, delta.float())
    assert correct_mean(fc, None, delta) == "bias"
    torch.testing.assert_close(fc.bias.detach(), b0 - delta.float())
    assert correct_mean(conv, None, delta) == "none"


def _bn_input_means(model, x):
    means = {}
    hooks = [m.register_forward_pre_hook(lambda m, i, n=n: means.__setitem__(n, i[0].mean((0, 2, 3))))
             for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    return means, logits


@pytest.mark.parametrize("teacher_target", [True, False])
def test_compress_restores_the_teachers_means(teacher_target):
    """After compression with mean correction, (BN input - running mean) has the teacher's mean on the
    calibration images, for each layer that feeds a BatchNorm directly; without it, it does not."""
    net = make_net()
    x = torch.randn(32, 4, 8, 8)
    em = dict(teacher_target=teacher_target)
    cfg = dict(n_centroids=4, calib_images=32, batch_size=32, quantize_stem=True, bn_recalibrate=False,
               name_overrides={"conv.*|fc": {"block_size": 4}, "dw": {"block_size": 9}})
    on = bitdown.compress(net, [x], QuantConfig(**cfg, em=EMConfig(**em, mean_correction=True)), progress=False)
    off = bitdown.compress(net, [x], QuantConfig(**cfg, em=EMConfig(**em)), progress=False)
    t_means, _ = _bn_input_means(net, x)
    gaps = {}
    for name, q in (("on", on), ("off", off)):
        q_means, _ = _bn_input_means(q, x)
        bns = dict(q.named_modules())
        gaps[name] = {bn: float(((q_means[bn] - bns[bn].running_mean) - (t_means[bn] - net.get_submodule(bn)
                                                                             .running_mean)).abs().max())
                      for bn in ("bn1", "bn3")}
    layers = on.bitdown.layers
    assert layers["conv1"]["mean_corrected_in"] == "batchnorm" and layers["dw"]["mean_corrected_in"] == "batchnorm"
    assert layers["fc"]["mean_corrected_in"] == "bias" and layers["conv2"]["mean_corrected_in"] == "none"
    # bn1 sees only conv1 (the first layer: its inputs are the teacher's), so the match is exact there
    assert gaps["on"]["bn1"] < 1e-4 < gaps["off"]["bn1"]
    if teacher_target:      # dw's inputs come from quantized layers: the means match the teacher's exactly
        assert gaps["on"]["bn3"] < 1e-4 < gaps["off"]["bn3"]


def test_in_place_ops_between_layer_and_batchnorm_are_not_direct():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            x = self.bn(self.act(self.conv(x)))
            return self.bn2(self.conv2(x).mul_(2))

    assert following_batchnorm(M().eval(), torch.randn(2, 4, 4, 4), ["conv", "conv2"]) == {}
