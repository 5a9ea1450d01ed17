"""The DeepLab family: v1 LargeFOV (+ MSc), v2 ASPP-L, v3 (parallel and cascaded) and v3+ (Chen et al. 2015-2018).

- v1 LargeFOV (https://arxiv.org/abs/1412.7062): VGG16 with 3x3 pools, pool4/pool5 at
  stride 1 (output stride 8), conv5 at dilation 2, a 3x3 stride-1 average pool
  (``pool5a`` of the released prototxt), fc6 3x3 dilation 12 (1024), fc7 1x1 (1024),
  fc8 1x1 to classes, x8 upsampling as Caffe's ``Interp`` layer (41 -> 321, aligned
  corners). ``deeplabv1_msc``: the MSc variant with MLPs on the image and pool1-4.
  :func:`load_deeplabv1_vgg16` builds fc6/fc7 from a torchvision VGG16 checkpoint.
- v2 (https://arxiv.org/abs/1606.00915): ResNet at output stride 8; ASPP-L = four 3x3
  convs at rates 6/12/18/24 straight to class scores, summed.
- v3 (https://arxiv.org/abs/1706.05587): ResNet with multi-grid (1, 2, 4) in ``layer4``
  (unit rates times the block rate: (2, 4, 8) at output stride 16); ASPP (1x1, three 3x3
  at rates 6/12/18 at output stride 16 or 12/24/36 at 8, image pooling; 256 channels +
  BN + ReLU each). Paper head (default): concat -> 1x1 conv 256 + BN -> 1x1 logits;
  ``head="torchvision"``: torchvision's extra 3x3 conv + BN + ReLU and dropout 0.5, with
  its keys. ``deeplabv3_cascade``: the "going deeper" model of Sec. 3.1 (block5-7).
- v3+ (https://arxiv.org/abs/1802.02611): the v3 encoder plus a decoder that fuses the
  stride-4 features. Paper default: aligned Xception-65, depthwise separable convs in ASPP
  and decoder, dropout 0.1 after the ASPP projection (TF DeepLab); ResNet or MobileNetV2
  backbones and plain convs are options.

v3 and v3+ switch output stride in place (``set_output_stride``): the backbone's dilation
and the ASPP rates change together, the weights stay, so a model trained at 16 can be
evaluated at 8 (DeepLab v3, Sec. 4.1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pixelwise.models.backbones import VGG16, ResNet, create_backbone, load_backbone_weights, read_state_dict
from pixelwise.models.backbones.resnet import Bottleneck
from pixelwise.models.backbones.vgg import vgg16_fc_as_convs
from pixelwise.models.layers import ConvBNReLU, SeparableConv2d, resize_to

ASPP_RATES_OS16 = (6, 12, 18)
"""ASPP rates at output stride 16; they scale with 16 / output_stride (12/24/36 at 8)."""


def aspp_rates(output_stride: int) -> tuple[int, ...]:
    """The ASPP atrous rates at ``output_stride`` (8, 16 or 32): (12, 24, 36), (6, 12, 18), (3, 6, 9)."""
    return tuple(r * 16 // output_stride for r in ASPP_RATES_OS16)


# ---------------------------------------------------------------------------- blocks


class ASPPL(nn.Module):
    """DeepLab v2 ASPP-L: parallel 3x3 convs (with bias) at ``rates`` to class scores, summed.

    (N, C, h, w) -> (N, K, h, w). Initialised as the reference prototxt: N(0, 0.01), bias 0.
    """

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r) for r in rates)
        for conv in self.branches:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([branch(x) for branch in self.branches]).sum(0)


class ASPPPooling(nn.Sequential):
    """Image-level features: global average pool -> 1x1 conv -> BN -> ReLU -> upsample to (h, w).

    Its BN sees one value per channel and image, so training needs a batch of 2 or more;
    eval mode works with any batch.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_to(super().forward(x), x.shape[-2:])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLab v3, v3+), torchvision's layout.

    Branches ``convs.0`` 1x1 conv, ``convs.1..3`` 3x3 convs at ``rates``, ``convs.4``
    image pooling, each ``channels`` wide with BN + ReLU; concatenated, then ``project``:
    1x1 conv -> BN -> ReLU -> dropout. (N, C, h, w) -> (N, channels, h, w).

    Args:
        in_channels: C.
        channels: width of every branch and of the output (256 in the papers).
        rates: dilation of the 3x3 branches; change them with :meth:`set_rates`.
        separable: depthwise separable 3x3 branches (v3+; BN + ReLU after the depthwise
            and the pointwise conv).
        dropout: dropout after the projection (0.5 in torchvision's DeepLab v3, 0.1 in TF
            DeepLab's v3+, none in the v3 paper's head).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int = 256,
        rates: Sequence[int] = ASPP_RATES_OS16,
        separable: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        atrous = SeparableConv2d if separable else ConvBNReLU
        self.convs = nn.ModuleList(
            [
                ConvBNReLU(in_channels, channels, 1),
                *(atrous(in_channels, channels, 3, dilation=r) for r in rates),
                ASPPPooling(in_channels, channels),
            ]
        )
        self.project = nn.Sequential(
            nn.Conv2d(len(self.convs) * channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            *([nn.Dropout(dropout)] if dropout > 0 else []),
        )

    def _atrous_convs(self) -> list[nn.Conv2d]:
        """The dilated 3x3 conv of each 3x3 branch (the depthwise one when separable)."""
        return [b[0][0] if isinstance(b, SeparableConv2d) else b[0] for b in self.convs[1:-1]]

    @property
    def rates(self) -> tuple[int, ...]:
        """Current dilation of the 3x3 branches."""
        return tuple(conv.dilation[0] for conv in self._atrous_convs())

    def set_rates(self, rates: Sequence[int]) -> None:
        """Set the dilation (and "same" padding) of the 3x3 branches in place."""
        convs = self._atrous_convs()
        if len(rates) != len(convs):
            raise ValueError(f"rates={tuple(rates)} needs one rate per 3x3 branch ({len(convs)} values)")
        for conv, rate in zip(convs, rates):
            conv.dilation = conv.padding = (rate, rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


HEADS = ("paper", "torchvision")


class DeepLabHead(nn.Sequential):
    """DeepLab v3 head. (N, C, h, w) -> (N, K, h, w).

    ``"paper"`` (DeepLab v3 Sec. 3.3): ASPP, whose concatenated branches go through a 1x1
    conv (256) + BN + ReLU, then a 1x1 classifier (bias); no dropout. Keys ``0.*`` (ASPP),
    ``1.*`` (classifier). ``"torchvision"``: torchvision's ``DeepLabHead``, ASPP with dropout
    0.5 after the projection -> 3x3 conv -> BN -> ReLU -> 1x1 classifier (keys ``0.*``,
    ``1.weight``, ``2.*``, ``4.*``), so torchvision checkpoints load.
    """

    def __init__(
        self, in_channels: int, num_classes: int, rates: Sequence[int], channels: int = 256, head: str = "paper"
    ) -> None:
        if head not in HEADS:
            raise ValueError(f"head={head!r} is not supported; choose one of {list(HEADS)}")
        if head == "paper":
            super().__init__(ASPP(in_channels, channels, rates, dropout=0.0), nn.Conv2d(channels, num_classes, 1))
            return
        super().__init__(
            ASPP(in_channels, channels, rates, dropout=0.5),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, num_classes, 1),
        )


class FCNHead(nn.Sequential):
    """Auxiliary head, torchvision's ``FCNHead``: 3x3 conv to C/4 -> BN -> ReLU -> dropout 0.1 -> 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        inter = in_channels // 4
        super().__init__(
            nn.Conv2d(in_channels, inter, 3, padding=1, bias=False),
            nn.BatchNorm2d(inter),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Conv2d(inter, num_classes, 1),
        )


class Decoder(nn.Module):
    """DeepLab v3+ decoder: refine the encoder output with stride-4 features.

    ``low`` (N, C_low, H/4, W/4) -> 1x1 conv to ``reduced_channels`` (48) + BN + ReLU; concatenated
    after the encoder output (N, C, h, w) upsampled bilinearly to (H/4, W/4); two 3x3 convs
    of ``channels`` + BN + ReLU (depthwise separable if asked). Output (N, channels, H/4, W/4).
    """

    def __init__(
        self,
        in_channels: int,
        low_level_channels: int,
        channels: int = 256,
        reduced_channels: int = 48,
        separable: bool = False,
    ) -> None:
        super().__init__()
        conv = SeparableConv2d if separable else ConvBNReLU
        self.reduce = ConvBNReLU(low_level_channels, reduced_channels, 1)
        self.fuse = nn.Sequential(conv(in_channels + reduced_channels, channels, 3), conv(channels, channels, 3))

    def forward(self, x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        low = self.reduce(low)
        return self.fuse(torch.cat([resize_to(x, low.shape[-2:]), low], dim=1))


# ---------------------------------------------------------------------------- models


def caffe_interp(x: torch.Tensor, factor: int, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Upsample (N, C, h, w) by ``factor`` as Caffe's ``Interp`` layer, then fit to ``size`` (H, W).

    ``Interp`` with ``zoom_factor`` f gives ((h - 1) f + 1, (w - 1) f + 1) with aligned corners
    (41 -> 321 for f = 8), so image pixel y reads feature coordinate y / f: feature pixel j
    sits on image pixel f j, where the stride-f network centres it. Rows and columns past
    (h - 1) f (when H > (h - 1) f + 1) repeat the last one; extra ones are cropped.
    """
    h, w = x.shape[-2:]
    out = F.interpolate(x, size=((h - 1) * factor + 1, (w - 1) * factor + 1), mode="bilinear", align_corners=True)
    height, width = size
    out = out[..., :height, :width]
    return F.pad(out, (0, width - out.shape[-1], 0, height - out.shape[-2]), mode="replicate")


class MultiScaleMLP(nn.Module):
    """DeepLab-MSc branch: 3x3 conv (128, stride to reach output stride 8) + ReLU + dropout -> 1x1 conv (128) + ReLU + dropout.

    (N, C, h, w) -> (N, 128, ceil(h / stride), ceil(w / stride)); padding 1, so output pixel
    j is centred on input pixel ``stride * j``, as the main path's stride-8 features.
    """

    def __init__(self, in_channels: int, stride: int, channels: int = 128, dropout: float = 0.5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1)
        self.conv2 = nn.Conv2d(channels, channels, 1)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.relu(self.conv2(self.drop(self.relu(self.conv1(x))))))


