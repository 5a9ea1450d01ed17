"""Volume files (TIFF stacks, NIfTI), 3D augmentation, the ISBI 2012 stack as a volume, volume metrics."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch

from pixelwise.data.volumes import (
    VolumeTransform,
    elastic_field,
    open_volume_dataset,
    read_volume,
    volume_folder,
    warp,
    write_volume,
)
from pixelwise.metrics import ConfusionMatrix

ISBI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isbi2012"


def test_tiff_stack_round_trip_keeps_spacing(tmp_path):
    data = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    tifffile.imwrite(tmp_path / "stack.tif", data, imagej=True, resolution=(1 / 0.25, 1 / 0.5),
                     metadata={"spacing": 2.0, "unit": "um", "axes": "ZYX"})
    volume = read_volume(tmp_path / "stack.tif")
    assert np.array_equal(volume.data, data)
    assert volume.spacing == pytest.approx((2.0, 0.5, 0.25)) and volume.unit == "um"
    labels = (data % 3).astype(np.int64)
    write_volume(tmp_path / "labels.tiff", labels, like=volume)
    back = read_volume(tmp_path / "labels.tiff")
    assert np.array_equal(back.data, labels) and back.spacing == pytest.approx(volume.spacing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tiff", "stack.tif"]  # no temp files left


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip_keeps_affine_and_axis_order(tmp_path, suffix):
    xyz = np.random.default_rng(0).integers(0, 1000, (4, 5, 6)).astype(np.int16)  # nibabel order (x, y, z)
    affine = np.array([[0.5, 0, 0, -10], [0, 0.7, 0, 3], [0, 0, 2.0, 7], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(xyz, affine), tmp_path / f"scan{suffix}")
    volume = read_volume(tmp_path / f"scan{suffix}")
    assert volume.data.shape == (6, 5, 4) and volume.data[2, 1, 3] == xyz[3, 1, 2]  # (D, H, W) = (z, y, x)
    assert volume.spacing == pytest.approx((2.0, 0.7, 0.5))
    labels = (volume.data > 500).astype(np.uint8)
    write_volume(tmp_path / f"labels{suffix}", labels, like=volume)
    back = nib.load(tmp_path / f"labels{suffix}")
    np.testing.assert_array_equal(back.affine, volume.affine)  # the input file's (float32-stored) affine
    np.testing.assert_allclose(back.affine, affine, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(back.dataobj), (xyz > 500).astype(np.uint8))


def test_bad_volume_files_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not a volume file"):
        read_volume(tmp_path / "x.png")
    with pytest.raises(ValueError, match="does not exist"):
        read_volume(tmp_path / "x.nii.gz")
    (tmp_path / "broken.tif").write_bytes(b"not a tiff")
    with pytest.raises(ValueError, match="cannot read TIFF stack"):
        read_volume(tmp_path / "broken.tif")
    volume = read_volume_from(tmp_path)
    with pytest.raises(ValueError, match="do not match"):
        write_volume(tmp_path / "y.tif", np.zeros((1, 1, 1)), like=volume)


def read_volume_from(folder: Path):
    tifffile.imwrite(folder / "v.tif", np.zeros((2, 3, 4), np.uint8), photometric="minisblack")
    return read_volume(folder / "v.tif")


def _depth_coded(shape=(6, 8, 8)) -> tuple[np.ndarray, np.ndarray]:
    """Labels = 10 * section + quadrant id; image = labels as float, so any joint transform keeps them equal."""
    d, h, w = np.indices(shape)
    labels = 10 * d + 2 * (h >= shape[1] // 2) + (w >= shape[2] // 2)
    return labels[None].astype(np.float32), labels


def test_crops_flips_and_rotations_move_image_and_labels_together():
    image, labels = _depth_coded()
    transform = VolumeTransform(crop_size=(4, 6, 6), flip=True, rotate=True, intensity=0.0, seed=0)
    for _ in range(20):
        x, y = transform(image, labels, spacing=(50.0, 4.0, 4.0))
        assert x.shape == (1, 4, 6, 6) and y.shape == (4, 6, 6)
        assert torch.equal(x[0].long(), y)
        # Sections stay sections: rotations turn only the isotropic (H, W) plane.
        sections = y // 10
        assert (sections == sections[:, :1, :1]).all()


def test_rotations_use_every_isotropic_plane_and_keep_shapes():
    image, labels = _depth_coded((6, 6, 6))
    transform = VolumeTransform(crop_size=None, flip=False, rotate=True, intensity=0.0, seed=1)
    section_varies_in_plane = False
    for _ in range(30):
        x, y = transform(image, labels, spacing=(1.0, 1.0, 1.0))
        assert torch.equal(x[0].long(), y) and y.shape == (6, 6, 6)
        section_varies_in_plane |= bool(((y // 10) != (y // 10)[:, :1, :1]).any())
    assert section_varies_in_plane  # with isotropic voxels depth is rotated too


def test_small_volumes_are_padded_with_ignore_index():
    transform = VolumeTransform(crop_size=(4, 4, 4), flip=False, rotate=False, intensity=0.0, ignore_index=9, seed=0)
    x, y = transform(np.ones((1, 2, 4, 4), np.float32), np.zeros((2, 4, 4), np.int64))
    assert y.shape == (4, 4, 4) and (y == 9).sum() == 2 * 16 and (x == 0).sum() == 2 * 16


def test_elastic_warp_of_a_constant_field_is_a_shift_and_zero_field_is_identity():
    volume = np.random.default_rng(0).random((4, 5, 9))
    field = np.zeros((3, 4, 5, 9))
    assert np.array_equal(warp(volume, field, order=1), volume)
    field[2] = 2.0  # sample two voxels further along W
    assert np.allclose(warp(volume, field, order=1)[..., :7], volume[..., 2:])
    assert np.array_equal(warp(volume.round(), field, order=0)[..., :7], volume.round()[..., 2:])
    flat = elastic_field((8, 8, 8), np.random.default_rng(0), std=0.0)
    assert flat.shape == (3, 8, 8, 8) and not flat.any()


def test_elastic_deformation_keeps_label_values_and_moves_voxels():
    image, labels = _depth_coded((8, 12, 12))
    transform = VolumeTransform(flip=False, rotate=False, intensity=0.0, elastic=True, seed=3)
    moved = 0
    for _ in range(4):
        x, y = transform(image, labels, spacing=(1.0, 1.0, 1.0))
        assert set(y.unique().tolist()) <= set(np.unique(labels).tolist())
        moved += int((y.numpy() != labels).sum())
    assert moved > 0


def test_volume_folder_pairs_files_and_checks_labels(tmp_path):
    for part in ("images", "labels"):
        (tmp_path / part).mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", np.full((3, 4, 5), 200, np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "labels" / "a.tif", np.eye(5, dtype=np.uint8)[:4][None].repeat(3, 0) * 2, photometric="minisblack")
    ds = volume_folder(tmp_path)
    image, labels = ds[0]
    assert image.shape == (1, 3, 4, 5) and torch.allclose(image, torch.full_like(image, 200 / 255))
    assert ds.num_classes == 3 and labels.dtype == torch.int64
    ds = volume_folder(tmp_path, transform=VolumeTransform(crop_size=(2, 2, 2)))
    assert len(ds) == (3 * 4 * 5 + 7) // 8  # ceil(voxels / crop voxels) crops per epoch
    tifffile.imwrite(tmp_path / "labels" / "a.tif", np.zeros((3, 4, 4), np.uint8), photometric="minisblack")
    with pytest.raises(ValueError, match="has shape"):
        volume_folder(tmp_path)


@pytest.mark.skipif(not ISBI.is_dir(), reason="ISBI 2012 data not present")
def test_isbi2012_stack_is_one_volume_with_the_last_five_sections_as_val():
    from pixelwise.data import ISBI2012

    sections = ISBI2012(ISBI)
    val = open_volume_dataset(f"isbi2012:{ISBI}", "val")
    n = len(sections)
    val_image, val_labels = val[0]
    assert val_image.shape == (1, 5, 512, 512) and val_labels.shape == (5, 512, 512)
    last_image, last_labels = sections[n - 1]
    assert torch.equal(val_image[:, 4], last_image) and torch.equal(val_labels[4], last_labels)
    assert val.spacings[0] == (50.0, 4.0, 4.0)


def test_confusion_matrix_over_a_volume_sums_its_sections():
    rng = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, 6, generator=rng)
    target = torch.randint(0, 3, (2, 4, 5, 6), generator=rng)
    target[0, 1, 2] = 255
    whole = ConfusionMatrix(3)
    whole.update(logits, target)
    by_section = ConfusionMatrix(3)
    for d in range(4):
        by_section.update(logits[:, :, d], target[:, d])
    assert torch.equal(whole.matrix, by_section.matrix) and whole.matrix.sum() == 2 * 4 * 5 * 6 - 6


def test_volume_dice_and_iou_by_hand():
    # 2 x 2 x 2 volume: class 1 true at 4 voxels, predicted at 3 of them plus 1 more.
    target = torch.tensor([[[1, 1], [1, 1]], [[0, 0], [0, 0]]])
    pred = torch.tensor([[[1, 1], [1, 0]], [[1, 0], [0, 0]]])
    cm = ConfusionMatrix(2)
    cm.update(pred[None], target[None])
    per_class = cm.compute()["per_class"]
    assert per_class[1]["dice"] == pytest.approx(2 * 3 / (4 + 4)) and per_class[1]["iou"] == pytest.approx(3 / 5)
    assert per_class[0]["dice"] == pytest.approx(2 * 3 / (4 + 4)) and per_class[0]["iou"] == pytest.approx(3 / 5)


@pytest.mark.parametrize("name", ["ce", "dice", "focal", "lovasz"])
def test_losses_on_a_volume_equal_the_same_voxels_laid_out_as_an_image(name):
    from pixelwise.losses import build_loss

    rng = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, 6, generator=rng)
    target = torch.randint(0, 3, (2, 4, 5, 6), generator=rng)
    target[1, 2] = 255
    loss = build_loss(name, ignore_index=255)
    flat = loss(logits.reshape(2, 3, 20, 6), target.reshape(2, 20, 6))
    torch.testing.assert_close(loss(logits, target), flat)
