"""Volumes: TIFF stacks and NIfTI files as image/label volumes, 3D augmentation, volume data sets.

A volume array is (D, H, W) or (D, H, W, C) — sections, rows, columns — with ``spacing``
(d, h, w), the voxel size along each axis in the file's unit. Samples of a
:class:`VolumeDataset` are ``(image (C, D, H, W) float32, labels (D, H, W) int64)``.

Example:
    >>> vol = read_volume("brain.nii.gz")            # data (D, H, W), spacing, affine kept
    >>> write_volume("brain_labels.nii.gz", labels, like=vol)   # same geometry
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pixelwise.data.transforms import reseed_in_worker, to_float
from pixelwise.io import atomic_write

VOLUME_SUFFIXES = (".tif", ".tiff", ".nii", ".nii.gz")
ISBI_SPACING_NM = (50.0, 4.0, 4.0)  # ssTEM of the Drosophila VNC: 4x4 nm pixels, 50 nm sections


@dataclass
class Volume:
    """A volume read from disk, with what is needed to write another of the same geometry.

    Attributes:
        data: (D, H, W) or (D, H, W, C) array as stored.
        spacing: voxel size (d, h, w) in the file's unit (1.0 when the file has none).
        affine: NIfTI voxel-to-world matrix (4, 4), or None for TIFF.
        header: the NIfTI header (reused when writing), or None.
        unit: TIFF (ImageJ) length unit, or None.
    """

    data: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray | None = None
    header: Any = None
    unit: str | None = None


def volume_suffix(path: str | Path) -> str | None:
    """The volume suffix of ``path`` (``.nii.gz`` counts as one), or None if it is not a volume file."""
    name = Path(path).name.lower()
    return next((s for s in sorted(VOLUME_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def is_volume_file(path: str | Path) -> bool:
    """NIfTI files, and TIFF files of more than one page (stacks); a single-page TIFF is an image."""
    path = Path(path)
    suffix = volume_suffix(path)
    if suffix is None or not path.is_file():
        return suffix is not None and suffix.startswith(".nii")
    if suffix.startswith(".nii"):
        return True
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return len(tif.pages) > 1
    except Exception:  # not a readable TIFF: let the image reader report it
        return False


def _stem(path: Path) -> str:
    suffix = volume_suffix(path) or path.suffix
    return path.name[: len(path.name) - len(suffix)]


def read_volume(path: str | Path) -> Volume:
    """Read a TIFF stack (``.tif``/``.tiff``) or NIfTI file (``.nii``/``.nii.gz``).

    TIFF: pages are sections; spacing from the ImageJ ``spacing`` (depth) and the X/Y
    resolution tags. NIfTI: nibabel's (x, y, z[, c]) array is transposed to (z, y, x[, c]) =
    (D, H, W[, C]); spacing from the header's zooms; affine and header are kept.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if suffix is None:
        raise ValueError(f"{path} is not a volume file; use one of {', '.join(VOLUME_SUFFIXES)}")
    if not path.is_file():
        raise ValueError(f"volume file {path} does not exist; check the path")
    if suffix.startswith(".nii"):
        import nibabel as nib

        try:
            image = nib.load(str(path))
        except Exception as err:  # nibabel raises several types for corrupt files
            raise ValueError(f"cannot read NIfTI file {path}: {err}") from err
        data = np.asarray(image.dataobj)
        if data.ndim not in (3, 4):
            raise ValueError(f"NIfTI file {path} holds a {data.ndim}-D array; expected (x, y, z) or (x, y, z, c)")
        data = data.transpose(2, 1, 0, *range(3, data.ndim))
        zooms = image.header.get_zooms()[:3]
        return Volume(np.ascontiguousarray(data), tuple(float(z) for z in zooms[::-1]), image.affine, image.header)
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            data = tif.asarray()
            meta = tif.imagej_metadata or {}
            page = tif.pages[0]
            axes = tif.series[0].axes
            spacing_hw = []
            for tag in ("YResolution", "XResolution"):
                value = page.tags.get(tag)
                num, den = value.value if value is not None else (1, 1)
                spacing_hw.append(den / num if num else 1.0)
    except (tifffile.TiffFileError, OSError, ValueError) as err:
        raise ValueError(f"cannot read TIFF stack {path}: {err}") from err
    if "C" in axes and data.ndim == 4:
        data = np.moveaxis(data, axes.index("C"), -1)
    if data.ndim == 2:
        data = data[None]
    if data.ndim not in (3, 4):
        raise ValueError(f"TIFF file {path} holds a {data.ndim}-D array ({axes}); expected a stack (D, H, W[, C])")
    spacing = (float(meta.get("spacing", 1.0)), *spacing_hw)
    return Volume(data, spacing, unit=meta.get("unit"))


