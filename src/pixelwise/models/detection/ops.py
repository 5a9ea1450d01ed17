"""Box operations for Mask R-CNN in plain, vectorised PyTorch: IoU, NMS, RoIAlign, box coding.

Boxes are ``(x1, y1, x2, y2)`` in pixels of the input image, float, with ``x2 >= x1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def box_area(boxes: Tensor) -> Tensor:
    """(N, 4) -> (N,) areas."""
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over union of every pair: (N, 4), (M, 4) -> (N, M); 0 where the union is empty."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes, by decreasing score.

    Greedy NMS keeps box i (in score order) iff no kept box before it overlaps it by more than
    ``iou_threshold``. That rule fixes ``keep[i]`` from ``keep[:i]``, so it has exactly one
    fixed point; iterating ``keep <- not any(keep[j] and iou[j, i] > t for j < i)`` from
    "keep all" makes one more prefix entry final per pass and stops at that fixed point. Each
    pass is one (N, N) boolean reduction, so there is no per-box Python loop.

    Args:
        boxes: (N, 4).
        scores: (N,).
        iou_threshold: boxes overlapping a kept, higher-scoring box by more than this go.

    Returns:
        (K,) int64 indices into ``boxes``.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = scores.argsort(descending=True, stable=True)
    b = boxes[order].float()
    suppresses = (box_iou(b, b) > iou_threshold).triu(1)  # [j, i]: j (earlier) suppresses i
    keep = torch.ones(len(b), dtype=torch.bool, device=b.device)
    while True:
        new = ~(suppresses & keep[:, None]).any(0)
        if torch.equal(new, keep):
            break
        keep = new
    return order[keep]


def batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each group (class or pyramid level) independently; indices by decreasing score.

    Boxes of different groups are moved apart by an offset larger than any box, so they never
    overlap, and one :func:`nms` call handles all groups.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    offset = groups.to(boxes) * (boxes.max() - boxes.min() + 1)
    return nms(boxes + offset[:, None], scores, iou_threshold)


def clip_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clip (..., 4) boxes to an image of ``size`` (H, W)."""
    h, w = size
    x = boxes[..., 0::2].clamp(0, w)
    y = boxes[..., 1::2].clamp(0, h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], -1)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of boxes whose width and height are both at least ``min_size``."""
    wh = boxes[:, 2:] - boxes[:, :2]
    return torch.where((wh >= min_size).all(1))[0]


class BoxCoder:
    """Faster R-CNN box parametrisation (Ren et al. 2015, Eq. 2) with per-coordinate weights.

    ``encode`` gives ``(wx (gx - px) / pw, wy (gy - py) / ph, ww log(gw / pw), wh log(gh / ph))``
    for centres (x, y) and sizes (w, h) of reference boxes p and targets g; ``decode`` inverts
    it, clamping the log-size deltas at log(1000 / 16) as torchvision and Detectron do.
    """

    def __init__(self, weights: Sequence[float], clip: float = math.log(1000.0 / 16)) -> None:
        self.weights = tuple(float(w) for w in weights)
        self.clip = clip

    @staticmethod
    def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        w = boxes[:, 2] - boxes[:, 0]
        h = boxes[:, 3] - boxes[:, 1]
        return boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h, w, h

    def encode(self, targets: Tensor, references: Tensor) -> Tensor:
        """(N, 4) targets relative to (N, 4) references -> (N, 4) deltas."""
        wx, wy, ww, wh = self.weights
        px, py, pw, ph = self._centre_size(references)
        gx, gy, gw, gh = self._centre_size(targets)
        return torch.stack(
            [wx * (gx - px) / pw, wy * (gy - py) / ph, ww * torch.log(gw / pw), wh * torch.log(gh / ph)], 1
        )

    def decode(self, deltas: Tensor, references: Tensor) -> Tensor:
        """(N, 4k) deltas applied to (N, 4) references -> (N, k, 4) boxes."""
        wx, wy, ww, wh = self.weights
        px, py, pw, ph = (t[:, None] for t in self._centre_size(references.to(deltas.dtype)))
        d = deltas.reshape(len(deltas), -1, 4)
        cx = d[..., 0] / wx * pw + px
        cy = d[..., 1] / wy * ph + py
        w = torch.exp((d[..., 2] / ww).clamp(max=self.clip)) * pw
        h = torch.exp((d[..., 3] / wh).clamp(max=self.clip)) * ph
        return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def roi_align(
    features: Tensor, rois: Tensor, output_size: int, spatial_scale: float = 1.0, sampling_ratio: int = 2
) -> Tensor:
    """RoIAlign (He et al. 2017, Sec. 3): bilinear samples on a regular grid in each bin, averaged.

    Follows torchvision's ``roi_align(aligned=False)`` as used by its Mask R-CNN: a RoI
    ``(x1, y1, x2, y2)`` is scaled by ``spatial_scale``, its size clamped to at least 1, and
    cut into ``output_size`` x ``output_size`` bins; each bin has ``sampling_ratio`` x
    ``sampling_ratio`` sample points at the centres of its sub-cells. A sample more than one
    pixel outside the map contributes 0; otherwise its coordinates are clamped to the map and
    the value interpolated bilinearly (pixel i sits at coordinate i).

    Args:
        features: (N, C, H, W).
        rois: (K, 5) rows ``(batch_index, x1, y1, x2, y2)`` in input-image pixels.
        output_size: bins per side.
        spatial_scale: feature-map pixels per input pixel (1 / stride).
        sampling_ratio: sample points per bin side (fixed, > 0).

    Returns:
        (K, C, output_size, output_size).
    """
    if features.dtype in (torch.float16, torch.bfloat16):  # sample positions need float32 precision
        features = features.float()
    n, c, h, w = features.shape
    k, p, s = len(rois), output_size, sampling_ratio
    if k == 0:
        return features.new_zeros(0, c, p, p)
    boxes = rois[:, 1:].to(features.dtype) * spatial_scale
    start = boxes[:, :2]  # (K, 2) as (x, y)
    size = (boxes[:, 2:] - start).clamp(min=1.0)
    steps = (torch.arange(p * s, device=features.device, dtype=features.dtype) + 0.5) / s  # in bins
    coords = start[:, None, :] + steps[None, :, None] * (size / p)[:, None, :]  # (K, P*S, 2)
    xs, ys = coords[..., 0], coords[..., 1]  # (K, P*S) each

    def axis(v: Tensor, length: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        valid = (v >= -1.0) & (v <= length)
        v = v.clamp(min=0)
        low = v.floor().long().clamp(max=length - 1)
        high = (low + 1).clamp(max=length - 1)
        frac = torch.where(low >= length - 1, torch.zeros_like(v), v - low)
        return low, high, frac, valid

    x0, x1, fx, vx = axis(xs, w)
    y0, y1, fy, vy = axis(ys, h)
    flat = features.permute(0, 2, 3, 1).reshape(n * h * w, c)
    base = rois[:, 0].long()[:, None, None] * (h * w)  # (K, 1, 1)
    out = features.new_zeros(k, p * s, p * s, c)
    for yi, wy in ((y0, 1 - fy), (y1, fy)):
        for xi, wx in ((x0, 1 - fx), (x1, fx)):
            idx = base + yi[:, :, None] * w + xi[:, None, :]  # (K, Sy, Sx)
            weight = (wy[:, :, None] * wx[:, None, :] * (vy[:, :, None] & vx[:, None, :])).unsqueeze(-1)
            out = out + flat[idx.reshape(-1)].reshape(k, p * s, p * s, c) * weight
    out = out.reshape(k, p, s, p, s, c).mean(dim=(2, 4))
    return out.permute(0, 3, 1, 2).contiguous()


def fpn_levels(boxes: Tensor, k_min: int = 2, k_max: int = 5, canonical_size: float = 224.0, canonical_level: int = 4) -> Tensor:
    """FPN level of each RoI (Lin et al. 2017, Eq. 1): ``floor(4 + log2(sqrt(wh) / 224))`` clamped to [k_min, k_max]."""
    scale = box_area(boxes).sqrt()
    level = torch.floor(canonical_level + torch.log2(scale / canonical_size + 1e-8) + 1e-6)
    return level.clamp(k_min, k_max).long()


def multiscale_roi_align(
    pyramid: Sequence[Tensor], boxes: Sequence[Tensor], output_size: int, sampling_ratio: int = 2, first_level: int = 2
) -> Tensor:
    """RoIAlign of each box on its FPN level (:func:`fpn_levels`); level ``first_level + i`` has stride ``2 ** (first_level + i)``.

    Args:
        pyramid: [P2, P3, ...], each (N, C, h_i, w_i).
        boxes: per image, (K_n, 4) in input pixels.
        output_size: bins per side (7 for boxes, 14 for masks).
        sampling_ratio: sample points per bin side.

    Returns:
        (sum K_n, C, output_size, output_size), in the order of the concatenated boxes.
    """
    rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
    levels = fpn_levels(rois[:, 1:], first_level, first_level + len(pyramid) - 1) - first_level
    out = pyramid[0].new_zeros(len(rois), pyramid[0].shape[1], output_size, output_size, dtype=torch.float32)
    for i, feature in enumerate(pyramid):  # one call per level, not per box
        chosen = torch.where(levels == i)[0]
        if len(chosen):
            out[chosen] = roi_align(feature, rois[chosen], output_size, 2.0 ** -(first_level + i), sampling_ratio)
    return out


def paste_masks(masks: Tensor, boxes: Tensor, size: tuple[int, int], chunk: int = 32) -> Tensor:
    """Paste (D, M, M) box-relative mask probabilities into (D, H, W) full-image maps.

    Mask cell (i, j) covers the box's i-th row and j-th column of cells; pixel centres are
    sampled bilinearly (``grid_sample``), zero outside the box. Chunks of ``chunk`` masks
    bound the memory at ``chunk * H * W`` floats.
    """
    h, w = size
    out = masks.new_zeros(len(masks), h, w)
    ys = (torch.arange(h, device=masks.device, dtype=masks.dtype) + 0.5)
    xs = (torch.arange(w, device=masks.device, dtype=masks.dtype) + 0.5)
    for start in range(0, len(masks), chunk):
        m, b = masks[start : start + chunk], boxes[start : start + chunk].to(masks.dtype)
        bw = (b[:, 2] - b[:, 0]).clamp(min=1e-3)
        bh = (b[:, 3] - b[:, 1]).clamp(min=1e-3)
        gx = (xs[None, :] - b[:, 0:1]) / bw[:, None] * 2 - 1  # (d, W)
        gy = (ys[None, :] - b[:, 1:2]) / bh[:, None] * 2 - 1  # (d, H)
        grid = torch.stack([gx[:, None, :].expand(-1, h, -1), gy[:, :, None].expand(-1, -1, w)], -1)
        out[start : start + chunk] = F.grid_sample(m[:, None], grid, align_corners=False)[:, 0]
    return out


def match_boxes(iou: Tensor, high: float, low: float, allow_low_quality: bool) -> Tensor:
    """Assign each candidate (anchor or proposal) to a ground-truth box.

    Args:
        iou: (G, N) IoU of G ground-truth boxes with N candidates.
        high: IoU at or above which a candidate is foreground.
        low: IoU below which it is background; in between it is ignored.
        allow_low_quality: also make foreground, for each ground-truth box, the candidates
            with its highest IoU (ties included), as the RPN does (Ren et al. 2015, Sec. 3.1.2).

    Returns:
        (N,) int64: index of the matched box, -1 for background, -2 for ignored.
    """
    n = iou.shape[1]
    if iou.shape[0] == 0:
        return torch.full((n,), -1, dtype=torch.int64, device=iou.device)
    best, matched = iou.max(0)
    result = matched.clone()
    result[best < low] = -1
    result[(best >= low) & (best < high)] = -2
    if allow_low_quality:
        best_per_gt = iou.max(1, keepdim=True).values
        _, candidates = torch.where((iou == best_per_gt) & (best_per_gt > 0))
        result[candidates] = matched[candidates]
    return result


def sample_labels(matches: Tensor, batch_size: int, positive_fraction: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Random balanced sample of candidates: at most ``batch_size * positive_fraction`` positives, negatives fill up.

    Returns:
        (positive indices, negative indices).
    """
    pos = torch.where(matches >= 0)[0]
    neg = torch.where(matches == -1)[0]
    num_pos = min(len(pos), int(batch_size * positive_fraction))
    num_neg = min(len(neg), batch_size - num_pos)
    pos = pos[torch.randperm(len(pos), generator=generator, device="cpu")[:num_pos].to(pos.device)]
    neg = neg[torch.randperm(len(neg), generator=generator, device="cpu")[:num_neg].to(neg.device)]
    return pos, neg
