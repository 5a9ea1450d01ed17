"""Instance segmentation (Mask R-CNN) as a task object: lists of images and targets, COCO AP.

Training batches are ``(images, targets)``: lists, since images keep their own sizes and
targets their own numbers of objects (:mod:`pixelwise.data.instances`). The loss is the sum
of the model's RPN, box and mask losses. Evaluation runs the test-time path on every image
and scores it with :func:`pixelwise.metrics.coco_instance_metrics`; ``model_best`` is picked
by mask AP.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from pixelwise.data.instances import InstanceTransform, collate_instances, open_instances, paint_instances
from pixelwise.evaluation import EvalResult, to_uint8_image
from pixelwise.inference import window_starts
from pixelwise.metrics import coco_instance_metrics
from pixelwise.models import model_kind
from pixelwise.models.detection.ops import box_iou
from pixelwise.report import draw_instances, write_instance_report
from pixelwise.tasks.base import Task, register_task


def detect(model: nn.Module, image: torch.Tensor, tile: int | None = None, overlap: float = 0.25) -> dict[str, torch.Tensor]:
    """Instances of one (C, H, W) image: ``boxes`` (D, 4), ``labels``, ``scores``, ``masks`` (D, 1, H, W) probabilities, on the CPU.

    With ``tile``, the image is cut into ``tile`` x ``tile`` windows sharing ``overlap`` of
    their side and the instances are merged across tile borders (:func:`merge_instances`);
    merged masks are binary (0 / 1).
    """
    model.eval()
    if tile is None or (image.shape[-2] <= tile and image.shape[-1] <= tile):
        with torch.inference_mode():
            out = model([image])[0]
        return {k: v.float().cpu() if k in ("boxes", "scores", "masks") else v.cpu() for k, v in out.items()}
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    h, w = image.shape[-2:]
    th, tw = min(tile, h), min(tile, w)
    step_y, step_x = max(1, int(th * (1 - overlap))), max(1, int(tw * (1 - overlap)))
    pieces = []
    for top in window_starts(h, th, step_y):
        for left in window_starts(w, tw, step_x):
            with torch.inference_mode():
                out = model([image[:, top : top + th, left : left + tw]])[0]
            masks = (out["masks"][:, 0] >= 0.5).cpu()
            for mask, label, score in zip(masks, out["labels"].tolist(), out["scores"].tolist()):
                rows, cols = torch.where(mask.any(1))[0], torch.where(mask.any(0))[0]
                if len(rows):  # (label, score, y0, x0, crop) in image coordinates
                    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
                    pieces.append((label, score, top + y0, left + x0, mask[y0:y1, x0:x1]))
    return merge_instances(pieces, (h, w))


def merge_instances(pieces: Sequence[tuple[int, float, int, int, torch.Tensor]], size: tuple[int, int], min_overlap: float = 0.5) -> dict[str, torch.Tensor]:
    """Join detections from overlapping tiles that are one object.

    Two pieces of the same class are one object when their masks' intersection covers at
    least ``min_overlap`` of the smaller one (an object cut by a tile border is mostly
    inside its whole view from the neighbouring tile); objects are the connected groups of
    that relation, with the union of the masks and the best score.

    Args:
        pieces: ``(label, score, top, left, mask crop (h, w) bool)`` in image coordinates.
        size: (H, W) of the image.

    Returns:
        ``boxes``, ``labels``, ``scores``, ``masks`` (D, 1, H, W) 0 / 1, by decreasing score.
    """
    h, w = size
    parent = list(range(len(pieces)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    boxes = torch.tensor([[p[3], p[2], p[3] + p[4].shape[1], p[2] + p[4].shape[0]] for p in pieces], dtype=torch.float32).reshape(-1, 4)
    touching = torch.nonzero(torch.triu(box_iou(boxes, boxes) > 0, 1)).tolist()  # only boxes that meet can overlap
    for i, j in touching:
        (li, _, ti, lf_i, mi), (lj, _, tj, lf_j, mj) = pieces[i], pieces[j]
        if li != lj:
            continue
        y0, x0 = max(ti, tj), max(lf_i, lf_j)
        y1, x1 = min(ti + mi.shape[0], tj + mj.shape[0]), min(lf_i + mi.shape[1], lf_j + mj.shape[1])
        inter = int((mi[y0 - ti : y1 - ti, x0 - lf_i : x1 - lf_i] & mj[y0 - tj : y1 - tj, x0 - lf_j : x1 - lf_j]).sum())
        if inter >= min_overlap * min(int(mi.sum()), int(mj.sum())):
            parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(pieces)):
        groups.setdefault(root(i), []).append(i)
    merged = sorted(groups.values(), key=lambda g: -max(pieces[i][1] for i in g))
    masks = torch.zeros(len(merged), 1, h, w)
    for k, group in enumerate(merged):
        for i in group:
            _, _, top, left, crop = pieces[i]
            masks[k, 0, top : top + crop.shape[0], left : left + crop.shape[1]] += crop
    masks = masks.clamp(max=1)
    out_boxes = [torch.cat([boxes[g, :2].min(0).values, boxes[g, 2:].max(0).values]) for g in merged]
    return {
        "boxes": torch.stack(out_boxes) if merged else torch.zeros(0, 4),
        "labels": torch.tensor([pieces[g[0]][0] for g in merged], dtype=torch.int64),
        "scores": torch.tensor([max(pieces[i][1] for i in g) for g in merged], dtype=torch.float32),
        "masks": masks,
    }


@register_task
class InstanceTask(Task):
    """Mask R-CNN on instance data (``coco:PATH``, ``isbi2012:PATH`` or an instance folder)."""

    name = "instance"
    score_key = "mask_ap"

    def datasets(self, cfg: Any) -> tuple[Dataset, Dataset]:
        train_set = open_instances(cfg.data, cfg.train_split, InstanceTransform(cfg.mean, cfg.std, hflip=cfg.hflip))
        return train_set, self.open_eval(cfg.data, cfg.val_split, {"mean": cfg.mean, "std": cfg.std})

    def open_eval(self, data: str, split: str, extra: dict[str, Any]) -> Dataset:
        return open_instances(data, split, InstanceTransform(extra.get("mean"), extra.get("std")))

    def output_channels(self, train_set: Any) -> int:
        return train_set.num_classes

    def model_extra(self, train_set: Any, cfg: Any) -> dict[str, Any]:
        return {"class_names": train_set.class_names, "palette": train_set.palette, "mean": cfg.mean, "std": cfg.std}

    def setup(self, cfg: Any, train_set: Any, model: nn.Module, device: torch.device) -> None:
        if model_kind(cfg.model) != "detection":
            raise ValueError(f"task='instance' needs a detection model such as maskrcnn_resnet50_fpn, not model={cfg.model!r}")
        self.bf16 = cfg.bf16

    def collate(self, samples: list[Any]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        return collate_instances(samples)

    def loss(self, module: nn.Module, batch: tuple[Any, ...], device: torch.device) -> torch.Tensor:
        images, targets = batch
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            losses = module(images, targets)
        return sum(v.float() for v in losses.values())

    def evaluate(
        self,
        model: nn.Module,
        dataset: Dataset,
        *,
        device: str | torch.device = "cpu",
        tile: int | None = None,
        overlap: float = 0.25,
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        crf: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        keep_samples: int = 0,
        rank: int = 0,
        world_size: int = 1,
        progress: bool = False,
    ) -> EvalResult:
        """COCO box / mask AP of ``model`` on ``dataset`` (every rank scores every image)."""
        from rich.progress import track

        if tuple(scales) != (1.0,) or flip or crf is not None:
            raise ValueError("task='instance' evaluates at scale 1 without flips or CRF: drop --scales, --flip and --crf")
        was_training = model.training
        predictions, targets, samples = [], [], []
        for i in track(range(len(dataset)), description="evaluating", transient=True, disable=not progress):
            image, target = dataset[i]
            pred = detect(model, image.to(device), tile, overlap)
            pred["masks"] = (pred["masks"] >= 0.5).to(torch.uint8)  # what the metric uses, at an eighth of the memory
            predictions.append(pred)
            targets.append(target)
            if len(samples) < keep_samples:
                truth = paint_instances(target["masks"], torch.arange(len(target["masks"]), 0, -1))
                samples.append((to_uint8_image(image, mean, std), truth, paint_instances(pred["masks"][:, 0], pred["scores"])))
        model.train(was_training)
        metrics = coco_instance_metrics(predictions, targets, dataset.num_classes)
        return EvalResult(metrics, None, samples)

    def write_report(self, out: str | Path, result: EvalResult, dataset: Dataset) -> dict[str, Any]:
        return write_instance_report(out, result)


def predict_instance_files(
    images: Sequence[str | Path], model_path: str | Path, out: str | Path, *, tile: int | None = None, overlap: float = 0.25,
    score_threshold: float = 0.5, progress: bool = False,
) -> list[Path]:
    """Detect instances in image files with a saved Mask R-CNN; returns the instance-id PNGs written.

    For each ``NAME.ext`` writes into ``out``: ``NAME_instances.png`` (16-bit ids 1..D, 0 =
    background; a higher score wins where masks overlap), ``NAME_overlay.png`` (one colour per
    instance, its box, class and score) and ``NAME_instances.json`` (id, class, score, box of
    each instance), for detections scoring at least ``score_threshold``. ``tile``: see :func:`detect`.
    """
    from PIL import Image
    from rich.progress import track

    from pixelwise.data.transforms import ToTensor, to_float
    from pixelwise.io import atomic_write, atomic_write_text, read_image
    from pixelwise.models import load_model

    paths = [Path(p) for p in images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"image file(s) not found: {', '.join(missing[:5])}; check the paths")
    model, extra = load_model(model_path)
    if extra.get("task") != "instance":
        raise ValueError(f"{model_path} is not an instance segmentation model (task={extra.get('task')!r})")
    names = extra.get("class_names") or [f"class_{i}" for i in range(model.config["num_classes"])]
    normalise = ToTensor(extra.get("mean"), extra.get("std"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in track(paths, description="predicting", transient=True, disable=not progress):
        raw = read_image(path)
        if raw.shape[-1] != model.config["in_channels"]:
            raise ValueError(f"image {path} has {raw.shape[-1]} channel(s) but the model takes {model.config['in_channels']}")
        x = torch.from_numpy(normalise.normalise(to_float(raw)).transpose(2, 0, 1).copy())
        pred = detect(model, x, tile, overlap)
        keep = pred["scores"] >= score_threshold
        boxes, labels, scores, masks = pred["boxes"][keep], pred["labels"][keep], pred["scores"][keep], pred["masks"][keep, 0]
        ids = paint_instances(masks, scores)
        records = [{"id": k + 1, "class_id": int(c), "class": names[int(c)], "score": round(float(s), 4), "box": [round(float(v), 2) for v in b]}
                   for k, (b, c, s) in enumerate(zip(boxes, labels, scores))]
        picture = draw_instances(raw, ids, boxes.tolist(), [f"{r['class']} {r['score']:.2f}" for r in records])
        id_path = out / f"{path.stem}_instances.png"
        atomic_write(id_path, lambda tmp, a=ids: Image.fromarray(a).save(tmp, format="PNG"))
        atomic_write(out / f"{path.stem}_overlay.png", lambda tmp, p=Image.fromarray(picture): p.save(tmp, format="PNG"))
        atomic_write_text(out / f"{path.stem}_instances.json", json.dumps({"image": str(path), "instances": records}, indent=2))
        written.append(id_path)
    return written
