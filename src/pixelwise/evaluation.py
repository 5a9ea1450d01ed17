"""Evaluate a model on a data set: inference (tiles, TTA, CRF) -> a scorer -> metrics.

The scorer decides what is measured (a confusion matrix for classes, a boundary F-score for
edges); the task objects in :mod:`pixelwise.tasks` pick it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pixelwise.inference import predict


@dataclass
class EvalResult:
    """``metrics`` (JSON-ready), the (K, K) ``confusion`` matrix (semantic task) and a few
    ``samples`` (image uint8 (H, W, C), true labels (H, W), predicted labels (H, W)) for overlays."""

    metrics: dict[str, Any]
    confusion: torch.Tensor | None = None
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)


class Scorer(Protocol):
    """Accumulates a score over samples. ``sharded``: under DDP each rank scores only its own
    samples and :meth:`all_reduce` sums them; otherwise every rank scores every sample."""

    sharded: bool

    def add(self, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Score (K, H, W) probabilities against (H, W) labels; return the (H, W) prediction."""

    def all_reduce(self) -> None: ...

    def compute(self) -> dict[str, Any]: ...

    def confusion(self) -> torch.Tensor | None: ...


def to_uint8_image(image: torch.Tensor, mean: list[float] | None = None, std: list[float] | None = None) -> np.ndarray:
    """Undo the input normalisation: (C, H, W) float -> (H, W, C) uint8; a volume (C, D, H, W) -> (D, H, W, C)."""
    x = image.detach().float().cpu()
    per_channel = (-1,) + (1,) * (x.ndim - 1)
    if std is not None:
        x = x * torch.tensor(std).view(per_channel)
    if mean is not None:
        x = x + torch.tensor(mean).view(per_channel)
    return (x.clamp(0, 1) * 255).round().byte().movedim(0, -1).numpy()


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    dataset: Any,
    scorer: Scorer,
    *,
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

    Each prediction goes through :func:`pixelwise.inference.predict` (``tile``, ``scales``,
    ``flip``), then ``crf`` (a :data:`pixelwise.crf.PRESETS` name) if given, then ``scorer``.
    ``mean``/``std`` undo the input normalisation for the CRF and the kept samples.
    """
    from rich.progress import track

    was_training = model.training
    model.eval()
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    indices = range(rank, len(dataset), world_size) if scorer.sharded else range(len(dataset))
    for i in track(indices, description="evaluating", transient=True, disable=not progress):
        image, mask = dataset[i]
        probs = predict(model, image[None].to(device), tile=tile, overlap=overlap, scales=scales, flip=flip)[0].cpu()
        if crf is not None:
            from pixelwise.crf import dense_crf

            probs = torch.from_numpy(dense_crf(to_uint8_image(image, mean, std), probs.numpy(), preset=crf))
        pred = scorer.add(probs, mask)
        if len(samples) < keep_samples:
            samples.append((to_uint8_image(image, mean, std), mask.numpy(), pred.numpy()))
    if world_size > 1 and scorer.sharded:
        scorer.all_reduce()
    model.train(was_training)
    return EvalResult(scorer.compute(), scorer.confusion(), samples)
