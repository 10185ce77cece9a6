"""Bytes of bitdown files by part, against the paper-style size (issue 16: files at <= 1.10x it).

    python benchmarks/file_size.py FILE.bitdown ... [--resave-dir DIR] [--json OUT.json] [--md OUT.md]
    python benchmarks/file_size.py --build-r20x20 r20x20.bitdown ...   # first build the ResNet-20 20x file

Each file is profiled: container (safetensors header) bytes, the stored tensors' bytes by kind (codes,
codebook, BatchNorm statistics, ...), the metadata JSON (plain and zlib), and the file over the paper-style
size (size.py). `--resave-dir` loads every file and saves it there with this bitdown's format, profiled too
(the same model: `load` gives identical states). `--build-r20x20` first compresses the real ResNet-20 at a 20x
budget with cheap settings (256 random calibration images, 3 EM iterations, no fine-tuning: the file's layout
and size are those of a real 20x run, not its accuracy).
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
import zlib
from collections import Counter
from pathlib import Path

import torch

import bitdown
from bitdown import serialize


def build_r20x20(path: Path) -> Path:
    from bitdown.recipes import zoo_config
    from bitdown.zoo import build_model

    torch.manual_seed(0)
    data = [torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    cfg = zoo_config("resnet20_cifar10", "small", calib_images=256, em={"n_iter": 3})
    q = bitdown.compress(build_model("resnet20_cifar10"), data, cfg, progress=False, target_ratio=20,
                         arch={"name": "resnet20_cifar10", "source": "zoo", "preprocess": "cifar10"})
    return bitdown.save(q, path)


def profile(path: Path) -> dict:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    outer = json.loads(json.loads(raw[8:8 + n])["__metadata__"]["bitdown"])
    tensors, meta = serialize.read_stored(path)
    by_kind, count = Counter(), Counter()
    for name, t in tensors.items():
        kind = name.rpartition(".")[2]
        by_kind[kind] += t.numel() * t.element_size()
        count[kind] += 1
    text = json.dumps(meta, separators=(",", ":"))
    out = {"file": path.name, "format_version": outer["format_version"], "file_bytes": len(raw),
           "paper_bytes": meta.get("size", {}).get("size_bytes"), "tensors": len(tensors),
           "safetensors_header_bytes": 8 + n, "tensor_bytes": sum(by_kind.values()),
           "metadata_json_bytes": len(text), "metadata_json_zlib_bytes": len(zlib.compress(text.encode(), 9)),
           "metadata_sections": {k: len(json.dumps(v, separators=(",", ":"))) for k, v in meta.items()},
           "by_kind": {k: {"tensors": count[k], "bytes": by_kind[k]} for k in sorted(by_kind)}}
    if out["paper_bytes"]:
        out["file_over_paper"] = round(len(raw) / out["paper_bytes"], 4)
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| file | format | file bytes | paper-style bytes | file / paper | container header | stored tensors "
             "| of which BN running stats | metadata JSON (zlib) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bn = sum(r["by_kind"].get(k, {}).get("bytes", 0) for k in ("running_mean", "running_var", "num_batches_tracked"))
        lines.append(f"| {r['file']} | {r['format_version']} | {r['file_bytes']:,} | {r['paper_bytes']:,.0f} | "
                     f"{r.get('file_over_paper', float('nan')):.3f}x | {r['safetensors_header_bytes']:,} | "
                     f"{r['tensor_bytes']:,} ({r['tensors']} tensors) | {bn:,} | {r['metadata_json_bytes']:,} "
                     f"({r['metadata_json_zlib_bytes']:,}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", type=Path, nargs="*")
    p.add_argument("--build-r20x20", type=Path, help="first build the ResNet-20 20x file here (then profiled)")
    p.add_argument("--resave-dir", type=Path, help="load each file and save it here with the current format")
    p.add_argument("--json", type=Path, help="write the profiles here")
    p.add_argument("--md", type=Path, help="write a markdown table here")
    a = p.parse_args(argv)
    files = list(a.files) + ([build_r20x20(a.build_r20x20)] if a.build_r20x20 else [])
    rows = [profile(f) for f in files]
    if a.resave_dir:
        a.resave_dir.mkdir(parents=True, exist_ok=True)
        for f in files:
            out = a.resave_dir / f"{f.stem}_v{serialize.FORMAT_VERSION}.bitdown"
            rows.append(profile(bitdown.save(bitdown.load(f), out)))
    print(markdown(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")
    if a.md:
        a.md.write_text(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
