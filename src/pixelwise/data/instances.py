"""Instance segmentation data: one object id per pixel, a class per object.

A sample is ``(image (C, H, W) float, target)`` with ``target`` a dict of ``boxes`` (G, 4)
float ``(x1, y1, x2, y2)`` (pixel edges: a one-pixel object at (0, 0) is ``(0, 0, 1, 1)``),
``labels`` (G,) int64 class ids 1..K-1 (0 is background) and ``masks`` (G, H, W) uint8.

Readers:

* :class:`InstanceFolder`: ``root/images/NAME.*`` + ``root/instances/NAME.png`` (8/16-bit
  instance ids, 0 = background) + optional ``root/instances/NAME.json``
  ``{"classes": {"1": 2, "2": 1}}`` (class of each id; without it every id is class 1), and
  ``classes.json`` (names, colours; :func:`~pixelwise.data.read_classes_file`) in ``root`` or
  its parent.
* :class:`CocoInstances`: COCO JSON (polygons and RLE, through pycocotools); categories are
  renumbered 1..K-1 in id order; crowd regions are left out of the targets.
* :class:`ISBI2012Instances`: ISBI 2012 EM slices, each cell (4-connected component of the
  cell class) an instance.
* :class:`SyntheticInstances`: the synthetic shapes, each shape an instance.

:func:`semantic_to_instances` turns any semantic mask into instances by connected components.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch import Tensor
from torch.utils.data import Dataset

from pixelwise.data.datasets import ClassInfo, ISBI2012, isbi2012_split, _find_classes_file, _list_by_stem, _match, read_classes_file, voc_colormap, write_classes_file
from pixelwise.data.synthetic import make_synthetic_instances, synthetic_classes
from pixelwise.data.transforms import ToTensor, to_float
from pixelwise.io import atomic_folder, atomic_write, atomic_write_text, read_image, read_mask

Target = dict[str, Tensor]


def require_pycocotools() -> None:
    """Raise a clear ImportError when the optional pycocotools (COCO JSON and COCO AP) is missing."""
    try:
        import pycocotools  # noqa: F401
    except ImportError as err:
        raise ImportError('COCO data and metrics need pycocotools: pip install "pixelwise[instance]"') from err
INSTANCE_FORMS = (
    "coco:PATH (PATH/SPLIT.json + images in PATH/SPLIT/ or PATH/images/), isbi2012:PATH (cells), "
    "or a folder PATH with images/ + instances/ (or train/ and val/ sub-folders that each have them)"
)


def instances_to_target(ids: np.ndarray, classes: Mapping[int, int] | None = None) -> Target:
    """(H, W) instance ids (0 = background) and ``{id: class}`` -> target dict (ids in increasing order).

    ``classes=None`` makes every object class 1. An id without a class raises ``ValueError``.
    """
    ids = np.asarray(ids)
    present = [int(i) for i in np.unique(ids) if i != 0]
    if classes is None:
        classes = {i: 1 for i in present}
    missing = [i for i in present if i not in classes]
    if missing:
        raise ValueError(f"instance ids {missing[:5]} have no class; list every id under \"classes\" in the instance JSON")
    masks = np.stack([ids == i for i in present]) if present else np.zeros((0, *ids.shape), bool)
    boxes = np.zeros((len(present), 4), np.float32)
    for k, m in enumerate(masks):  # one bounding box per object from its row/column extents
        rows, cols = np.where(m.any(1))[0], np.where(m.any(0))[0]
        boxes[k] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return {
        "boxes": torch.from_numpy(boxes),
        "labels": torch.tensor([int(classes[i]) for i in present], dtype=torch.int64),
        "masks": torch.from_numpy(masks.astype(np.uint8)),
    }


def semantic_to_instances(
    mask: np.ndarray, ignore_index: int = 255, background: int = 0, connectivity: int = 1, min_area: int = 1
) -> tuple[np.ndarray, dict[int, int]]:
    """Instances of a semantic mask by connected components of each class.

    Args:
        mask: (H, W) class ids.
        ignore_index: value that is neither background nor an object.
        background: class id that is not an object.
        connectivity: 1 (4-neighbours) or 2 (8-neighbours).
        min_area: components with fewer pixels are dropped (become 0).

    Returns:
        (H, W) int32 instance ids 0..n (numbered class by class, then in raster order) and ``{id: class}``.
    """
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 (4-neighbours) or 2 (8-neighbours), got {connectivity}")
    mask = np.asarray(mask)
    ids = np.zeros(mask.shape, np.int32)
    classes: dict[int, int] = {}
    structure = ndimage.generate_binary_structure(2, connectivity)
    for cls in np.unique(mask):
        if cls in (background, ignore_index):
            continue
        components, n = ndimage.label(mask == cls, structure)
        areas = np.bincount(components.ravel(), minlength=n + 1)
        for comp in np.where(areas[1:] >= min_area)[0] + 1:
            new = len(classes) + 1
            ids[components == comp] = new
            classes[new] = int(cls)
    return ids, classes


class InstanceTransform:
    """Image (H, W, C) + target -> (C, H, W) float tensor (``(x - mean) / std``) and target; optional random horizontal flip."""

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None, hflip: bool = False) -> None:
        self.to_tensor = ToTensor(mean, std)
        self.hflip = hflip

    def __call__(self, image: np.ndarray, target: Target) -> tuple[Tensor, Target]:
        x = self.to_tensor.normalise(to_float(image))
        x = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))
        if self.hflip and torch.rand(()) < 0.5:
            w = x.shape[-1]
            x = x.flip(-1)
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
            target = {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}
        return x, target


class InstanceDataset(Dataset):
    """Common behaviour: ``read(i) -> (image (H, W, C), target)`` then the transform.

    Args:
        class_names: K names, 0 = background.
        palette: K RGB colours.
        transform: :class:`InstanceTransform` (default: none of its options).
    """

    def __init__(self, class_names: Sequence[str], palette: Sequence[Sequence[int]] | None = None, transform: Callable | None = None) -> None:
        self.class_names = list(class_names)
        self.palette = [tuple(int(v) for v in c) for c in (palette or voc_colormap(len(self.class_names)))]
        self.transform = transform if transform is not None else InstanceTransform()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def read(self, index: int) -> tuple[np.ndarray, Target]:
        raise NotImplementedError

    def check_target(self, target: Target, where: str) -> Target:
        bad = target["labels"][(target["labels"] < 1) | (target["labels"] >= self.num_classes)]
        if len(bad):
            raise ValueError(f"{where} has object classes {bad.unique().tolist()[:5]} outside 1..{self.num_classes - 1}; "
                             "fix the class ids or list more classes in classes.json")
        return target

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        image, target = self.read(index)
        return self.transform(image, target)


class InstanceFolder(InstanceDataset):
    """``root/images`` + ``root/instances`` (format in the module docstring)."""

    def __init__(self, root: str | Path, transform: Callable | None = None) -> None:
        self.root = Path(root)
        image_dir, id_dir = self.root / "images", self.root / "instances"
        for folder in (image_dir, id_dir):
            if not folder.is_dir():
                raise ValueError(f"instance folder {folder} does not exist; expected {self.root}/images/ and {self.root}/instances/")
        self.files = _match(_list_by_stem(image_dir), _list_by_stem(id_dir), image_dir, id_dir)
        classes_file = _find_classes_file(self.root)
        info = read_classes_file(classes_file) if classes_file else ClassInfo(["background", "object"], [(0, 0, 0), (255, 0, 0)])
        super().__init__(info.names, info.palette, transform)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> tuple[np.ndarray, Target]:
        image_path, id_path = self.files[index]
        image, ids = read_image(image_path), read_mask(id_path)
        if image.shape[:2] != ids.shape:
            raise ValueError(f"image {image_path} is {image.shape[:2]} but its instance map {id_path} is {ids.shape}; they must match")
        meta = id_path.with_suffix(".json")
        classes = None
        if meta.is_file():
            try:
                classes = {int(k): int(v) for k, v in json.loads(meta.read_text())["classes"].items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"cannot read {meta} ({e!r}); expected {{\"classes\": {{\"1\": 2, ...}}}}") from e
        return image, self.check_target(instances_to_target(ids, classes), str(id_path))


def write_instance_sample(folder: Path, name: str, image: np.ndarray, ids: np.ndarray, classes: Mapping[int, int]) -> None:
    """Write ``images/NAME.png``, ``instances/NAME.png`` (16-bit ids) and ``instances/NAME.json`` below ``folder``."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "instances").mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "images" / f"{name}.png", lambda tmp: Image.fromarray(np.squeeze(image)).save(tmp, format="PNG"))
    atomic_write(folder / "instances" / f"{name}.png", lambda tmp: Image.fromarray(np.asarray(ids, np.uint16)).save(tmp, format="PNG"))
    atomic_write_text(folder / "instances" / f"{name}.json", json.dumps({"classes": {str(k): int(v) for k, v in classes.items()}}))


