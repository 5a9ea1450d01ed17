"""Metrics: confusion matrix against a direct loop, hand-computed cases, boundaries, boundary F-score."""

from __future__ import annotations

import datetime
import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pixelwise.metrics import (
    BoundaryFScore,
    ConfusionMatrix,
    confusion_matrix,
    label_boundaries,
    metrics_from_confusion,
)

# ----------------------------------------------------------------------------- confusion matrix


def _loop_confusion(pred: np.ndarray, target: np.ndarray, k: int, ignore: int) -> np.ndarray:
    cm = np.zeros((k, k), np.int64)
    for p, t in zip(pred.ravel(), target.ravel()):
        if t != ignore:
            cm[t, p] += 1
    return cm


def _loop_metrics(cm: np.ndarray) -> dict[str, float]:
    """Per-class loops over the matrix, written independently of the vectorised code."""
    k = cm.shape[0]
    total = cm.sum()
    ious, accs, dices, fw = [], [], [], 0.0
    for c in range(k):
        tp = cm[c, c]
        fn = sum(cm[c, j] for j in range(k) if j != c)
        fp = sum(cm[i, c] for i in range(k) if i != c)
        if tp + fn + fp > 0:
            ious.append(tp / (tp + fn + fp))
            dices.append(2 * tp / (2 * tp + fn + fp))
            fw += (tp + fn) / total * ious[-1]
        if tp + fn > 0:
            accs.append(tp / (tp + fn))
    return {
        "pixel_accuracy": np.trace(cm) / total,
        "class_accuracy": float(np.mean(accs)),
        "mean_iou": float(np.mean(ious)),
        "fw_iou": fw,
        "mean_dice": float(np.mean(dices)),
    }


