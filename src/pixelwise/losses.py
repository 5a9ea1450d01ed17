"""Pixel-wise losses and class-balancing weights.

Every loss is an ``nn.Module`` called as ``loss(logits, target)`` with logits
(N, K, H, W) and an int64 target (N, H, W) whose ``ignore_index`` pixels are left out.
A batch without a single valid pixel gives a loss of exactly 0 that still has a
gradient path (zero gradients), never NaN. Losses compute in float32 whatever the
logits' dtype.

Example:
    >>> counts, totals = class_pixel_counts(label_maps, num_classes=11, ignore_index=11)
    >>> loss_fn = build_loss("ce", ignore_index=11, class_weights=median_frequency_weights(counts, totals))
    >>> loss = loss_fn(model(images), labels)
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn

Weights = Sequence[float] | np.ndarray | Tensor


def _as_weight(weight: Weights | None, name: str) -> Tensor | None:
    if weight is None:
        return None
    if isinstance(weight, Tensor):
        w = weight.detach().to("cpu", torch.float32)
    else:
        w = torch.as_tensor(np.asarray(weight, dtype=np.float32))
    if w.dim() != 1 or w.numel() == 0:
        raise ValueError(f"{name} must be a 1-D sequence of per-class weights, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"{name} must be finite and >= 0, got {w.tolist()}")
    return w


def _check_logits_target(logits: Tensor, target: Tensor, ignore_index: int) -> None:
    """Shapes (N, K, H, W) / (N, H, W) (volumes: (N, K, D, H, W) / (N, D, H, W)), integer
    target, class ids in [0, K) or ignore_index."""
    if logits.dim() not in (4, 5):
        raise ValueError(f"logits must be (N, K, H, W) or (N, K, D, H, W), got shape {tuple(logits.shape)}")
    n, k, *spatial = logits.shape
    if tuple(target.shape) != (n, *spatial):
        raise ValueError(
            f"target must be (N, H, W) = {(n, *spatial)} to match logits {tuple(logits.shape)}, got {tuple(target.shape)}"
        )
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"target must hold int64 class ids, got dtype {target.dtype}; convert it with .long()")
    bad = (target != ignore_index) & ((target < 0) | (target >= k))
    if bad.any():
        value = int(target[bad].flatten()[0])
        raise ValueError(
            f"target holds class id {value}, outside [0, {k}) and not ignore_index={ignore_index}; "
            "fix num_classes, ignore_index or the label map"
        )


def _weight_for(weight: Tensor | None, k: int, like: Tensor, name: str = "weight") -> Tensor | None:
    if weight is None:
        return None
    if weight.numel() != k:
        raise ValueError(f"{name} has {weight.numel()} entries but logits have {k} classes; pass one weight per class")
    return weight.to(device=like.device, dtype=like.dtype)


def _zero_with_grad(logits: Tensor) -> Tensor:
    """A scalar 0 connected to ``logits`` (zero gradients) for batches with no valid pixel."""
    return logits.sum() * 0.0


class CrossEntropyLoss(nn.Module):
    """Cross-entropy with class weights, ignored pixels and optional per-pixel weights.

    loss = sum(w_class * w_pixel * ce) / sum(w_class * w_pixel) over non-ignored pixels,
    which is ``F.cross_entropy(logits, target, weight, ignore_index=...)`` when no
    per-pixel weights are given. Per-pixel weights are e.g. U-Net's boundary weight map
    (:func:`unet_weight_map`).

    Args:
        weight: per-class weights (K,), e.g. :func:`median_frequency_weights`.
        ignore_index: target value of pixels that do not count.
    """

    def __init__(self, weight: Weights | None = None, ignore_index: int = 255) -> None:
        super().__init__()
        self.register_buffer("weight", _as_weight(weight, "weight"))
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, target: Tensor, pixel_weights: Tensor | None = None) -> Tensor:
        """Loss of logits (N, K, H, W) against target (N, H, W); pixel_weights (N, H, W)."""
        _check_logits_target(logits, target, self.ignore_index)
        logits = logits.float()
        ce = F.cross_entropy(logits, target, reduction="none", ignore_index=self.ignore_index)
        valid = target != self.ignore_index
        w = valid.float()
        class_w = _weight_for(self.weight, logits.shape[1], logits)
        if class_w is not None:
            w = w * class_w[target.clamp(0, logits.shape[1] - 1)]
        if pixel_weights is not None:
            if pixel_weights.shape != target.shape:
                raise ValueError(
                    f"pixel_weights must have the target's shape {tuple(target.shape)}, got {tuple(pixel_weights.shape)}"
                )
            w = w * pixel_weights.to(device=logits.device, dtype=logits.dtype)
        den = w.sum()
        if den <= 0:
            return _zero_with_grad(logits)
        return (w * ce).sum() / den


class PartialCrossEntropyLoss(nn.Module):
    """Partial cross-entropy for scribble supervision (Tang et al., CVPR 2018).

    Cross-entropy over the labelled pixels only, divided by the number of labelled pixels;
    pixels equal to ``unlabeled_index`` carry no label. Class weights, if given, scale each
    pixel's term but do not change the normaliser (unlike :class:`CrossEntropyLoss`), so
    the loss stays an average over labelled pixels. A batch without any labelled pixel
    gives 0.

    Args:
        unlabeled_index: target value of unlabelled pixels.
        weight: per-class weights (K,).
    """

    def __init__(self, unlabeled_index: int = 255, weight: Weights | None = None) -> None:
        super().__init__()
        self.unlabeled_index = unlabeled_index
        self.register_buffer("weight", _as_weight(weight, "weight"))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Loss of logits (N, K, H, W) against sparse target (N, H, W)."""
        _check_logits_target(logits, target, self.unlabeled_index)
        logits = logits.float()
        class_w = _weight_for(self.weight, logits.shape[1], logits)
        ce = F.cross_entropy(logits, target, weight=class_w, reduction="none", ignore_index=self.unlabeled_index)
        labelled = (target != self.unlabeled_index).sum()
        if labelled == 0:
            return _zero_with_grad(logits)
        return ce.sum() / labelled


