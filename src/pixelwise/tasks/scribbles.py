"""Training from scribbles as a task object: ``task=scribbles task_args.method=...``.

Methods (``task_args.method``):

- ``partial_ce``: cross-entropy on the scribbled pixels only.
- ``scribblesup``: ScribbleSup (Lin et al., CVPR 2016): training is split into ``rounds``
  equal rounds (of ``epochs``, or of ``max_minutes`` when a time budget is set: a round
  starts at the first epoch after its share of the budget has been trained, a resumed run's
  earlier parts included); each round starts by propagating the scribbles over each training
  image's superpixel graph (:func:`pixelwise.weak.propagate_labels`, with the network's
  predictions averaged per superpixel), then trains with cross-entropy on the propagated
  labels (weighted by ``class_weights`` computed from them, if given). Round 1 has no
  network to ask yet: ``first_round="scribbles"`` (default) trains round 1 on the strokes
  alone (partial cross-entropy), so round 2 propagates with a network that has learnt from
  them (the paper starts from an ImageNet network; from scratch this is our stand-in);
  ``first_round="appearance"`` propagates with appearance models of the scribbled
  superpixels instead. ``stroke_weight`` (default 1) times partial cross-entropy on the
  stroke pixels is added to the loss of every propagated round (:class:`LabelsAndStrokesLoss`;
  not in the paper: the strokes are certain where the propagated labels are guesses, and
  they reach every region, thin ones included, so they keep a class balance the dense
  labels lose). Both defaults are measured in ``benchmarks/README.md`` (CamVid from
  scratch: 55.4 val mIoU against 41.9 for the paper's form, ``first_round="appearance"
  stroke_weight=0``).
  ``min_confidence`` > 0 leaves unmarked superpixels whose propagated class has a lower
  probability (network or appearance model) unlabelled, instead of forcing a guess (not in
  the paper either).
  Each round's labels are written to
  ``OUT/propagation/roundR/`` and scored in ``OUT/propagation.json`` (mIoU against the true
  masks when the data set has them); the report draws one overlay per propagated round.
- ``regularized``: partial cross-entropy + a dense-CRF regulariser on the softmax
  (Tang et al., ECCV 2018; :class:`pixelwise.weak.regularized.RegularizedLoss`).

Scribbles come from ``DATA/train/scribbles/`` when the data set is a scribble folder
(:mod:`pixelwise.data.scribbles`), otherwise they are simulated from the training masks
(``density``, ``width``, ``min_area``, ``seed``). Validation uses the dense masks.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from pixelwise.data import FolderDataset, eval_transform, open_dataset, train_transform
from pixelwise.data.scribbles import (
    STROKE_OFFSET,
    ScribbleDataset,
    is_scribble_folder,
    open_scribbles,
    simulated_scribbles,
)
from pixelwise.inference import predict
from pixelwise.io import atomic_write_text, read_image, read_mask, write_mask
from pixelwise.losses import CrossEntropyLoss, PartialCrossEntropyLoss
from pixelwise.metrics import ConfusionMatrix
from pixelwise.tasks.base import register_task
from pixelwise.tasks.semantic import SemanticTask, class_weights
from pixelwise.weak.regularized import RegularizedLoss

METHODS = ("partial_ce", "scribblesup", "regularized")
FIRST_ROUNDS = ("appearance", "scribbles")
DEFAULTS: dict[str, Any] = {
    "method": "scribblesup",
    "rounds": 3,  # ScribbleSup: "three rounds suffice"
    "first_round": "scribbles",  # round 1 trains on the strokes alone; "appearance": the paper's start
    # simulated strokes (when the data set has no scribbles/ folder)
    "density": 0.5,
    "width": 3,
    "min_area": 0,
    "seed": 0,
    # ScribbleSup graph
    "superpixel_size": 100,
    "pairwise_weight": 10.0,
    "stroke_weight": 1.0,  # partial CE on the strokes beside CE on the propagated labels; 0: the paper's loss
    "min_confidence": 0.0,  # > 0: unmarked superpixels less sure than this stay unlabelled
    # regularized loss
    "reg_weight": 1.0,
    "reg_scale": 0.5,
    "reg_radius": 5,
    "reg_sigma_xy": 3.0,
    "reg_sigma_rgb": 15 / 255,
}
PROPAGATION = "propagation"


def scribble_options(task_args: dict[str, Any]) -> dict[str, Any]:
    """``task_args`` merged over :data:`DEFAULTS`, checked."""
    unknown = sorted(set(task_args) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown task_args {', '.join(unknown)} for task=scribbles; valid: {', '.join(DEFAULTS)}")
    opts = {**DEFAULTS, **task_args}
    if opts["method"] not in METHODS:
        raise ValueError(f"task_args.method={opts['method']!r}: use one of {', '.join(METHODS)}")
    if not isinstance(opts["rounds"], int) or opts["rounds"] < 1:
        raise ValueError(f"task_args.rounds={opts['rounds']!r} must be a whole number >= 1")
    if opts["first_round"] not in FIRST_ROUNDS:
        raise ValueError(f"task_args.first_round={opts['first_round']!r}: use one of {', '.join(FIRST_ROUNDS)}")
    if not isinstance(opts["stroke_weight"], (int, float)) or opts["stroke_weight"] < 0:
        raise ValueError(f"task_args.stroke_weight={opts['stroke_weight']!r} must be a number >= 0")
    if not isinstance(opts["min_confidence"], (int, float)) or not 0 <= opts["min_confidence"] <= 1:
        raise ValueError(f"task_args.min_confidence={opts['min_confidence']!r} must be a number in [0, 1]")
    return opts


class LabelsAndStrokesLoss(nn.Module):
    """Cross-entropy on propagated labels plus ``stroke_weight`` x partial cross-entropy on the strokes.

    The target (N, H, W) is packed by :class:`~pixelwise.data.scribbles.ScribbleDataset` with
    ``mark_strokes``: ``STROKE_OFFSET + c`` on a stroke pixel of class c, the propagated label
    elsewhere. Each term is a mean over its own pixels, so the strokes keep their weight
    however few they are.

    Args:
        stroke_weight: weight of the strokes' term.
        ignore_index: target value of pixels without a label.
        weight: per-class weights (K,) of the labels' term, or None.
    """

    def __init__(self, stroke_weight: float, ignore_index: int, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.stroke_weight = stroke_weight
        self.labels_loss = CrossEntropyLoss(weight=weight, ignore_index=ignore_index)
        self.strokes_loss = PartialCrossEntropyLoss(unlabeled_index=ignore_index)
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of logits (N, K, H, W) against the packed target (N, H, W)."""
        strokes = target >= STROKE_OFFSET
        labels = torch.where(strokes, target - STROKE_OFFSET, target)
        return self.labels_loss(logits, labels) + self.stroke_weight * self.strokes_loss(
            logits, torch.where(strokes, labels, torch.full_like(labels, self.ignore_index))
        )


