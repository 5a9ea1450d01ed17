"""Scribble annotations: a folder layout, a training set of (image, sparse labels), a check.

Folder layout (the common scribble format: a label PNG per image, ``ignore_index`` on
every unmarked pixel, as in the ScribbleSup release for PASCAL VOC)::

    root/classes.json                     names, colours and ignore_index (recommended)
    root/train/images/NAME.png
    root/train/scribbles/NAME.png         class id on stroke pixels, ignore_index elsewhere
    root/train/masks/NAME.png             optional dense masks: only to measure propagated labels
    root/val/images/NAME.png, root/val/masks/NAME.png   dense, for validation

:func:`write_scribble_dataset` makes such a folder from any dense data set with simulated
strokes (:func:`pixelwise.weak.simulate_scribbles`); ``pixelwise check-data ROOT`` reports
the labelled fraction per image and per class.

Example:
    >>> root = write_scribble_dataset("camvid:../shared/data/camvid", "runs/camvid_scribbles", density=0.5)
    >>> train = open_scribbles(root, "train")
    >>> print(check_scribbles(train).format())
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pixelwise.data.datasets import (
    ClassInfo,
    FolderDataset,
    SegmentationDataset,
    Transform,
    open_dataset,
    write_classes_file,
)
from pixelwise.data.transforms import TrainTransform, eval_transform
from pixelwise.io import atomic_folder, write_mask

SCRIBBLES = "scribbles"
STROKE_OFFSET = 1 << 15  # packed targets: a stroke pixel of class c is STROKE_OFFSET + c


def is_scribble_folder(spec: str | Path, split: str = "train") -> bool:
    """True when ``spec`` is a folder in the scribble layout (``spec/split/scribbles/`` exists)."""
    return (Path(str(spec)) / split / SCRIBBLES).is_dir()


class ScribbleDataset(Dataset):
    """Training images with sparse labels: ``(image, target)`` through ``transform``.

    The target is the scribble map, or, once :attr:`labels` is set (ScribbleSup's propagated
    labels, one (H, W) array per image), those labels; with :attr:`mark_strokes` also set, the
    labels with every stroke pixel of class c packed as ``STROKE_OFFSET + c`` (a loss that
    treats strokes and propagated pixels apart unpacks them). Carries the class description of a
    :class:`~pixelwise.data.SegmentationDataset` (``class_names``, ``palette``,
    ``num_classes``, ``ignore_index``, ``files``).

    Args:
        source: Data set whose pairs give the images (and, without ``scribbles``, the
            scribble maps as their masks).
        scribbles: One scribble map per image; None reads them from ``source``'s masks.
        dense: Data set with the same images' dense masks, if known (to score propagation).
        transform: Joint transform; default :func:`~pixelwise.data.transforms.eval_transform`.
    """

    def __init__(
        self,
        source: SegmentationDataset,
        scribbles: Sequence[np.ndarray] | None = None,
        dense: SegmentationDataset | None = None,
        transform: Transform | None = None,
    ) -> None:
        if scribbles is not None and len(scribbles) != len(source):
            raise ValueError(f"{len(scribbles)} scribble maps for {len(source)} images; give one per image")
        if dense is not None and len(dense) != len(source):
            raise ValueError(f"{len(dense)} dense masks for {len(source)} images; give one per image")
        self.source, self.dense, self._scribbles = source, dense, scribbles
        self.class_names, self.palette = source.class_names, source.palette
        self.num_classes, self.ignore_index, self.files = source.num_classes, source.ignore_index, source.files
        if isinstance(transform, TrainTransform) and transform.ignore_index is None:
            transform = transform.with_ignore_index(self.ignore_index)
        self.transform = transform or eval_transform()
        self.labels: list[np.ndarray] | None = None
        self.mark_strokes = False

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:
        return f"ScribbleDataset({len(self)} images, {self.num_classes} classes, ignore_index={self.ignore_index})"

    def image(self, index: int) -> np.ndarray:
        """(H, W, C) image ``index``."""
        return self.source.read_pair(index)[0]

    def read_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, C) image and (H, W) int64 scribble map ``index`` (validated)."""
        image, mask = self.source.read_pair(index)
        if self._scribbles is None:
            return image, mask
        scribbles = np.asarray(self._scribbles[index], dtype=np.int64)
        if scribbles.shape != image.shape[:2]:
            raise ValueError(f"scribbles of {self.files[index][0]} are {scribbles.shape}, the image {image.shape[:2]}")
        return image, scribbles

    def true_mask(self, index: int) -> np.ndarray | None:
        """(H, W) dense mask of image ``index``, or None when unknown."""
        return None if self.dense is None else self.dense.read_pair(index)[1]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, scribbles = self.read_pair(index)
        if self.labels is None:
            return self.transform(image, scribbles)
        target = np.asarray(self.labels[index], dtype=np.int64)
        if self.mark_strokes:
            strokes = scribbles != self.ignore_index
            target = np.where(strokes, STROKE_OFFSET + scribbles, target)
        return self.transform(image, target)