class DiceLoss(nn.Module):
    """Soft multi-class Dice loss over softmax probabilities.

    Per class c, over all valid pixels of the batch:
    dice_c = (2 sum(p_c y_c) + smooth) / (sum(p_c) + sum(y_c) + smooth); the loss is
    1 - mean(dice_c) over the classes present in the batch's target.

    Args:
        ignore_index: target value of pixels that do not count.
        smooth: additive smoothing of numerator and denominator.
    """

    def __init__(self, ignore_index: int = 255, smooth: float = 1.0) -> None:
        super().__init__()
        if smooth < 0:
            raise ValueError(f"smooth must be >= 0, got {smooth}")
        self.ignore_index = ignore_index
        self.smooth = smooth

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Loss of logits (N, K, H, W) against target (N, H, W)."""
        _check_logits_target(logits, target, self.ignore_index)
        logits = logits.float()
        k = logits.shape[1]
        valid = (target != self.ignore_index).unsqueeze(1)
        prob = logits.softmax(1)
        # One-hot target (N, K, H, W), all zeros on ignored pixels.
        onehot = torch.zeros_like(prob).scatter_(1, target.clamp(0, k - 1).unsqueeze(1), valid.to(prob.dtype))
        dims = (0, *range(2, prob.dim()))
        inter = (prob * onehot).sum(dims)
        count = onehot.sum(dims)
        card = (prob * valid).sum(dims) + count
        present = count > 0
        if not present.any():
            return _zero_with_grad(logits)
        dice = (2 * inter + self.smooth) / (card + self.smooth).clamp_min(1e-12)
        return 1 - dice[present].mean()


class FocalLoss(nn.Module):
    """Multi-class focal loss (Lin et al., ICCV 2017): -alpha_t (1 - p_t)^gamma log p_t.

    Normalised like weighted cross-entropy: divided by sum(alpha_t) over valid pixels
    (the number of valid pixels without ``alpha``), so ``gamma=0`` equals
    ``CrossEntropyLoss(weight=alpha)``.

    Args:
        gamma: focusing parameter (>= 0); 0 gives cross-entropy.
        alpha: per-class weights (K,).
        ignore_index: target value of pixels that do not count.
    """

    def __init__(self, gamma: float = 2.0, alpha: Weights | None = None, ignore_index: int = 255) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.register_buffer("alpha", _as_weight(alpha, "alpha"))
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Loss of logits (N, K, H, W) against target (N, H, W)."""
        _check_logits_target(logits, target, self.ignore_index)
        logits = logits.float()
        k = logits.shape[1]
        valid = target != self.ignore_index
        t = target.clamp(0, k - 1)
        logpt = logits.log_softmax(1).gather(1, t.unsqueeze(1)).squeeze(1)
        # clamp: (1 - p_t)^gamma has an infinite slope at p_t = 1 when gamma < 1.
        focus = (-torch.expm1(logpt)).clamp_min(torch.finfo(logpt.dtype).tiny) ** self.gamma
        w = valid.float()
        alpha = _weight_for(self.alpha, k, logits, "alpha")
        if alpha is not None:
            w = w * alpha[t]
        den = w.sum()
        if den <= 0:
            return _zero_with_grad(logits)
        return -(w * focus * logpt).sum() / den