def write_volume(path: str | Path, labels: np.ndarray, like: Volume) -> Path:
    """Write a (D, H, W) label volume with the geometry of ``like``, atomically.

    The format follows ``path``'s suffix: NIfTI keeps ``like``'s affine and header (or
    builds a diagonal affine from the spacing), TIFF writes ImageJ spacing and resolution.
    Labels are stored as uint8 (uint16 above 255).
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if suffix is None:
        raise ValueError(f"cannot write {path}: use one of {', '.join(VOLUME_SUFFIXES)}")
    labels = np.asarray(labels)
    if labels.shape != like.data.shape[:3]:
        raise ValueError(f"labels of shape {labels.shape} do not match the volume's {like.data.shape[:3]}")
    dtype = np.uint8 if labels.size == 0 or labels.max() <= 255 else np.uint16
    labels = labels.astype(dtype)
    if suffix.startswith(".nii"):
        import nibabel as nib

        affine = like.affine if like.affine is not None else np.diag([*like.spacing[::-1], 1.0])
        header = like.header.copy() if like.header is not None else None
        image = nib.Nifti1Image(np.ascontiguousarray(labels.transpose(2, 1, 0)), affine, header)
        image.set_data_dtype(dtype)
        image.header.set_zooms(like.spacing[::-1])
        image.header["scl_slope"], image.header["scl_inter"] = 1.0, 0.0
        data = image.to_bytes()
        data = gzip.compress(data) if suffix == ".nii.gz" else data
        return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    import tifffile

    d, h, w = like.spacing
    return atomic_write(
        path,
        lambda tmp: tifffile.imwrite(
            tmp, labels, imagej=True, resolution=(1 / w, 1 / h),
            metadata={"spacing": d, "unit": like.unit or "pixel", "axes": "ZYX"},
        ),
    )


def volume_to_float(data: np.ndarray) -> np.ndarray:
    """(D, H, W[, C]) -> float32 (C, D, H, W): uint8 / 255, uint16 / 65535, other numbers as they are."""
    data = data if data.ndim == 4 else data[..., None]
    x = to_float(data) if data.dtype in (np.uint8, np.uint16) else data.astype(np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, 0))


# ---------------------------------------------------------------------------------------
# 3D augmentation
# ---------------------------------------------------------------------------------------


def elastic_field(shape: Sequence[int], rng: np.random.Generator, grid_spacing: int = 32, std: float = 4.0) -> np.ndarray:
    """Smooth dense displacement field (3, D, H, W) in voxels (3D U-Net, Çiçek et al. 2016, Sec. 2).

    "random vectors sampled from a normal distribution with standard deviation of 4 in a grid
    with a spacing of 32 voxels in each direction", then B-spline (cubic) interpolation.
    """
    from scipy.ndimage import zoom

    coarse = [max(2, math.ceil(s / grid_spacing) + 1) for s in shape]
    field = []
    for _ in range(3):
        nodes = rng.normal(0.0, std, coarse)
        field.append(zoom(nodes, [s / c for s, c in zip(shape, coarse)], order=3, mode="reflect", grid_mode=True))
    return np.stack([f[: shape[0], : shape[1], : shape[2]] for f in field])


def warp(volume: np.ndarray, field: np.ndarray, order: int) -> np.ndarray:
    """Sample (D, H, W) ``volume`` at ``identity + field`` ((3, D, H, W) voxels); mirrored outside.

    ``order`` 1 (trilinear) for images, 0 (nearest) for labels.
    """
    from scipy.ndimage import map_coordinates

    grid = np.meshgrid(*(np.arange(s, dtype=np.float64) for s in volume.shape), indexing="ij")
    coords = [g + f for g, f in zip(grid, field)]
    return map_coordinates(volume, coords, order=order, mode="mirror")


class VolumeTransform:
    """Random crop -> flips -> 90° rotations in an isotropic plane -> intensity jitter -> elastic.

    Called as ``transform(image (C, D, H, W) float32, labels (D, H, W), spacing)`` on numpy
    arrays; returns tensors. Volumes smaller than the crop are padded (image 0, labels
    ``ignore_index``). Rotations turn a random plane whose two axes have the same spacing
    (the in-plane axes of an EM or microscopy stack), only by 180° when the crop is not square
    in it, so batches keep their shape.

    Args:
        crop_size: (d, h, w) crop, or None for the whole volume.
        flip: mirror each axis with probability 1/2.
        rotate: rotate by k * 90° in an isotropic plane.
        intensity: brightness and contrast jitter: x * (1 + u) + v, u, v ~ U(-j, j).
        elastic: the 3D U-Net's smooth deformation (:func:`elastic_field`) with probability 1/2.
        ignore_index: label of padded voxels.
        seed: random seed.
    """

    def __init__(
        self,
        crop_size: Sequence[int] | None = None,
        flip: bool = True,
        rotate: bool = True,
        intensity: float = 0.1,
        elastic: bool = False,
        ignore_index: int = 255,
        seed: int | None = None,
    ) -> None:
        if crop_size is not None and (len(crop_size) != 3 or min(crop_size) < 1):
            raise ValueError(f"crop_size must be three sides (d, h, w) >= 1 for volumes, got {crop_size!r}")
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.flip, self.rotate, self.intensity, self.elastic = flip, rotate, intensity, elastic
        self.ignore_index = ignore_index
        self.rng = np.random.default_rng(seed)

    def set_random_seed(self, seed: int) -> None:
        """Restart the random draws from ``seed`` (the trainer does this every epoch)."""
        self.rng = np.random.default_rng(seed)

    def _crop(self, image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.crop_size is None:
            return image, labels
        need = [max(0, c - s) for c, s in zip(self.crop_size, labels.shape)]
        if any(need):
            pads = [(n // 2, n - n // 2) for n in need]
            image = np.pad(image, [(0, 0), *pads])
            labels = np.pad(labels, pads, constant_values=self.ignore_index)
        starts = [int(self.rng.integers(0, s - c + 1)) for s, c in zip(labels.shape, self.crop_size)]
        window = tuple(slice(a, a + c) for a, c in zip(starts, self.crop_size))
        return image[(slice(None), *window)], labels[window]

    def __call__(
        self, image: np.ndarray, labels: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        reseed_in_worker(self)
        image, labels = self._crop(image, labels)
        if self.flip:
            for axis in range(3):
                if self.rng.random() < 0.5:
                    image, labels = np.flip(image, axis + 1), np.flip(labels, axis)
        if self.rotate:
            planes = [
                (a, b) for a in range(3) for b in range(a + 1, 3) if math.isclose(spacing[a], spacing[b], rel_tol=1e-3)
            ]
            if planes:
                a, b = planes[int(self.rng.integers(len(planes)))]
                square = labels.shape[a] == labels.shape[b]
                k = int(self.rng.integers(4)) if square else 2 * int(self.rng.integers(2))
                image, labels = np.rot90(image, k, (a + 1, b + 1)), np.rot90(labels, k, (a, b))
        if self.intensity > 0:
            j = self.intensity
            image = image * (1 + self.rng.uniform(-j, j)) + self.rng.uniform(-j, j)
        if self.elastic and self.rng.random() < 0.5:
            field = elastic_field(labels.shape, self.rng)
            image = np.stack([warp(channel, field, order=1) for channel in image])
            labels = warp(labels, field, order=0)
        return (
            torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
        )


# ---------------------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------------------


class VolumeDataset(Dataset):
    """Image/label volume pairs; sample ``i`` is ``(image (C, D, H, W) float32, labels (D, H, W) int64)``.

    Without a transform each volume is one sample. With a :class:`VolumeTransform` whose
    crops are smaller than the volumes, each volume yields ``ceil(voxels / crop voxels)``
    random crops per epoch, so an epoch sees about as many voxels as the data hold.

    Args:
        images: (C, D, H, W) float32 arrays.
        labels: (D, H, W) integer arrays of class ids or ``ignore_index``.
        spacings: (d, h, w) voxel size of each volume.
        class_names: one name per class.
        palette: one RGB colour per class.
        ignore_index: label of voxels no loss or metric counts.
        transform: a :class:`VolumeTransform`, or None.
        names: a name per volume (file stems), for messages and outputs.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        spacings: Sequence[Sequence[float]],
        class_names: Sequence[str],
        palette: Sequence[tuple[int, int, int]],
        ignore_index: int = 255,
        transform: VolumeTransform | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        self.names = list(names) if names is not None else [f"volume_{i}" for i in range(len(images))]
        k = len(class_names)
        for name, image, label in zip(self.names, images, labels):
            if image.ndim != 4 or image.shape[1:] != label.shape:
                raise ValueError(
                    f"volume {name}: image {image.shape} and labels {label.shape} must be (C, D, H, W) and (D, H, W)"
                )
            bad = (label != ignore_index) & ((label < 0) | (label >= k))
            if bad.any():
                raise ValueError(
                    f"volume {name}: label value {int(label[bad].flat[0])} is outside 0..{k - 1} "
                    f"and not ignore_index={ignore_index}"
                )
        if not images:
            raise ValueError("a volume data set needs at least one volume")
        self.images, self.labels, self.spacings = list(images), list(labels), [tuple(s) for s in spacings]
        self.class_names, self.palette = list(class_names), [tuple(c) for c in palette]
        self.num_classes, self.ignore_index = k, ignore_index
        self.transform = transform
        crop = transform.crop_size if transform is not None else None
        self.repeats = [
            1 if crop is None else max(1, math.ceil(label.size / math.prod(crop))) for label in self.labels
        ]
        self._index = [v for v, r in enumerate(self.repeats) for _ in range(r)]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        v = self._index[i]
        if self.transform is None:
            return torch.from_numpy(self.images[v]), torch.from_numpy(self.labels[v].astype(np.int64))
        return self.transform(self.images[v], self.labels[v], self.spacings[v])


