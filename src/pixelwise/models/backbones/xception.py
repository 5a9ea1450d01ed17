"""Aligned Xception-65 (Chen et al. 2018, DeepLab v3+ Fig. 4) as a dilatable feature extractor.

Entry flow: conv 32 3x3 stride 2, conv 64 3x3, then three blocks (128, 256, 728 channels)
whose max-pools are replaced by a strided separable conv. Middle flow: 16 blocks of three
728-channel separable convs with an identity shortcut. Exit flow: a (728, 1024, 1024)
block with stride 2, then separable convs of 1536, 1536 and 2048 channels. Every
separable conv is depthwise 3x3 -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU (the paper
adds BN + ReLU after each depthwise conv, as MobileNet does); strided blocks add a
1x1-conv + BN shortcut.

``forward`` returns ``{"c1": 64 ch stride 2, "c2": 256 ch stride 4, "c3": 256 ch stride 8,
"c4": 728 ch stride 16, "c5": 2048 ch stride 32}`` (nominal strides). ``c2`` is the
output of the second separable conv of entry block 2, the stride-4 features the DeepLab
v3+ decoder reads (TF DeepLab: ``entry_flow/block2/unit_1/.../separable_conv2``); ``c4``
is the middle-flow output. Output stride 16 or 8 trades the last strides for dilation as
TF DeepLab does: the block that loses its stride keeps the current rate and every later
block uses the rate multiplied by that stride, which is the exact atrous algorithm.
``multi_grid`` multiplies the rates of the three convs of the last exit block.

There is no torchvision Xception; keys are ``conv1``, ``conv2``, ``entry_flow.{0-2}``,
``middle_flow.{0-15}``, ``exit_flow.{0-1}`` with ``convs.{0-2}`` and ``shortcut`` inside.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from pixelwise.models.layers import ConvBNReLU, SeparableConv2d


class XceptionBlock(nn.Module):
    """Three separable 3x3 convs (the last one strided) plus a residual connection.

    Args:
        in_channels: input channels.
        channels: output channels of the three separable convs.
        stride: stride of the third separable conv and of the shortcut.
        shortcut: ``"conv"`` (1x1 conv + BN), ``"sum"`` (identity) or ``"none"``.
    """

    def __init__(
        self,
        in_channels: int,
        channels: tuple[int, int, int],
        stride: int = 1,
        shortcut: Literal["conv", "sum", "none"] = "conv",
    ) -> None:
        super().__init__()
        c0, c1, c2 = channels
        self.stride = stride
        self.convs = nn.Sequential(
            SeparableConv2d(in_channels, c0),
            SeparableConv2d(c0, c1),
            SeparableConv2d(c1, c2, stride=stride),
        )
        self.shortcut = None
        if shortcut == "conv":
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, c2, 1, stride, bias=False), nn.BatchNorm2d(c2))
        self.identity = shortcut == "sum"

    def set_stride_dilation(self, stride: int, dilations: Sequence[int]) -> None:
        """Set the block's stride and the dilation of each of its three depthwise convs."""
        for sep, dilation in zip(self.convs, dilations):
            depthwise = sep[0][0]
            depthwise.dilation = depthwise.padding = (dilation, dilation)
        self.convs[2][0][0].stride = (stride, stride)
        if self.shortcut is not None:
            self.shortcut[0].stride = (stride, stride)

    def forward_with_skip(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (block output, output of the second separable conv)."""
        skip = self.convs[1](self.convs[0](x))
        out = self.convs[2](skip)
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        elif self.identity:
            out = out + x
        return out, skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_skip(x)[0]


class Xception65(nn.Module):
    """Aligned Xception-65 feature extractor (see module docstring).

    Args:
        in_channels: input image channels.
        output_stride: 32 (plain), 16 or 8 (later strides traded for dilation).
        multi_grid: rate multipliers of the three convs of the last exit-flow block;
            ``None`` means ``(1, 1, 1)``.
    """

    def __init__(self, in_channels: int = 3, output_stride: int = 32, multi_grid: Sequence[int] | None = None) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(in_channels, 32, 3, stride=2)
        self.conv2 = ConvBNReLU(32, 64, 3)
        self.entry_flow = nn.Sequential(
            XceptionBlock(64, (128, 128, 128), stride=2),
            XceptionBlock(128, (256, 256, 256), stride=2),
            XceptionBlock(256, (728, 728, 728), stride=2),
        )
        self.middle_flow = nn.Sequential(*(XceptionBlock(728, (728, 728, 728), shortcut="sum") for _ in range(16)))
        self.exit_flow = nn.Sequential(
            XceptionBlock(728, (728, 1024, 1024), stride=2),
            XceptionBlock(1024, (1536, 1536, 2048), shortcut="none"),
        )
        self.out_channels = {"c1": 64, "c2": 256, "c3": 256, "c4": 728, "c5": 2048}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.set_output_stride(output_stride, multi_grid)

    def set_output_stride(self, output_stride: int, multi_grid: Sequence[int] | None = None) -> None:
        """Re-wire strides and dilations in place; the weights stay the same."""
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride={output_stride} is not supported; choose 8, 16 or 32")
        multi_grid = tuple(multi_grid) if multi_grid is not None else (1, 1, 1)
        if len(multi_grid) != 3:
            raise ValueError(f"multi_grid={multi_grid} needs one rate per conv of the last exit-flow block (3 values)")
        blocks = [*self.entry_flow, *self.middle_flow, *self.exit_flow]
        current, rate = 2, 1  # after the stride-2 conv1
        for block in blocks:
            grid = multi_grid if block is blocks[-1] else (1, 1, 1)
            if current == output_stride:
                block.set_stride_dilation(1, [rate * g for g in grid])
                rate *= block.stride
            else:
                block.set_stride_dilation(block.stride, grid)
                current *= block.stride
        self.output_stride = output_stride
        self.multi_grid = multi_grid

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, C, H, W) -> dict of feature maps ``c1``..``c5`` (see module docstring)."""
        c1 = self.conv2(self.conv1(x))
        c3, c2 = self.entry_flow[1].forward_with_skip(self.entry_flow[0](c1))
        c4 = self.middle_flow(self.entry_flow[2](c3))
        c5 = self.exit_flow(c4)
        return {"c1": c1, "c2": c2, "c3": c3, "c4": c4, "c5": c5}
