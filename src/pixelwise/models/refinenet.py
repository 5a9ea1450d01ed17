"""RefineNet: Lin, Milan, Shen & Reid, "RefineNet: Multi-Path Refinement Networks for
High-Resolution Semantic Segmentation", CVPR 2017 (https://arxiv.org/abs/1611.06612).

4-cascaded RefineNet (paper Fig. 2(a)) on a ResNet, for an input (N, C, H, W)::

    ResNet c2 .. c5 (strides 4 .. 32)
    each -> 3x3 conv (no bias) to 512 channels (c5) or 256 (c2, c3, c4)
    RefineNet-4 (c5)            -> 512 ch, stride 32
    RefineNet-3 (c4, RN-4)      -> 256 ch, stride 16
    RefineNet-2 (c3, RN-3)      -> 256 ch, stride 8
    RefineNet-1 (c2, RN-2)      -> 256 ch, stride 4
    two more RCUs (Sec. 3.2) -> 1x1 conv to K -> bilinear resize to (H, W)

A RefineNet block (Fig. 2(b)): every input path runs through two residual conv units (RCU,
Fig. 2(b): ReLU -> 3x3 conv -> ReLU -> 3x3 conv, plus the input; no BN) at its own width;
multi-resolution fusion (with two or more paths) applies a 3x3 conv per path to the smallest
width among them, upsamples every path bilinearly to the largest resolution and sums;
chained residual pooling (Fig. 2(d)) applies a ReLU, then a chain of blocks, each a 5x5
max-pool (stride 1) and a 3x3 conv fed by the previous block, every block's output summed
into the running result; one output RCU ends the block.

The CRP chain length: the CVPR paper's Fig. 2(d) draws two pooling blocks and Sec. 3.2
says two are used, so ``crp_blocks=2`` is the default (ResNet-101, 21 classes: 109,758,293
parameters); ``crp_blocks=4`` is the four-block chain of later implementations
(118,015,829 parameters, which matches the 118M that Light-Weight RefineNet, Nekrasov et
al. 2018, reports for RefineNet-101; a secondary figure). RCU convs carry a bias (BN is
removed); fusion, CRP and dimension-reduction convs have none. The paper gives no
parameter count.
"""

from __future__ import annotations

import torch
from torch import nn

from pixelwise.models.backbones import RESNET_DEPTHS, ResNet
from pixelwise.models.layers import resize_to


def conv3x3(in_channels: int, out_channels: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)


class ResidualConvUnit(nn.Module):
    """RCU: x + conv(ReLU(conv(ReLU(x)))), 3x3 convs with bias. (N, C, h, w) -> (N, C, h, w)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(channels, channels, bias=True)
        self.conv2 = conv3x3(channels, channels, bias=True)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.relu(self.conv1(self.relu(x))))


class ChainedResidualPooling(nn.Module):
    """CRP: x = ReLU(x); out = x; p = x; for each block p = conv(maxpool5x5(p)); out += p.

    (N, C, h, w) -> (N, C, h, w); max-pools are 5x5, stride 1, padding 2.
    """

    def __init__(self, channels: int, blocks: int = 2) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.convs = nn.ModuleList(conv3x3(channels, channels) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = out = self.relu(x)
        for conv in self.convs:
            x = conv(self.pool(x))
            out = out + x
        return out


class RefineNetBlock(nn.Module):
    """One RefineNet block over paths ordered finest first: RCUs x2 -> fusion -> CRP -> RCU.

    Args:
        in_channels: width of each input path (finest first).
        crp_blocks: pooling blocks in the chained residual pooling.

    ``forward(*paths)``: (N, C_i, h_i, w_i) each -> (N, min C_i, h_0, w_0) (``out_channels``).
    """

    def __init__(self, in_channels: tuple[int, ...], crp_blocks: int = 2) -> None:
        super().__init__()
        self.out_channels = min(in_channels)
        self.adapt = nn.ModuleList(nn.Sequential(ResidualConvUnit(c), ResidualConvUnit(c)) for c in in_channels)
        self.fuse = None
        if len(in_channels) > 1:
            self.fuse = nn.ModuleList(conv3x3(c, self.out_channels) for c in in_channels)
        self.crp = ChainedResidualPooling(self.out_channels, crp_blocks)
        self.out = ResidualConvUnit(self.out_channels)

    def forward(self, *paths: torch.Tensor) -> torch.Tensor:
        paths = tuple(adapt(p) for adapt, p in zip(self.adapt, paths))
        if self.fuse is None:
            x = paths[0]
        else:
            size = paths[0].shape[-2:]
            x = sum(resize_to(conv(p), size) for conv, p in zip(self.fuse, paths))
        return self.out(self.crp(x))


class RefineNet(nn.Module):
    """4-cascaded RefineNet on a ResNet (see the module docstring).

    Keys: ``backbone.*`` (torchvision ResNet names), ``reduce.{0-3}`` (c2 .. c5 to 256 / 512),
    ``refine.{0-3}`` (RefineNet-1 .. RefineNet-4), ``final`` (two RCUs), ``classifier``.

    Args:
        backbone: a :class:`~pixelwise.models.backbones.ResNet` at output stride 32.
        num_classes: K.
        crp_blocks: pooling blocks in each chained residual pooling (2, the paper).

    Shapes: (N, C, H, W) -> (N, K, H, W) for any H, W.
    """

    def __init__(self, backbone: ResNet, num_classes: int, crp_blocks: int = 2) -> None:
        super().__init__()
        if crp_blocks < 1:
            raise ValueError(f"crp_blocks must be >= 1, got {crp_blocks}")
        self.backbone = backbone
        widths = (256, 256, 256, 512)
        channels = [backbone.out_channels[k] for k in ("c2", "c3", "c4", "c5")]
        self.reduce = nn.ModuleList(conv3x3(c, w) for c, w in zip(channels, widths))
        self.refine = nn.ModuleList(
            [RefineNetBlock((w, widths[i + 1]), crp_blocks) for i, w in enumerate(widths[:3])]
            + [RefineNetBlock((widths[3],), crp_blocks)]
        )
        self.final = nn.Sequential(ResidualConvUnit(widths[0]), ResidualConvUnit(widths[0]))
        self.classifier = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, K, H, W) logits."""
        features = self.backbone(x)
        paths = [reduce(features[k]) for reduce, k in zip(self.reduce, ("c2", "c3", "c4", "c5"))]
        out = self.refine[3](paths[3])
        for level in (2, 1, 0):
            out = self.refine[level](paths[level], out)
        return resize_to(self.classifier(self.final(out)), x.shape[-2:])


def refinenet(*, num_classes: int, in_channels: int = 3, backbone: str = "resnet101", crp_blocks: int = 2) -> RefineNet:
    """4-cascaded RefineNet on ResNet-101 (paper), CRP with 2 pooling blocks; options backbone, crp_blocks=4.

    Args:
        num_classes: K.
        in_channels: image channels.
        backbone: ``"resnet101"`` (the paper, default), ``"resnet50"``, ``"resnet34"`` or
            ``"resnet18"``.
        crp_blocks: pooling blocks per chained residual pooling: 2 (paper, default) or more.
    """
    if backbone not in RESNET_DEPTHS:
        raise ValueError(f"refinenet backbone={backbone!r} is not supported; choose one of {', '.join(RESNET_DEPTHS)}")
    return RefineNet(ResNet(RESNET_DEPTHS[backbone], in_channels), num_classes, crp_blocks)


MODELS = {"refinenet": refinenet}
