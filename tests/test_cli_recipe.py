"""`bitdown compress` defaults are the recipe (recipes.default_recipe): no flag -> the recipe, --fast ->
the EM only, each flag given overrides its part, --config / --finetune-config on top; --help shows
every default and an example per command."""

from __future__ import annotations

import json

from bitdown.config import GRAD_SLICES, ReconstructConfig

import pytest

import bitdown
import bitdown.recipes as recipes
from bitdown.cli import build_parser, main
from test_cli import SPEC, assert_error, run, ws  # noqa: F401  (ws: the workspace fixture)

BASE = ["compress", "--model", SPEC, "--data", "imgs", "--preprocess", "cifar10", "--calib-images", "16",
        "--em-iters", "2", "--out", "m.bitdown", "--json"]


class Stop(Exception):
    """Raised by the stand-in compress: the test only looks at what the CLI passed."""


@pytest.fixture
def captured(ws, monkeypatch):  # noqa: F811
    """Run the CLI up to bitdown.compress and return the (QuantConfig, FinetuneConfig | None) it got."""
    seen = {}

    def fake_compress(model, data, config, **kw):
        seen["config"], seen["finetune"] = config, kw.get("finetune")
        raise Stop

    monkeypatch.setattr(bitdown, "compress", fake_compress)

    def call(*extra):
        seen.clear()
        with pytest.raises(Stop):
            main([str(x) for x in (*BASE, *extra)])
        return seen["config"], seen["finetune"]

    return call


def test_no_flag_is_the_default_recipe(captured):
    quant, ft = recipes.default_recipe()
    config, finetune = captured()
    assert config.codebook_bits == quant["codebook_bits"]
    for k, v in quant["reconstruct"].items():
        assert getattr(config.reconstruct, k) == v
    assert finetune is not None
    for k, v in ft.items():
        assert getattr(finetune, k) == v


def test_fast_is_the_em_only(captured):
    config, finetune = captured("--fast")
    assert config.reconstruct.steps == 0 and finetune is None
    assert config.codebook_bits == recipes.default_recipe(fast=True)[0]["codebook_bits"]


def test_flags_override_their_part_of_the_recipe(captured):
    quant, ft = recipes.default_recipe()
    config, finetune = captured("--global-steps", "7", "--codebook-bits", "16", "--distill-loss", "mse",
                                "--blocks", "conv2", "--blocks", "conv3|fc",
                                "--reconstruct", json.dumps({"drop_prob": 0.5}))
    assert finetune.global_steps == 7 and finetune.loss == "mse"
    assert finetune.batch_size == ft["batch_size"] and finetune.layer_steps == ft["layer_steps"]
    assert config.codebook_bits == 16 and config.blocks == ["conv2", "conv3|fc"]
    assert config.reconstruct.drop_prob == 0.5 and config.reconstruct.steps == quant["reconstruct"]["steps"]
    assert config.reconstruct.lr == quant["reconstruct"].get("lr", ReconstructConfig().lr)

    config, finetune = captured("--fast", "--global-steps", "3")      # an explicit flag wins over --fast too
    assert finetune.global_steps == 3 and config.reconstruct.steps == 0

    config, finetune = captured("--grad-slices", "8")              # one flag: both stages' gradient slices
    assert finetune.grad_slices == 8 and config.reconstruct.grad_slices == 8
    config, finetune = captured()
    assert finetune.grad_slices == config.reconstruct.grad_slices == GRAD_SLICES


def test_a_high_budget_distils_longer(captured, monkeypatch, caplog):
    """Above recipes.LONG_RATIO the default recipe's global stage is LONG_GLOBAL_STEPS long, whether the budget is a
    ratio or a size; at or below it, or without a budget, the recipe's 300; a flag still wins. (TinyNet reaches
    only ~6x, so the threshold is lowered for the test.)"""
    monkeypatch.setattr(recipes, "LONG_RATIO", 3.0)
    short = recipes.default_recipe()[1]["global_steps"]
    assert recipes.LONG_GLOBAL_STEPS > short
    with caplog.at_level("INFO", logger="bitdown"):
        _, finetune = captured("--target-ratio", "4")
    assert finetune.global_steps == recipes.LONG_GLOBAL_STEPS
    assert f"budget 4.0x is above 3x: the default recipe distils {recipes.LONG_GLOBAL_STEPS} global steps" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="bitdown"):
        _, finetune = captured("--target-ratio", "3")
    assert finetune.global_steps == short and "is above" not in caplog.text
    with caplog.at_level("INFO", logger="bitdown"):
        _, finetune = captured("--target-ratio", "4", "--finetune-config", json.dumps({"global_steps": 500}))
    assert finetune.global_steps == 500 and "is above" not in caplog.text         # the user's count: not claimed
    _, finetune = captured()
    assert finetune.global_steps == short
    _, finetune = captured("--target-size", str(6892 / 4))       # TinyNet's dense paper-style bytes / 4: 4x
    assert finetune.global_steps == recipes.LONG_GLOBAL_STEPS
    _, finetune = captured("--target-size", str(6892 / 2))
    assert finetune.global_steps == short
    _, finetune = captured("--target-ratio", "4", "--global-steps", "7")
    assert finetune.global_steps == 7
    _, finetune = captured("--target-ratio", "4", "--fast")
    assert finetune is None