class DeepLabV1(nn.Module):
    """DeepLab v1 LargeFOV: VGG16 (output stride 8) -> pool5a -> fc6/fc7/fc8 -> x8 Caffe interpolation.

    ``backbone.features`` keeps torchvision's ``vgg16`` keys; the head's keys are the
    prototxt's layer names (``head.fc6``, ``head.fc7``, ``fc8``). Pools 1-3 are 3x3
    stride 2 pad 1, so the fc6 input is (N, 512, ceil(H/8), ceil(W/8)) (41 x 41 for the
    paper's 321 x 321 crops, as in Caffe); logits are upsampled x8 as the reference's
    ``Interp`` layer (:func:`caffe_interp`: 41 -> 321) and fitted to (H, W).

    ``multiscale=True`` is DeepLab-MSc-LargeFOV (paper Sec. 4.3 "multi-scale prediction"):
    a two-layer MLP (:class:`MultiScaleMLP`, 128 3x3 then 128 1x1) on the input image and on
    pool1 .. pool4, each strided to output stride 8 (8, 4, 2, 1, 1), concatenated after fc7
    (1024 + 5 * 128 = 1664 channels into fc8). Keys ``ms.0`` (image) .. ``ms.4`` (pool4).

    Args:
        num_classes: K.
        in_channels: image channels.
        multiscale: build the MSc branches.
        base_channels: VGG16 width (64; stages 1, 2, 4, 8, 8 times it).
        fc_channels: width of fc6 and fc7 (1024 in LargeFOV).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        multiscale: bool = False,
        base_channels: int = 64,
        fc_channels: int = 1024,
    ) -> None:
        super().__init__()
        self.backbone = VGG16(in_channels, batch_norm=False, base_channels=base_channels)
        for stage in (1, 2, 3):
            self.backbone.replace_pool(stage, nn.MaxPool2d(3, 2, 1))
        for stage in (4, 5):
            self.backbone.replace_pool(stage, nn.MaxPool2d(3, 1, 1))
        conv5, _ = self.backbone.stages()[4]
        for m in conv5:
            if isinstance(m, nn.Conv2d):
                m.dilation = m.padding = (2, 2)
        self.pool5a = nn.AvgPool2d(3, 1, 1)  # Caffe AVE pooling counts the padding, as here
        self.head = nn.Sequential(
            OrderedDict(
                fc6=nn.Conv2d(self.backbone.out_channels["c5"], fc_channels, 3, padding=12, dilation=12),
                relu6=nn.ReLU(inplace=True),
                drop6=nn.Dropout(0.5),
                fc7=nn.Conv2d(fc_channels, fc_channels, 1),
                relu7=nn.ReLU(inplace=True),
                drop7=nn.Dropout(0.5),
            )
        )
        self.ms = None
        if multiscale:
            widths = [in_channels, *(self.backbone.out_channels[f"c{i}"] for i in (1, 2, 3, 4))]
            self.ms = nn.ModuleList(MultiScaleMLP(c, stride) for c, stride in zip(widths, (8, 4, 2, 1, 1)))
        self.fc8 = nn.Conv2d(fc_channels + (5 * 128 if multiscale else 0), num_classes, 1)
        nn.init.normal_(self.fc8.weight, std=0.01)
        nn.init.zeros_(self.fc8.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, K, H, W) logits."""
        size = x.shape[-2:]
        taps = [x]
        for convs, pool in self.backbone.stages():
            x = pool(convs(x))
            taps.append(x)
        features = self.head(self.pool5a(x))
        if self.ms is not None:
            features = torch.cat([features, *(mlp(t) for mlp, t in zip(self.ms, taps))], dim=1)
        return caffe_interp(self.fc8(features), 8, size)


