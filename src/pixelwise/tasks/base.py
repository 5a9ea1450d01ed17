"""The task interface: what differs between semantic segmentation, edges, scribbles, instances, volumes.

One training loop (:func:`pixelwise.training.train`), one ``eval`` and one report serve every
task; each asks the run's :class:`Task` object for the parts that differ. A task is chosen by
name (``TrainConfig.task``, saved as ``extra["task"]`` beside a model's weights).

Example:
    >>> from pixelwise.tasks import get_task
    >>> task = get_task("semantic")
    >>> dataset = task.open_eval("camvid:../shared/data/camvid", "val", extra)
    >>> result = task.evaluate(model, dataset, scales=(0.5,))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

TASKS: dict[str, type["Task"]] = {}


def register_task(cls: type["Task"]) -> type["Task"]:
    """Class decorator: make ``cls`` available as ``get_task(cls.name)``."""
    TASKS[cls.name] = cls
    return cls


def list_tasks() -> list[str]:
    return sorted(TASKS)


def get_task(name: str) -> "Task":
    """A fresh task object for ``name`` (one per run: :meth:`Task.setup` keeps run state on it)."""
    if name not in TASKS:
        raise ValueError(f"task={name!r} is not known; use one of {', '.join(list_tasks())}")
    return TASKS[name]()


class Task:
    """The parts of a run that depend on the task. Subclasses set ``name`` and ``score_key``.

    Batches are tuples whose first element holds the N inputs (a tensor or a list), so the
    loop can count samples with ``len(batch[0])``.
    """

    name: ClassVar[str]
    score_key: ClassVar[str]  # metric (higher is better) that picks model_best

    def datasets(self, cfg: Any) -> tuple[Dataset, Dataset]:
        """(training set with augmentation, validation set) of ``cfg.data``."""
        raise NotImplementedError

    def open_eval(self, data: str, split: str, extra: dict[str, Any]) -> Dataset:
        """``split`` of ``data`` prepared for evaluation as a model saved with ``extra`` expects."""
        raise NotImplementedError

    def output_channels(self, train_set: Dataset) -> int:
        """``num_classes`` passed to :func:`pixelwise.models.create_model`."""
        raise NotImplementedError

    def model_extra(self, train_set: Dataset, cfg: Any) -> dict[str, Any]:
        """JSON saved beside the weights (class names, palette, normalisation, ...)."""
        raise NotImplementedError

    def setup(self, cfg: Any, train_set: Dataset, model: nn.Module, device: torch.device) -> None:
        """Build what the loss needs (criterion, class weights); called once per run."""

    def collate(self, samples: list[Any]) -> tuple[Any, ...]:
        """Samples of the training set -> one batch."""
        raise NotImplementedError

    def train_module(self, model: nn.Module) -> nn.Module:
        """The module the loop calls with a batch (and DDP wraps); by default the model."""
        return model

    def loss(self, module: nn.Module, batch: tuple[Any, ...], device: torch.device) -> torch.Tensor:
        """Scalar loss of one batch."""
        raise NotImplementedError

    def start_epoch(self, epoch: int, model: nn.Module, train_set: Dataset, trained_seconds: float = 0.0) -> None:
        """Hook before every epoch (e.g. ScribbleSup's label propagation between rounds); ``trained_seconds``:
        the run's training time so far, the earlier parts of a resumed run included."""

    def evaluate(self, model: nn.Module, dataset: Dataset, **options: Any) -> Any:
        """Score ``model`` on ``dataset``: an :class:`pixelwise.evaluation.EvalResult`."""
        raise NotImplementedError

    def write_report(self, out: str | Path, result: Any, dataset: Dataset) -> dict[str, Any]:
        """Write metrics and figures of ``result`` into ``out``; return the metrics."""
        raise NotImplementedError
