"""How steady is QuantConfig.alloc_cap_rule 'measured'? On the plain CLI's own 128 calibration images of EfficientNet-Lite0
(recipe_cli.py's seeded 500/500 split, the CLI's data path and compact recipe), allocate.budget_config at 16x and 20x
with the cap selection's KL measured on the first 64 images (the default) and on all 128. Prints one JSON line per
(ratio, images): the picked cap and every cap's KL. Compare with the KL the CLI itself logged (results/recipe_cli.json
'cap_errors': the same images, batched in forward pieces there).

    python benchmarks/cap_select_noise.py > benchmarks/results/cap_select_noise.log    # ~25 min at one thread, loaded

Session 17: written for the DESIGN note on the rule's noise."""
import functools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import torch  # noqa: E402

import bitdown.allocate as al  # noqa: E402
from bitdown.assets import assets_dir  # noqa: E402
from bitdown.cli import _compress_data, _quant_config, build_parser, resolve_model  # noqa: E402
from bitdown.compress import forward_order, take_images  # noqa: E402
from bitdown.data import make_loader  # noqa: E402
from recipe_cli import _split_zips  # noqa: E402

torch.manual_seed(0)
tmp = Path(tempfile.mkdtemp())
calib_zip, _ = _split_zips(assets_dir() / "imagenet/imagenet-sample-images-256.zip", tmp)
a = build_parser().parse_args(["compress", "--model", "efficientnet_lite0", "--data", str(calib_zip), "--target-ratio", "16",
                               "--out", str(tmp / "m.bitdown"), "--seed", "0"])
model, arch = resolve_model(a.model, a.weights)
model.eval()
preprocess = a.preprocess or arch.get("preprocess")
arch["preprocess"] = preprocess
cfg = _quant_config(a, arch, "compact")
print(cfg.to_json(), flush=True)
calib, _ = _compress_data(a, model, preprocess, False, a.image_size)
batches = take_images(make_loader(calib, cfg.batch_size, shuffle=True, seed=0), cfg.calib_images, cfg.batch_size)
order = forward_order(model, batches[0][:2])
orig = al.measured_cap
out = {}
for ratio in (16, 20):
    for n in (64, 128):
        al.measured_cap = functools.partial(orig, n_images=n)
        t0 = time.time()
        _, rep = al.budget_config(model, batches, cfg, target_ratio=ratio, order=order, extra=cfg.alloc_menu, progress=False)
        out[f"{ratio}x_{n}"] = {"cap": rep["max_error"], "cap_errors": rep["cap_errors"], "s": round(time.time() - t0)}
        print(json.dumps({f"{ratio}x_{n}": out[f"{ratio}x_{n}"]}), flush=True)
shutil.rmtree(tmp, ignore_errors=True)
