"""Volumetric segmentation (3D U-Net and other (N, C, D, H, W) models) as a task object.

What differs from the semantic task: volume data sets (:mod:`pixelwise.data.volumes`),
3D augmentation from the config's ``crop_size`` (three sides), ``hflip`` (flips and
isotropic-plane rotations), ``color_jitter`` (intensity) and ``elastic`` (``scale_range``,
``mean`` and ``std`` do not apply: volumes are read as uint8 / 255, uint16 / 65535 or their
stored numbers, see :func:`pixelwise.data.volumes.volume_to_float`); the report draws
orthogonal slices. Loss and metrics are the semantic task's (cross-entropy / Dice etc. and
one confusion matrix over voxels), model selection by mean Dice.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from pixelwise.data.volumes import (
    VolumeTransform,
    open_volume_dataset,
    read_volume,
    volume_suffix,
    volume_to_float,
    write_volume,
)
from pixelwise.evaluation import EvalResult
from pixelwise.tasks.base import register_task
from pixelwise.tasks.semantic import SemanticTask


def orthogonal_slices(
    volume: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> list[np.ndarray]:
    """The xy, xz and yz planes through the centre of (D, H, W[, C]) ``volume``.

    Depth is repeated ``round(spacing_d / spacing_h)`` times in the xz and yz planes so that
    they show true proportions (a 50 nm section of 4 nm pixels becomes 12 rows).
    """
    d, h, w = volume.shape[:3]
    stretch = max(1, round(spacing[0] / spacing[1]))
    xz = np.repeat(volume[:, h // 2], stretch, axis=0)
    yz = np.repeat(volume[:, :, w // 2], stretch, axis=0)
    return [volume[d // 2], xz, yz]


@register_task
class VolumeTask(SemanticTask):
    """One class per voxel: (N, C, D, H, W) volumes, (N, D, H, W) labels, (N, K, D, H, W) logits."""

    name = "volume"
    score_key = "mean_dice"

    def datasets(self, cfg: Any) -> tuple[Dataset, Dataset]:
        if cfg.crop_size is not None and len(cfg.crop_size) != 3:
            raise ValueError(f"crop_size={cfg.crop_size!r}: task 'volume' needs three sides [d, h, w], e.g. [16, 64, 64]")
        transform = VolumeTransform(
            crop_size=cfg.crop_size, flip=cfg.hflip, rotate=cfg.hflip, intensity=cfg.color_jitter, elastic=cfg.elastic,
        )
        train_set = open_volume_dataset(cfg.data, cfg.train_split, transform)
        return train_set, self.open_eval(cfg.data, cfg.val_split, {})

    def open_eval(self, data: str, split: str, extra: dict[str, Any]) -> Dataset:
        return open_volume_dataset(data, split)

    def model_extra(self, train_set: Any, cfg: Any) -> dict[str, Any]:
        return {"class_names": train_set.class_names, "palette": train_set.palette, "ignore_index": train_set.ignore_index}

    def setup(self, cfg: Any, train_set: Any, model: nn.Module, device: torch.device) -> None:
        if cfg.unet_weight_map or isinstance(cfg.class_weights, str):
            raise ValueError("task 'volume' supports class_weights as a list of numbers only, and no unet_weight_map")
        super().setup(cfg, train_set, model, device)

    def evaluate(self, model: nn.Module, dataset: Dataset, **options: Any) -> EvalResult:
        """As the semantic task: whole volumes through the model's forward, or ``tile`` (int or
        (d, h, w)) for bounded memory; ``flip`` mirrors W; scales and CRF do not apply."""
        if options.get("crf") is not None or tuple(options.get("scales", (1.0,))) != (1.0,):
            raise ValueError("task 'volume' evaluates at scale 1 without CRF; drop --scales/--crf")
        return super().evaluate(model, dataset, **{k: v for k, v in options.items() if k not in ("mean", "std")})

    def write_report(self, out: str | Path, result: EvalResult, dataset: Any) -> dict[str, Any]:
        """metrics.json / metrics.txt / confusion.png, and ``slices.png``: for each kept volume the
        xy, xz and yz planes through its centre, each as image | truth | prediction."""
        from pixelwise.report import save_overlay_grid, write_eval_report

        metrics = write_eval_report(out, EvalResult(result.metrics, result.confusion), dataset.class_names, dataset.palette)
        planes: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for (image, truth, pred), spacing in zip(result.samples, dataset.spacings):
            planes += zip(*(orthogonal_slices(v, spacing) for v in (image, truth, pred)))
        if planes:
            save_overlay_grid(Path(out) / "slices.png", *zip(*planes), dataset.palette)
        return metrics


def predict_volume_files(
    volumes: Sequence[str | Path],
    model_path: str | Path,
    out: str | Path,
    *,
    tile: int | Sequence[int] | None = None,
    overlap: float = 0.25,
    flip: bool = False,
) -> list[Path]:
    """Segment volume files (TIFF stacks, NIfTI) with a saved 3D model; returns the label volumes written.

    ``NAME.nii.gz`` -> ``out/NAME_labels.nii.gz`` (affine and header kept), ``NAME.tif`` ->
    ``out/NAME_labels.tif`` (spacing kept). ``tile`` (voxels, int or (d, h, w)) tiles with the
    N-D overlap-tile of :mod:`pixelwise.inference` in memory bounded by one slab; None runs
    each volume whole. ``flip`` averages with the W-flipped volume.
    """
    from pixelwise.inference import predict
    from pixelwise.models import load_model, spatial_dims

    paths = [Path(p) for p in volumes]
    for p in paths:
        if volume_suffix(p) is None:
            raise ValueError(f"{p} is not a volume file; pass .tif/.tiff stacks or .nii/.nii.gz files")
        if not p.is_file():
            raise ValueError(f"volume file {p} does not exist; check the path")
    model, _ = load_model(model_path)
    if spatial_dims(model.config["name"]) != 3:
        raise ValueError(
            f"model {model_path} ({model.config['name']}) takes 2D images; segment volumes with a 3D model such as unet3d"
        )
    model.eval()
    out = Path(out)
    written = []
    for path in paths:
        volume = read_volume(path)
        x = torch.from_numpy(volume_to_float(volume.data))[None]
        if x.shape[1] != model.config["in_channels"]:
            raise ValueError(f"volume {path} has {x.shape[1]} channel(s) but the model takes {model.config['in_channels']}")
        probs = predict(model, x, tile=tile, overlap=overlap, flip=flip)[0]
        labels = (probs[0] > 0.5).long() if probs.shape[0] == 1 else probs.argmax(0)
        suffix = volume_suffix(path)
        target = out / f"{path.name[: -len(suffix)]}_labels{suffix}"
        written.append(write_volume(target, labels.numpy(), like=volume))
    return written
