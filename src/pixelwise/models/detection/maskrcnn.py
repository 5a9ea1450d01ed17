"""Mask R-CNN (He, Gkioxari, Dollár & Girshick, ICCV 2017, https://arxiv.org/abs/1703.06870) with a ResNet-FPN backbone.

ResNet -> FPN (P2-P5 from c2-c5, P6 by stride-2 subsampling of P5) -> RPN (anchors 32-512
on P2-P6, ratios 0.5/1/2) -> RoIAlign 7x7 -> two FC 1024 -> class scores + class-specific
boxes; RoIAlign 14x14 -> four 3x3 256 convs -> 2x2 deconv -> per-class 28x28 masks.

State-dict keys equal torchvision's ``maskrcnn_resnet50_fpn`` (``backbone.body.*``,
``backbone.fpn.inner_blocks.0.0.*``, ``rpn.head.*``, ``roi_heads.*``) so its checkpoints load
from a local file with :func:`load_torchvision_weights` (older key spellings included).
Unlike torchvision the model does not resize or normalise images: feed what the data
pipeline gives (for torchvision's COCO weights: RGB normalised with ImageNet mean/std, shorter
side about 800 px).

Input: a list of (C, H_i, W_i) images or an (N, C, H, W) tensor. Training (``model.train()``)
takes ``targets``, one dict per image with ``boxes`` (G, 4) float ``(x1, y1, x2, y2)`` pixels,
``labels`` (G,) int64 in 1..K-1 and ``masks`` (G, H, W) uint8, and returns a dict of losses.
Evaluation returns one dict per image: ``boxes`` (D, 4), ``labels`` (D,), ``scores`` (D,),
``masks`` (D, 1, H, W) probabilities.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pixelwise.models.backbones import RESNET_DEPTHS, ResNet, read_state_dict
from pixelwise.models.detection.anchors import AnchorGenerator
from pixelwise.models.detection.roi_heads import BoxPredictor, MaskHead, MaskPredictor, RoIHeads, TwoMLPHead
from pixelwise.models.detection.rpn import RegionProposalNetwork, RPNHead

LEVELS = ("c2", "c3", "c4", "c5")
SIZE_DIVISIBLE = 32


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine terms, all buffers (torchvision's, for small detection batches)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((channels,), fill))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[:, None, None] + shift[:, None, None]


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d inside ``module`` by a :class:`FrozenBatchNorm2d` holding its values, in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps).to(child.weight.device)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


class DetectionFPN(nn.Module):
    """FPN for detection (Lin et al. 2017, Sec. 3 and 4.1) in torchvision's layout.

    Same computation as :class:`pixelwise.models.fpn.FPN` plus P6 (1x1 max pool, stride 2,
    on P5); kept apart for torchvision's key names (``inner_blocks.i.0``, ``layer_blocks.i.0``)
    and its initialisation (Kaiming uniform, a=1; zero bias).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        self.inner_blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(c, out_channels, 1)) for c in in_channels)
        self.layer_blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, padding=1)) for _ in in_channels)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_uniform_(layer.weight, a=1)
                nn.init.zeros_(layer.bias)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """[c2, c3, c4, c5] -> [P2, P3, P4, P5, P6], each (N, out_channels, h_i, w_i)."""
        merged = [inner(f) for inner, f in zip(self.inner_blocks, features)]
        for i in range(len(merged) - 1, 0, -1):
            merged[i - 1] = merged[i - 1] + F.interpolate(merged[i], size=merged[i - 1].shape[-2:], mode="nearest")
        out = [layer(m) for layer, m in zip(self.layer_blocks, merged)]
        return out + [F.max_pool2d(out[-1], 1, 2)]


