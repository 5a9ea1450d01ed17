"""Mask R-CNN ops against their definitions: IoU, greedy NMS, RoIAlign, anchors, box coding, FPN levels, matching."""

from __future__ import annotations

import math

import pytest
import torch

from pixelwise.models.detection.anchors import AnchorGenerator, cell_anchors
from pixelwise.models.detection.ops import (
    BoxCoder,
    batched_nms,
    box_iou,
    fpn_levels,
    match_boxes,
    multiscale_roi_align,
    nms,
    paste_masks,
    roi_align,
)


def random_boxes(n: int, seed: int, size: float = 50.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 2 + 1
    return torch.cat([xy, xy + wh], 1)


def test_box_iou_hand_values() -> None:
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10], [2, 2, 2, 2]])
    # overlap 5x10 = 50, union 150; disjoint; identical; empty box
    assert torch.allclose(box_iou(a, b), torch.tensor([[1 / 3, 0.0, 1.0, 0.0]]))


def greedy_nms_reference(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    order = sorted(range(len(boxes)), key=lambda i: -float(scores[i]))
    kept: list[int] = []
    for i in order:
        if all(float(box_iou(boxes[i : i + 1], boxes[j : j + 1])) <= threshold for j in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_equals_greedy_definition(seed: int, threshold: float) -> None:
    boxes = random_boxes(60, seed)
    scores = torch.rand(60, generator=torch.Generator().manual_seed(100 + seed))
    assert nms(boxes, scores, threshold).tolist() == greedy_nms_reference(boxes, scores, threshold)


def test_nms_chain_keeps_the_third_box() -> None:
    # A suppresses B; B would suppress C but is gone, so C stays (greedy, not "any overlap").
    boxes = torch.tensor([[0.0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.3).tolist() == [0, 2]


def test_nms_empty_and_batched_groups() -> None:
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).tolist() == []
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [1, 0, 11, 10]])
    scores = torch.tensor([0.5, 0.9, 0.6])
    # same group: the best (1) suppresses the others; different groups never interact
    assert batched_nms(boxes, scores, torch.tensor([0, 0, 0]), 0.5).tolist() == [1]
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 2]), 0.5).tolist() == [1, 2, 0]