def test_synthetic_data_distils_with_mixup_longer(ws, captured):  # noqa: F811
    """Images `bitdown synthesize` wrote (its manifest in the --data folder) get recipes.SYNTHETIC_FINETUNE on top of
    the default recipe; mixed with real --extra-data, --fast, or an explicit flag: not (or the flag wins)."""
    from bitdown.synthesize import MANIFEST

    _, finetune = captured()
    assert finetune.mixup == 0.0 and finetune.global_steps == recipes.default_recipe()[1]["global_steps"]
    (ws / "imgs" / MANIFEST).write_text("{}")
    _, finetune = captured()
    assert (finetune.mixup, finetune.global_steps) == (recipes.SYNTHETIC_FINETUNE["mixup"],
                                                       recipes.SYNTHETIC_FINETUNE["global_steps"])
    _, finetune = captured("--global-steps", "9", "--finetune-config", json.dumps({"mixup": 0.1}))
    assert (finetune.mixup, finetune.global_steps) == (0.1, 9)
    _, finetune = captured("--extra-data", "imgs")
    assert finetune.mixup == 0.0
    _, finetune = captured("--fast")
    assert finetune is None


def test_json_configs_go_on_top(captured):
    config, finetune = captured("--codebook-bits", "8", "--reconstruct", json.dumps({"steps": 5, "lr": 0.01}),
                                "--config", json.dumps({"codebook_bits": 16, "reconstruct": {"steps": 9}}),
                                "--finetune-config", json.dumps({"global_steps": 11, "loss": "kl"}))
    assert config.codebook_bits == 16
    assert (config.reconstruct.steps, config.reconstruct.lr) == (9, 0.01)
    assert finetune.global_steps == 11 and finetune.loss == "kl"


def test_bad_recipe_flags_are_errors(ws, capsys):  # noqa: F811
    rc, out, err = run(capsys, *BASE, "--reconstruct", "{steps: 3}")
    assert_error(rc, err, "--reconstruct is not valid JSON")
    rc, out, err = run(capsys, *BASE, "--reconstruct", json.dumps({"stepz": 3}))
    assert_error(rc, err, "stepz")
    rc, out, err = run(capsys, *BASE, "--blocks", "conv(")
    assert_error(rc, err, "conv(")
    rc, out, err = run(capsys, *BASE, "--distill-loss", "l1")
    assert rc == 2 and "invalid choice" in err


def test_default_recipe_end_to_end(ws, capsys, monkeypatch):  # noqa: F811
    """A real run without method flags writes what the recipe says (the recipe shrunk to stay fast)."""
    monkeypatch.setattr(recipes, "DEFAULT_QUANT", {"codebook_bits": 8, "reconstruct": {"steps": 2, "lr": 1e-3}})
    monkeypatch.setattr(recipes, "DEFAULT_FINETUNE", {"layer_steps": 0, "global_steps": 2, "batch_size": 8})
    rc, out, err = run(capsys, *BASE)
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["recipe"] == "default"
    rc, out, err = run(capsys, "info", "m.bitdown", "--json")
    info = json.loads(out)
    assert info["config"]["codebook_bits"] == 8 and info["config"]["reconstruct"]["steps"] == 2
    assert {p["codebook_bits"] for p in info["layers"]} == {8}


DW_MODULE = "bitdown_dwnet_cli"
DW_SOURCE = '''
import torch
import torch.nn as nn


class DWNet(nn.Module):
    """A compact net: a depthwise 3x3 between pointwise convs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.pw = nn.Conv2d(32, 128, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(128)
        self.fc = nn.Linear(128, 3)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.dw(x)))
        return self.fc(torch.relu(self.bn2(self.pw(x))).mean((2, 3)))


def build():
    torch.manual_seed(0)
    return DWNet()
'''


@pytest.fixture
def dw_spec(ws):  # noqa: F811
    (ws / f"{DW_MODULE}.py").write_text(DW_SOURCE)
    import sys
    sys.modules.pop(DW_MODULE, None)
    yield f"{DW_MODULE}:build"
    sys.modules.pop(DW_MODULE, None)


def test_eval_batch_size_scales_with_the_image():
    from bitdown.evaluate import eval_batch_size
    assert eval_batch_size((3, 32, 32)) == 256
    assert eval_batch_size((3, 64, 64)) == 64
    assert eval_batch_size((3, 224, 224)) == 16 == eval_batch_size((3, 640, 640))
    assert eval_batch_size((3, 8, 8)) == 256


