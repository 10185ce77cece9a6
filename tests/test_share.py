"""Codebooks shared by several layers (`share` override key, `share_same_shape`): configuration,
the joint EM, the pipeline (one Parameter per group), size accounting, the file, resume, fine-tuning."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
import torch.nn as nn

import bitdown
from bitdown import serialize
from bitdown.config import QuantConfig, resolve_plan, share_groups
from bitdown.em import assign_codes, kmeans_shared, split_codes
from bitdown.finetune import FinetuneConfig, global_params
from bitdown.modules import is_pq
from bitdown.serialize import BitdownFileError
from bitdown.size import size_report

bc = importlib.import_module("bitdown.compress")
SHARED = ["conv2", "conv3", "conv4"]


class ShareNet(nn.Module):
    """stem + three 8->8 3x3 convs (one shape) + a 1x1 conv + a linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.conv4 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.conv5 = nn.Conv2d(8, 16, 1, bias=False)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        x = torch.relu(self.conv5(torch.relu(self.conv4(x))))
        return self.fc(x.mean((2, 3)))


def make_net(seed=0):
    torch.manual_seed(seed)
    return ShareNet().eval()


def batches(n=64, seed=0):
    return list(torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)).split(32))


def cfg(**kw):
    return QuantConfig(**{"em": {"n_iter": 10}, "calib_images": 64, "batch_size": 32,
                          "name_overrides": {"conv[234]": {"share": "g"}}, **kw})


# ----------------------------------------------------------------------------- configuration

def test_share_groups_resolved_and_clamped_on_the_group():
    plans, _ = resolve_plan(make_net(), cfg())
    groups = share_groups(plans)
    assert list(groups) == ["g"] and [p.name for p in groups["g"]] == SHARED
    # 64 subvectors per layer alone would clamp K to 8; the group's 192 allow 32
    assert {p.n_centroids for p in groups["g"]} == {32}
    alone, _ = resolve_plan(make_net(), QuantConfig())
    assert {p.n_centroids for p in alone if p.name in SHARED} == {8}


def test_share_same_shape_groups_identical_layers_only():
    plans, _ = resolve_plan(make_net(), QuantConfig(share_same_shape=True))
    groups = share_groups(plans)
    assert [[p.name for p in ms] for ms in groups.values()] == [SHARED]
    assert all(p.share is None for p in plans if p.name not in SHARED)   # groups of one are plain layers


def test_share_group_must_agree():
    with pytest.raises(ValueError, match="share group 'g'.*block_size"):
        resolve_plan(make_net(), cfg(name_overrides={"conv[234]": {"share": "g"}, "conv4": {"block_size": 3}}))
    with pytest.raises(ValueError, match="share must be a non-empty group name"):
        cfg(name_overrides={"conv2": {"share": 3}})


def test_share_with_a_target_size_is_refused():
    with pytest.raises(ValueError, match="shared codebooks.*target size"):
        bitdown.compress(make_net(), batches(), cfg(), target_ratio=8, progress=False)


# ----------------------------------------------------------------------------- the joint EM

def _layer_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(8, 8, 3, 3, generator=g) * s for s in (1.0, 0.1, 3.0)]
    grams = []
    for s in (1.0, 5.0, 0.2):
        x = torch.randn(200, 9, generator=g) * s
        grams.append((x.T @ x).double())
    return weights, grams


def test_kmeans_shared_objective_decreases_and_more_centroids_help():
    weights, grams = _layer_data()
    res = kmeans_shared(weights, grams, 16, seed=0)
    assert all(b <= a * (1 + 1e-9) for a, b in zip(res.history, res.history[1:]))
    codes = split_codes(res.codes, weights, 9)
    assert [tuple(c.shape) for c in codes] == [(8, 8)] * 3
    # the objective is the summed relative pooled error, recomputed here independently
    total = 0.0
    for w, c, gm in zip(weights, codes, grams):
        m = w.reshape(-1, 9).double()
        e = m - res.codebook.double()[c.reshape(-1)]
        total += float(((e @ gm) * e).sum() / ((m @ gm) * m).sum())
    assert res.objective == pytest.approx(total, rel=1e-4)
    assert kmeans_shared(weights, grams, 64, seed=0).objective < res.objective


def test_kmeans_shared_is_scale_fair_and_degenerate_ok():
    # each layer's relative error counts: a layer with tiny weights is not sacrificed
    weights, grams = _layer_data()
    res = kmeans_shared(weights, grams, 32, seed=0)
    for w, c, gm in zip(weights, split_codes(res.codes, weights, 9), grams):
        m = w.reshape(-1, 9).double()
        e = m - res.codebook.double()[c.reshape(-1)]
        assert float(((e @ gm) * e).sum() / ((m @ gm) * m).sum()) < 0.9
    few = kmeans_shared([weights[0][:1, :1]], [grams[0]], 16)             # 1 subvector, 16 centroids
    assert few.objective == 0.0 and few.codebook.shape == (16, 9)