def propagation_rounds(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rounds recorded in ``run_dir/propagation.json`` ([] when there are none)."""
    path = Path(run_dir) / f"{PROPAGATION}.json"
    return json.loads(path.read_text()) if path.is_file() else []


@register_task
class ScribbleTask(SemanticTask):
    """Semantic segmentation trained from scribbles; evaluated like :class:`SemanticTask`."""

    name = "scribbles"
    score_key = "mean_iou"

    def datasets(self, cfg: Any) -> tuple[Dataset, Dataset]:
        opts = scribble_options(cfg.task_args)
        transform = train_transform(
            crop_size=tuple(cfg.crop_size) if cfg.crop_size else None, scale_range=tuple(cfg.scale_range),
            hflip=cfg.hflip, color_jitter=cfg.color_jitter, elastic=cfg.elastic, mean=cfg.mean, std=cfg.std,
        )
        if is_scribble_folder(cfg.data, cfg.train_split):
            train_set = open_scribbles(cfg.data, cfg.train_split, transform=transform)
        else:
            dense = open_dataset(cfg.data, cfg.train_split)
            train_set = simulated_scribbles(dense, opts["density"], opts["width"], opts["min_area"], opts["seed"], transform)
        return train_set, self.open_eval(cfg.data, cfg.val_split, {"mean": cfg.mean, "std": cfg.std})

    def open_eval(self, data: str, split: str, extra: dict[str, Any]) -> Dataset:
        if is_scribble_folder(data, "train"):  # scribble layout: SPLIT/images + SPLIT/masks
            return FolderDataset(Path(str(data)) / split, transform=eval_transform(mean=extra.get("mean"), std=extra.get("std")))
        return super().open_eval(data, split, extra)

    def setup(self, cfg: Any, train_set: Any, model: nn.Module, device: torch.device) -> None:
        self.opts = scribble_options(cfg.task_args)
        weights_allowed = self.opts["method"] == "scribblesup"
        if cfg.loss != "ce" or (cfg.class_weights is not None and not weights_allowed) or cfg.unet_weight_map:
            raise ValueError("task=scribbles picks its loss from task_args.method (partial_ce, scribblesup, regularized); "
                             "drop loss= and unet_weight_map=, and class_weights= unless the method is scribblesup")
        self.cfg, self.run_dir, self.device = cfg, Path(cfg.out), device
        self.mean, self.std, self.scales = cfg.mean, cfg.std, tuple(cfg.val_scales)
        self.round_epochs = math.ceil(cfg.epochs / self.opts["rounds"])
        self.round_seconds = None if cfg.max_minutes is None else 60 * cfg.max_minutes / self.opts["rounds"]
        self.round = 0
        self.graphs: dict[int, Any] = {}
        super().setup(cfg, train_set, model, device)

    def _criterion(self, cfg: Any, train_set: Any) -> nn.Module:
        method, ignore = self.opts["method"], train_set.ignore_index
        if method == "scribblesup":
            return self._labels_criterion(None, ignore)
        if method == "regularized":
            o = self.opts
            return RegularizedLoss(o["reg_weight"], ignore, o["reg_scale"], o["reg_radius"], o["reg_sigma_xy"], o["reg_sigma_rgb"])
        return PartialCrossEntropyLoss(unlabeled_index=ignore)

    def _labels_criterion(self, weights: torch.Tensor | None, ignore: int) -> nn.Module:
        """ScribbleSup's loss on a round's labels (class ``weights`` (K,) or None)."""
        if self.opts["stroke_weight"] > 0:
            return LabelsAndStrokesLoss(self.opts["stroke_weight"], ignore, weights)
        return CrossEntropyLoss(weight=weights, ignore_index=ignore)

    def _unit_images(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised inputs (N, C, H, W) back to [0, 1] units for the regulariser's colour kernel."""
        if self.std is not None:
            images = images * torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        if self.mean is not None:
            images = images + torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        return images

    def loss(self, module: nn.Module, batch: tuple[Any, ...], device: torch.device) -> torch.Tensor:
        if self.opts["method"] != "regularized":
            return super().loss(module, batch, device)
        images, targets, _ = batch
        images, targets = images.to(device), targets.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            outputs = module(images)
        units = self._unit_images(images)
        return sum(
            (1.0 if key == "out" else self.aux_weights[key]) * self.criterion(logits.float(), targets, units)
            for key, logits in outputs.items()
        )

    def start_epoch(self, epoch: int, model: nn.Module, train_set: Any, trained_seconds: float = 0.0) -> None:
        """ScribbleSup: at the first epoch of each round, propagate the scribbles anew."""
        if self.opts["method"] != "scribblesup":
            return
        if epoch == 1 and self.round == 0 and self._is_writer():  # a fresh run: an earlier run's rounds here are stale
            (self.run_dir / f"{PROPAGATION}.json").unlink(missing_ok=True)
            shutil.rmtree(self.run_dir / PROPAGATION, ignore_errors=True)
        if self.round_seconds is None:
            round_ = (epoch - 1) // self.round_epochs + 1
        else:
            round_ = int(trained_seconds // self.round_seconds) + 1
        round_ = min(round_, self.opts["rounds"])
        if round_ != self.round:  # also after --resume mid-round: propagate with the current network
            self.propagate(round_, model, train_set, epoch)

    @torch.no_grad()
    def propagate(self, round_: int, model: nn.Module, train_set: ScribbleDataset, epoch: int = 1) -> dict[str, Any]:
        """Propagated labels of every training image for ``round_`` (stored on ``train_set.labels``;
        None, the strokes themselves, in round 1 with ``first_round="scribbles"``)."""
        from pixelwise.weak import build_superpixel_graph, propagate_labels  # the weak extra

        o, k, ignore = self.opts, train_set.num_classes, train_set.ignore_index
        strokes_only = round_ == 1 and o["first_round"] == "scribbles"
        to_tensor = eval_transform(mean=self.mean, std=self.std)
        was_training = model.training
        model.eval()
        labels, marked, kept, pixels = [], 0, 0, 0
        dtype = np.uint8 if max(k, ignore) < 256 else np.uint16
        score = ConfusionMatrix(k, ignore)
        for i in range(len(train_set)):
            image, scribbles = train_set.read_pair(i)
            marked += int((scribbles != ignore).sum())
            pixels += scribbles.size
            if strokes_only:
                labels.append(scribbles)
                continue
            if i not in self.graphs:
                self.graphs[i] = build_superpixel_graph(image, o["superpixel_size"])
            prob = None
            if round_ > 1:
                x = to_tensor(image, scribbles)[0][None].to(self.device)
                prob = predict(model, x, scales=self.scales)[0].float().cpu().numpy()
            y = propagate_labels(self.graphs[i], scribbles, k, ignore, prob=prob, pairwise_weight=o["pairwise_weight"],
                                 min_confidence=o["min_confidence"])
            labels.append(y.astype(dtype))
            kept += int((y != ignore).sum())
            truth = train_set.true_mask(i)
            if truth is not None:  # scored where the labels are
                unlabelled = y == ignore
                score.update(torch.from_numpy(np.where(unlabelled, 0, y))[None],
                             torch.from_numpy(np.where(unlabelled, ignore, truth))[None])
        model.train(was_training)
        if self.cfg.class_weights is not None:  # class balance of the labels this round trains on
            weights = class_weights(self.cfg, train_set, k, masks=labels)
            self.criterion = self._labels_criterion(weights, ignore).to(self.device)
        train_set.labels, self.round = (None if strokes_only else labels), round_
        train_set.mark_strokes = self.opts["stroke_weight"] > 0 and not strokes_only
        record: dict[str, Any] = {"round": round_, "epoch": epoch, "images": len(labels),
                                  "labelled_fraction": marked / max(pixels, 1), "propagated": not strokes_only}
        if not strokes_only:
            record["propagated_fraction"] = kept / max(pixels, 1)
            if train_set.dense is not None:
                m = score.compute()
                record.update({"mean_iou": m["mean_iou"], "pixel_accuracy": m["pixel_accuracy"]})
        if self._is_writer():
            self._write_round(round_, None if strokes_only else labels, train_set, record)
        return record

    @staticmethod
    def _is_writer() -> bool:
        """True on the process that writes files (rank 0, or the only one)."""
        return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

    def _write_round(self, round_: int, labels: list[np.ndarray] | None, train_set: ScribbleDataset,
                     record: dict[str, Any]) -> None:
        """The round's record into ``propagation.json``; its labels (None: a round on the strokes alone,
        nothing to write) into ``propagation/roundR/``, the first 4 images' scribbles into
        ``propagation/scribbles/`` and their paths into the record, for the report's overlays."""
        shown = []
        if labels is not None:
            folder, scribble_dir = self.run_dir / PROPAGATION / f"round{round_}", self.run_dir / PROPAGATION / "scribbles"
            folder.mkdir(parents=True, exist_ok=True)
            scribble_dir.mkdir(parents=True, exist_ok=True)
            for i, ((image_path, _), y) in enumerate(zip(train_set.files, labels)):
                stem = Path(image_path).stem
                write_mask(folder / f"{stem}.png", y, train_set.palette)
                if i < 4:
                    scribbles = train_set.read_pair(i)[1].astype(y.dtype)
                    write_mask(scribble_dir / f"{stem}.png", scribbles, train_set.palette)
                    shown.append({"image": str(image_path), "scribbles": str(scribble_dir / f"{stem}.png"),
                                  "labels": str(folder / f"{stem}.png")})
        record["shown"] = shown
        rounds = propagation_rounds(self.run_dir)
        earlier = [r for r in rounds if r["round"] == round_]
        if earlier:  # resumed inside the round: it began at the earlier record's epoch
            record["epoch"] = earlier[0]["epoch"]
        rounds = [r for r in rounds if r["round"] != round_] + [record]
        atomic_write_text(self.run_dir / f"{PROPAGATION}.json", json.dumps(sorted(rounds, key=lambda r: r["round"]), indent=2))

    def write_report(self, out: str | Path, result: Any, dataset: Any) -> dict[str, Any]:
        """The semantic report, plus ``propagation`` (one record per round) and ``propagation_roundR.png``
        (image | scribbles | propagated labels of the first 4 training images) when the run propagated."""
        from pixelwise.report import save_overlay_grid, write_metrics_json

        metrics = super().write_report(out, result, dataset)
        rounds = propagation_rounds(out)
        if not rounds:
            return metrics
        for record in rounds:
            shown = [s for s in record.get("shown", []) if all(Path(s[k]).is_file() for k in ("image", "scribbles", "labels"))]
            if shown:
                save_overlay_grid(
                    Path(out) / f"{PROPAGATION}_round{record['round']}.png", [read_image(s["image"]) for s in shown],
                    [read_mask(s["scribbles"]) for s in shown], [read_mask(s["labels"]) for s in shown], dataset.palette,
                )
        metrics = {**metrics, PROPAGATION: [{k: v for k, v in r.items() if k != "shown"} for r in rounds]}
        write_metrics_json(Path(out) / "metrics.json", metrics)
        return metrics