def _lovasz_grad(gt_sorted: Tensor) -> Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss, per column of (P, C) sorted 0/1 labels."""
    gts = gt_sorted.sum(0)
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]], 0)


class LovaszSoftmaxLoss(nn.Module):
    """Lovasz-softmax loss (Berman et al., CVPR 2018): a convex surrogate of 1 - IoU.

    For each class the pixel errors |y_c - p_c| are sorted and weighted by the gradient of
    the Lovasz extension of the Jaccard loss; the loss is the mean over classes.

    Args:
        ignore_index: target value of pixels that do not count.
        per_image: average per-image losses (images without valid pixels are skipped)
            instead of one loss over the whole batch.
        classes: ``"present"`` (classes in the target), ``"all"`` or a list of class ids.
    """

    def __init__(self, ignore_index: int = 255, per_image: bool = False, classes: str | Sequence[int] = "present") -> None:
        super().__init__()
        if isinstance(classes, str) and classes not in ("present", "all"):
            raise ValueError(f"classes must be 'present', 'all' or a list of class ids, got {classes!r}")
        if not isinstance(classes, str) and len(classes) == 0:
            raise ValueError("classes must name at least one class id, got an empty list")
        self.ignore_index = ignore_index
        self.per_image = per_image
        self.classes = classes if isinstance(classes, str) else [int(c) for c in classes]

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Loss of logits (N, K, H, W) against target (N, H, W)."""
        _check_logits_target(logits, target, self.ignore_index)
        logits = logits.float()
        k = logits.shape[1]
        if not isinstance(self.classes, str) and any(not 0 <= c < k for c in self.classes):
            raise ValueError(f"classes {self.classes} must be class ids in [0, {k})")
        prob = logits.softmax(1)
        if not self.per_image:
            loss = self._flat(prob.movedim(1, -1).reshape(-1, k), target.reshape(-1))
            return loss if loss is not None else _zero_with_grad(logits)
        losses = [self._flat(p.movedim(0, -1).reshape(-1, k), t.reshape(-1)) for p, t in zip(prob, target)]
        losses = [x for x in losses if x is not None]
        return torch.stack(losses).mean() if losses else _zero_with_grad(logits)

    def _flat(self, prob: Tensor, labels: Tensor) -> Tensor | None:
        """Loss of (P, K) probabilities against (P,) labels, or None when nothing counts."""
        valid = labels != self.ignore_index
        prob, labels = prob[valid], labels[valid]
        if labels.numel() == 0:
            return None
        k = prob.shape[1]
        fg = F.one_hot(labels, k).to(prob.dtype)  # (P, K)
        if self.classes == "present":
            chosen = fg.sum(0) > 0
        elif self.classes == "all":
            chosen = torch.ones(k, dtype=torch.bool, device=prob.device)
        else:
            chosen = torch.zeros(k, dtype=torch.bool, device=prob.device)
            chosen[self.classes] = True
        fg, prob = fg[:, chosen], prob[:, chosen]
        errors_sorted, order = (fg - prob).abs().sort(0, descending=True)
        grad = _lovasz_grad(fg.gather(0, order))
        return (errors_sorted * grad).sum(0).mean()


