"""Scribbles: simulator, superpixel graph, Potts energy, alpha-expansion and ScribbleSup propagation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pixelwise.data.synthetic import make_synthetic_sample
from pixelwise.weak import (
    alpha_expansion,
    build_superpixel_graph,
    labelled_fraction,
    potts_energy,
    propagate_labels,
    simulate_scribbles,
)
from pixelwise.weak.superpixels import histogram_similarity, scribbled_superpixels, superpixel_mean, touching_pairs


# ---------------------------------------------------------------- simulator


def _shapes(i: int) -> tuple[np.ndarray, np.ndarray]:
    return make_synthetic_sample(np.random.default_rng(i), (64, 80), num_classes=4)


def test_strokes_lie_inside_their_class_region_and_skip_ignored_pixels():
    for i in range(3):
        _, mask = _shapes(i)
        mask[:6] = 255  # an unlabelled band
        scr = simulate_scribbles(mask, 255, density=0.7, width=5, seed=i)
        marked = scr != 255
        assert marked.any()
        assert (scr[marked] == mask[marked]).all()
        assert not marked[:6].any()


def test_every_region_of_at_least_min_area_gets_a_stroke_and_smaller_ones_none():
    mask = np.zeros((40, 40), np.uint8)
    mask[5:25, 5:25] = 1   # 400 px
    mask[30:33, 30:33] = 2  # 9 px
    mask[30:33, 5:8] = 1    # a second, small component of class 1
    scr = simulate_scribbles(mask, 255, density=0.3, min_area=10, seed=0)
    assert (scr[5:25, 5:25] == 1).any()
    assert (scr == 0).any()  # background (1182 px) is scribbled
    assert (scr[30:33, 30:33] == 255).all() and (scr[30:33, 5:8] == 255).all()


def test_one_pixel_wide_strokes_follow_the_skeleton():
    from skimage.morphology import skeletonize

    mask = np.zeros((30, 50), np.uint8)
    mask[8:22, 5:45] = 1
    scr = simulate_scribbles(mask, 255, density=1.0, width=1, seed=0)
    assert ((scr == 1) == skeletonize(mask == 1)).all()


def test_labelled_fraction_grows_with_density_and_width():
    _, mask = _shapes(0)
    fractions = [labelled_fraction(simulate_scribbles(mask, 255, density=d, seed=0)) for d in (0.1, 0.4, 1.0)]
    assert fractions[0] < fractions[1] < fractions[2]
    assert labelled_fraction(simulate_scribbles(mask, 255, width=1, seed=0)) < fractions[1] < labelled_fraction(
        simulate_scribbles(mask, 255, density=0.4, width=7, seed=0))
    assert 0 < fractions[2] < 0.5  # strokes, not masks


def test_scribbles_are_deterministic_by_seed():
    _, mask = _shapes(1)
    a, b = (simulate_scribbles(mask, 255, density=0.3, seed=7) for _ in range(2))
    assert (a == b).all()
    assert (a != simulate_scribbles(mask, 255, density=0.3, seed=8)).any()


@pytest.mark.parametrize("kwargs", [{"density": 0.0}, {"density": 1.5}, {"width": 0}])
def test_simulator_rejects_bad_options(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        simulate_scribbles(np.zeros((8, 8), np.uint8), **kwargs)


# ---------------------------------------------------------------- Potts energy and alpha-expansion


def _random_instance(rng, s, k, inf_share=0.0):
    unary = rng.random((s, k)) * 2
    edges = np.array([(i, j) for i in range(s) for j in range(i + 1, s) if rng.random() < 0.6], np.int64).reshape(-1, 2)
    weights = rng.random(len(edges)) * 1.5
    if inf_share:
        fixed = rng.random(s) < inf_share
        keep = rng.integers(k, size=s)
        unary[fixed] = np.inf
        unary[fixed, keep[fixed]] = 0.0
    return unary, edges, weights


def _brute_force(unary, edges, weights):
    s, k = unary.shape
    return min(potts_energy(np.array(y), unary, edges, weights) for y in itertools.product(range(k), repeat=s))


def test_potts_energy_by_hand():
    unary = np.array([[0.0, 1.0], [2.0, 0.5], [0.3, np.inf]])
    edges = np.array([[0, 1], [1, 2]])
    weights = np.array([0.7, 0.2])
    # y = (0, 1, 0): 0 + 0.5 + 0.3 + 0.7 [0 != 1] + 0.2 [1 != 0] = 1.7
    assert potts_energy(np.array([0, 1, 0]), unary, edges, weights) == pytest.approx(1.7)
    # y = (0, 0, 0): 0 + 2 + 0.3 = 2.3, no cut edge
    assert potts_energy(np.array([0, 0, 0]), unary, edges, weights) == pytest.approx(2.3)
    assert potts_energy(np.array([0, 0, 1]), unary, edges, weights) == np.inf


def test_alpha_expansion_is_exact_with_two_labels():
    """Two-label Potts is submodular; a labelling y that no 0- or 1-expansion improves is optimal, since
    f(y | y*) >= f(y), f(y & y*) >= f(y) and f(y | y*) + f(y & y*) <= f(y) + f(y*)."""
    rng = np.random.default_rng(0)
    for _ in range(25):
        unary, edges, weights = _random_instance(rng, 7, 2, inf_share=0.2)
        labels = alpha_expansion(unary, edges, weights)
        assert potts_energy(labels, unary, edges, weights) == pytest.approx(_brute_force(unary, edges, weights))


def test_alpha_expansion_is_a_local_minimum_of_every_expansion_move_within_twice_the_optimum():
    """What is guaranteed for K > 2 (Boykov, Veksler & Zabih 2001, Thm. 6.1 with c = 1 for Potts)."""
    rng = np.random.default_rng(1)
    for _ in range(12):
        unary, edges, weights = _random_instance(rng, 5, 3, inf_share=0.2)
        labels = alpha_expansion(unary, edges, weights)
        energy = potts_energy(labels, unary, edges, weights)
        for alpha in range(3):
            for switch in itertools.product((False, True), repeat=5):
                move = np.where(switch, alpha, labels)
                assert potts_energy(move, unary, edges, weights) >= energy - 1e-9
        assert energy <= 2 * _brute_force(unary, edges, weights) + 1e-9


def test_alpha_expansion_keeps_hard_constrained_nodes():
    # Node 0 may only be 2; its neighbours pull strongly towards 0.
    unary = np.array([[np.inf, np.inf, 0.0], [0.0, 5.0, 5.0], [0.0, 5.0, 5.0]])
    edges, weights = np.array([[0, 1], [0, 2], [1, 2]]), np.array([100.0, 100.0, 1.0])
    labels = alpha_expansion(unary, edges, weights)
    assert labels[0] == 2
    assert list(labels) == [2, 2, 2]  # 10 for the data terms beats 200 for two cut edges


def test_alpha_expansion_rejects_a_node_without_allowed_label():
    with pytest.raises(ValueError, match="node 1 has no allowed label"):
        alpha_expansion(np.array([[0.0, 1.0], [np.inf, np.inf]]), np.zeros((0, 2)), np.zeros(0))


# ---------------------------------------------------------------- superpixel graph


def test_touching_pairs_by_hand():
    segments = np.array([[0, 0, 1],
                         [2, 2, 1],
                         [2, 3, 3]])
    assert touching_pairs(segments).tolist() == [[0, 1], [0, 2], [1, 2], [1, 3], [2, 3]]


def test_histogram_similarity_by_hand():
    colour = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    texture = np.array([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]])
    edges = np.array([[0, 1], [0, 2]])
    # dc2 = (2, 0), mean 1; dt2 = (0, 0.5), mean 0.25 -> exp(-2), exp(-2)
    assert histogram_similarity(colour, texture, edges) == pytest.approx([np.exp(-2), np.exp(-2)])


def test_superpixel_graph_features_and_means():
    image, _ = _shapes(2)
    graph = build_superpixel_graph(image, superpixel_size=60)
    s = graph.num_nodes
    assert graph.segments.shape == image.shape[:2] and set(np.unique(graph.segments)) == set(range(s))
    assert np.allclose(graph.colour.sum(1), 1) and np.allclose(graph.texture.sum(1), 1)
    assert ((graph.weights > 0) & (graph.weights <= 1)).all()
    values = np.random.default_rng(0).random((2, *image.shape[:2]))
    means = superpixel_mean(graph.segments, values)
    for i in (0, s // 2, s - 1):
        assert means[i] == pytest.approx(values[:, graph.segments == i].mean(1))


def test_scribbled_superpixels_take_the_majority_class():
    segments = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3]])
    scribbles = np.full(segments.shape, 9)
    scribbles[0, 0], scribbles[0, 1], scribbles[1, 0] = 2, 1, 1
    scribbles[2, 3] = 0
    assert scribbled_superpixels(segments, scribbles, 3, 9).tolist() == [1, -1, -1, 0]
    scribbles[1, 1] = 5
    with pytest.raises(ValueError, match="value 5"):
        scribbled_superpixels(segments, scribbles, 3, 9)


# ---------------------------------------------------------------- propagation


def test_scribbled_superpixels_keep_their_class_against_the_network():
    image, mask = _shapes(3)
    graph = build_superpixel_graph(image, superpixel_size=60)
    scr = simulate_scribbles(mask, 255, density=0.5, seed=0)
    prob = np.full((4, *mask.shape), 0.01)
    prob[0] = 0.97  # a network sure that everything is background
    labels = propagate_labels(graph, scr, 4, 255, prob=prob, pairwise_weight=10.0)
    seeds = scribbled_superpixels(graph.segments, scr, 4, 255)
    for i in np.flatnonzero(seeds >= 0):
        assert (labels[graph.segments == i] == seeds[i]).all()
    assert (labels[~np.isin(graph.segments, np.flatnonzero(seeds >= 0))] == 0).mean() > 0.9


def _two_flat_regions() -> np.ndarray:
    """(40, 60, 3) image: red left half, blue right half, light noise."""
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, :30] = (200, 30, 30)
    image[:, 30:] = (30, 30, 200)
    image = np.clip(image + np.random.default_rng(0).normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    return image


def test_round_one_propagation_fills_two_flat_regions_from_one_stroke_each():
    image = _two_flat_regions()
    mask = np.zeros((40, 60), np.uint8)
    mask[:, 30:] = 1
    scr = np.full(mask.shape, 255, np.uint8)
    scr[20, 10:15], scr[20, 45:50] = 0, 1
    labels = propagate_labels(build_superpixel_graph(image, superpixel_size=40), scr, 2, 255)
    assert (labels == mask).mean() > 0.98


def test_min_confidence_leaves_unsure_unmarked_superpixels_unlabelled():
    image = _two_flat_regions()
    scr = np.full((40, 60), 255, np.uint8)
    scr[20, 10:15], scr[20, 45:50] = 0, 1
    prob = np.empty((2, 40, 60))
    prob[:, :, :30] = np.array([0.9, 0.1])[:, None, None]  # sure of the left half
    prob[:, :, 30:] = np.array([0.45, 0.55])[:, None, None]  # unsure of the right half
    graph = build_superpixel_graph(image, superpixel_size=40)
    scribbled = np.isin(graph.segments, np.flatnonzero(scribbled_superpixels(graph.segments, scr, 2, 255) == 1))
    full = propagate_labels(graph, scr, 2, 255, prob=prob)
    assert (full[:, :30] == 0).all() and (full[:, 30:] == 1).all()
    sure = propagate_labels(graph, scr, 2, 255, prob=prob, min_confidence=0.6)
    assert (sure[:, :30] == 0).all()
    assert (sure[scribbled] == 1).all() and (sure[:, 30:][~scribbled[:, 30:]] == 255).all()
    with pytest.raises(ValueError, match="min_confidence"):
        propagate_labels(graph, scr, 2, 255, prob=prob, min_confidence=1.5)


# ---------------------------------------------------------------- regularized loss


def _direct_crf(prob, image, radius, sigma_xy, sigma_rgb):
    """sum over ordered pairs within the window of W_pq (1 - S_p . S_q) / (H W), one pixel pair at a time."""
    _, h, w = prob.shape
    total = 0.0
    for y, x, v, u in itertools.product(range(h), range(w), range(h), range(w)):
        if (y, x) == (v, u) or max(abs(y - v), abs(x - u)) > radius:
            continue
        kernel = np.exp(-((y - v) ** 2 + (x - u) ** 2) / (2 * sigma_xy**2)
                        - ((image[:, y, x] - image[:, v, u]) ** 2).sum() / (2 * sigma_rgb**2))
        total += kernel * (1 - (prob[:, y, x] * prob[:, v, u]).sum())
    return total / (h * w)


def test_windowed_crf_energy_and_gradient_match_a_direct_computation():
    import torch

    from pixelwise.weak.regularized import windowed_crf_energy

    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(1, 3, 5, 6)), requires_grad=True)
    image = torch.tensor(rng.random((1, 3, 5, 6)))
    prob = logits.softmax(1)
    energy = windowed_crf_energy(prob, image, radius=2, sigma_xy=1.5, sigma_rgb=0.3)
    p, im = prob[0].detach().numpy(), image[0].numpy()
    assert energy.item() == pytest.approx(_direct_crf(p, im, 2, 1.5, 0.3), rel=1e-10)
    # dR/dS_k(p) = 2 sum_q W_pq (-S_k(q)) / (H W) (W symmetric, each ordered pair counted): check w.r.t. S.
    s = prob.detach().clone().requires_grad_(True)
    windowed_crf_energy(s, image, 2, 1.5, 0.3).sum().backward()
    grad = np.zeros_like(p)
    _, h, w = p.shape
    for y, x, v, u in itertools.product(range(h), range(w), range(h), range(w)):
        if (y, x) != (v, u) and max(abs(y - v), abs(x - u)) <= 2:
            kernel = np.exp(-((y - v) ** 2 + (x - u) ** 2) / (2 * 1.5**2) - ((im[:, y, x] - im[:, v, u]) ** 2).sum() / (2 * 0.3**2))
            grad[:, y, x] += -2 * kernel * p[:, v, u] / (h * w)
    assert s.grad[0].numpy() == pytest.approx(grad, rel=1e-9, abs=1e-12)


def test_regularized_loss_is_partial_ce_plus_weighted_regularizer_and_prefers_edge_aligned_labels():
    import torch

    from pixelwise.losses import PartialCrossEntropyLoss
    from pixelwise.weak.regularized import RegularizedLoss

    image = torch.zeros(1, 3, 8, 8)
    image[:, :, :, 4:] = 1.0  # two flat halves
    target = torch.full((1, 8, 8), 255)
    target[0, 3, 1], target[0, 3, 6] = 0, 1
    loss = RegularizedLoss(weight=0.7, scale=1.0, radius=2, sigma_xy=2.0, sigma_rgb=0.1)
    aligned = torch.full((1, 2, 8, 8), -4.0)
    aligned[:, 0, :, :4] = aligned[:, 1, :, 4:] = 4.0
    across = torch.full((1, 2, 8, 8), -4.0)
    across[:, 0, :4] = across[:, 1, 4:] = 4.0
    across[0, :, 3, 1], across[0, :, 3, 6] = aligned[0, :, 3, 1], aligned[0, :, 3, 6]  # same scribble CE
    ce = PartialCrossEntropyLoss(255)
    for logits in (aligned, across):
        assert loss(logits, target, image).item() == pytest.approx(
            ce(logits, target).item() + 0.7 * loss.regularizer(logits, image).item())
    assert loss.regularizer(aligned, image) < 0.1 * loss.regularizer(across, image)
    # The regulariser is the windowed energy over the spatial kernel's mass in the 5 x 5 window (centre left out).
    from pixelwise.weak.regularized import windowed_crf_energy

    mass = sum(np.exp(-(dy * dy + dx * dx) / 8) for dy in range(-2, 3) for dx in range(-2, 3)) - 1
    energy = windowed_crf_energy(across.softmax(1), image, 2, 2.0, 0.1).mean().item()
    assert loss.regularizer(across, image).item() == pytest.approx(energy / mass)
