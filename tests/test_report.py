"""Report helpers: colour masks, overlays, PNG artefacts, metric tables and metrics.json."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from pixelwise.report import (
    colorize,
    format_metrics,
    overlay,
    per_class_table,
    plot_confusion,
    plot_history,
    save_overlay_grid,
    write_eval_report,
    write_metrics_json,
)
from pixelwise.training import write_run_report

PALETTE = [(10, 20, 30), (200, 0, 0), (0, 250, 4)]


def _metrics() -> dict:
    nan = math.nan
    return {
        "pixel_accuracy": 0.91234,
        "class_accuracy": 0.5,
        "mean_iou": 0.6012,
        "fw_iou": np.float64(0.85),
        "mean_dice": nan,
        "per_class": [
            {"name": "sky", "iou": 0.8, "accuracy": 0.9, "dice": 0.88, "pixels": 1234567},
            {"name": "road", "iou": 0.4024, "accuracy": 0.1, "dice": 0.57, "pixels": 10},
            {"name": "absent", "iou": nan, "accuracy": nan, "dice": nan, "pixels": 0},
        ],
    }


def test_colorize_exact_and_ignore_black():
    labels = np.array([[0, 1], [2, 255], [-1, 3]])
    out = colorize(labels, PALETTE)
    assert out.dtype == np.uint8 and out.shape == (3, 2, 3)
    expected = np.array([[PALETTE[0], PALETTE[1]], [PALETTE[2], (0, 0, 0)], [(0, 0, 0), (0, 0, 0)]], np.uint8)
    np.testing.assert_array_equal(out, expected)


def test_overlay_blends_and_keeps_ignored_pixels():
    image = np.array([[[100, 100, 100], [0, 255, 9]], [[50, 60, 70], [1, 2, 3]]], np.uint8)
    labels = np.array([[1, 2], [255, 0]])
    out = overlay(image, labels, PALETTE, alpha=0.25)
    expected = np.array(
        [
            [np.round(0.75 * np.array([100, 100, 100]) + 0.25 * np.array(PALETTE[1])),
             np.round(0.75 * np.array([0, 255, 9]) + 0.25 * np.array(PALETTE[2]))],
            [[50, 60, 70], np.round(0.75 * np.array([1, 2, 3]) + 0.25 * np.array(PALETTE[0]))],
        ]
    ).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)
    grey = overlay(np.full((2, 2, 1), 40, np.uint8), labels, PALETTE, alpha=1.0)
    np.testing.assert_array_equal(grey[0, 0], PALETTE[1])
    np.testing.assert_array_equal(grey[1, 0], [40, 40, 40])
    with pytest.raises(ValueError, match="same"):
        overlay(image, np.zeros((3, 2), int), PALETTE)


def test_save_overlay_grid_layout(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), rng.integers(0, 256, (4, 5, 1), dtype=np.uint8)]
    truth = [rng.integers(0, 3, (6, 8)), rng.integers(0, 3, (4, 5))]
    pred = [rng.integers(0, 3, (6, 8)), rng.integers(0, 3, (4, 5))]
    path = save_overlay_grid(tmp_path / "grid.png", images, truth, pred, PALETTE, gap=2)
    grid = np.array(Image.open(path))
    assert grid.shape == (6 + 2 + 4, 3 * 8 + 2 * 2, 3)
    np.testing.assert_array_equal(grid[:6, :8], images[0])
    np.testing.assert_array_equal(grid[:6, 10:18], overlay(images[0], truth[0], PALETTE))
    np.testing.assert_array_equal(grid[:6, 20:28], overlay(images[0], pred[0], PALETTE))
    np.testing.assert_array_equal(grid[8:12, 20:25], overlay(images[1], pred[1], PALETTE))
    assert (grid[6:8] == 255).all() and (grid[:6, 8:10] == 255).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


def test_plot_history_tolerates_missing_keys(tmp_path):
    history = [
        {"epoch": 1, "train_loss": 1.0},
        {"epoch": 2, "train_loss": 0.5, "val_mean_iou": 0.3, "val_loss": float("nan")},
        {"train_loss": 0.25, "val_mean_iou": 0.6},
    ]
    path = plot_history(tmp_path / "curves.png", history, dpi=50)
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (500, 200)
    assert plot_history(tmp_path / "empty.png", [], dpi=50).stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "empty.png"]


def test_plot_confusion(tmp_path):
    cm = torch.tensor([[5, 1, 0], [0, 0, 0], [2, 2, 4]])
    path = plot_confusion(tmp_path / "cm.png", cm, ["a", "b", "c"], dpi=40)
    width, height = Image.open(path).size
    side = 4 + 0.45 * 3
    assert (width, height) == (round((side + 1.5) * 40), round(side * 40))
    with pytest.raises(ValueError, match="len\\(class_names\\) = 2"):
        plot_confusion(tmp_path / "bad.png", cm, ["a", "b"])


def test_per_class_table_and_format_metrics():
    metrics = _metrics()
    table = per_class_table(metrics)
    assert table.row_count == 4  # three classes + the mean row
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    assert "40.24" in text and "1,234,567" in text and "pixel accuracy 91.23" in text
    absent_line = next(line for line in text.splitlines() if "absent" in line)
    assert absent_line.count("—") == 3
    mean_line = next(line for line in text.splitlines() if " mean " in line)
    assert mean_line.replace("│", " ").split() == ["mean", "60.12", "50.00", "—", "1,234,577"]

    plain = format_metrics(metrics)
    lines = plain.splitlines()
    assert "mean IoU" in plain and "60.12" in plain and "91.23" in plain
    assert next(line for line in lines if line.startswith("mean Dice")).endswith("—")
    road = next(line for line in lines if " road " in line).split()
    assert road == ["1", "road", "40.24", "10.00", "57.00", "10"]
    assert next(line for line in lines if "absent" in line).split()[2:5] == ["—", "—", "—"]


def test_write_metrics_json_nan_to_null(tmp_path):
    metrics = _metrics()
    metrics["confusion"] = np.array([[1, 2], [3, 4]])
    metrics["inf"] = float("inf")
    path = write_metrics_json(tmp_path / "metrics.json", metrics)
    loaded = json.loads(path.read_text())
    assert loaded["mean_dice"] is None and loaded["inf"] is None
    assert loaded["fw_iou"] == 0.85 and loaded["confusion"] == [[1, 2], [3, 4]]
    assert loaded["per_class"][2] == {"name": "absent", "iou": None, "accuracy": None, "dice": None, "pixels": 0}
    assert loaded["per_class"][0] == metrics["per_class"][0]
    assert "NaN" not in path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_write_eval_report_files(tmp_path):
    from pixelwise.evaluation import EvalResult

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    samples = [(image, rng.integers(0, 3, (5, 6)), rng.integers(0, 3, (5, 6)))]
    result = EvalResult(_metrics(), torch.eye(3, dtype=torch.int64), samples)
    metrics = write_eval_report(tmp_path / "eval", result, ["sky", "road", "absent"], PALETTE)
    assert metrics["mean_iou"] == 0.6012
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "confusion.png", "metrics.json", "metrics.txt", "overlays.png"
    ]
    assert Image.open(tmp_path / "eval" / "overlays.png").size == (3 * 6 + 2 * 4, 5)
    assert (tmp_path / "eval" / "metrics.txt").read_text() == format_metrics(metrics) + "\n"


def test_write_run_report_evaluates_best_model(tmp_path):
    from types import SimpleNamespace

    from pixelwise.data import write_synthetic_dataset
    from pixelwise.models import create_model, save_model

    data = write_synthetic_dataset(tmp_path / "data", n_train=1, n_val=2, size=(32, 48))
    torch.manual_seed(0)
    save_model(create_model("unet", num_classes=4, base_channels=4), tmp_path / "run" / "model_best")
    cfg = SimpleNamespace(data=str(data), val_split="val", val_fraction=0.2, task="semantic", mean=None, std=None, val_scales=[1.0])
    metrics = write_run_report(tmp_path / "run", cfg, [{"epoch": 1, "train_loss": 1.0, "val_mean_iou": 0.1}])
    written = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"history.png", "metrics.json", "confusion.png", "overlays.png"} <= written
    per_class_pixels = [c["pixels"] for c in metrics["per_class"]]
    masks = [np.array(Image.open(p)) for p in sorted((data / "val" / "masks").iterdir())]
    assert per_class_pixels == np.bincount(np.concatenate([m.ravel() for m in masks]), minlength=4).tolist()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["per_class"][0]["name"] == "background"
