"""Segmentation data sets: (image, mask) pairs read from disk, checked, and transformed.

Every data set here is a torch ``Dataset`` of ``(image, mask)``; with the default
transform the image is float32 (C, H, W) in [0, 1] (8-bit / 255, 16-bit / 65535) and the
mask int64 (H, W) of class ids, with ``ignore_index`` for pixels no loss or metric counts.
Each carries ``class_names``, ``palette`` (RGB per class), ``num_classes``,
``ignore_index`` and ``files`` (list of (image_path, mask_path)).

Bad data raises a ``ValueError`` naming the file and the fix the moment a pair is read;
:func:`check_dataset` reads every pair up front and lists all problems at once.

Example:
    >>> from pixelwise.data import open_dataset, check_dataset
    >>> ds = open_dataset("camvid:../shared/data/camvid", "train")
    >>> print(check_dataset(ds).format())
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from pixelwise.data.transforms import TrainTransform, eval_transform
from pixelwise.io import atomic_write_text, read_image, read_mask

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
CLASSES_FILE = "classes.json"

Transform = Callable[[np.ndarray, np.ndarray], tuple[torch.Tensor, torch.Tensor]]
Colour = tuple[int, int, int]


def voc_colormap(n: int) -> list[Colour]:
    """The PASCAL VOC colour map: ``n`` distinct RGB colours from the bits of each id."""
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append((r, g, b))
    return colours


# ---------------------------------------------------------------------------
# Base class
# ---------------------------------------------------------------------------


class SegmentationDataset(Dataset):
    """Common behaviour: read a pair, map raw mask values to class ids, validate, transform.

    Subclasses fill ``files`` and the class description and may override :meth:`mask_to_ids`.

    Args:
        files: (image_path, mask_path) pairs.
        class_names: One name per class id 0..K-1.
        palette: One RGB colour per class id.
        ignore_index: Mask value that marks unlabelled pixels.
        transform: ``(image (H, W, C), mask (H, W)) -> (image tensor, mask tensor)``;
            default :func:`~pixelwise.data.transforms.eval_transform`.
        mask_palette: Colour -> id map used to decode colour (RGB) masks; None refuses them.
    """

    def __init__(
        self,
        files: Sequence[tuple[Path, Path]],
        class_names: Sequence[str],
        palette: Sequence[Colour],
        ignore_index: int,
        transform: Transform | None = None,
        mask_palette: Mapping[Colour, int] | None = None,
    ) -> None:
        if len(palette) != len(class_names):
            raise ValueError(
                f"palette has {len(palette)} colours but there are {len(class_names)} classes; "
                "give one RGB colour per class"
            )
        if 0 <= ignore_index < len(class_names):
            raise ValueError(
                f"ignore_index={ignore_index} is a class id (0..{len(class_names) - 1}); choose a value "
                f"outside the class range, e.g. {255 if len(class_names) <= 255 else 65535}"
            )
        self.files = [(Path(i), Path(m)) for i, m in files]
        self.class_names = list(class_names)
        self.palette = [tuple(int(v) for v in c) for c in palette]
        self.ignore_index = int(ignore_index)
        if isinstance(transform, TrainTransform) and transform.ignore_index is None:
            transform = transform.with_ignore_index(self.ignore_index)  # pad masks with this set's ignore
        self.transform = transform if transform is not None else eval_transform()
        self.mask_palette = mask_palette

    @property
    def num_classes(self) -> int:
        """Number of classes K (ids 0..K-1)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} pairs, {self.num_classes} classes, ignore_index={self.ignore_index})"

    def mask_to_ids(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Map raw mask values (H, W) to class ids (H, W); identity by default."""
        return raw

    def read_mask_ids(self, path: Path) -> np.ndarray:
        """Read a mask file as int64 (H, W) class ids (not yet range-checked)."""
        return self.mask_to_ids(read_mask(path, self.mask_palette), path)

    def read_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Read and validate pair ``index``.

        Returns:
            (H, W, C) uint8/uint16 image and (H, W) int64 mask of ids in 0..K-1 or ignore_index.

        Raises:
            ValueError: Unreadable file, image/mask size mismatch, or a mask value out of range;
                the message names the file and the fix.
        """
        image_path, mask_path = self.files[index]
        image = read_image(image_path)
        mask = self.read_mask_ids(mask_path)
        if image.shape[:2] != mask.shape:
            raise ValueError(
                f"image {image_path} is {image.shape[0]}x{image.shape[1]} (HxW) but its mask {mask_path} "
                f"is {mask.shape[0]}x{mask.shape[1]}; a mask must have its image's size (resize it with "
                "nearest-neighbour interpolation, or fix the pairing)"
            )
        bad = (mask < 0) | ((mask >= self.num_classes) & (mask != self.ignore_index))
        if bad.any():
            values = np.unique(mask[bad])
            shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
            raise ValueError(
                f"mask {mask_path} has values {shown} outside the class ids 0..{self.num_classes - 1} "
                f"(ignore_index={self.ignore_index}); raise num_classes to {int(values.max()) + 1} if they "
                f"are classes, or set those pixels to {self.ignore_index}"
            )
        return image, mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.read_pair(index)
        return self.transform(image, mask)


# ---------------------------------------------------------------------------
# File matching and class files
# ---------------------------------------------------------------------------


def _list_by_stem(folder: Path, suffix_strip: str = "") -> dict[str, Path]:
    """Image files in ``folder`` keyed by stem (minus ``suffix_strip``); duplicate stems raise."""
    if not folder.is_dir():
        raise ValueError(f"folder {folder} does not exist")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        stem = path.stem.removesuffix(suffix_strip) if suffix_strip else path.stem
        if stem in found:
            raise ValueError(
                f"{found[stem].name} and {path.name} in {folder} share the name {stem!r}; keep one file per name"
            )
        found[stem] = path
    if not found:
        raise ValueError(f"folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return found


def _match(images: dict[str, Path], masks: dict[str, Path], image_dir: Path, mask_dir: Path) -> list[tuple[Path, Path]]:
    """Pair images with masks by name; any unmatched name raises a ValueError listing a few."""
    only_images = sorted(set(images) - set(masks))
    only_masks = sorted(set(masks) - set(images))
    if only_images or only_masks:
        parts = []
        if only_images:
            names = ", ".join(images[s].name for s in only_images[:5])
            parts.append(f"{len(only_images)} image(s) in {image_dir} have no mask in {mask_dir}: {names}")
        if only_masks:
            names = ", ".join(masks[s].name for s in only_masks[:5])
            parts.append(f"{len(only_masks)} mask(s) in {mask_dir} have no image in {image_dir}: {names}")
        raise ValueError("; ".join(parts) + "; images and masks are paired by file name without extension")
    return [(images[s], masks[s]) for s in sorted(images)]


@dataclass
class ClassInfo:
    """Class names, colours and ignore settings read from a ``classes.json`` file."""

    names: list[str]
    palette: list[Colour]
    ignore_index: int | None = None
    ignore_color: Colour | None = None


def read_classes_file(path: str | Path) -> ClassInfo:
    """Read a ``classes.json`` file.

    Format (class id = position in the list; ``ignore_index`` and ``ignore_color``, the
    colour of unlabelled pixels in RGB masks, are optional)::

        {"classes": [{"name": "background", "color": [0, 0, 0]},
                     {"name": "cell", "color": [255, 0, 0]}],
         "ignore_index": 255, "ignore_color": [255, 255, 255]}
    """
    path = Path(path)
    fix = 'expected {"classes": [{"name": "...", "color": [r, g, b]}, ...], "ignore_index": 255}'
    try:
        data = json.loads(path.read_text())
        entries = data["classes"]
        names = [str(e["name"]) for e in entries]
        palette = [tuple(int(v) for v in e["color"]) for e in entries]
        ignore_color = data.get("ignore_color")
        info = ClassInfo(
            names=names,
            palette=palette,
            ignore_index=None if data.get("ignore_index") is None else int(data["ignore_index"]),
            ignore_color=None if ignore_color is None else tuple(int(v) for v in ignore_color),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read classes file {path} ({e!r}); {fix}") from e
    if not names or any(len(c) != 3 for c in palette):
        raise ValueError(f"classes file {path} needs at least one class and RGB triples as colours; {fix}")
    return info


def write_classes_file(path: str | Path, info: ClassInfo) -> Path:
    """Write a ``classes.json`` file (format of :func:`read_classes_file`) atomically."""
    data: dict = {"classes": [{"name": n, "color": list(c)} for n, c in zip(info.names, info.palette)]}
    if info.ignore_index is not None:
        data["ignore_index"] = info.ignore_index
    if info.ignore_color is not None:
        data["ignore_color"] = list(info.ignore_color)
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _find_classes_file(root: Path) -> Path | None:
    for folder in (root, root.parent):
        if (folder / CLASSES_FILE).is_file():
            return folder / CLASSES_FILE
    return None


def mask_values(mask_paths: Sequence[Path]) -> np.ndarray:
    """Sorted distinct raw values over all readable masks (unreadable ones are skipped: check_dataset lists them)."""
    values: set[int] = set()
    for path in mask_paths:
        try:
            values.update(np.unique(read_mask(path)).tolist())
        except ValueError:
            continue
    if not values:
        raise ValueError(f"no mask under {Path(mask_paths[0]).parent} could be read; run `pixelwise check-data` to see why")
    return np.array(sorted(values), dtype=np.int64)


BINARY_FOREGROUND = (255, 65535)
"""Foreground value of 8- and 16-bit binary masks (0 = background) without a classes file."""


def infer_classes(mask_paths: Sequence[Path], ignore_index: int) -> tuple[int, int | None]:
    """Number of classes from the mask values, and whether the masks look binary. Reads every mask.

    Returns:
        ``(K, foreground)``: K = 1 + the largest value other than ``ignore_index``;
        ``foreground`` is 255 (65535) when the masks hold exactly the values 0 and 255 (0 and
        65535), else None. The caller decides whether to read such masks as binary.
    """
    values = mask_values(mask_paths)
    binary = len(values) == 2 and values[0] == 0 and values[1] in BINARY_FOREGROUND
    labels = values[values != ignore_index]
    if not labels.size and not binary:
        raise ValueError(
            f"every mask under {Path(mask_paths[0]).parent} holds only ignore_index={ignore_index}; "
            "nothing to learn from"
        )
    return int(labels.max()) + 1 if labels.size else 0, int(values[1]) if binary else None


@functools.cache
def notice(message: str) -> None:
    """Tell the user (once per message) how the data were read: logged as a warning of "pixelwise"."""
    logging.getLogger("pixelwise").warning(message)


# ---------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------


class FolderDataset(SegmentationDataset):
    """Your own data: ``root/images/*`` and ``root/masks/*`` paired by file name without extension.

    Any of .png .jpg .jpeg .tif .tiff .bmp. Masks hold class ids (grey or palette PNG); colour
    masks work when a palette is known (argument or classes file), each colour mapping to its
    class id and the file's ``ignore_color`` to ``ignore_index``.

    Classes come from, in order: the arguments; a ``classes.json`` in ``root`` or its parent
    (format in :func:`read_classes_file`; the parent lets ``root/{train,val}`` share one);
    otherwise ``num_classes`` is inferred as 1 + the largest mask value, which reads every
    mask once when the data set is built (a few seconds per thousand 512x512 PNG masks; write a
    classes file or pass ``num_classes`` to skip it). Default names are ``class_0``..., default
    colours the VOC colour map. Masks holding only 0 and 255 (or 0 and 65535), with no classes
    file, ``num_classes`` or ``ignore_index`` given, are binary: "background" (0) and
    "foreground" (255 or 65535 -> id 1); a one-line note says so.

    Args:
        root: Data set folder.
        images: Image sub-folder name.
        masks: Mask sub-folder name.
        num_classes: Number of classes K.
        ignore_index: Unlabelled mask value; None takes the classes file's, else 255.
        class_names: K class names.
        palette: K RGB colours.
        transform: Joint transform; default :func:`~pixelwise.data.transforms.eval_transform`.
        infer_from: Masks to infer the classes from when nothing gives them (default: this
            folder's), so that several splits agree.
    """

    def __init__(
        self,
        root: str | Path,
        images: str = "images",
        masks: str = "masks",
        num_classes: int | None = None,
        ignore_index: int | None = None,
        class_names: Sequence[str] | None = None,
        palette: Sequence[Colour] | None = None,
        transform: Transform | None = None,
        infer_from: Sequence[Path] | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"data set folder {self.root} does not exist")
        image_dir, mask_dir = self.root / images, self.root / masks
        for folder, what in ((image_dir, "images"), (mask_dir, "masks")):
            if not folder.is_dir():
                raise ValueError(
                    f"{what} folder {folder} does not exist; expected {self.root}/{images}/ and "
                    f"{self.root}/{masks}/ with matching file names"
                )
        files = _match(_list_by_stem(image_dir), _list_by_stem(mask_dir), image_dir, mask_dir)

        classes_path = _find_classes_file(self.root)
        info = read_classes_file(classes_path) if classes_path is not None else None
        default_ignore = ignore_index is None and (info is None or info.ignore_index is None)
        if ignore_index is None:
            ignore_index = info.ignore_index if info is not None and info.ignore_index is not None else 255
        explicit_palette = palette if palette is not None else (info.palette if info is not None else None)
        if class_names is None and info is not None:
            class_names = info.names
        known = [n for n in (num_classes,
                             None if class_names is None else len(class_names),
                             None if explicit_palette is None else len(explicit_palette)) if n is not None]
        if len(set(known)) > 1:
            raise ValueError(
                f"num_classes={num_classes}, {len(class_names or [])} class names and "
                f"{len(explicit_palette or [])} palette colours disagree"
                + (f" (classes file {classes_path})" if classes_path else "")
                + "; give the same number of classes everywhere"
            )
        mask_palette = None
        if explicit_palette is not None:
            mask_palette = {tuple(int(v) for v in c): i for i, c in enumerate(explicit_palette)}
            if info is not None and info.ignore_color is not None:
                mask_palette[info.ignore_color] = ignore_index
        self.binary_foreground: int | None = None
        if known:
            k = known[0]
        else:
            masks_read = list(infer_from) if infer_from is not None else [m for _, m in files]
            k, foreground = infer_classes(masks_read, ignore_index)
            if foreground is not None and default_ignore:
                k, self.binary_foreground = 2, foreground
                class_names, explicit_palette = ["background", "foreground"], [(0, 0, 0), (255, 255, 255)]
                notice(
                    f"masks in {mask_dir} hold only 0 and {foreground} and there is no {CLASSES_FILE}: reading them as "
                    f"binary, background (0) and foreground ({foreground}); write a {CLASSES_FILE} to set the classes"
                )
            elif default_ignore and k > ignore_index:
                raise ValueError(
                    f"masks in {mask_dir} hold values up to {k - 1}, so the default ignore_index {ignore_index} is "
                    f"a class id; write a {CLASSES_FILE} (in {self.root}) naming the classes and an "
                    f"ignore_index outside 0..{k - 1}, e.g. 65535"
                )
        if k < 1:
            raise ValueError(f"num_classes must be >= 1, got {k}")
        super().__init__(
            files,
            class_names=list(class_names) if class_names is not None else [f"class_{i}" for i in range(k)],
            palette=list(explicit_palette) if explicit_palette is not None else voc_colormap(k),
            ignore_index=ignore_index,
            transform=transform,
            mask_palette=mask_palette,
        )

    def mask_to_ids(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Binary masks: foreground (255 or 65535) -> 1; otherwise the values are the ids."""
        if self.binary_foreground is None:
            return raw
        return np.where(raw == self.binary_foreground, 1, raw)


CAMVID_CLASSES = [
    ("Sky", (128, 128, 128)),
    ("Building", (128, 0, 0)),
    ("Pole", (192, 192, 128)),
    ("Road", (128, 64, 128)),
    ("Sidewalk", (60, 40, 222)),
    ("Tree", (128, 128, 0)),
    ("SignSymbol", (192, 128, 128)),
    ("Fence", (64, 64, 128)),
    ("Car", (64, 0, 128)),
    ("Pedestrian", (64, 64, 0)),
    ("Bicyclist", (0, 128, 192)),
]


class CamVid(SegmentationDataset):
    """CamVid road scenes in the SegNet layout: ``root/{split}/*.png`` + ``root/{split}annot/*.png``.

    11 classes (Sky ... Bicyclist); mask value 11 (Unlabelled) is ``ignore_index``.

    Args:
        root: Folder holding ``train/``, ``trainannot/``, ``val/``, ``valannot/`` (``test/``...).
        split: "train", "val" or "test".
        transform: Joint transform; default :func:`~pixelwise.data.transforms.eval_transform`.
    """

    def __init__(self, root: str | Path, split: str = "train", transform: Transform | None = None) -> None:
        self.root, self.split = Path(root), split
        image_dir, mask_dir = self.root / split, self.root / f"{split}annot"
        for folder in (image_dir, mask_dir):
            if not folder.is_dir():
                raise ValueError(
                    f"CamVid folder {folder} does not exist; expected {self.root}/{split}/ and "
                    f"{self.root}/{split}annot/ (SegNet layout), split one of train, val, test"
                )
        files = _match(_list_by_stem(image_dir), _list_by_stem(mask_dir), image_dir, mask_dir)
        super().__init__(
            files,
            class_names=[n for n, _ in CAMVID_CLASSES],
            palette=[c for _, c in CAMVID_CLASSES],
            ignore_index=11,
            transform=transform,
        )


class ISBI2012(SegmentationDataset):
    """ISBI 2012 EM slices: ``root/images/NN.png`` (grey) + ``root/labels/NN.png``.

    Label 255 (cell interior) -> class 1 "cell", 0 (membrane) -> class 0 "membrane";
    ``ignore_index`` 255 (never present in the labels). Images have C = 1. ``cell_class``
    asks evaluation for the challenge's segment measures (Rand error, VI) of the cells.

    Args:
        root: Folder holding ``images/`` and ``labels/``.
        indices: Positions in the name-sorted slice list to keep (e.g. a train/val split);
            None keeps all.
        transform: Joint transform; default :func:`~pixelwise.data.transforms.eval_transform`.
    """

    cell_class = 1

    def __init__(
        self, root: str | Path, indices: Sequence[int] | None = None, transform: Transform | None = None
    ) -> None:
        self.root = Path(root)
        image_dir, mask_dir = self.root / "images", self.root / "labels"
        for folder in (image_dir, mask_dir):
            if not folder.is_dir():
                raise ValueError(f"ISBI 2012 folder {folder} does not exist; expected {self.root}/images/ and /labels/")
        files = _match(_list_by_stem(image_dir), _list_by_stem(mask_dir), image_dir, mask_dir)
        if indices is not None:
            bad = [i for i in indices if not -len(files) <= i < len(files)]
            if bad:
                raise ValueError(f"indices {bad[:5]} are out of range for {len(files)} slices in {image_dir}")
            files = [files[i] for i in indices]
        super().__init__(files, class_names=["membrane", "cell"], palette=[(0, 0, 0), (255, 255, 255)],
                         ignore_index=255, transform=transform)

    def mask_to_ids(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """0 (membrane) -> 0, 255 (cell) -> 1; any other value raises."""
        other = (raw != 0) & (raw != 255)
        if other.any():
            raise ValueError(
                f"ISBI label {path} has values {np.unique(raw[other])[:10].tolist()}; expected only "
                "0 (membrane) and 255 (cell): re-binarise the label image"
            )
        return (raw == 255).astype(np.int64)


VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]


class VOC(SegmentationDataset):
    """PASCAL VOC 2012 segmentation: ``JPEGImages/``, ``SegmentationClass/``, ``ImageSets/Segmentation/``.

    21 classes (background + 20 objects) with the VOC colour map; masks are palette PNGs whose
    indices are the ids, 255 (object borders) = ``ignore_index``.

    Args:
        root: The ``VOC2012`` folder (a ``VOCdevkit`` folder holding ``VOC2012/`` also works).
        split: Name of a list in ``ImageSets/Segmentation/`` ("train", "val", "trainval").
        transform: Joint transform; default :func:`~pixelwise.data.transforms.eval_transform`.
    """

    def __init__(self, root: str | Path, split: str = "train", transform: Transform | None = None) -> None:
        root = Path(root)
        if not (root / "JPEGImages").is_dir() and (root / "VOC2012" / "JPEGImages").is_dir():
            root = root / "VOC2012"
        self.root, self.split = root, split
        list_dir = root / "ImageSets" / "Segmentation"
        list_file = list_dir / f"{split}.txt"
        if not list_file.is_file():
            available = sorted(p.stem for p in list_dir.glob("*.txt")) if list_dir.is_dir() else []
            raise ValueError(
                f"VOC split list {list_file} does not exist (available: {available or 'none'}); root must be "
                "the VOC2012 folder with JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/"
            )
        names = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        if not names:
            raise ValueError(f"VOC split list {list_file} is empty")
        files = [(root / "JPEGImages" / f"{n}.jpg", root / "SegmentationClass" / f"{n}.png") for n in names]
        missing = [p.name for pair in files for p in pair if not p.is_file()]
        if missing:
            raise ValueError(
                f"{len(missing)} file(s) listed in {list_file} are missing: {', '.join(missing[:5])}"
            )
        super().__init__(files, class_names=VOC_CLASSES, palette=voc_colormap(21), ignore_index=255,
                         transform=transform)


# Cityscapes (cityscapesScripts helpers/labels.py): the 19 training classes as
# (name, labelId, colour); trainId = position; every other labelId -> 255.
CITYSCAPES_CLASSES = [
    ("road", 7, (128, 64, 128)),
    ("sidewalk", 8, (244, 35, 232)),
    ("building", 11, (70, 70, 70)),
    ("wall", 12, (102, 102, 156)),
    ("fence", 13, (190, 153, 153)),
    ("pole", 17, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)),
    ("traffic sign", 20, (220, 220, 0)),
    ("vegetation", 21, (107, 142, 35)),
    ("terrain", 22, (152, 251, 152)),
    ("sky", 23, (70, 130, 180)),
    ("person", 24, (220, 20, 60)),
    ("rider", 25, (255, 0, 0)),
    ("car", 26, (0, 0, 142)),
    ("truck", 27, (0, 0, 70)),
    ("bus", 28, (0, 60, 100)),
    ("train", 31, (0, 80, 100)),
    ("motorcycle", 32, (0, 0, 230)),
    ("bicycle", 33, (119, 11, 32)),
]
CITYSCAPES_LABEL_TO_TRAIN = np.full(256, 255, dtype=np.int64)
for _train_id, (_, _label_id, _) in enumerate(CITYSCAPES_CLASSES):
    CITYSCAPES_LABEL_TO_TRAIN[_label_id] = _train_id


class Cityscapes(SegmentationDataset):
    """Cityscapes fine annotations, labelIds mapped to the 19 official trainIds (others -> 255).

    Layout: ``root/leftImg8bit/{split}/{city}/*_leftImg8bit.png`` and
    ``root/gtFine/{split}/{city}/*_gtFine_labelIds.png``.

    Args:
        root: Folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: "train", "val" or "test".
        transform: Joint transform; default :func:`~pixelwise.data.transforms.eval_transform`.
    """

    def __init__(self, root: str | Path, split: str = "train", transform: Transform | None = None) -> None:
        self.root, self.split = Path(root), split
        image_root = self.root / "leftImg8bit" / split
        if not image_root.is_dir():
            raise ValueError(
                f"Cityscapes folder {image_root} does not exist; expected root/leftImg8bit/{split}/<city>/ "
                f"and root/gtFine/{split}/<city>/"
            )
        images = sorted(image_root.glob("*/*_leftImg8bit.png"))
        if not images:
            raise ValueError(f"no *_leftImg8bit.png images under {image_root}/<city>/")
        files = []
        for image in images:
            city = image.parent.name
            stem = image.name.removesuffix("_leftImg8bit.png")
            files.append((image, self.root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"))
        missing = [m.name for _, m in files if not m.is_file()]
        if missing:
            raise ValueError(
                f"{len(missing)} image(s) under {image_root} have no gtFine labelIds mask: {', '.join(missing[:5])}"
            )
        super().__init__(
            files,
            class_names=[n for n, _, _ in CITYSCAPES_CLASSES],
            palette=[c for _, _, c in CITYSCAPES_CLASSES],
            ignore_index=255,
            transform=transform,
        )

    def mask_to_ids(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """labelIds -> trainIds (official table); unknown ids -> 255."""
        return np.where((raw >= 0) & (raw < 256), CITYSCAPES_LABEL_TO_TRAIN[np.clip(raw, 0, 255)], 255)


# ---------------------------------------------------------------------------
# Checking a whole data set
# ---------------------------------------------------------------------------


@dataclass
class DataCheck:
    """What :func:`check_dataset` found.

    Attributes:
        num_pairs: Number of (image, mask) pairs.
        class_names: Name of each class id.
        ignore_index: The unlabelled value.
        sizes: Pairs per image size (H, W).
        channels: Pairs per image channel count.
        dtypes: Pairs per image pixel type ("uint8", "uint16").
        class_pixels: Pixels per class id, over the readable, valid pairs.
        ignore_pixels: Pixels equal to ``ignore_index``.
        problems: One message per bad pair, naming the file.
    """

    num_pairs: int
    class_names: list[str]
    ignore_index: int
    sizes: dict[tuple[int, int], int] = field(default_factory=dict)
    channels: dict[int, int] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)
    class_pixels: list[int] = field(default_factory=list)
    ignore_pixels: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no pair had a problem."""
        return not self.problems

    def format(self) -> str:
        """Human-readable report: counts, sizes, a class table and the problems."""
        total = sum(self.class_pixels) + self.ignore_pixels
        lines = [
            f"{self.num_pairs} pairs, {len(self.problems)} with problems",
            "image sizes (HxW): " + ", ".join(f"{h}x{w} ({n})" for (h, w), n in sorted(self.sizes.items())),
            "channels: " + ", ".join(f"{c} ({n})" for c, n in sorted(self.channels.items()))
            + "; pixel types: " + ", ".join(f"{d} ({n})" for d, n in sorted(self.dtypes.items())),
            "",
        ]
        width = max([len("class"), len("(ignore)"), *(len(n) for n in self.class_names)])
        lines.append(f"{'id':>5}  {'class':<{width}}  {'pixels':>14}  {'share':>7}")
        rows = [(str(i), n, p) for i, (n, p) in enumerate(zip(self.class_names, self.class_pixels))]
        rows.append((str(self.ignore_index), "(ignore)", self.ignore_pixels))
        for i, name, pixels in rows:
            share = f"{100 * pixels / total:6.2f}%" if total else "      —"
            absent = "  (absent)" if pixels == 0 and name != "(ignore)" else ""
            lines.append(f"{i:>5}  {name:<{width}}  {pixels:>14,}  {share:>7}{absent}")
        if self.problems:
            lines += ["", "problems:"] + [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def check_dataset(dataset: SegmentationDataset | Subset, progress: bool = False) -> DataCheck:
    """Read every pair of ``dataset`` and report sizes, channels, class pixels and all problems.

    Unlike iterating the data set, a bad pair does not stop the check: each one adds a
    message (unreadable file, size mismatch, mask value out of range) and the rest go on.

    Args:
        dataset: A pixelwise data set, or a ``torch.utils.data.Subset`` of one.
        progress: Show a progress bar.

    Returns:
        A :class:`DataCheck`; ``.format()`` gives the text report.
    """
    indices: Sequence[int]
    if isinstance(dataset, Subset):
        base, indices = dataset.dataset, dataset.indices
    else:
        base, indices = dataset, range(len(dataset))
    if not isinstance(base, SegmentationDataset):
        raise ValueError(
            f"check_dataset needs a pixelwise data set (FolderDataset, CamVid, ...), got {type(base).__name__}"
        )
    sizes: Counter = Counter()
    channels: Counter = Counter()
    dtypes: Counter = Counter()
    pixels = np.zeros(base.num_classes, dtype=np.int64)
    ignore_pixels = 0
    problems = []
    if progress:
        from rich.progress import track

        indices = track(indices, description="checking data", total=len(indices))
    for i in indices:
        try:
            image, mask = base.read_pair(i)
        except ValueError as e:
            problems.append(str(e))
            continue
        sizes[image.shape[:2]] += 1
        channels[image.shape[2]] += 1
        dtypes[str(image.dtype)] += 1
        valid = mask != base.ignore_index
        pixels += np.bincount(mask[valid], minlength=base.num_classes)
        ignore_pixels += int((~valid).sum())
    return DataCheck(
        num_pairs=len(dataset),
        class_names=list(base.class_names),
        ignore_index=base.ignore_index,
        sizes=dict(sizes),
        channels=dict(channels),
        dtypes=dict(dtypes),
        class_pixels=[int(p) for p in pixels],
        ignore_pixels=ignore_pixels,
        problems=problems,
    )


# ---------------------------------------------------------------------------
# One entry point for the CLI
# ---------------------------------------------------------------------------

DATASET_FORMS = (
    "camvid:PATH (SegNet layout), isbi2012:PATH, voc:PATH (VOC2012 folder), cityscapes:PATH, "
    "or a folder PATH with images/ + masks/ (or train/ and val/ sub-folders that each have them)"
)
ISBI_VAL_SLICES = 5
HOLDOUT_SEED = 0


def _is_folder_dataset(path: Path) -> bool:
    return (path / "images").is_dir() and (path / "masks").is_dir()


def holdout_indices(n: int, val_fraction: float) -> list[int]:
    """Positions of the pairs held out for validation: ``round(n * val_fraction)`` (at least 1,
    at most n - 1) of ``n`` name-sorted pairs, drawn with a fixed seed (the same every run)."""
    if n < 2:
        raise ValueError("a validation split needs at least 2 pairs")
    count = min(n - 1, max(1, round(n * val_fraction)))
    return sorted(np.random.default_rng(HOLDOUT_SEED).permutation(n)[:count].tolist())


def isbi2012_split(root: str | Path, split: str) -> range | None:
    """Slice positions of ``split`` in the ISBI 2012 folder ``root``: ``train`` all but the
    last :data:`ISBI_VAL_SLICES`, ``val`` those, ``all`` None (every slice)."""
    n = len(ISBI2012(root).files)
    if n <= ISBI_VAL_SLICES:
        raise ValueError(f"isbi2012:{root} has {n} slices; a train/val split needs more than {ISBI_VAL_SLICES}")
    splits = {"train": range(n - ISBI_VAL_SLICES), "val": range(n - ISBI_VAL_SLICES, n), "all": None}
    if split not in splits:
        raise ValueError(f"split {split!r} is not one of {sorted(splits)} for isbi2012")
    return splits[split]


def open_dataset(
    spec: str | Path, split: str, transform: Transform | None = None, val_fraction: float = 0.2
) -> SegmentationDataset:
    """Open a data set from a command-line style spec.

    Forms: ``camvid:PATH``, ``isbi2012:PATH``, ``voc:PATH``, ``cityscapes:PATH``, or a folder
    ``PATH`` for :class:`FolderDataset`. A folder with ``train/`` and ``val/`` sub-folders,
    each holding ``images/`` + ``masks/``, opens ``PATH/split``. A folder with ``images/`` +
    ``masks/`` itself holds out ``val_fraction`` of its pairs (whole files, a fixed seeded draw,
    see :func:`holdout_indices`) as "val"; "train" is the rest, "all" every pair; a note names
    the held-out files. ISBI 2012 has no official split: "train" is every slice but the last 5,
    "val" the last 5, "all" every slice.

    Args:
        spec: Data set spec.
        split: "train", "val" (or "test", "all", or a VOC list name).
        transform: Joint transform; default :func:`~pixelwise.data.transforms.eval_transform`.
        val_fraction: Share of a plain folder's pairs held out for "val", in (0, 1).

    Returns:
        The data set.
    """
    text = str(spec)
    prefix, sep, rest = text.partition(":")
    kind = prefix.lower() if sep else ""
    if kind == "camvid":
        return CamVid(rest, split, transform=transform)
    if kind == "voc":
        return VOC(rest, split, transform=transform)
    if kind == "cityscapes":
        return Cityscapes(rest, split, transform=transform)
    if kind == "isbi2012":
        return ISBI2012(rest, indices=isbi2012_split(rest, split), transform=transform)
    path = Path(text)
    if sep and len(prefix) > 1 and prefix.isidentifier() and not path.exists():
        raise ValueError(f"unknown data set {text!r}: prefix {prefix!r} is not recognised; use {DATASET_FORMS}")
    if not text:
        raise ValueError(f"the data set is empty; use {DATASET_FORMS}")
    if not path.is_dir():
        raise ValueError(f"data set folder {path} does not exist; use {DATASET_FORMS}")
    split_dirs = [d for d in ("train", "val") if _is_folder_dataset(path / d)]
    if split_dirs == ["train", "val"]:
        if not _is_folder_dataset(path / split):
            raise ValueError(f"split {split!r} has no folder {path / split} with images/ and masks/")
        # Infer the classes over all splits so that train and val agree.
        masks = [m for d in sorted(path.iterdir()) if _is_folder_dataset(d) for m in _list_by_stem(d / "masks").values()]
        return FolderDataset(path / split, transform=transform, infer_from=masks)
    if _is_folder_dataset(path):
        return _held_out_split(path, split, transform, val_fraction)
    raise ValueError(f"folder {path} has neither images/ + masks/ nor train/ and val/ sub-folders with them; "
                     f"use {DATASET_FORMS}")


def _held_out_split(path: Path, split: str, transform: Transform | None, val_fraction: float) -> FolderDataset:
    """Split ``path`` (images/ + masks/) into "train" and a held-out "val" (see :func:`open_dataset`)."""
    if split not in ("train", "val", "all"):
        raise ValueError(
            f"split {split!r} of folder {path}: a folder without train/ and val/ sub-folders has the splits "
            "train, val (held out) and all"
        )
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r} must be a number between 0 and 1 (exclusive), e.g. 0.2")
    whole = FolderDataset(path, transform=transform)
    if split == "all":
        return whole
    n = len(whole.files)
    if n < 2:
        raise ValueError(
            f"folder {path} has {n} image/mask pair; holding out a validation split needs at least 2: add "
            "images, or make train/ and val/ sub-folders (each with images/ and masks/)"
        )
    held = holdout_indices(n, val_fraction)
    names = [whole.files[i][0].name for i in held]
    notice(
        f"{path} has no train/ and val/ sub-folders: {len(held)} of its {n} pairs (val_fraction={val_fraction}) "
        f"are held out for validation: {', '.join(names[:10])}{', ...' if len(names) > 10 else ''}"
    )
    keep = held if split == "val" else sorted(set(range(n)) - set(held))
    part = copy.copy(whole)  # same classes and transform, without reading the masks again
    part.files = [whole.files[i] for i in keep]
    return part