def isbi2012_volume(
    root: str | Path, split: str, transform: VolumeTransform | None = None, val_sections: int = 5
) -> VolumeDataset:
    """The ISBI 2012 EM stack as one volume (1, D, 512, 512); "train" = all but the last
    ``val_sections`` sections, "val" = the last ones, "all" = every section.

    Sections are read by :class:`pixelwise.data.ISBI2012` (label 0 membrane, 1 cell);
    spacing is 50 x 4 x 4 nm.
    """
    from pixelwise.data.datasets import ISBI2012

    sections = ISBI2012(root)
    n = len(sections)
    if n <= val_sections:
        raise ValueError(f"isbi2012:{root} has {n} sections; a train/val split needs more than {val_sections}")
    splits = {"train": range(n - val_sections), "val": range(n - val_sections, n), "all": range(n)}
    if split not in splits:
        raise ValueError(f"split {split!r} is not one of {sorted(splits)} for isbi2012")
    pairs = [sections[i] for i in splits[split]]
    image = torch.stack([p[0] for p in pairs], 1).numpy()
    labels = torch.stack([p[1] for p in pairs]).numpy().astype(np.uint8)
    return VolumeDataset(
        [image], [labels], [ISBI_SPACING_NM], sections.class_names, sections.palette, sections.ignore_index,
        transform, names=[f"isbi2012_{split}"],
    )


