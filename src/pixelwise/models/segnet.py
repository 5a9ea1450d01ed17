"""SegNet and SegNet-Basic: Badrinarayanan, Kendall & Cipolla, "SegNet: A Deep Convolutional
Encoder-Decoder Architecture for Image Segmentation", TPAMI 2017 (https://arxiv.org/abs/1511.00561).

The encoder max-pools keep their argmax indices; each decoder stage max-unpools with the
indices of its mirror encoder stage (values go back to where the maxima were, zeros
elsewhere), then densifies the sparse map with conv + BN (+ ReLU) layers.

SegNet (VGG16), for an input (N, C, H, W); every conv is 3x3 with bias, BN and ReLU::

    encoder = VGG16-BN conv1_1 .. conv5_3      (torchvision ``vgg16_bn`` ``features.{i}`` keys)
    decoder 5: unpool, 512->512, 512->512, 512->512
    decoder 4: unpool, 512->512, 512->512, 512->256
    decoder 3: unpool, 256->256, 256->256, 256->128
    decoder 2: unpool, 128->128, 128->64
    decoder 1: unpool, 64->64, then 64->K 3x3 conv with bias (no BN, no ReLU): the logits
    -> (N, K, H, W)

This is the layout of the authors' Caffe ``segnet_train.prototxt`` (conv1_1_D outputs the
classes); it has exactly 29,449,355 parameters for 11 classes.

Pools round sizes up (``ceil_mode``, as Caffe does) and each unpool is given the size of the
map its encoder stage pooled, so any input size works, including odd ones and 1x1.
"""

from __future__ import annotations

import torch
from torch import nn

from pixelwise.models.backbones import VGG16


def conv_bn(in_channels: int, out_channels: int, kernel_size: int = 3, relu: bool = True) -> nn.Sequential:
    """Conv (with bias, as the Caffe nets) -> BN [-> ReLU], same padding."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SegNetDecoder(nn.Module):
    """One decoder stage: ``MaxUnpool2d(2, 2)`` with its encoder's indices, then ``convs``.

    Shapes: (N, C, h, w) with indices (N, C, h, w) -> unpooled (N, C, *size) -> ``convs``.
    """

    def __init__(self, convs: nn.Module) -> None:
        super().__init__()
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.convs = convs

    def forward(self, x: torch.Tensor, indices: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return self.convs(self.unpool(x, indices, output_size=size))


def _init_convs(module: nn.Module) -> None:
    """He initialisation (as the paper, for training from scratch); biases zero."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(m.bias)


class SegNet(nn.Module):
    """SegNet with the VGG16-BN encoder (see the module docstring for the layout).

    ``encoder`` is a :class:`~pixelwise.models.backbones.VGG16` with batch norm, so a local
    torchvision ``vgg16_bn`` checkpoint loads with
    ``load_backbone_weights(model.encoder, path)``. ``decoders[0]`` is the deepest stage
    (mirror of conv5), ``decoders[4]`` the one that outputs the logits.

    Shapes: (N, in_channels, H, W) -> (N, K, H, W) for any H, W.
    """

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.encoder = VGG16(in_channels, batch_norm=True)
        for _, pool in self.encoder.stages():
            pool.ceil_mode = True
            pool.return_indices = True
        stages = [
            [(512, 512), (512, 512), (512, 512)],
            [(512, 512), (512, 512), (512, 256)],
            [(256, 256), (256, 256), (256, 128)],
            [(128, 128), (128, 64)],
            [(64, 64)],
        ]
        decoders = []
        for i, stage in enumerate(stages):
            convs: list[nn.Module] = [conv_bn(c_in, c_out) for c_in, c_out in stage]
            if i == len(stages) - 1:
                convs.append(nn.Conv2d(64, num_classes, 3, padding=1))
            decoders.append(SegNetDecoder(nn.Sequential(*convs)))
        self.decoders = nn.ModuleList(decoders)
        _init_convs(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, K, H, W) logits."""
        indices, sizes = [], []
        for convs, pool in self.encoder.stages():
            x = convs(x)
            sizes.append(x.shape[-2:])
            x, idx = pool(x)
            indices.append(idx)
        for decoder, idx, size in zip(self.decoders, reversed(indices), reversed(sizes)):
            x = decoder(x, idx, size)
        return x


class SegNetBasic(nn.Module):
    """SegNet-Basic: 4 encoders and 4 decoders of one 7x7 conv with 64 channels and BN.

    Encoder stage: conv 7x7 -> BN -> ReLU -> 2x2 max-pool (indices kept). Decoder stage:
    unpool -> conv 7x7 -> BN, without ReLU, as in the paper and the authors'
    ``segnet_basic_train.prototxt``. A 1x1 conv gives the logits. About 1.42M parameters
    (1,416,587 for 11 classes). The paper also normalises the input (local contrast
    normalisation; an LRN layer in the Caffe net); that is not part of this module.

    Shapes: (N, in_channels, H, W) -> (N, K, H, W) for any H, W.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, channels: int = 64, kernel_size: int = 7) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.encoders = nn.ModuleList(conv_bn(c, channels, kernel_size) for c in (in_channels, channels, channels, channels))
        self.pools = nn.ModuleList(nn.MaxPool2d(2, 2, ceil_mode=True, return_indices=True) for _ in range(4))
        self.decoders = nn.ModuleList(SegNetDecoder(conv_bn(channels, channels, kernel_size, relu=False)) for _ in range(4))
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        _init_convs(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, K, H, W) logits."""
        indices, sizes = [], []
        for encoder, pool in zip(self.encoders, self.pools):
            x = encoder(x)
            sizes.append(x.shape[-2:])
            x, idx = pool(x)
            indices.append(idx)
        for decoder, idx, size in zip(self.decoders, reversed(indices), reversed(sizes)):
            x = decoder(x, idx, size)
        return self.classifier(x)


def segnet(*, num_classes: int, in_channels: int = 3) -> SegNet:
    """SegNet with a VGG16-BN encoder and mirrored decoder (29,449,355 parameters for 11 classes)."""
    return SegNet(num_classes, in_channels)


def segnet_basic(*, num_classes: int, in_channels: int = 3, channels: int = 64, kernel_size: int = 7) -> SegNetBasic:
    """SegNet-Basic (4 + 4 layers of 7x7 x 64 with BN; about 1.42M parameters for 11 classes)."""
    return SegNetBasic(num_classes, in_channels, channels, kernel_size)


MODELS = {
    "segnet": segnet,
    "segnet_basic": segnet_basic,
}
