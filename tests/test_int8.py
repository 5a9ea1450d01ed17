"""int8 export: a trained tiny model's int8 labels against fp32, `predict` on the .onnx, refused calibration sets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from pixelwise.cli import _data_and_split, app
from pixelwise.data import open_dataset, write_synthetic_dataset
from pixelwise.data.transforms import eval_transform
from pixelwise.export import OnnxPredictor, calibration_batch
from pixelwise.io import read_mask
from pixelwise.models import create_model, save_model

runner = CliRunner()
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
HEIGHT, WIDTH = 48, 64  # export size = the synthetic images' size


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, torch.nn.Module]:
    """(data set, saved model, the model in eval mode): a small U-Net trained for 40 steps on synthetic shapes."""
    root = tmp_path_factory.mktemp("int8")
    data = write_synthetic_dataset(root / "data", n_train=16, n_val=4, size=(HEIGHT, WIDTH), num_classes=4)
    train = open_dataset(data, "train", transform=eval_transform(MEAN, STD))
    images = torch.stack([train[i][0] for i in range(len(train))])
    labels = torch.stack([train[i][1] for i in range(len(train))])
    torch.manual_seed(0)
    model = create_model("unet", num_classes=4, base_channels=8, depth=3)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is faster on a shared machine
    try:
        for _ in range(40):
            batch = torch.randint(0, len(images), (8,))
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    finally:
        torch.set_num_threads(threads)
    extra = {"task": "semantic", "class_names": train.class_names, "palette": train.palette,
             "ignore_index": train.ignore_index, "mean": MEAN, "std": STD}
    path = save_model(model, root / "model.safetensors", extra=extra)
    return data, path, model.eval()


def val_images(data: Path) -> torch.Tensor:
    val = open_dataset(data, "val", transform=eval_transform(MEAN, STD))
    return torch.stack([val[i][0] for i in range(len(val))])


def test_int8_labels_agree_with_fp32_and_predict_runs_the_file(trained, tmp_path) -> None:
    data, model_path, model = trained
    x = val_images(data)
    with torch.no_grad():
        fp32 = model(x).argmax(1)
    shares = torch.bincount(fp32.flatten(), minlength=4) / fp32.numel()
    assert (shares > 0.02).sum() >= 3, f"the fp32 model is near-constant: class shares {shares.tolist()}"

    out = tmp_path / "int8.onnx"
    result = runner.invoke(app, ["export", "--model", str(model_path), "--out", str(out), "--height", str(HEIGHT),
                                 "--width", str(WIDTH), "--int8", "--calibrate", f"{data}:train", "--calib-images", "8"])
    assert result.exit_code == 0, result.output
    predictor = OnnxPredictor(out)
    assert predictor.int8 and predictor.extra["class_names"] == open_dataset(data, "train").class_names
    int8 = predictor(x).argmax(1)
    assert (int8 == fp32).float().mean() >= 0.98
    import onnx

    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # it is quantized, not a copy of the fp32 graph

    # `predict` runs the .onnx file in tiles of its exported size with its stored normalisation.
    image = data / "val" / "images" / "0000.png"
    result = runner.invoke(app, ["predict", str(image), "--model", str(out), "--runtime", "onnx", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    written = read_mask(tmp_path / "0000_labels.png")
    assert (written == fp32[0].numpy()).mean() >= 0.98
    result = runner.invoke(app, ["predict", str(image), "--model", str(out), "--out", str(tmp_path / "torch")])
    assert isinstance(result.exception, ValueError) and "--runtime onnx" in str(result.exception)


def test_int8_export_refuses_mismatched_calibration_sets(trained, tmp_path) -> None:
    data, model_path, _ = trained
    other = write_synthetic_dataset(tmp_path / "three", n_train=2, n_val=1, size=(HEIGHT, WIDTH), num_classes=3)
    out = tmp_path / "int8.onnx"
    args = ["export", "--model", str(model_path), "--out", str(out), "--height", str(HEIGHT), "--width", str(WIDTH)]
    result = runner.invoke(app, [*args, "--int8", "--calibrate", str(other)])
    assert isinstance(result.exception, ValueError)
    assert "--calibrate" in str(result.exception) and "classes" in str(result.exception)
    result = runner.invoke(app, [*args, "--int8"])
    assert isinstance(result.exception, ValueError) and "--calibrate" in str(result.exception)
    assert not out.exists() and not list(tmp_path.glob(".int8.onnx.*"))

    train = open_dataset(data, "train", transform=eval_transform(MEAN, STD))
    size = {"height": HEIGHT, "width": WIDTH, "num_images": 4, "source": "--calibrate X"}
    with pytest.raises(ValueError, match="--calibrate X.*takes 1-channel images"):
        calibration_batch(train, in_channels=1, **size)
    # Images normalised with statistics far from the model's (here: std 0.02 for images of std ~0.2).
    wrong = open_dataset(data, "train", transform=eval_transform([0.9] * 3, [0.02] * 3))
    with pytest.raises(ValueError, match="--calibrate X.*mean.*std"):
        calibration_batch(wrong, in_channels=3, **size)
    batch = calibration_batch(train, in_channels=3, height=32, width=40, num_images=4, class_names=train.class_names)
    assert batch.shape == (4, 3, 32, 40)
    # Centre crops: image 0's crop is its middle 32 x 40.
    assert torch.equal(batch[0], train[0][0][:, 8:40, 12:52])


@pytest.mark.parametrize(("text", "expected"), [
    ("camvid:/data/camvid:val", ("camvid:/data/camvid", "val")),
    ("camvid:/data/camvid", ("camvid:/data/camvid", "train")),
    ("camvid:relative", ("camvid:relative", "train")),  # "camvid" is not a folder here: no split
])
def test_calibrate_argument_splits_data_and_split(text: str, expected: tuple[str, str]) -> None:
    assert _data_and_split(text) == expected


def test_calibrate_argument_on_a_folder(tmp_path) -> None:
    assert _data_and_split(f"{tmp_path}:val") == (str(tmp_path), "val")
    assert _data_and_split(str(tmp_path)) == (str(tmp_path), "train")
