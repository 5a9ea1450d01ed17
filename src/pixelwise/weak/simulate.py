"""Simulated scribbles: a few strokes per class region, drawn from a dense mask.

ScribbleSup (Lin et al., CVPR 2016, Sec. 4) annotates each object and stuff region with
free-hand strokes roughly along its middle. We stand in for the annotator with the
region's medial axis: each connected component of each class is skeletonised
(``skimage.morphology.skeletonize``), a contiguous piece of that skeleton (``density`` of
its length) is kept, widened to ``width`` pixels and clipped to the region, so every
stroke pixel lies inside a region of its own class.

Example:
    >>> scribbles = simulate_scribbles(mask, ignore_index=255, density=0.5, seed=0)
    >>> labelled_fraction(scribbles, 255)
"""

from __future__ import annotations

from collections import deque

import numpy as np
from scipy import ndimage
from skimage.morphology import disk, skeletonize

_EIGHT = np.ones((3, 3), bool)


def _stroke_along(skeleton: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """A connected piece of ``length`` pixels of a (small, cropped) skeleton, grown from a random pixel."""
    ys, xs = np.nonzero(skeleton)
    start = int(rng.integers(len(ys)))
    keep = np.zeros_like(skeleton)
    queue = deque([(ys[start], xs[start])])
    keep[ys[start], xs[start]] = True
    taken = 1
    h, w = skeleton.shape
    while queue and taken < length:
        y, x = queue.popleft()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                v, u = y + dy, x + dx
                if 0 <= v < h and 0 <= u < w and skeleton[v, u] and not keep[v, u] and taken < length:
                    keep[v, u] = True
                    taken += 1
                    queue.append((v, u))
    return keep


def simulate_scribbles(
    mask: np.ndarray,
    ignore_index: int = 255,
    density: float = 0.5,
    width: int = 3,
    min_area: int = 0,
    seed: int | np.random.Generator = 0,
) -> np.ndarray:
    """Scribbles (H, W) from a dense label map (H, W): class id on stroke pixels, ignore elsewhere.

    Args:
        mask: Dense class ids; ``ignore_index`` pixels belong to no class and get no stroke.
        ignore_index: Value of unmarked pixels in the result (and of unlabelled ones in ``mask``).
        density: Fraction (0, 1] of each region's skeleton covered by its stroke.
        width: Stroke width in pixels (a disk of diameter ``width`` swept along the stroke).
        min_area: Regions (connected components) smaller than this many pixels get no stroke,
            as an annotator skips specks.
        seed: Seed or generator; the same seed gives the same scribbles.

    Returns:
        Array of ``mask``'s dtype: class id on stroke pixels, ``ignore_index`` elsewhere.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be a (H, W) label map, got shape {mask.shape}")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if width < 1:
        raise ValueError(f"width must be >= 1 pixel, got {width}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    out = np.full(mask.shape, ignore_index, dtype=mask.dtype)
    brush = disk((width - 1) / 2) > 0 if width > 1 else np.ones((1, 1), bool)
    pad = brush.shape[0] // 2 + 1
    for cls in np.unique(mask):
        if cls == ignore_index:
            continue
        components, count = ndimage.label(mask == cls, structure=_EIGHT)
        for index, box in enumerate(ndimage.find_objects(components), start=1):
            # Work on the component's bounding box (plus room for the brush) only.
            y0, x0 = max(box[0].start - pad, 0), max(box[1].start - pad, 0)
            crop = (slice(y0, box[0].stop + pad), slice(x0, box[1].stop + pad))
            region = components[crop] == index
            area = int(region.sum())
            if area < max(min_area, 1):
                continue
            skeleton = skeletonize(region)
            if not skeleton.any():  # a one- or two-pixel speck: its own skeleton
                skeleton = region
            length = max(1, int(np.ceil(density * skeleton.sum())))
            stroke = _stroke_along(skeleton, length, rng)
            stroke = ndimage.binary_dilation(stroke, structure=brush) & region
            out[crop][stroke] = cls
    return out


def labelled_fraction(scribbles: np.ndarray, ignore_index: int = 255) -> float:
    """Fraction of pixels of a scribble map that carry a class."""
    scribbles = np.asarray(scribbles)
    return float((scribbles != ignore_index).mean()) if scribbles.size else 0.0