def bilinear_reference(feature: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """torchvision / Caffe2 RoIAlign bilinear sample of a (C, H, W) map, written scalar by scalar."""
    _, h, w = feature.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return torch.zeros(feature.shape[0], dtype=feature.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return (
        (1 - ly) * (1 - lx) * feature[:, y0, x0]
        + (1 - ly) * lx * feature[:, y0, x1]
        + ly * (1 - lx) * feature[:, y1, x0]
        + ly * lx * feature[:, y1, x1]
    )


def roi_align_reference(features: torch.Tensor, rois: torch.Tensor, size: int, scale: float, ratio: int) -> torch.Tensor:
    out = torch.zeros(len(rois), features.shape[1], size, size, dtype=features.dtype)
    for k, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        x1, y1, x2, y2 = x1 * scale, y1 * scale, x2 * scale, y2 * scale
        bw, bh = max(x2 - x1, 1.0) / size, max(y2 - y1, 1.0) / size
        for i in range(size):
            for j in range(size):
                samples = [
                    bilinear_reference(features[int(b)], y1 + i * bh + (iy + 0.5) * bh / ratio, x1 + j * bw + (ix + 0.5) * bw / ratio)
                    for iy in range(ratio)
                    for ix in range(ratio)
                ]
                out[k, :, i, j] = torch.stack(samples).mean(0)
    return out


def test_roi_align_matches_definition_including_border_and_outside_boxes() -> None:
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64)
    rois = torch.tensor(
        [
            [0, 2.0, 3.0, 30.0, 20.0],  # inside
            [1, -6.0, -5.0, 10.0, 8.0],  # over the top-left border
            [0, 30.0, 20.0, 50.0, 40.0],  # over the bottom-right border (map is 22 x 18 input px)
            [1, 7.0, 7.0, 7.5, 7.2],  # smaller than one feature pixel: size clamped to 1
            [0, 60.0, 60.0, 80.0, 90.0],  # entirely outside: zeros
        ],
        dtype=torch.float64,
    )
    got = roi_align(features, rois, 3, spatial_scale=0.5, sampling_ratio=2)
    expected = roi_align_reference(features, rois, 3, 0.5, 2)
    assert torch.allclose(got, expected, atol=1e-12)
    assert got[4].abs().max() == 0


def test_roi_align_of_a_linear_map_is_its_value_at_bin_centres() -> None:
    # f(y, x) = 2x + 3y + 1 is reproduced exactly by bilinear sampling, and the samples of a
    # bin are symmetric about its centre, so each output equals f at the bin centre.
    h, w = 16, 16
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    features = (2 * xx + 3 * yy + 1)[None, None]
    out = roi_align(features, torch.tensor([[0, 2.0, 4.0, 10.0, 12.0]], dtype=torch.float64), 4, 1.0, 2)[0, 0]
    centres = 2.0 + (torch.arange(4, dtype=torch.float64) + 0.5) * 2  # x1 + (j + 0.5) * bin (8 / 4)
    centres_y = 4.0 + (torch.arange(4, dtype=torch.float64) + 0.5) * 2
    assert torch.allclose(out, 2 * centres[None, :] + 3 * centres_y[:, None] + 1)


def test_roi_align_empty_rois() -> None:
    assert roi_align(torch.randn(1, 4, 8, 8), torch.zeros(0, 5), 7).shape == (0, 4, 7, 7)


def test_fpn_levels_follow_eq1() -> None:
    boxes = torch.tensor([[0.0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 448, 448], [0, 0, 10, 10], [0, 0, 2000, 2000], [0, 0, 223, 223]])
    # k = floor(4 + log2(sqrt(wh) / 224)) clamped to [2, 5]
    assert fpn_levels(boxes).tolist() == [4, 3, 5, 2, 5, 3]


def test_multiscale_roi_align_uses_each_box_level() -> None:
    pyramid = [torch.full((1, 1, 64 // 2**i, 64 // 2**i), float(i)) for i in range(4)]  # level value = index
    boxes = [torch.tensor([[0.0, 0, 10, 10], [0, 0, 112, 112], [0, 0, 224, 224], [0, 0, 500, 500]])]
    out = multiscale_roi_align(pyramid, boxes, 2)
    assert out[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_cell_anchors_hand_computed() -> None:
    # size 32: ratio 1 -> 32 x 32; ratio 0.5 -> w = 32 / sqrt(.5) = 45.25, h = 22.63; ratio 2 the transpose
    expected = torch.tensor([[-23.0, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]])
    assert torch.equal(cell_anchors(32, (0.5, 1.0, 2.0)), expected)


def test_anchor_grid_order_and_strides() -> None:
    gen = AnchorGenerator(sizes=(8, 16), aspect_ratios=(1.0,))
    level0, level1 = gen((8, 12), [(2, 3), (1, 2)])
    # level 0 stride 4: locations (x, y) = (0,0), (4,0), (8,0), (0,4), (4,4), (8,4), row by row
    centres = [(x, y) for y in (0, 4) for x in (0, 4, 8)]
    assert torch.equal(level0, torch.tensor([[x - 4.0, y - 4, x + 4, y + 4] for x, y in centres]))
    # level 1 stride (8, 6): two anchors of size 16 at x = 0 and 6
    assert torch.equal(level1, torch.tensor([[-8.0, -8, 8, 8], [-2, -8, 14, 8]]))


def test_anchors_default_levels_counts() -> None:
    gen = AnchorGenerator()
    sizes = [(64 // s, 96 // s) for s in (4, 8, 16, 32, 64)]
    counts = [len(a) for a in gen((64, 96), sizes)]
    assert counts == [h * w * 3 for h, w in sizes]


def test_box_coder_hand_value_and_round_trip() -> None:
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    ref = torch.tensor([[0.0, 0, 10, 20]])  # centre (5, 10), size (10, 20)
    target = torch.tensor([[2.0, 4, 22, 24]])  # centre (12, 14), size (20, 20)
    expected = torch.tensor([[10 * 7 / 10, 10 * 4 / 20, 5 * math.log(2.0), 5 * math.log(1.0)]])
    assert torch.allclose(coder.encode(target, ref), expected)
    boxes = random_boxes(20, 3)
    refs = random_boxes(20, 4)
    assert torch.allclose(coder.decode(coder.encode(boxes, refs), refs)[:, 0], boxes, atol=1e-4)


def test_match_boxes_thresholds_and_low_quality() -> None:
    iou = torch.tensor([[0.8, 0.5, 0.1, 0.25], [0.1, 0.2, 0.35, 0.0]])
    # column 0: 0.8 -> gt 0; column 1: 0.5 in [0.3, 0.7) ignored; column 2: 0.35 ignored;
    # column 3: 0.25 < 0.3 background.
    assert match_boxes(iou, 0.7, 0.3, allow_low_quality=False).tolist() == [0, -2, -2, -1]
    # gt 1's best candidate (column 2) becomes its match
    assert match_boxes(iou, 0.7, 0.3, allow_low_quality=True).tolist() == [0, -2, 1, -1]
    assert match_boxes(torch.zeros(0, 3), 0.7, 0.3, True).tolist() == [-1, -1, -1]


def test_paste_masks_fills_the_box_only() -> None:
    masks = torch.ones(1, 28, 28)
    out = paste_masks(masks, torch.tensor([[10.0, 20.0, 30.0, 40.0]]), (50, 60))[0]
    assert out.shape == (50, 60)
    inside = out[21:39, 11:29]  # pixels whose centres are at least one mask cell inside the box
    assert torch.allclose(inside, torch.ones_like(inside))
    outside = torch.ones_like(out, dtype=torch.bool)
    outside[20:40, 10:30] = False
    assert out[outside].abs().max() == 0
