"""DeconvNet: Noh, Hong & Han, "Learning Deconvolution Network for Semantic Segmentation",
ICCV 2015 (https://arxiv.org/abs/1505.04366), built as the released
``DeconvNet_inference_deploy.prototxt`` (github.com/HyeonwooNoh/DeconvNet).

For an input (N, C, H, W); every conv and deconv has a bias, BN and ReLU::

    encoder = VGG16-BN conv1_1 .. conv5_3, 2x2 max-pools keeping their indices
              (torchvision ``vgg16_bn`` ``features.{i}`` keys)
    fc6  Conv 512->4096 7x7 pad 0 (7x7 pool5 -> 1x1)
    fc7  Conv 4096->4096 1x1
    fc6-deconv  ConvTranspose 4096->512 7x7 pad 0 (1x1 -> 7x7)
    unpool5, deconv5_1..3  512, 512, 512      (ConvTranspose 3x3 pad 1)
    unpool4, deconv4_1..3  512, 512, 256
    unpool3, deconv3_1..3  256, 256, 128
    unpool2, deconv2_1..2  128, 64
    unpool1, deconv1_1..2  64, 64
    seg-score  Conv 64->K 1x1 (no BN, no ReLU)
    -> (N, K, H, W)

Each unpooling puts values back at the argmax positions of its mirror pool (zeros
elsewhere). 21 classes: 251,805,653 parameters (PyTorch convention, BN = 2 C; the paper's
"252M"). The prototxt is written for 224 x 224 inputs (pool5 7 x 7, fc6 to 1 x 1). Here any
size works: a side under 224 is mirror-padded at the bottom/right to 224 and the logits
cropped back, larger inputs run fully convolutionally (fc6 a valid 7x7 conv over the pool5
map, fc6-deconv restores its size), and pools round up with each unpool given the size its
pool saw, as in SegNet.
"""

from __future__ import annotations

import torch
from torch import nn

from pixelwise.models.backbones import VGG16
from pixelwise.models.layers import crop_to, mirror_pad

DESIGN_SIZE = 224
"""Input side of the released prototxt; smaller sides are mirror-padded to it."""


def _bn_relu(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


def deconv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    """ConvTranspose2d (with bias; "same" for 3x3, pad 0 for fc6-deconv's 7x7) -> BN -> ReLU."""
    padding = 1 if kernel_size == 3 else 0
    return _bn_relu(nn.ConvTranspose2d(in_channels, out_channels, kernel_size, padding=padding), out_channels)


class DeconvNet(nn.Module):
    """DeconvNet (see the module docstring for the layout).

    ``encoder`` is a :class:`~pixelwise.models.backbones.VGG16` with batch norm (a local
    torchvision ``vgg16_bn`` checkpoint loads with ``load_backbone_weights(model.encoder,
    path)``); ``fc6``, ``fc7`` and ``fc6_deconv`` are (conv, BN, ReLU); ``decoders[0]`` is the
    deconv stack after unpool5, ``decoders[4]`` the one after unpool1. The deconvolution
    network is initialised as the prototxt (N(0, 0.01), biases 0).

    Args:
        num_classes: K.
        in_channels: image channels.
        base_channels: width of conv1 (64 in the paper; stages 1, 2, 4, 8, 8 times it).
        fc_channels: width of fc6 / fc7 (4096 in the paper).

    Shapes: (N, in_channels, H, W) -> (N, K, H, W) for any H, W.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, base_channels: int = 64, fc_channels: int = 4096) -> None:
        super().__init__()
        if fc_channels < 1:
            raise ValueError(f"fc_channels must be >= 1, got {fc_channels}")
        self.encoder = VGG16(in_channels, batch_norm=True, base_channels=base_channels)
        for _, pool in self.encoder.stages():
            pool.ceil_mode = True
            pool.return_indices = True
        b = base_channels
        top = 8 * b
        self.fc6 = _bn_relu(nn.Conv2d(top, fc_channels, 7), fc_channels)
        self.fc7 = _bn_relu(nn.Conv2d(fc_channels, fc_channels, 1), fc_channels)
        self.fc6_deconv = deconv_bn_relu(fc_channels, top, 7)
        stages = [
            [(8 * b, 8 * b), (8 * b, 8 * b), (8 * b, 8 * b)],
            [(8 * b, 8 * b), (8 * b, 8 * b), (8 * b, 4 * b)],
            [(4 * b, 4 * b), (4 * b, 4 * b), (4 * b, 2 * b)],
            [(2 * b, 2 * b), (2 * b, b)],
            [(b, b), (b, b)],
        ]
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.decoders = nn.ModuleList(nn.Sequential(*(deconv_bn_relu(i, o) for i, o in stage)) for stage in stages)
        self.score = nn.Conv2d(b, num_classes, 1)
        for m in [self.fc6_deconv, self.decoders, self.score]:
            for conv in m.modules():
                if isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
                    nn.init.normal_(conv.weight, std=0.01)
                    nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, K, H, W) logits."""
        h, w = x.shape[-2:]
        x = mirror_pad(x, 0, max(DESIGN_SIZE - h, 0), 0, max(DESIGN_SIZE - w, 0))
        indices, sizes = [], []
        for convs, pool in self.encoder.stages():
            x = convs(x)
            sizes.append(x.shape[-2:])
            x, idx = pool(x)
            indices.append(idx)
        x = self.fc6_deconv(self.fc7(self.fc6(x)))
        for decoder, idx, size in zip(self.decoders, reversed(indices), reversed(sizes)):
            x = decoder(self.unpool(x, idx, output_size=size))
        return crop_to(self.score(x), h, w, 0, 0)


def deconvnet(*, num_classes: int, in_channels: int = 3, base_channels: int = 64, fc_channels: int = 4096) -> DeconvNet:
    """DeconvNet (VGG16-BN + mirrored unpooling/deconv network; 251,805,653 parameters for 21 classes, the paper's 252M)."""
    return DeconvNet(num_classes, in_channels, base_channels, fc_channels)


MODELS = {"deconvnet": deconvnet}
