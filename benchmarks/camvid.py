"""Train a model from scratch on CamVid (no ImageNet) within a time budget; score it on a drive it never saw.

    python benchmarks/camvid.py --minutes 60                        # recipe "unet16-half-sqrtmf", drive 0006R0 held out
    python benchmarks/camvid.py --minutes 60 --holdout 0001TP       # rotate the held-out drive (0001TP: dusk)
    python benchmarks/camvid.py --minutes 60 --holdout none         # the standard split (train 367, val 101)

CamVid's standard val split (101 frames of drive 0016E5) shares its drive with 204 of the 367
train frames, and frames a second apart are near-duplicates: it measures recall of that
drive. By default (``--holdout 0006R0``) the model trains on the train frames of the other
drives (0001TP + 0016E5, 266 frames) and is scored on every frame of the held-out drive
(101 daytime frames of 0006R0), the honest yardstick; the standard val split is scored too,
so the table shows the gap. 0006R0 rather than 0001TP is held out by default because
0001TP is the only dusk drive: the model this benchmark writes should have seen dusk
(``--holdout 0001TP`` measures how a model that never did copes with it). The split is
written as a CamVid-layout folder of symbolic links (``OUT/data``: ``train/`` +
``trainannot/``, ``val/`` + ``valannot/`` = the held-out drive) that ``pixelwise eval
--data camvid:OUT/data --split val`` reads.

On 2 CPU cores a full-resolution run is out of reach in an hour, so the recipe trains on
half-size crops (scales 0.4-0.6, 176x240), channels-last, under bfloat16 autocast where the
CPU has it natively (``--bf16 auto``: AMX or AVX512-BF16; there 1.7x the samples/s of float32
on one core, with the same loss curve; elsewhere emulated, 20x slower, so float32: see
``benchmarks/README.md``), and evaluates at scale 0.5 with the probabilities resized back to
full resolution (11 classes, void ignored). The scored model is the last
checkpoint (``OUT/model_last.safetensors``): picking the best one by its score on the
held-out drive would flatter that score. Reference points (SegNet paper, test split):
SegNet-Basic 47.7 mIoU, ENet 51.3 (soft).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from pixelwise.data import eval_transform, open_dataset
from pixelwise.models import load_model
from pixelwise.report import format_metrics
from pixelwise.tasks import get_task
from pixelwise.training import TrainConfig, native_bf16, train

CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"
MEAN, STD = [0.412, 0.425, 0.433], [0.307, 0.312, 0.307]  # CamVid train split, measured
RECIPE = "unet16-half-sqrtmf"  # the defaults below: U-Net (16 base channels), half-size crops, AdamW,
# square-root median-frequency weights (the full weights took an unseen drive's road for sidewalk), channels-last, bf16 autocast where native


def sequence_holdout(root: Path, sequence: str, out: Path) -> Path:
    """A CamVid-layout folder of links: train = ``root``'s train frames of every other drive,
    val = every frame (train and val splits) of drive ``sequence`` (file-name prefix)."""
    found = sorted({p.name.split("_")[0] for split in ("train", "val") for p in (root / split).glob("*.png")})
    if sequence not in found:
        raise SystemExit(f"--holdout {sequence}: no CamVid frames start with it; the drives are {', '.join(found)}")
    for folder in ("train", "trainannot", "val", "valannot"):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for link in (out / folder).iterdir():
            link.unlink()
    for split in ("train", "val"):
        for image in sorted((root / split).glob("*.png")):
            held_out = image.name.startswith(sequence + "_")
            if split == "val" and not held_out:
                continue
            target = "val" if held_out else "train"
            os.symlink(image.resolve(), out / target / image.name)
            os.symlink((root / f"{split}annot" / image.name).resolve(), out / f"{target}annot" / image.name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=CAMVID, help="CamVid folder (SegNet layout)")
    parser.add_argument("--holdout", default="0006R0", help="drive scored as unseen data (0001TP, 0006R0, 0016E5) or 'none'")
    parser.add_argument("--model", default="unet")
    parser.add_argument("--model-args", default='{"base_channels": 16}', help="JSON dict of model options")
    parser.add_argument("--minutes", type=float, default=60.0, help="training time budget; 0: --epochs only (fair on a shared machine)")
    parser.add_argument("--epochs", type=int, default=300, help="upper bound; the budget usually ends training first")
    parser.add_argument("--crop", type=int, nargs=2, default=[176, 240])
    parser.add_argument("--scale", type=float, nargs=2, default=[0.4, 0.6], help="training scales (0.5 = half size)")
    parser.add_argument("--color-jitter", type=float, default=0.2, help="brightness/contrast/saturation jitter strength")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--loss", default="ce")
    parser.add_argument("--class-weights", default="median_frequency_sqrt",
                        help="median_frequency_sqrt, median_frequency, enet, none or a JSON list")
    parser.add_argument("--ema-decay", type=float, default=None, help="keep and score an EMA of the weights (e.g. 0.999)")
    parser.add_argument("--seed", type=int, default=0, help="weights, data order and augmentation (repeat runs to see the noise)")
    parser.add_argument("--val-every", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="NCHW training (channels-last, the default, trained U-Net 1.37x faster on an AVX-512 Xeon, "
                             "0.92x on an AVX2 EPYC: benchmarks/README.md)")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="bfloat16 autocast (fp32 weights either way); auto: on where it is native (GPU, AVX512-BF16/AMX CPU)")
    parser.add_argument("--eval-scale", type=float, default=0.5, help="test-time scale (match the training scales)")
    parser.add_argument("--recipe", default=None, help=f"name printed in the table (default: {RECIPE}, or 'custom' when options differ)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_camvid"))
    args = parser.parse_args()
    bf16 = native_bf16(torch.device("cpu")) if args.bf16 == "auto" else args.bf16 == "on"
    if not (args.root / "train").is_dir():
        raise SystemExit(f"CamVid not found at {args.root}; pass --root")
    custom = [a for a in ("model", "model_args", "crop", "scale", "color_jitter", "batch", "lr", "optimizer", "loss", "class_weights",
                                 "channels_last", "bf16", "ema_decay")
              if getattr(args, a) != parser.get_default(a)]
    recipe = args.recipe or (RECIPE if not custom else "custom: " + ", ".join(custom))

    data = f"camvid:{args.root}"
    if args.holdout != "none":
        data = f"camvid:{sequence_holdout(args.root, args.holdout, args.out / 'data')}"
    cfg = TrainConfig(
        data=data, out=str(args.out), model=args.model, model_args=json.loads(args.model_args),
        epochs=args.epochs, max_minutes=args.minutes or None, batch_size=args.batch, crop_size=list(args.crop),
        scale_range=list(args.scale), color_jitter=args.color_jitter, optimizer=args.optimizer, lr=args.lr,
        weight_decay=1e-4 if args.optimizer == "adamw" else 5e-4, loss=args.loss,
        class_weights=None if args.class_weights == "none" else
        json.loads(args.class_weights) if args.class_weights.startswith("[") else args.class_weights,
        mean=MEAN, std=STD, val_every=args.val_every, val_scales=[args.eval_scale], threads=args.threads, workers=args.workers,
        channels_last=args.channels_last, bf16=bf16, ema_decay=args.ema_decay, seed=args.seed,
    )
    started = time.monotonic()
    result = train(cfg)
    train_minutes = (time.monotonic() - started) / 60
    model, _ = load_model(args.out / "model_last.safetensors")
    semantic = get_task("semantic")
    scored = {"standard val (0016E5)": f"camvid:{args.root}"} if args.holdout == "none" else {
        f"held-out drive {args.holdout}": data, "standard val (0016E5)": f"camvid:{args.root}"}
    results = {}
    for name, spec in scored.items():
        val = open_dataset(spec, "val", transform=eval_transform(MEAN, STD))
        results[name] = (len(val), semantic.evaluate(model, val, scales=(args.eval_scale,)).metrics)
        print(f"{name}, {len(val)} frames:\n{format_metrics(results[name][1])}\n")
    params = sum(p.numel() for p in model.parameters())
    train_frames = len(open_dataset(data, "train"))
    print(f"recipe {recipe}: {args.model} {args.model_args}, {params / 1e6:.2f}M parameters, {train_frames} train frames, "
          f"{len(result['history'])} epochs in {train_minutes:.1f} min, bf16 {'on' if cfg.bf16 else 'off'}\n")
    print("| scored on | frames | global acc | class acc | mIoU |")
    print("|---|---|---|---|---|")
    for name, (frames, m) in results.items():
        print(f"| {name} | {frames} | {100 * m['pixel_accuracy']:.1f} | {100 * m['class_accuracy']:.1f} | {100 * m['mean_iou']:.1f} |")


if __name__ == "__main__":
    main()
