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


def resize_to(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize of (N, C, h, w) to (N, C, *size) (align_corners=False); no-op if equal."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def reflect_indices(start: int, length: int, size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Indices into an axis of ``size`` for positions ``start .. start + length - 1``, mirrored.

    Positions outside ``[0, size)`` reflect about the edge pixels without repeating them
    (numpy's ``reflect``), again and again for pads longer than the axis (period
    ``2 * (size - 1)``); a size-1 axis repeats its pixel. E.g. size 3, start -4, length 11:
    ``[0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2]``.
    """
    idx = torch.arange(start, start + length, device=device)
    if size == 1:
        return torch.zeros_like(idx)
    period = 2 * (size - 1)
    idx = idx.remainder(period)
    return torch.where(idx >= size, period - idx, idx)


def mirror_pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Pad (N, C, H, W) by mirroring the border (``reflect``: the edge pixel is not repeated).

    Pads of any length reflect repeatedly (:func:`reflect_indices`), the same rule as the
    sliding-window inference, so a pad longer than the image continues the mirror pattern.
    """
    h, w = x.shape[-2:]
    if top or bottom:
        x = x.index_select(-2, reflect_indices(-top, h + top + bottom, h, x.device))
    if left or right:
        x = x.index_select(-1, reflect_indices(-left, w + left + right, w, x.device))
    return x


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Mirror-pad the bottom and right of (N, C, H, W) so that H and W are multiples of ``multiple``.

    Crop a model's output back with ``crop_to(y, H, W, 0, 0)``.
    """
    h, w = x.shape[-2:]
    return mirror_pad(x, 0, -h % multiple, 0, -w % multiple)