class BalancedBCEWithLogitsLoss(nn.Module):
    """Class-balanced sigmoid cross-entropy for edge maps (HED, Xie & Tu 2015).

    Per image, beta = |Y-| / |Y| (fraction of non-edge pixels among valid pixels) and the
    loss is -(beta sum_{Y+} log sigmoid(x) + (1 - beta) sum_{Y-} log(1 - sigmoid(x))).
    HED sums this over pixels; here the batch total is divided by the number of valid
    pixels, so the scale does not depend on image size.

    Args:
        ignore_index: target value of pixels that do not count.
    """

    def __init__(self, ignore_index: int = 255) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Loss of logits (N, 1, H, W) against a 0/1 edge target (N, H, W) or (N, 1, H, W)."""
        if logits.dim() != 4 or logits.shape[1] != 1:
            raise ValueError(f"logits must be (N, 1, H, W), got shape {tuple(logits.shape)}")
        if target.dim() == 4:
            if target.shape[1] != 1:
                raise ValueError(f"target must be (N, H, W) or (N, 1, H, W), got shape {tuple(target.shape)}")
            target = target[:, 0]
        x = logits[:, 0].float()
        if target.shape != x.shape:
            raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
        valid = target != self.ignore_index
        pos = valid & (target == 1)
        neg = valid & (target == 0)
        other = valid & ~(pos | neg)
        if other.any():
            value = target[other].flatten()[0].item()
            raise ValueError(f"edge target holds {value}; use 0 (no edge), 1 (edge) or ignore_index={self.ignore_index}")
        n_valid = valid.flatten(1).sum(1).float()
        beta = (neg.flatten(1).sum(1) / n_valid.clamp_min(1)).view(-1, 1, 1)
        # log sigmoid(x) = -softplus(-x), log(1 - sigmoid(x)) = -softplus(x)
        per_pixel = beta * pos * F.softplus(-x) + (1 - beta) * neg * F.softplus(x)
        total = n_valid.sum()
        if total == 0:
            return _zero_with_grad(logits)
        return per_pixel.sum() / total


class CrossEntropyDiceLoss(nn.Module):
    """Sum of :class:`CrossEntropyLoss` and :class:`DiceLoss`.

    Args:
        weight: per-class weights (K,) for the cross-entropy term.
        ignore_index: target value of pixels that do not count.
        smooth: Dice smoothing.
    """

    def __init__(self, weight: Weights | None = None, ignore_index: int = 255, smooth: float = 1.0) -> None:
        super().__init__()
        self.ce = CrossEntropyLoss(weight=weight, ignore_index=ignore_index)
        self.dice = DiceLoss(ignore_index=ignore_index, smooth=smooth)

    def forward(self, logits: Tensor, target: Tensor, pixel_weights: Tensor | None = None) -> Tensor:
        """Loss of logits (N, K, H, W) against target (N, H, W); pixel_weights apply to the CE term."""
        return self.ce(logits, target, pixel_weights) + self.dice(logits, target)


# ----------------------------------------------------------------------------- class weights


def _bincount_image(labels: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    flat = labels.reshape(-1).astype(np.int64, copy=False)
    valid = flat != ignore_index
    bad = valid & ((flat < 0) | (flat >= num_classes))
    if bad.any():
        raise ValueError(
            f"label map holds class id {int(flat[bad][0])}, outside [0, {num_classes}) and not "
            f"ignore_index={ignore_index}; fix num_classes or ignore_index"
        )
    return np.bincount(np.where(valid, flat, num_classes), minlength=num_classes + 1)[:num_classes]


def class_pixel_counts(
    labels_iterable: Iterable[np.ndarray | Tensor], num_classes: int, ignore_index: int = 255
) -> tuple[Tensor, Tensor]:
    """Pixel statistics of a labelled data set, for class-balancing weights.

    Args:
        labels_iterable: label maps, each (H, W) or a batch (N, H, W) (numpy or tensor).
        num_classes: number of classes K.
        ignore_index: label of pixels that are not counted.

    Returns:
        ``(counts, present_totals)``, two int64 tensors (K,): ``counts[c]`` = pixels of
        class c; ``present_totals[c]`` = total pixels (ignored ones included) of the images
        in which class c appears.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    counts = np.zeros(num_classes, np.int64)
    totals = np.zeros(num_classes, np.int64)
    for item in labels_iterable:
        arr = item.detach().cpu().numpy() if isinstance(item, Tensor) else np.asarray(item)
        if arr.ndim not in (2, 3):
            raise ValueError(f"label maps must be (H, W) or (N, H, W), got shape {arr.shape}")
        for image in arr.reshape(-1, *arr.shape[-2:]):
            c = _bincount_image(image, num_classes, ignore_index)
            counts += c
            totals += (c > 0) * image.size
    return torch.from_numpy(counts), torch.from_numpy(totals)


