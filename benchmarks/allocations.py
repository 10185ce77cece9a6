"""Size allocations of a zoo model computed on the CPU, for runs elsewhere (e.g. on a GPU machine, with
`budget.py --allocation FILE`), on exactly the calibration images budget.py uses.

    python benchmarks/allocations.py --model efficientnet_lite0 --codebook-bits 8 --teacher-target \
        --calib-images 128 --specs 25:sensitivity:0.3,25:none:0.3,20:sensitivity:0.3,25:sensitivity:0.4

Each spec is ratio:weighting:max_error ('none' for no cap); writes
benchmarks/results/alloc_<model>_<ratio>_<weighting>_<cap>[_menu-<options>].json (allocate.budget_config's
report). `--alloc-menu int8,int4,fp16` offers those options beyond PQ (QuantConfig.alloc_menu).
The rate-distortion table is measured once for all specs (allocate.measure_options keeps it).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json

from accuracy import RESULTS, datasets

from bitdown.allocate import budget_config
from bitdown.compress import forward_order, take_images
from bitdown.config import EMConfig
from bitdown.data import make_loader
from bitdown.recipes import zoo_config
from bitdown.zoo import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--codebook-bits", type=int, default=8)
    p.add_argument("--teacher-target", action="store_true")
    p.add_argument("--calib-images", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--specs", required=True)
    p.add_argument("--alloc-menu", default="", help="options beyond PQ the allocator may pick (QuantConfig.alloc_menu), "
                                                    "comma-separated: int8,int4,int3,int2,fp16")
    a = p.parse_args()
    calib, _, _ = datasets(a.model, a.seed)
    student = copy.deepcopy(build_model(a.model)).eval()
    em = EMConfig(teacher_target=True) if a.teacher_target else EMConfig()
    menu = [m for m in a.alloc_menu.split(",") if m]
    cfg = zoo_config(a.model, "small", calib_images=a.calib_images, seed=a.seed, codebook_bits=a.codebook_bits, em=em,
                     alloc_menu=menu)
    batches = take_images(make_loader(calib, 128, shuffle=True, seed=a.seed), cfg.calib_images, cfg.batch_size)
    order = forward_order(student, batches[0][:2])        # as budget.py -> compress() see them
    for spec in a.specs.split(","):
        ratio, weighting, cap = spec.split(":")
        c = dataclasses.replace(cfg, alloc_weighting=weighting, alloc_max_error=None if cap == "none" else float(cap))
        try:
            _, rep = budget_config(student, batches, c, float(ratio), None, order, extra=c.alloc_menu)
        except ValueError as e:
            print(spec, "refused:", e, flush=True)
            continue
        out = RESULTS / (f"alloc_{a.model}_{ratio}_{weighting}_{cap}" + (f"_menu-{'-'.join(menu)}" if menu else "")
                         + ".json")
        out.write_text(json.dumps(rep))
        errs = [lay["rel_err2"] for lay in rep["layers"].values()]
        print(spec, f"ratio {rep['ratio']:.2f}, max layer error {max(errs):.3f}, sum {sum(errs):.3f} -> {out.name}",
              flush=True)


if __name__ == "__main__":
    main()
