"""Prediction on images of any size: sliding window / overlap-tile, strip-wise labels, TTA.

Images (N, C, H, W) and volumes (N, C, D, H, W) share one N-D tiling: a run is 3D when
``tile`` has three sides or the model has ``spatial_dims = 3`` (the 3D U-Net).

All entry points return probabilities, not logits: softmax over the K channels, or a
sigmoid when the model has a single output channel (K == 1, binary / edge models).
Put the model in eval mode (``model.eval()``) and on the image's device before calling;
these functions never change the model's mode. Model calls run under
``torch.inference_mode``; the returned tensors are ordinary tensors.

Two kinds of model are supported:

- "same" models (the package convention): ``model(x)`` maps (B, C, h, w) to
  (B, K, h, w) logits.
- valid-convolution models (the original U-Net, 572x572 in -> 388x388 out): a model
  with an integer attribute ``valid_margin`` (pixels lost on each side, 92 for the
  original U-Net; or one int per spatial axis, e.g. (14, 44, 44) for the anisotropic
  3D U-Net) and a method ``forward_valid(x)`` is run through ``forward_valid``; an
  input tile of size ``tile`` yields an output of size ``tile - 2 * valid_margin`` that
  is placed at the tile's centre, and the image is mirror-padded by the margin (the
  overlap-tile strategy of the U-Net paper). ``tile`` is always the model's input size.
  Every output pixel then sees real or mirrored context, never zero padding; with
  max-pooling, a pixel's value still depends on the tile's offset modulo the network's
  total stride (16 for the U-Net), so the result equals one whole-image pass only when
  window steps and the snapped last window are multiples of it (e.g. a 100-pixel image,
  tile 220 -> 36 outputs, step 32); otherwise overlapping tiles average the phases.
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pixelwise.models.layers import mirror_pad, reflect_index, resize_to

if TYPE_CHECKING:
    from pixelwise.data.transforms import ToTensor

BLEND_MODES = ("gaussian", "constant")
PAD_MODES = ("reflect", "constant")


# ---------------------------------------------------------------------------------------
# Tiling plan: window positions, padding, importance map (shared by every entry point)
# ---------------------------------------------------------------------------------------


def window_starts(size: int, window: int, step: int) -> list[int]:
    """Start offsets of windows of length ``window`` that cover ``[0, size)``, ``size >= window``.

    Starts advance by ``step``; the last window is snapped to end exactly at ``size``.
    Example: ``window_starts(10, 4, 3) == [0, 3, 6]``, ``window_starts(11, 4, 3) == [0, 3, 6, 7]``.
    """
    return [*range(0, size - window, step), size - window]


def importance_map(
    height: int,
    width: int,
    blend: str = "gaussian",
    sigma_scale: float = 0.125,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-pixel blending weight (height, width) of one output tile, float64.

    ``"constant"``: all ones. ``"gaussian"``: separable Gaussian centred on the tile,
    sigma = ``sigma_scale`` * side (at least 1e-3), peak 1, clamped to >= 1e-3 so that every
    pixel keeps a non-zero weight. :func:`importance_map_nd` is the same for any number of axes.
    """
    return importance_map_nd((height, width), blend, sigma_scale, device)


