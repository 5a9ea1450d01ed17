"""PSPNet (Zhao et al. 2017, "Pyramid Scene Parsing Network", https://arxiv.org/abs/1612.01105).

Dilated ResNet (output stride 8; the paper's deep 3x3 stem by default, torchvision's 7x7
stem with ``stem="standard"``) -> pyramid pooling module (bins 1, 2, 3, 6; each a 1x1 conv
to C/4 + BN + ReLU, upsampled and concatenated with the input) -> 3x3 conv 512 + BN + ReLU
-> dropout 0.1 -> 1x1 classifier -> bilinear resize to the input. An optional
auxiliary FCN head on ``c4`` (ResNet ``layer3``) is trained with loss weight 0.4.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from pixelwise.models.backbones import RESNET_DEPTHS, ResNet
from pixelwise.models.layers import ConvBNReLU, resize_to


class PyramidPoolingModule(nn.Module):
    """Pools (N, C, h, w) into b x b bins per level, then concatenates the upsampled levels to the input.

    Each level is adaptive average pooling -> 1x1 conv to ``C // len(bins)`` -> BN -> ReLU ->
    bilinear resize back to (h, w). Bins larger than the map are fine (adaptive pooling then
    repeats pixels). Output: (N, C + len(bins) * (C // len(bins)), h, w), ordered
    ``[input, bin 1, bin 2, ...]`` (4096 channels for C = 2048 and four bins).

    Args:
        in_channels: C.
        bins: output side of each pooling level (the paper's 1, 2, 3, 6).
    """

    def __init__(self, in_channels: int, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        branch_channels = in_channels // len(bins)
        self.bins = tuple(bins)
        self.levels = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), ConvBNReLU(in_channels, branch_channels, 1)) for b in self.bins
        )
        self.out_channels = in_channels + len(self.bins) * branch_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, out_channels, h, w)."""
        size = x.shape[-2:]
        return torch.cat([x] + [resize_to(level(x), size) for level in self.levels], dim=1)


class PSPHead(nn.Sequential):
    """Pyramid pooling -> 3x3 conv (512) + BN + ReLU -> dropout 0.1 -> 1x1 classifier (with bias)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 512, dropout: float = 0.1) -> None:
        ppm = PyramidPoolingModule(in_channels)
        super().__init__(
            ppm,
            ConvBNReLU(ppm.out_channels, channels, 3),
            nn.Dropout(dropout),
            nn.Conv2d(channels, num_classes, 1),
        )


class AuxHead(nn.Sequential):
    """Deep-supervision head on ``c4``: 3x3 conv (256) + BN + ReLU -> dropout 0.1 -> 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__(
            ConvBNReLU(in_channels, channels, 3),
            nn.Dropout(dropout),
            nn.Conv2d(channels, num_classes, 1),
        )


class PSPNet(nn.Module):
    """Backbone -> :class:`PSPHead` on ``c5``, logits resized to the input; optional aux head on ``c4``.

    ``forward`` returns the main logits only; ``forward_with_aux`` adds ``"aux"`` when the
    aux head was built (``aux_weights`` is then ``{"aux": 0.4}``, else empty). Training
    needs a batch of at least 2: the BN after the 1x1 bin sees one value per sample.

    Args:
        backbone: a :class:`ResNet` (usually at output stride 8).
        num_classes: K.
        aux: build the auxiliary head on ``c4``.
    """

    def __init__(self, backbone: ResNet, num_classes: int, aux: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = PSPHead(backbone.out_channels["c5"], num_classes)
        self.aux_head = AuxHead(backbone.out_channels["c4"], num_classes) if aux else None
        self.aux_weights: dict[str, float] = {"aux": 0.4} if aux else {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, K, H, W) logits."""
        return resize_to(self.head(self.backbone(x)["c5"]), x.shape[-2:])

    def forward_with_aux(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, C, H, W) -> ``{"out": (N, K, H, W)}`` plus ``"aux"`` (N, K, H, W) if built."""
        features = self.backbone(x)
        outputs = {"out": resize_to(self.head(features["c5"]), x.shape[-2:])}
        if self.aux_head is not None:
            outputs["aux"] = resize_to(self.aux_head(features["c4"]), x.shape[-2:])
        return outputs


def pspnet(
    *,
    num_classes: int,
    in_channels: int = 3,
    backbone: str = "resnet50",
    output_stride: int = 8,
    aux: bool = False,
    stem: Literal["deep", "standard"] = "deep",
) -> nn.Module:
    """PSPNet on a dilated ResNet; paper: deep 3x3 stem (default), option stem="standard" (torchvision's 7x7).

    Args:
        num_classes: K.
        in_channels: image channels.
        backbone: ``"resnet50"`` (default) or ``"resnet101"`` (``resnet18``/``resnet34`` also work).
        output_stride: 8 (the paper, default) or 16 (cheaper).
        aux: build the auxiliary head on ``c4`` (loss weight 0.4 in the paper); off by default
            so that ``forward`` uses every parameter.
        stem: ``"deep"`` (default): the paper's ResNet, whose 7x7 stem is three 3x3 convs
            (64 stride 2, 64, 128; the released ``pspnet50_ADE20K.prototxt``);
            ``"standard"``: torchvision's 7x7 stem, so a torchvision ResNet checkpoint loads.
    """
    if backbone not in RESNET_DEPTHS:
        raise ValueError(f"pspnet backbone={backbone!r} is not supported; choose one of {', '.join(RESNET_DEPTHS)}")
    if output_stride not in (8, 16):
        raise ValueError(f"pspnet output_stride={output_stride!r} is not supported; choose 8 (the paper) or 16")
    return PSPNet(ResNet(RESNET_DEPTHS[backbone], in_channels, output_stride, stem=stem), num_classes, aux)


MODELS = {"pspnet": pspnet}
