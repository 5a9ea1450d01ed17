"""Joint image + mask transforms: numpy arrays from a dataset in, tensors for a model out.

A transform is any callable ``(image, mask) -> (image_tensor, mask_tensor)`` taking an
(H, W, C) uint8/uint16 image and an (H, W) integer mask, returning a float32 (C, H, W)
image and an int64 (H, W) mask. Geometry is applied to both with the same random draw
(albumentations), images interpolated bilinearly and masks by nearest neighbour, so
labels never blend.

Example:
    >>> from pixelwise.data import CamVid, train_transform
    >>> ds = CamVid("data/camvid", "train", transform=train_transform(crop_size=(352, 480)))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import get_worker_info

# albumentations asks PyPI for a newer version at import time; pixelwise never goes online.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# albumentations' elastic field has a displacement std of about alpha / (15 * sigma)
# (measured on 96..512-px images); used to express the deformation in pixels.
_ELASTIC_CALIBRATION = 15.0


def to_float(image: np.ndarray) -> np.ndarray:
    """Scale an (H, W, C) image to float32 in [0, 1]: uint8 / 255, uint16 / 65535, floats unchanged."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32, copy=False)
    raise ValueError(f"image dtype {image.dtype} is not supported; use uint8, uint16 or float in [0, 1]")


ELASTIC_MODES = ("smooth", "grid")


def grid_elastic_field(
    height: int, width: int, rng: np.random.Generator, grid: int = 3, sigma: float = 10.0
) -> np.ndarray:
    """The U-Net paper's deformation field (Ronneberger et al. 2015, Sec. 3.1), (2, H, W) float32 pixels.

    Displacement vectors (dy, dx) on a coarse ``grid`` x ``grid`` lattice whose nodes span
    the image, corners included (node (i, j) at pixel (i (H - 1) / (grid - 1), j (W - 1) /
    (grid - 1))), each component drawn from N(0, sigma^2) (10 px in the paper), then
    interpolated to every pixel by cubic spline interpolation (bicubic; the field passes
    through the drawn vectors at the nodes).
    """
    from scipy import ndimage

    coarse = rng.normal(0.0, sigma, size=(2, grid, grid))
    yy = np.linspace(0, grid - 1, height)[:, None].repeat(width, 1)
    xx = np.linspace(0, grid - 1, width)[None, :].repeat(height, 0)
    return np.stack([ndimage.map_coordinates(c, [yy, xx], order=3, mode="mirror") for c in coarse]).astype(np.float32)


