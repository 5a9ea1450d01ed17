"""3D U-Net: Çiçek, Abdulkadir, Lienkamp, Brox & Ronneberger, "3D U-Net: Learning Dense
Volumetric Segmentation from Sparse Annotation", MICCAI 2016 (https://arxiv.org/abs/1606.06650).

The paper's network (Sec. 2, Fig. 1): each analysis level has two 3x3x3 convs, each followed
by batch norm and ReLU, then 2x2x2 max-pooling; the second conv doubles the channels
(32-64, 64-128, 128-256, and 256-512 at the bottom) "to avoid bottlenecks". Each synthesis
level is a 2x2x2 up-convolution of stride 2 keeping the channels, concatenation with the
analysis level's (cropped) features, and two 3x3x3 convs halving them (768->256->256, ...);
a final 1x1x1 conv gives the K class scores. Unpadded ("valid") convs map a
132x132x116 tile to 44x44x28.

Two forms, one class:

* ``unet3d_original``: unpadded, as published; :meth:`UNet3D.forward_valid` maps a valid
  tile to its centre (``valid_margin`` voxels lost per side), :meth:`UNet3D.forward` mirrors
  any volume into one valid tile.
* ``unet3d``: same-padded convs, any input size (mirror-padded to a multiple of the
  pooling factors and cropped back).

``anisotropic=True`` pools 1x2x2 (never along depth), for stacks whose sections are much
thicker than their pixels (e.g. ISBI 2012 electron microscopy: 50 nm vs 4 nm).
"""

from __future__ import annotations

import torch
from torch import nn

from pixelwise.models.layers import mirror_pad_nd


class ConvBNReLU3d(nn.Sequential):
    """3x3x3 conv (with bias, as in the paper) -> BatchNorm3d -> ReLU; ``padding`` 0 or 1.

    Shapes: (N, in, D, H, W) -> (N, out, D - 2 + 2 * padding, ...).
    """

    def __init__(self, in_channels: int, out_channels: int, padding: int) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, padding=padding),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )


