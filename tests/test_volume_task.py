"""Task 'volume': train a tiny 3D U-Net end to end, report orthogonal slices, predict label volumes with geometry."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from pixelwise.cli import app
from pixelwise.data.volumes import read_volume
from pixelwise.tasks.volume import orthogonal_slices
from pixelwise.training import TrainConfig, train, write_run_report


def _blobs(seed: int, shape=(12, 20, 20)) -> tuple[np.ndarray, np.ndarray]:
    """Bright balls (class 1) on a dark background (class 0), uint8 image with mild noise."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    labels = np.zeros(shape, np.uint8)
    for _ in range(3):
        centre = rng.uniform(0, shape)
        labels |= (np.linalg.norm((grid - centre) / (1, 1, 1), axis=-1) < 4.5).astype(np.uint8)
    image = np.clip(60 + 120 * labels + rng.normal(0, 10, shape), 0, 255).astype(np.uint8)
    return image, labels


@pytest.fixture(scope="module")
def volume_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("volumes")
    for split, seeds in (("train", (0, 1)), ("val", (2,))):
        for part in ("images", "labels"):
            (root / split / part).mkdir(parents=True)
        for seed in seeds:
            image, labels = _blobs(seed)
            kw = {"imagej": True, "resolution": (1.0, 1.0), "metadata": {"spacing": 2.0, "axes": "ZYX"}}
            tifffile.imwrite(root / split / "images" / f"v{seed}.tif", image, **kw)
            tifffile.imwrite(root / split / "labels" / f"v{seed}.tif", labels, **kw)
    return root


def test_orthogonal_slices_cut_through_the_centre_in_true_proportions():
    volume = np.arange(4 * 6 * 8).reshape(4, 6, 8)
    xy, xz, yz = orthogonal_slices(volume, spacing=(3.0, 1.0, 1.0))
    assert np.array_equal(xy, volume[2])
    assert xz.shape == (12, 8) and np.array_equal(xz[::3], volume[:, 3]) and np.array_equal(xz[1::3], volume[:, 3])
    assert yz.shape == (12, 6) and np.array_equal(yz[2::3], volume[:, :, 4])


def test_train_report_and_predict_a_volume_end_to_end(volume_data, tmp_path):
    cfg = TrainConfig(
        data=str(volume_data), out=str(tmp_path / "run"), task="volume", model="unet3d",
        model_args={"base_channels": 4, "depth": 1}, crop_size=[8, 16, 16], epochs=8, batch_size=2,
        optimizer="adamw", lr=0.02, weight_decay=0.0, color_jitter=0.05, threads=1,
    )
    result = train(cfg, progress=False)
    history = result["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    metrics = write_run_report(result["run_dir"], cfg, history)
    assert {"metrics.json", "slices.png", "confusion.png", "history.png"} <= {p.name for p in result["run_dir"].iterdir()}
    assert json.loads((result["run_dir"] / "metrics.json").read_text())["mean_dice"] == pytest.approx(metrics["mean_dice"])
    assert metrics["mean_dice"] > 0.8  # bright balls on a dark background: an easy task

    # Predict the validation volume as NIfTI with a rotated, shifted affine: labels keep its geometry.
    image, truth = _blobs(2)
    affine = np.array([[0, 0, 1.5, 4], [0, 0.5, 0, -2], [2.0, 0, 0, 9], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(image.transpose(2, 1, 0).copy(), affine), tmp_path / "scan.nii.gz")
    model = result["run_dir"] / "model_best.safetensors"
    out = CliRunner().invoke(app, ["predict", str(tmp_path / "scan.nii.gz"), "--model", str(model),
                                   "--out", str(tmp_path / "pred"), "--tile", "8"])
    assert out.exit_code == 0, out.output
    written = nib.load(tmp_path / "pred" / "scan_labels.nii.gz")
    np.testing.assert_array_equal(written.affine, nib.load(tmp_path / "scan.nii.gz").affine)
    labels = read_volume(tmp_path / "pred" / "scan_labels.nii.gz").data
    assert labels.shape == truth.shape
    # The run's report scored the same volume (whole, not tiled): the tiled labels agree with it.
    dice = 2 * ((labels == 1) & (truth == 1)).sum() / ((labels == 1).sum() + (truth == 1).sum())
    assert dice == pytest.approx(metrics["per_class"][1]["dice"], abs=0.05)

    # TIFF stack in, TIFF stack out, spacing kept.
    out = CliRunner().invoke(app, ["predict", str(volume_data / "val" / "images" / "v2.tif"), "--model", str(model),
                                   "--out", str(tmp_path / "pred")])
    assert out.exit_code == 0, out.output
    assert read_volume(tmp_path / "pred" / "v2_labels.tif").spacing == pytest.approx((2.0, 1.0, 1.0))


def test_crop_size_has_one_side_per_spatial_dimension_of_the_model():
    assert TrainConfig(data="d", task="volume", model="unet3d", crop_size=[8, 16, 16]).crop_size == [8, 16, 16]
    with pytest.raises(ValueError, match=r"must hold three numbers for unet3d"):
        TrainConfig(data="d", task="volume", model="unet3d", crop_size=[16, 16])


def test_predict_rejects_a_2d_model_for_volumes_and_mixed_inputs(volume_data, tmp_path):
    from pixelwise.models import create_model, save_model

    save_model(create_model("unet", num_classes=2, in_channels=1, base_channels=4, depth=1), tmp_path / "m2d")
    stack = str(volume_data / "val" / "images" / "v2.tif")
    result = CliRunner().invoke(app, ["predict", stack, "--model", str(tmp_path / "m2d.safetensors")])
    assert result.exit_code != 0 and "takes 2D images" in str(result.exception)
    (tmp_path / "a.png").write_bytes(b"")
    result = CliRunner().invoke(app, ["predict", stack, str(tmp_path / "a.png"), "--model", str(tmp_path / "m2d.safetensors")])
    assert "not both" in str(result.exception)
