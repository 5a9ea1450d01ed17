"""Region Proposal Network (Ren et al. 2015, Sec. 3.1) on a feature pyramid (Lin et al. 2017, Sec. 4.1).

State-dict keys as torchvision's ``RPNHead``: ``head.conv.0.0.{weight,bias}``,
``head.cls_logits.*``, ``head.bbox_pred.*``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pixelwise.models.detection.anchors import AnchorGenerator
from pixelwise.models.detection.ops import (
    BoxCoder,
    batched_nms,
    box_iou,
    clip_boxes,
    match_boxes,
    remove_small_boxes,
    sample_labels,
)


class RPNHead(nn.Module):
    """3x3 conv + ReLU shared over levels, then 1x1 convs for A objectness logits and 4A box deltas per location."""

    def __init__(self, in_channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Sequential(nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.ReLU(inplace=True)))
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)

    def forward(self, pyramid: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: objectness (N, A, h, w) and deltas (N, 4A, h, w)."""
        hidden = [self.conv(p) for p in pyramid]
        return [self.cls_logits(t) for t in hidden], [self.bbox_pred(t) for t in hidden]


def _flatten(x: Tensor, channels: int) -> Tensor:
    """(N, A*channels, h, w) -> (N, h*w*A, channels), location-major like the anchors."""
    n, _, h, w = x.shape
    return x.view(n, -1, channels, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, channels)


class RegionProposalNetwork(nn.Module):
    """Proposals and, in training, the RPN losses.

    Defaults are the paper's / torchvision's: anchors match at IoU >= 0.7 (foreground) or
    < 0.3 (background), each ground-truth box also claims its best anchors; 256 anchors per
    image, half positive at most; per level the ``pre_nms_top_n`` best anchors, NMS at 0.7
    within each level, then the ``post_nms_top_n`` best per image.

    Args:
        head: the :class:`RPNHead`.
        anchors: the :class:`AnchorGenerator`.
        pre_nms_top_n: (training, testing) proposals kept per level before NMS.
        post_nms_top_n: (training, testing) proposals kept per image after NMS.
    """

    def __init__(
        self,
        head: RPNHead,
        anchors: AnchorGenerator,
        pre_nms_top_n: tuple[int, int] = (2000, 1000),
        post_nms_top_n: tuple[int, int] = (2000, 1000),
        nms_threshold: float = 0.7,
        fg_iou: float = 0.7,
        bg_iou: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        min_size: float = 1e-3,
    ) -> None:
        super().__init__()
        self.head = head
        self.anchor_generator = anchors
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.pre_nms_top_n, self.post_nms_top_n = pre_nms_top_n, post_nms_top_n
        self.nms_threshold, self.fg_iou, self.bg_iou = nms_threshold, fg_iou, bg_iou
        self.batch_size_per_image, self.positive_fraction, self.min_size = batch_size_per_image, positive_fraction, min_size

    def select_proposals(self, boxes: Tensor, logits: Tensor, level_counts: Sequence[int], image_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """(N, R, 4) decoded anchors and (N, R) objectness -> per image (P_n, 4) proposals, best first."""
        mode = 0 if self.training else 1
        pre, post = self.pre_nms_top_n[mode], self.post_nms_top_n[mode]
        top, levels, start = [], [], 0
        for i, count in enumerate(level_counts):  # best anchors of each level
            k = min(pre, count)
            idx = logits[:, start : start + count].topk(k, dim=1).indices + start
            top.append(idx)
            levels.append(torch.full((k,), i, device=logits.device))
            start += count
        top, levels = torch.cat(top, 1), torch.cat(levels)
        out = []
        for n, size in enumerate(image_sizes):
            b = clip_boxes(boxes[n, top[n]], size)
            s, lv = logits[n, top[n]], levels
            keep = remove_small_boxes(b, self.min_size)
            b, s, lv = b[keep], s[keep], lv[keep]
            keep = batched_nms(b, s, lv, self.nms_threshold)[:post]
            out.append(b[keep])
        return out

    def loss(self, anchors: Tensor, logits: Tensor, deltas: Tensor, gt_boxes: Sequence[Tensor]) -> dict[str, Tensor]:
        """Objectness BCE over the sampled anchors and smooth L1 (beta 1/9) over the positives, divided by the sample count.

        Args:
            anchors: (R, 4), shared by the batch.
            logits: (N, R) objectness.
            deltas: (N, R, 4).
            gt_boxes: per image (G_n, 4).
        """
        sampled_pos, sampled_neg, targets = [], [], []
        for n, gt in enumerate(gt_boxes):
            matches = match_boxes(box_iou(gt, anchors), self.fg_iou, self.bg_iou, allow_low_quality=True)
            pos, neg = sample_labels(matches, self.batch_size_per_image, self.positive_fraction)
            offset = n * len(anchors)
            sampled_pos.append(pos + offset)
            sampled_neg.append(neg + offset)
            targets.append(self.box_coder.encode(gt[matches[pos]], anchors[pos]) if len(pos) else anchors.new_zeros(0, 4))
        pos, neg = torch.cat(sampled_pos), torch.cat(sampled_neg)
        sampled = torch.cat([pos, neg])
        labels = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).to(logits)
        objectness = F.binary_cross_entropy_with_logits(logits.reshape(-1)[sampled], labels)
        box = F.smooth_l1_loss(deltas.reshape(-1, 4)[pos], torch.cat(targets).to(deltas), beta=1 / 9, reduction="sum")
        return {"loss_objectness": objectness, "loss_rpn_box_reg": box / max(len(sampled), 1)}

    def forward(
        self, pyramid: Sequence[Tensor], image_size: tuple[int, int], image_sizes: Sequence[tuple[int, int]], gt_boxes: Sequence[Tensor] | None = None
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Pyramid of the (padded) batch -> per-image proposals (P_n, 4) and the losses (empty unless ``gt_boxes``)."""
        logits, deltas = self.head(pyramid)
        anchors = self.anchor_generator(image_size, [p.shape[-2:] for p in pyramid], pyramid[0].device)
        level_counts = [len(a) for a in anchors]
        anchors = torch.cat(anchors)
        logits = torch.cat([_flatten(x, 1) for x in logits], 1)[..., 0].float()  # (N, R); float32 also under autocast
        deltas = torch.cat([_flatten(x, 4) for x in deltas], 1).float()  # (N, R, 4)
        n = len(logits)
        boxes = self.box_coder.decode(deltas.detach().reshape(-1, 4), anchors.repeat(n, 1)).reshape(n, -1, 4)
        proposals = self.select_proposals(boxes, logits.detach(), level_counts, image_sizes)
        losses = {} if gt_boxes is None else self.loss(anchors, logits, deltas, gt_boxes)
        return proposals, losses