def volume_folder(
    root: str | Path, transform: VolumeTransform | None = None, num_classes: int | None = None
) -> VolumeDataset:
    """``root/images/NAME.{tif,nii.gz,...}`` with ``root/labels/NAME.*`` of the same shape.

    Classes: ``num_classes`` or 1 + the largest label below 255 (255 is ``ignore_index``);
    names ``class_0``..., the VOC colour map.
    """
    from pixelwise.data.datasets import voc_colormap

    root = Path(root)
    found = {}
    for part in ("images", "labels"):
        folder = root / part
        if not folder.is_dir():
            raise ValueError(f"volume folder {folder} does not exist; expected {root}/images/ and {root}/labels/")
        found[part] = {_stem(p): p for p in sorted(folder.iterdir()) if volume_suffix(p)}
    missing = sorted(set(found["images"]) ^ set(found["labels"]))
    if missing:
        raise ValueError(f"volumes without a partner in {root}/images or /labels: {', '.join(missing[:5])}")
    if not found["images"]:
        raise ValueError(f"no volume files ({', '.join(VOLUME_SUFFIXES)}) in {root}/images")
    images, labels, spacings, names = [], [], [], []
    for name in sorted(found["images"]):
        image, label = read_volume(found["images"][name]), read_volume(found["labels"][name])
        if label.data.shape != image.data.shape[:3]:
            raise ValueError(
                f"label volume {found['labels'][name]} has shape {label.data.shape}; its image has {image.data.shape[:3]}"
            )
        images.append(volume_to_float(image.data))
        labels.append(label.data)
        spacings.append(image.spacing)
        names.append(name)
    k = num_classes or 1 + max(int(label[label != 255].max(initial=0)) for label in labels)
    return VolumeDataset(images, labels, spacings, [f"class_{i}" for i in range(k)], voc_colormap(k), 255, transform, names)