def test_kmeans_shared_rejects_bad_input():
    weights, grams = _layer_data()
    with pytest.raises(ValueError, match="one pooled Gram per weight"):
        kmeans_shared(weights, grams[:2], 8)
    bad = weights[0].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        kmeans_shared([bad], grams[:1], 8)


def test_assign_codes_never_worse_than_nearest_codeword_on_the_exact_objective():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 36, generator=g)
    x = torch.randn(400, 36, generator=g) @ torch.randn(36, 36, generator=g)   # correlated inputs
    h = (x.T @ x).double()
    blocks = torch.stack([h[i * 9:(i + 1) * 9, i * 9:(i + 1) * 9] for i in range(4)])[None]  # (1, 4, 9, 9)
    codebook = torch.randn(32, 9, generator=g)
    plain = assign_codes(w, codebook, blocks)                                # pooled nearest codeword
    refined = assign_codes(w, codebook, blocks, bitdown.EMConfig(), full_gram=h[None])
    assert torch.equal(refined.codebook, codebook)                           # the codebook is fixed

    def exact(codes):
        e = (w.double() - codebook.double()[codes].reshape(16, 36))
        return float(torch.einsum("or,rs,os->", e, h, e))
    assert exact(refined.codes) <= exact(plain.codes) * (1 + 1e-9)


# ----------------------------------------------------------------------------- pipeline, size, file

@pytest.fixture(scope="module")
def shared_model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    q = bitdown.compress(make_net(), batches(), cfg(), progress=False)
    torch.set_num_threads(threads)
    return q


def test_pipeline_ties_one_parameter_per_group(shared_model):
    mods = dict(shared_model.named_modules())
    assert all(is_pq(mods[n]) for n in SHARED)
    assert mods["conv2"].codebook is mods["conv3"].codebook is mods["conv4"].codebook
    assert mods["conv5"].codebook is not mods["conv2"].codebook
    # every member still has codes of its own, fitted to its own weights
    assert not torch.equal(mods["conv2"].codes, mods["conv3"].codes)


def test_size_counts_a_shared_codebook_once(shared_model):
    plans = shared_model.bitdown.plans
    rep = size_report(shared_model, plans)
    cb = [lay.codebook_bytes for lay in rep.layers if lay.name in SHARED]
    assert cb == [32 * 9 * 2, 0, 0]
    separate = [dataclasses.replace(p, share=None) for p in plans]       # same K, a codebook each
    assert size_report(shared_model, separate).size_bytes - rep.size_bytes == 2 * 32 * 9 * 2


def test_file_stores_the_codebook_once_and_loads_tied(shared_model, tmp_path):
    path = bitdown.save(shared_model, tmp_path / "s.bitdown")
    tensors, meta = serialize.read(path)
    assert "conv2.codebook" in tensors and "conv3.codebook" not in tensors and "conv4.codebook" not in tensors
    loaded = serialize.apply(make_net(seed=5), tensors, meta)
    mods = dict(loaded.named_modules())
    assert mods["conv2"].codebook is mods["conv3"].codebook is mods["conv4"].codebook
    x = batches()[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), shared_model(x))
    # a file whose owner codebook is gone is refused, with the layer named
    broken = {k: v for k, v in tensors.items() if k != "conv2.codebook"}
    meta["checksum"] = serialize.checksum(broken, meta)
    serialize.write_stored(tmp_path / "b.bitdown", broken, meta)
    with pytest.raises(BitdownFileError, match="codebook/codes of 'conv2'"):
        serialize.apply(make_net(), *serialize.read(tmp_path / "b.bitdown"))


