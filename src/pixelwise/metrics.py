"""Segmentation metrics from one confusion matrix, and a boundary F-score for edge maps.

Every region metric (pixel accuracy, class accuracy, IoU, mIoU, frequency-weighted IoU,
Dice) is a function of the (K, K) confusion matrix, so evaluation accumulates that matrix
over a data set (and across processes) and derives everything at the end.

Example:
    >>> cm = ConfusionMatrix(num_classes=11, ignore_index=11)
    >>> for images, labels in loader:
    ...     cm.update(model(images), labels)
    >>> cm.all_reduce()
    >>> cm.compute(class_names)["mean_iou"]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Count (true class, predicted class) pairs over all pixels.

    Args:
        pred: predicted class ids in [0, K), integer tensor of any shape, e.g. (N, H, W).
        target: true class ids, same shape as ``pred``.
        num_classes: number of classes K.
        ignore_index: target value of pixels that are skipped.

    Returns:
        (K, K) int64 tensor on ``target``'s device; rows are the true class, columns the
        predicted class.
    """
    _check_num_classes(num_classes)
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}; "
            "pass logits (N, K, H, W) to ConfusionMatrix.update or take pred = logits.argmax(1)"
        )
    for name, t in (("pred", pred), ("target", target)):
        if t.is_floating_point() or t.is_complex():
            raise ValueError(f"{name} must hold integer class ids, got dtype {t.dtype}; use .argmax(1) on logits or .long()")
    k = num_classes
    target = target.long()
    pred = pred.to(device=target.device, dtype=torch.long)
    if pred.numel():
        low, high = torch.aminmax(pred)
        if low < 0 or high >= k:
            value = int(low if low < 0 else high)
            raise ValueError(
                f"pred holds class id {value}, outside [0, {k}); predictions must be class ids below num_classes={k}"
            )
    valid = target != ignore_index
    # Ignored pixels go to one extra bin (K*K) that is dropped: no boolean gather needed.
    index = target * k
    index += pred
    index.masked_fill_(~valid, k * k)
    if index.numel():
        low, high = torch.aminmax(index)
        # With pred in range, index lies in [0, K*K) exactly when the target does; a target
        # of K with pred 0 lands in the extra bin, so that bin must hold only ignored pixels.
        if low >= 0 and high <= k * k:
            counts = torch.bincount(index.flatten(), minlength=k * k + 1)
            if counts[k * k] == index.numel() - valid.sum():
                return counts[: k * k].reshape(k, k)
        bad = valid & ((target < 0) | (target >= k))
        value = int(target[bad].flatten()[0])
        raise ValueError(
            f"target holds class id {value}, outside [0, {k}) and not ignore_index={ignore_index}; "
            "fix num_classes, ignore_index or the label map"
        )
    return torch.zeros(k, k, dtype=torch.int64, device=target.device)