def test_confusion_matrix_matches_a_direct_loop_on_random_data() -> None:
    g = torch.Generator().manual_seed(0)
    k, ignore = 5, 255
    target = torch.randint(0, k, (3, 11, 13), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = ignore
    pred = torch.randint(0, k, (3, 11, 13), generator=g)
    cm = confusion_matrix(pred, target, k, ignore)
    expected = _loop_confusion(pred.numpy(), target.numpy(), k, ignore)
    assert cm.dtype == torch.int64 and cm.shape == (k, k)
    np.testing.assert_array_equal(cm.numpy(), expected)
    assert cm.sum() == (target != ignore).sum()

    got = metrics_from_confusion(cm)
    for key, value in _loop_metrics(expected).items():
        assert got[key] == pytest.approx(value, rel=1e-12), key


def test_tiny_case_by_hand() -> None:
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    cm = confusion_matrix(pred, target, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    m = metrics_from_confusion(cm, ["a", "b", "c"])
    # TP = (1, 2, 0), true = (2, 2, 1), predicted = (2, 3, 0), 5 valid pixels.
    assert m["pixel_accuracy"] == pytest.approx(3 / 5)
    assert m["class_accuracy"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert [c["iou"] for c in m["per_class"]] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert m["mean_iou"] == pytest.approx(1 / 3)
    assert m["fw_iou"] == pytest.approx((2 * 1 / 3 + 2 * 2 / 3 + 1 * 0) / 5)
    assert [c["dice"] for c in m["per_class"]] == pytest.approx([2 / 4, 4 / 5, 0.0])
    assert m["mean_dice"] == pytest.approx((0.5 + 0.8) / 3)
    assert [(c["name"], c["pixels"]) for c in m["per_class"]] == [("a", 2), ("b", 2), ("c", 1)]
    assert json.loads(json.dumps(m)) == m


def test_ignore_index_pixels_are_skipped_whatever_their_prediction() -> None:
    target = torch.tensor([[11, 0], [1, 11]])
    pred = torch.tensor([[1, 0], [1, 0]])
    cm = confusion_matrix(pred, target, num_classes=2, ignore_index=11)
    assert cm.tolist() == [[1, 0], [0, 1]]
    # ignore_index may be negative (torch's -100) or a class id below K (then that class is never counted).
    assert confusion_matrix(torch.tensor([1, 1]), torch.tensor([-100, 1]), 2, ignore_index=-100).tolist() == [[0, 0], [0, 1]]
    assert confusion_matrix(torch.tensor([1, 1, 0]), torch.tensor([0, 1, 1]), 2, ignore_index=0).tolist() == [[0, 0], [1, 1]]


def test_absent_classes_are_nan_and_left_out_of_means() -> None:
    # Class 2 appears nowhere; class 1 is predicted but never true.
    target = torch.tensor([0, 0, 0, 3])
    pred = torch.tensor([0, 1, 0, 3])
    m = metrics_from_confusion(confusion_matrix(pred, target, 4))
    per = m["per_class"]
    assert math.isnan(per[2]["iou"]) and math.isnan(per[2]["dice"]) and math.isnan(per[2]["accuracy"])
    assert per[1]["iou"] == 0.0 and per[1]["dice"] == 0.0
    assert math.isnan(per[1]["accuracy"])  # recall of a class absent from the target is undefined
    assert m["mean_iou"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert m["class_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    empty = metrics_from_confusion(torch.zeros(3, 3, dtype=torch.int64))
    assert all(math.isnan(empty[key]) for key in ("pixel_accuracy", "class_accuracy", "mean_iou", "fw_iou", "mean_dice"))


def test_errors_name_the_bad_value_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"target holds class id 7.*ignore_index=255.*fix"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([7, 1]), 3)
    with pytest.raises(ValueError, match=r"target holds class id -1"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([-1, 1]), 3)
    # Target = K with prediction 0 gives the same flat index as the ignored bin: still caught.
    with pytest.raises(ValueError, match=r"target holds class id 3"):
        confusion_matrix(torch.tensor([0, 0, 1]), torch.tensor([3, 255, 1]), 3)
    with pytest.raises(ValueError, match=r"target holds class id 12"):
        confusion_matrix(torch.tensor([0, 0, 1]), torch.tensor([12, 255, 1]), 3)
    with pytest.raises(ValueError, match=r"pred holds class id 3.*num_classes=3"):
        confusion_matrix(torch.tensor([3, 1]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="argmax"):
        confusion_matrix(torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix(torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="2 names but the matrix has 3"):
        metrics_from_confusion(torch.eye(3, dtype=torch.int64), ["a", "b"])


def test_accumulator_sums_batches_takes_logits_and_resets() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3, 6, 7, generator=g)
    target = torch.randint(0, 3, (4, 6, 7), generator=g)
    target[:, 0] = 255
    acc = ConfusionMatrix(num_classes=3)
    acc.update(logits[:2], target[:2])
    acc.update(logits[2:].argmax(1), target[2:])
    whole = confusion_matrix(logits.argmax(1), target, 3)
    assert torch.equal(acc.matrix, whole)
    acc.all_reduce()  # no process group: no-op
    assert torch.equal(acc.matrix, whole)
    assert acc.compute(["x", "y", "z"]) == metrics_from_confusion(whole, ["x", "y", "z"])
    with pytest.raises(ValueError, match="5 channels but num_classes=3"):
        acc.update(torch.randn(1, 5, 6, 7), target[:1])
    acc.reset()
    assert acc.matrix.sum() == 0 and acc.matrix.shape == (3, 3)


def _reduce_worker(rank: int, init_file: str, result_file: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    acc = ConfusionMatrix(num_classes=2)
    # rank 0 sees one correct pixel of class 0, rank 1 two pixels of class 1 predicted as 0.
    if rank == 0:
        acc.update(torch.tensor([[0]]), torch.tensor([[0]]))
    else:
        acc.update(torch.tensor([[0, 0]]), torch.tensor([[1, 1]]))
    acc.all_reduce()
    if rank == 1:
        torch.save(acc.matrix, result_file)
    dist.destroy_process_group()


def test_all_reduce_sums_over_processes(tmp_path) -> None:
    result = tmp_path / "matrix.pt"
    # fork: the children share the parent's imported torch (spawn would re-import it, ~10 s).
    mp.start_processes(_reduce_worker, args=(str(tmp_path / "init"), str(result)), nprocs=2, start_method="fork")
    assert torch.load(result, weights_only=True).tolist() == [[1, 0], [2, 0]]


# ----------------------------------------------------------------------------- boundaries


def test_label_boundaries_on_a_hand_drawn_map() -> None:
    labels = torch.tensor(
        [
            [0, 0, 1, 1],
            [0, 0, 1, 1],
            [2, 2, 2, 255],
        ]
    )
    expected = torch.tensor(
        [
            [0, 1, 1, 0],
            [1, 1, 1, 0],  # (1, 3) touches only ignore below: no boundary
            [1, 1, 1, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(label_boundaries(labels), expected)
    batch = torch.stack([labels, labels.flip(-1)])
    assert torch.equal(label_boundaries(batch), torch.stack([expected, expected.flip(-1)]))


def test_label_boundaries_match_a_pixel_loop_on_random_maps() -> None:
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 3, (2, 9, 10), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.15] = 7
    got = label_boundaries(labels, ignore_index=7)
    lab = labels.numpy()
    n, h, w = lab.shape
    expected = np.zeros_like(lab, dtype=bool)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                if lab[b, i, j] == 7:
                    continue
                for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                    y, x = i + di, j + dj
                    if 0 <= y < h and 0 <= x < w and lab[b, y, x] != 7 and lab[b, y, x] != lab[b, i, j]:
                        expected[b, i, j] = True
    np.testing.assert_array_equal(got.numpy(), expected)


# ----------------------------------------------------------------------------- boundary F-score


def _vertical_line(h: int, w: int, col: int) -> torch.Tensor:
    edge = torch.zeros(1, h, w, dtype=torch.bool)
    edge[0, :, col] = True
    return edge


def test_perfect_prediction_scores_one() -> None:
    labels = torch.zeros(2, 20, 24, dtype=torch.int64)
    labels[0, 5:15, 6:18] = 1
    labels[1, :, 12:] = 2
    edges = label_boundaries(labels)
    score = BoundaryFScore()
    score.update(edges.float(), edges)
    out = score.compute()
    assert out["ods_f"] == pytest.approx(1.0)
    assert out["ois_f"] == pytest.approx(1.0)
    assert out["ap"] == 0.0  # one recall value only: no curve (as in BSDS)


def test_one_pixel_shift_is_forgiven_by_tolerance_two_but_not_zero() -> None:
    true = _vertical_line(16, 16, 7)
    shifted = _vertical_line(16, 16, 8).float()
    for tolerance, expected in ((2, 1.0), (1, 1.0), (0, 0.0)):
        score = BoundaryFScore(thresholds=9, tolerance=tolerance)
        score.update(shifted, true)
        out = score.compute()
        assert out["ods_f"] == pytest.approx(expected), tolerance
        assert out["ois_f"] == pytest.approx(expected), tolerance
    # A 2-pixel diagonal offset (distance sqrt(2)) is within 1.5 px but not within 1 px.
    true = torch.zeros(1, 12, 12, dtype=torch.bool)
    true[0, 4, 4] = True
    pred = torch.zeros(1, 12, 12)
    pred[0, 5, 5] = 1.0
    for tolerance, expected in ((1.5, 1.0), (1.0, 0.0)):
        score = BoundaryFScore(thresholds=[0.5], tolerance=tolerance)
        score.update(pred, true)
        assert score.compute()["ods_f"] == pytest.approx(expected)


def test_ods_ois_and_ap_by_hand() -> None:
    # Image A: true edge = 10 px in column 2; rows 0-4 predicted at 0.6, and 5 false pixels
    # at 0.3 in column 12 (far away). Image B: true edge fully predicted at 0.9, and 10
    # false pixels at 0.6. Thresholds 0.2 / 0.5 / 0.8, tolerance 1 px: in A the true pixel
    # of row 5 is recalled by the prediction in row 4.
    a_true, b_true = _vertical_line(10, 16, 2), _vertical_line(10, 16, 2)
    a = torch.zeros(1, 10, 16)
    a[0, :5, 2] = 0.6
    a[0, :5, 12] = 0.3
    b = torch.zeros(1, 10, 16)
    b[0, :, 2] = 0.9
    b[0, :, 12] = 0.6
    score = BoundaryFScore(thresholds=[0.8, 0.2, 0.5], tolerance=1)
    score.update(torch.cat([a, b]), torch.cat([a_true, b_true]))
    out = score.compute()
    # Counts (matched true, true, matched pred, pred) of A + B:
    #   0.2: (6 + 10) / 20, (5 + 10) / (10 + 20) -> R .8, P .5 -> F 8/13
    #   0.5: (6 + 10) / 20, (5 + 10) / (5 + 20)  -> R .8, P .6 -> F 24/35
    #   0.8: (0 + 10) / 20, (0 + 10) / (0 + 10)  -> R .5, P 1  -> F 2/3
    assert out["ods_f"] == pytest.approx(24 / 35)
    assert out["ods_threshold"] == pytest.approx(0.5)
    # OIS: A is best at 0.5 (R .6, P 1), B at 0.8 (R 1, P 1); summed: R .8, P 1.
    assert out["ois_f"] == pytest.approx(2 * 0.8 / 1.8)
    # AP: (R .5, P 1) and (R .8, P .6) joined linearly, sampled at recall .50, .51, .., .80.
    assert out["ap"] == pytest.approx(sum(1 - 0.4 / 0.3 * (j / 100 - 0.5) for j in range(50, 81)) / 100)
    score.reset()
    with pytest.raises(ValueError, match="call update"):
        score.compute()


def test_boundary_score_input_checks() -> None:
    score = BoundaryFScore()
    with pytest.raises(ValueError, match="sigmoid"):
        score.update(torch.full((1, 4, 4), 2.0), torch.zeros(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="same shape"):
        score.update(torch.zeros(1, 4, 4), torch.zeros(1, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="tolerance"):
        BoundaryFScore(tolerance=-1)
    # (N, 1, H, W) maps (HED's output after sigmoid) are accepted.
    edges = _vertical_line(8, 8, 3).unsqueeze(1)
    score.update(edges.float(), edges)
    assert score.compute()["ods_f"] == pytest.approx(1.0)


def _pair_rand_error(truth: np.ndarray, found: np.ndarray) -> float:
    """1 - F-score of pixel pairs kept together, from the definition (pixels with truth 0 left out)."""
    from itertools import combinations

    keep = [(t, f) for t, f in zip(truth.ravel(), found.ravel()) if t != 0]
    pairs = list(combinations(keep, 2))
    together_true = sum(a[0] == b[0] for a, b in pairs)
    together_found = sum(a[1] == b[1] for a, b in pairs)
    together_both = sum(a[0] == b[0] and a[1] == b[1] for a, b in pairs)
    p, r = together_both / together_true, together_both / together_found
    return 1 - 2 * p * r / (p + r)


def test_segment_score_two_touching_cells_merged() -> None:
    from pixelwise.metrics import SegmentScore, cell_segments

    truth = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 0, 1, 1]])  # two 4-pixel cells split by a membrane
    pred = torch.ones_like(truth)  # the membrane is missed: one 10-pixel cell
    score = SegmentScore(cell_class=1)
    score.update(pred, truth)
    m = score.compute()
    # 8 scored pixels: 12 pairs together in truth, 28 together in the prediction, 12 in both:
    # F = 2 * 1 * (12/28) / (1 + 12/28) = 0.6.
    assert m["rand_error"] == pytest.approx(0.4)
    assert m["rand_error"] == pytest.approx(_pair_rand_error(cell_segments(truth.numpy(), 1), cell_segments(pred.numpy(), 1)))
    assert m["vi_split"] == pytest.approx(0.0) and m["vi_merge"] == pytest.approx(1.0)  # one bit: which half
    assert m["pixel_error"] == pytest.approx(2 / 10)


def test_segment_score_one_cell_split_and_mean_over_images() -> None:
    from pixelwise.metrics import SegmentScore

    truth = torch.ones(2, 5, dtype=torch.long)  # one 10-pixel cell
    pred = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 0, 1, 1]])  # a false membrane splits it into 4 + 4 (+ 2 membrane)
    score = SegmentScore(cell_class=1)
    score.update(pred, truth)
    # 45 pairs together in truth; 6 + 6 + 1 together in the prediction, all of them in truth too:
    # F = 2 * (13/45) / (1 + 13/45) = 13/29.
    split = -(2 * 0.4 * math.log2(0.4) + 0.2 * math.log2(0.2))
    assert score.compute()["rand_error"] == pytest.approx(16 / 29)
    assert score.compute()["vi_split"] == pytest.approx(split) and score.compute()["vi_merge"] == pytest.approx(0.0)
    score.update(truth, truth)  # a perfect second image halves every mean
    m = score.compute()
    assert m["rand_error"] == pytest.approx(8 / 29)
    assert m["variation_of_information"] == pytest.approx(split / 2)
    assert m["pixel_error"] == pytest.approx(2 / 20)


def test_segment_measures_reach_the_semantic_evaluation() -> None:
    from pixelwise.tasks import get_task

    class Cells(torch.utils.data.Dataset):
        num_classes, ignore_index, class_names, cell_class = 2, 255, ["membrane", "cell"], 1

        def __len__(self) -> int:
            return 1

        def __getitem__(self, i):
            labels = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 0, 1, 1]])
            return labels[None].float(), labels

    class AllCell(torch.nn.Module):  # logits that call every pixel a cell
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.zeros_like(x[:, 0]), torch.ones_like(x[:, 0])], 1)

    metrics = get_task("semantic").evaluate(AllCell(), Cells()).metrics
    assert metrics["rand_error"] == pytest.approx(0.4) and metrics["pixel_error"] == pytest.approx(0.2)
    assert metrics["pixel_accuracy"] == pytest.approx(0.8)