def open_scribbles(spec: str | Path, split: str = "train", transform: Transform | None = None) -> ScribbleDataset:
    """The scribble set ``spec/split`` (layout in the module docstring), dense masks attached when present."""
    root = Path(str(spec)) / split
    if not is_scribble_folder(spec, split):
        raise ValueError(f"{root} has no {SCRIBBLES}/ folder; expected {root}/images/ and {root}/{SCRIBBLES}/ "
                         "(see pixelwise.data.scribbles)")
    source = FolderDataset(root, masks=SCRIBBLES)
    dense = None
    if (root / "masks").is_dir():
        dense = FolderDataset(root, num_classes=source.num_classes, ignore_index=source.ignore_index,
                              class_names=source.class_names, palette=source.palette)
        if [p for p, _ in dense.files] != [p for p, _ in source.files]:
            raise ValueError(f"{root}/masks/ and {root}/{SCRIBBLES}/ must hold the same image names")
    return ScribbleDataset(source, dense=dense, transform=transform)


def simulated_scribbles(
    dense: SegmentationDataset,
    density: float = 0.5,
    width: int = 3,
    min_area: int = 0,
    seed: int = 0,
    transform: Transform | None = None,
) -> ScribbleDataset:
    """Strokes simulated from every mask of ``dense`` (image i uses seed (seed, i))."""
    from pixelwise.weak.simulate import simulate_scribbles

    maps = [
        simulate_scribbles(dense.read_pair(i)[1], dense.ignore_index, density, width, min_area, np.random.default_rng([seed, i]))
        for i in range(len(dense))
    ]
    return ScribbleDataset(dense, scribbles=[m.astype(np.uint8) for m in maps], dense=dense, transform=transform)


def write_scribble_dataset(
    data: str | Path,
    root: str | Path,
    density: float = 0.5,
    width: int = 3,
    min_area: int = 0,
    seed: int = 0,
    train_split: str = "train",
    val_split: str = "val",
) -> Path:
    """Write a scribble folder from a dense data set: images, simulated scribbles, masks, classes.json.

    ``root`` is written whole into a temporary folder and renamed, so it is complete or absent.
    Masks are kept (train: to score propagation; val: to validate).
    """
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(f"scribble data set folder {root} already exists and is not empty; delete it or pick another")
    train = simulated_scribbles(open_dataset(data, train_split), density, width, min_area, seed)
    val = open_dataset(data, val_split)
    if max(train.num_classes, train.ignore_index) > 255:
        raise ValueError("write_scribble_dataset writes 8-bit PNG label maps: class ids and ignore_index must be <= 255")
    with atomic_folder(root) as tmp:
        for split, dataset in (("train", train), ("val", val)):
            for sub in ("images", "masks") + ((SCRIBBLES,) if split == "train" else ()):
                (tmp / split / sub).mkdir(parents=True)
            for i, (image_path, _) in enumerate(dataset.files):
                stem = Path(image_path).stem
                shutil.copyfile(image_path, tmp / split / "images" / f"{stem}{Path(image_path).suffix}")
                mask = dataset.true_mask(i) if split == "train" else dataset.read_pair(i)[1]
                write_mask(tmp / split / "masks" / f"{stem}.png", mask, train.palette)
                if split == "train":
                    write_mask(tmp / split / SCRIBBLES / f"{stem}.png", dataset.read_pair(i)[1], train.palette)
        write_classes_file(tmp / "classes.json", ClassInfo(names=list(train.class_names), palette=list(train.palette),
                                                           ignore_index=train.ignore_index))
    return root