class ConfusionMatrix:
    """Accumulates a confusion matrix over batches (and processes) and computes metrics.

    Args:
        num_classes: number of classes K.
        ignore_index: target value skipped everywhere.

    Attributes:
        matrix: (K, K) int64 counts, rows = true class, columns = predicted class. It lives
            on the device of the last ``update``.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        _check_num_classes(num_classes)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred_or_logits: Tensor, target: Tensor) -> None:
        """Add one batch.

        Args:
            pred_or_logits: class ids (N, H, W) or logits / probabilities (N, K, H, W)
                (reduced with argmax over K).
            target: true class ids (N, H, W).
        """
        pred = pred_or_logits
        if pred.dim() == target.dim() + 1:
            if pred.shape[1] != self.num_classes:
                raise ValueError(
                    f"logits have {pred.shape[1]} channels but num_classes={self.num_classes}; "
                    "pass logits of shape (N, K, H, W) with K = num_classes"
                )
            pred = pred.argmax(1)
        cm = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.matrix = self.matrix.to(cm.device) + cm

    def all_reduce(self) -> None:
        """Sum ``matrix`` over all processes when torch.distributed is initialised; no-op otherwise.

        Call it once, after the last ``update`` and before ``compute``, on every process.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        matrix = self.matrix
        if dist.get_backend() == "nccl" and matrix.device.type != "cuda":
            matrix = matrix.cuda()
        dist.all_reduce(matrix, op=dist.ReduceOp.SUM)
        self.matrix = matrix.to(self.matrix.device)

    def compute(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Metrics of the accumulated matrix; see :func:`metrics_from_confusion`."""
        return metrics_from_confusion(self.matrix, class_names)

    def reset(self) -> None:
        """Set all counts to zero."""
        self.matrix = torch.zeros_like(self.matrix)


def _nanmean(values: np.ndarray) -> float:
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else math.nan


def metrics_from_confusion(cm: Tensor | np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Region metrics of a (K, K) confusion matrix (rows = true class, columns = predicted).

    Per class c, with TP = cm[c, c], GT = row sum, PR = column sum:
    IoU = TP / (GT + PR - TP), accuracy (recall) = TP / GT, Dice = 2 TP / (GT + PR).

    NaN classes: a class that appears neither in the target nor in the prediction has NaN
    IoU and Dice; a class absent from the target has NaN accuracy (recall is undefined).
    Means skip NaN entries, so such classes do not pull the means down. A class absent
    from the target but predicted somewhere has IoU 0 and Dice 0 and does count.

    Args:
        cm: (K, K) counts.
        class_names: K names for ``per_class``; default ``class_0`` .. ``class_{K-1}``.

    Returns:
        Plain Python numbers (``json.dumps`` writes NaN as ``NaN``):
        ``pixel_accuracy`` (global accuracy), ``class_accuracy`` (mean per-class recall),
        ``mean_iou``, ``fw_iou`` (IoU weighted by true-class frequency), ``mean_dice`` and
        ``per_class``: a list of ``{"name", "iou", "accuracy", "dice", "pixels"}`` where
        ``pixels`` is the class's number of target pixels.
    """
    m = cm.detach().cpu().numpy() if isinstance(cm, Tensor) else np.asarray(cm)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"cm must be a square (K, K) matrix, got shape {m.shape}")
    k = m.shape[0]
    names = [f"class_{i}" for i in range(k)] if class_names is None else [str(n) for n in class_names]
    if len(names) != k:
        raise ValueError(f"class_names has {len(names)} names but the matrix has {k} classes; pass one name per class")
    m = m.astype(np.float64)
    tp = np.diag(m)
    gt = m.sum(1)
    pr = m.sum(0)
    total = m.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(gt + pr > 0, tp / (gt + pr - tp), math.nan)
        acc = np.where(gt > 0, tp / gt, math.nan)
        dice = np.where(gt + pr > 0, 2 * tp / (gt + pr), math.nan)
    seen = gt > 0
    return {
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else math.nan,
        "class_accuracy": _nanmean(acc),
        "mean_iou": _nanmean(iou),
        "fw_iou": float((gt[seen] * iou[seen]).sum() / total) if total > 0 else math.nan,
        "mean_dice": _nanmean(dice),
        "per_class": [
            {"name": names[c], "iou": float(iou[c]), "accuracy": float(acc[c]), "dice": float(dice[c]), "pixels": int(gt[c])}
            for c in range(k)
        ],
    }


def label_boundaries(labels: Tensor, ignore_index: int = 255) -> Tensor:
    """Class boundaries of a label map: pixels with a 4-neighbour of another class.

    Each region gets its one-pixel-wide inner contour, so the line between two regions is
    marked on both sides. Ignored pixels are never boundaries and a neighbour that is
    ignored does not make a boundary. Also the way to make HED edge targets from label maps.

    Args:
        labels: integer label map (H, W) or (N, H, W).
        ignore_index: label of pixels to leave out.

    Returns:
        bool tensor of ``labels``' shape.
    """
    if labels.dim() not in (2, 3):
        raise ValueError(f"labels must be (H, W) or (N, H, W), got shape {tuple(labels.shape)}")
    valid = labels != ignore_index
    any_ignored = not bool(valid.all())
    edge = torch.zeros_like(valid)
    # Vertical then horizontal neighbour pairs (a, b): a boundary when they differ and both count.
    for dim in (-2, -1):
        n = labels.shape[dim]
        diff = labels.narrow(dim, 0, n - 1) != labels.narrow(dim, 1, n - 1)
        if any_ignored:
            diff.logical_and_(valid.narrow(dim, 0, n - 1)).logical_and_(valid.narrow(dim, 1, n - 1))
        edge.narrow(dim, 0, n - 1).logical_or_(diff)
        edge.narrow(dim, 1, n - 1).logical_or_(diff)
    return edge


