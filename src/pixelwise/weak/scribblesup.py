"""ScribbleSup label propagation (Lin, Dai, Jia, He & Sun, CVPR 2016, Sec. 3).

Per training image, superpixel labels Y minimise
    sum_i psi_scr(y_i) + sum_i -log P(y_i | X, Theta) + lambda sum_ij w_ij [y_i != y_j]
psi_scr: a superpixel crossed by a scribble of class c must take c (0 for c, inf otherwise);
-log P: the network's softmax averaged over the superpixel; in the first round, before any
network is trained, appearance models built from the scribbled superpixels' histograms
stand in (our choice, as the issue asks, so that unmarked superpixels still see
evidence). Solved by alpha-expansion (:mod:`pixelwise.weak.graphcut`);
the network is then trained with cross-entropy on the propagated labels and the two steps
alternate (three rounds in the paper).
"""

from __future__ import annotations

import numpy as np

from pixelwise.weak.graphcut import alpha_expansion
from pixelwise.weak.superpixels import SuperpixelGraph, scribbled_superpixels, superpixel_mean

MIN_PROB = 1e-6  # floor on probabilities before -log, so no unmarked superpixel gets an infinite cost


def appearance_unary(graph: SuperpixelGraph, seeds: np.ndarray, num_classes: int) -> np.ndarray:
    """(S, K) -log P from per-class appearance models of the scribbled superpixels.

    Class c's model is the mean (colour, texture) histogram of the superpixels scribbled c;
    P(c | i) is proportional to exp(-|h_i - m_c|^2 / d^2), d^2 the mean of that distance over
    nodes and scribbled classes. Classes without a scribble in the image cost inf: an image's
    scribbles name the classes it holds.
    """
    features = np.concatenate([graph.colour, graph.texture], 1)
    unary = np.full((graph.num_nodes, num_classes), np.inf)
    present = [c for c in range(num_classes) if (seeds == c).any()]
    if not present:
        return np.zeros((graph.num_nodes, num_classes))  # no scribble: nothing to go on, let the pairwise term decide
    models = np.stack([features[seeds == c].mean(0) for c in present])
    d2 = ((features[:, None, :] - models[None]) ** 2).sum(2)  # (S, |present|)
    logits = -d2 / max(d2.mean(), 1e-12)
    log_p = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    unary[:, present] = -log_p
    return unary


def network_unary(graph: SuperpixelGraph, prob: np.ndarray) -> np.ndarray:
    """(S, K) -log of the network's softmax (K, H, W) averaged over each superpixel."""
    if prob.shape[1:] != graph.segments.shape:
        raise ValueError(f"probabilities {prob.shape} must be (K, H, W) over the image {graph.segments.shape}")
    return -np.log(np.maximum(superpixel_mean(graph.segments, prob), MIN_PROB))


def propagate_labels(
    graph: SuperpixelGraph,
    scribbles: np.ndarray,
    num_classes: int,
    ignore_index: int,
    prob: np.ndarray | None = None,
    pairwise_weight: float = 10.0,
    min_confidence: float = 0.0,
) -> np.ndarray:
    """Dense labels (H, W) int64 propagated from scribbles (H, W) over the superpixel graph.

    Args:
        graph: The image's :class:`SuperpixelGraph`.
        scribbles: Class id on stroke pixels, ``ignore_index`` elsewhere.
        num_classes: K.
        ignore_index: Unmarked value in ``scribbles``.
        prob: Network softmax (K, H, W) for -log P; None (first round) uses appearance models.
        pairwise_weight: lambda, the weight of the Potts term against the unaries (10: best of
            1, 3, 10, 30, 100 on round-1 propagation of three CamVid training images).
        min_confidence: Unmarked superpixels whose chosen class has a probability (the unary's
            P) below this are left ``ignore_index``; 0, the paper's form, labels them all.
    """
    if pairwise_weight < 0:
        raise ValueError(f"pairwise_weight must be >= 0, got {pairwise_weight}")
    if not 0 <= min_confidence <= 1:
        raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
    seeds = scribbled_superpixels(graph.segments, scribbles, num_classes, ignore_index)
    unary = appearance_unary(graph, seeds, num_classes) if prob is None else network_unary(graph, prob)
    marked = seeds >= 0
    unary[marked] = np.inf  # psi_scr: a scribbled superpixel keeps its scribble's class
    unary[marked, seeds[marked]] = 0.0
    labels = alpha_expansion(unary, graph.edges, pairwise_weight * graph.weights)
    if min_confidence > 0:
        sure = np.exp(-unary[np.arange(len(labels)), labels]) >= min_confidence
        labels = np.where(sure | marked, labels, ignore_index)
    return labels[graph.segments]
