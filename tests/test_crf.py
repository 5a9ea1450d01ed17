"""Dense CRF: pydensecrf backend against a naive exact mean-field reference.

The `crf` extra is part of the `test` extra, so a missing pydensecrf fails these tests instead of skipping them.
"""

from __future__ import annotations

import numpy as np
import pytest

from pixelwise.crf import PRESETS, dense_crf

PALETTE = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], dtype=np.uint8)


def scene(height: int = 10, width: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """A piecewise-constant RGB image (H, W, 3) uint8 and its true labels (H, W)."""
    truth = np.zeros((height, width), dtype=np.int64)
    truth[:, 4:8] = 1
    truth[:, 8:] = 2
    truth[:3, :] = 0
    return PALETTE[truth], truth


def noisy_probs(truth: np.ndarray, num_classes: int = 3, seed: int = 0) -> np.ndarray:
    """Softmax of (truth one-hot + Gaussian noise): about 40 % of the argmax labels are wrong."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.3, (num_classes, *truth.shape))
    rows, cols = np.indices(truth.shape)
    logits[truth, rows, cols] += 1.0
    e = np.exp(logits - logits.max(0))
    return (e / e.sum(0)).astype(np.float32)


def naive_mean_field(image, probs, *, w1, theta_a, theta_b, w2, theta_g, iterations, include_self=True):
    """Exact O(N^2) mean field for the fully connected Potts CRF, float64.

    Kernel (per term m): k_m(i, j) = exp(-|p_i - p_j|^2 / (2 theta^2) [- |I_i - I_j|^2 / (2 theta_b^2)]),
    normalised symmetrically, D^-1/2 K D^-1/2 with D the row sums (i == j included), as
    pydensecrf's default NORMALIZE_SYMMETRIC does. Mean-field update with mu(l, l') = [l != l']:
        Q_i(l) ~ exp(-U_i(l) - sum_m w_m sum_{j} k_m(i, j) sum_{l' != l} Q_j(l'))
               = exp(-U_i(l) - sum_m w_m sum_{j} k_m(i, j) (1 - Q_j(l))).
    ``include_self=False`` drops j == i from the message sum (the paper's formula);
    ``True`` keeps it, as the permutohedral lattice does.
    """
    num_classes, height, width = probs.shape
    ys, xs = np.mgrid[:height, :width]
    pos = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)
    rgb = image.reshape(-1, 3).astype(np.float64)
    d_pos = ((pos[:, None] - pos[None]) ** 2).sum(-1)
    d_rgb = ((rgb[:, None] - rgb[None]) ** 2).sum(-1)
    pairwise = np.zeros_like(d_pos)
    for weight, kernel in (
        (w1, np.exp(-d_pos / (2 * theta_a**2) - d_rgb / (2 * theta_b**2))),
        (w2, np.exp(-d_pos / (2 * theta_g**2))),
    ):
        inv_sqrt = kernel.sum(1) ** -0.5
        kernel = inv_sqrt[:, None] * kernel * inv_sqrt[None]
        if not include_self:
            np.fill_diagonal(kernel, 0.0)
        pairwise += weight * kernel
    unary = -np.log(np.maximum(probs.reshape(num_classes, -1).astype(np.float64), 1e-8))
    q = np.exp(-unary)
    q /= q.sum(0)
    for _ in range(iterations):
        energy = unary + (pairwise @ (1.0 - q).T).T
        q = np.exp(-(energy - energy.min(0)))
        q /= q.sum(0)
    return q.reshape(num_classes, height, width)


WEAK = {"w1": 1.0, "theta_a": 10.0, "theta_b": 30.0, "w2": 1.0, "theta_g": 2.0, "iterations": 1}
"""One mean-field step with small weights: marginals stay far from 0/1, so the scale of w1/w2 shows."""


def test_presets_are_the_reference_table():
    assert PRESETS["krahenbuhl"] == {"w1": 10, "theta_a": 80, "theta_b": 13, "w2": 3, "theta_g": 3, "iterations": 5}
    assert PRESETS["deeplab_v1"] == {"w1": 4, "theta_a": 121, "theta_b": 5, "w2": 3, "theta_g": 3, "iterations": 10}
    assert PRESETS["deeplab_v2"] == {"w1": 4, "theta_a": 67, "theta_b": 3, "w2": 3, "theta_g": 1, "iterations": 10}


# (parameters, seed, max |Q_backend - Q_naive| allowed); measured maxima (include_self=True):
# krahenbuhl 0.0004, deeplab_v1 0.06 / 0.14 (seeds 0 / 2), deeplab_v2 0.03, weak 0.005-0.007.
CASES = [
    (PRESETS["krahenbuhl"], 0, 0.02),
    (PRESETS["deeplab_v1"], 0, 0.15),
    (PRESETS["deeplab_v1"], 2, 0.2),
    (PRESETS["deeplab_v2"], 0, 0.1),
    (PRESETS["deeplab_v2"], 2, 0.1),
    (WEAK, 0, 0.02),
    (WEAK, 1, 0.02),
]


@pytest.mark.parametrize(("params", "seed", "tol"), CASES)
def test_matches_naive_mean_field_and_fixes_noise(params, seed, tol):
    image, truth = scene()
    probs = noisy_probs(truth, seed=seed)
    out = dense_crf(image, probs, preset=None, **params)
    ref = naive_mean_field(image, probs, **params)
    assert out.shape == probs.shape and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)
    agreement = (out.argmax(0) == ref.argmax(0)).mean()
    assert agreement >= 0.98
    assert np.abs(out - ref).max() <= tol
    unary_errors = (probs.argmax(0) != truth).sum()
    crf_errors = (out.argmax(0) != truth).sum()
    assert unary_errors >= 40
    assert crf_errors < unary_errors
    if params is not WEAK:
        assert crf_errors <= 0.15 * unary_errors


def test_paper_kernel_without_self_term_agrees_on_labels():
    """The paper's sum over j != i differs from the lattice (which keeps i == j) only slightly."""
    image, truth = scene()
    for seed in range(3):
        probs = noisy_probs(truth, seed=seed)
        for name in ("deeplab_v1", "deeplab_v2"):
            out = dense_crf(image, probs, preset=name)
            ref = naive_mean_field(image, probs, **PRESETS[name], include_self=False)
            assert (out.argmax(0) == ref.argmax(0)).mean() >= 0.95
            assert np.abs(out - ref).max() <= 0.2


def test_weights_are_passed_unscaled():
    """Halving or doubling w1/w2 in the reference moves the marginals well beyond the tolerance used above."""
    image, truth = scene()
    probs = noisy_probs(truth, seed=0)
    out = dense_crf(image, probs, preset=None, **WEAK)
    for factor in (0.5, 2.0):
        scaled = dict(WEAK, w1=WEAK["w1"] * factor, w2=WEAK["w2"] * factor)
        assert np.abs(out - naive_mean_field(image, probs, **scaled)).max() > 0.04
    swapped = dict(WEAK, w1=0.2, w2=2.0)
    out_swapped = dense_crf(image, probs, preset=None, **swapped)
    assert np.abs(out_swapped - naive_mean_field(image, probs, **swapped)).max() <= 0.02
    assert np.abs(out_swapped - naive_mean_field(image, probs, **dict(swapped, w1=2.0, w2=0.2))).max() > 0.04


def test_explicit_arguments_override_preset():
    image, truth = scene()
    probs = noisy_probs(truth, seed=1)
    overridden = dense_crf(image, probs, preset="krahenbuhl", iterations=1, w2=0.0)
    explicit = dense_crf(image, probs, preset=None, w1=10, theta_a=80, theta_b=13, w2=0.0, theta_g=3, iterations=1)
    np.testing.assert_array_equal(overridden, explicit)
    assert np.abs(overridden - dense_crf(image, probs, preset="krahenbuhl")).max() > 0.05


def test_grey_image_is_repeated_to_rgb():
    grey = np.array([[10, 10, 200, 200]] * 3, dtype=np.uint8)
    probs = noisy_probs(np.array([[0, 0, 1, 1]] * 3), num_classes=2, seed=3)
    rgb_out = dense_crf(np.repeat(grey[:, :, None], 3, axis=2), probs)
    np.testing.assert_array_equal(dense_crf(grey, probs), rgb_out)
    np.testing.assert_array_equal(dense_crf(grey[:, :, None], probs), rgb_out)


def test_missing_backend_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    image, truth = scene()
    with pytest.raises(ImportError, match=r'pip install "pixelwise\[crf\]"'):
        dense_crf(image, noisy_probs(truth))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image": np.zeros((10, 11, 3), np.uint8)}, r"must match the image's \(H, W\) = \(10, 11\)"),
        ({"probs": np.ones((1, 10, 12), np.float32)}, "K >= 2"),
        ({"probs": np.full((3, 10, 12), 2.0, np.float32)}, "apply softmax"),
        ({"probs": np.full((1, 3, 10, 12), 1 / 3, np.float32)}, r"\(K, H, W\)"),
        ({"image": np.zeros((10, 12, 3), np.float32)}, "uint8"),
        ({"image": np.zeros((10, 12, 4), np.uint8)}, r"\(H, W, 3\)"),
        ({"preset": "deeplab"}, "preset must be one of"),
        ({"preset": None, "w1": 1.0}, "missing"),
        ({"theta_b": 0.0}, "theta_b must be > 0"),
        ({"w2": -1.0}, "w2 must be >= 0"),
        ({"iterations": 0}, "iterations must be an integer >= 1"),
        ({"iterations": 2.5}, "iterations must be an integer >= 1"),
    ],
)
def test_invalid_input_raises_clear_error(kwargs, match):
    image, truth = scene()
    args = {"image": image, "probs": noisy_probs(truth)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dense_crf(args.pop("image"), args.pop("probs"), **args)
