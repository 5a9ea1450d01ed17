"""Mask R-CNN's RoI heads (He et al. 2017, Sec. 3 and Fig. 4 right): box head and mask head on RoIAlign features.

State-dict keys as torchvision's ``RoIHeads``: ``box_head.fc6/fc7``,
``box_predictor.cls_score/bbox_pred``, ``mask_head.{0..3}.0`` (``mask_fcn1..4`` in
checkpoints from before torchvision 0.13), ``mask_predictor.conv5_mask/mask_fcn_logits``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pixelwise.models.detection.ops import (
    BoxCoder,
    batched_nms,
    box_iou,
    clip_boxes,
    match_boxes,
    multiscale_roi_align,
    paste_masks,
    remove_small_boxes,
    roi_align,
    sample_labels,
)


class TwoMLPHead(nn.Module):
    """Flattened (R, C, 7, 7) RoI features -> two FC + ReLU layers -> (R, representation_size)."""

    def __init__(self, in_features: int, representation_size: int = 1024) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_features, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


class BoxPredictor(nn.Module):
    """(R, D) -> class logits (R, K) and class-specific box deltas (R, 4K)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class MaskHead(nn.Sequential):
    """Four 3x3 conv + ReLU layers on (R, C, 14, 14) RoI features; keys ``{i}.0.weight``."""

    def __init__(self, in_channels: int, channels: int = 256, num_convs: int = 4) -> None:
        super().__init__(
            *(nn.Sequential(nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1), nn.ReLU(inplace=True)) for i in range(num_convs))
        )
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(layer.bias)