class CocoInstances(InstanceDataset):
    """COCO-format instances: ``annotations`` JSON + an image folder (``file_name`` relative to it)."""

    def __init__(self, annotations: str | Path, images: str | Path, transform: Callable | None = None) -> None:
        require_pycocotools()
        from pycocotools.coco import COCO

        self.annotations, self.images = Path(annotations), Path(images)
        if not self.annotations.is_file():
            raise ValueError(f"COCO annotation file {self.annotations} does not exist")
        if not self.images.is_dir():
            raise ValueError(f"COCO image folder {self.images} does not exist")
        try:
            data = json.loads(self.annotations.read_text())
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read COCO annotations {self.annotations} ({e!r}); expected images, annotations, categories") from e
        cats = sorted(self.coco.cats)
        self.category_ids = cats  # contiguous label i (1..) <-> COCO category cats[i - 1]
        self.image_ids = sorted(self.coco.imgs)
        super().__init__(["background", *(self.coco.cats[c]["name"] for c in cats)], transform=transform)

    def __len__(self) -> int:
        return len(self.image_ids)

    def read(self, index: int) -> tuple[np.ndarray, Target]:
        info = self.coco.imgs[self.image_ids[index]]
        image = read_image(self.images / info["file_name"])
        h, w = image.shape[:2]
        if (info.get("height", h), info.get("width", w)) != (h, w):
            raise ValueError(f"{self.images / info['file_name']} is {h}x{w} but {self.annotations} says {info['height']}x{info['width']}")
        anns = [a for a in self.coco.imgToAnns[info["id"]] if not a.get("iscrowd", 0)]
        label_of = {c: i + 1 for i, c in enumerate(self.category_ids)}
        masks = np.stack([self.coco.annToMask(a) for a in anns]) if anns else np.zeros((0, h, w), np.uint8)
        keep = masks.reshape(len(masks), -1).any(1)  # objects with an empty mask are left out
        target = {
            "boxes": torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a, k in zip(anns, keep) if k], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([label_of[a["category_id"]] for a, k in zip(anns, keep) if k], dtype=torch.int64),
            "masks": torch.from_numpy(masks[keep].astype(np.uint8)),
        }
        return image, target


