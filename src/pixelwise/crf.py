"""Dense CRF refinement of soft predictions (Krahenbuhl & Koltun, NeurIPS 2011).

The fully connected CRF over the pixels of one image has the energy

    E(x) = sum_i U_i(x_i) + sum_{i<j} mu(x_i, x_j) k(f_i, f_j),
    U_i(l) = -log P_i(l),  mu(l, l') = [l != l'] (Potts),
    k = w1 * exp(-|p_i - p_j|^2 / (2 theta_a^2) - |I_i - I_j|^2 / (2 theta_b^2))   (appearance)
      + w2 * exp(-|p_i - p_j|^2 / (2 theta_g^2))                                    (smoothness)

with p the pixel position and I the RGB colour. Mean-field inference with the
permutohedral lattice is delegated to ``pydensecrf`` (``pip install "pixelwise[crf]"``),
imported only when :func:`dense_crf` runs.

Kernel normalisation: ``w1`` and ``w2`` are passed unchanged as pydensecrf's Potts
``compat`` with its default ``NORMALIZE_SYMMETRIC``, the convention of the authors'
released code that DeepLab v1/v2 used to tune the presets below. A mean-field step is
then ``Q_i(l) ~ exp(-U_i(l) + sum_m w_m [D_m^-1/2 K_m D_m^-1/2 Q](i, l))`` with ``K_m`` the
Gaussian kernel matrix (its ``i == j`` entry included) and ``D_m`` its row sums: each
weight multiplies a normalised, average-like message, not the raw kernel sum of the
paper's formula (which for ``theta_g = 3`` is about 56 times larger). Measured against an
exact O(N^2) mean field (tests/test_crf.py), ``compat = w`` under this normalisation
reproduces the marginals to within 0.01 after one step; without normalisation
(``NO_NORMALIZATION``) the lattice returns about 0.84x the exact Gaussian sum for the 2-D
smoothness kernel and about 0.5x for the 5-D appearance kernel, so ``compat`` would not
equal the paper's raw ``w`` there either.
"""

from __future__ import annotations

import numpy as np

PRESETS: dict[str, dict[str, float | int]] = {
    "krahenbuhl": {"w1": 10.0, "theta_a": 80.0, "theta_b": 13.0, "w2": 3.0, "theta_g": 3.0, "iterations": 5},
    "deeplab_v1": {"w1": 4.0, "theta_a": 121.0, "theta_b": 5.0, "w2": 3.0, "theta_g": 3.0, "iterations": 10},
    "deeplab_v2": {"w1": 4.0, "theta_a": 67.0, "theta_b": 3.0, "w2": 3.0, "theta_g": 1.0, "iterations": 10},
}
"""Parameters (w1, theta_a, theta_b, w2, theta_g, iterations): the authors' example and
the values DeepLab v1 (LargeFOV) and v2 (ResNet-101) report."""

_PROB_FLOOR = 1e-8


