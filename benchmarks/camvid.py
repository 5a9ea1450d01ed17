"""Train a model from scratch on CamVid train (no ImageNet) within a time budget; evaluate on val.

    python benchmarks/camvid.py --model unet --model-args '{"base_channels": 16}' --minutes 60

On 2 CPU cores a full-resolution run is out of reach in an hour, so by default the model
trains on half-size crops (scales 0.4-0.6, 176x240) and is evaluated at scale 0.5 with the
probabilities resized back to full resolution. Prints one table: global (pixel) accuracy, class-average accuracy and mIoU on the 101 val
images at full resolution (11 classes, void ignored), with the wall time. Reference points
(SegNet paper, test split): SegNet-Basic 47.7 mIoU, ENet 51.3 (soft).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pixelwise.data import eval_transform, open_dataset
from pixelwise.models import load_model
from pixelwise.report import format_metrics
from pixelwise.tasks import get_task
from pixelwise.training import TrainConfig, train

CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"
MEAN, STD = [0.412, 0.425, 0.433], [0.307, 0.312, 0.307]  # CamVid train split, measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=CAMVID, help="CamVid folder (SegNet layout)")
    parser.add_argument("--model", default="unet")
    parser.add_argument("--model-args", default='{"base_channels": 16}', help="JSON dict of model options")
    parser.add_argument("--minutes", type=float, default=60.0, help="training time budget")
    parser.add_argument("--epochs", type=int, default=300, help="upper bound; the budget usually ends training first")
    parser.add_argument("--crop", type=int, nargs=2, default=[176, 240])
    parser.add_argument("--scale", type=float, nargs=2, default=[0.4, 0.6], help="training scales (0.5 = half size)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--loss", default="ce")
    parser.add_argument("--class-weights", default="median_frequency")
    parser.add_argument("--val-every", type=int, default=5)
    parser.add_argument("--eval-scale", type=float, default=0.5, help="test-time scale (match the training scales)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_camvid"))
    args = parser.parse_args()
    if not (args.root / "train").is_dir():
        raise SystemExit(f"CamVid not found at {args.root}; pass --root")

    cfg = TrainConfig(
        data=f"camvid:{args.root}", out=str(args.out), model=args.model, model_args=json.loads(args.model_args),
        epochs=args.epochs, max_minutes=args.minutes, batch_size=args.batch, crop_size=list(args.crop),
        scale_range=list(args.scale), optimizer=args.optimizer, lr=args.lr, weight_decay=1e-4 if args.optimizer == "adamw" else 5e-4,
        loss=args.loss, class_weights=None if args.class_weights == "none" else args.class_weights,
        mean=MEAN, std=STD, val_every=args.val_every, val_scales=[args.eval_scale],
    )
    started = time.monotonic()
    result = train(cfg)
    train_minutes = (time.monotonic() - started) / 60
    model, _ = load_model(args.out / "model_best.safetensors")
    val = open_dataset(cfg.data, "val", transform=eval_transform(MEAN, STD))
    metrics = get_task("semantic").evaluate(model, val, scales=(args.eval_scale,)).metrics
    params = sum(p.numel() for p in model.parameters())
    print(format_metrics(metrics))
    print()
    print("| model | options | params | epochs | train min | global acc | class acc | mIoU |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.model} | {args.model_args} | {params / 1e6:.2f}M | {len(result['history'])} | {train_minutes:.1f} "
        f"| {100 * metrics['pixel_accuracy']:.1f} | {100 * metrics['class_accuracy']:.1f} | {100 * metrics['mean_iou']:.1f} |"
    )


if __name__ == "__main__":
    main()
