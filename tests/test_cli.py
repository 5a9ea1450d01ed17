"""The CLI end to end on tiny synthetic data, and its one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pixelwise.cli import app
from pixelwise.data import write_synthetic_dataset
from pixelwise.io import read_mask

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    data = write_synthetic_dataset(root / "data", n_train=8, n_val=4, size=(32, 48))
    run = root / "run"
    result = runner.invoke(app, ["train", f"data={data}", f"out={run}", "model=unet",
                                 "model_args={base_channels: 4, depth: 2}", "epochs=2", "batch_size=4", "threads=1"])
    assert result.exit_code == 0, result.output
    return data, run


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pixelwise.cli", *args], capture_output=True, text=True, timeout=120)


def test_train_writes_the_run_report(trained) -> None:
    _, run = trained
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["mean_iou"] <= 1.0 and len(metrics["per_class"]) == 4
    for name in ("history.png", "confusion.png", "overlays.png", "model_best.safetensors", "model_best.json"):
        assert (run / name).stat().st_size > 0, name
    assert Image.open(run / "history.png").size[0] > 100


def test_eval_matches_a_confusion_matrix_counted_by_hand(trained, tmp_path) -> None:
    import torch

    from pixelwise.models import load_model

    data, run = trained
    result = runner.invoke(app, ["eval", "--model", str(run / "model_best.safetensors"), "--data", str(data),
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "mean" in result.output  # the per-class table
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    net, _ = load_model(run / "model_best.safetensors")  # trained without mean/std: pixels / 255
    confusion = np.zeros((4, 4), np.int64)
    for path in sorted((data / "val" / "images").glob("*.png")):
        x = torch.from_numpy(np.asarray(Image.open(path), np.float32) / 255).permute(2, 0, 1)[None]
        mask = np.asarray(Image.open(data / "val" / "masks" / path.name))
        with torch.no_grad():
            pred = net.eval()(x).argmax(1)[0].numpy()
        keep = mask != 255
        np.add.at(confusion, (mask[keep], pred[keep]), 1)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    iou = np.diag(confusion)[union > 0] / union[union > 0]
    assert metrics["mean_iou"] == pytest.approx(iou.mean(), abs=1e-9)
    assert metrics["pixel_accuracy"] == pytest.approx(np.trace(confusion) / confusion.sum(), abs=1e-9)


def test_predict_writes_labels_colour_and_overlay_and_onnx_agrees(trained, tmp_path) -> None:
    data, run = trained
    image = data / "val" / "images" / "0000.png"
    model = str(run / "model_best.safetensors")
    result = runner.invoke(app, ["predict", str(image), "--model", model, "--out", str(tmp_path / "torch")])
    assert result.exit_code == 0, result.output
    labels = read_mask(tmp_path / "torch" / "0000_labels.png")
    assert labels.shape == (32, 48) and labels.max() < 4
    for suffix in ("colour", "overlay"):
        assert Image.open(tmp_path / "torch" / f"0000_{suffix}.png").size == (48, 32)
    result = runner.invoke(app, ["predict", str(image), "--model", model, "--out", str(tmp_path / "onnx"),
                                 "--runtime", "onnx", "--tile", "32"])
    assert result.exit_code == 0, result.output
    tiled = runner.invoke(app, ["predict", str(image), "--model", model, "--out", str(tmp_path / "tiled"), "--tile", "32"])
    assert tiled.exit_code == 0, tiled.output
    onnx_labels = read_mask(tmp_path / "onnx" / "0000_labels.png")
    torch_labels = read_mask(tmp_path / "tiled" / "0000_labels.png")
    assert (onnx_labels == torch_labels).mean() > 0.99


def test_export_writes_an_onnx_file(trained, tmp_path) -> None:
    _, run = trained
    out = tmp_path / "model.onnx"
    result = runner.invoke(app, ["export", "--model", str(run / "model_best.safetensors"), "--out", str(out),
                                 "--height", "32", "--width", "48"])
    assert result.exit_code == 0, result.output
    import onnx

    graph = onnx.load(str(out)).graph
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[2:]] == [32, 48]


def test_models_lists_the_registry_with_parameter_counts() -> None:
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    assert "41,055,413" in result.output  # deeplabv3plus default: Xception-65, separable, 21 classes
    assert "251,805,653" in result.output  # deconvnet (derived in test_models_deconv_refine.py)
    names = ("fcn8s", "segnet_basic", "hed", "fcdensenet103", "deconvnet", "refinenet", "deeplabv3_cascade", "deeplabv1_msc")
    assert all(name in result.output for name in names)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "data=/no/such/folder"], "does not exist"),
        (["train", "data=/tmp", "model=unett"], "unknown model 'unett'"),
        (["train", "data=/tmp", "epoch=3"], "unknown config key"),
        (["predict", "missing.png", "--model", "missing.safetensors"], "not found"),
        (["eval", "--model", "missing.safetensors", "--data", "/tmp"], "does not exist"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(args, message) -> None:
    proc = _cli(*args)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_check_data_names_every_bad_pair(tmp_path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name, mask_size in (("good", (8, 8)), ("small", (4, 8))):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / f"{name}.png")
        Image.fromarray(np.ones(mask_size, np.uint8)).save(tmp_path / "masks" / f"{name}.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "bad.png")
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(tmp_path / "masks" / "bad.png")
    for name in ("unreadable", "rgb"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / f"{name}.png")
    (tmp_path / "masks" / "unreadable.png").write_bytes(b"not a png")
    Image.fromarray(np.ones((8, 8, 3), np.uint8)).save(tmp_path / "masks" / "rgb.png")
    (tmp_path / "classes.json").write_text(json.dumps({"classes": [{"name": "a", "color": [0, 0, 0]}, {"name": "b", "color": [255, 0, 0]}]}))
    proc = _cli("check-data", str(tmp_path))  # both splits: the training pairs and the held-out ones
    assert proc.returncode == 2
    problems = [line for line in proc.stdout.splitlines() if line.startswith("  - ")]
    assert len(problems) == 4
    for name in ("bad.png", "rgb.png", "small.png", "unreadable.png"):
        assert sum(f"masks/{name}" in p for p in problems) == 1, name
