"""Checkpoints made by earlier sessions must keep resuming: a new QuantConfig / FinetuneConfig key changes the
run's fingerprint unless it is listed in compress.ADDED_KEYS (or NEUTRAL_KEYS) at its default. These pins are the
fingerprints of the default configs (and one non-default one) as session 10 computed them (commit 2c3eef9); a new
key that is forgotten there breaks them, and with them every user's resume."""
import importlib

from bitdown.checkpoint import fingerprint
from bitdown.config import QuantConfig
from bitdown.finetune import FinetuneConfig

bc = importlib.import_module("bitdown.compress")


def _fp(d: dict) -> str:
    return fingerprint(bc._fp_json(d))


def test_default_configs_keep_the_session_10_fingerprints():
    assert _fp(QuantConfig().to_json()) == "3c85c56b8ebc30fa"
    assert _fp(FinetuneConfig().to_json()) == "57e39a6574ee6faa"
    assert _fp(QuantConfig(n_centroids=64, reconstruct={"steps": 5}).to_json()) == "ac9fbaf07919fb68"


def test_a_non_default_new_key_changes_the_fingerprint():
    assert _fp(QuantConfig(stats_positions=256).to_json()) != _fp(QuantConfig().to_json())
    assert _fp(FinetuneConfig(loss="mse").to_json()) != _fp(FinetuneConfig().to_json())


def test_a_refused_checkpoint_names_what_changed(tmp_path):
    """A checkpoint records the run's readable settings beside its fingerprint; a refusal lists the keys that
    differ, and one written before settings were recorded (session 14 and earlier) says so."""
    import pytest
    import torch

    from bitdown.checkpoint import RunKey, load_checkpoint, save_checkpoint

    old = {"finetune": {"global_steps": 300, "mixup": 0.0}, "quant": {"preset": "small"}}
    save_checkpoint(tmp_path / "a", {"w": torch.zeros(2)}, {"fingerprint": "aaaa", "settings": old})
    now = {"finetune": {"global_steps": 3000, "mixup": 0.0}, "quant": {"preset": "small", "seed": 1}}
    with pytest.raises(ValueError, match="belongs to another run") as e:
        load_checkpoint(tmp_path / "a", RunKey("bbbb", now))
    assert "finetune.global_steps: 300 in the checkpoint, 3000 now" in str(e.value)
    assert "quant.seed: not set in the checkpoint, 1 now" in str(e.value) and "mixup" not in str(e.value)
    assert load_checkpoint(tmp_path / "a", RunKey("aaaa", now))[1]["settings"] == old    # the hash decides
    save_checkpoint(tmp_path / "b", {"w": torch.zeros(2)}, {"fingerprint": "aaaa"})
    with pytest.raises(ValueError, match="records no settings"):
        load_checkpoint(tmp_path / "b", RunKey("bbbb", now))
