"""Small building blocks shared by the model files."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Sequential):
    """Conv2d -> BatchNorm2d -> ReLU; ``padding`` defaults to "same" for odd kernels.

    Keys: ``0.weight`` (conv, no bias), ``1.*`` (BN).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        padding: int | None = None,
    ) -> None:
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class SeparableConv2d(nn.Sequential):
    """Depthwise conv -> BN -> ReLU -> pointwise 1x1 conv -> BN -> ReLU (DeepLab v3+ style)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
    ) -> None:
        super().__init__(
            ConvBNReLU(in_channels, in_channels, kernel_size, stride, dilation, groups=in_channels),
            ConvBNReLU(in_channels, out_channels, 1),
        )


def bilinear_kernel(channels: int, kernel_size: int) -> torch.Tensor:
    """Weights (C, C, k, k) that make ConvTranspose2d a per-channel bilinear upsampler (FCN)."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float64)
    filt1d = 1 - (og - center).abs() / factor
    filt = filt1d[:, None] * filt1d[None, :]
    weight = torch.zeros(channels, channels, kernel_size, kernel_size, dtype=torch.float64)
    weight[range(channels), range(channels)] = filt
    return weight.float()


def crop_to(x: torch.Tensor, height: int, width: int, top: int | None = None, left: int | None = None) -> torch.Tensor:
    """Crop (N, C, H, W) to (N, C, height, width); centred unless ``top``/``left`` are given."""
    if top is None:
        top = (x.shape[-2] - height) // 2
    if left is None:
        left = (x.shape[-1] - width) // 2
    return x[..., top : top + height, left : left + width]


def resize_to(x: torch.Tensor, size: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Bilinear resize of (N, C, h, w) to (N, C, *size) (align_corners=False); no-op if equal.

    A volume (N, C, d, h, w) is resized trilinearly to (N, C, *size).
    """
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear" if x.ndim == 4 else "trilinear", align_corners=False)


def mirror_pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Pad (N, C, H, W) by mirroring the border (``reflect``: the edge pixel is not repeated).

    Pads of any length reflect repeatedly (:func:`reflect_index`), the same rule as the
    sliding-window inference, so a pad longer than the image continues the mirror pattern.
    """
    return mirror_pad_nd(x, [(top, bottom), (left, right)])


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Mirror-pad the bottom and right of (N, C, H, W) so that H and W are multiples of ``multiple``.

    Crop a model's output back with ``crop_to(y, H, W, 0, 0)``.
    """
    h, w = x.shape[-2:]
    return mirror_pad(x, 0, -h % multiple, 0, -w % multiple)


def reflect_index(index: torch.Tensor, size: int) -> torch.Tensor:
    """Map integer positions (any, even far outside ``[0, size)``) to mirrored positions inside it.

    Mirrors without repeating the edge (numpy's ``reflect``), repeatedly for positions
    more than one image length outside; a size-1 axis maps everything to 0.
    Example: size 3, positions -4..6 -> 0 1 2 1 0 1 2 1 0 1 2.
    """
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = index.remainder(period)
    return torch.where(index >= size, period - index, index)


def mirror_pad_nd(x: torch.Tensor, pads: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Reflect-pad the last ``len(pads)`` axes of ``x`` by ``(before, after)`` each (see :func:`reflect_index`).

    Pads may exceed the axis length; the reflection then repeats. (N, C, D, H, W) with
    ``pads = [(0, 1), (2, 2), (0, 0)]`` -> (N, C, D + 1, H + 4, W).
    """
    first = x.ndim - len(pads)
    for axis, (before, after) in enumerate(pads, start=first):
        if before or after:
            size = x.shape[axis]
            index = reflect_index(torch.arange(-before, size + after, device=x.device), size)
            x = x.index_select(axis, index)
    return x
