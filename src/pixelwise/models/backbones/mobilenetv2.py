"""MobileNetV2 (Sandler et al. 2018, width 1.0) as a dilatable feature extractor for DeepLab.

State-dict keys equal torchvision's ``mobilenet_v2`` ``features.0`` .. ``features.17``, so a
local torchvision checkpoint loads with
:func:`pixelwise.models.backbones.load_backbone_weights` (its ``features.18`` and
``classifier`` keys are skipped). The final 1x1 conv to 1280 channels is not built: like
DeepLab-MobileNetV2 (TF DeepLab, ``final_endpoint="layer_18"``) the features end at the
last inverted residual, 320 channels.

``forward`` returns ``{"c1": 16 ch stride 2, "c2": 24 ch stride 4, "c3": 32 ch stride 8,
"c4": 96 ch stride 16, "c5": 320 ch stride 32}`` (nominal strides). With ``output_stride``
16 or 8 the later strides become 1 and the following depthwise convs are dilated, as in
TF DeepLab: the block that loses its stride keeps the current rate and every later block
uses the rate multiplied by that stride. This is the exact atrous algorithm: in eval mode,
``c5`` at output stride 8 sampled at every other row and column equals ``c5`` at 16.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# (expansion t, channels c, repeats n, first stride s), Table 2 of the paper.
MOBILENETV2_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# Index in ``features`` of the last block of each stage returned as c1..c5.
_TAPS = {1: "c1", 3: "c2", 6: "c3", 13: "c4", 17: "c5"}


class ConvBNReLU6(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU6, "same" padding (torchvision's ``Conv2dNormActivation``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """1x1 expansion -> 3x3 depthwise -> linear 1x1 projection, with identity shortcut when shapes allow.

    Keys ``conv.{i}`` as torchvision (no expansion conv when ``expand_ratio`` is 1).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.stride = stride
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = [] if expand_ratio == 1 else [ConvBNReLU6(in_channels, hidden, 1)]
        layers += [
            ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def set_stride_dilation(self, stride: int, dilation: int) -> None:
        """Set the depthwise conv's stride and dilation (padding follows the dilation)."""
        depthwise = self.conv[-3][0]
        depthwise.stride = (stride, stride)
        depthwise.dilation = depthwise.padding = (dilation, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """MobileNetV2 feature extractor (see module docstring).

    Args:
        in_channels: input image channels.
        output_stride: 32 (plain), 16 or 8 (later strides traded for dilation).
    """

    def __init__(self, in_channels: int = 3, output_stride: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU6(in_channels, 32, 3, 2)]
        c = 32
        for t, out, n, s in MOBILENETV2_SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        self.features = nn.Sequential(*layers)
        self.out_channels = {"c1": 16, "c2": 24, "c3": 32, "c4": 96, "c5": 320}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.multi_grid = None
        self.set_output_stride(output_stride)

    def set_output_stride(self, output_stride: int, multi_grid: Sequence[int] | None = None) -> None:
        """Re-wire strides and dilations in place; the weights stay the same.

        ``multi_grid`` exists for a signature shared with the other backbones and must be
        ``None``: DeepLab-MobileNetV2 has no multi-grid.
        """
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride={output_stride} is not supported; choose 8, 16 or 32")
        if multi_grid is not None:
            raise ValueError(f"multi_grid={multi_grid} is not supported by mobilenetv2; pass multi_grid=None")
        current, rate = 2, 1  # after the stride-2 stem conv
        for block in self.features[1:]:
            if current == output_stride:
                block.set_stride_dilation(1, rate)
                rate *= block.stride
            else:
                block.set_stride_dilation(block.stride, 1)
                current *= block.stride
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, C, H, W) -> dict of feature maps ``c1``..``c5`` (see module docstring)."""
        out = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out[_TAPS[i]] = x
        return out