def median_frequency_weights(counts: Weights, present_totals: Weights) -> Tensor:
    """Median frequency balancing (Eigen & Fergus 2015; SegNet).

    freq(c) = counts[c] / present_totals[c]; weight(c) = median(freq) / freq(c), the median
    taken over the classes that occur. Classes never seen get weight 0.

    Args:
        counts: pixels per class (K,), from :func:`class_pixel_counts`.
        present_totals: pixels of the images containing each class (K,).

    Returns:
        float32 weights (K,).
    """
    c = np.asarray(counts.cpu() if isinstance(counts, Tensor) else counts, dtype=np.float64)
    t = np.asarray(present_totals.cpu() if isinstance(present_totals, Tensor) else present_totals, dtype=np.float64)
    if c.shape != t.shape or c.ndim != 1:
        raise ValueError(f"counts {c.shape} and present_totals {t.shape} must be 1-D of the same length")
    seen = (c > 0) & (t > 0)
    if not seen.any():
        raise ValueError("no class has any pixel; counts are all zero, check the label maps and ignore_index")
    freq = np.zeros_like(c)
    freq[seen] = c[seen] / t[seen]
    weights = np.zeros_like(c)
    weights[seen] = np.median(freq[seen]) / freq[seen]
    return torch.from_numpy(weights).float()


def enet_weights(counts: Weights, c: float = 1.02) -> Tensor:
    """ENet class weights 1 / ln(c + p_class), p_class = counts / sum(counts) (Paszke et al. 2016).

    With c = 1.02 the weights lie between about 1.4 and 50.5 (a class never seen).

    Args:
        counts: pixels per class (K,).
        c: constant > 1 that bounds the largest weight at 1 / ln(c).

    Returns:
        float32 weights (K,).
    """
    if c <= 1:
        raise ValueError(f"c must be > 1 so that ln(c + p) > 0, got {c}")
    n = np.asarray(counts.cpu() if isinstance(counts, Tensor) else counts, dtype=np.float64)
    if n.ndim != 1 or n.sum() <= 0:
        raise ValueError(f"counts must be 1-D with a positive total, got {n.tolist()}")
    return torch.from_numpy(1.0 / np.log(c + n / n.sum())).float()


# ----------------------------------------------------------------------------- U-Net weight map