class DeepLabV2(nn.Module):
    """DeepLab v2: ResNet at output stride 8 -> ASPP-L on ``c5`` -> bilinear resize to the input."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.aspp = ASPPL(backbone.out_channels["c5"], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, K, H, W) logits."""
        return resize_to(self.aspp(self.backbone(x)["c5"]), x.shape[-2:])


class DeepLabV3(nn.Module):
    """DeepLab v3: backbone -> :class:`DeepLabHead` on ``c5`` -> resize; optional aux head on ``c4``.

    Keys follow torchvision's ``deeplabv3_resnet50/101`` (``backbone.*``, ``classifier.*``,
    ``aux_classifier.*``); with ``head="torchvision"`` they are equal. ``forward`` returns the
    main logits; ``forward_with_aux`` adds ``"aux"`` when the aux head was built
    (``aux_weights`` is then ``{"aux": 0.4}``).

    Args:
        backbone: a dilatable backbone (``set_output_stride``, ``out_channels``).
        num_classes: K.
        aux: build torchvision's auxiliary :class:`FCNHead` on ``c4``.
        head: ``"paper"`` or ``"torchvision"`` (see :class:`DeepLabHead`).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, aux: bool = False, head: str = "paper") -> None:
        super().__init__()
        self.backbone = backbone
        rates = aspp_rates(backbone.output_stride)
        self.classifier = DeepLabHead(backbone.out_channels["c5"], num_classes, rates, head=head)
        self.aux_classifier = FCNHead(backbone.out_channels["c4"], num_classes) if aux else None
        self.aux_weights: dict[str, float] = {"aux": 0.4} if aux else {}

    @property
    def output_stride(self) -> int:
        return self.backbone.output_stride

    def set_output_stride(self, output_stride: int) -> None:
        """Switch backbone dilation and ASPP rates together (8, 16 or 32), in place."""
        self.backbone.set_output_stride(output_stride, self.backbone.multi_grid)
        self.classifier[0].set_rates(aspp_rates(output_stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, K, H, W) logits."""
        return resize_to(self.classifier(self.backbone(x)["c5"]), x.shape[-2:])

    def forward_with_aux(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, C, H, W) -> ``{"out": (N, K, H, W)}`` plus ``"aux"`` (N, K, H, W) if built."""
        features = self.backbone(x)
        outputs = {"out": resize_to(self.classifier(features["c5"]), x.shape[-2:])}
        if self.aux_classifier is not None:
            outputs["aux"] = resize_to(self.aux_classifier(features["c4"]), x.shape[-2:])
        return outputs


class DeepLabV3Plus(nn.Module):
    """DeepLab v3+: backbone -> ASPP on ``c5`` -> :class:`Decoder` with ``c2`` -> 1x1 classifier -> resize.

    Args:
        backbone: a dilatable backbone whose ``c2`` has stride 4.
        num_classes: K.
        separable: depthwise separable convs in the ASPP 3x3 branches and the decoder.
        channels: width of ASPP and decoder (256).
        dropout: after the ASPP projection (0.1, as TF DeepLab).
    """

    def __init__(
        self, backbone: nn.Module, num_classes: int, separable: bool = True, channels: int = 256, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.backbone = backbone
        rates = aspp_rates(backbone.output_stride)
        self.aspp = ASPP(backbone.out_channels["c5"], channels, rates, separable, dropout)
        self.decoder = Decoder(channels, backbone.out_channels["c2"], channels, separable=separable)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    @property
    def output_stride(self) -> int:
        return self.backbone.output_stride

    def set_output_stride(self, output_stride: int) -> None:
        """Switch backbone dilation and ASPP rates together (8, 16 or 32), in place."""
        self.backbone.set_output_stride(output_stride, self.backbone.multi_grid)
        self.aspp.set_rates(aspp_rates(output_stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, K, H, W) logits."""
        features = self.backbone(x)
        out = self.decoder(self.aspp(features["c5"]), features["c2"])
        return resize_to(self.classifier(out), x.shape[-2:])


