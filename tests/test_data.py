"""Data: image/mask reading, data sets, whole-set checks, joint transforms, synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from pixelwise.data import (
    VOC,
    CamVid,
    Cityscapes,
    FolderDataset,
    ISBI2012,
    check_dataset,
    eval_transform,
    make_synthetic_sample,
    open_dataset,
    read_classes_file,
    train_transform,
    write_synthetic_dataset,
)
from pixelwise.data.transforms import elastic_warp, grid_elastic_field
from pixelwise.io import read_image, read_mask, write_mask

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PALETTE = [(0, 0, 0), (200, 10, 10), (10, 200, 10), (10, 10, 200)]


def _palette_png(path: Path, indices: np.ndarray, palette: list[tuple[int, int, int]]) -> None:
    image = Image.fromarray(indices.astype(np.uint8))
    image.putpalette([v for c in palette for v in c] + [0] * (768 - 3 * len(palette)))
    image.save(path)


def _folder(root: Path, pairs: dict[str, tuple[np.ndarray, np.ndarray]], image_ext: str = ".png") -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for name, (image, mask) in pairs.items():
        Image.fromarray(image.squeeze()).save(root / "images" / f"{name}{image_ext}")
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{name}.png")
    return root


def _rand_pair(rng: np.random.Generator, h: int = 6, w: int = 7, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, k, (h, w)).astype(np.uint8)


# ---------------------------------------------------------------- reading files


def test_read_image_formats(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), rgb)

    rgba = np.concatenate([rgb, np.full((5, 4, 1), 7, np.uint8)], -1)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgb)

    idx = rng.integers(0, 4, (5, 4))
    _palette_png(tmp_path / "pal.png", idx, PALETTE)
    np.testing.assert_array_equal(read_image(tmp_path / "pal.png"), np.array(PALETTE, np.uint8)[idx])

    grey16 = rng.integers(0, 65536, (5, 4), dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    out = read_image(tmp_path / "g16.png")
    assert out.dtype == np.uint16 and out.shape == (5, 4, 1)
    np.testing.assert_array_equal(out[..., 0], grey16)

    rgb16 = rng.integers(0, 65536, (5, 4, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16[..., ::-1])  # Pillow would truncate this one
    np.testing.assert_array_equal(read_image(tmp_path / "rgb16.png"), rgb16)

    tifffile.imwrite(tmp_path / "t16.tif", rgb16)
    np.testing.assert_array_equal(read_image(tmp_path / "t16.tif"), rgb16)

    flat = np.full((8, 8, 3), (200, 100, 50), np.uint8)
    Image.fromarray(flat).save(tmp_path / "flat.jpg", quality=95)
    assert np.abs(read_image(tmp_path / "flat.jpg").astype(int) - flat).max() <= 3


def test_read_image_unreadable_names_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="broken.png"):
        read_image(bad)
    with pytest.raises(ValueError, match="missing.png"):
        read_image(tmp_path / "missing.png")


def test_read_mask_values_palette_and_colour(tmp_path):
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 4, (5, 6))
    idx[0, 0] = 255
    # Palette colours differ from the indices: read_mask must return indices, not colours.
    _palette_png(tmp_path / "voc.png", idx, PALETTE)
    np.testing.assert_array_equal(read_mask(tmp_path / "voc.png"), idx)

    big = rng.integers(0, 1000, (5, 6)).astype(np.uint16)
    Image.fromarray(big).save(tmp_path / "m16.png")
    out = read_mask(tmp_path / "m16.png")
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, big)

    colour = np.array(PALETTE, np.uint8)[idx % 4]
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(ValueError, match="colour.png.*single-channel"):
        read_mask(tmp_path / "colour.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "colour.png", palette=PALETTE), idx % 4)
    mapping = {c: i for i, c in enumerate(PALETTE)}
    mapping[(0, 0, 0)] = 255  # a void colour to ignore
    np.testing.assert_array_equal(
        read_mask(tmp_path / "colour.png", palette=mapping), np.where(idx % 4 == 0, 255, idx % 4)
    )
    with pytest.raises(ValueError, match=r"colour.png.*\(200, 10, 10\)"):
        read_mask(tmp_path / "colour.png", palette=[(0, 0, 0), (10, 200, 10), (10, 10, 200)])


def test_write_mask_roundtrip(tmp_path):
    labels = np.array([[0, 1, 2], [3, 255, 1]])
    write_mask(tmp_path / "p.png", labels, palette=PALETTE)
    image = Image.open(tmp_path / "p.png")
    assert image.mode == "P"
    assert image.getpalette()[:12] == [v for c in PALETTE for v in c]
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png"), labels)
    write_mask(tmp_path / "g.png", labels)
    np.testing.assert_array_equal(read_mask(tmp_path / "g.png"), labels)
    with pytest.raises(ValueError, match="0..255"):
        write_mask(tmp_path / "x.png", np.array([[256]]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "p.png"]  # no temp files left


# ---------------------------------------------------------------- FolderDataset


def test_folder_dataset_values_and_inferred_classes(tmp_path):
    rng = np.random.default_rng(2)
    pairs = {f"im{i}": _rand_pair(rng) for i in range(3)}
    pairs["im1"][1][0, 0] = 255  # ignore
    pairs["im2"][1][1, 1] = 4  # highest class id -> 5 classes
    ds = FolderDataset(_folder(tmp_path / "d", pairs))
    assert ds.num_classes == 5 and ds.ignore_index == 255 and len(ds) == 3
    assert ds.class_names == [f"class_{i}" for i in range(5)]
    assert [p.stem for p, _ in ds.files] == ["im0", "im1", "im2"]
    x, y = ds[1]
    assert x.dtype == torch.float32 and x.shape == (3, 6, 7) and y.dtype == torch.int64
    torch.testing.assert_close(x, torch.from_numpy(pairs["im1"][0]).permute(2, 0, 1).float() / 255)
    np.testing.assert_array_equal(y.numpy(), pairs["im1"][1])


def test_folder_dataset_16bit_tiff_grey_jpeg(tmp_path):
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(3)
    img16 = rng.integers(0, 65536, (4, 5), dtype=np.uint16)
    tifffile.imwrite(root / "images" / "a.tiff", img16)
    grey = rng.integers(0, 256, (4, 5), dtype=np.uint8)
    Image.fromarray(grey).save(root / "images" / "b.png")
    Image.fromarray(np.full((4, 5, 3), 128, np.uint8)).save(root / "images" / "c.JPG", quality=95)
    masks = {n: rng.integers(0, 2, (4, 5)) for n in "abc"}
    for n, m in masks.items():
        _palette_png(root / "masks" / f"{n}.png", m, PALETTE)
    ds = FolderDataset(root, num_classes=2)
    xa, ya = ds[0]
    assert xa.shape == (1, 4, 5)
    torch.testing.assert_close(xa[0], torch.from_numpy(img16.astype(np.float32) / 65535))
    xb, _ = ds[1]
    torch.testing.assert_close(xb[0], torch.from_numpy(grey.astype(np.float32) / 255))
    xc, yc = ds[2]
    assert xc.shape == (3, 4, 5) and abs(float(xc.mean()) - 128 / 255) < 0.02
    np.testing.assert_array_equal(yc.numpy(), masks["c"])


def test_classes_file_and_colour_masks(tmp_path):
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    idx = np.array([[0, 1, 2], [2, 1, 9]])  # 9 -> the ignore colour
    colours = {0: (0, 0, 0), 1: (255, 0, 0), 2: (0, 0, 255), 9: (255, 255, 255)}
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(np.array([[colours[v] for v in row] for row in idx], np.uint8)).save(root / "masks" / "a.png")
    (root / "classes.json").write_text(json.dumps({
        "classes": [{"name": "bg", "color": [0, 0, 0]}, {"name": "red", "color": [255, 0, 0]},
                    {"name": "blue", "color": [0, 0, 255]}],
        "ignore_index": 7,
        "ignore_color": [255, 255, 255],
    }))
    ds = FolderDataset(root)
    assert ds.class_names == ["bg", "red", "blue"] and ds.palette[2] == (0, 0, 255) and ds.ignore_index == 7
    np.testing.assert_array_equal(ds[0][1].numpy(), [[0, 1, 2], [2, 1, 7]])
    with pytest.raises(ValueError, match="disagree"):
        FolderDataset(root, num_classes=4)


def test_folder_dataset_unmatched_and_empty(tmp_path):
    rng = np.random.default_rng(4)
    root = _folder(tmp_path / "d", {"a": _rand_pair(rng), "b": _rand_pair(rng)})
    (root / "masks" / "b.png").rename(root / "masks" / "zzz.png")
    with pytest.raises(ValueError, match=r"b\.png.*zzz\.png"):
        FolderDataset(root)
    empty = tmp_path / "e"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    with pytest.raises(ValueError, match=f"{empty / 'images'}.*no images"):
        FolderDataset(empty)
    with pytest.raises(ValueError, match="masks folder"):
        FolderDataset(tmp_path / "d", masks="labels")


def _bad_folder(tmp_path: Path) -> Path:
    """Five pairs: good, size mismatch, out-of-range value, unreadable image, good."""
    rng = np.random.default_rng(5)
    pairs = {f"p{i}": _rand_pair(rng) for i in range(5)}
    root = _folder(tmp_path / "bad", pairs)
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(root / "masks" / "p1.png")
    out_of_range = pairs["p2"][1].copy()
    out_of_range[2, 3] = 9
    Image.fromarray(out_of_range).save(root / "masks" / "p2.png")
    (root / "images" / "p3.png").write_bytes(b"garbage")
    return root


def test_getitem_errors_name_the_file(tmp_path):
    ds = FolderDataset(_bad_folder(tmp_path), num_classes=3)
    with pytest.raises(ValueError, match=r"p1\.png.*6x7.*5x7.*nearest"):
        ds[1]
    with pytest.raises(ValueError, match=r"masks/p2\.png has values 9 outside the class ids 0\.\.2"):
        ds[2]
    with pytest.raises(ValueError, match=r"cannot read image file .*p3\.png"):
        ds[3]


def test_check_dataset_collects_every_problem(tmp_path):
    root = _bad_folder(tmp_path)
    ds = FolderDataset(root, num_classes=3)
    report = check_dataset(ds)
    assert report.num_pairs == 5 and not report.ok
    assert len(report.problems) == 3
    for problem, name in zip(report.problems, ["p1.png", "p2.png", "p3.png"]):
        assert name in problem
    good = [read_mask(root / "masks" / f"p{i}.png") for i in (0, 4)]
    expected = np.bincount(np.concatenate([m.ravel() for m in good]), minlength=3)
    assert report.class_pixels == expected.tolist() and report.ignore_pixels == 0
    assert report.sizes == {(6, 7): 2} and report.channels == {3: 2}
    text = report.format()
    assert "class_2" in text and "p3.png" in text and f"{expected[0]:,}" in text


# ---------------------------------------------------------------- VOC, Cityscapes (fake trees)


def test_voc_fake_tree(tmp_path):
    from pixelwise.data.datasets import voc_colormap

    root = tmp_path / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    masks = {"2007_000001": np.array([[0, 15], [255, 20]]), "2007_000002": np.array([[1, 1], [0, 255]])}
    for name, m in masks.items():
        Image.fromarray(np.full((2, 2, 3), 90, np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        _palette_png(root / "SegmentationClass" / f"{name}.png", m, voc_colormap(256))
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000001\n2007_000002\n")
    ds = VOC(tmp_path / "VOCdevkit", "train")
    assert ds.num_classes == 21 and ds.ignore_index == 255
    assert ds.class_names[15] == "person" and ds.palette[15] == (192, 128, 128) and ds.palette[1] == (128, 0, 0)
    np.testing.assert_array_equal(ds[0][1].numpy(), masks["2007_000001"])
    with pytest.raises(ValueError, match=r"val\.txt.*available: \['train'\]"):
        VOC(root, "val")


def test_cityscapes_fake_tree_maps_train_ids(tmp_path):
    image_dir = tmp_path / "leftImg8bit" / "val" / "lindau"
    mask_dir = tmp_path / "gtFine" / "val" / "lindau"
    image_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    label_ids = np.array([[7, 26, 0, 33], [3, 24, 21, 31]], np.uint8)
    Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(image_dir / "lindau_000000_000019_leftImg8bit.png")
    Image.fromarray(label_ids).save(mask_dir / "lindau_000000_000019_gtFine_labelIds.png")
    ds = Cityscapes(tmp_path, "val")
    assert ds.num_classes == 19 and ds.class_names[13] == "car" and ds.palette[0] == (128, 64, 128)
    np.testing.assert_array_equal(ds[0][1].numpy(), [[0, 13, 255, 18], [255, 11, 8, 16]])


# ---------------------------------------------------------------- real data (skipped when absent)


@pytest.mark.skipif(not (SHARED_DATA / "camvid").is_dir(), reason="shared CamVid data not present")
def test_camvid_real():
    ds = open_dataset(f"camvid:{SHARED_DATA / 'camvid'}", "val")
    assert isinstance(ds, CamVid) and len(ds) == 101
    assert ds.num_classes == 11 and ds.ignore_index == 11 and ds.class_names[3] == "Road"
    x, y = ds[0]
    assert x.shape == (3, 360, 480) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert y.shape == (360, 480) and int(y.min()) >= 0 and int(y.max()) <= 11
    assert len(CamVid(SHARED_DATA / "camvid", "train")) == 367


@pytest.mark.skipif(not (SHARED_DATA / "isbi2012").is_dir(), reason="shared ISBI 2012 data not present")
def test_isbi2012_real():
    ds = ISBI2012(SHARED_DATA / "isbi2012")
    assert len(ds) == 25 and ds.class_names == ["membrane", "cell"]
    x, y = ds[0]
    assert x.shape == (1, 512, 512) and y.shape == (512, 512)
    assert set(torch.unique(y).tolist()) == {0, 1}
    assert 0.6 < float(y.float().mean()) < 0.9  # about 78% cell
    raw = np.array(Image.open(ds.files[0][1]))
    np.testing.assert_array_equal(y.numpy(), (raw == 255).astype(np.int64))
    train, val = (open_dataset(f"isbi2012:{SHARED_DATA / 'isbi2012'}", s) for s in ("train", "val"))
    assert len(train) == 20 and [p.stem for p, _ in val.files] == ["20", "21", "22", "23", "24"]


# ---------------------------------------------------------------- open_dataset


def test_open_dataset_forms(tmp_path):
    with pytest.raises(ValueError, match="camvid:PATH.*isbi2012:PATH.*voc:PATH.*cityscapes:PATH"):
        open_dataset(f"kitti:{tmp_path}", "train")
    rng = np.random.default_rng(6)
    for split, n in (("train", 3), ("val", 2)):
        pairs = {f"{split}{i}": _rand_pair(rng, k=2) for i in range(n)}
        pairs[f"{split}0"][1][0, 0] = 5 if split == "val" else 1  # class 5 only in val
        _folder(tmp_path / "data" / split, pairs)
    train, val = open_dataset(tmp_path / "data", "train"), open_dataset(str(tmp_path / "data"), "val")
    assert (len(train), len(val)) == (3, 2)
    assert train.num_classes == val.num_classes == 6  # inferred over both splits
    with pytest.raises(ValueError, match="test"):
        open_dataset(tmp_path / "data", "test")
    held = open_dataset(tmp_path / "data" / "val", "val")  # a plain folder: one of its 2 pairs held out
    rest = open_dataset(tmp_path / "data" / "val", "train")
    assert (len(held), len(rest), len(open_dataset(tmp_path / "data" / "val", "all"))) == (1, 1, 2)
    assert {p for p, _ in held.files} | {p for p, _ in rest.files} == {tmp_path / "data" / "val" / "images" / f"val{i}.png" for i in (0, 1)}


@pytest.mark.parametrize(("n", "fraction", "held"), [(10, 0.2, 2), (10, 0.5, 5), (7, 0.2, 1), (3, 0.01, 1), (3, 0.99, 2)])
def test_plain_folder_holds_out_whole_files_for_validation(tmp_path, caplog, n, fraction, held):
    rng = np.random.default_rng(n)
    root = _folder(tmp_path / "d", {f"im{i}": _rand_pair(rng) for i in range(n)})
    val = open_dataset(root, "val", val_fraction=fraction)
    train = open_dataset(root, "train", val_fraction=fraction)
    val_names = [p.name for p, _ in val.files]
    assert len(val_names) == held  # round(n * fraction), at least 1, at most n - 1
    assert not set(val_names) & {p.name for p, _ in train.files}
    assert len(train) + len(val) == n and all(p.stem == m.stem for p, m in val.files + train.files)
    assert [p.name for p, _ in open_dataset(root, "val", val_fraction=fraction).files] == val_names  # deterministic
    assert train.num_classes == val.num_classes == 3
    note = caplog.records[-1].getMessage()
    assert f"{held} of its {n} pairs" in note and all(name in note for name in val_names)


def test_plain_folder_split_refuses_bad_fractions_and_single_pairs(tmp_path):
    rng = np.random.default_rng(1)
    root = _folder(tmp_path / "d", {f"im{i}": _rand_pair(rng) for i in range(3)})
    for bad in (0, 1, -0.1, "a"):
        with pytest.raises(ValueError, match="val_fraction"):
            open_dataset(root, "val", val_fraction=bad)
    with pytest.raises(ValueError, match="train, val .held out. and all"):
        open_dataset(root, "test")
    one = _folder(tmp_path / "one", {"a": _rand_pair(rng)})
    with pytest.raises(ValueError, match=f"{one} has 1 image/mask pair.*train/ and val/"):
        open_dataset(one, "train")


@pytest.mark.parametrize(("foreground", "dtype"), [(255, np.uint8), (65535, np.uint16)])
def test_binary_masks_without_classes_file_are_background_and_foreground(tmp_path, caplog, foreground, dtype):
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    masks = []
    for i in range(3):
        mask = np.zeros((6, 7), dtype)
        mask[i : i + 2, 1:4] = foreground
        masks.append(mask)
        Image.fromarray(np.full((6, 7, 3), 40 * i, np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    ds = FolderDataset(root)
    assert ds.num_classes == 2 and ds.class_names == ["background", "foreground"]
    for i in range(3):
        np.testing.assert_array_equal(ds[i][1].numpy(), (masks[i] == foreground).astype(np.int64))
    assert f"hold only 0 and {foreground}" in caplog.records[-1].getMessage()
    assert check_dataset(ds).class_pixels == [3 * 42 - 18, 18]
    if foreground == 255:  # with a classes file 255 keeps its meaning, ignore
        (root / "classes.json").write_text(json.dumps({"classes": [{"name": "bg", "color": [0, 0, 0]}]}))
        ds = FolderDataset(root)
        assert ds.num_classes == 1 and check_dataset(ds).ignore_pixels == 18


def test_16bit_masks_with_large_values_name_the_fix(tmp_path):
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(np.zeros((6, 7, 3), np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(np.array([[0, 1000, 3]] * 6, np.uint16)).save(root / "masks" / "a.png")
    with pytest.raises(ValueError, match=r"up to 1000, so the default ignore_index 255 is a class id.*classes\.json.*65535"):
        FolderDataset(root)


def test_check_dataset_lists_unreadable_and_colour_masks_without_classes(tmp_path):
    rng = np.random.default_rng(3)
    root = _folder(tmp_path / "d", {f"p{i}": _rand_pair(rng) for i in range(4)})
    (root / "masks" / "p1.png").write_bytes(b"not a png")
    Image.fromarray(rng.integers(0, 3, (6, 7, 3), dtype=np.uint8)).save(root / "masks" / "p2.png")
    report = check_dataset(FolderDataset(root))  # the classes come from the readable masks
    assert len(report.problems) == 2
    assert "p1.png" in report.problems[0] and "cannot read" in report.problems[0]
    assert "p2.png" in report.problems[1] and "colour (RGB)" in report.problems[1]


# ---------------------------------------------------------------- transforms


def _encoded_pair(rng: np.random.Generator, h: int, w: int, dtype: type = np.uint8, channels: int = 3):
    """Blocky random labels 0..4 and an image whose channels encode them: value = (label + 1) * step."""
    blocks = rng.integers(0, 5, (h // 10, w // 10)).astype(np.uint8)
    labels = cv2.resize(blocks, (w, h), interpolation=cv2.INTER_NEAREST)
    step = 40 if dtype == np.uint8 else 10000
    image = np.repeat(((labels.astype(np.int64) + 1) * step).astype(dtype)[..., None], channels, axis=2)
    return image, labels, step / (255.0 if dtype == np.uint8 else 65535.0)


def _check_joint(x: torch.Tensor, y: torch.Tensor, step: float, ignore: int, k: int = 3, margin: int = 1) -> int:
    """Where the k x k mask neighbourhood is uniform, the label decoded from the image equals the
    mask (padding, value 0, decodes to -1 where the mask is ``ignore``); returns the labelled count.

    Bilinear image resampling blends labels across about one pixel per resampling (two with
    the elastic warp after the scaling), while the mask is resampled by nearest neighbour;
    pixels within ``margin`` of the border blend with pixels cropped away (or, for the elastic
    warp, mirrored in).
    """
    y = y.numpy()
    decoded = np.rint(x[0].numpy() / step).astype(np.int64) - 1
    kernel = np.ones((k, k), np.uint8)
    uniform = cv2.erode(y.astype(np.uint16), kernel) == cv2.dilate(y.astype(np.uint16), kernel)
    uniform[:margin], uniform[-margin:], uniform[:, :margin], uniform[:, -margin:] = False, False, False, False
    expected = np.where(y == ignore, -1, y)
    np.testing.assert_array_equal(decoded[uniform], expected[uniform])
    return int((uniform & (y != ignore)).sum())


@pytest.mark.parametrize("dtype,channels,elastic", [(np.uint8, 3, False), (np.uint16, 1, False), (np.uint8, 3, True)])
def test_train_transform_moves_mask_with_image(dtype, channels, elastic):
    rng = np.random.default_rng(7)
    image, labels, step = _encoded_pair(rng, 60, 84, dtype, channels)
    t = train_transform(
        crop_size=(72, 96), scale_range=(0.5, 1.5), color_jitter=0.0, elastic=elastic, ignore_index=200, seed=0
    )
    for _ in range(12):
        x, y = t(image, labels)
        assert x.shape == (channels, 72, 96) and x.dtype == torch.float32
        assert y.shape == (72, 96) and y.dtype == torch.int64
        assert _check_joint(x, y, step, 200, *((5, 6) if elastic else (3, 1))) > 50
        assert set(np.unique(y)) <= {0, 1, 2, 3, 4, 200}
    jittered, _ = train_transform(crop_size=(72, 96), color_jitter=0.5)(image, labels)
    assert jittered.shape == (channels, 72, 96) and 0.0 <= float(jittered.min()) and float(jittered.max()) <= 1.0


def test_train_transform_pads_with_ignore_and_mean():
    rng = np.random.default_rng(8)
    image, labels, _ = _encoded_pair(rng, 20, 30)
    mean, std = [0.5, 0.25, 0.125], [0.5, 0.5, 0.5]
    t = train_transform(crop_size=(50, 60), scale_range=(1.0, 1.0), hflip=False, color_jitter=0, mean=mean, std=std)
    x, y = t(image, labels)
    # Centre padding: 15 rows above, 15 columns left; the mask is 255 outside the image.
    assert int((y == 255).sum()) == 50 * 60 - 20 * 30
    np.testing.assert_array_equal(y[15:35, 15:45].numpy(), labels)
    torch.testing.assert_close(x[:, 0, 0], torch.zeros(3))  # mean padding normalises to 0
    expected = (image[0, 0] / 255.0 - np.array(mean)) / np.array(std)
    torch.testing.assert_close(x[:, 15, 15], torch.tensor(expected, dtype=torch.float32))


def test_train_transform_without_crop_keeps_input_size():
    rng = np.random.default_rng(11)
    image, labels, step = _encoded_pair(rng, 40, 50)
    t = train_transform(crop_size=None, scale_range=(0.5, 2.0), color_jitter=0, seed=1)
    scaled_down = 0
    for _ in range(6):
        x, y = t(image, labels)
        assert x.shape == (3, 40, 50) and y.shape == (40, 50)  # equal sizes stack into batches
        _check_joint(x, y, step, 255)
        scaled_down += int((y == 255).any())
    assert scaled_down > 0  # some draws shrank the image and padded it back


def test_train_transform_takes_dataset_ignore_index(tmp_path):
    rng = np.random.default_rng(9)
    root = _folder(tmp_path / "d", {"a": _rand_pair(rng, 8, 8)})
    ds = FolderDataset(root, num_classes=3, ignore_index=11,
                       transform=train_transform(crop_size=(16, 16), scale_range=None, color_jitter=0))
    _, y = ds[0]
    assert int((y == 11).sum()) == 16 * 16 - 64 and int((y == 255).sum()) == 0


def test_eval_transform_normalises():
    image = np.array([[[255, 0, 51]]], np.uint8)
    x, y = eval_transform(mean=[0.5, 0.5, 0.5], std=[0.5, 0.25, 0.1])(image, np.array([[3]]))
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, -2.0, -3.0]))
    assert y.dtype == torch.int64 and y.item() == 3
    with pytest.raises(ValueError, match="mean has 3 values but the image has 1 channel"):
        eval_transform(mean=[0.5, 0.5, 0.5])(image[..., :1], np.array([[0]]))


def test_dataloader_workers_draw_different_augmentations(tmp_path):
    rng = np.random.default_rng(10)
    pair = _rand_pair(rng, 32, 32)
    root = _folder(tmp_path / "d", {f"s{i}": pair for i in range(2)})
    ds = FolderDataset(root, num_classes=3, transform=train_transform(crop_size=(24, 24), color_jitter=0))
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, multiprocessing_context="fork")
    (x0, _), (x1, _) = list(loader)  # sample 0 from worker 0, sample 1 from worker 1
    assert not torch.equal(x0, x1)


# ---------------------------------------------------------------- synthetic data


def test_synthetic_sample_has_every_class():
    for k in (2, 4, 8):
        image, mask = make_synthetic_sample(np.random.default_rng(k), (64, 80), k)
        assert image.shape == (64, 80, 3) and image.dtype == np.uint8 and mask.dtype == np.uint8
        counts = np.bincount(mask.ravel(), minlength=k)
        assert len(counts) == k and (counts[1:] >= 0.01 * 64 * 80).all() and counts[0] > 0
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_sample(np.random.default_rng(0), num_classes=9)


def test_synthetic_dataset_is_deterministic(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", n_train=3, n_val=2, size=(48, 64), seed=1)
    b = write_synthetic_dataset(tmp_path / "b", n_train=3, n_val=2, size=(48, 64), seed=1)
    c = write_synthetic_dataset(tmp_path / "c", n_train=3, n_val=2, size=(48, 64), seed=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 10
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)
    info = read_classes_file(a / "classes.json")
    assert info.names == ["background", "ellipse", "rectangle", "triangle"]
    train = open_dataset(a, "train")
    assert train.class_names == info.names and train.palette == info.palette
    assert check_dataset(train).class_pixels[3] > 0
    with pytest.raises(ValueError, match="not empty"):
        write_synthetic_dataset(a, n_train=1, n_val=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temp folders left


def test_binary_looking_masks_with_an_explicit_ignore_index_keep_it(tmp_path):
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(np.zeros((6, 7, 3), np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(np.array([[0, 255, 0, 0, 0, 0, 0]] * 6, np.uint8)).save(root / "masks" / "a.png")
    ds = FolderDataset(root, ignore_index=255)  # 255 said to be ignore: one class, 0
    assert ds.num_classes == 1 and ds.binary_foreground is None
    assert check_dataset(ds).ignore_pixels == 6


def test_grid_elastic_field_has_the_papers_10_px_vectors_at_the_3x3_nodes():
    # U-Net Sec. 3.1: "random displacement vectors on a coarse 3 by 3 grid ... sampled from a
    # Gaussian distribution with 10 pixels standard deviation ... bicubic interpolation".
    rng = np.random.default_rng(0)
    nodes = []
    for _ in range(300):
        nodes.append(grid_elastic_field(33, 33, rng)[:, ::16, ::16])  # nodes at pixels 0, 16, 32
    nodes = np.stack(nodes)
    # 300 draws x 18 node components: the std estimate has standard error 10 / sqrt(2 * 5400) = 0.1.
    assert abs(nodes.std() - 10.0) < 0.5 and abs(nodes.mean()) < 0.5
    # The field is the interpolant of the drawn vectors: same seed, same coarse draws.
    coarse = np.random.default_rng(1).normal(0.0, 10.0, size=(2, 3, 3))
    np.testing.assert_allclose(grid_elastic_field(257, 129, np.random.default_rng(1))[:, ::128, ::64], coarse, atol=1e-4)
    # Smooth: neighbouring pixels move almost together (vectors 128 px apart differ by ~14 px).
    field = grid_elastic_field(257, 257, np.random.default_rng(2))
    assert np.abs(np.diff(field, axis=1)).max() < 1.0 and np.abs(np.diff(field, axis=2)).max() < 1.0


def test_grid_elastic_transform_moves_mask_with_image():
    # The paper's 10 px vectors on a 3 x 3 grid over a 192 x 256 crop (its tiles are 572 px).
    rng = np.random.default_rng(9)
    image, labels, step = _encoded_pair(rng, 200, 260, np.uint8, 1)
    t = train_transform(crop_size=(192, 256), scale_range=None, color_jitter=0.0, elastic="grid", seed=0)
    for _ in range(4):
        x, y = t(image, labels)
        assert x.shape == (1, 192, 256) and y.shape == (192, 256)
        assert _check_joint(x, y, step, 255, 5, 6) > 10_000


def test_elastic_warp_samples_image_and_mask_at_the_displaced_positions():
    rng = np.random.default_rng(3)
    image = rng.random((20, 24, 2)).astype(np.float32)
    mask = rng.integers(0, 5, (20, 24)).astype(np.uint16)
    field = np.zeros((2, 20, 24), np.float32)
    field[0], field[1] = 3.0, -2.0  # read from 3 rows down, 2 columns left
    warped, warped_mask = elastic_warp(image, mask, field)
    np.testing.assert_allclose(warped[:17, 2:], image[3:, :-2], atol=1e-6)
    np.testing.assert_array_equal(warped_mask[:17, 2:], mask[3:, :-2])
    field[0] = 0.5  # half a row: bilinear image, nearest mask
    warped, _ = elastic_warp(image, mask, field)
    np.testing.assert_allclose(warped[:19, 2:], (image[:19, :-2] + image[1:, :-2]) / 2, atol=1e-5)
    with pytest.raises(ValueError, match="elastic='paper'"):
        train_transform(elastic="paper")