def unet_weight_map(
    mask: np.ndarray | Tensor, w0: float = 10.0, sigma: float = 5.0, class_weights: Sequence[float] | None = None
) -> np.ndarray:
    """U-Net weight map w = w_c + w0 exp(-(d1 + d2)^2 / (2 sigma^2)) (Ronneberger et al. 2015).

    d1 and d2 are the distances of a background pixel to the nearest and second-nearest
    cell; the border term is added on background pixels only, so it is largest in thin
    gaps between touching cells. With fewer than two cells there is no border term.
    Distances beyond the point where the border term falls under 1e-7 are not computed.

    Args:
        mask: (H, W) cells. A bool mask, or one with a single nonzero value (e.g. ISBI's
            0/255), is split into cells by 4-connected components; an integer map with
            several nonzero values is read as instance labels (0 = background).
        w0: border weight.
        sigma: border width in pixels.
        class_weights: ``(w_background, w_foreground)``; default inverse class frequency
            scaled so that the more frequent class has weight 1.

    Returns:
        float32 (H, W) weights, for ``CrossEntropyLoss(...)(logits, target, pixel_weights=...)``.
    """
    m = mask.detach().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {m.shape}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0 pixels, got {sigma}")
    foreground = m != 0
    if m.dtype == bool or np.unique(m[foreground]).size <= 1:
        instances, _ = ndimage.label(foreground)
    elif np.issubdtype(m.dtype, np.integer) and m.min() >= 0:
        instances = m.astype(np.int64)
    else:
        raise ValueError(
            f"mask must be a binary mask or a map of non-negative integer instance ids, got dtype {m.dtype} "
            f"with values in [{m.min()}, {m.max()}]"
        )
    if class_weights is None:
        freq = np.array([(~foreground).sum(), foreground.sum()], np.float64)
        wc = np.where(freq > 0, freq.max() / np.maximum(freq, 1), 0.0)
    else:
        wc = np.asarray(class_weights, np.float64)
        if wc.shape != (2,):
            raise ValueError(f"class_weights must be (w_background, w_foreground), got {list(class_weights)}")
    weights = np.where(foreground, wc[1], wc[0])
    return np.where(foreground, weights, weights + _border_term(instances, w0, sigma)).astype(np.float32)


def _border_term(instances: np.ndarray, w0: float, sigma: float) -> np.ndarray | float:
    """w0 exp(-(d1 + d2)^2 / (2 sigma^2)) for (H, W) instance ids (0 = none); 0 with < 2 instances.

    Distances beyond the point where the term falls under 1e-7 are not computed.
    """
    boxes = [(i + 1, box) for i, box in enumerate(ndimage.find_objects(instances)) if box is not None]
    if w0 == 0 or len(boxes) < 2:
        return 0.0
    # Past this distance w0 * exp(-d^2 / (2 sigma^2)) < 1e-7: d2 >= reach adds nothing.
    reach = sigma * math.sqrt(2 * math.log(max(abs(w0) / 1e-7, 1.0)))
    pad = int(math.ceil(reach))
    d1 = np.full(instances.shape, np.inf)
    d2 = np.full(instances.shape, np.inf)
    for label, box in boxes:
        crop = tuple(slice(max(s.start - pad, 0), min(s.stop + pad, size)) for s, size in zip(box, instances.shape))
        d = ndimage.distance_transform_edt(instances[crop] != label)
        a, b = d1[crop], d2[crop]
        b[...] = np.minimum(b, np.maximum(a, d))
        a[...] = np.minimum(a, d)
    return w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))