class MaskPredictor(nn.Sequential):
    """2x2 stride-2 transposed conv + ReLU, then a 1x1 conv: (R, C, 14, 14) -> (R, K, 28, 28) mask logits."""

    def __init__(self, in_channels: int, channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(in_channels, channels, 2, 2)
        self.relu = nn.ReLU(inplace=True)
        self.mask_fcn_logits = nn.Conv2d(channels, num_classes, 1)
        for name, param in self.named_parameters():
            if "weight" in name:
                nn.init.kaiming_normal_(param, mode="fan_out", nonlinearity="relu")


def box_losses(class_logits: Tensor, box_deltas: Tensor, labels: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Fast R-CNN losses (Girshick 2015, Eq. 1): CE over classes, smooth L1 (beta 1/9) on the GT class's deltas of foreground RoIs, summed / number of RoIs.

    Args:
        class_logits: (R, K).
        box_deltas: (R, 4K).
        labels: (R,) class ids, 0 = background.
        targets: (R, 4) encoded regression targets (ignored where label is 0).
    """
    classification = F.cross_entropy(class_logits, labels)
    fg = torch.where(labels > 0)[0]
    deltas = box_deltas.reshape(len(box_deltas), -1, 4)[fg, labels[fg]]
    regression = F.smooth_l1_loss(deltas, targets[fg], beta=1 / 9, reduction="sum") / max(labels.numel(), 1)
    return {"loss_classifier": classification, "loss_box_reg": regression}


def mask_loss(mask_logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Mask R-CNN's L_mask (Sec. 3): mean per-pixel BCE on the GT class's mask only, (R, K, M, M) vs (R, M, M)."""
    if len(labels) == 0:
        return mask_logits.sum() * 0
    chosen = mask_logits[torch.arange(len(labels), device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(chosen, targets)


def mask_targets(gt_masks: Tensor, matched: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Crop and resize each RoI's matched GT mask to (R, size, size) with RoIAlign (soft targets, as torchvision)."""
    rois = torch.cat([matched[:, None].to(boxes), boxes], 1)
    return roi_align(gt_masks[:, None].to(boxes), rois, size, 1.0, 2)[:, 0]


class RoIHeads(nn.Module):
    """Box and mask heads, their training targets and losses, and the test-time path.

    Training (defaults as the paper / torchvision): GT boxes join the proposals; a proposal
    is foreground at IoU >= 0.5 with a GT box, else background; 512 RoIs per image, at most a
    quarter foreground. Testing: softmax scores, class-specific boxes, score > 0.05, NMS at
    0.5 per class, the 100 best, then the mask head on those boxes, the predicted class's
    28x28 mask pasted into the image.
    """

    def __init__(
        self,
        box_head: TwoMLPHead,
        box_predictor: BoxPredictor,
        mask_head: MaskHead,
        mask_predictor: MaskPredictor,
        fg_iou: float = 0.5,
        bg_iou: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        score_threshold: float = 0.05,
        nms_threshold: float = 0.5,
        detections_per_image: int = 100,
        box_pool_size: int = 7,
        mask_pool_size: int = 14,
        sampling_ratio: int = 2,
    ) -> None:
        super().__init__()
        self.box_head, self.box_predictor = box_head, box_predictor
        self.mask_head, self.mask_predictor = mask_head, mask_predictor
        self.box_coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
        self.fg_iou, self.bg_iou = fg_iou, bg_iou
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.score_threshold, self.nms_threshold, self.detections_per_image = score_threshold, nms_threshold, detections_per_image
        self.box_pool_size, self.mask_pool_size, self.sampling_ratio = box_pool_size, mask_pool_size, sampling_ratio

    def box_forward(self, pyramid: Sequence[Tensor], boxes: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        features = multiscale_roi_align(pyramid, boxes, self.box_pool_size, self.sampling_ratio)
        class_logits, box_deltas = self.box_predictor(self.box_head(features))
        return class_logits.float(), box_deltas.float()

    def mask_forward(self, pyramid: Sequence[Tensor], boxes: Sequence[Tensor]) -> Tensor:
        features = multiscale_roi_align(pyramid, boxes, self.mask_pool_size, self.sampling_ratio)
        return self.mask_predictor(self.mask_head(features)).float()

    def sample(self, proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Sampled RoIs (S, 4) of one image, their labels (S,) and matched GT index (S,), foreground first."""
        proposals = torch.cat([proposals, gt_boxes])
        matches = match_boxes(box_iou(gt_boxes, proposals), self.fg_iou, self.bg_iou, allow_low_quality=False)
        pos, neg = sample_labels(matches, self.batch_size_per_image, self.positive_fraction)
        keep = torch.cat([pos, neg])
        matched = matches[keep].clamp(min=0)
        labels = gt_labels[matched] if len(gt_labels) else torch.zeros_like(matched)
        labels[len(pos):] = 0
        return proposals[keep], labels, matched

    def loss(self, pyramid: Sequence[Tensor], proposals: Sequence[Tensor], targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Box classification / regression and mask losses for one batch."""
        rois, labels, matched = zip(*(self.sample(p, t["boxes"], t["labels"]) for p, t in zip(proposals, targets)))
        class_logits, box_deltas = self.box_forward(pyramid, rois)
        regression = torch.cat([
            self.box_coder.encode(t["boxes"][m], r) if len(t["boxes"]) else torch.zeros_like(r)
            for r, m, t in zip(rois, matched, targets)
        ])
        losses = box_losses(class_logits, box_deltas, torch.cat(labels), regression)
        fg = [torch.where(lab > 0)[0] for lab in labels]
        mask_logits = self.mask_forward(pyramid, [r[f] for r, f in zip(rois, fg)])
        size = mask_logits.shape[-1]
        mask_target = [
            mask_targets(t["masks"], m[f], r[f], size) for r, m, f, t in zip(rois, matched, fg, targets) if len(f)
        ]
        fg_labels = torch.cat([lab[f] for lab, f in zip(labels, fg)])
        mask_target = torch.cat(mask_target) if mask_target else mask_logits.new_zeros(0, size, size)
        losses["loss_mask"] = mask_loss(mask_logits, fg_labels, mask_target)
        return losses

    def detect(self, pyramid: Sequence[Tensor], proposals: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Test-time path: per image ``boxes`` (D, 4), ``labels`` (D,), ``scores`` (D,), ``masks`` (D, 1, H, W) probabilities."""
        class_logits, box_deltas = self.box_forward(pyramid, proposals)
        num_classes = class_logits.shape[1]
        scores_all = F.softmax(class_logits, -1).split([len(p) for p in proposals])
        boxes_all = self.box_coder.decode(box_deltas, torch.cat(proposals)).split([len(p) for p in proposals])
        results = []
        for scores, boxes, size in zip(scores_all, boxes_all, image_sizes):
            boxes = clip_boxes(boxes, size)[:, 1:].reshape(-1, 4)  # drop background
            labels = torch.arange(1, num_classes, device=scores.device).repeat(len(scores))
            scores = scores[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_threshold)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = remove_small_boxes(boxes, 1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_threshold)[: self.detections_per_image]
            results.append({"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]})
        mask_logits = self.mask_forward(pyramid, [r["boxes"] for r in results])
        probs = mask_logits.sigmoid().split([len(r["boxes"]) for r in results])
        for r, p, size in zip(results, probs, image_sizes):
            chosen = p[torch.arange(len(p), device=p.device), r["labels"]]
            r["masks"] = paste_masks(chosen, r["boxes"], size)[:, None]
        return results
