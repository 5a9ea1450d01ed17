"""Semantic FPN (Kirillov et al. 2019, "Panoptic Feature Pyramid Networks", https://arxiv.org/abs/1901.02446).

ResNet (output stride 32) -> FPN (Lin et al. 2017): 1x1 lateral convs to 256 channels on
``c2``..``c5``, top-down nearest upsampling + add, 3x3 output convs -> P2..P5 (strides 4,
8, 16, 32). Semantic head: per level, (3x3 conv 128 + GroupNorm(32) + ReLU + 2x bilinear
upsampling) repeated until stride 4 (P2 gets one conv and no upsampling), the four maps are
summed, a 1x1 conv gives class scores at stride 4, bilinear x4 to the input size.

Layout as in detectron2 / mmseg (``FPN`` + ``FPNHead``): lateral and output convs have a
bias, the head's convs do not (they are normalised), the classifier does; for 19 classes
this gives 28,478,675 (ResNet-50) / 47,470,803 (ResNet-101) parameters. Every upsampling
step targets the exact size of the next finer level, which is 2x when the input side is a
multiple of 32 and keeps odd-sized inputs aligned otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pixelwise.models.backbones import RESNET_DEPTHS, ResNet, create_backbone
from pixelwise.models.layers import resize_to

LEVELS = ("c2", "c3", "c4", "c5")


class FPN(nn.Module):
    """Feature pyramid: (c2, c3, c4, c5) -> [P2, P3, P4, P5], each (N, out_channels, h_i, w_i).

    Args:
        in_channels: channels of each input level, finest first.
        out_channels: pyramid width (256).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Finest-first list of (N, C_i, h_i, w_i) -> finest-first list of (N, out_channels, h_i, w_i)."""
        merged = [lateral(f) for lateral, f in zip(self.lateral, features)]
        for i in range(len(merged) - 1, 0, -1):
            merged[i - 1] = merged[i - 1] + F.interpolate(merged[i], size=merged[i - 1].shape[-2:], mode="nearest")
        return [conv(m) for conv, m in zip(self.output, merged)]


class ConvGNReLU(nn.Sequential):
    """3x3 conv (no bias) -> GroupNorm -> ReLU. Keys: ``0.weight``, ``1.{weight,bias}``."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
        )


class SemanticFPNHead(nn.Module):
    """Merges [P2, ..., P5] at stride 4 and classifies: (N, K, h_2, w_2) logits.

    Level i (0 for P2) has ``max(1, i)`` :class:`ConvGNReLU` blocks, each followed (for
    i > 0) by a bilinear upsampling to the next finer level's size.

    Args:
        num_classes: K.
        in_channels: pyramid width (256).
        channels: head width (128).
        num_levels: pyramid levels (4).
    """

    def __init__(self, num_classes: int, in_channels: int = 256, channels: int = 128, num_levels: int = 4) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.ModuleList(ConvGNReLU(in_channels if k == 0 else channels, channels) for k in range(max(1, level)))
            for level in range(num_levels)
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def merge(self, pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        """[P2, ..., P5] -> (N, channels, h_2, w_2), the sum of the per-level branches."""
        sizes = [p.shape[-2:] for p in pyramid]
        total = None
        for level, (branch, x) in enumerate(zip(self.branches, pyramid)):
            for k, block in enumerate(branch):
                x = block(x)
                if level > 0:
                    x = resize_to(x, sizes[level - 1 - k])
            total = x if total is None else total + x
        return total

    def forward(self, pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        """[P2, ..., P5] -> (N, K, h_2, w_2) logits at stride 4."""
        return self.classifier(self.merge(pyramid))


class SemanticFPN(nn.Module):
    """ResNet -> :class:`FPN` -> :class:`SemanticFPNHead` -> bilinear resize to the input.

    Args:
        backbone: a :class:`ResNet` at output stride 32.
        num_classes: K.
    """

    def __init__(self, backbone: ResNet, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = FPN([backbone.out_channels[c] for c in LEVELS])
        self.head = SemanticFPNHead(num_classes)

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, C, H, W) -> [P2, P3, P4, P5], (N, 256, H/s, W/s) for s = 4, 8, 16, 32."""
        features = self.backbone(x)
        return self.neck([features[c] for c in LEVELS])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, K, H, W) logits."""
        return resize_to(self.head(self.pyramid(x)), x.shape[-2:])


def fpn(*, num_classes: int, in_channels: int = 3, backbone: str = "resnet50") -> nn.Module:
    """Semantic FPN.

    Args:
        num_classes: K.
        in_channels: image channels.
        backbone: ``"resnet50"`` (default) or ``"resnet101"`` (``resnet18``/``resnet34`` also work).
    """
    if backbone not in RESNET_DEPTHS:
        raise ValueError(f"fpn backbone={backbone!r} is not supported; choose one of {', '.join(RESNET_DEPTHS)}")
    return SemanticFPN(create_backbone(backbone, in_channels, output_stride=32), num_classes)


MODELS = {"fpn": fpn}
