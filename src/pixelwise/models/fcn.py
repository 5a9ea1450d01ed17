"""FCN-32s / 16s / 8s: Long, Shelhamer & Darrell, "Fully Convolutional Networks for Semantic
Segmentation", CVPR 2015 (https://arxiv.org/abs/1411.4038), built as the reference Caffe nets
``voc-fcn32s``, ``voc-fcn16s`` and ``voc-fcn8s``; plus an FCN-8s-style skip net on ResNet-50.

VGG16 FCN, for an input (N, C, H, W)::

    conv1_1 (pad 100) .. pool5        VGG16, pools round up (Caffe), pool3 / pool4 / pool5 kept
    fc6  Conv 512->4096 7x7 pad 0 + ReLU + Dropout 0.5
    fc7  Conv 4096->4096 1x1  + ReLU + Dropout 0.5
    score_fr  Conv 4096->K 1x1                                   (zero-initialised)
    32s: upscore k64 s32 -> crop 19 to (H, W)
    16s: upscore2 k4 s2 + crop_5(score_pool4(pool4)) -> upscore16 k32 s16 -> crop 27
    8s:  upscore2 k4 s2 + crop_5(score_pool4(pool4)) -> upscore_pool4 k4 s2
         + crop_9(score_pool3(pool3)) -> upscore8 k16 s8 -> crop 31
    -> (N, K, H, W)

Upsamplers are bias-free ``ConvTranspose2d`` (K -> K, full kernels) initialised to bilinear
interpolation and frozen (``requires_grad=False``) as in the reference, where learning them
made no significant difference; ``learnable_upsampling=True`` trains them. The crop offsets
are Caffe's coordinate-map offsets: e.g. in FCN-32s upscore pixel ``u`` lies over input pixel
``u - 19``. The 100-pixel padding of conv1_1 makes any input size, even 1x1, work.

ImageNet weights: :func:`load_vgg16_weights` reads a local torchvision ``vgg16`` checkpoint and
turns its fully connected ``classifier.0`` / ``classifier.3`` into the fc6 / fc7 convolutions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from pixelwise.models.backbones import ResNet, VGG16, load_backbone_weights, read_state_dict
from pixelwise.models.backbones.vgg import vgg16_fc_as_convs
from pixelwise.models.layers import bilinear_kernel, crop_to, resize_to

FCNVariant = Literal["32s", "16s", "8s"]
FCN_VARIANTS = ("32s", "16s", "8s")


def bilinear_upsampler(
    channels: int, kernel_size: int, stride: int, learnable: bool, padding: int = 0
) -> nn.ConvTranspose2d:
    """Bias-free ``ConvTranspose2d`` (C -> C) initialised to bilinear upsampling by ``stride``."""
    up = nn.ConvTranspose2d(channels, channels, kernel_size, stride, padding, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(channels, kernel_size))
    up.weight.requires_grad_(learnable)
    return up


def score_layer(in_channels: int, num_classes: int) -> nn.Conv2d:
    """1x1 class-score convolution, zero-initialised (weights and bias) as in the reference."""
    conv = nn.Conv2d(in_channels, num_classes, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class FCN(nn.Module):
    """FCN-32s, 16s or 8s on VGG16 (see the module docstring for the layer graph).

    Args:
        num_classes: K, number of output classes.
        in_channels: image channels.
        variant: ``"32s"``, ``"16s"`` or ``"8s"``: the stride of the coarsest prediction that
            is not fused with a finer skip.
        learnable_upsampling: train the bilinear-initialised deconvolutions (frozen in the
            reference).

    Shapes: (N, in_channels, H, W) -> (N, K, H, W) for any H, W >= 1.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        variant: FCNVariant = "8s",
        learnable_upsampling: bool = False,
    ) -> None:
        super().__init__()
        if variant not in FCN_VARIANTS:
            raise ValueError(f"variant={variant!r} is not an FCN variant; choose one of {FCN_VARIANTS}")
        self.variant = variant
        self.backbone = VGG16(in_channels, first_padding=100)
        for _, pool in self.backbone.stages():
            pool.ceil_mode = True  # Caffe rounds pooled sizes up
        self.fc6 = nn.Conv2d(512, 4096, 7)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(0.5)
        self.fc7 = nn.Conv2d(4096, 4096, 1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout(0.5)
        self.score_fr = score_layer(4096, num_classes)
        k, learn = num_classes, learnable_upsampling
        if variant == "32s":
            self.upscore = bilinear_upsampler(k, 64, 32, learn)
            return
        self.upscore2 = bilinear_upsampler(k, 4, 2, learn)
        self.score_pool4 = score_layer(512, k)
        if variant == "16s":
            self.upscore16 = bilinear_upsampler(k, 32, 16, learn)
            return
        self.upscore_pool4 = bilinear_upsampler(k, 4, 2, learn)
        self.score_pool3 = score_layer(256, k)
        self.upscore8 = bilinear_upsampler(k, 16, 8, learn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, K, H, W) logits."""
        h, w = x.shape[-2:]
        pools = []
        for convs, pool in self.backbone.stages():
            x = pool(convs(x))
            pools.append(x)
        pool3, pool4, pool5 = pools[2:]
        x = self.drop6(self.relu6(self.fc6(pool5)))
        x = self.drop7(self.relu7(self.fc7(x)))
        score = self.score_fr(x)
        if self.variant == "32s":
            return crop_to(self.upscore(score), h, w, 19, 19)
        score = self.upscore2(score)
        score = score + crop_to(self.score_pool4(pool4), *score.shape[-2:], 5, 5)
        if self.variant == "16s":
            return crop_to(self.upscore16(score), h, w, 27, 27)
        score = self.upscore_pool4(score)
        score = score + crop_to(self.score_pool3(pool3), *score.shape[-2:], 9, 9)
        return crop_to(self.upscore8(score), h, w, 31, 31)


def load_vgg16_weights(model: FCN, path: str | Path) -> list[str]:
    """Load a local torchvision ``vgg16`` ImageNet checkpoint into an :class:`FCN`.

    ``features.*`` go to the backbone (through
    :func:`~pixelwise.models.backbones.load_backbone_weights`, which also adapts conv1_1 to
    other input channel counts); the fully connected ``classifier.0`` (4096, 25088) and
    ``classifier.3`` (4096, 4096) become the convolutions fc6 (4096, 512, 7, 7) and fc7
    (4096, 4096, 1, 1), as in the FCN paper (:func:`~pixelwise.models.backbones.vgg.vgg16_fc_as_convs`).

    Returns:
        The checkpoint keys that were not used (the ImageNet classifier ``classifier.6.*``).
    """
    state = read_state_dict(path)
    try:
        unused = load_backbone_weights(model.backbone, state)
    except ValueError as err:
        raise ValueError(f"{str(path)!r}: {err}") from err
    with torch.no_grad():
        for conv, (weight, bias) in zip((model.fc6, model.fc7), vgg16_fc_as_convs(state, str(path))):
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
    return [k for k in unused if not k.startswith(("classifier.0.", "classifier.3."))]


class FCNResNet(nn.Module):
    """FCN-8s-style skip net on a ResNet (output stride 32).

    1x1 score layers (zero-initialised) on ``c3`` (stride 8), ``c4`` (16) and ``c5`` (32);
    from the coarsest, each score map is upsampled x2 to the next finer one and added; the
    stride-8 sum is upsampled to the input. ``upsampling="bilinear"`` (default) resizes
    (align_corners=False); ``"deconv"`` uses the FCN paper's transposed convs instead,
    learnable, bias-free and initialised to bilinear interpolation (``upscore2``,
    ``upscore_pool4`` k4 s2 pad 1, ``upscore8`` k16 s8 pad 4), cropped to the finer map. Away
    from the border they equal the bilinear resize; at the border they read zeros beyond it.

    Shapes: (N, in_channels, H, W) -> (N, K, H, W) for any H, W.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, depth: int = 50, upsampling: str = "bilinear") -> None:
        super().__init__()
        if upsampling not in ("bilinear", "deconv"):
            raise ValueError(f"upsampling={upsampling!r} is not supported; choose 'bilinear' or 'deconv'")
        self.backbone = ResNet(depth, in_channels, output_stride=32)
        channels = self.backbone.out_channels
        self.score_c5 = score_layer(channels["c5"], num_classes)
        self.score_c4 = score_layer(channels["c4"], num_classes)
        self.score_c3 = score_layer(channels["c3"], num_classes)
        self.upscore2 = self.upscore_pool4 = self.upscore8 = None
        if upsampling == "deconv":
            self.upscore2 = bilinear_upsampler(num_classes, 4, 2, learnable=True, padding=1)
            self.upscore_pool4 = bilinear_upsampler(num_classes, 4, 2, learnable=True, padding=1)
            self.upscore8 = bilinear_upsampler(num_classes, 16, 8, learnable=True, padding=4)

    @staticmethod
    def _up(score: torch.Tensor, deconv: nn.ConvTranspose2d | None, size: torch.Size) -> torch.Tensor:
        if deconv is None:
            return resize_to(score, size)
        return crop_to(deconv(score), *size, 0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, K, H, W) logits."""
        feats = self.backbone(x)
        score = self.score_c5(feats["c5"])
        score = self._up(score, self.upscore2, feats["c4"].shape[-2:]) + self.score_c4(feats["c4"])
        score = self._up(score, self.upscore_pool4, feats["c3"].shape[-2:]) + self.score_c3(feats["c3"])
        return self._up(score, self.upscore8, x.shape[-2:])


def fcn32s(*, num_classes: int, in_channels: int = 3, learnable_upsampling: bool = False) -> FCN:
    """FCN-32s (VGG16): one x32 bilinear deconvolution of the fc7 scores."""
    return FCN(num_classes, in_channels, "32s", learnable_upsampling)


def fcn16s(*, num_classes: int, in_channels: int = 3, learnable_upsampling: bool = False) -> FCN:
    """FCN-16s (VGG16): fc7 scores x2, fused with pool4 scores, then x16."""
    return FCN(num_classes, in_channels, "16s", learnable_upsampling)


def fcn8s(*, num_classes: int, in_channels: int = 3, learnable_upsampling: bool = False) -> FCN:
    """FCN-8s (VGG16): fc7 scores x2 + pool4 scores, x2 + pool3 scores, then x8."""
    return FCN(num_classes, in_channels, "8s", learnable_upsampling)


def fcn8s_resnet50(*, num_classes: int, in_channels: int = 3, upsampling: str = "bilinear") -> FCNResNet:
    """FCN-8s-style skip net on ResNet-50; bilinear resize, option upsampling="deconv" (FCN's learnable deconvs).

    Args:
        num_classes: K.
        in_channels: image channels.
        upsampling: ``"bilinear"`` (default) or ``"deconv"``: bilinear-initialised learnable
            transposed convs, as the FCN paper (see :class:`FCNResNet`).
    """
    return FCNResNet(num_classes, in_channels, depth=50, upsampling=upsampling)


MODELS = {
    "fcn32s": fcn32s,
    "fcn16s": fcn16s,
    "fcn8s": fcn8s,
    "fcn8s_resnet50": fcn8s_resnet50,
}
