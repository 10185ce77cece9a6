"""Post-BatchNorm channel weighting (EMConfig.channel_weighting='bn'): the weighted objective is the error
after the BatchNorm that follows the layer (brute force on a tiny conv + BN), the weighted EM ends with a
lower post-BN error than the plain one, the allocator measures its distortion after the BN, and compress
hands the EM the gains of the BN each layer feeds."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn

import bitdown
from bitdown import QuantConfig
from bitdown.allocate import alloc_em, measure_options
from bitdown.config import EMConfig, resolve_plan
from bitdown.em import exact_objective, kmeans
from bitdown.meancorrect import bn_gain, bn_gains
from bitdown.scalar import quantize_scalar
from bitdown.stats import collect_stats

from _brute import brute_x


class ConvBN(nn.Module):
    """conv -> BN with channels of very different scale, the BN undoing the scale (weak channels, big gains);
    then a linear head without a BatchNorm."""

    def __init__(self, seed: int = 0, c_out: int = 16):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(4, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.fc = nn.Linear(c_out, 5)
        scale = torch.logspace(-2, 0, c_out)                                    # channel scales 0.01 ... 1
        with torch.no_grad():
            self.conv.weight.mul_(scale[:, None, None, None])
            self.bn.weight.uniform_(0.5, 2.0)
            self.bn.bias.normal_()
            self.bn.running_var.copy_(scale.pow(2) * torch.empty(c_out).uniform_(0.5, 2.0))
            self.bn.running_mean.normal_(std=0.01)
        self.eval()

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def post_bn_error(net: ConvBN, x: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||BN(conv(x; W)) - BN(conv(x; W_hat))||^2, both through the real modules, float64."""
    conv, bn = net.conv.double(), net.bn.double()
    with torch.no_grad():
        ref = bn(conv(x.double()))
        w = conv.weight.detach().clone()
        conv.weight.copy_(w_hat.double())
        out = bn(conv(x.double()))
        conv.weight.copy_(w)
    net.float()
    return float((out - ref).pow(2).sum())


def full_gram(net: ConvBN, x: torch.Tensor) -> torch.Tensor:
    xs = brute_x(net.conv, x)                                                   # (1, rows, R)
    return xs.transpose(1, 2) @ xs                                             # (1, R, R)


def test_bn_weighted_objective_is_the_post_bn_error():
    net = ConvBN()
    x = torch.randn(3, 4, 6, 6)
    w = net.conv.weight.detach()
    w_hat = w + 0.05 * torch.randn_like(w) * w.abs().mean((1, 2, 3), keepdim=True)
    err, _ = exact_objective(w, w_hat, full_gram(net, x), bn_gain(net.bn))
    brute = post_bn_error(net, x, w_hat)
    assert err == pytest.approx(brute, rel=1e-6)
    plain, _ = exact_objective(w, w_hat, full_gram(net, x))
    assert abs(plain - brute) > 0.5 * brute                                     # the unweighted one is not it


def test_bn_gains_pairs_layers_with_their_batchnorm():
    net = ConvBN()
    gains = bn_gains(net, torch.randn(2, 4, 6, 6), ["conv", "fc"])
    assert set(gains) == {"conv"}                                               # fc feeds no BatchNorm: weight 1
    expected = net.bn.weight.detach().double() ** 2 / (net.bn.running_var.double() + net.bn.eps)
    torch.testing.assert_close(gains["conv"], expected)
    bn = nn.BatchNorm2d(3, track_running_stats=False)
    assert bn_gain(bn) is None
    with torch.no_grad():
        net.bn.weight[0] = 0.0                                                  # a dead channel keeps a weight > 0
    assert float(bn_gain(net.bn)[0]) > 0