class BackboneWithFPN(nn.Module):
    """``body`` (ResNet) -> ``fpn``: (N, C, H, W) -> [P2, ..., P6]."""

    def __init__(self, body: ResNet, out_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        self.fpn = DetectionFPN([body.out_channels[c] for c in LEVELS], out_channels)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        features = self.body(x)
        return self.fpn([features[c] for c in LEVELS])


class MaskRCNN(nn.Module):
    """Backbone + FPN -> RPN -> RoI heads; see the module docstring for inputs and outputs."""

    def __init__(self, backbone: BackboneWithFPN, rpn: RegionProposalNetwork, roi_heads: RoIHeads) -> None:
        super().__init__()
        self.backbone, self.rpn, self.roi_heads = backbone, rpn, roi_heads

    @staticmethod
    def batch_images(images: Tensor | Sequence[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Zero-pad images to a common size divisible by 32: (N, C, H', W') and the (H, W) of each."""
        sizes = [tuple(int(s) for s in im.shape[-2:]) for im in images]
        h = -(-max(s[0] for s in sizes) // SIZE_DIVISIBLE) * SIZE_DIVISIBLE
        w = -(-max(s[1] for s in sizes) // SIZE_DIVISIBLE) * SIZE_DIVISIBLE
        batch = images[0].new_zeros(len(images), images[0].shape[0], h, w)
        for i, im in enumerate(images):
            batch[i, :, : im.shape[-2], : im.shape[-1]] = im
        return batch, sizes

    def forward(self, images: Tensor | Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Losses (training, needs ``targets``) or detections (evaluation)."""
        if self.training and targets is None:
            raise ValueError("MaskRCNN in training mode needs targets (boxes, labels, masks per image); call model.eval() to detect")
        if self.training and len(targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(targets)} targets; give one target dict per image")
        batch, sizes = self.batch_images(images)
        pyramid = self.backbone(batch)
        gt_boxes = [t["boxes"] for t in targets] if self.training else None
        proposals, losses = self.rpn(pyramid, tuple(batch.shape[-2:]), sizes, gt_boxes)
        if self.training:
            return {**losses, **self.roi_heads.loss(pyramid[:-1], proposals, targets)}
        return self.roi_heads.detect(pyramid[:-1], proposals, sizes)


def _freeze_layers(body: ResNet, trainable_layers: int) -> None:
    """Stop gradients to all but the last ``trainable_layers`` of (conv1, layer1, ..., layer4), as torchvision."""
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_backbone_layers must be in 0..5, got {trainable_layers}")
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers] + (["bn1"] if trainable_layers == 5 else [])
    for name, param in body.named_parameters():
        if not any(name.startswith(t) for t in train):
            param.requires_grad_(False)


def maskrcnn(
    *,
    num_classes: int,
    in_channels: int = 3,
    backbone: str = "resnet50",
    frozen_bn: bool = False,
    trainable_backbone_layers: int = 5,
    fpn_channels: int = 256,
    representation_size: int = 1024,
    mask_channels: int = 256,
    anchor_sizes: Sequence[float] = (32, 64, 128, 256, 512),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    rpn_pre_nms_top_n: Sequence[int] = (2000, 1000),
    rpn_post_nms_top_n: Sequence[int] = (2000, 1000),
    rpn_batch_size_per_image: int = 256,
    box_batch_size_per_image: int = 512,
    box_score_threshold: float = 0.05,
    detections_per_image: int = 100,
) -> MaskRCNN:
    """Mask R-CNN with a ResNet-FPN backbone; defaults are the paper's R50-FPN (torchvision's v1 layout).

    Args:
        num_classes: K, background included (COCO: 91).
        in_channels: image channels.
        backbone: ``resnet50`` (default), ``resnet101``, or ``resnet18``/``resnet34`` for small models.
        frozen_bn: BatchNorm as fixed buffers (torchvision's choice with pretrained backbones).
        trainable_backbone_layers: 0..5 of (layer4, layer3, layer2, layer1, conv1) that train.
        fpn_channels: pyramid width (256).
        representation_size: box head FC width (1024).
        mask_channels: mask head conv width (256).
        anchor_sizes: one per level P2..P6.
        aspect_ratios: anchor height/width ratios.
        rpn_pre_nms_top_n: (training, testing) proposals per level before NMS.
        rpn_post_nms_top_n: (training, testing) proposals per image after NMS.
        rpn_batch_size_per_image: anchors sampled per image for the RPN loss.
        box_batch_size_per_image: RoIs sampled per image for the head losses.
        box_score_threshold: minimum class score of a detection.
        detections_per_image: most detections returned per image.
    """
    if backbone not in RESNET_DEPTHS:
        raise ValueError(f"maskrcnn backbone={backbone!r} is not supported; choose one of {', '.join(RESNET_DEPTHS)}")
    if len(anchor_sizes) != len(LEVELS) + 1:
        raise ValueError(f"anchor_sizes needs one size per level P2..P6 (5), got {list(anchor_sizes)}")
    body = ResNet(RESNET_DEPTHS[backbone], in_channels, output_stride=32)
    if frozen_bn:
        freeze_batchnorm(body)
    _freeze_layers(body, trainable_backbone_layers)
    neck = BackboneWithFPN(body, fpn_channels)
    anchors = AnchorGenerator(anchor_sizes, aspect_ratios)
    rpn = RegionProposalNetwork(
        RPNHead(fpn_channels, anchors.num_anchors_per_location),
        anchors,
        pre_nms_top_n=tuple(rpn_pre_nms_top_n),
        post_nms_top_n=tuple(rpn_post_nms_top_n),
        batch_size_per_image=rpn_batch_size_per_image,
    )
    heads = RoIHeads(
        TwoMLPHead(fpn_channels * 7 * 7, representation_size),
        BoxPredictor(representation_size, num_classes),
        MaskHead(fpn_channels, mask_channels),
        MaskPredictor(mask_channels, mask_channels, num_classes),
        batch_size_per_image=box_batch_size_per_image,
        score_threshold=box_score_threshold,
        detections_per_image=detections_per_image,
    )
    return MaskRCNN(neck, rpn, heads)


def maskrcnn_resnet50_fpn(*, num_classes: int, in_channels: int = 3, frozen_bn: bool = False, trainable_backbone_layers: int = 5) -> MaskRCNN:
    """Mask R-CNN R50-FPN as the paper and torchvision's ``maskrcnn_resnet50_fpn``: 44,454,513 parameters for K = 91."""
    return maskrcnn(num_classes=num_classes, in_channels=in_channels, backbone="resnet50", frozen_bn=frozen_bn, trainable_backbone_layers=trainable_backbone_layers)


def maskrcnn_resnet101_fpn(*, num_classes: int, in_channels: int = 3, frozen_bn: bool = False, trainable_backbone_layers: int = 5) -> MaskRCNN:
    """Mask R-CNN R101-FPN (He et al. 2017, Table 3)."""
    return maskrcnn(num_classes=num_classes, in_channels=in_channels, backbone="resnet101", frozen_bn=frozen_bn, trainable_backbone_layers=trainable_backbone_layers)


def torchvision_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename the keys of torchvision checkpoints written before 0.13 to today's layout (others pass unchanged).

    ``backbone.fpn.{inner,layer}_blocks.i.*`` -> ``...i.0.*``, ``rpn.head.conv.*`` ->
    ``rpn.head.conv.0.0.*``, ``roi_heads.mask_head.mask_fcnK.*`` -> ``roi_heads.mask_head.{K-1}.0.*``.
    """
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith(("backbone.fpn.inner_blocks.", "backbone.fpn.layer_blocks.")) and len(parts) == 5:
            key = ".".join(parts[:4] + ["0", parts[4]])
        elif key.startswith("rpn.head.conv.") and len(parts) == 4:
            key = ".".join(parts[:3] + ["0", "0", parts[3]])
        elif key.startswith("roi_heads.mask_head.mask_fcn"):
            key = f"roi_heads.mask_head.{int(parts[2][len('mask_fcn'):]) - 1}.0.{parts[3]}"
        out[key] = value
    return out


def load_torchvision_weights(model: MaskRCNN, weights: str | Path | Mapping[str, Tensor]) -> None:
    """Load a torchvision Mask R-CNN checkpoint (local ``.pth`` / ``.safetensors`` or a state dict) into ``model``.

    Every parameter and buffer must be present with the right shape, except BatchNorm's
    ``num_batches_tracked`` (absent from frozen-BN checkpoints); otherwise ``ValueError``.
    """
    state = torchvision_keys(weights if isinstance(weights, Mapping) else read_state_dict(weights))
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"checkpoint does not fit this Mask R-CNN: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shapes {wrong[:3]}; build the model with the checkpoint's num_classes, backbone and frozen_bn"
        )
    model.load_state_dict(state, strict=False)


maskrcnn.kind = maskrcnn_resnet50_fpn.kind = maskrcnn_resnet101_fpn.kind = "detection"
MODELS = {"maskrcnn": maskrcnn, "maskrcnn_resnet50_fpn": maskrcnn_resnet50_fpn, "maskrcnn_resnet101_fpn": maskrcnn_resnet101_fpn}