def _disk_dilate(x: Tensor, radius: float) -> Tensor:
    """Maximum of ``x`` (N, H, W) over a Euclidean disk of ``radius`` px around each pixel.

    One in-place ``maximum`` with a shifted copy per offset of the disk (13 at radius 2).
    """
    r = int(math.floor(radius))
    h, w = x.shape[-2:]
    out = x.clone()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if (dy == 0 and dx == 0) or dy * dy + dx * dx > radius * radius or abs(dy) >= h or abs(dx) >= w:
                continue
            # out[i, j] = max(out[i, j], x[i + dy, j + dx]) where (i + dy, j + dx) is inside.
            dst = out[:, max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
            src = x[:, max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)]
            torch.maximum(dst, src, out=dst)
    return out


def _count_at_least(bins: Tensor, mask: Tensor | None, num_thresholds: int) -> Tensor:
    """(N, T): per image, number of (masked) pixels whose value reaches each threshold.

    ``bins`` (N, P) holds, per pixel, the number of (ascending) thresholds <= its value:
    the pixel counts for thresholds 0 .. bins - 1.
    """
    n, t = bins.shape[0], num_thresholds
    index = bins + torch.arange(n, device=bins.device).unsqueeze(1) * (t + 1)
    if mask is not None:
        index = index[mask.reshape(n, -1)]
    hist = torch.bincount(index.flatten(), minlength=n * (t + 1)).reshape(n, t + 1)
    return hist.flip(1).cumsum(1).flip(1)[:, 1:]


def _f_measure(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p + r > 0, 2 * p * r / (p + r), 0.0)