def semantic_weight_map(
    mask: np.ndarray | Tensor,
    background: int = 0,
    ignore_index: int = 255,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: Sequence[float] | None = None,
) -> np.ndarray:
    """U-Net weight map for a semantic label map with any number of classes.

    Every foreground class (not ``background``, not ``ignore_index``) is split into its
    4-connected components; d1 and d2 are the distances of a background pixel to the
    nearest and second-nearest of these instances, over all classes, and the border term
    w0 exp(-(d1 + d2)^2 / (2 sigma^2)) is added on background pixels as in
    :func:`unet_weight_map` (Ronneberger et al. 2015). Two touching regions of different
    classes are two instances. For a 0/1 map (ISBI: 0 membrane, 1 cell) it equals
    ``unet_weight_map(mask == 1)``.

    Args:
        mask: (H, W) class ids.
        background: the class between instances (the border term goes there).
        ignore_index: pixels that belong to no class; weight 0.
        w0: border weight.
        sigma: border width in pixels.
        class_weights: w_c per class id (indexable by every id in ``mask``); default inverse
            class frequency over the labelled pixels, the most frequent class 1.

    Returns:
        float32 (H, W) weights, for ``CrossEntropyLoss(...)(logits, target, pixel_weights=...)``.
    """
    m = mask.detach().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    if m.ndim != 2 or not np.issubdtype(m.dtype, np.integer) or (m.size and m.min() < 0):
        raise ValueError(f"mask must be an (H, W) map of non-negative class ids, got shape {m.shape} dtype {m.dtype}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0 pixels, got {sigma}")
    labelled = m != ignore_index
    ids = m.astype(np.int64)
    counts = np.bincount(ids[labelled], minlength=background + 1).astype(np.float64)
    if class_weights is None:
        wc = np.where(counts > 0, counts.max() / np.maximum(counts, 1), 0.0)
    else:
        wc = np.asarray(class_weights, np.float64)
        if wc.ndim != 1 or wc.size < counts.size:
            raise ValueError(f"class_weights needs one weight per class id up to {counts.size - 1}, got {list(class_weights)}")
    weights = np.where(labelled, wc[np.where(labelled, ids, 0)], 0.0)
    instances = np.zeros(m.shape, np.int64)
    count = 0
    for c in np.unique(ids[labelled & (ids != background)]):
        components, n = ndimage.label(ids == c)
        inside = components > 0
        instances[inside] = components[inside] + count
        count += n
    border = _border_term(instances, w0, sigma)
    return np.where(labelled & (ids == background), weights + border, weights).astype(np.float32)


# ----------------------------------------------------------------------------- registry


def _no_class_weights(name: str, class_weights: Weights | None) -> None:
    if class_weights is not None:
        raise ValueError(f"loss {name!r} does not take class_weights; use 'ce', 'partial_ce', 'focal' or 'ce+dice'")


def _ce(*, ignore_index: int = 255, class_weights: Weights | None = None) -> nn.Module:
    return CrossEntropyLoss(weight=class_weights, ignore_index=ignore_index)


def _partial_ce(*, ignore_index: int = 255, class_weights: Weights | None = None) -> nn.Module:
    return PartialCrossEntropyLoss(unlabeled_index=ignore_index, weight=class_weights)


def _dice(*, ignore_index: int = 255, class_weights: Weights | None = None) -> nn.Module:
    _no_class_weights("dice", class_weights)
    return DiceLoss(ignore_index=ignore_index)


def _focal(*, ignore_index: int = 255, class_weights: Weights | None = None) -> nn.Module:
    return FocalLoss(alpha=class_weights, ignore_index=ignore_index)


def _lovasz(*, ignore_index: int = 255, class_weights: Weights | None = None) -> nn.Module:
    _no_class_weights("lovasz", class_weights)
    return LovaszSoftmaxLoss(ignore_index=ignore_index)


def _ce_dice(*, ignore_index: int = 255, class_weights: Weights | None = None) -> nn.Module:
    return CrossEntropyDiceLoss(weight=class_weights, ignore_index=ignore_index)


def _hed_bce(*, ignore_index: int = 255, class_weights: Weights | None = None) -> nn.Module:
    _no_class_weights("hed_bce", class_weights)
    return BalancedBCEWithLogitsLoss(ignore_index=ignore_index)


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "ce": _ce,
    "partial_ce": _partial_ce,
    "dice": _dice,
    "focal": _focal,
    "lovasz": _lovasz,
    "ce+dice": _ce_dice,
    "hed_bce": _hed_bce,
}
"""Loss name -> keyword-only builder ``(ignore_index, class_weights) -> nn.Module``."""


def build_loss(name: str, *, ignore_index: int = 255, class_weights: Weights | None = None) -> nn.Module:
    """Build a loss by name (see ``LOSSES``); ``class_weights`` (K,) where the loss takes them."""
    if name not in LOSSES:
        close = difflib.get_close_matches(name, LOSSES, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown loss {name!r}.{hint} Valid names: {', '.join(LOSSES)}")
    return LOSSES[name](ignore_index=ignore_index, class_weights=class_weights)
