"""U-Net: Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI 2015 (https://arxiv.org/abs/1505.04597).

Two forms:

* :class:`UNetOriginal` (``unet_original``), the paper's network: unpadded 3x3 convs + ReLU,
  2x2 max-pool, 64 -> 1024 channels, 2x2 up-convs halving the channels, crop-and-concat, a
  final 1x1 conv. A 572x572 tile gives a 388x388 map (:meth:`UNetOriginal.forward_valid`);
  :meth:`UNetOriginal.forward` predicts an image of any size by mirror-padding it into one
  valid tile (the paper's overlap-tile strategy with a single tile).
* :class:`UNet` (``unet``, ``unet_residual``): the common padded variant with batch norm, any
  input size, selectable depth, width, upsampling and block (double conv or residual).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from pixelwise.models.layers import crop_to, mirror_pad, pad_to_multiple

Upsampling = Literal["transpose", "bilinear"]
Block = Literal["double", "residual"]


def init_paper(module: nn.Module) -> None:
    """U-Net paper init (Sec. 3): every conv and up-conv weight from N(0, sqrt(2 / N)), biases 0.

    N is the fan-in k * k * C_in, for a ``Conv2d`` and for a ``ConvTranspose2d`` alike (the
    latter's weight is (C_in, C_out, k, k), so PyTorch's own fan-in would be C_out * k * k).
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            c_in = m.in_channels // m.groups
            fan_in = c_in * m.kernel_size[0] * m.kernel_size[1]
            nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_in))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def conv_relu(in_channels: int, out_channels: int, padding: int, batch_norm: bool) -> list[nn.Module]:
    """3x3 conv (bias only without BN) [-> BN] -> ReLU, as a list of layers."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, padding=padding, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_channels))
    layers.append(nn.ReLU(inplace=True))
    return layers


class DoubleConv(nn.Sequential):
    """Two (3x3 conv [-> BN] -> ReLU); ``padding=0`` shrinks each side by 2 (the paper's form).

    Shapes: (N, in, H, W) -> (N, out, H - 4 + 4 * padding, W - 4 + 4 * padding).
    """

    def __init__(self, in_channels: int, out_channels: int, padding: int = 1, batch_norm: bool = True) -> None:
        super().__init__(
            *conv_relu(in_channels, out_channels, padding, batch_norm),
            *conv_relu(out_channels, out_channels, padding, batch_norm),
        )


class ResidualBlock(nn.Module):
    """ReLU(conv-BN-ReLU-conv-BN (x) + shortcut(x)), 3x3 same-padded convs.

    The shortcut is the identity when the channel counts match, else a 1x1 conv [+ BN]
    projection. Without batch norm the convs carry biases instead.

    Shapes: (N, in, H, W) -> (N, out, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, batch_norm: bool = True) -> None:
        super().__init__()
        def norm() -> nn.Module:
            return nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()

        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not batch_norm)
        self.bn1 = norm()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=not batch_norm)
        self.bn2 = norm()
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=not batch_norm), norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class UNetOriginal(nn.Module):
    """The paper's U-Net: unpadded convs, so each output pixel sees a full 184x184 context.

    Valid sizes (per side): a tile of side ``s`` works in :meth:`forward_valid` iff
    ``s = 16 * b + 124`` with ``b >= 4`` (every 2x2 pool sees an even size and the
    expanding path stays positive); the output side is then ``s - 184`` (``valid_margin`` =
    92 pixels lost on each border). So inputs 188, 204, ..., 572, ... give outputs 4, 20,
    ..., 388, .... :meth:`valid_input_size` gives the smallest tile covering an output size.

    Dropout (``dropout``, 0.5 by default) follows the last two contracting blocks (512 and
    1024 channels): the paper's "drop-out layers at the end of the contracting path".
    Convs and up-convs are initialised from N(0, sqrt(2 / N)), N = k * k * C_in
    (:func:`init_paper`, paper Sec. 3).

    Args:
        num_classes: K, number of output classes (2 in the paper).
        in_channels: image channels (1 in the paper).
        base_channels: width of the first block (64 in the paper); doubled at each level.
        dropout: dropout probability at the end of the contracting path.

    Shapes: :meth:`forward` (N, C, H, W) -> (N, K, H, W) for any H, W;
    :meth:`forward_valid` (N, C, s_h, s_w) -> (N, K, s_h - 184, s_w - 184) for valid s.
    """

    valid_margin = 92
    depth = 4

    def __init__(self, num_classes: int, in_channels: int = 1, base_channels: int = 64, dropout: float = 0.5) -> None:
        super().__init__()
        if base_channels < 1:
            raise ValueError(f"base_channels must be >= 1, got {base_channels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        widths = [base_channels * 2**i for i in range(self.depth + 1)]
        self.down = nn.ModuleList(
            DoubleConv(c_in, c_out, padding=0, batch_norm=False)
            for c_in, c_out in zip([in_channels, *widths[:-1]], widths)
        )
        self.pool = nn.MaxPool2d(2, 2)
        self.drop = nn.Dropout(dropout)
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, 2) for i in reversed(range(self.depth)))
        self.up_blocks = nn.ModuleList(
            DoubleConv(2 * widths[i], widths[i], padding=0, batch_norm=False) for i in reversed(range(self.depth))
        )
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        init_paper(self)

    @staticmethod
    def valid_input_size(output_size: int) -> int:
        """Smallest valid tile side whose valid output side is >= ``output_size`` (572 for 388)."""
        if output_size < 1:
            raise ValueError(f"output_size must be >= 1, got {output_size}")
        b = max(4, math.ceil((output_size + 60) / 16))
        return 16 * b + 124

    @staticmethod
    def valid_output_size(input_size: int) -> int:
        """Output side of :meth:`forward_valid` for a tile side ``input_size`` (388 for 572)."""
        if input_size < 188 or (input_size - 124) % 16:
            raise ValueError(
                f"U-Net tile side {input_size} is not valid: it must be 16 * b + 124 with b >= 4 "
                f"(188, 204, ..., 572, ...); use UNetOriginal.valid_input_size to pick one"
            )
        return input_size - 2 * UNetOriginal.valid_margin

    def forward_valid(self, x: torch.Tensor) -> torch.Tensor:
        """Unpadded forward pass of one tile: (N, C, s_h, s_w) -> (N, K, s_h - 184, s_w - 184).

        Raises ``ValueError`` unless both sides are valid (see the class docstring).
        """
        for side in x.shape[-2:]:
            self.valid_output_size(side)
        skips = []
        for level, block in enumerate(self.down):
            x = block(x)
            if level >= self.depth - 1:
                x = self.drop(x)
            if level < self.depth:
                skips.append(x)
                x = self.pool(x)
        for up, block, skip in zip(self.up, self.up_blocks, reversed(skips)):
            x = up(x)
            x = block(torch.cat([crop_to(skip, *x.shape[-2:]), x], 1))
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Any-size prediction as one overlap tile: (N, C, H, W) -> (N, K, H, W).

        ``x`` is mirror-padded by ``valid_margin`` on the top/left and up to the next valid
        tile on the bottom/right (edge-replicated along an axis too short to mirror, see
        :func:`~pixelwise.models.layers.mirror_pad`), run through :meth:`forward_valid`,
        and the output cropped to (H, W). Large images are better tiled by the inference
        helpers, which use ``valid_margin`` and :meth:`forward_valid` directly.
        """
        h, w = x.shape[-2:]
        m = self.valid_margin
        tile_h, tile_w = self.valid_input_size(h), self.valid_input_size(w)
        x = mirror_pad(x, m, tile_h - h - m, m, tile_w - w - m)
        return self.forward_valid(x)[..., :h, :w]


class UNet(nn.Module):
    """Padded U-Net: same-size convs, optional batch norm, any input size.

    The input is mirror-padded at the bottom/right to a multiple of ``2 ** depth`` and the
    logits are cropped back, so skips and upsampled maps always align without cropping.
    Upsampling ``"transpose"`` is the paper's 2x2 stride-2 up-conv halving the channels;
    ``"bilinear"`` is x2 bilinear interpolation followed by a 1x1 conv halving the channels.
    Block ``"double"`` is two 3x3 conv[-BN]-ReLU; ``"residual"`` is :class:`ResidualBlock`.

    Args:
        num_classes: K, number of output classes.
        in_channels: image channels.
        base_channels: width of the first block, doubled at each of the ``depth`` levels.
        depth: number of 2x2 poolings (4 in the paper).
        batch_norm: BN after every conv (convs then have no bias).
        upsampling: ``"transpose"`` or ``"bilinear"``.
        block: ``"double"`` or ``"residual"``.

    Shapes: (N, in_channels, H, W) -> (N, K, H, W) for any H, W.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        base_channels: int = 64,
        depth: int = 4,
        batch_norm: bool = True,
        upsampling: Upsampling = "transpose",
        block: Block = "double",
    ) -> None:
        super().__init__()
        if base_channels < 1:
            raise ValueError(f"base_channels must be >= 1, got {base_channels}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if upsampling not in ("transpose", "bilinear"):
            raise ValueError(f"upsampling={upsampling!r} is not supported; choose 'transpose' or 'bilinear'")
        if block not in ("double", "residual"):
            raise ValueError(f"block={block!r} is not supported; choose 'double' or 'residual'")
        self.depth = depth

        def make_block(c_in: int, c_out: int) -> nn.Module:
            if block == "residual":
                return ResidualBlock(c_in, c_out, batch_norm)
            return DoubleConv(c_in, c_out, padding=1, batch_norm=batch_norm)

        def make_up(c_in: int, c_out: int) -> nn.Module:
            if upsampling == "transpose":
                return nn.ConvTranspose2d(c_in, c_out, 2, 2)
            return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), nn.Conv2d(c_in, c_out, 1))

        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList(make_block(c_in, c_out) for c_in, c_out in zip([in_channels, *widths[:-1]], widths))
        self.pool = nn.MaxPool2d(2, 2)
        self.up = nn.ModuleList(make_up(widths[i + 1], widths[i]) for i in reversed(range(depth)))
        self.up_blocks = nn.ModuleList(make_block(2 * widths[i], widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        init_paper(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, K, H, W) logits."""
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, 2**self.depth)
        skips = []
        for level, block in enumerate(self.down):
            x = block(x)
            if level < self.depth:
                skips.append(x)
                x = self.pool(x)
        for up, block, skip in zip(self.up, self.up_blocks, reversed(skips)):
            x = block(torch.cat([skip, up(x)], 1))
        return crop_to(self.head(x), h, w, 0, 0)


def unet_original(*, num_classes: int, in_channels: int = 3, base_channels: int = 64, dropout: float = 0.5) -> UNetOriginal:
    """The paper's unpadded U-Net (1 input channel and 2 classes there; 31,030,658 parameters)."""
    return UNetOriginal(num_classes, in_channels, base_channels, dropout)


def unet(
    *,
    num_classes: int,
    in_channels: int = 3,
    base_channels: int = 64,
    depth: int = 4,
    batch_norm: bool = True,
    upsampling: Upsampling = "transpose",
) -> UNet:
    """Padded U-Net with double-conv blocks."""
    return UNet(num_classes, in_channels, base_channels, depth, batch_norm, upsampling, block="double")


def unet_residual(
    *,
    num_classes: int,
    in_channels: int = 3,
    base_channels: int = 64,
    depth: int = 4,
    batch_norm: bool = True,
    upsampling: Upsampling = "transpose",
) -> UNet:
    """Padded U-Net whose double-conv blocks are residual blocks."""
    return UNet(num_classes, in_channels, base_channels, depth, batch_norm, upsampling, block="residual")


MODELS = {
    "unet_original": unet_original,
    "unet": unet,
    "unet_residual": unet_residual,
}