@pytest.mark.parametrize("em", [EMConfig(), EMConfig.paper()])
def test_bn_weighting_lowers_the_post_bn_error(em):
    """On weak channels with big BN gains, the plain EM spends its codewords on the strong channels; the
    BN-weighted one ends with other codes and a lower error after the BatchNorm (and a higher one before it)."""
    net = ConvBN(c_out=32)
    x = torch.randn(8, 4, 6, 6)
    w = net.conv.weight.detach()
    h = full_gram(net, x)
    block_grams = h.reshape(1, 4, 9, 4, 9).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # (1, 4, 9, 9), d = 9
    gain = bn_gain(net.bn)
    plain = kmeans(w, block_grams, 8, em, full_gram=h)
    weighted = kmeans(w, block_grams, 8, em, full_gram=h, row_weights=gain)
    w_plain, w_weighted = plain.weight(tuple(w.shape)), weighted.weight(tuple(w.shape))
    assert not torch.equal(plain.codes, weighted.codes)
    assert post_bn_error(net, x, w_weighted) < 0.8 * post_bn_error(net, x, w_plain)
    assert exact_objective(w, w_plain, h)[0] < exact_objective(w, w_weighted, h)[0]


def test_allocator_distortion_is_the_post_bn_error():
    """measure_options with the 'bn' weighting: an option's distortion is the post-BN relative error (checked
    on the int8 option, whose quantizer does not depend on the weighting); the unweighted table differs for the
    BN-fed conv only."""
    net = ConvBN()
    x = torch.randn(8, 4, 6, 6)
    cfg = QuantConfig(quantize_stem=True, calib_images=8)
    plans, _ = resolve_plan(net, cfg, ["conv", "fc"])
    on = measure_options(net, plans, [x], em=alloc_em(EMConfig(channel_weighting="bn")), progress=False,
                         extra=["int8"])
    off = measure_options(net, plans, [x], progress=False, extra=["int8"])
    h = collect_stats(net, {"conv": (net.conv, 1)}, [x], full_gram=True)["conv"].full_gram
    w = net.conv.weight.detach()
    w_hat = quantize_scalar(w, h, 8, EMConfig.paper().damp, feedback=False).weight(tuple(w.shape))
    gain = bn_gain(net.bn)
    energy = exact_objective(w, w, h, gain)[1]                                  # sum_o gain_o ||X w_o||^2
    int8 = next(o for o in on["conv"] if o.scalar_bits == 8)
    assert int8.distortion == pytest.approx(post_bn_error(net, x, w_hat) / energy, rel=1e-4)
    assert [o.distortion for o in on["fc"]] == [o.distortion for o in off["fc"]]
    pq_on = [o.distortion for o in on["conv"] if o.quantizer == "pq"]
    pq_off = [o.distortion for o in off["conv"] if o.quantizer == "pq"]
    assert pq_on != pq_off


def test_compress_gives_the_em_the_following_bn_gains(monkeypatch):
    seen = {}
    compress_mod = sys.modules["bitdown.compress"]                           # (bitdown.compress is the function)
    real = compress_mod.kmeans

    def spy(weight, *args, row_weights=None, **kw):
        seen[weight.shape[0]] = row_weights
        return real(weight, *args, row_weights=row_weights, **kw)

    monkeypatch.setattr(compress_mod, "kmeans", spy)
    net = ConvBN()
    x = torch.randn(16, 4, 6, 6)
    cfg = dict(n_centroids=4, calib_images=16, batch_size=16, quantize_stem=True, bn_recalibrate=False,
               name_overrides={"conv": {"block_size": 9}, "fc": {"block_size": 4}})
    bitdown.compress(net, [x], QuantConfig(**cfg, em=EMConfig(channel_weighting="bn")), progress=False)
    torch.testing.assert_close(seen[16], bn_gain(net.bn))                     # conv: its BatchNorm's gains
    assert seen[5] is None                                                     # fc: no BatchNorm, weight 1
    bitdown.compress(net, [x], QuantConfig(**cfg), progress=False)
    assert seen[16] is None