def write_coco_json(path: str | Path, dataset: InstanceDataset, file_names: Sequence[str]) -> Path:
    """Write the targets of ``dataset`` as COCO JSON (masks as RLE, boxes from the targets), atomically.

    Category ``i`` is class ``i`` (1..K-1); image ``j`` (id ``j + 1``) is ``file_names[j]``.
    """
    require_pycocotools()
    from pycocotools import mask as mask_utils

    if len(file_names) != len(dataset):
        raise ValueError(f"file_names has {len(file_names)} entries for {len(dataset)} images; give one per image")
    images, annotations = [], []
    for j in range(len(dataset)):
        image, target = dataset.read(j)
        h, w = image.shape[:2]
        images.append({"id": j + 1, "file_name": file_names[j], "height": h, "width": w})
        for box, label, m in zip(target["boxes"].tolist(), target["labels"].tolist(), target["masks"].numpy()):
            rle = mask_utils.encode(np.asfortranarray(m))
            annotations.append({
                "id": len(annotations) + 1, "image_id": j + 1, "category_id": int(label), "iscrowd": 0,
                "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
                "area": float(m.sum()), "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
            })
    categories = [{"id": i, "name": n} for i, n in enumerate(dataset.class_names) if i > 0]
    return atomic_write_text(path, json.dumps({"images": images, "annotations": annotations, "categories": categories}))


