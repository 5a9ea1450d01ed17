"""Semantic segmentation (one class per pixel) and edge detection (HED) as task objects."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from pixelwise.data import eval_transform, open_dataset, train_transform
from pixelwise.evaluation import EvalResult, evaluate
from pixelwise.losses import build_loss, class_pixel_counts, enet_weights, median_frequency_weights, semantic_weight_map
from pixelwise.metrics import BoundaryFScore, ConfusionMatrix, SegmentScore, label_boundaries
from pixelwise.report import write_eval_report
from pixelwise.tasks.base import Task, register_task


class _AuxView(nn.Module):
    """Wraps a model so that ``forward`` returns the dict of main + aux logits (for DDP)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if hasattr(self.model, "forward_with_aux"):
            return self.model.forward_with_aux(x)
        return {"out": self.model(x)}


class _ClassScorer:
    """Confusion matrix over class ids: pixel/class accuracy, IoU, mIoU, FWIoU, Dice; with a
    ``cell_class`` also the segment measures of :class:`pixelwise.metrics.SegmentScore`."""

    sharded = True

    def __init__(self, num_classes: int, ignore_index: int, class_names: list[str] | None, cell_class: int | None) -> None:
        self.matrix = ConfusionMatrix(num_classes, ignore_index)
        self.segments = SegmentScore(cell_class, ignore_index) if cell_class is not None else None
        self.class_names = class_names

    def add(self, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pred = probs.argmax(0)
        self.matrix.update(pred[None], labels[None])
        if self.segments is not None:
            self.segments.update(pred, labels)
        return pred

    def all_reduce(self) -> None:
        self.matrix.all_reduce()
        if self.segments is not None:
            self.segments.all_reduce()

    def compute(self) -> dict[str, Any]:
        metrics = self.matrix.compute(self.class_names)
        return {**metrics, **self.segments.compute()} if self.segments is not None else metrics

    def confusion(self) -> torch.Tensor:
        return self.matrix.matrix.clone()


class _EdgeScorer:
    """Boundary F-score (ODS/OIS/AP) of the sigmoid edge map against the label boundaries."""

    sharded = False  # the F-score has no reduction across processes: every rank scores all

    def __init__(self, ignore_index: int) -> None:
        self.score = BoundaryFScore()
        self.ignore_index = ignore_index

    def add(self, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.score.update(probs[0][None], label_boundaries(labels, self.ignore_index)[None])
        return (probs[0] > 0.5).long()

    def all_reduce(self) -> None:
        pass

    def compute(self) -> dict[str, Any]:
        return self.score.compute()

    def confusion(self) -> None:
        return None


def class_weights(cfg: Any, dataset: Any, num_classes: int, masks: Iterable[np.ndarray] | None = None) -> torch.Tensor | None:
    """``cfg.class_weights`` as a (K,) tensor: a list as given, or computed from the data set's masks
    (or from ``masks``, label maps (H, W), e.g. ScribbleSup's propagated labels)."""
    if cfg.class_weights is None:
        return None
    if isinstance(cfg.class_weights, list):
        if len(cfg.class_weights) != num_classes:
            raise ValueError(f"class_weights has {len(cfg.class_weights)} values; the data set has {num_classes} classes")
        return torch.tensor(cfg.class_weights, dtype=torch.float32)
    if cfg.class_weights not in ("median_frequency", "median_frequency_sqrt", "enet"):
        raise ValueError(f"class_weights={cfg.class_weights!r}: use 'median_frequency', 'median_frequency_sqrt', "
                         "'enet' or a list of numbers")
    if masks is None:
        masks = (dataset.read_mask_ids(mask_path) for _, mask_path in dataset.files)
    counts, present = class_pixel_counts(masks, num_classes, dataset.ignore_index)
    if cfg.class_weights == "enet":
        return enet_weights(counts)
    weights = median_frequency_weights(counts, present)
    # The square root halves the log-ratios between classes: on CamVid the full weights push road pixels
    # of an unseen drive to sidewalk (benchmarks/README.md, camvid.py recipe experiments).
    return weights.sqrt() if cfg.class_weights == "median_frequency_sqrt" else weights


@register_task
class SemanticTask(Task):
    """One class per pixel: (N, C, H, W) images, (N, H, W) labels, (N, K, H, W) logits.

    Training batches are ``(images, labels, pixel_weights or None)``; the loss sums the main
    and auxiliary outputs with the model's ``aux_weights`` and, with ``unet_weight_map``,
    weighs pixels by the U-Net boundary weight map of each label map.
    """

    name = "semantic"
    score_key = "mean_iou"

    def datasets(self, cfg: Any) -> tuple[Dataset, Dataset]:
        transform = train_transform(
            crop_size=tuple(cfg.crop_size) if cfg.crop_size else None, scale_range=tuple(cfg.scale_range),
            hflip=cfg.hflip, color_jitter=cfg.color_jitter, elastic=cfg.elastic, mean=cfg.mean, std=cfg.std,
        )
        train_set = open_dataset(cfg.data, cfg.train_split, transform=transform, val_fraction=cfg.val_fraction)
        val_extra = {"mean": cfg.mean, "std": cfg.std, "val_fraction": cfg.val_fraction}
        return train_set, self.open_eval(cfg.data, cfg.val_split, val_extra)

    def open_eval(self, data: str, split: str, extra: dict[str, Any]) -> Dataset:
        """The split (a plain folder holds out the model's ``val_fraction``), checked against the
        model's classes when ``extra`` names them."""
        transform = eval_transform(mean=extra.get("mean"), std=extra.get("std"))
        dataset = open_dataset(data, split, transform=transform, val_fraction=extra.get("val_fraction", 0.2))
        names = extra.get("class_names")
        if names is not None and len(names) != self.output_channels(dataset):
            raise ValueError(
                f"the model was trained on {len(names)} classes ({', '.join(names)}) but {data} ({split}) has "
                f"{dataset.num_classes} ({', '.join(dataset.class_names)}); use data labelled with the model's "
                "classes"
            )
        return dataset

    def output_channels(self, train_set: Any) -> int:
        return train_set.num_classes

    def model_extra(self, train_set: Any, cfg: Any) -> dict[str, Any]:
        return {"class_names": train_set.class_names, "palette": train_set.palette, "ignore_index": train_set.ignore_index,
                "mean": cfg.mean, "std": cfg.std, "val_fraction": cfg.val_fraction}

    def setup(self, cfg: Any, train_set: Any, model: nn.Module, device: torch.device) -> None:
        self.ignore_index = train_set.ignore_index
        self.weight_map = cfg.unet_weight_map
        self.bf16 = cfg.bf16
        self.aux_weights = getattr(model, "aux_weights", {})
        self.criterion = self._criterion(cfg, train_set).to(device)

    def _criterion(self, cfg: Any, train_set: Any) -> nn.Module:
        weights = class_weights(cfg, train_set, self.output_channels(train_set))
        return build_loss(cfg.loss, ignore_index=train_set.ignore_index, class_weights=weights)

    def target(self, labels: torch.Tensor) -> torch.Tensor:
        """(H, W) labels of a sample -> the (H, W) training target."""
        return labels

    def collate(self, samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[Any, ...]:
        images = torch.stack([image for image, _ in samples])
        targets = torch.stack([self.target(labels) for _, labels in samples])
        weights = None
        if self.weight_map:
            weights = torch.stack([torch.from_numpy(semantic_weight_map(t, ignore_index=self.ignore_index)) for t in targets])
        return images, targets, weights

    def train_module(self, model: nn.Module) -> nn.Module:
        return _AuxView(model)

    def loss(self, module: nn.Module, batch: tuple[Any, ...], device: torch.device) -> torch.Tensor:
        images, targets, weights = batch
        images, targets = images.to(device), targets.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            outputs = module(images)
        extra = {"pixel_weights": weights.to(device)} if weights is not None else {}
        return sum(
            (1.0 if key == "out" else self.aux_weights[key]) * self.criterion(logits.float(), targets, **extra)
            for key, logits in outputs.items()
        )

    def scorer(self, dataset: Any) -> _ClassScorer:
        return _ClassScorer(dataset.num_classes, dataset.ignore_index, getattr(dataset, "class_names", None),
                            getattr(dataset, "cell_class", None))

    def evaluate(self, model: nn.Module, dataset: Dataset, **options: Any) -> EvalResult:
        """Options of :func:`pixelwise.evaluation.evaluate` (``device``, ``tile``, ``scales``, ``flip``, ``crf``, ...)."""
        return evaluate(model, dataset, self.scorer(dataset), **options)

    def write_report(self, out: str | Path, result: EvalResult, dataset: Any) -> dict[str, Any]:
        return write_eval_report(out, result, dataset.class_names, dataset.palette)


@register_task
class EdgeTask(SemanticTask):
    """Edge detection (HED): the target is the class boundaries of the label maps, one logit
    channel; the loss defaults to HED's class-balanced BCE; scored by the boundary F-score."""

    name = "edges"
    score_key = "ods_f"

    def output_channels(self, train_set: Any) -> int:
        return 1

    def model_extra(self, train_set: Any, cfg: Any) -> dict[str, Any]:
        return {**super().model_extra(train_set, cfg), "class_names": ["edge"], "palette": [(255, 255, 255)]}

    def _criterion(self, cfg: Any, train_set: Any) -> nn.Module:
        return build_loss("hed_bce" if cfg.loss == "ce" else cfg.loss, ignore_index=train_set.ignore_index)

    def target(self, labels: torch.Tensor) -> torch.Tensor:
        edges = label_boundaries(labels, self.ignore_index).long()
        edges[labels == self.ignore_index] = self.ignore_index
        return edges

    def scorer(self, dataset: Any) -> _EdgeScorer:
        return _EdgeScorer(dataset.ignore_index)

    def evaluate(self, model: nn.Module, dataset: Dataset, **options: Any) -> EvalResult:
        if options.get("crf") is not None:
            raise ValueError("crf refines class probabilities; it does not apply to edge maps (task='edges')")
        return super().evaluate(model, dataset, **options)