def _crop_center(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Crop the spatial axes of (N, C, *S) centrally to ``size``."""
    starts = [(s - t) // 2 for s, t in zip(x.shape[2:], size)]
    return x[(..., *(slice(a, a + t) for a, t in zip(starts, size)))]


class UNet3D(nn.Module):
    """3D U-Net with the paper's widths: level ``l`` runs ``b * 2**l`` then ``b * 2**(l+1)`` channels.

    Args:
        num_classes: K output classes (3 in the paper's Xenopus kidney experiment).
        in_channels: image channels (3 in the paper).
        base_channels: ``b``, width of the first conv (32 in the paper).
        depth: number of poolings (3 in the paper).
        valid: unpadded convs as published (True) or same-padded ones (False).
        anisotropic: pool 1x2x2 instead of 2x2x2 (depth is never pooled).

    Valid form: an axis pooled by ``p`` loses ``valid_margin = 2 * (2 * sum(p**l, l < depth)
    + p**depth)`` voxels per side (44 for p = 2, 14 for p = 1 at depth 3); a tile side is
    valid when every pooling sees an even size (:meth:`valid_output_size`).

    Shapes: :meth:`forward` (N, C, D, H, W) -> (N, K, D, H, W) for any D, H, W.
    """

    spatial_dims = 3

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        base_channels: int = 32,
        depth: int = 3,
        valid: bool = False,
        anisotropic: bool = False,
    ) -> None:
        super().__init__()
        if base_channels < 1:
            raise ValueError(f"base_channels must be >= 1, got {base_channels}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth
        self.valid = valid
        self.pool_factors = (1 if anisotropic else 2, 2, 2)
        padding = 0 if valid else 1
        b = base_channels
        level_inputs = [in_channels] + [b * 2 ** (level + 1) for level in range(depth)]  # 3, 64, 128, 256 in Fig. 1
        self.down = nn.ModuleList(
            nn.Sequential(
                ConvBNReLU3d(c_in, b * 2**level, padding), ConvBNReLU3d(b * 2**level, b * 2 ** (level + 1), padding)
            )
            for level, c_in in enumerate(level_inputs)
        )
        self.pool = nn.MaxPool3d(self.pool_factors, self.pool_factors)
        # Up-convs keep the channels (512 -> 512 in Fig. 1); the paper's count has no bias on them.
        self.up = nn.ModuleList(
            nn.ConvTranspose3d(b * 2 ** (level + 2), b * 2 ** (level + 2), self.pool_factors, self.pool_factors, bias=False)
            for level in reversed(range(depth))
        )
        self.up_blocks = nn.ModuleList(
            nn.Sequential(
                ConvBNReLU3d(b * 2 ** (level + 1) + b * 2 ** (level + 2), b * 2 ** (level + 1), padding),
                ConvBNReLU3d(b * 2 ** (level + 1), b * 2 ** (level + 1), padding),
            )
            for level in reversed(range(depth))
        )
        self.head = nn.Conv3d(2 * b, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        if valid:
            margins = tuple(2 * (2 * sum(p**level for level in range(depth)) + p**depth) for p in self.pool_factors)
            self.valid_margin: int | tuple[int, int, int] = margins[0] if len(set(margins)) == 1 else margins

    def _output_side(self, side: int, p: int) -> int | None:
        """Valid output side for input ``side`` along an axis pooled by ``p``; None if not valid."""
        size = side
        for _ in range(self.depth):
            size -= 4
            if size < 2 or size % p:
                return None
            size //= p
        size -= 4
        for _ in range(self.depth):
            size = size * p - 4
        return size if size >= 1 else None

    def valid_output_size(self, side: int, axis: int = -1) -> int:
        """Output side of :meth:`forward_valid` for an input side along ``axis`` (0/-3 depth, 1/-2, 2/-1).

        Raises a ValueError naming nearby valid sides when a pooling would see an odd size or
        a size drops below 1.
        """
        p = self.pool_factors[axis]
        out = self._output_side(side, p)
        if out is None:
            fits = [s for s in range(max(1, side - 64), side + 64) if self._output_side(s, p)]
            raise ValueError(
                f"3D U-Net tile side {side} is not valid along axis {axis} (pooling {p}); "
                f"valid sides nearby: {', '.join(map(str, fits[:6])) or 'larger ones'}; "
                "use valid_input_size to pick one"
            )
        return out

    def valid_input_size(self, output_size: int, axis: int = -1) -> int:
        """Smallest valid tile side along ``axis`` whose valid output covers ``output_size`` (132 for 44)."""
        if output_size < 1:
            raise ValueError(f"output_size must be >= 1, got {output_size}")
        p = self.pool_factors[axis]
        side = output_size
        while (self._output_side(side, p) or 0) < output_size:
            side += 1
        return side

    def forward_valid(self, x: torch.Tensor) -> torch.Tensor:
        """Unpadded pass of one tile (N, C, d, h, w) -> (N, K, d - 2 m_d, h - 2 m_h, w - 2 m_w).

        Only for ``valid=True``; raises ValueError for invalid tile sides.
        """
        if not self.valid:
            raise ValueError("forward_valid needs the unpadded form (valid=True, e.g. unet3d_original)")
        for axis, side in enumerate(x.shape[2:]):
            self.valid_output_size(side, axis)
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, block in enumerate(self.down):
            x = block(x)
            if level < self.depth:
                skips.append(x)
                x = self.pool(x)
        for up, block, skip in zip(self.up, self.up_blocks, reversed(skips)):
            x = up(x)
            x = block(torch.cat([_crop_center(skip, tuple(x.shape[2:])), x], 1))
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, D, H, W) -> (N, K, D, H, W) logits for any size.

        Padded form: mirror-pad the far sides to a multiple of the total pooling factor, run,
        crop. Valid form: mirror-pad by the margin (and up to the next valid tile) and run one
        valid tile (the overlap-tile strategy with one tile; tile large volumes with
        :func:`pixelwise.inference.sliding_window`).
        """
        if x.ndim != 5:
            raise ValueError(f"3D U-Net input must be (N, C, D, H, W), got shape {tuple(x.shape)}")
        size = tuple(x.shape[2:])
        if self.valid:
            margins = self.valid_margin if isinstance(self.valid_margin, tuple) else (self.valid_margin,) * 3
            tiles = [self.valid_input_size(s, axis) for axis, s in enumerate(size)]
            x = mirror_pad_nd(x, [(m, t - s - m) for m, t, s in zip(margins, tiles, size)])
            return self._run(x)[(..., *(slice(0, s) for s in size))]
        multiples = [p**self.depth for p in self.pool_factors]
        x = mirror_pad_nd(x, [(0, -s % m) for s, m in zip(size, multiples)])
        return self._run(x)[(..., *(slice(0, s) for s in size))]


def unet3d(
    *, num_classes: int, in_channels: int = 3, base_channels: int = 32, depth: int = 3, anisotropic: bool = False
) -> UNet3D:
    """3D U-Net, same-padded convs (any volume size), BN, 2x2x2 or 1x2x2 pooling."""
    return UNet3D(num_classes, in_channels, base_channels, depth, valid=False, anisotropic=anisotropic)


def unet3d_original(
    *, num_classes: int, in_channels: int = 3, base_channels: int = 32, depth: int = 3, anisotropic: bool = False
) -> UNet3D:
    """3D U-Net as published: unpadded convs, 132x132x116 -> 44x44x28 (19,069,955 parameters in the paper)."""
    return UNet3D(num_classes, in_channels, base_channels, depth, valid=True, anisotropic=anisotropic)


unet3d.spatial_dims = 3
unet3d_original.spatial_dims = 3

MODELS = {"unet3d": unet3d, "unet3d_original": unet3d_original}
