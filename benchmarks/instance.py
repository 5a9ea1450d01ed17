"""Instance segmentation: Mask R-CNN vs a U-Net + connected-components baseline, same time budget.

Data sets: ``isbi2012`` (cells = 4-connected components of the cell class; the last five
slices are validation) and ``shapes`` (synthetic shapes, one instance per shape). Both models
train through ``pixelwise.training.train`` with ``max_minutes``; the baseline's instances are
the connected components of each predicted class, scored by their mean class probability.
Prints mask AP, AP50, box AP, train minutes and seconds per validation image.
``--overfit`` instead trains a tiny Mask R-CNN on four 64 x 64 synthetic images and prints
their mask AP50 every 25 steps (tests/test_instance_task.py runs a 120-step version).

    python benchmarks/instance.py --minutes 10 --datasets shapes isbi2012
    python benchmarks/instance.py --overfit
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pixelwise.data.instances import (
    open_instances,
    semantic_to_instances,
    write_synthetic_instances,
)
from pixelwise.inference import predict
from pixelwise.io import write_mask
from pixelwise.metrics import coco_instance_metrics
from pixelwise.models import load_model
from pixelwise.tasks import get_task
from pixelwise.training import TrainConfig, train

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MASKRCNN_ARGS = {"backbone": "resnet18", "fpn_channels": 64, "representation_size": 256, "mask_channels": 64,
                 "anchor_sizes": [16, 32, 64, 128, 256], "rpn_batch_size_per_image": 128, "box_batch_size_per_image": 128}


def semantic_copy(instance_root: Path, out: Path, split: str) -> None:
    """Write the instance folder's split as an images/ + masks/ semantic folder: each instance's
    pixels take its class, except a one-pixel background border where two instances touch (as
    in the U-Net paper's cell data), so that connected components can split them again."""
    dataset = open_instances(instance_root, split)
    for i, (image_path, _) in enumerate(dataset.files):
        image, target = dataset.read(i)
        mask = np.zeros(image.shape[:2], np.uint8)
        ids = np.zeros(image.shape[:2], np.int32)
        for k, (label, m) in enumerate(zip(target["labels"].tolist(), target["masks"].numpy()), start=1):
            mask[m > 0], ids[m > 0] = label, k
        touching = np.zeros_like(mask, dtype=bool)  # the lower/right pixel of each pair of different instances
        touching[1:] |= (ids[1:] != ids[:-1]) & (ids[1:] > 0) & (ids[:-1] > 0)
        touching[:, 1:] |= (ids[:, 1:] != ids[:, :-1]) & (ids[:, 1:] > 0) & (ids[:, :-1] > 0)
        mask[touching] = 0
        (out / split / "images").mkdir(parents=True, exist_ok=True)
        (out / split / "images" / image_path.name).write_bytes(image_path.read_bytes())
        write_mask(out / split / "masks" / f"{image_path.stem}.png", mask, dataset.palette)


def baseline_predictions(model: torch.nn.Module, dataset, num_classes: int) -> list[dict[str, torch.Tensor]]:
    """U-Net + connected components: one instance per component of each predicted class."""
    out = []
    model.eval()
    for i in range(len(dataset)):
        image, _ = dataset[i]
        probs = predict(model, image[None])[0]
        labels = probs.argmax(0).numpy()
        ids, classes = semantic_to_instances(labels, min_area=10)
        masks = torch.from_numpy(np.stack([ids == k for k in classes])) if classes else torch.zeros(0, *labels.shape, dtype=torch.bool)
        lab = torch.tensor(list(classes.values()), dtype=torch.int64)
        scores = torch.stack([probs[c][m].mean() for c, m in zip(lab, masks)]) if len(lab) else torch.zeros(0)
        boxes = []
        for m in masks.numpy():
            rows, cols = np.where(m.any(1))[0], np.where(m.any(0))[0]
            boxes.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
        out.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": lab, "scores": scores,
                    "masks": masks[:, None].float()})
    return out