class ISBI2012Instances(InstanceDataset):
    """ISBI 2012 slices with each cell (4-connected component of label 255) an instance of class 1 "cell"."""

    def __init__(self, root: str | Path, indices: Sequence[int] | None = None, transform: Callable | None = None, min_area: int = 10) -> None:
        self.semantic = ISBI2012(root, indices)
        self.min_area = min_area
        super().__init__(["background", "cell"], [(0, 0, 0), (255, 255, 255)], transform)

    def __len__(self) -> int:
        return len(self.semantic)

    def read(self, index: int) -> tuple[np.ndarray, Target]:
        image, mask = self.semantic.read_pair(index)
        ids, classes = semantic_to_instances(mask, connectivity=1, min_area=self.min_area)
        return image, instances_to_target(ids, classes)


class SyntheticInstances(InstanceDataset):
    """``n`` synthetic images (:func:`~pixelwise.data.synthetic.make_synthetic_instances`), drawn on access; sample i depends on (seed, i)."""

    def __init__(self, n: int, size: tuple[int, int] = (96, 128), num_classes: int = 4, seed: int = 0, transform: Callable | None = None) -> None:
        self.n, self.size, self.seed = n, tuple(size), seed
        info = synthetic_classes(num_classes)
        super().__init__(info.names, info.palette, transform)

    def __len__(self) -> int:
        return self.n

    def read(self, index: int) -> tuple[np.ndarray, Target]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        image, ids, classes = make_synthetic_instances(np.random.default_rng([self.seed, index]), self.size, self.num_classes)
        return image, instances_to_target(ids, classes)


def write_synthetic_instances(root: str | Path, n_train: int = 200, n_val: int = 40, size: tuple[int, int] = (96, 128), num_classes: int = 4, seed: int = 0) -> Path:
    """Write synthetic shapes in the :class:`InstanceFolder` layout (``root/{train,val}`` + ``classes.json``), all or nothing."""
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(f"folder {root} already exists and is not empty; delete it or pick another")
    with atomic_folder(root) as tmp:
        for split_id, (split, count) in enumerate((("train", n_train), ("val", n_val))):
            for i in range(count):
                image, ids, classes = make_synthetic_instances(np.random.default_rng([seed, split_id, i]), size, num_classes)
                write_instance_sample(tmp / split, f"{i:04d}", image, ids, classes)
        write_classes_file(tmp / "classes.json", synthetic_classes(num_classes))
    return root


def _is_instance_folder(path: Path) -> bool:
    return (path / "images").is_dir() and (path / "instances").is_dir()


def open_instances(spec: str | Path, split: str, transform: Callable | None = None) -> InstanceDataset:
    """Open an instance data set from a spec (forms in ``INSTANCE_FORMS``); ISBI 2012 "val" is the last 5 slices."""
    text = str(spec)
    prefix, sep, rest = text.partition(":")
    kind = prefix.lower() if sep else ""
    if kind == "coco":
        root = Path(rest)
        images = root / split if (root / split).is_dir() else root / "images"
        return CocoInstances(root / f"{split}.json", images, transform)
    if kind == "isbi2012":
        return ISBI2012Instances(rest, isbi2012_split(rest, split), transform)
    path = Path(text)
    if _is_instance_folder(path / split):
        return InstanceFolder(path / split, transform)
    if _is_instance_folder(path):
        return InstanceFolder(path, transform)
    raise ValueError(f"instance data set {text!r} not found; use {INSTANCE_FORMS}")


def collate_instances(samples: Sequence[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
    """Batch of (image, target) -> (list of images, list of targets): images keep their own sizes."""
    return [s[0] for s in samples], [s[1] for s in samples]


def paint_instances(masks: np.ndarray | Tensor, scores: Sequence[float] | Tensor, threshold: float = 0.5) -> np.ndarray:
    """(D, H, W) mask probabilities -> (H, W) uint16 instance ids 1..D (detection order); a higher score wins overlaps."""
    masks = torch.as_tensor(masks).float()
    if len(masks) == 0:
        return np.zeros(masks.shape[-2:], np.uint16)
    scores = torch.as_tensor(scores, dtype=torch.float32, device=masks.device)
    score_map = torch.where(masks >= threshold, scores[:, None, None], torch.tensor(-1.0, device=masks.device))
    best, index = score_map.max(0)
    return torch.where(best >= 0, index + 1, torch.zeros_like(index)).cpu().numpy().astype(np.uint16)