def test_resume_inside_a_group_is_identical(monkeypatch, tmp_path):
    ref = bitdown.save(bitdown.compress(make_net(), batches(), cfg(), progress=False), tmp_path / "ref.bitdown")
    real, calls = bc.assign_codes, []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real(*a, **kw)
    monkeypatch.setattr(bc, "assign_codes", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        bitdown.compress(make_net(), batches(), cfg(), checkpoint_dir=tmp_path / "ck", progress=False)
    monkeypatch.setattr(bc, "assign_codes", real)
    resumed = bitdown.compress(make_net(), batches(), cfg(), checkpoint_dir=tmp_path / "ck", progress=False)
    assert resumed.bitdown.extra["resumed"]["layers"] == 1
    mods = dict(resumed.named_modules())
    assert mods["conv2"].codebook is mods["conv3"].codebook is mods["conv4"].codebook
    assert bitdown.save(resumed, tmp_path / "r.bitdown").read_bytes() == ref.read_bytes()


def test_finetune_trains_the_shared_codebook_once(tmp_path):
    ds = torch.utils.data.TensorDataset(torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
    ft = FinetuneConfig(layer_steps=2, global_steps=3, batch_size=16)
    q = bitdown.compress(make_net(), batches(), cfg(), finetune=ft, train_data=ds, progress=False)
    mods = dict(q.named_modules())
    assert mods["conv2"].codebook is mods["conv3"].codebook is mods["conv4"].codebook
    params = global_params(q, ft)
    assert len(params) == len({id(p) for p in params}) == 3 + 4      # 1 shared + conv5 + fc codebooks, 2 BN x 2
    path = bitdown.save(q, tmp_path / "ft.bitdown")
    loaded = serialize.apply(make_net(), *serialize.read(path))
    with torch.no_grad():
        assert torch.equal(loaded(batches()[0]), q(batches()[0]))


def test_weight_space_baseline_shares_without_data(monkeypatch):
    """objective='weights' learns the shared codebook by plain k-means on the weights: no statistics
    pass for it (collect_stats is never called) and the result is deterministic."""
    calls = []
    real = bc.collect_stats
    monkeypatch.setattr(bc, "collect_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    c = cfg(em={"n_iter": 10, "objective": "weights", "error_feedback": False, "code_reopt": 0,
                "codebook_refit": False, "teacher_target": False})
    q = bitdown.compress(make_net(), batches(), c, progress=False)
    assert calls == []
    mods = dict(q.named_modules())
    assert mods["conv2"].codebook is mods["conv4"].codebook


def test_resume_with_two_groups_is_identical(monkeypatch, tmp_path):
    """Each group's seed does not depend on how many groups were already started."""
    # d = 8 everywhere: conv2 + conv3 share group a, conv4 (8x8x3x3) + conv5 (16x8x1x1) group b
    c = cfg(name_overrides={"conv[23]": {"share": "a"}, "conv[45]": {"share": "b"}},
            type_overrides={"convkxk": {"block_size": 8}, "conv1x1": {"block_size": 8}})
    ref = bitdown.save(bitdown.compress(make_net(), batches(), c, progress=False), tmp_path / "ref.bitdown")
    real, calls = bc.assign_codes, []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real(*a, **kw)
    monkeypatch.setattr(bc, "assign_codes", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        bitdown.compress(make_net(), batches(), c, checkpoint_dir=tmp_path / "ck", progress=False)
    monkeypatch.setattr(bc, "assign_codes", real)
    resumed = bitdown.compress(make_net(), batches(), c, checkpoint_dir=tmp_path / "ck", progress=False)
    assert sorted(share_groups(resumed.bitdown.plans)) == ["a", "b"]
    assert bitdown.save(resumed, tmp_path / "r.bitdown").read_bytes() == ref.read_bytes()


def test_untied_group_refused_at_save(shared_model, tmp_path):
    import copy
    q = copy.deepcopy(shared_model)
    sd = {k: v.clone() for k, v in q.state_dict().items()}
    sd["conv3.codebook"] = sd["conv3.codebook"] + 1.0
    q.load_state_dict(sd, assign=True)                          # unties the group, conv3 now differs
    with pytest.raises(ValueError, match="'conv2' and 'conv3' share a codebook.*different"):
        bitdown.save(q, tmp_path / "u.bitdown")
    assert not (tmp_path / "u.bitdown").exists()


def test_share_same_shape_singletons_behave_like_plain_layers():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 16, 3), nn.Flatten(),
                          nn.Linear(16, 2))
    plain_plans, plain_skipped = resolve_plan(model, QuantConfig())
    plans, skipped = resolve_plan(model, QuantConfig(share_same_shape=True))
    assert set(skipped) == set(plain_skipped) and "4" in skipped            # too few subvectors: skipped
    assert [p.name for p in plans] == [p.name for p in plain_plans]


def test_explicit_none_opts_out_of_share_same_shape():
    plans, _ = resolve_plan(make_net(), QuantConfig(share_same_shape=True, name_overrides={"conv3": {"share": None}}))
    groups = share_groups(plans)
    assert [[p.name for p in ms] for ms in groups.values()] == [["conv2", "conv4"]]
    assert next(p for p in plans if p.name == "conv3").share is None


def test_file_with_a_non_string_group_is_refused(shared_model, tmp_path):
    tensors, meta = serialize.read(bitdown.save(shared_model, tmp_path / "s.bitdown"))
    meta["layers"][0]["share"] = ["g"]
    meta["checksum"] = serialize.checksum(tensors, meta)
    serialize.write_stored(tmp_path / "bad.bitdown", tensors, meta)
    with pytest.raises(BitdownFileError, match="corrupt layer list"):
        serialize.apply(make_net(), *serialize.read(tmp_path / "bad.bitdown"))