def elastic_warp(image: np.ndarray, mask: np.ndarray, field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Resample (H, W, C) ``image`` (bilinear) and (H, W) ``mask`` (nearest) at ``(y + dy, x + dx)``.

    ``field`` is (2, H, W) (dy, dx) in pixels; the border is mirrored (``BORDER_REFLECT_101``).
    """
    h, w = mask.shape
    map_y = (np.arange(h, dtype=np.float32)[:, None] + field[0]).astype(np.float32)
    map_x = (np.arange(w, dtype=np.float32)[None, :] + field[1]).astype(np.float32)
    channels = [
        cv2.remap(np.ascontiguousarray(image[..., c]), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        for c in range(image.shape[-1])
    ]
    warped_mask = cv2.remap(mask, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101)
    return np.stack(channels, axis=-1), warped_mask


def _check_inputs(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Validate shapes; return ``image`` as (H, W, C)."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or mask.ndim != 2 or image.shape[:2] != mask.shape:
        raise ValueError(
            f"transform expects an (H, W, C) image and an (H, W) mask of the same size, got image "
            f"{image.shape} and mask {mask.shape}"
        )
    return image


def _stats(values: Sequence[float] | None, name: str) -> np.ndarray | None:
    if values is None:
        return None
    arr = np.asarray(values, dtype=np.float32).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} must list one value per channel (or one for all), got {values!r}")
    return arr


class ToTensor:
    """Image to float32 (C, H, W) in [0, 1], then ``(x - mean) / std`` if given; mask to int64 (H, W).

    Args:
        mean: Per-channel mean in [0, 1] units (one value per channel, or one for all).
        std: Per-channel standard deviation in [0, 1] units.
    """

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        self.mean = _stats(mean, "mean")
        self.std = _stats(std, "std")
        if self.std is not None and (self.std <= 0).any():
            raise ValueError(f"std must be positive, got {std!r}")

    def check_channels(self, channels: int) -> None:
        """Raise if mean/std do not fit an image with ``channels`` channels."""
        for name, stat in (("mean", self.mean), ("std", self.std)):
            if stat is not None and stat.size not in (1, channels):
                raise ValueError(
                    f"{name} has {stat.size} values but the image has {channels} channel(s); give one "
                    "value per channel (grey data sets need a single value)"
                )

    def normalise(self, image: np.ndarray) -> np.ndarray:
        """Apply mean/std to a float (H, W, C) image in [0, 1]."""
        self.check_channels(image.shape[-1])
        if self.mean is not None:
            image = image - self.mean
        if self.std is not None:
            image = image / self.std
        return image

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        image = _check_inputs(np.asarray(image), np.asarray(mask))
        x = self.normalise(to_float(image))
        return (
            torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)),
            torch.from_numpy(np.asarray(mask, dtype=np.int64)),
        )


def reseed_in_worker(transform: Any) -> None:
    """Inside a DataLoader worker, restart ``transform``'s draws from the worker's seed once per
    worker process (``transform.set_random_seed``; state kept in ``transform._seeded_for``)."""
    info = get_worker_info()
    if info is None:
        return
    key = (os.getpid(), info.seed)
    if key != getattr(transform, "_seeded_for", None):
        transform.set_random_seed(info.seed)
        transform._seeded_for = key


class TrainTransform:
    """Random scale -> pad -> random crop -> horizontal flip -> colour jitter -> elastic -> tensors.

    Build it with :func:`train_transform`. Scale, pad and crop are done here (cv2, bilinear
    image / pixel-centre nearest mask); flip, jitter and the smooth elastic warp by
    albumentations; the U-Net grid warp by :func:`elastic_warp`.
    Each DataLoader worker reseeds the random draws from its torch worker seed, so workers do
    not repeat each other's augmentations.
    """

    def __init__(
        self,
        crop_size: tuple[int, int] | None,
        scale_range: tuple[float, float] | None,
        hflip: bool,
        color_jitter: float,
        elastic: bool | str,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        ignore_index: int | None,
        seed: int | None = None,
    ) -> None:
        # Imported here: albumentations takes ~2 s to import and only training needs it.
        import albumentations as A

        self._args = (crop_size, scale_range, hflip, color_jitter, elastic, mean, std)
        self.crop_size = crop_size
        self.scale_range = None if scale_range is None or tuple(scale_range) == (1.0, 1.0) else tuple(scale_range)
        self.seed = seed
        self.to_tensor = ToTensor(mean, std)
        self.ignore_index = ignore_index
        self.rng = np.random.default_rng(seed)
        steps = []
        if hflip:
            steps.append(A.HorizontalFlip(p=0.5))
        if color_jitter > 0:
            # Saturation and hue leave single-channel images untouched.
            j = color_jitter
            steps.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(j / 4, 0.5), p=0.8))
        self.grid_elastic = elastic == "grid"
        if elastic is True or elastic == "smooth":
            # U-Net (Ronneberger et al. 2015): smooth random displacements of ~10 px on a 572-px
            # tile; here a field smooth over 1/8 of the side, displacement std ~2% of the side
            # (side = the crop's shorter side, or 512 without a crop size).
            side = min(crop_size) if crop_size is not None else 512
            sigma = side / 8
            alpha = _ELASTIC_CALIBRATION * sigma * side / 50
            steps.append(
                A.ElasticTransform(
                    alpha=alpha,
                    sigma=sigma,
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST,
                    border_mode=cv2.BORDER_REFLECT_101,
                    p=0.5,
                )
            )
        self.pipeline = A.Compose(steps, seed=seed)
        self._seeded_for: tuple[int, int] | None = None

    def with_ignore_index(self, ignore_index: int) -> TrainTransform:
        """A copy that pads masks with ``ignore_index``."""
        return TrainTransform(*self._args, ignore_index, self.seed)

    def set_random_seed(self, seed: int) -> None:
        """Restart the random draws from ``seed`` (the trainer does this every epoch)."""
        self.rng = np.random.default_rng(seed)
        self.pipeline.set_random_seed(seed % 2**32)

    def _scale_pad_crop(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rescale, pad (centred) to at least the crop size, then crop at a random position.

        Without a crop size the output keeps the input's (H, W), so batches of equal-size
        images still stack.
        """
        h, w = mask.shape
        if self.scale_range is not None:
            scale = self.rng.uniform(*self.scale_range)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            if size != (w, h):
                image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR).reshape(size[1], size[0], -1)
                # INTER_NEAREST_EXACT samples pixel centres like INTER_LINEAR (INTER_NEAREST is off by half a pixel).
                mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST_EXACT)
        th, tw = self.crop_size if self.crop_size is not None else (h, w)
        sh, sw = mask.shape
        if sh < th or sw < tw:
            ph, pw = max(th, sh), max(tw, sw)
            top, left = (ph - sh) // 2, (pw - sw) // 2
            # Padding with the mean makes padded pixels 0 after normalisation.
            mean = self.to_tensor.mean
            padded = np.empty((ph, pw, image.shape[2]), np.float32)
            padded[:] = 0.0 if mean is None else mean
            padded[top : top + sh, left : left + sw] = image
            padded_mask = np.full((ph, pw), 255 if self.ignore_index is None else self.ignore_index, mask.dtype)
            padded_mask[top : top + sh, left : left + sw] = mask
            image, mask, sh, sw = padded, padded_mask, ph, pw
        y0 = int(self.rng.integers(0, sh - th + 1))
        x0 = int(self.rng.integers(0, sw - tw + 1))
        return image[y0 : y0 + th, x0 : x0 + tw], mask[y0 : y0 + th, x0 : x0 + tw]

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        image = _check_inputs(np.asarray(image), np.asarray(mask))
        mask = np.asarray(mask)
        if mask.size and (mask.min() < 0 or mask.max() > 65535):
            raise ValueError(
                f"mask values range {mask.min()}..{mask.max()}; transforms need ids in 0..65535"
            )
        self.to_tensor.check_channels(image.shape[-1])
        reseed_in_worker(self)
        x, y = self._scale_pad_crop(to_float(image), mask.astype(np.uint16))
        out = self.pipeline(image=np.ascontiguousarray(x), mask=np.ascontiguousarray(y))
        x, y = out["image"], out["mask"]
        if x.ndim == 2:
            x = x[:, :, None]
        if self.grid_elastic:
            x, y = elastic_warp(x, y, grid_elastic_field(*y.shape, self.rng))
        return self.to_tensor(x, y)