def dense_crf(
    image: np.ndarray,
    probs: np.ndarray,
    *,
    preset: str | None = "deeplab_v2",
    w1: float | None = None,
    theta_a: float | None = None,
    theta_b: float | None = None,
    w2: float | None = None,
    theta_g: float | None = None,
    iterations: int | None = None,
) -> np.ndarray:
    """Refine per-pixel class probabilities with a fully connected CRF.

    Args:
        image: uint8 image (H, W, 3); grey (H, W) or (H, W, 1) is repeated to 3 channels.
        probs: class probabilities (K, H, W), K >= 2, summing to 1 over K (softmax output,
            not logits). The unary is ``-log(max(probs, 1e-8))``.
        preset: ``"deeplab_v2"`` (default), ``"deeplab_v1"``, ``"krahenbuhl"`` (the authors'
            example) or None; see :data:`PRESETS`. With None every parameter must be given.
        w1: weight of the appearance (bilateral) kernel.
        theta_a: spatial standard deviation of the appearance kernel, in pixels.
        theta_b: colour standard deviation of the appearance kernel, in intensity levels.
        w2: weight of the smoothness (spatial Gaussian) kernel.
        theta_g: spatial standard deviation of the smoothness kernel, in pixels.
        iterations: number of mean-field iterations.

    Explicit parameters override the preset's. See the module docstring for how ``w1``
    and ``w2`` scale the (normalised) kernels.

    Returns:
        Refined marginals (K, H, W) float32, summing to 1 over K.

    Example:
        >>> labels = dense_crf(rgb_uint8, softmax_probs, preset="deeplab_v1").argmax(0)
    """
    params = _resolve_params(preset, w1=w1, theta_a=theta_a, theta_b=theta_b, w2=w2, theta_g=theta_g,
                             iterations=iterations)
    rgb = _as_rgb(image)
    p = _as_probs(probs, rgb.shape[:2])
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as err:
        raise ImportError(
            'dense_crf needs the optional dependency pydensecrf; install it with: pip install "pixelwise[crf]"'
        ) from err

    num_classes, height, width = p.shape
    unary = -np.log(np.maximum(p, _PROB_FLOOR)).reshape(num_classes, -1)
    crf = dcrf.DenseCRF2D(width, height, num_classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params["theta_g"], compat=params["w2"])
    crf.addPairwiseBilateral(sxy=params["theta_a"], srgb=params["theta_b"], rgbim=rgb, compat=params["w1"])
    q = np.array(crf.inference(int(params["iterations"])), dtype=np.float32)
    return q.reshape(num_classes, height, width)


def _resolve_params(preset: str | None, **given: float | int | None) -> dict[str, float | int]:
    """Merge explicit parameters over a preset and validate them."""
    if preset is None:
        base: dict[str, float | int] = {}
    elif preset in PRESETS:
        base = dict(PRESETS[preset])
    else:
        raise ValueError(f"preset must be one of {sorted(PRESETS)} or None, got {preset!r}.")
    base.update({name: value for name, value in given.items() if value is not None})
    missing = [name for name in given if name not in base]
    if missing:
        raise ValueError(f"preset=None needs every CRF parameter; missing {missing}. Pass them or choose a preset.")
    for name in ("theta_a", "theta_b", "theta_g"):
        if not base[name] > 0:
            raise ValueError(f"{name} must be > 0 (a standard deviation), got {base[name]!r}.")
    for name in ("w1", "w2"):
        if not base[name] >= 0:
            raise ValueError(f"{name} must be >= 0 (a kernel weight), got {base[name]!r}.")
    its = base["iterations"]
    if isinstance(its, bool) or not isinstance(its, (int, np.integer)) or its < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {its!r}.")
    return base


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """Return a C-contiguous uint8 (H, W, 3) copy/view of a grey or RGB image."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(
            f"image must be uint8 (H, W, 3), got dtype {img.dtype}; convert with "
            "np.clip(img * 255, 0, 255).astype(np.uint8) for a [0, 1] float image."
        )
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3), (H, W, 1) or (H, W), got {img.shape}.")
    return np.ascontiguousarray(img)


def _as_probs(probs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Validate (K, H, W) probabilities against the image size; return float32."""
    p = np.asarray(probs, dtype=np.float32)
    if p.ndim != 3:
        raise ValueError(f"probs must have shape (K, H, W), got {p.shape}; drop the batch dimension of (1, K, H, W).")
    if p.shape[0] < 2:
        raise ValueError(
            f"probs must have K >= 2 classes, got K={p.shape[0]}; "
            "for a binary sigmoid output p use np.stack([1 - p, p])."
        )
    if p.shape[1:] != tuple(size):
        raise ValueError(f"probs (K, H, W) = {p.shape} must match the image's (H, W) = {tuple(size)}.")
    if not np.isfinite(p).all() or p.min() < 0 or p.max() > 1 or not np.allclose(p.sum(0), 1.0, atol=1e-3):
        raise ValueError("probs must be probabilities in [0, 1] summing to 1 over K; apply softmax to logits first.")
    return p