CASCADE_OUTPUT_STRIDES = (8, 16)


class DeepLabV3Cascade(nn.Module):
    """DeepLab v3 "going deeper" (Sec. 3.1, Fig. 3): ResNet block4 copied as block5-7 in cascade, 1x1 classifier.

    ``blocks`` holds block5, block6 and block7: copies of ResNet ``layer4`` (three bottleneck
    units, 2048 -> 512 -> 2048), each with a stride-2 first unit whose shortcut subsamples
    (1x1 max-pool, TF ResNet's shortcut when depths match). At output stride 16 or 8 every
    stride after it becomes atrous, so the block rates double block by block: layer4 2, 4, 8,
    16 at output stride 16 (4, 8, 16, 32 at 8). ``multi_grid`` gives the three units of each
    of block4-7 unit rates multiplied by the block's rate (the paper applies Multi-Grid to
    block4 to block7): block7 at output stride 16 with (1, 2, 4) uses rates (16, 32, 64).
    Logits: 1x1 conv on block7, bilinearly resized to the input.

    Args:
        backbone: a :class:`~pixelwise.models.backbones.ResNet` with bottleneck blocks.
        num_classes: K.
        output_stride: 16 (default) or 8.
        multi_grid: unit rates of the three units of each block (``(1, 2, 4)``).
    """

    def __init__(self, backbone: ResNet, num_classes: int, output_stride: int = 16, multi_grid: Sequence[int] = (1, 2, 4)) -> None:
        super().__init__()
        if len(backbone.layer4) != 3 or not isinstance(backbone.layer4[0], Bottleneck):
            raise ValueError("DeepLabV3Cascade needs a ResNet-50/101 backbone (three bottleneck units in layer4)")
        self.backbone = backbone
        channels = backbone.out_channels["c5"]
        self.blocks = nn.ModuleList(
            nn.Sequential(
                Bottleneck(channels, channels // 4, 2, nn.Sequential(nn.MaxPool2d(1, 2))),
                *(Bottleneck(channels, channels // 4) for _ in range(2)),
            )
            for _ in range(3)
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.set_output_stride(output_stride, multi_grid)

    def set_output_stride(self, output_stride: int, multi_grid: Sequence[int] | None = None) -> None:
        """Set the rates of block4-7 for output stride 16 or 8 (exact switch: every later rate doubles)."""
        if output_stride not in CASCADE_OUTPUT_STRIDES:
            raise ValueError(f"output_stride={output_stride} is not supported by the cascaded model; choose 8 or 16")
        multi_grid = tuple(multi_grid if multi_grid is not None else self.multi_grid)
        if len(multi_grid) != 3:
            raise ValueError(f"multi_grid={multi_grid} needs one unit rate per unit of a block (3 values)")
        self.backbone.set_output_stride(output_stride, multi_grid)
        rate = 32 // output_stride  # block4's rate
        for block in self.blocks:
            rate *= 2
            for unit, g in zip(block, multi_grid):
                unit.set_stride_dilation(1, rate * g, rate * g)
        self.multi_grid = multi_grid

    @property
    def output_stride(self) -> int:
        return self.backbone.output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, K, H, W) logits."""
        out = self.backbone(x)["c5"]
        for block in self.blocks:
            out = block(out)
        return resize_to(self.classifier(out), x.shape[-2:])


# ---------------------------------------------------------------------------- builders


def _check_backbone(model: str, backbone: str, choices: Sequence[str]) -> None:
    if backbone not in choices:
        raise ValueError(f"{model} backbone={backbone!r} is not supported; choose one of {list(choices)}")


def deeplabv1(*, num_classes: int, in_channels: int = 3) -> DeepLabV1:
    """DeepLab v1 LargeFOV on VGG16, Caffe Interp x8 upsampling (20,505,429 parameters for 21 classes).

    Args:
        num_classes: K.
        in_channels: image channels.
    """
    return DeepLabV1(num_classes, in_channels)


def deeplabv1_msc(*, num_classes: int, in_channels: int = 3) -> DeepLabV1:
    """DeepLab-MSc-LargeFOV: LargeFOV plus 128+128 MLPs on the image and pool1-4, concatenated before fc8.

    21 classes: 20,505,429 + the five MLPs (3x3 conv 128 + 1x1 conv 128, with biases, on 3,
    64, 128, 256 and 512 channels) + 640 more fc8 inputs per class = 21,711,445 parameters.

    Args:
        num_classes: K.
        in_channels: image channels.
    """
    return DeepLabV1(num_classes, in_channels, multiscale=True)


def load_deeplabv1_vgg16(model: DeepLabV1, path: str | Path) -> list[str]:
    """Initialise a :class:`DeepLabV1` (LargeFOV or MSc) from a local torchvision ``vgg16`` ImageNet checkpoint.

    ``features.*`` go to the backbone; fc6 and fc7 are subsampled from the ImageNet
    classifier as the reference did (DeepLab v1, Sec. 4.1 and the released
    ``init.caffemodel``): fc6 (4096, 512, 7, 7) keeps every 4th filter and, in space, the
    taps 0, 3, 6 (the 7x7 kernel decimated to 3x3, which the rate-12 dilation spreads back
    out) -> (1024, 512, 3, 3); fc7 (4096, 4096) keeps every 4th output and input ->
    (1024, 1024, 1, 1); biases keep every 4th entry. fc8 and the MSc branches stay as
    initialised. (For a model built with other widths the checkpoint's fc layers must be
    4 times ``fc_channels`` wide.)

    Returns:
        The checkpoint keys that were not used (the ImageNet classifier ``classifier.6.*``).
    """
    state = read_state_dict(path)
    try:
        unused = load_backbone_weights(model.backbone, state)
    except ValueError as err:
        raise ValueError(f"{str(path)!r}: {err}") from err
    fc6 = model.head.fc6
    (fc6_w, fc6_b), (fc7_w, fc7_b) = vgg16_fc_as_convs(state, str(path), fc6.in_channels, 4 * fc6.out_channels)
    with torch.no_grad():
        model.head.fc6.weight.copy_(fc6_w[::4, :, ::3, ::3])
        model.head.fc6.bias.copy_(fc6_b[::4])
        model.head.fc7.weight.copy_(fc7_w[::4, ::4])
        model.head.fc7.bias.copy_(fc7_b[::4])
    return [k for k in unused if not k.startswith(("classifier.0.", "classifier.3."))]


def deeplabv2(*, num_classes: int, in_channels: int = 3, backbone: str = "resnet101") -> DeepLabV2:
    """DeepLab v2 with ASPP-L on a ResNet at output stride 8 (ResNet-101, 21 classes: 44,048,532 parameters).

    Args:
        num_classes: K.
        in_channels: image channels.
        backbone: ``"resnet101"`` (the paper, default) or ``"resnet50"``.
    """
    _check_backbone("deeplabv2", backbone, ("resnet50", "resnet101"))
    return DeepLabV2(create_backbone(backbone, in_channels, output_stride=8), num_classes)


def deeplabv3(
    *,
    num_classes: int,
    in_channels: int = 3,
    backbone: str = "resnet50",
    output_stride: int = 16,
    multi_grid: Sequence[int] | None = (1, 2, 4),
    aux: bool = False,
    head: str = "paper",
) -> DeepLabV3:
    """DeepLab v3 (parallel ASPP); paper head by default, option head="torchvision" (torchvision's layout).

    Args:
        num_classes: K.
        in_channels: image channels.
        backbone: ``"resnet50"`` (default) or ``"resnet101"``.
        output_stride: 16 (default; ASPP rates 6/12/18) or 8 (12/24/36); 32 also works
            (3/6/9). Change it later with ``model.set_output_stride``.
        multi_grid: unit rates of the three ``layer4`` blocks, times the block rate (paper
            Sec. 3.2): default (1, 2, 4), i.e. rates (2, 4, 8) at output stride 16.
            ``None`` is torchvision's dilation (1, 2, 2) at 16.
        aux: auxiliary FCN head on ``c4`` (loss weight 0.4); off by default so that
            ``forward`` uses every parameter.
        head: ``"paper"`` (default): ASPP -> 1x1 conv 256 + BN -> 1x1 logits;
            ``"torchvision"``: ASPP with dropout 0.5 -> 3x3 conv + BN + ReLU -> 1x1 logits,
            torchvision's keys. A torchvision ``deeplabv3_resnet*`` checkpoint loads with
            ``head="torchvision", output_stride=8, multi_grid=None``.
    """
    _check_backbone("deeplabv3", backbone, ("resnet50", "resnet101"))
    return DeepLabV3(create_backbone(backbone, in_channels, output_stride, multi_grid), num_classes, aux, head)


def deeplabv3_cascade(
    *,
    num_classes: int,
    in_channels: int = 3,
    backbone: str = "resnet50",
    output_stride: int = 16,
    multi_grid: Sequence[int] = (1, 2, 4),
) -> DeepLabV3Cascade:
    """DeepLab v3 cascaded, the paper's Sec. 3.1: block4 copied as block5-7, doubling atrous rates, multi-grid (1, 2, 4).

    ResNet-50, 21 classes: 63,714,389 parameters (the backbone's 23,508,032, three blocks of
    three 2048-512-2048 bottlenecks, and a 1x1 classifier).

    Args:
        num_classes: K.
        in_channels: image channels.
        backbone: ``"resnet50"`` (default) or ``"resnet101"``.
        output_stride: 16 (default) or 8 (switch later with ``model.set_output_stride``).
        multi_grid: unit rates within each of block4-7, times the block's rate.
    """
    _check_backbone("deeplabv3_cascade", backbone, ("resnet50", "resnet101"))
    net = ResNet(int(backbone.removeprefix("resnet")), in_channels, output_stride, multi_grid)
    return DeepLabV3Cascade(net, num_classes, output_stride, multi_grid)


def deeplabv3plus(
    *,
    num_classes: int,
    in_channels: int = 3,
    backbone: str = "xception65",
    output_stride: int = 16,
    multi_grid: Sequence[int] | None = None,
    separable: bool = True,
) -> DeepLabV3Plus:
    """DeepLab v3+; paper: aligned Xception-65 + separable ASPP/decoder (default), option backbone="resnet50"/"resnet101".

    Args:
        num_classes: K.
        in_channels: image channels.
        backbone: ``"xception65"`` (default: the paper's aligned Xception), ``"resnet50"``,
            ``"resnet101"`` or ``"mobilenetv2"`` (fast on CPU).
        output_stride: 16 (default) or 8; 32 also works. Change it later with
            ``model.set_output_stride``.
        multi_grid: unit rates of the last stage (three values; ResNet ``layer4`` or the
            last Xception exit block); default none. Not for ``mobilenetv2``.
        separable: depthwise separable 3x3 convs in ASPP and decoder (default, the paper);
            ``False`` for plain 3x3 convs (the layout of the common ResNet ports).
    """
    _check_backbone("deeplabv3plus", backbone, ("resnet50", "resnet101", "xception65", "mobilenetv2"))
    return DeepLabV3Plus(create_backbone(backbone, in_channels, output_stride, multi_grid), num_classes, separable)


MODELS = {
    "deeplabv1": deeplabv1,
    "deeplabv1_msc": deeplabv1_msc,
    "deeplabv2": deeplabv2,
    "deeplabv3": deeplabv3,
    "deeplabv3_cascade": deeplabv3_cascade,
    "deeplabv3plus": deeplabv3plus,
}