class BoundaryFScore:
    """BSDS-style boundary F-score of soft edge maps over a range of thresholds.

    At threshold t, pixels with ``edge_prob >= t`` are predicted edges. A predicted edge
    pixel is a true positive when a true edge pixel lies within ``tolerance`` px
    (Euclidean), and a true edge pixel is recalled when a predicted one lies within
    ``tolerance`` px. This is a tolerance-based approximation of the BSDS benchmark, which
    thins the predictions and matches pixels one-to-one (bipartite matching); here several
    predicted pixels may match the same true pixel, so scores can be a little higher.

    ``compute`` returns ``ods_f`` (best F at one threshold for the whole data set, counts
    summed over images), ``ods_threshold``, ``ois_f`` (BSDS definition: counts taken at
    each image's best threshold, summed over images, then F) and ``ap`` (BSDS average
    precision: precision interpolated at recall 0, 0.01, .., 1, outside the measured recall
    range counted as 0). ODS/OIS pick the best of the given thresholds without the
    benchmark's interpolation between neighbouring thresholds. Precision with no predicted
    edge, and recall with no true edge, count as 1, so an empty prediction of an image
    without edges scores F = 1.

    Args:
        thresholds: number of thresholds, spread as in BSDS over
            ``1/(T+1) .. T/(T+1)``, or an explicit sequence of thresholds.
        tolerance: matching distance in pixels (BSDS uses 0.0075 of the image diagonal,
            about 4.3 px on 321x481 images).
    """

    def __init__(self, thresholds: int | Sequence[float] = 99, tolerance: float = 2.0) -> None:
        if isinstance(thresholds, int):
            if thresholds < 1:
                raise ValueError(f"thresholds must be a positive count or a sequence, got {thresholds}")
            thr = torch.linspace(1 / (thresholds + 1), thresholds / (thresholds + 1), thresholds, dtype=torch.float64)
        else:
            thr = torch.as_tensor(list(thresholds), dtype=torch.float64)
            if thr.numel() == 0 or thr.dim() != 1:
                raise ValueError(f"thresholds must be a non-empty sequence of numbers, got {thresholds!r}")
            thr = thr.sort().values
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
        self.thresholds = thr
        self.tolerance = float(tolerance)
        self._counts: list[Tensor] = []

    def update(self, edge_prob: Tensor, edge_true: Tensor) -> None:
        """Add a batch of edge maps.

        Args:
            edge_prob: edge probabilities in [0, 1], (N, H, W), (N, 1, H, W) or (H, W).
            edge_true: true edges, bool or 0/1, same shape as ``edge_prob``.
        """
        if edge_prob.shape != edge_true.shape:
            raise ValueError(
                f"edge_prob {tuple(edge_prob.shape)} and edge_true {tuple(edge_true.shape)} must have the same shape"
            )
        if edge_prob.dim() == 4 and edge_prob.shape[1] == 1:
            edge_prob, edge_true = edge_prob[:, 0], edge_true[:, 0]
        elif edge_prob.dim() == 2:
            edge_prob, edge_true = edge_prob[None], edge_true[None]
        if edge_prob.dim() != 3:
            raise ValueError(f"edge maps must be (N, H, W), (N, 1, H, W) or (H, W), got shape {tuple(edge_prob.shape)}")
        prob = edge_prob.detach().double()
        if prob.numel() and (prob.min() < 0 or prob.max() > 1):
            raise ValueError(
                f"edge_prob must lie in [0, 1], got values in [{prob.min().item():.3g}, {prob.max().item():.3g}]; "
                "apply torch.sigmoid to logits"
            )
        true = edge_true.detach().to(prob.device).bool()
        n, t = prob.shape[0], self.thresholds.numel()
        thr = self.thresholds.to(prob.device)

        def bin_of(values: Tensor) -> Tensor:
            return torch.searchsorted(thr, values.reshape(n, -1).contiguous(), right=True)

        # A true pixel is recalled at threshold t when the best prediction within tolerance
        # reaches t; a predicted pixel is correct when a true pixel lies within tolerance.
        near_pred = bin_of(_disk_dilate(prob, self.tolerance))
        near_true = _disk_dilate(true.to(torch.uint8), self.tolerance).bool()
        pred = bin_of(prob)
        counts = torch.stack(
            [
                _count_at_least(near_pred, true, t),  # matched true pixels
                true.reshape(n, -1).sum(1, keepdim=True).expand(-1, t),  # true pixels
                _count_at_least(pred, near_true, t),  # matched predicted pixels
                _count_at_least(pred, None, t),  # predicted pixels
            ],
            dim=1,
        )
        self._counts.append(counts.cpu())

    def compute(self) -> dict[str, float]:
        """``{"ods_f", "ods_threshold", "ois_f", "ap"}`` over all images seen."""
        if not self._counts:
            raise ValueError("BoundaryFScore has no images; call update() before compute()")
        c = torch.cat(self._counts).double().numpy()  # (images, 4, T)
        cnt_r, sum_r, cnt_p, sum_p = c[:, 0], c[:, 1], c[:, 2], c[:, 3]

        def prf(cr: np.ndarray, sr: np.ndarray, cp: np.ndarray, sp: np.ndarray) -> tuple[np.ndarray, ...]:
            r = np.where(sr > 0, cr / np.maximum(sr, 1), 1.0)
            p = np.where(sp > 0, cp / np.maximum(sp, 1), 1.0)
            return p, r, _f_measure(p, r)

        p, r, f = prf(cnt_r.sum(0), sum_r.sum(0), cnt_p.sum(0), sum_p.sum(0))
        best = int(np.argmax(f))
        per_image_best = np.argmax(prf(cnt_r, sum_r, cnt_p, sum_p)[2], axis=1)
        rows = np.arange(len(c))
        pick = (rows, per_image_best)
        ois = prf(cnt_r[pick].sum(), sum_r[pick].sum(), cnt_p[pick].sum(), sum_p[pick].sum())[2]
        return {
            "ods_f": float(f[best]),
            "ods_threshold": float(self.thresholds[best]),
            "ois_f": float(ois),
            "ap": _average_precision(p, r),
        }

    def reset(self) -> None:
        """Forget all images."""
        self._counts = []


