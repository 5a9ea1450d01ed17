"""ResNet-18/34/50/101 (He et al. 2016, v1.5 strides) with DeepLab-style dilation.

State-dict keys equal torchvision's ``resnet*`` (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``layerN.0.downsample.{0,1}``), minus the ``fc`` classifier, so a local torchvision
checkpoint loads with :func:`pixelwise.models.backbones.load_backbone_weights`.

``forward`` returns ``{"c1": stride 2, "c2": 4, "c3": 8, "c4": 16, "c5": 32}`` (nominal
strides); with ``output_stride`` 16 or 8, stride is traded for dilation in ``c5`` (and
``c4``), so e.g. at output stride 8 ``c3``, ``c4`` and ``c5`` all have stride 8.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def set_stride_dilation(self, stride: int, dilation: int, dilation_after: int) -> None:
        """``dilation`` for the (formerly) strided conv, ``dilation_after`` for the convs after it."""
        self.conv1.stride = (stride, stride)
        self.conv1.dilation = self.conv1.padding = (dilation, dilation)
        self.conv2.dilation = self.conv2.padding = (dilation_after, dilation_after)
        if self.downsample is not None:
            self.downsample[0].stride = (stride, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        width = channels
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, channels * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def set_stride_dilation(self, stride: int, dilation: int, dilation_after: int) -> None:
        """``dilation`` for the (formerly) strided conv; the 1x1 convs after it need none."""
        self.conv2.stride = (stride, stride)
        self.conv2.dilation = self.conv2.padding = (dilation, dilation)
        if self.downsample is not None:
            self.downsample[0].stride = (stride, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


_DEPTHS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


STEMS = {"standard": 64, "deep": 128}
"""Stem name -> its output channels (``c1``)."""


class ResNet(nn.Module):
    """ResNet feature extractor.

    Args:
        depth: 18, 34, 50 or 101.
        in_channels: input image channels.
        output_stride: 32 (plain), 16 (``c5`` dilated) or 8 (``c4`` and ``c5`` dilated).
        multi_grid: unit rates of ``c5``'s blocks, multiplied by its block rate (DeepLab v3
            Sec. 3.2 uses ``(1, 2, 4)``); ``None`` is torchvision's dilation.
        stem: ``"standard"`` (torchvision's 7x7 conv 64) or ``"deep"``: three 3x3 convs
            (64 stride 2, 64, 128), each but the last with BN + ReLU, as the ResNet of
            PSPNet's released models (``conv1_1_3x3_s2`` .. ``conv1_3_3x3``); ``conv1`` is
            then that sequence, ``bn1`` has 128 channels and so does ``c1``.
    """

    def __init__(
        self,
        depth: int = 50,
        in_channels: int = 3,
        output_stride: int = 32,
        multi_grid: Sequence[int] | None = None,
        stem: Literal["standard", "deep"] = "standard",
    ) -> None:
        super().__init__()
        if depth not in _DEPTHS:
            raise ValueError(f"ResNet depth={depth} is not supported; choose one of {sorted(_DEPTHS)}")
        if stem not in STEMS:
            raise ValueError(f"stem={stem!r} is not supported; choose one of {list(STEMS)}")
        block, layers = _DEPTHS[depth]
        self.depth = depth
        self.stem = stem
        if stem == "deep":
            self.conv1: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, 64, 3, 2, 1, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
                nn.Conv2d(64, 64, 3, 1, 1, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
                nn.Conv2d(64, 128, 3, 1, 1, bias=False),
            )
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        stem_channels = STEMS[stem]
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self._in = stem_channels
        self.layer1 = self._make_layer(block, 64, layers[0], stride=1)
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        e = block.expansion
        self.out_channels = {"c1": stem_channels, "c2": 64 * e, "c3": 128 * e, "c4": 256 * e, "c5": 512 * e}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.set_output_stride(output_stride, multi_grid)

    def _make_layer(self, block: type[nn.Module], channels: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._in != channels * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self._in, channels * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(channels * block.expansion),
            )
        layers = [block(self._in, channels, stride, downsample)]
        self._in = channels * block.expansion
        layers += [block(self._in, channels) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def set_output_stride(self, output_stride: int, multi_grid: Sequence[int] | None = None) -> None:
        """Re-wire strides and dilations in place; the weights stay the same.

        The block that gives up its stride keeps the rate in force before it and later
        blocks double it (torchvision's ``replace_stride_with_dilation`` and TF DeepLab's
        rule), so the network at output stride 8 computes exactly the stride-16 features
        densely: a model trained at output stride 16 can be evaluated at 8 (DeepLab v3,
        Sec. 4.1).

        ``multi_grid`` (DeepLab v3, Sec. 3.2) gives layer4's blocks unit rates that are
        multiplied by layer4's block rate (1 at output stride 32, 2 at 16, 4 at 8), every
        block including the first: (1, 2, 4) gives rates (2, 4, 8) at output stride 16 and
        (4, 8, 16) at 8, as in the paper. The switch from 16 to 8 stays exact, since every
        rate after the removed stride doubles. ``None`` keeps torchvision's layer4 (first
        block at the previous rate, the others at the block rate: (1, 2, 2) at 16).
        """
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride={output_stride} is not supported; choose 8, 16 or 32")
        n4 = len(self.layer4)
        if multi_grid is not None and len(multi_grid) != n4:
            raise ValueError(f"multi_grid={tuple(multi_grid)} needs one rate per block of layer4 ({n4} blocks)")
        rate = 1
        for layer, dilate in ((self.layer3, output_stride <= 8), (self.layer4, output_stride <= 16)):
            before = rate
            rate *= 2 if dilate else 1
            layer[0].set_stride_dilation(1 if dilate else 2, before, rate)
            for blk in layer[1:]:
                blk.set_stride_dilation(1, rate, rate)
        if multi_grid is not None:
            first_stride = 1 if output_stride <= 16 else 2
            for i, (blk, unit) in enumerate(zip(self.layer4, multi_grid)):
                blk.set_stride_dilation(first_stride if i == 0 else 1, rate * unit, rate * unit)
        self.output_stride = output_stride
        self.multi_grid = tuple(multi_grid) if multi_grid is not None else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, C, H, W) -> dict of feature maps ``c1``..``c5`` (see module docstring)."""
        c1 = self.relu(self.bn1(self.conv1(x)))
        c2 = self.layer1(self.maxpool(c1))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return {"c1": c1, "c2": c2, "c3": c3, "c4": c4, "c5": c5}