def importance_map_nd(
    sizes: Sequence[int],
    blend: str = "gaussian",
    sigma_scale: float = 0.125,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Blending weight of one output tile of shape ``sizes`` (e.g. (D, H, W)), float64; see :func:`importance_map`."""
    if blend == "constant":
        return torch.ones(*sizes, dtype=torch.float64, device=device)
    weight = torch.ones((), dtype=torch.float64, device=device)
    for n in sizes:
        sigma = max(sigma_scale * n, 1e-3)
        x = torch.arange(n, dtype=torch.float64, device=device) - (n - 1) / 2
        weight = weight[..., None] * torch.exp(-(x**2) / (2 * sigma**2))
    return weight.clamp_(min=1e-3)


def _source_index(
    start: int, length: int, size: int, pad: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Image indices for padded coordinates ``start .. start + length - 1`` (may be < 0 or >= size).

    ``"reflect"`` mirrors without repeating the edge (numpy's ``reflect``, repeated for
    pads larger than the image; a size-1 axis is replicated; :func:`reflect_index`).
    ``"constant"`` returns clamped indices and a mask of the positions inside the image
    (outside ones read 0).
    """
    idx = torch.arange(start, start + length, device=device)
    if pad == "constant":
        inside = (idx >= 0) & (idx < size)
        return idx.clamp(0, size - 1), inside
    return reflect_index(idx, size), None


@dataclass(frozen=True)
class _Axis:
    """Tiling of one image axis: sizes in output ("core") coordinates."""

    size: int  # image side
    out: int  # model output tile side = tile - 2 * margin
    margin: int
    step: int
    lead: int  # padding before the image so the core (>= out) is covered by output tiles
    core: int  # padded side in output coordinates: max(size, out)

    @classmethod
    def plan(cls, size: int, tile: int, margin: int, overlap: float) -> _Axis:
        out = tile - 2 * margin
        core = max(size, out)
        return cls(size, out, margin, max(1, int(out * (1 - overlap))), (core - size) // 2, core)

    def starts(self) -> list[int]:
        return window_starts(self.core, self.out, self.step)

    def source(
        self, core_start: int, length: int, pad: str, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image indices of the input pixels for core positions ``core_start - margin ..``."""
        return _source_index(core_start - self.margin - self.lead, length, self.size, pad, device)


class _StripAccumulator:
    """Blending buffer for one slab of output along the first spatial axis.

    probs (N, K, rows, *rest) and weight (rows, *rest), where ``rows = out`` tile side along
    the first axis (rows of an image, sections of a volume) and ``rest`` the padded sizes of
    the other axes. It holds ``rows`` core positions starting at ``top``; finished ones are
    popped from the top and the buffer slides on, so its size never depends on the image's
    extent along the first axis.
    """

    def __init__(self, n: int, k: int, weight: torch.Tensor, rest: Sequence[int]) -> None:
        rows = weight.shape[0]
        self.tile_weight = weight
        self.probs = weight.new_zeros(n, k, rows, *rest)
        self.weight = weight.new_zeros(rows, *rest)
        self.top = 0

    def _window(self, corner: Sequence[int]) -> tuple[slice, ...]:
        """Buffer slices of the output tile whose core corner is ``corner`` = (top, *rest)."""
        shifted = (corner[0] - self.top, *corner[1:])
        return tuple(slice(c, c + t) for c, t in zip(shifted, self.tile_weight.shape))

    def add_window(self, corner: Sequence[int]) -> None:
        """Count the window at core ``corner`` once in the weight sum (shared by the N images)."""
        self.weight[self._window(corner)] += self.tile_weight

    def add(self, probs: torch.Tensor, n: int, corner: Sequence[int]) -> None:
        """Add one output tile's probabilities (K, *tile) of image ``n`` at core ``corner``, weighted."""
        self.probs[(n, slice(None), *self._window(corner))] += probs * self.tile_weight

    def blend(self, rows: int) -> torch.Tensor:
        """Divide the first ``rows`` rows by their weight, in place; returns them (N, K, rows, *rest), a view."""
        done = self.probs[:, :, :rows]
        done /= self.weight[:rows]
        return done

    def slide(self, rows: int) -> None:
        """Drop the first ``rows`` rows and move the rest up (no copy of the whole buffer unless they overlap)."""
        keep = self.weight.shape[0] - rows
        for buffer, axis in ((self.probs, 2), (self.weight, 0)):
            rest = buffer.narrow(axis, rows, keep)
            buffer.narrow(axis, 0, keep).copy_(rest.clone() if keep > rows else rest)
            buffer.narrow(axis, keep, rows).zero_()
        self.top += rows


_AXES = {2: "(height, width)", 3: "(depth, height, width)"}
_SHAPES = {2: "H, W", 3: "D, H, W"}


def _spatial_dims(model: object, tile: int | Sequence[int] | None) -> int:
    """Spatial dimensions of a tiled run: ``len(tile)`` for a sequence, else ``model.spatial_dims`` (default 2)."""
    if isinstance(tile, Sequence) and len(tile) in _AXES:
        return len(tile)
    dims = getattr(model, "spatial_dims", 2)
    return dims if dims in _AXES else 2


def _validated_tile(tile: int | Sequence[int], margins: tuple[int, ...]) -> tuple[int, ...]:
    dims = len(margins)
    if isinstance(tile, int) and not isinstance(tile, bool):
        sides = (tile,) * dims
    else:
        sides = tuple(tile) if isinstance(tile, Sequence) else ()
    if len(sides) != dims or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in sides):
        raise ValueError(f"tile must be an int >= 1 or a sequence {_AXES[dims]} of them, got {tile!r}.")
    if any(t <= 2 * m for t, m in zip(sides, margins)):
        shown = margins[0] if len(set(margins)) == 1 else margins
        twice = 2 * shown if isinstance(shown, int) else tuple(2 * m for m in margins)
        raise ValueError(
            f"tile {sides} must exceed 2 * valid_margin = {twice} of this valid-convolution model "
            f"(its output tile is tile - {twice}); use e.g. tile={2 * max(margins) + 388} "
            "(572 for the original U-Net) or the model's valid_input_size."
        )
    return sides


def _valid_margins(model: Callable[[torch.Tensor], torch.Tensor], dims: int) -> tuple[int, ...] | None:
    """``model.valid_margin`` per axis when the model follows the valid-convolution protocol, else None.

    The margin is an int (same on every axis) or a sequence with one int per spatial axis.
    """
    margin = getattr(model, "valid_margin", None)
    if not callable(getattr(model, "forward_valid", None)):
        return None
    if isinstance(margin, int) and not isinstance(margin, bool):
        margins = (margin,) * dims
    elif isinstance(margin, Sequence) and len(margin) == dims and all(isinstance(m, int) for m in margin):
        margins = tuple(margin)
    else:
        return None
    if min(margins) < 0:
        raise ValueError(f"model.valid_margin must be >= 0, got {margin}.")
    return margins


def _check_options(overlap: float, batch: int, blend: str, pad: str, sigma_scale: float) -> None:
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}; e.g. 0.25 for a quarter-tile overlap.")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1 (tiles per model call), got {batch!r}.")
    if blend not in BLEND_MODES:
        raise ValueError(f"blend must be one of {BLEND_MODES}, got {blend!r}.")
    if pad not in PAD_MODES:
        raise ValueError(f"pad must be one of {PAD_MODES}, got {pad!r}.")
    if not sigma_scale > 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale!r}.")