def train_transform(
    crop_size: tuple[int, int] | None = None,
    scale_range: tuple[float, float] | None = (0.5, 2.0),
    hflip: bool = True,
    color_jitter: float = 0.2,
    elastic: bool | str = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    ignore_index: int | None = None,
    seed: int | None = None,
) -> TrainTransform:
    """Joint training augmentation for (image, mask) pairs.

    Order: random scale (uniform in ``scale_range``) -> pad to ``crop_size`` (image with 0, or
    with ``mean`` so it normalises to 0; mask with ``ignore_index``) -> random crop -> random
    horizontal flip -> colour jitter (brightness/contrast for grey, plus saturation/hue for
    RGB) -> optional U-Net elastic deformation -> tensors (see :class:`ToTensor`). Works on
    8/16-bit, grey and RGB images.

    Args:
        crop_size: ``(h, w)`` of the output, or None to keep each input's size (scaled, then
            padded or cropped back to it).
        scale_range: ``(low, high)`` scale factors, or None for no rescaling.
        hflip: Flip left-right with probability 0.5.
        color_jitter: Strength of brightness/contrast/saturation jitter (0 disables it).
        elastic: ``"grid"``: the U-Net paper's deformation, on every sample: a 3 x 3 grid of
            displacement vectors drawn from N(0, 10 px), bicubically interpolated
            (:func:`grid_elastic_field`). ``True`` or ``"smooth"``: albumentations' dense
            smoothed field (probability 0.5; displacement std about 2% of the crop side, ~5 px
            on a 256 crop). ``False``: none.
        mean: Per-channel mean in [0, 1] units for normalisation.
        std: Per-channel std in [0, 1] units.
        ignore_index: Mask value for padded pixels (the loss ignores them); None takes the
            ``ignore_index`` of the pixelwise data set the transform is given to (255 otherwise).
        seed: Seed of the random draws (None: fresh randomness). DataLoader workers reseed
            from their torch worker seed, reproducible under ``torch.manual_seed``.

    Returns:
        A callable ``(image (H, W, C), mask (H, W)) -> (float32 (C, h, w), int64 (h, w))``.
    """
    if crop_size is not None:
        if len(crop_size) != 2 or min(crop_size) < 1:
            raise ValueError(f"crop_size must be (height, width) with positive sides, got {crop_size!r}")
        crop_size = (int(crop_size[0]), int(crop_size[1]))
    if scale_range is not None and not (len(scale_range) == 2 and 0 < scale_range[0] <= scale_range[1]):
        raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range!r}")
    if color_jitter < 0:
        raise ValueError(f"color_jitter must be >= 0, got {color_jitter}")
    if not isinstance(elastic, bool) and elastic not in ELASTIC_MODES:
        raise ValueError(f"elastic={elastic!r} is not supported; use false, true, 'smooth' or 'grid' (the U-Net paper)")
    return TrainTransform(crop_size, scale_range, hflip, color_jitter, elastic, mean, std, ignore_index, seed)


def eval_transform(mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> ToTensor:
    """No augmentation: image to float32 (C, H, W) in [0, 1] (then ``(x - mean) / std``), mask to int64."""
    return ToTensor(mean, std)
