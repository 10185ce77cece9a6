"""YOLOv5n v6.0 (ultralytics) in plain PyTorch, laid out so that the release checkpoints load strictly.

The detector is ``YOLOv5.model``, an ``nn.Sequential`` of 25 layers (indices 0..24) whose state-dict keys
are exactly the checkpoint's ``model.N.*``: backbone 0-9 (6x6 stride-2 stem ``Conv``, ``Conv`` / ``C3``
stages, ``SPPF``), FPN/PAN neck 10-23 (``nn.Upsample``, ``Concat``, ``C3`` without shortcuts) and the
``Detect`` head 24 (three 1x1 convs on strides 8 / 16 / 32, 3 anchors each, ``anchors`` buffer in grid
units as in the checkpoint). ``Conv`` = conv (no bias) + BatchNorm (eps 1e-3, momentum 0.03) + SiLU.

Outputs (one design for evaluation, distillation and export):

- ``model(x)`` returns the **raw head maps** in every mode: a list of 3 tensors ``(N, 3 * (5 + nc), H, W)``
  (``H, W`` = input / 8, / 16, / 32), the Detect convs' outputs before any sigmoid. This is what
  bitdown's block reconstruction and distillation see (normalised MSE per map: a list of 4-D tensors),
  what the ONNX export writes, and it never changes with ``train()`` / ``eval()``.
- ``model.predict(x)`` (= ``model.decode(model(x))``) returns the decoded boxes ``(N, 3 * sum(H * W),
  5 + nc)``: ``cx, cy, w, h`` in input pixels, objectness and class probabilities (sigmoid), as
  YOLOv5's eval-mode ``Detect`` output; ``bitdown.detection.non_max_suppression`` turns them into boxes.
  ``Detect.decode`` is a pure function of the raw maps, so any model returning the maps (a compressed
  copy, a user module) can be decoded with its ``Detect`` submodule (``detection.find_detect``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)

# P3/8, P4/16, P5/32 anchors of the COCO models, in pixels (the checkpoint stores them divided by the stride)
ANCHORS_PX = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))
STRIDES = (8.0, 16.0, 32.0)


class Conv(nn.Module):
    """Conv2d (no bias, 'same' padding k // 2 unless given) + BatchNorm2d + SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2 if p is None else p, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 Conv, 3x3 Conv, plus the input when ``shortcut`` (and the channel counts agree)."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, e: float = 1.0) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1)
        self.add = shortcut and c1 == c2

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP bottleneck with 3 convs: cv3(cat(m(cv1(x)), cv2(x)))."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, e=1.0) for _ in range(n)))

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max-pools, concatenated."""

    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Concat(nn.Module):
    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.d = dim

    def forward(self, xs: list[Tensor]) -> Tensor:
        return torch.cat(xs, self.d)


class Detect(nn.Module):
    """The YOLOv5 head: one 1x1 conv per level giving ``na * (5 + nc)`` channels.

    ``forward`` returns the raw maps (list of ``(N, na * no, H, W)``); :meth:`decode` turns them into boxes.
    """

    def __init__(self, nc: int = 80, ch: tuple[int, ...] = (64, 128, 256),
                 anchors: tuple[tuple[int, ...], ...] = ANCHORS_PX, strides: tuple[float, ...] = STRIDES) -> None:
        super().__init__()
        self.nc, self.no = nc, nc + 5
        self.nl, self.na = len(anchors), len(anchors[0]) // 2
        stride = torch.tensor(strides, dtype=torch.float32)
        self.register_buffer("stride", stride, persistent=False)      # not in the checkpoint
        a = torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2)
        self.register_buffer("anchors", a / stride.view(-1, 1, 1))    # grid units, as the checkpoint
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        return [conv(x) for conv, x in zip(self.m, xs)]

    def decode(self, raw: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
        """Raw maps -> ``(N, boxes, 5 + nc)``: cx, cy, w, h (input pixels), objectness, class probabilities."""
        out = []
        for i, x in enumerate(raw):
            n, _, ny, nx = x.shape
            y = x.view(n, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).float().sigmoid()
            gy, gx = torch.meshgrid(torch.arange(ny, device=x.device, dtype=y.dtype),
                                    torch.arange(nx, device=x.device, dtype=y.dtype), indexing="ij")
            grid = torch.stack((gx, gy), -1).view(1, 1, ny, nx, 2)
            stride = self.stride[i].to(y.dtype)
            anchor_px = (self.anchors[i] * stride).to(y.dtype).view(1, self.na, 1, 1, 2)
            xy = (y[..., 0:2] * 2 - 0.5 + grid) * stride
            wh = (y[..., 2:4] * 2) ** 2 * anchor_px
            out.append(torch.cat((xy, wh, y[..., 4:]), -1).view(n, -1, self.no))
        return torch.cat(out, 1)


class YOLOv5(nn.Module):
    """YOLOv5 v6.0 (P3-P5) with depth / width multiples; ``yolov5n``: 0.33 / 0.25."""

    # (from, module) of the v6.0 yolov5*.yaml: backbone 0-9, head 10-24
    FROM: tuple[int | tuple[int, ...], ...] = (
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,          # backbone
        -1, -1, (-1, 6), -1, -1, -1, (-1, 4), -1,          # FPN: 10-17 (P3 out)
        -1, (-1, 14), -1, -1, (-1, 10), -1,                 # PAN: 18-23 (P4, P5 out)
        (17, 20, 23),                                       # Detect
    )

    def __init__(self, depth: float = 0.33, width: float = 0.25, nc: int = 80) -> None:
        super().__init__()

        def c(ch: int) -> int:       # width multiple, rounded up to a multiple of 8 (YOLOv5's make_divisible)
            return int(-(-ch * width // 8) * 8)

        def n(k: int) -> int:
            return max(round(k * depth), 1)

        c64, c128, c256, c512, c1024 = c(64), c(128), c(256), c(512), c(1024)
        up = lambda: nn.Upsample(scale_factor=2.0, mode="nearest")  # noqa: E731
        self.model = nn.Sequential(
            Conv(3, c64, 6, 2, 2),                      # 0  P1/2
            Conv(c64, c128, 3, 2),                      # 1  P2/4
            C3(c128, c128, n(3)),                       # 2
            Conv(c128, c256, 3, 2),                     # 3  P3/8
            C3(c256, c256, n(6)),                       # 4
            Conv(c256, c512, 3, 2),                     # 5  P4/16
            C3(c512, c512, n(9)),                       # 6
            Conv(c512, c1024, 3, 2),                    # 7  P5/32
            C3(c1024, c1024, n(3)),                     # 8
            SPPF(c1024, c1024, 5),                      # 9
            Conv(c1024, c512, 1, 1),                    # 10
            up(),                                       # 11
            Concat(),                                   # 12 cat backbone P4
            C3(c1024, c512, n(3), shortcut=False),      # 13
            Conv(c512, c256, 1, 1),                     # 14
            up(),                                       # 15
            Concat(),                                   # 16 cat backbone P3
            C3(c512, c256, n(3), shortcut=False),       # 17 (P3/8-small)
            Conv(c256, c256, 3, 2),                     # 18
            Concat(),                                   # 19 cat head P4
            C3(c512, c512, n(3), shortcut=False),       # 20 (P4/16-medium)
            Conv(c512, c512, 3, 2),                     # 21
            Concat(),                                   # 22 cat head P5
            C3(c1024, c1024, n(3), shortcut=False),     # 23 (P5/32-large)
            Detect(nc, (c256, c512, c1024)),            # 24
        )
        self.names = COCO_CLASSES if nc == len(COCO_CLASSES) else tuple(str(i) for i in range(nc))
        self._keep = {i for f in self.FROM if isinstance(f, tuple) for i in f if i >= 0}

    @property
    def detect(self) -> Detect:
        return self.model[-1]

    def forward(self, x: Tensor) -> list[Tensor]:
        """Raw head maps: a list of 3 tensors ``(N, 3 * (5 + nc), H / s, W / s)``, s = 8, 16, 32."""
        saved: dict[int, Tensor] = {}
        for i, (f, layer) in enumerate(zip(self.FROM, self.model)):
            if isinstance(f, tuple):
                x = layer([x if j == -1 else saved[j] for j in f])
            else:
                x = layer(x)
            if i in self._keep:
                saved[i] = x
        return x

    def decode(self, raw: list[Tensor]) -> Tensor:
        return self.detect.decode(raw)

    def predict(self, x: Tensor) -> Tensor:
        """Decoded boxes ``(N, boxes, 5 + nc)`` (see the module docstring); no NMS."""
        return self.decode(self(x))


def yolov5n(nc: int = 80) -> YOLOv5:
    """YOLOv5n v6.0: depth 0.33, width 0.25 (1.87M parameters with 80 classes)."""
    return YOLOv5(0.33, 0.25, nc)