def _checked(logits: object, inputs: torch.Tensor, size: tuple[int, ...], who: str) -> torch.Tensor:
    """Return ``logits`` if it is a (B, K, *size) tensor for a (B, C, *spatial) input batch, else raise."""
    expected = (inputs.shape[0], *size)
    if (
        isinstance(logits, torch.Tensor)
        and logits.ndim == 2 + len(size)
        and (logits.shape[0], *logits.shape[2:]) == expected
    ):
        return logits
    got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
    raise ValueError(
        f"{who} returned {got} for inputs {tuple(inputs.shape)}; "
        f"expected ({inputs.shape[0]}, K, {', '.join(map(str, size))}). "
        "Same-size models must return logits of the input size; valid-convolution models need "
        "valid_margin = pixels lost per side and a tile size they accept."
    )


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over channels, or sigmoid for a single channel."""
    return logits.sigmoid() if logits.shape[1] == 1 else logits.softmax(1)


def _check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    scales = tuple(scales)
    if not scales or not all(
        isinstance(s, numbers.Real) and not isinstance(s, bool) and math.isfinite(s) and s > 0 for s in scales
    ):
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {scales!r}.")
    return scales


def _augmented_probs(
    run: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    margins: tuple[int, ...],
    who: str,
    scales: tuple[float, ...],
    flip: bool,
) -> torch.Tensor:
    """Probabilities of (B, C, *s) inputs averaged over test-time augmentations: (B, K, *(s - 2m)).

    For each scale the input is resized (bilinear, trilinear for volumes) to ``round(s * scale)``,
    run, and its probabilities resized back; with ``flip`` the input flipped along its last
    axis is run too and its probabilities flipped back. The mean of ``len(scales) * (1 + flip)``
    maps. ``margins`` are the pixels a valid-convolution ``run`` loses per side (0: same size).
    """
    size = tuple(side - 2 * m for side, m in zip(x.shape[2:], margins))
    total: torch.Tensor | None = None
    for scale in scales:
        scaled = resize_to(x, tuple(max(1, round(side * scale)) for side in x.shape[2:]))
        for flipped in (False, True) if flip else (False,):
            inputs = scaled.flip(-1) if flipped else scaled
            with torch.inference_mode():
                logits = run(inputs)
            expected = tuple(side - 2 * m for side, m in zip(inputs.shape[2:], margins))
            probs = _probabilities(_checked(logits, inputs, expected, who))
            probs = resize_to(probs.flip(-1) if flipped else probs, size)
            total = probs if total is None else total + probs
    return total / (len(scales) * (2 if flip else 1))


def _finished_strips(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    tile: int | Sequence[int],
    overlap: float,
    batch: int,
    blend: str,
    pad: str,
    sigma_scale: float,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Run the model tile by tile over (N, C, *S) and yield ``(row, probs (N, K, rows, *S[1:]))`` along S[0].

    The one implementation of tiling and blending, for images (S = H, W) and volumes
    (S = D, H, W). One slab of windows (same start along the first axis) is run at a time;
    positions no later window touches are divided by their accumulated weight, cropped to the
    image and yielded, so only an ``out``-deep slab buffer is ever held. The yielded
    probabilities are a view into that buffer, valid until the next iteration.
    Test-time augmentation (``scales``, ``flip``) is applied to each batch of tiles, so it
    costs no memory beyond that batch. A same-size model's tile is clamped to the image: a
    larger tile would only run the model over padding. ``transform`` maps each gathered
    input slab (N, C, tile_0, *S[1:] padded) to the model's float input before padding values
    are zeroed, so the image itself may be held compactly (e.g. uint8).
    """
    _check_options(overlap, batch, blend, pad, sigma_scale)
    scales = _check_scales(scales)
    dims = _spatial_dims(model, tile)
    if image.ndim != 2 + dims or not (image.is_floating_point() or transform is not None):
        raise ValueError(f"image must be a float tensor (N, C, {_SHAPES[dims]}), got {tuple(image.shape)} {image.dtype}.")
    margins = _valid_margins(model, dims)
    sides = _validated_tile(tile, margins or (0,) * dims)
    run, run_name = (model.forward_valid, "forward_valid") if margins is not None else (model, "the model")
    n_img, spatial = image.shape[0], image.shape[2:]
    if margins is None:
        sides = tuple(min(t, size) for t, size in zip(sides, spatial))
    elif scales != (1.0,):
        raise ValueError(
            f"scales={scales} with tiles needs a same-size model: a valid-convolution model's output tile "
            "does not scale with its input; use scales=(1.0,) or tile=None (whole image)."
        )
    axes = [_Axis.plan(size, t, m, overlap) for size, t, m in zip(spatial, sides, margins or (0,) * dims)]
    first, rest = axes[0], axes[1:]
    weight = importance_map_nd([a.out for a in axes], blend, sigma_scale, image.device)
    sources = [a.source(0, a.core + 2 * a.margin, pad, image.device) for a in rest]
    corners = list(itertools.product(*(a.starts() for a in rest)))
    ys = first.starts()
    acc: _StripAccumulator | None = None
    for r, y in enumerate(ys):
        rows, row_inside = first.source(y, sides[0], pad, image.device)
        slab = image.index_select(2, rows)
        for axis, (index, _) in enumerate(sources, start=3):
            slab = slab.index_select(axis, index)
        if transform is not None:
            slab = transform(slab)
        if row_inside is not None:
            inside = row_inside
            for _, mask in sources:
                inside = inside[..., None] & mask
            slab = slab * inside
        jobs = [(n, c) for n in range(n_img) for c in corners]
        for b in range(0, len(jobs), batch):
            chunk = jobs[b : b + batch]
            tiles = torch.stack(
                [slab[(n, slice(None), slice(None), *(slice(x, x + t) for x, t in zip(c, sides[1:])))] for n, c in chunk]
            )
            probs = _augmented_probs(run, tiles, margins or (0,) * dims, run_name, scales, flip)
            if acc is None:
                dtype = torch.promote_types(probs.dtype, torch.float32)
                acc = _StripAccumulator(n_img, probs.shape[1], weight.to(dtype), [a.core for a in rest])
            for (n, c), p in zip(chunk, probs.to(acc.probs)):
                acc.add(p, n, (y, *c))
        for c in corners:
            acc.add_window((y, *c))
        done_until = ys[r + 1] if r + 1 < len(ys) else first.core
        top = acc.top
        blended = acc.blend(done_until - top)
        start, stop = max(top, first.lead), min(done_until, first.lead + spatial[0])
        if start < stop:
            crop = tuple(slice(a.lead, a.lead + a.size) for a in rest)
            yield start - first.lead, blended[(slice(None), slice(None), slice(start - top, stop - top), *crop)]
        acc.slide(done_until - top)


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def sliding_window(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    tile: int | Sequence[int] = (512, 512),
    overlap: float = 0.25,
    batch: int = 1,
    blend: str = "gaussian",
    pad: str = "reflect",
    sigma_scale: float = 0.125,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> torch.Tensor:
    """Probabilities (N, K, H, W) of a model run tile by tile over images of any size; volumes too.

    Volumes (N, C, D, H, W) are tiled the same way (one implementation) when ``tile`` has
    three sides or the model has ``spatial_dims = 3`` (the 3D U-Net); memory then grows with
    one slab of ``tile`` sections, not with D.

    Windows advance by ``max(1, int(out * (1 - overlap)))`` where ``out`` is the model's
    output tile (``tile``, or ``tile - 2 * valid_margin``); the last one is snapped to the
    border. A same-size model's tile is clamped to the image (``tile=4096`` on a 64 x 64
    image runs one 64 x 64 window). An image smaller than a valid-convolution model's
    output tile is padded symmetrically up to it, and its input further by the margin.
    Overlapping tile probabilities are averaged with the importance map's weights.

    Args:
        model: callable (B, C, h, w) -> (B, K, h, w) logits, or a valid-convolution model
            (see the module docstring); (B, C, d, h, w) for volumes. Eval mode first.
        image: (N, C, H, W) or (N, C, D, H, W) float tensor on the model's device.
        tile: model input tile, int or (height, width) or (depth, height, width).
            Default (512, 512).
        overlap: fraction of the output tile shared by neighbouring windows, in [0, 1).
            Default 0.25.
        batch: tiles per model call. Default 1: on 2 CPU cores one 512-tile per call took
            6-43 % less time per tile than four for 4 of 5 models (benchmarks/README.md);
            raise it on a GPU.
        blend: ``"gaussian"`` (default) weights tile centres more than their borders;
            ``"constant"`` averages overlapping tiles equally.
        pad: ``"reflect"`` (default) mirrors the border (the U-Net overlap-tile strategy);
            ``"constant"`` pads with zeros.
        sigma_scale: Gaussian sigma as a fraction of the output tile side. Default 0.125.
        scales: test-time augmentation per tile: each batch of tiles is resized by every
            scale, run, and its probabilities resized back and averaged (same-size models
            only). Default (1.0,).
        flip: also average each tile's probabilities with those of its horizontal mirror.

    Returns:
        Probabilities (N, K, *spatial): softmax over K, or sigmoid when K == 1.

    Example:
        >>> probs = sliding_window(model.eval(), image, tile=512, overlap=0.5)
    """
    out: torch.Tensor | None = None
    strips = _finished_strips(model, image, tile, overlap, batch, blend, pad, sigma_scale, scales, flip)
    for row, probs in strips:
        if out is None:
            out = probs.new_empty(image.shape[0], probs.shape[1], *image.shape[2:])
        out[:, :, row : row + probs.shape[2]] = probs
    return out


@torch.no_grad()
def sliding_window_labels(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    tile: int | Sequence[int] = (512, 512),
    overlap: float = 0.25,
    batch: int = 1,
    blend: str = "gaussian",
    pad: str = "reflect",
    sigma_scale: float = 0.125,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Label map (H, W) of one image (C, H, W), or (D, H, W) of a volume (C, D, H, W), in bounded memory.

    Same tiling and blending as :func:`sliding_window` (one implementation); rows are
    argmaxed as soon as no later window touches them, so besides the input and the labels
    only a K x out_h x W probability strip, a C x tile_h x W input strip and one batch of
    (augmented) tiles are held: peak memory O((K + C) * tile_h * W), not O(K * H * W), with
    or without test-time augmentation. For a volume the strip is a slab of sections:
    O((K + C) * tile_d * H * W).
    Labels are uint8 for K <= 256, int16 for K <= 32768, else int64; for a single-channel
    (sigmoid) model they are ``probability > 0.5`` as 0/1.
    Arguments as in :func:`sliding_window` (a volume needs a 3-sided tile or a 3D model), and
    ``transform``: a function applied to each gathered (1, C, tile_h, W') input strip, e.g. to
    normalise a uint8 image strip by strip so that it is never held as a float image.
    """
    dims = _spatial_dims(model, tile)
    if image.ndim != 1 + dims:
        what = "image (C, H, W)" if dims == 2 else "volume (C, D, H, W)"
        raise ValueError(f"image must be one {what}, got shape {tuple(image.shape)}; use image[i].")
    labels: torch.Tensor | None = None
    strips = _finished_strips(model, image[None], tile, overlap, batch, blend, pad, sigma_scale, scales, flip, transform)
    for row, probs in strips:
        k = probs.shape[1]
        if labels is None:
            dtype = torch.uint8 if k <= 256 else torch.int16 if k <= 32768 else torch.int64
            labels = torch.empty(image.shape[1:], dtype=dtype, device=probs.device)
        strip = probs[0, 0] > 0.5 if k == 1 else probs[0].argmax(0)
        labels[row : row + probs.shape[2]] = strip.to(labels.dtype)
    return labels


@torch.no_grad()
def predict_tta(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    tile: int | Sequence[int] | None = None,
    **sliding_kwargs: float | int | str,
) -> torch.Tensor:
    """Test-time augmentation: probabilities (N, K, H, W) averaged over scales and flips; volumes too.

    Without ``tile`` the whole image is resized (bilinear; trilinear for a volume
    (N, C, D, H, W)) to ``round(H * s), round(W * s)`` for each scale, run through one
    ``model(x)`` call (the model's own forward, which must accept any size), and its
    probabilities are resized back to (H, W); with ``flip`` the horizontally flipped image is
    run too and its probabilities flipped back. The result is the mean of all
    ``len(scales) * (1 + flip)`` probability maps. ``predict_tta(model, image)`` is plain
    whole-image prediction.

    With ``tile`` the same augmentation is applied to every tile of
    :func:`sliding_window` before blending, so memory stays bounded by a strip of tiles.

    Args:
        model: as in :func:`sliding_window` (eval mode, on the image's device).
        image: (N, C, H, W) float tensor.
        scales: positive resize factors. Default (1.0,).
        flip: also average over the horizontal flip. Default False.
        tile: sliding-window tile; None runs the whole image.
        **sliding_kwargs: ``overlap``, ``batch``, ``blend``, ``pad``, ``sigma_scale`` of
            :func:`sliding_window`; only with ``tile``.
    """
    scales = _check_scales(scales)
    if tile is None and sliding_kwargs:
        raise ValueError(f"{sorted(sliding_kwargs)} only apply to sliding-window prediction; pass tile=... too.")
    if image.ndim not in (4, 5):
        raise ValueError(f"image must be (N, C, H, W) or a volume (N, C, D, H, W), got shape {tuple(image.shape)}.")
    if tile is not None:
        return sliding_window(model, image, tile, scales=scales, flip=flip, **sliding_kwargs)
    return _augmented_probs(model, image, (0,) * (image.ndim - 2), "the model", scales, flip)


def predict(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    tile: int | Sequence[int] | None = None,
    overlap: float = 0.25,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    batch: int = 1,
) -> torch.Tensor:
    """Probabilities (N, K, H, W) of (N, C, H, W) images: whole image, or tiles when ``tile`` is set, with optional TTA.

    The one-call entry point: :func:`predict_tta` with :func:`sliding_window`'s defaults
    (Gaussian blending, mirror padding); ``overlap`` and ``batch`` apply only with ``tile``.
    Put the model in eval mode first.

    Example:
        >>> labels = predict(model.eval(), image, tile=512, flip=True).argmax(1)
    """
    if tile is None:
        return predict_tta(model, image, scales=scales, flip=flip)
    return predict_tta(model, image, scales=scales, flip=flip, tile=tile, overlap=overlap, batch=batch)


def _exported_predictor(
    path: Path, runtime: str, tile: int | None
) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict, tuple[int, int]]:
    """An ``.onnx`` file from ``pixelwise export``: (predictor, saved extra, its tile size)."""
    from pixelwise.export import OnnxPredictor

    if runtime != "onnx":
        raise ValueError(f"{path} is an exported ONNX model: run it with --runtime onnx (got --runtime {runtime})")
    predictor = OnnxPredictor(path)
    size = (predictor.height, predictor.width)
    if None in size:
        raise ValueError(f"{path} has a symbolic input size; export it for a fixed size with pixelwise export")
    if tile is not None and (tile, tile) != size:
        raise ValueError(f"{path} was exported for {size[0]}x{size[1]} tiles; drop --tile or export again at --tile {tile}")
    return _FixedSize(predictor, size), predictor.extra, size


class _FixedSize:
    """Runs a fixed-size predictor (an exported ONNX graph) on inputs up to its size: a smaller
    input (a tile clamped to a small image, a TTA scale below 1) is mirror-padded at the bottom
    and right up to the size, and the output cropped back."""

    def __init__(self, predictor: Callable[[torch.Tensor], torch.Tensor], size: tuple[int, int]) -> None:
        self.predictor, self.size = predictor, size
        self.in_channels = getattr(predictor, "in_channels", None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (h, w), (height, width) = x.shape[-2:], self.size
        if h > height or w > width:
            raise ValueError(f"this exported ONNX model runs {height}x{width} inputs, got {h}x{w}: TTA scales above 1 "
                             "need the .safetensors model")
        if (h, w) == (height, width):
            return self.predictor(x)
        return self.predictor(mirror_pad(x, 0, height - h, 0, width - w))[..., :h, :w]




# ---------------------------------------------------------------------------------------
# Files in, files out (the CLI's `predict`)
# ---------------------------------------------------------------------------------------


PREDICTION_KINDS = ("labels", "colour", "overlay")
"""The files :func:`predict_files` writes per image: ``NAME_<kind>.png``."""


def segment_image(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    raw: np.ndarray,
    normalise: ToTensor,
    *,
    tile: int | None = None,
    overlap: float = 0.25,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crf: str | None = None,
) -> torch.Tensor:
    """Class ids (H, W) of one (H, W, C) uint8/uint16 image, as ``pixelwise predict`` computes them.

    The image is scaled to [0, 1] and normalised with ``normalise`` (the model's mean/std),
    run through :func:`predict`, optionally refined by the dense CRF preset ``crf``
    (:func:`pixelwise.crf.dense_crf`), then argmaxed (a single-channel model: probability > 0.5).
    With ``tile`` and no ``crf`` the labels come from :func:`sliding_window_labels` (uint8 for
    up to 256 classes), normalising strip by strip: neither the float image nor its K x H x W
    probabilities are ever held. Otherwise they are int64.
    """
    from pixelwise.data.transforms import to_float

    if tile is not None and crf is None:
        pixels = torch.from_numpy(raw if raw.dtype == np.uint8 else to_float(raw)).permute(2, 0, 1)  # (C, H, W)
        return sliding_window_labels(predictor, pixels, tile, overlap=overlap, scales=scales, flip=flip,
                                     transform=lambda strip: _normalised(strip, normalise))
    x = torch.from_numpy(normalise.normalise(to_float(raw)).transpose(2, 0, 1).copy())[None]
    probs = predict(predictor, x, tile=tile, overlap=overlap, scales=scales, flip=flip)[0]
    del x
    if crf is not None:
        from pixelwise.crf import dense_crf
        from pixelwise.report import _as_rgb_uint8

        probs = torch.from_numpy(dense_crf(_as_rgb_uint8(raw), probs.numpy(), preset=crf))
    return (probs[0] > 0.5).long() if probs.shape[0] == 1 else probs.argmax(0)


def shard_images(
    images: Sequence[str | Path], rank: int | None = None, world_size: int | None = None
) -> list[Path]:
    """This process's share of a prediction batch: image files, and the images inside folders.

    The batch is expanded (a folder gives its .png/.jpg/.jpeg/.tif/.tiff/.bmp files), ordered by
    path and dealt round-robin: rank ``r`` of ``w`` gets items ``r, r + w, r + 2w, ...``, so the
    ranks' shares are disjoint and together cover the batch once. ``rank`` and ``world_size``
    default to torchrun's ``RANK`` and ``WORLD_SIZE`` (one process: everything). Outputs are
    named by file stem, so two images with one stem are refused.
    """
    from pixelwise.data.datasets import _list_by_stem

    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size={world_size}); start ranks with torchrun")
    files: list[Path] = []
    for item in map(Path, images):
        files.extend(_list_by_stem(item).values() if item.is_dir() else [item])
    files.sort()
    seen: dict[str, Path] = {}
    for path in files:
        if path.stem in seen:
            raise ValueError(
                f"{seen[path.stem]} and {path} share the name {path.stem!r}, so their outputs would collide; "
                "predict them into different --out folders"
            )
        seen[path.stem] = path
    return files[rank::world_size]


def predict_files(
    images: Sequence[str | Path],
    model_path: str | Path,
    out: str | Path,
    *,
    tile: int | None = None,
    overlap: float = 0.25,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crf: str | None = None,
    runtime: str = "torch",
    progress: bool = False,
    skip_existing: bool = False,
) -> list[Path]:
    """Segment image files with a saved model; returns the label PNGs written.

    ``model_path`` is a ``.safetensors`` file from training, or an ``.onnx`` file from
    ``pixelwise export`` (fp32 or ``--int8``) run with ``runtime="onnx"`` in tiles of its
    exported size; its metadata holds the class names, palette and normalisation.

    For each ``NAME.ext`` writes into ``out``: ``NAME_labels.png`` (class ids, palette
    attached), ``NAME_colour.png`` (class colours) and ``NAME_overlay.png`` (colours
    over the image). ``runtime`` is ``"torch"``, ``"compile"`` or ``"onnx"``
    (see :func:`pixelwise.export.prepare_for_cpu`; ONNX needs ``tile`` and exports one
    graph per tile size it meets: the tile, clamped tiles of smaller images, TTA scales).
    ``skip_existing`` leaves out images whose three files are all in ``out`` already (each
    is written atomically), so an interrupted batch resumes where it stopped. Spread a batch
    over processes with :func:`shard_images`.

    With ``tile`` (and no ``crf``) labels come strip by strip (see :func:`segment_image`):
    memory holds the image and its labels and one strip of tiles, never a K x H x W array,
    TTA included. The dense CRF needs the whole K x H x W probabilities; it is refused,
    saying what it needs, when that exceeds the memory available.
    """
    from PIL import Image
    from rich.progress import track

    from pixelwise.data.transforms import ToTensor
    from pixelwise.export import prepare_for_cpu
    from pixelwise.io import atomic_write, check_output_folder, read_image, write_mask
    from pixelwise.models import load_model
    from pixelwise.report import colorize, overlay

    paths = [Path(p) for p in images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"image file(s) not found: {', '.join(missing[:5])}; check the paths")
    out = check_output_folder(out)
    if Path(model_path).suffix == ".onnx":
        predictor, extra, tile = _exported_predictor(Path(model_path), runtime, tile)
        in_channels = predictor.in_channels
    else:
        if runtime == "onnx" and tile is None:
            raise ValueError("--runtime onnx needs --tile: the ONNX graph is exported for one fixed tile size")
        model, extra = load_model(model_path)
        model.eval()
        in_channels = model.config["in_channels"]
        if runtime == "onnx":  # one graph per input size; no arena, it would keep every size's peak (benchmarks/README.md)
            predictor = _PerInputSize(lambda size: prepare_for_cpu(model, "onnx", tile=size, memory_arena=False))
        else:
            predictor = prepare_for_cpu(model, runtime)
    normalise = ToTensor(extra.get("mean"), extra.get("std"))
    palette = extra.get("palette") or [(0, 0, 0), (255, 255, 255)]
    written = []
    for path in track(paths, description="predicting", transient=True, disable=not progress):
        if skip_existing and all((out / f"{path.stem}_{kind}.png").is_file() for kind in PREDICTION_KINDS):
            continue
        raw = read_image(path)
        if raw.shape[-1] != in_channels:
            raise ValueError(f"image {path} has {raw.shape[-1]} channel(s) but the model takes {in_channels}")
        if crf is not None:
            _check_crf_memory(path, raw.shape[:2], len(palette))
        labels = segment_image(predictor, raw, normalise, tile=tile, overlap=overlap, scales=scales, flip=flip, crf=crf)
        labels = labels.numpy().astype(np.uint8 if len(palette) <= 256 else np.int64, copy=False)
        label_path = out / f"{path.stem}_labels.png"
        write_mask(label_path, labels, palette)
        for suffix, paint in (("colour", lambda r: colorize(labels[r], palette)),
                              ("overlay", lambda r: overlay(raw[r], labels[r], palette))):
            rgb = np.empty((*labels.shape, 3), np.uint8)
            for rows in _bands(labels.shape[0]):  # colorize/overlay make float64 copies: bound them
                rgb[rows] = paint(rows)
            picture = Image.fromarray(rgb)
            del rgb
            atomic_write(out / f"{path.stem}_{suffix}.png", lambda tmp, p=picture: p.save(tmp, format="PNG"))
            del picture
        written.append(label_path)
    return written


def _normalised(strip: torch.Tensor, normalise: Any) -> torch.Tensor:
    """(N, C, h, w) strip of file pixels -> the model's float input, as the data pipeline makes it."""
    from pixelwise.data.transforms import to_float

    hwc = strip.permute(0, 2, 3, 1).numpy()
    return torch.from_numpy(np.ascontiguousarray(normalise.normalise(to_float(hwc)))).permute(0, 3, 1, 2)


def _bands(height: int, rows: int = 512) -> Iterator[slice]:
    """Row slices of at most ``rows`` rows covering ``[0, height)``: per-band work keeps copies small."""
    return (slice(top, min(top + rows, height)) for top in range(0, height, rows))


class _PerInputSize:
    """A predictor that builds (and keeps) one inner predictor per input (h, w): ONNX graphs have one fixed size."""

    def __init__(self, build: Callable[[tuple[int, int]], Callable[[torch.Tensor], torch.Tensor]]) -> None:
        self.build = build
        self.built: dict[tuple[int, int], Callable[[torch.Tensor], torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[-2], x.shape[-1])
        if size not in self.built:
            self.built[size] = self.build(size)
        return self.built[size](x)


def _check_crf_memory(path: Path, size: tuple[int, int], num_classes: int) -> None:
    """Refuse a dense CRF whose full-image arrays would not fit in the memory available now.

    The CRF connects every pixel pair, so it needs the whole image at once: besides the
    K x H x W probabilities, pydensecrf's permutohedral lattices and mean-field buffers grew
    the peak RSS by about 550 bytes per pixel plus 80 per pixel and class (measured with the
    deeplab_v2 preset on 512² and 1024² inputs, 2 and 21 classes: 2.1 GiB for 21 classes at 1024²).
    """
    need = size[0] * size[1] * (550 + 80 * max(num_classes, 2))
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: no way to ask, let it run
        return
    if need > available:
        raise ValueError(
            f"--crf on {path} ({size[0]} x {size[1]}, {num_classes} classes) needs about {need / 2**20:,.0f} MiB "
            f"(the dense CRF holds every pixel's K class probabilities at once); only {available / 2**20:,.0f} MiB "
            "is available: drop --crf, or crop or downscale the image"
        )
