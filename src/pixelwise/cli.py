"""``pixelwise train | eval | predict | export | models | check-data | demo``: a thin skin over the API.

Every user mistake surfaces as one line ``error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Semantic segmentation: train, evaluate, predict, export.")
console = Console()

Tile = Annotated[Optional[int], typer.Option(help="Sliding-window tile size in px (overlap-tile with mirror padding); default: whole image.")]
Overlap = Annotated[float, typer.Option(help="Fraction of a tile that neighbouring tiles share.")]
Scales = Annotated[str, typer.Option(help="Comma-separated test-time scales, e.g. 0.75,1,1.25.")]
Flip = Annotated[bool, typer.Option(help="Average with the horizontally flipped prediction.")]
Crf = Annotated[Optional[str], typer.Option(help="Dense CRF refinement preset: deeplab_v1, deeplab_v2 or krahenbuhl.")]


def _scales(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--scales {text!r} must be comma-separated numbers, e.g. 0.75,1,1.25") from None
    if not values or min(values) <= 0:
        raise ValueError(f"--scales {text!r} must be positive numbers")
    return values


@app.command()
def train(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (see configs/).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value overrides, e.g. epochs=5 model_args.backbone=resnet50.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint.safetensors.")] = False,
) -> None:
    """Train a model; writes checkpoints, metrics.json, curves, confusion matrix and overlays."""
    from pixelwise.report import write_run_report
    from pixelwise.training import load_config, train as run_training

    cfg = load_config(config, overrides or [])
    result = run_training(cfg, resume=resume)
    if result["rank"] == 0:
        metrics = write_run_report(result["run_dir"], cfg, result["history"])
        _print_summary(metrics, result["run_dir"])


@app.command("eval")
def evaluate_cmd(
    model: Annotated[Path, typer.Option(help="Model file written by training (model_best.safetensors).")],
    data: Annotated[str, typer.Option(help="Data set: camvid:PATH, isbi2012:PATH, voc:PATH, cityscapes:PATH or a folder.")],
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "val",
    out: Annotated[Path, typer.Option(help="Folder for metrics.json, confusion matrix and overlays.")] = Path("runs/eval"),
    tile: Tile = None,
    overlap: Overlap = 0.25,
    scales: Scales = "1",
    flip: Flip = False,
    crf: Crf = None,
) -> None:
    """Evaluate a trained model: per-class IoU table, metrics.json, confusion matrix, overlays."""
    from pixelwise.models import load_model
    from pixelwise.tasks import get_task

    net, extra = load_model(model)
    task = get_task(extra.get("task", "semantic"))
    dataset = task.open_eval(data, split, extra)
    result = task.evaluate(
        net, dataset, tile=tile, overlap=overlap, scales=_scales(scales), flip=flip, crf=crf, mean=extra.get("mean"),
        std=extra.get("std"), keep_samples=4, progress=True,
    )
    metrics = task.write_report(out, result, dataset)
    _print_summary(metrics, out)


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files to segment.")],
    model: Annotated[Path, typer.Option(help="Model file written by training (model_best.safetensors).")],
    out: Annotated[Path, typer.Option(help="Folder for label PNGs, colour masks and overlays.")] = Path("runs/predict"),
    tile: Tile = None,
    overlap: Overlap = 0.25,
    scales: Scales = "1",
    flip: Flip = False,
    crf: Crf = None,
    runtime: Annotated[str, typer.Option(help="torch, compile (torch.compile) or onnx (ONNX Runtime; needs --tile).")] = "torch",
) -> None:
    """Segment images of any size; writes NAME_labels.png, NAME_colour.png and NAME_overlay.png."""
    from pixelwise.inference import predict_files

    written = predict_files(
        images, model, out, tile=tile, overlap=overlap, scales=_scales(scales), flip=flip, crf=crf, runtime=runtime,
        progress=True,
    )
    console.print(f"wrote {len(written)} predictions to {out}")


@app.command()
def export(
    model: Annotated[Path, typer.Option(help="Model file written by training.")],
    out: Annotated[Path, typer.Option(help="Output .onnx file.")],
    height: Annotated[int, typer.Option(help="Fixed input height (predict tiles larger images).")] = 512,
    width: Annotated[int, typer.Option(help="Fixed input width.")] = 512,
    format: Annotated[str, typer.Option("--format", help="Export format (onnx).")] = "onnx",
) -> None:
    """Export a trained model to ONNX (batch-norm folded, dynamic batch, fixed H x W)."""
    from pixelwise.export import export_onnx
    from pixelwise.models import load_model

    if format != "onnx":
        raise ValueError(f"--format {format!r} is not supported; use onnx")
    net, _ = load_model(model)
    path = export_onnx(net, out, height=height, width=width)
    console.print(f"wrote {path}")


@app.command()
def models() -> None:
    """List the registered models with their parameter counts (21 classes, default options)."""
    import torch
    from rich.table import Table

    from pixelwise.models import create_model, list_models
    from pixelwise.models.registry import MODELS

    table = Table("name", "parameters", "trainable", "description")
    for name in list_models():
        with torch.device("meta"):
            net = create_model(name, num_classes=21)
        count = sum(p.numel() for p in net.parameters())
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        doc = (MODELS[name].__doc__ or "").strip().splitlines()
        table.add_row(name, f"{count:,}", f"{trainable:,}", doc[0] if doc else "")
    console.print(table)


@app.command("check-data")
def check_data(
    data: Annotated[str, typer.Argument(help="Data set: camvid:PATH, isbi2012:PATH, voc:PATH, cityscapes:PATH or a folder.")],
    split: Annotated[str, typer.Option(help="Split to check.")] = "train",
) -> None:
    """Report class histogram, image sizes and every bad image/mask pair; exit 2 if any is bad."""
    from pixelwise.data import check_dataset, open_dataset

    report = check_dataset(open_dataset(data, split))
    console.print(report.format(), markup=False)
    if report.problems:
        raise typer.Exit(2)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/demo"),
    data: Annotated[Optional[str], typer.Option(help="Use this data set (folder with images/ + masks/) instead of built-in synthetic data.")] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs (12 take about a minute on 2 CPU cores).")] = 12,
) -> None:
    """Train a small U-Net on built-in synthetic shapes (about a minute), evaluate, write a report."""
    from pixelwise.data.synthetic import write_synthetic_dataset
    from pixelwise.report import write_run_report
    from pixelwise.training import TrainConfig, train as run_training

    if data is None:
        data = str(write_synthetic_dataset(out / "data", n_train=120, n_val=30))
        console.print(f"synthetic data set written to {data}")
    cfg = TrainConfig(
        data=data, out=str(out), model="unet", model_args={"base_channels": 16}, epochs=epochs, batch_size=8,
        optimizer="adamw", lr=3e-3, weight_decay=1e-4, scale_range=[0.75, 1.25], color_jitter=0.1,
    )
    started = time.monotonic()
    result = run_training(cfg)
    metrics = write_run_report(result["run_dir"], cfg, result["history"])
    _print_summary(metrics, out)
    console.print(f"demo finished in {time.monotonic() - started:.0f} s; validation mIoU {metrics['mean_iou']:.3f}")


def _print_summary(metrics: dict, run_dir: Path) -> None:
    from pixelwise.report import per_class_table

    if "per_class" in metrics:
        console.print(per_class_table(metrics))
    console.print(f"report written to {run_dir}")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        code = app(standalone_mode=False)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (typer.Exit, SystemExit) as err:
        sys.exit(getattr(err, "exit_code", getattr(err, "code", 0)))
    except Exception as err:  # click's usage errors
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(2)
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