def run(name: str, instance_data: str, semantic_data: str, minutes: float, out: Path, detections: int) -> list[tuple]:
    rows = []
    common = {"max_minutes": minutes, "epochs": 1000, "optimizer": "adamw", "val_every": 1000, "threads": torch.get_num_threads()}
    start = time.monotonic()
    train(TrainConfig(data=instance_data, out=str(out / f"{name}_maskrcnn"), task="instance", model="maskrcnn", batch_size=2, lr=1e-3,
                      model_args={**MASKRCNN_ARGS, "detections_per_image": detections}, **common), progress=False)
    train_minutes = (time.monotonic() - start) / 60
    model, extra = load_model(out / f"{name}_maskrcnn" / "model_last.safetensors")
    task = get_task("instance")
    val = task.open_eval(instance_data, "val", extra)
    start = time.monotonic()
    metrics = task.evaluate(model, val).metrics
    rows.append((name, "Mask R-CNN (R18-FPN-64)", metrics, train_minutes, (time.monotonic() - start) / len(val)))

    start = time.monotonic()
    train(TrainConfig(data=semantic_data, out=str(out / f"{name}_unet"), model="unet", model_args={"base_channels": 16}, batch_size=4, lr=3e-3,
                      unet_weight_map=True, **common), progress=False)
    train_minutes = (time.monotonic() - start) / 60
    model, _ = load_model(out / f"{name}_unet" / "model_last.safetensors")
    start = time.monotonic()
    predictions = baseline_predictions(model, val, val.num_classes)
    seconds = (time.monotonic() - start) / len(val)
    metrics = coco_instance_metrics(predictions, [val[i][1] for i in range(len(val))], val.num_classes)
    rows.append((name, "U-Net (16, weight map) + components", metrics, train_minutes, seconds))
    return rows


def overfit(steps: int = 150) -> None:
    """Tiny Mask R-CNN (R18-FPN-32) on four 64 x 64 synthetic images, evaluated on the same images."""
    from pixelwise.data.instances import SyntheticInstances, collate_instances
    from pixelwise.models import create_model
    from pixelwise.tasks.instance import detect

    torch.manual_seed(0)
    dataset = SyntheticInstances(4, size=(64, 64), num_classes=3, seed=0)
    images, targets = collate_instances([dataset[i] for i in range(4)])
    model = create_model("maskrcnn", num_classes=3, backbone="resnet18", fpn_channels=32, representation_size=64, mask_channels=32,
                         anchor_sizes=(16, 32, 64, 128, 256), rpn_pre_nms_top_n=(200, 100), rpn_post_nms_top_n=(100, 50),
                         rpn_batch_size_per_image=64, box_batch_size_per_image=64, detections_per_image=20)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4, foreach=True)
    start = time.monotonic()
    print(f"{'step':>4} {'seconds':>7} {'loss':>6} {'mask AP50':>9} {'mask AP':>7} found/true")
    for step in range(1, steps + 1):
        model.train()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 0:
            m = coco_instance_metrics([detect(model, im) for im in images], targets, 3)
            print(f"{step:>4} {time.monotonic() - start:7.1f} {loss.item():6.3f} {100 * m['mask_ap50']:9.1f} {100 * m['mask_ap']:7.1f} "
                  f"{m['instances_found']}/{m['instances_true']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per model")
    parser.add_argument("--datasets", nargs="+", default=["shapes", "isbi2012"], choices=["shapes", "isbi2012"])
    parser.add_argument("--shapes", type=int, default=200, help="synthetic training images (96 x 128)")
    parser.add_argument("--overfit", action="store_true", help="only the four-image overfitting check")
    args = parser.parse_args()
    if args.overfit:
        overfit()
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "shapes" in args.datasets:
            root = write_synthetic_instances(tmp / "shapes", n_train=args.shapes, n_val=40, size=(96, 128), num_classes=4)
            for split in ("train", "val"):
                semantic_copy(root, tmp / "shapes_semantic", split)
            rows += run("shapes", str(root), str(tmp / "shapes_semantic"), args.minutes, tmp, detections=20)
        if "isbi2012" in args.datasets:
            if not (DATA / "isbi2012").is_dir():
                print(f"skipping isbi2012: {DATA / 'isbi2012'} not found")
            else:
                spec = f"isbi2012:{DATA / 'isbi2012'}"
                rows += run("isbi2012", spec, spec, args.minutes, tmp, detections=400)
    print(f"\n{'data':<9} {'model':<34} {'mask AP':>7} {'AP50':>6} {'box AP':>6} {'found/true':>11} {'train min':>9} {'s/image':>7}")
    for name, model, m, minutes, seconds in rows:
        print(f"{name:<9} {model:<34} {100 * m['mask_ap']:7.1f} {100 * m['mask_ap50']:6.1f} {100 * m['box_ap']:6.1f} "
              f"{sum(m['instances_found']):>5}/{sum(m['instances_true']):<5} {minutes:9.1f} {seconds:7.2f}")


if __name__ == "__main__":
    main()
