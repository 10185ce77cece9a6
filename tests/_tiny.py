"""A tiny user model (`tinymodel:tiny`) and random class-folder images, for tests that run the CLI in a folder."""
from __future__ import annotations

import random
import textwrap
from pathlib import Path

from PIL import Image

MODEL = textwrap.dedent('''
    import torch.nn as nn

    def tiny():
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
''')


def tiny_workdir(root: Path, per_class: int, size: int) -> Path:
    """`root` with tinymodel.py and imgs/class{0,1}/*.png: `per_class` random RGB images of size x size (seeded)."""
    (root / "tinymodel.py").write_text(MODEL)
    rng = random.Random(0)
    for c in range(2):
        d = root / "imgs" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            img = Image.new("RGB", (size, size))
            img.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size * size)])
            img.save(d / f"{i}.png")
    return root
