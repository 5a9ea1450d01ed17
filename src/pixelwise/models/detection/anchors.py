"""RPN anchors (Ren et al. 2015, Sec. 3.1.1; FPN: Lin et al. 2017, Sec. 4.1): one size per pyramid level, several aspect ratios."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def cell_anchors(size: float, aspect_ratios: Sequence[float]) -> Tensor:
    """Anchors centred on (0, 0): (A, 4), one per ratio ``h / w``, each of area ``size ** 2``, rounded to whole pixels.

    For ratio r the height is ``size * sqrt(r)`` and the width ``size / sqrt(r)`` (torchvision's
    ``AnchorGenerator``), e.g. size 32, ratio 0.5 gives 45.25 x 22.63 -> ``(-23, -11, 23, 11)``.
    """
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h = size * ratios.sqrt()
    w = size / ratios.sqrt()
    return (torch.stack([-w, -h, w, h], 1) / 2).round()


class AnchorGenerator:
    """Anchors for every location of every pyramid level.

    Level i uses ``sizes[i]`` with all ``aspect_ratios``; its locations are ``(x, y) =
    (j * stride, i * stride)`` for the level's stride (image size // feature size). The
    order is location-major (row by row), then ratio, matching an RPN head output (N, A, h, w)
    permuted to (N, h, w, A).

    Args:
        sizes: one anchor size (pixels) per level, default 32..512 on P2..P6.
        aspect_ratios: height/width ratios, default (0.5, 1, 2).
    """

    def __init__(self, sizes: Sequence[float] = (32, 64, 128, 256, 512), aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> None:
        self.sizes = tuple(float(s) for s in sizes)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.aspect_ratios)

    def __call__(self, image_size: tuple[int, int], feature_sizes: Sequence[tuple[int, int]], device: torch.device | str = "cpu") -> list[Tensor]:
        """Anchors per level, each (h_i * w_i * A, 4), for a (padded) batch of ``image_size`` (H, W)."""
        if len(feature_sizes) != len(self.sizes):
            raise ValueError(f"{len(feature_sizes)} feature maps but {len(self.sizes)} anchor sizes; give one size per level")
        out = []
        for size, (fh, fw) in zip(self.sizes, feature_sizes):
            stride_y, stride_x = image_size[0] // fh, image_size[1] // fw
            base = cell_anchors(size, self.aspect_ratios).to(device)
            ys = torch.arange(fh, device=device, dtype=torch.float32) * stride_y
            xs = torch.arange(fw, device=device, dtype=torch.float32) * stride_x
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([xx, yy, xx, yy], -1).reshape(-1, 1, 4)
            out.append((shifts + base[None]).reshape(-1, 4))
        return out
