"""VGG16 (Simonyan & Zisserman 2015), with or without batch norm, as a 5-stage feature extractor.

``features`` is laid out exactly as torchvision's ``vgg16`` / ``vgg16_bn`` (keys
``features.{i}.weight``), so a local torchvision checkpoint loads with
:func:`pixelwise.models.backbones.load_backbone_weights`. The classifier is not built
here; FCN converts it to convolutions itself.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

VGG16_CHANNELS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nn.Module):
    """VGG16 convolutional layers conv1_1 .. pool5.

    Args:
        in_channels: input image channels.
        batch_norm: the ``vgg16_bn`` layout (Conv-BN-ReLU) instead of Conv-ReLU.
        first_padding: padding of conv1_1 (FCN uses 100); the other convs pad 1.
        base_channels: width of conv1 (64); the stages are 1, 2, 4, 8, 8 times it.
    """

    def __init__(
        self, in_channels: int = 3, batch_norm: bool = False, first_padding: int = 1, base_channels: int = 64
    ) -> None:
        super().__init__()
        if base_channels < 1:
            raise ValueError(f"base_channels must be >= 1, got {base_channels}")
        layers: list[nn.Module] = []
        c = in_channels
        for v in VGG16_CHANNELS:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            v = v * base_channels // 64
            layers.append(nn.Conv2d(c, v, 3, padding=first_padding if not layers else 1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            c = v
        self.features = nn.Sequential(*layers)
        self._pools = [i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)]
        b = base_channels
        self.out_channels = {"c1": b, "c2": 2 * b, "c3": 4 * b, "c4": 8 * b, "c5": 8 * b}

    def stages(self) -> list[tuple[nn.Sequential, nn.MaxPool2d]]:
        """The five (convs, pool) pairs; models run them in turn and tap what they need.

        The pools are the live modules, so a model may swap their settings (stride,
        ``ceil_mode``, ``return_indices``) without touching the state-dict keys.
        """
        starts = [0] + [p + 1 for p in self._pools[:-1]]
        return [(self.features[s:p], self.features[p]) for s, p in zip(starts, self._pools)]

    def replace_pool(self, stage: int, pool: nn.MaxPool2d) -> None:
        """Swap the pool after stage ``stage`` (1..5), e.g. for a 3x3 stride-1 pool (DeepLab v1)."""
        self.features[self._pools[stage - 1]] = pool


def vgg16_fc_as_convs(
    state: Mapping[str, torch.Tensor], source: str, in_channels: int = 512, width: int = 4096
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """torchvision ``vgg16``'s fc6 / fc7 (``classifier.0`` / ``classifier.3``) as conv weights.

    Returns ``[(fc6 weight (width, in_channels, 7, 7), bias (width,)), (fc7 weight (width,
    width, 1, 1), bias (width,))]`` (4096 and 512 for VGG16): the FCN paper's
    "convolutionalization". torchvision flattens pool5 as (C, H, W), so a plain reshape
    keeps each weight in its place. ``source`` names the checkpoint in errors.
    """
    out = []
    for key, shape in (("classifier.0", (width, in_channels, 7, 7)), ("classifier.3", (width, width, 1, 1))):
        weight, bias = state.get(f"{key}.weight"), state.get(f"{key}.bias")
        if weight is None or bias is None:
            raise ValueError(f"{source!r} lacks {key}.weight / {key}.bias; pass a torchvision vgg16 checkpoint")
        flat = (shape[0], shape[1] * shape[2] * shape[3])
        if tuple(weight.shape) != flat or tuple(bias.shape) != (shape[0],):
            raise ValueError(
                f"{source!r}: {key}.weight has shape {tuple(weight.shape)}, the fc layers need {flat}; "
                "pass a torchvision vgg16 (not vgg16_bn or another network) checkpoint"
            )
        out.append((weight.reshape(shape), bias))
    return out
