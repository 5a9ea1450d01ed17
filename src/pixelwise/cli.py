"""``pixelwise train | eval | predict | export | models | pockets | check-data | demo | serve``: a thin skin over the API.

Every user mistake surfaces as one line ``error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console

from pixelwise.io import check_output_folder

app = typer.Typer(add_completion=False, help="Segmentation of images and volumes: train, evaluate, predict, export, serve.")
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


def _crf(name: str | None) -> str | None:
    from pixelwise.crf import PRESETS

    if name is not None and name not in PRESETS:
        raise ValueError(f"--crf {name!r} is not a preset; use one of {', '.join(sorted(PRESETS))}")
    return name


@app.command()
def train(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (see configs/).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value overrides, e.g. epochs=5 model_args.backbone=resnet50.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint.safetensors.")] = False,
) -> None:
    """Train a model; writes checkpoints, metrics.json, curves, confusion matrix and overlays."""
    from pixelwise.training import load_config, train as run_training, write_run_report

    cfg = load_config(config, overrides or [])
    check_output_folder(cfg.out, "out")
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

    check_output_folder(out)
    scales_, crf = _scales(scales), _crf(crf)
    net, extra = load_model(model)
    task = get_task(extra.get("task", "semantic"))
    dataset = task.open_eval(data, split, extra)
    result = task.evaluate(
        net, dataset, tile=tile, overlap=overlap, scales=scales_, flip=flip, crf=crf, mean=extra.get("mean"),
        std=extra.get("std"), keep_samples=4, progress=True,
    )
    metrics = task.write_report(out, result, dataset)
    _print_summary(metrics, out)


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files, or folders of images, to segment.")],
    model: Annotated[Path, typer.Option(help="Model file written by training (model_best.safetensors).")],
    out: Annotated[Path, typer.Option(help="Folder for label PNGs, colour masks and overlays.")] = Path("runs/predict"),
    tile: Tile = None,
    overlap: Overlap = 0.25,
    scales: Scales = "1",
    flip: Flip = False,
    crf: Crf = None,
    runtime: Annotated[str, typer.Option(help="torch, compile (torch.compile) or onnx (ONNX Runtime; needs --tile).")] = "torch",
    resume: Annotated[bool, typer.Option(help="Skip images whose three outputs are already in OUT (continue an interrupted batch).")] = False,
) -> None:
    """Segment images of any size; writes NAME_labels.png, NAME_colour.png and NAME_overlay.png.

    Instance models write NAME_instances.png (instance ids), NAME_overlay.png and NAME_instances.json.
    Under torchrun (--nproc_per_node=N, and its multi-machine options) each rank predicts its own share.
    Volumes (.tif/.tiff stacks, .nii/.nii.gz) with a 3D model: writes NAME_labels.<same suffix>
    with the input's spacing / affine (--tile in voxels per side).
    """
    from pixelwise.data.volumes import is_volume_file
    from pixelwise.inference import predict_files, shard_images

    is_volume = [is_volume_file(p) for p in images]
    if any(is_volume):
        if not all(is_volume):
            raise ValueError("pass either images or volumes (TIFF stacks, NIfTI) to one predict call, not both")
        if _scales(scales) != (1.0,) or crf is not None or runtime != "torch" or resume:
            raise ValueError("volumes are predicted at scale 1 with the torch runtime, no CRF and no --resume; drop those options")
        from pixelwise.tasks.volume import predict_volume_files

        written = predict_volume_files(images, model, out, tile=tile, overlap=overlap, flip=flip)
        console.print(f"wrote {len(written)} label volumes to {out}")
        return
    mine = shard_images(images)
    if _saved_task(model) == "instance":
        from pixelwise.tasks.instance import predict_instance_files

        if scales != "1" or flip or crf is not None or runtime != "torch" or resume:
            raise ValueError("instance models predict at scale 1 with torch: drop --scales, --flip, --crf, --runtime and --resume")
        written = predict_instance_files(mine, model, out, tile=tile, overlap=overlap, progress=True)
        console.print(f"wrote {len(written)} predictions to {out}")
        return
    written = predict_files(
        mine, model, out, tile=tile, overlap=overlap, scales=_scales(scales), flip=flip, crf=_crf(crf), runtime=runtime,
        progress=True, skip_existing=resume,
    )
    rank = f"rank {os.environ['RANK']}/{os.environ['WORLD_SIZE']}: " if "WORLD_SIZE" in os.environ else ""
    skipped = f", skipped {len(mine) - len(written)} already there" if resume else ""
    console.print(f"{rank}wrote {len(written)} predictions to {out}{skipped}")


@app.command()
def export(
    model: Annotated[Path, typer.Option(help="Model file written by training.")],
    out: Annotated[Path, typer.Option(help="Output .onnx file (run it with: predict --model FILE --runtime onnx).")],
    height: Annotated[int, typer.Option(help="Fixed input height (predict tiles larger images).")] = 512,
    width: Annotated[int, typer.Option(help="Fixed input width.")] = 512,
    format: Annotated[str, typer.Option("--format", help="Export format (onnx).")] = "onnx",
    int8: Annotated[bool, typer.Option("--int8", help="Static int8 quantization (ONNX Runtime, QDQ); needs --calibrate.")] = False,
    calibrate: Annotated[Optional[str], typer.Option(help="Calibration images for --int8: DATA[:split] (split default train), the model's data set.")] = None,
    calib_images: Annotated[int, typer.Option(help="Number of calibration images (centre crops at the export size).")] = 32,
) -> None:
    """Export a trained model to ONNX (batch-norm folded, dynamic batch, fixed H x W), optionally int8."""
    from pixelwise.export import calibration_batch, export_onnx, export_onnx_int8
    from pixelwise.models import load_model
    from pixelwise.tasks import get_task

    if format != "onnx":
        raise ValueError(f"--format {format!r} is not supported; use onnx")
    if int8 != (calibrate is not None):
        raise ValueError("--int8 and --calibrate DATA[:split] go together: int8 ranges are calibrated on the model's data set")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the .onnx file to write, e.g. {out / 'model.onnx'}")
    check_output_folder(out.parent)
    net, extra = load_model(model)
    if not int8:
        console.print(f"wrote {export_onnx(net, out, height=height, width=width, extra=extra)}")
        return
    task = get_task(extra.get("task", "semantic"))
    data, split = _data_and_split(calibrate)
    try:
        dataset = task.open_eval(data, split, extra)
    except ValueError as err:
        raise ValueError(f"--calibrate {calibrate}: {err}") from None
    images = calibration_batch(
        dataset, height=height, width=width, in_channels=net.config["in_channels"],
        num_images=calib_images, source=f"--calibrate {calibrate}",
        class_names=extra.get("class_names") if task.name == "semantic" else None,  # other tasks' outputs are not its classes
        normalised=extra.get("mean") is not None or extra.get("std") is not None,
    )
    path = export_onnx_int8(net, out, images, height=height, width=width, extra=extra)
    console.print(f"wrote {path} (int8, calibrated on {len(images)} images of {data} {split})")


def _data_and_split(text: str, default: str = "train") -> tuple[str, str]:
    """``DATA[:split]`` -> (DATA, split): a trailing ``:word`` is a split when what precedes it is a spec or a path."""
    import re

    head, sep, tail = text.rpartition(":")
    if sep and re.fullmatch(r"[A-Za-z0-9_-]+", tail) and (":" in head or Path(head).exists()):
        return head, tail
    return text, default


@app.command()
def models() -> None:
    """List the registered models (2D or 3D input) with their parameter counts (21 classes, default options)."""
    import torch
    from rich.table import Table

    from pixelwise.models import create_model, list_models, spatial_dims
    from pixelwise.models.registry import MODELS

    table = Table("name", "input", "parameters", "trainable", "description")
    for name in list_models():
        with torch.device("meta"):
            net = create_model(name, num_classes=21)
        count = sum(p.numel() for p in net.parameters())
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        doc = (MODELS[name].__doc__ or "").strip().splitlines()
        table.add_row(name, f"{spatial_dims(name)}D", f"{count:,}", f"{trainable:,}", doc[0] if doc else "")
    console.print(table)


@app.command()
def pockets(
    structure: Annotated[Path, typer.Argument(help="Protein structure (.pdb or .cif).")],
    model: Annotated[Path, typer.Option(help="3D pocket model (8 atom-type channels in, 2 classes) written by training.")],
    out: Annotated[Path, typer.Option(help="Folder for STEM_pockets.pdb (pseudo-atoms) and STEM_pockets.json.")] = Path("runs/pockets"),
    tile: Annotated[Optional[int], typer.Option(help="Tile side in voxels (1 Å) for large proteins; 0 runs whole.")] = 64,
    threshold: Annotated[float, typer.Option(help="Pocket probability threshold.")] = 0.5,
) -> None:
    """Find binding pockets: voxelise, segment with a 3D model, write ranked pockets as PDB pseudo-atoms."""
    from pixelwise.pockets.detect import find_pockets_file

    found, pdb = find_pockets_file(structure, model, out, tile=tile or None, threshold=threshold)
    for p in found[:10]:
        x, y, z = p.centre
        console.print(f"pocket {p.rank}: centre ({x:.1f}, {y:.1f}, {z:.1f}) Å, volume {p.volume:.0f} Å³, score {p.score:.1f}")
    console.print(f"wrote {len(found)} pockets to {pdb}")


@app.command("check-data")
def check_data(
    data: Annotated[str, typer.Argument(help="Data set: camvid:PATH, isbi2012:PATH, voc:PATH, cityscapes:PATH or a folder.")],
    split: Annotated[Optional[str], typer.Option(help="Split to check (default: train and val).")] = None,
) -> None:
    """Report class histogram, image sizes and every bad image/mask pair; exit 2 if any is bad.

    A scribble folder (SPLIT/scribbles/, see pixelwise.data.scribbles) gets the labelled
    fraction per image and per class instead."""
    from pixelwise.data import check_dataset, open_dataset
    from pixelwise.data.scribbles import check_scribbles, is_scribble_folder, open_scribbles

    def check(name: str):
        if is_scribble_folder(data, name):
            return check_scribbles(open_scribbles(data, name))
        return check_dataset(open_dataset(data, name))

    splits = [split] if split else ["train", "val"]
    reports = [check(name) for name in splits]
    for name, report in zip(splits, reports):
        console.print(f"\n[bold]split {name}[/bold]")
        console.print(report.format(), markup=False, soft_wrap=True)
    if any(report.problems for report in reports):
        raise typer.Exit(2)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/demo"),
    data: Annotated[Optional[str], typer.Option(help="Use this data set (folder with images/ + masks/) instead of built-in synthetic data.")] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs (12 take about a minute on 2 CPU cores).")] = 12,
    images: Annotated[int, typer.Option(help="Synthetic training images (a quarter as many for validation).")] = 120,
) -> None:
    """Train a small U-Net on built-in synthetic shapes (about a minute), evaluate, write a report."""
    from pixelwise.data.synthetic import write_synthetic_dataset
    from pixelwise.training import TrainConfig, train as run_training, write_run_report

    if images < 4:
        raise ValueError(f"--images {images} must be at least 4 (a quarter of them, at least 1, validate)")
    check_output_folder(out)
    cfg = TrainConfig(
        data=data or str(out / "data"), out=str(out), model="unet", model_args={"base_channels": 16}, epochs=epochs,
        batch_size=8, optimizer="adamw", lr=3e-3, weight_decay=1e-4, scale_range=[0.75, 1.25], color_jitter=0.1,
    )  # validates the options before anything is written
    if data is None:
        write_synthetic_dataset(cfg.data, n_train=images, n_val=images // 4)
        console.print(f"synthetic data set written to {cfg.data}")
    started = time.monotonic()
    result = run_training(cfg)
    metrics = write_run_report(result["run_dir"], cfg, result["history"])
    _print_summary(metrics, out)
    console.print(f"demo finished in {time.monotonic() - started:.0f} s; validation mIoU {metrics['mean_iou']:.3f}")


@app.command()
def serve(
    model: Annotated[list[str], typer.Option(help="Model file (model_best.safetensors), served under its run folder's name, or NAME=PATH; repeat for more.")],
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 keeps the server private to this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest request body in MB (413 beyond).")] = 20.0,
    max_pixels: Annotated[int, typer.Option(help="Largest image, height x width (413 beyond).")] = 16_000_000,
    max_jobs: Annotated[int, typer.Option(help="Images held at once, running or queued (503 + Retry-After beyond).")] = 4,
    workers: Annotated[int, typer.Option(help="Inference threads.")] = 1,
    timeout: Annotated[float, typer.Option(help="Seconds a request waits for its prediction (504 beyond).")] = 120.0,
) -> None:
    """Serve models over HTTP: a web page at /, the REST API under /v1 (documented at /docs)."""
    import uvicorn

    from pixelwise.serve import ServeLimits, create_app

    limits = ServeLimits(max_upload_mb=max_upload_mb, max_pixels=max_pixels, max_jobs=max_jobs, workers=workers,
                         timeout_s=timeout)
    server = create_app(model, limits)
    console.print(f"serving {', '.join(server.state.models)} on http://{host}:{port} (API docs at /docs)")
    # Connections beyond the job queue's size only wait for a 503, so a few dozen suffice.
    uvicorn.run(server, host=host, port=port, limit_concurrency=4 * max_jobs + 16, log_level="warning")


def _saved_task(model: Path) -> str:
    """The task a saved model was trained for (``extra["task"]`` of its JSON; "semantic" without
    a JSON, e.g. an exported .onnx, leaving a missing file to the loader's error)."""
    from pixelwise.models.registry import read_model_description

    if not Path(model).with_suffix(".json").is_file():
        return "semantic"
    return read_model_description(model).get("extra", {}).get("task", "semantic")


def _print_summary(metrics: dict, run_dir: Path) -> None:
    from pixelwise.report import ap_table, per_class_table

    if "per_class" in metrics:
        console.print(per_class_table(metrics))
    if "mask_ap" in metrics:
        console.print(ap_table(metrics))
    console.print(f"report written to {run_dir}")


def _show_notes() -> None:
    """Print the package's notes (how data were read, e.g. binary masks) as ``note: ...`` on stdout."""
    import logging

    log = logging.getLogger("pixelwise")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("note: %(message)s"))
        log.addHandler(handler)
        log.propagate = False


def _fail(message: str) -> NoReturn:
    """Print ``error: message`` as one line on stderr and exit with code 2."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    sys.exit(2)


def main(args: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2.

    User errors are ValueErrors (bad data, config, files), typer's usage errors (missing or
    unknown option or command, a value of the wrong type) and OSErrors (a path that cannot
    be read or written); anything else is a bug and keeps its traceback.
    """
    _show_notes()
    args = sys.argv[1:] if args is None else list(args)
    try:
        code = app(args=args or ["--help"], prog_name="pixelwise", standalone_mode=False)
    except ValueError as err:
        _fail(str(err))
    except typer.TyperException as err:  # usage errors (typer >= 0.29 vendors click's under this base)
        ctx = getattr(err, "ctx", None)
        hint = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
        _fail(err.format_message().rstrip(".") + hint)
    except OSError as err:
        _fail(f"{err.filename}: {err.strerror or err}" if err.filename else str(err))
    except (typer.Exit, SystemExit) as err:
        sys.exit(getattr(err, "exit_code", getattr(err, "code", 0)))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