@dataclass
class ScribbleCheck:
    """What :func:`check_scribbles` found.

    Attributes:
        class_names: Name of each class id.
        fractions: Labelled fraction of each readable image, keyed by image file name.
        class_pixels: Scribbled pixels per class.
        class_images: Images with at least one stroke of each class.
        total_pixels: Pixels of all readable images.
        problems: One message per unreadable or invalid pair, naming the file.
    """

    class_names: list[str]
    fractions: dict[str, float] = field(default_factory=dict)
    class_pixels: list[int] = field(default_factory=list)
    class_images: list[int] = field(default_factory=list)
    total_pixels: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self, per_image: int = 10) -> str:
        """Text report: overall and per-image labelled fraction (the ``per_image`` lowest), per-class table."""
        marked = sum(self.class_pixels)
        values = sorted(self.fractions.items(), key=lambda kv: (kv[1], kv[0]))
        overall = marked / self.total_pixels if self.total_pixels else 0.0
        lines = [f"{len(self.fractions)} scribbled images, {len(self.problems)} with problems; "
                 f"labelled fraction {100 * overall:.2f}% of all pixels"]
        if values:
            f = np.array([v for _, v in values])
            lines.append(f"per image: min {100 * f.min():.2f}%, median {100 * np.median(f):.2f}%, max {100 * f.max():.2f}%")
            lines.append(f"lowest {min(per_image, len(values))}: " + ", ".join(f"{n} {100 * v:.2f}%" for n, v in values[:per_image]))
        width = max([len("class"), *(len(n) for n in self.class_names)])
        lines += ["", f"{'id':>5}  {'class':<{width}}  {'scribbled px':>13}  {'of marked':>9}  {'images':>6}"]
        for i, (name, pixels, images) in enumerate(zip(self.class_names, self.class_pixels, self.class_images)):
            share = f"{100 * pixels / marked:8.2f}%" if marked else "        —"
            lines.append(f"{i:>5}  {name:<{width}}  {pixels:>13,}  {share:>9}  {images:>6}" + ("  (never scribbled)" if not pixels else ""))
        if self.problems:
            lines += ["", "problems:"] + [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def check_scribbles(dataset: ScribbleDataset) -> ScribbleCheck:
    """Read every scribble map: labelled fraction per image and per class; bad pairs and
    images without a single stroke are listed as problems (they teach nothing)."""
    k = dataset.num_classes
    report = ScribbleCheck(class_names=list(dataset.class_names), class_pixels=[0] * k, class_images=[0] * k)
    pixels, images = np.zeros(k, np.int64), np.zeros(k, np.int64)
    for i in range(len(dataset)):
        name = Path(dataset.files[i][0]).name
        try:
            _, scribbles = dataset.read_pair(i)
        except ValueError as e:
            report.problems.append(str(e))
            continue
        marked = scribbles != dataset.ignore_index
        counts = np.bincount(scribbles[marked], minlength=k)
        pixels += counts
        images += counts > 0
        report.total_pixels += scribbles.size
        report.fractions[name] = float(marked.mean())
        if not marked.any():
            report.problems.append(f"{dataset.files[i][1]}: no scribbled pixel (all {dataset.ignore_index}); "
                                   "add strokes or drop the image")
    report.class_pixels, report.class_images = [int(p) for p in pixels], [int(n) for n in images]
    return report
