"""The superpixel graph of one training image (ScribbleSup, Lin et al., CVPR 2016, Sec. 3.1).

Nodes are superpixels, edges join superpixels that touch (4-neighbourhood). Each node
carries a colour histogram (per RGB channel) and a texture histogram (of the horizontal
and vertical grey-level gradients): 25 colour bins per channel and 10 gradient bins per
orientation, each histogram normalised (the counts ScribbleSup gives as we recall them; the
paper's text was not at hand to check), and an edge weighs a Gaussian of the two histogram
distances, w_ij = exp(-|hc_i - hc_j|^2 / dc^2 - |ht_i - ht_j|^2 / dt^2).
The paper's fixed bandwidths depend on its histogram scaling; here dc^2 and dt^2 are the
mean squared distances over the image's edges (the contrast-adaptive choice of GrabCut,
Rother et al., SIGGRAPH 2004), so an average edge gets weight exp(-2) whatever the image.
Superpixels are SLIC (Achanta et al., PAMI 2012) from scikit-image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.segmentation import slic

COLOUR_BINS = 25
TEXTURE_BINS = 10
GRADIENT_RANGE = 0.25  # texture bins span [-0.25, 0.25] of grey-level gradient (grey in [0, 1]); beyond is clipped


@dataclass
class SuperpixelGraph:
    """Superpixels of one image and the graph between them.

    Attributes:
        segments: (H, W) int32 superpixel id 0..S-1 of every pixel.
        colour: (S, 3 * COLOUR_BINS) colour histograms, each row summing to 1.
        texture: (S, 2 * TEXTURE_BINS) gradient histograms, each row summing to 1.
        edges: (E, 2) pairs i < j of touching superpixels.
        weights: (E,) similarities in (0, 1], exp(-dc2/mean(dc2) - dt2/mean(dt2)).
    """

    segments: np.ndarray
    colour: np.ndarray
    texture: np.ndarray
    edges: np.ndarray
    weights: np.ndarray

    @property
    def num_nodes(self) -> int:
        return len(self.colour)


def _histograms(segments: np.ndarray, values: np.ndarray, bins: int, lo: float, hi: float, count: int) -> np.ndarray:
    """(S, bins) histogram of ``values`` (H, W) per superpixel, each row summing to 1."""
    index = np.clip(((values - lo) / (hi - lo) * bins).astype(np.int64), 0, bins - 1)
    hist = np.bincount((segments * bins + index).ravel(), minlength=count * bins).reshape(count, bins)
    return hist / np.maximum(hist.sum(1, keepdims=True), 1)


def touching_pairs(segments: np.ndarray) -> np.ndarray:
    """(E, 2) unique pairs i < j of labels that are 4-neighbours somewhere in ``segments`` (H, W)."""
    pairs = [np.stack([segments[:, :-1].ravel(), segments[:, 1:].ravel()], 1),
             np.stack([segments[:-1, :].ravel(), segments[1:, :].ravel()], 1)]
    pairs = np.concatenate(pairs)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    return np.unique(np.sort(pairs, 1), axis=0)


def build_superpixel_graph(image: np.ndarray, superpixel_size: int = 100, compactness: float = 10.0) -> SuperpixelGraph:
    """Build the ScribbleSup graph of an RGB image (H, W, 3) uint8.

    Args:
        image: RGB image; a grey image (H, W) or (H, W, 1) is repeated to three channels.
        superpixel_size: Mean pixels per superpixel (SLIC gets H * W / superpixel_size seeds).
        compactness: SLIC's colour/space trade-off (higher: more regular superpixels).
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"image must be (H, W, 3) RGB or (H, W) grey, got shape {image.shape}")
    if superpixel_size < 1:
        raise ValueError(f"superpixel_size must be >= 1 pixel, got {superpixel_size}")
    rgb = np.repeat(image, 3, 2) if image.shape[2] == 1 else image
    rgb = rgb.astype(np.float64) / (65535.0 if rgb.dtype == np.uint16 else 255.0)
    h, w = rgb.shape[:2]
    n_segments = max(1, round(h * w / superpixel_size))
    segments = slic(rgb, n_segments=n_segments, compactness=compactness, start_label=0, enforce_connectivity=True)
    _, segments = np.unique(segments, return_inverse=True)  # ids 0..S-1 without gaps
    segments = segments.reshape(h, w).astype(np.int32)  # int32: graphs of a whole training set stay in memory
    count = int(segments.max()) + 1
    colour = np.concatenate([_histograms(segments, rgb[..., c], COLOUR_BINS, 0.0, 1.0 + 1e-9, count) for c in range(3)], 1) / 3
    grey = rgb.mean(2)
    gy, gx = np.gradient(grey)
    texture = np.concatenate([_histograms(segments, g, TEXTURE_BINS, -GRADIENT_RANGE, GRADIENT_RANGE, count) for g in (gx, gy)], 1) / 2
    edges = touching_pairs(segments)
    weights = histogram_similarity(colour, texture, edges)
    return SuperpixelGraph(segments=segments, colour=colour, texture=texture, edges=edges, weights=weights)


def histogram_similarity(colour: np.ndarray, texture: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(E,) exp(-dc2 / mean(dc2) - dt2 / mean(dt2)) for the squared histogram distances of each edge."""
    if len(edges) == 0:
        return np.zeros(0)
    i, j = edges[:, 0], edges[:, 1]
    dc2 = ((colour[i] - colour[j]) ** 2).sum(1)
    dt2 = ((texture[i] - texture[j]) ** 2).sum(1)
    return np.exp(-dc2 / max(dc2.mean(), 1e-12) - dt2 / max(dt2.mean(), 1e-12))


def superpixel_mean(segments: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(S, K) mean over each superpixel of per-pixel values (K, H, W)."""
    values = np.asarray(values, dtype=np.float64)
    k = values.shape[0]
    flat = segments.ravel()
    count = int(segments.max()) + 1
    sums = np.stack([np.bincount(flat, weights=values[c].ravel(), minlength=count) for c in range(k)], 1)
    return sums / np.maximum(np.bincount(flat, minlength=count), 1)[:, None]


def scribbled_superpixels(segments: np.ndarray, scribbles: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """(S,) class of the scribble crossing each superpixel, -1 where none does.

    A superpixel crossed by strokes of several classes takes the class with most stroke
    pixels in it (the paper assumes one; a superpixel straddling a boundary breaks that).
    """
    scribbles = np.asarray(scribbles)
    if scribbles.shape != segments.shape:
        raise ValueError(f"scribbles {scribbles.shape} must have the image's shape {segments.shape}")
    marked = scribbles != ignore_index
    bad = marked & ((scribbles < 0) | (scribbles >= num_classes))
    if bad.any():
        raise ValueError(
            f"scribbles hold value {int(scribbles[bad].flat[0])}, neither a class id in [0, {num_classes}) "
            f"nor ignore_index={ignore_index}"
        )
    count = int(segments.max()) + 1
    votes = np.bincount(segments[marked].astype(np.int64) * num_classes + scribbles[marked].astype(np.int64),
                        minlength=count * num_classes).reshape(count, num_classes)
    return np.where(votes.any(1), votes.argmax(1), -1)