def _average_precision(p: np.ndarray, r: np.ndarray) -> float:
    """BSDS AP: precision interpolated at recall 0:0.01:1 (0 outside the measured range), summed / 100.

    ``p`` and ``r`` are ordered by ascending threshold; of equal recalls the point at the
    highest threshold is kept, and points with zero recall or precision are left out.
    """
    keep = (r > 0) & (p > 0)
    r, p = r[keep][::-1], p[keep][::-1]
    r, first = np.unique(r, return_index=True)
    p = p[first]
    if r.size < 2:
        return 0.0
    grid = np.linspace(0, 1, 101)
    inside = (grid >= r[0] - 1e-12) & (grid <= r[-1] + 1e-12)
    return float(np.interp(grid[inside], r, p).sum() / 100)


def cell_segments(labels: np.ndarray, cell_class: int, ignore: np.ndarray | None = None) -> np.ndarray:
    """(H, W) class ids -> (H, W) segment ids: the 4-connected components of ``cell_class``
    numbered from 1; 0 elsewhere and where ``ignore`` (a (H, W) bool mask) is set."""
    from scipy import ndimage

    cells = np.asarray(labels) == cell_class
    if ignore is not None:
        cells &= ~ignore
    segments, _ = ndimage.label(cells)
    return segments


class SegmentScore:
    """The ISBI 2012 challenge's segment measures of cell segmentations, mean over images.

    Cells are the 4-connected components of ``cell_class`` in the truth and in the
    prediction (:func:`cell_segments`). Per image, with scikit-image's definitions:
    Rand error = 1 - adapted Rand F-score (Arganda-Carreras et al. 2015, pairs of pixels in
    one segment; pixels outside every true cell, i.e. membrane and ``ignore_index``, are left
    out) and the variation of information VI = H(truth | prediction) + H(prediction | truth)
    in bits (Meila 2003; split part ``vi_split``, merge part ``vi_merge``) over the same
    pixels. Also ``pixel_error`` = 1 - pixel accuracy of the class maps. The U-Net paper
    reports Rand error 0.0382 and pixel error 0.0611 on the ISBI 2012 test stack.
    """

    def __init__(self, cell_class: int, ignore_index: int = 255) -> None:
        self.cell_class, self.ignore_index = cell_class, ignore_index
        # summed over images: rand error, VI split, VI merge, wrong pixels, scored pixels, images
        self.totals = torch.zeros(6, dtype=torch.float64)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one image: predicted and true class ids, both (H, W)."""
        from skimage.metrics import adapted_rand_error, variation_of_information

        pred, target = np.asarray(pred.cpu()), np.asarray(target.cpu())
        ignore = target == self.ignore_index
        truth = cell_segments(target, self.cell_class, ignore)
        found = cell_segments(pred, self.cell_class)
        if truth.any():
            rand = adapted_rand_error(truth, found)[0]
            split, merge = variation_of_information(truth, found, ignore_labels=(0,))
        else:  # no true cell: nothing to split or merge
            rand, split, merge = 0.0, 0.0, 0.0
        wrong = int(((pred != target) & ~ignore).sum())
        self.totals += torch.tensor([rand, split, merge, wrong, int((~ignore).sum()), 1], dtype=torch.float64)

    def all_reduce(self) -> None:
        """Sum the totals over all processes when torch.distributed is initialised."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.totals, op=dist.ReduceOp.SUM)

    def compute(self) -> dict[str, float]:
        rand, split, merge, wrong, pixels, images = self.totals.tolist()
        if images == 0:
            return {key: math.nan for key in ("rand_error", "variation_of_information", "vi_split", "vi_merge", "pixel_error")}
        return {
            "rand_error": rand / images,
            "variation_of_information": (split + merge) / images,
            "vi_split": split / images,
            "vi_merge": merge / images,
            "pixel_error": wrong / pixels if pixels else math.nan,
        }