def test_recipe_kind():
    import torch.nn as nn
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2))       # a grouped conv is not depthwise
    compact = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8))
    assert recipes.recipe_kind(plain, detector=False) == "default"
    assert recipes.recipe_kind(compact, detector=False) == "compact"
    assert recipes.recipe_kind(compact, detector=True) == "detector"
    with pytest.raises(ValueError, match="recipe must be one of"):
        recipes.recipe("fancy")


def test_compact_model_gets_the_compact_recipe(captured, dw_spec):
    quant, ft, data = recipes.compact_recipe()
    assert ft == {} and data["calib_images"] == 128
    config, finetune = captured("--model", dw_spec)
    assert finetune is None                                      # the EM only
    assert config.alloc_weighting == quant["alloc_weighting"] == "sensitivity"
    assert config.alloc_max_error == quant["alloc_max_error"]
    assert config.alloc_menu == quant["alloc_menu"] and config.codebook_bits == 8
    assert config.calib_images == 16                             # BASE's --calib-images wins over the recipe's
    import bitdown.cli as cli
    args = BASE[:BASE.index("--calib-images")] + BASE[BASE.index("--calib-images") + 2:]
    seen = {}

    def fake(model, data, config, **kw):
        seen["config"] = config
        raise Stop

    import pytest as _pytest
    with _pytest.MonkeyPatch.context() as mp:
        mp.setattr(bitdown, "compress", fake)
        with pytest.raises(Stop):
            cli.main([*args, "--model", dw_spec])
    assert seen["config"].calib_images == data["calib_images"]     # no flag: the compact recipe's 128
    config, finetune = captured("--model", dw_spec, "--global-steps", "5",
                                "--config", json.dumps({"alloc_menu": []}))
    assert finetune.global_steps == 5 and config.alloc_menu == []
    config, _ = captured()                                       # the plain TinyNet keeps the default recipe
    assert config.alloc_menu == [] and config.alloc_weighting == "none"


def test_compact_recipe_end_to_end(ws, capsys, dw_spec):  # noqa: F811
    """A real budget run of a compact net: the allocation may pick menu options; the file says which recipe; the
    JSON summary reports each satisfiable error cap's measured error and uses the least."""
    rc, out, err = run(capsys, *BASE, "--model", dw_spec, "--target-ratio", "3")
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["recipe"] == "compact" and res["ratio"] >= 3 * 0.99
    errors = {float(c): e for c, e in res["cap_errors"].items()}     # the measured caps: the least error is used
    assert len(errors) > 1 and res["alloc_max_error"] == min(errors, key=errors.get)
    rc, out, err = run(capsys, "info", "m.bitdown", "--json")
    info = json.loads(out)
    assert info["config"]["alloc_menu"] == ["int8", "int4", "int2", "fp16"]
    assert info["config"]["alloc_weighting"] == "sensitivity"


def _help(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main([*args, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_help_shows_defaults_and_an_example(capsys):
    quant, ft = recipes.default_recipe()
    text = " ".join(_help(capsys, "compress").split())          # unwrapped
    for expected in ("(default: 0)", "(default: 1024)", "(default: 30)", "(default: small)", "(default: 100)",
                     f"the recipe's {ft['global_steps']}", f"the recipe's {quant['codebook_bits']}",
                     f"the recipe's {ft['batch_size']}", "--fast", "--distill-loss", "--blocks", "--reconstruct",
                     "examples:", "bitdown compress --model"):
        assert expected in text, expected
    for cmd in ("size", "eval", "export", "info"):
        text = " ".join(_help(capsys, cmd).split())
        assert "example" in text and f"bitdown {cmd}" in text, cmd
    assert "default: 256 at 32x32 px" in " ".join(_help(capsys, "eval").split())
    assert "(default: 16)" in " ".join(_help(capsys, "size").split())


def test_every_option_with_a_default_shows_it():
    """No option has a default its --help does not state."""
    parser = build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for name, sub in subs.items():
        fmt = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.default is None or action.default is False \
                    or action.default == "==SUPPRESS==":
                continue
            assert action.help and "default" in fmt._get_help_string(action), (name, action.option_strings)


def test_compact_recipe_measures_its_error_cap(captured, dw_spec):
    """The compact recipe hands the allocator its whole cap list with the 'measured' rule at any budget (the cap is
    picked by measurement, not by the ratio); --config still wins."""
    quant = recipes.compact_recipe()[0]
    assert quant["alloc_cap_rule"] == "measured" and len(quant["alloc_max_error"]) > 1
    for ratio in ("2", "3"):
        config, _ = captured("--model", dw_spec, "--target-ratio", ratio)
        assert config.alloc_max_error == quant["alloc_max_error"] and config.alloc_cap_rule == "measured"
    config, _ = captured("--model", dw_spec, "--target-ratio", "3", "--config", json.dumps({"alloc_max_error": 0.5}))
    assert config.alloc_max_error == 0.5
