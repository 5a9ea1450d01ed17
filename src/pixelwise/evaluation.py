"""Evaluate a model on a data set: inference (tiles, TTA, CRF) -> one confusion matrix -> metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pixelwise.inference import predict
from pixelwise.metrics import BoundaryFScore, ConfusionMatrix, label_boundaries


@dataclass
class EvalResult:
    """``metrics`` (JSON-ready), the (K, K) ``confusion`` matrix (semantic task) and a few
    ``samples`` (image uint8 (H, W, C), true labels (H, W), predicted labels (H, W)) for overlays."""

    metrics: dict[str, Any]
    confusion: torch.Tensor | None = None
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)


def to_uint8_image(image: torch.Tensor, mean: list[float] | None = None, std: list[float] | None = None) -> np.ndarray:
    """Undo the input normalisation: (C, H, W) float -> (H, W, C) uint8."""
    x = image.detach().float().cpu()
    if std is not None:
        x = x * torch.tensor(std).view(-1, 1, 1)
    if mean is not None:
        x = x + torch.tensor(mean).view(-1, 1, 1)
    return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    dataset: Any,
    *,
    task: str = "semantic",
    device: torch.device | str = "cpu",
    tile: int | None = None,
    overlap: float = 0.25,
    scales: tuple[float, ...] = (1.0,),
    flip: bool = False,
    crf: str | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    keep_samples: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> EvalResult:
    """Run ``model`` over every sample of ``dataset`` (each (C, H, W) image, (H, W) labels).

    ``task="semantic"`` gives pixel/class accuracy, IoU, mIoU, FWIoU and Dice;
    ``task="edges"`` scores the sigmoid edge map against the label boundaries (ODS/OIS F).
    ``crf`` names a :data:`pixelwise.crf.PRESETS` entry to refine soft predictions.
    Under DDP each rank takes every ``world_size``-th sample and the confusion matrices are
    summed; the edge score has no such reduction, so every rank scores all samples.
    """
    from rich.progress import track

    if task not in ("semantic", "edges"):
        raise ValueError(f"task={task!r}: use 'semantic' or 'edges'")
    if crf is not None and task == "edges":
        raise ValueError("crf refines class probabilities; it does not apply to edge maps (task='edges')")
    was_training = model.training
    model.eval()
    ignore = dataset.ignore_index
    scorer = BoundaryFScore() if task == "edges" else ConfusionMatrix(dataset.num_classes, ignore)
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    indices = range(len(dataset)) if task == "edges" else range(rank, len(dataset), world_size)
    for i in track(indices, description="evaluating", transient=True, disable=not progress):
        image, mask = dataset[i]
        probs = predict(model, image[None].to(device), tile=tile, overlap=overlap, scales=scales, flip=flip)[0].cpu()
        if crf is not None:
            from pixelwise.crf import dense_crf

            rgb = to_uint8_image(image, mean, std)
            probs = torch.from_numpy(dense_crf(rgb, probs.numpy(), preset=crf))
        if task == "edges":
            scorer.update(probs[0][None], label_boundaries(mask, ignore)[None])
            pred = (probs[0] > 0.5).long()
        else:
            pred = probs.argmax(0)
            scorer.update(pred[None], mask[None])
        if len(samples) < keep_samples:
            samples.append((to_uint8_image(image, mean, std), mask.numpy(), pred.numpy()))
    if world_size > 1 and task == "semantic":
        scorer.all_reduce()
    model.train(was_training)
    metrics = scorer.compute(getattr(dataset, "class_names", None)) if task == "semantic" else scorer.compute()
    confusion = scorer.matrix.clone() if task == "semantic" else None
    return EvalResult(metrics, confusion, samples)