def pocket_volumes(root: str | Path, transform: VolumeTransform | None = None) -> VolumeDataset:
    """Protein structures (``*.pdb``, ``*.cif``, ``*.ent``) in ``root`` as volumes for pocket segmentation:
    image = the 8 atom-type channels on a 1 Å grid, labels = voxels within 4 Å of the bound ligand
    (:mod:`pixelwise.pockets`)."""
    from pixelwise.pockets import pocket_labels, read_structure, voxelise

    files = sorted(p for p in Path(root).iterdir() if p.suffix.lower() in (".pdb", ".cif", ".ent"))
    if not files:
        raise ValueError(f"no structure files (.pdb, .cif, .ent) in {root}")
    images, labels = [], []
    for path in files:
        structure = read_structure(path)
        if len(structure.ligand) == 0:
            raise ValueError(f"structure {path} has no ligand to label a pocket with; remove it or add the ligand")
        features, grid = voxelise(structure)
        images.append(features)
        labels.append(pocket_labels(grid, structure.ligand))
    return VolumeDataset(images, labels, [(1.0, 1.0, 1.0)] * len(files), ["background", "pocket"],
                         [(0, 0, 0), (255, 0, 0)], 255, transform, [p.stem for p in files])


def open_volume_dataset(spec: str | Path, split: str, transform: VolumeTransform | None = None) -> VolumeDataset:
    """``isbi2012:PATH`` (one stack, last 5 sections = val), ``pockets:PATH`` (protein structures,
    :func:`pocket_volumes`) or a folder of volumes; a folder with ``train/`` and ``val/``
    sub-folders opens ``PATH/split``, else ``PATH`` itself serves every split."""
    text = str(spec)
    prefix, sep, rest = text.partition(":")
    if sep and prefix.lower() == "isbi2012":
        return isbi2012_volume(rest, split, transform)
    if sep and prefix.lower() == "pockets":
        root = Path(rest)
        split_dir = root / split if (root / "train").is_dir() and (root / "val").is_dir() else root
        if not split_dir.is_dir():
            raise ValueError(f"pocket structures folder {split_dir} does not exist")
        return pocket_volumes(split_dir, transform)
    root = Path(text)
    if not root.is_dir():
        raise ValueError(f"volume data set {text!r} does not exist; use isbi2012:PATH or a folder with images/ and labels/")
    if (root / "train").is_dir() and (root / "val").is_dir():
        if not (root / split).is_dir():
            raise ValueError(f"split {split!r} has no folder {root / split}")
        return volume_folder(root / split, transform)
    return volume_folder(root, transform)
