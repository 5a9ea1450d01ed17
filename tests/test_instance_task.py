"""The instance task end to end: train through the one loop, `pixelwise eval` AP table, `pixelwise predict` files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pixelwise.cli import app
from pixelwise.data.instances import SyntheticInstances, instances_to_target, semantic_to_instances, write_synthetic_instances
from pixelwise.metrics import coco_instance_metrics
from pixelwise.models import create_model
from pixelwise.tasks import get_task
from pixelwise.tasks.instance import detect

runner = CliRunner()
TINY = dict(backbone="resnet18", fpn_channels=16, representation_size=32, mask_channels=16, anchor_sizes=(16, 32, 64, 128, 256),
            rpn_pre_nms_top_n=(200, 100), rpn_post_nms_top_n=(100, 50), rpn_batch_size_per_image=64, box_batch_size_per_image=64,
            detections_per_image=20)
TINY_ARGS = ("{backbone: resnet18, fpn_channels: 16, representation_size: 32, mask_channels: 16, "
             "anchor_sizes: [16, 32, 64, 128, 256], rpn_pre_nms_top_n: [200, 100], rpn_post_nms_top_n: [100, 50], "
             "rpn_batch_size_per_image: 64, box_batch_size_per_image: 64, detections_per_image: 20}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("instance")
    data = write_synthetic_instances(root / "data", n_train=4, n_val=2, size=(48, 48), num_classes=3)
    run = root / "run"
    result = runner.invoke(app, ["train", f"data={data}", f"out={run}", "task=instance", "model=maskrcnn",
                                 f"model_args={TINY_ARGS}", "epochs=2", "batch_size=2", "optimizer=adamw", "lr=0.001",
                                 "threads=1"])
    assert result.exit_code == 0, result.output
    return data, run


def test_train_writes_checkpoints_history_and_report(trained) -> None:
    _, run = trained
    for name in ("model_best.safetensors", "model_last.safetensors", "checkpoint.safetensors", "metrics.json", "overlays.png"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) >= {"box_ap", "box_ap50", "box_ap75", "mask_ap", "mask_ap50", "mask_ap75", "instances_true", "instances_found"}
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("box_ap", "mask_ap"))
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and "val_mask_ap" in history[0]
    saved = json.loads((run / "model_best.json").read_text())
    assert saved["extra"]["task"] == "instance" and saved["extra"]["class_names"][0] == "background"


def test_eval_prints_the_ap_table(trained, tmp_path) -> None:
    data, run = trained
    result = runner.invoke(app, ["eval", "--model", str(run / "model_best.safetensors"), "--data", str(data), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "COCO average precision" in result.output and "AP50" in result.output
    assert json.loads((tmp_path / "metrics.json").read_text())["instances_true"] == [
        int(np.unique(np.asarray(Image.open(p))).size - 1) for p in sorted((data / "val" / "instances").glob("*.png"))
    ]


def test_predict_writes_ids_overlay_and_json(trained, tmp_path) -> None:
    data, run = trained
    image = data / "val" / "images" / "0000.png"
    result = runner.invoke(app, ["predict", str(image), "--model", str(run / "model_best.safetensors"), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    ids = np.asarray(Image.open(tmp_path / "0000_instances.png"))
    overlay = np.asarray(Image.open(tmp_path / "0000_overlay.png"))
    records = json.loads((tmp_path / "0000_instances.json").read_text())["instances"]
    assert ids.shape == (48, 48) and overlay.shape == (48, 48, 3)
    assert set(np.unique(ids)) - {0} <= {r["id"] for r in records}
    assert all(r["score"] >= 0.5 and r["class"] in ("ellipse", "rectangle") for r in records)
    bad = runner.invoke(app, ["predict", str(image), "--model", str(run / "model_best.safetensors"), "--out", str(tmp_path), "--flip"])
    assert bad.exit_code != 0


class SquareFinder(torch.nn.Module):
    """A stand-in detector: each 4-connected bright region of channel 0 is one class-1 instance, score 0.9."""

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for image in images:
            ids, classes = semantic_to_instances((image[0] > 0.5).numpy().astype(np.int64))
            masks = torch.from_numpy(np.stack([ids == k for k in classes]) if classes else np.zeros((0, *ids.shape), bool))
            out.append({**instances_to_target(ids, classes), "scores": torch.full((len(classes),), 0.9),
                        "masks": masks[:, None].float()})
        return out


def test_tiled_detection_merges_instances_cut_by_tile_borders() -> None:
    image = torch.zeros(1, 50, 70)
    image[0, 5:20, 25:45] = 1  # crosses the border of the first 32-px tile column
    image[0, 30:46, 2:12] = 1  # crosses the border between tile rows
    image[0, 40:48, 60:68] = 1  # inside one tile
    out = detect(SquareFinder(), image, tile=32, overlap=0.25)
    assert out["labels"].tolist() == [1, 1, 1]
    truth = semantic_to_instances((image[0] > 0.5).numpy().astype(np.int64))[0]
    expected = sorted(map(tuple, instances_to_target(truth)["boxes"].tolist()))
    assert sorted(map(tuple, out["boxes"].tolist())) == expected
    assert torch.equal(out["masks"].sum(0)[0], image[0])  # every pixel once: pieces joined, not doubled
    whole = detect(SquareFinder(), image)
    assert sorted(map(tuple, whole["boxes"].tolist())) == expected


def test_instance_task_refuses_a_dense_model(tmp_path) -> None:
    data = write_synthetic_instances(tmp_path / "d", n_train=1, n_val=1, size=(32, 32), num_classes=2)
    result = runner.invoke(app, ["train", f"data={data}", f"out={tmp_path / 'r'}", "task=instance", "model=unet", "epochs=1"])
    assert result.exit_code != 0 and "detection model" in str(result.exception)


def test_tiny_maskrcnn_overfits_four_images_to_mask_ap50_above_0_9() -> None:
    """Issue 13's overfitting check: a small Mask R-CNN (R18-FPN-32) learns four synthetic 64 x 64
    images to mask AP50 > 0.9 on those images within 160 AdamW steps (one-cycle schedule). One
    thread; the best of the evaluations at steps 120, 140 and 160 counts, since AP50 over 13
    objects moves by 0.08 per instance and float rounding differs between CPUs (with 120 steps an
    AVX2 EPYC ended at 0.865, a Xeon above 0.9; with 160: 1.0, 0.926, 0.926 on the EPYC)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        task = get_task("instance")
        dataset = SyntheticInstances(4, size=(64, 64), num_classes=3, seed=0)
        images, targets = task.collate([dataset[i] for i in range(4)])
        model = create_model("maskrcnn", num_classes=3, **{**TINY, "fpn_channels": 32, "representation_size": 64, "mask_channels": 32})
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4, foreach=True)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=160, pct_start=0.1)
        ap50 = []
        for step in range(1, 161):
            model.train()
            loss = sum(model(images, targets).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if step in (120, 140, 160):
                ap50.append(coco_instance_metrics([detect(model, im) for im in images], targets, 3)["mask_ap50"])
    finally:
        torch.set_num_threads(threads)
    assert max(ap50) > 0.9, ap50
