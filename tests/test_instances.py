"""Instance data (folders, COCO JSON, connected components, ISBI cells, synthetic shapes) and COCO AP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from pixelwise.data.instances import (
    CocoInstances,
    InstanceFolder,
    ISBI2012Instances,
    InstanceTransform,
    SyntheticInstances,
    instances_to_target,
    open_instances,
    paint_instances,
    semantic_to_instances,
    write_coco_json,
    write_instance_sample,
    write_synthetic_instances,
)
from pixelwise.data.synthetic import make_synthetic_instances
from pixelwise.metrics import coco_instance_metrics

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_instances_to_target_hand_boxes() -> None:
    ids = np.zeros((6, 8), np.uint16)
    ids[1:3, 2:5] = 4  # rows 1-2, cols 2-4 -> box (2, 1, 5, 3)
    ids[5, 7] = 9  # one pixel at the corner -> (7, 5, 8, 6)
    t = instances_to_target(ids, {4: 2, 9: 1})
    assert t["boxes"].tolist() == [[2, 1, 5, 3], [7, 5, 8, 6]]
    assert t["labels"].tolist() == [2, 1]
    assert t["masks"].shape == (2, 6, 8) and t["masks"].sum((1, 2)).tolist() == [6, 1]
    assert instances_to_target(ids)["labels"].tolist() == [1, 1]
    with pytest.raises(ValueError, match="no class"):
        instances_to_target(ids, {4: 2})
    assert instances_to_target(np.zeros((3, 3)))["masks"].shape == (0, 3, 3)


def test_semantic_to_instances_by_connected_components() -> None:
    mask = np.array([
        [1, 1, 0, 0, 2],
        [0, 0, 1, 0, 2],
        [1, 0, 0, 0, 0],
        [255, 255, 0, 1, 1],
    ])
    ids4, classes4 = semantic_to_instances(mask, connectivity=1)
    # 4-neighbours: class 1 has {(0,0),(0,1)}, {(1,2)}, {(2,0)}, {(3,3),(3,4)}; class 2 one column
    assert sorted(classes4.values()) == [1, 1, 1, 1, 2]
    ids8, classes8 = semantic_to_instances(mask, connectivity=2)
    # 8-neighbours join (0,1) and (1,2)
    assert sorted(classes8.values()) == [1, 1, 1, 2]
    assert ids8[0, 1] == ids8[1, 2] and ids4[0, 1] != ids4[1, 2]
    assert (ids4[mask == 255] == 0).all() and (ids4[mask == 0] == 0).all()
    ids, classes = semantic_to_instances(mask, min_area=2)
    assert sorted(classes.values()) == [1, 1, 2]


def test_instance_folder_round_trip_and_bad_classes(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    ids = np.zeros((10, 12), np.uint16)
    ids[2:5, 3:9] = 300  # 16-bit ids survive
    ids[6:9, 1:3] = 2
    write_instance_sample(tmp_path, "a", image, ids, {300: 1, 2: 1})
    ds = InstanceFolder(tmp_path)
    x, t = ds[0]
    assert x.shape == (3, 10, 12) and torch.allclose(x, torch.from_numpy(image).permute(2, 0, 1) / 255.0)
    assert t["boxes"].tolist() == [[1, 6, 3, 9], [3, 2, 9, 5]]
    write_instance_sample(tmp_path, "b", image, ids, {300: 1, 2: 5})
    with pytest.raises(ValueError, match="outside 1..1"):
        ds = InstanceFolder(tmp_path)
        ds[1]


def test_horizontal_flip_moves_boxes_with_masks() -> None:
    ids = np.zeros((4, 10), np.uint8)
    ids[1:3, 1:4] = 1
    target = instances_to_target(ids)
    torch.manual_seed(0)
    flips = [InstanceTransform(hflip=True)(np.zeros((4, 10, 1), np.uint8), target)[1] for _ in range(20)]
    flipped = [f for f in flips if f["boxes"][0, 0] != 1]
    assert flipped and len(flipped) < 20
    assert flipped[0]["boxes"].tolist() == [[6, 1, 9, 3]]  # 10 - 4, 10 - 1
    assert instances_to_target(flipped[0]["masks"][0].numpy())["boxes"].tolist() == [[6, 1, 9, 3]]


def test_coco_json_round_trip_rle(tmp_path: Path) -> None:
    ds = SyntheticInstances(3, size=(40, 48), num_classes=4, seed=1)
    (tmp_path / "images").mkdir()
    names = []
    for i in range(3):
        from PIL import Image

        Image.fromarray(ds.read(i)[0]).save(tmp_path / "images" / f"{i}.png")
        names.append(f"{i}.png")
    write_coco_json(tmp_path / "val.json", ds, names)
    coco = open_instances(f"coco:{tmp_path}", "val")
    assert isinstance(coco, CocoInstances) and coco.class_names == ds.class_names
    for i in range(3):
        (image_a, a), (image_b, b) = ds.read(i), coco.read(i)
        assert np.array_equal(image_a, image_b)
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["masks"], b["masks"]) and torch.equal(a["boxes"], b["boxes"])


def test_coco_polygons_and_crowd(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "images" / "x.png")
    polygon = [4.0, 3.0, 16.0, 3.0, 16.0, 11.0, 4.0, 11.0]  # a 12 x 8 rectangle
    data = {
        "images": [{"id": 7, "file_name": "x.png", "height": 20, "width": 30}],
        "categories": [{"id": 3, "name": "a"}, {"id": 11, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 11, "iscrowd": 0, "bbox": [4, 3, 12, 8], "area": 96, "segmentation": [polygon]},
            {"id": 2, "image_id": 7, "category_id": 3, "iscrowd": 1, "bbox": [0, 0, 2, 2], "area": 4,
             "segmentation": {"size": [20, 30], "counts": [0, 2, 18, 2, 578]}},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    ds = CocoInstances(tmp_path / "ann.json", tmp_path / "images")
    _, t = ds.read(0)
    assert ds.class_names == ["background", "a", "b"]
    assert t["labels"].tolist() == [2]  # category 11 -> label 2; the crowd region is left out
    rows, cols = np.where(t["masks"][0].numpy())
    # rasterised inside the polygon (edges may go either way by one pixel)
    assert 3 <= rows.min() <= rows.max() <= 11 and 4 <= cols.min() <= cols.max() <= 16
    assert abs(int(t["masks"].sum()) - 96) <= 20  # 12 x 8, give or take one edge row/column


def square_target(x: int, y: int, side: int, label: int = 1, size: int = 40) -> dict[str, torch.Tensor]:
    m = torch.zeros(1, size, size, dtype=torch.uint8)
    m[0, y : y + side, x : x + side] = 1
    return {"boxes": torch.tensor([[x, y, x + side, y + side]], dtype=torch.float32), "labels": torch.tensor([label]), "masks": m}


def as_prediction(t: dict[str, torch.Tensor], score: float = 0.9) -> dict[str, torch.Tensor]:
    return {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.full((len(t["labels"]),), score), "masks": t["masks"][:, None].float()}


def test_coco_ap_perfect_shifted_and_wrong_class() -> None:
    targets = [square_target(5, 5, 10), square_target(20, 10, 10)]
    perfect = coco_instance_metrics([as_prediction(t) for t in targets], targets, num_classes=2)
    assert perfect["box_ap"] == pytest.approx(1.0) and perfect["mask_ap"] == pytest.approx(1.0)
    # shifted 2 px: IoU = 80 / 120 = 0.667 -> passes thresholds 0.50, 0.55, 0.60, 0.65 of ten
    shifted = coco_instance_metrics([as_prediction(square_target(7, 5, 10)), as_prediction(square_target(22, 10, 10))], targets, 2)
    for kind in ("box", "mask"):
        assert shifted[f"{kind}_ap50"] == pytest.approx(1.0)
        assert shifted[f"{kind}_ap75"] == pytest.approx(0.0)
        assert shifted[f"{kind}_ap"] == pytest.approx(0.4)
    wrong = coco_instance_metrics([as_prediction(square_target(5, 5, 10, label=2)), as_prediction(targets[1], 0.3)], targets, 3)
    # class 1: one of two found at precision 1 -> COCO's 101 recall points 0, 0.01, ..., 0.5 have
    # precision 1, the rest 0: 51 / 101; class 2 has no ground truth and is left out of the mean
    assert wrong["mask_ap50"] == pytest.approx(51 / 101)
    assert wrong["instances_true"] == [1, 1] and wrong["instances_found"] == [1, 0] and wrong["count_mae"] == 0.5
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0), "masks": torch.zeros(0, 1, 40, 40)}
    none = coco_instance_metrics([empty, empty], targets, 2)
    assert none["mask_ap"] == 0.0 and none["instances_found"] == [0, 0]
    no_gt = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 40, 40, dtype=torch.uint8)}
    assert math.isnan(coco_instance_metrics([empty], [no_gt], 2)["box_ap"])


def test_paint_instances_higher_score_wins() -> None:
    masks = torch.zeros(3, 4, 4)
    masks[0, :2] = 0.9
    masks[1, 1:3] = 0.8
    masks[2, 3, 3] = 0.2  # under the threshold
    ids = paint_instances(masks, [0.5, 0.7, 0.9])
    assert ids.tolist() == [[1] * 4, [2] * 4, [2] * 4, [0] * 4]


def test_synthetic_instances_every_object_visible(tmp_path: Path) -> None:
    image, ids, classes = make_synthetic_instances(np.random.default_rng(3), (48, 64), 4)
    assert image.shape == (48, 64, 3)
    assert set(np.unique(ids)) - {0} == set(classes)
    assert set(classes.values()) >= {1, 2, 3}  # every shape class drawn at least once
    assert min(np.bincount(ids.ravel())[1:]) >= 0.01 * 48 * 64
    root = write_synthetic_instances(tmp_path / "shapes", n_train=2, n_val=1, size=(40, 40))
    train, val = open_instances(root, "train"), open_instances(root, "val")
    assert (len(train), len(val)) == (2, 1) and train.class_names[1] == "ellipse"


@pytest.mark.skipif(not (DATA / "isbi2012").is_dir(), reason="ISBI 2012 data not present")
def test_isbi_cells_are_the_connected_components_of_the_cell_class() -> None:
    ds = ISBI2012Instances(DATA / "isbi2012", indices=[0], min_area=1)
    image, target = ds.read(0)
    cells = ds.semantic.read_pair(0)[1] == 1
    masks = target["masks"].numpy().astype(bool)
    assert (masks.sum(0) <= 1).all()  # disjoint
    assert np.array_equal(masks.any(0), cells)  # together exactly the cell pixels
    for m in masks[:: max(1, len(masks) // 20)]:  # each one 4-connected
        assert ndimage.label(m)[1] == 1
    assert len(masks) > 50


def test_draw_instances_colours_each_instance_and_keeps_background() -> None:
    from pixelwise.report import draw_instances, instance_colours

    image = np.full((6, 8, 3), 100, np.uint8)
    ids = np.zeros((6, 8), np.uint16)
    ids[1:3, 1:3] = 1
    ids[4:6, 5:8] = 2
    out = draw_instances(image, ids, alpha=0.5)
    colours = instance_colours(2)
    assert colours[0] != colours[1]
    assert (out[ids == 0] == 100).all()
    for k in (1, 2):  # (1 - alpha) * 100 + alpha * colour, rounded
        expected = np.round(0.5 * 100 + 0.5 * np.array(colours[k - 1], float)).astype(np.uint8)
        assert (out[ids == k] == expected).all()
