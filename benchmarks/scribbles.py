"""Training from scribbles on CamVid: full masks vs partial CE vs ScribbleSup vs regularized loss.

    python benchmarks/scribbles.py --minutes 60                      # the full-budget run
    python benchmarks/scribbles.py --minutes 2 --train-images 60 --val-images 30   # a smoke run
    python benchmarks/scribbles.py --data runs/shapes --minutes 0 --epochs 12        # any dense folder, fixed epochs

Every row trains the same model from scratch for the same time budget (``max_minutes``;
ScribbleSup's propagation between rounds counts against it), or with ``--minutes 0`` for
the same number of epochs (fairer on a shared machine), on CamVid at half resolution
(180 x 240, images and masks resized once into ``OUT/dense``) or on ``--data``,
channels-last, under bfloat16 autocast where the CPU has it natively, as in
``benchmarks/camvid.py`` (``--no-channels-last``, ``--bf16 auto|on|off``). Strokes are
simulated once from the train masks (``OUT/scribbles``,
:func:`pixelwise.data.scribbles.write_scribble_dataset`) and shared by the scribble rows.
Rows: full masks (plain cross-entropy, the loss of the scribble rows, and with
median-frequency class weights as in ``benchmarks/camvid.py``); partial CE on the strokes; ScribbleSup after each of its rounds (val
mIoU at the round's last epoch; the task's defaults: round 1 on the strokes alone and
partial CE on the strokes beside each propagated round's labels; ``--first-round appearance
--stroke-weight 0`` is the paper's form, ``--scribblesup-weights median_frequency`` weighs each
round's labels by their class frequencies, ``--min-confidence P`` leaves superpixels
propagated with a probability below P unlabelled); the regularized loss.
Columns: labelled fraction of the training pixels, propagated-label mIoU against the true
train masks (ScribbleSup rounds, measured at the start of the round, on the pixels they label), val mIoU (last epoch,
half-resolution val, 11 classes, void ignored), ratio to the better full-mask row.
Goal (issue 11; ScribbleSup on VOC: 63.1 vs 68.5 with masks, 92%): ScribbleSup >= 90% and
regularized >= 95% of the full-mask mIoU, propagated labels improving over the rounds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixelwise.data import ClassInfo, open_dataset, write_classes_file
from pixelwise.data.scribbles import check_scribbles, open_scribbles, write_scribble_dataset
from pixelwise.io import write_mask
from pixelwise.training import TrainConfig, native_bf16, train

CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"
MEAN, STD = [0.412, 0.425, 0.433], [0.307, 0.312, 0.307]  # CamVid train split, measured (benchmarks/camvid.py)


def write_half_size(root: Path, out: Path, train_images: int | None, val_images: int | None) -> Path:
    """CamVid train/val resized to half (bilinear images, nearest masks) in the folder layout."""
    if (out / "classes.json").is_file():
        return out
    for split, limit in (("train", train_images), ("val", val_images)):
        data = open_dataset(f"camvid:{root}", split)
        (out / split / "images").mkdir(parents=True, exist_ok=True)
        (out / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(len(data) if limit is None else min(limit, len(data))):
            image, mask = data.read_pair(i)
            h, w = mask.shape
            name = Path(data.files[i][0]).stem
            Image.fromarray(image).resize((w // 2, h // 2), Image.BILINEAR).save(out / split / "images" / f"{name}.png")
            small = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((w // 2, h // 2), Image.NEAREST))
            write_mask(out / split / "masks" / f"{name}.png", small, data.palette)
    write_classes_file(out / "classes.json", ClassInfo(names=data.class_names, palette=data.palette, ignore_index=data.ignore_index))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=CAMVID, help="CamVid folder (SegNet layout)")
    parser.add_argument("--model", default="unet")
    parser.add_argument("--model-args", default='{"base_channels": 16}', help="JSON dict of model options")
    parser.add_argument("--data", type=Path, default=None, help="dense folder with train/ and val/ instead of CamVid")
    parser.add_argument("--minutes", type=float, default=60.0, help="training budget of every row; 0: --epochs only")
    parser.add_argument("--epochs", type=int, default=500, help="upper bound; the budget usually ends training first")
    parser.add_argument("--crop", type=int, nargs=2, default=None, help="training crop (CamVid default: 176 240)")
    parser.add_argument("--train-images", type=int, default=None, help="first N train images (default: all 367)")
    parser.add_argument("--val-images", type=int, default=None, help="first N val images (default: all 101)")
    parser.add_argument("--density", type=float, default=0.5, help="share of each region's skeleton stroked")
    parser.add_argument("--width", type=int, default=3, help="stroke width in pixels (at half size)")
    parser.add_argument("--min-area", type=int, default=50, help="regions smaller than this get no stroke")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--superpixel-size", type=int, default=100, help="ScribbleSup: mean pixels per superpixel")
    parser.add_argument("--first-round", default="scribbles", choices=["appearance", "scribbles"],
                        help="ScribbleSup round 1: labels propagated with appearance models, or the strokes alone")
    parser.add_argument("--scribblesup-weights", default=None, choices=["median_frequency"],
                        help="ScribbleSup: class weights computed from each round's propagated labels")
    parser.add_argument("--stroke-weight", type=float, default=1.0,
                        help="ScribbleSup: weight of partial CE on the strokes beside CE on the propagated labels")
    parser.add_argument("--min-confidence", type=float, default=0.0,
                        help="ScribbleSup: leave unmarked superpixels propagated with a lower probability unlabelled")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="NCHW training")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="bfloat16 autocast (fp32 weights either way); auto: on where it is native (GPU, AVX512-BF16/AMX CPU)")
    parser.add_argument("--rows", nargs="+", default=["full", "full_mf", "partial_ce", "scribblesup", "regularized"],
                        choices=["full", "full_mf", "partial_ce", "scribblesup", "regularized"])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_scribbles"))
    args = parser.parse_args()
    bf16 = native_bf16(torch.device("cpu")) if args.bf16 == "auto" else args.bf16 == "on"
    if args.data is not None:
        dense, name, crop = args.data, str(args.data), args.crop
    elif (args.root / "train").is_dir():
        dense = write_half_size(args.root, args.out / "dense", args.train_images, args.val_images)
        name, crop = "CamVid half size", args.crop or [176, 240]
    else:
        raise SystemExit(f"CamVid not found at {args.root}; pass --root or --data")
    scribbles = args.out / "scribbles"
    if not scribbles.is_dir():
        write_scribble_dataset(dense, scribbles, density=args.density, width=args.width, min_area=args.min_area)
    check = check_scribbles(open_scribbles(scribbles, "train"))
    fraction = sum(check.class_pixels) / check.total_pixels
    print(check.format(per_image=3), "\n")

    rows = []
    for row in args.rows:
        common = dict(
            out=str(args.out / row), model=args.model, model_args=json.loads(args.model_args), epochs=args.epochs,
            max_minutes=args.minutes or None, batch_size=args.batch, optimizer="adamw", lr=args.lr, weight_decay=1e-4,
            scale_range=[0.75, 1.25], crop_size=crop, mean=MEAN, std=STD, val_every=1, threads=args.threads,
            channels_last=args.channels_last, bf16=bf16,
        )
        if row in ("full", "full_mf"):
            cfg = TrainConfig(data=str(dense), class_weights="median_frequency" if row == "full_mf" else None, **common)
        else:
            task_args = {"method": row}
            if row == "scribblesup":
                task_args.update(rounds=args.rounds, superpixel_size=args.superpixel_size, first_round=args.first_round,
                                 stroke_weight=args.stroke_weight, min_confidence=args.min_confidence)
            weights = args.scribblesup_weights if row == "scribblesup" else None
            cfg = TrainConfig(data=str(scribbles), task="scribbles", task_args=task_args, class_weights=weights, **common)
        started = time.monotonic()
        history = train(cfg, progress=False)["history"]
        minutes = (time.monotonic() - started) / 60
        last = history[-1]
        label = {"full": "full masks", "full_mf": "full masks, median-frequency weights", "partial_ce": "partial CE",
                 "regularized": "regularized loss"}.get(row, row)
        if row != "scribblesup":
            rows.append((label, 1.0 if row.startswith("full") else fraction, None, last["val_mean_iou"], len(history), minutes))
            continue
        rounds = json.loads((args.out / row / "propagation.json").read_text())
        for r, record in enumerate(rounds):
            end = rounds[r + 1]["epoch"] - 1 if r + 1 < len(rounds) else history[-1]["epoch"]
            at = next(h for h in history if h["epoch"] == end)
            strokes = "" if record["propagated"] else " (on the strokes)"
            if record.get("propagated_fraction", 1.0) < 1.0:
                strokes = f" (labels on {100 * record['propagated_fraction']:.0f}% of the pixels)"
            rows.append((f"ScribbleSup round {record['round']}{strokes}", fraction, record.get("mean_iou"), at["val_mean_iou"], end,
                         minutes if r + 1 == len(rounds) else None))

    full = max((r[3] for r in rows if r[0].startswith("full masks")), default=None)  # the better full-mask row
    budget = f"{args.minutes:g} min per row" if args.minutes else f"{args.epochs} epochs per row"
    print(f"{name}, {args.model} {args.model_args}, {budget}, "
          f"{len(open_scribbles(scribbles, 'train'))} train / {len(open_dataset(str(dense), 'val'))} val images\n")
    print("| rows | labelled fraction | propagated mIoU (train) | val mIoU | ratio to full | epochs | minutes |")
    print("|---|---|---|---|---|---|---|")
    for label, frac, prop, miou, epochs, minutes in rows:
        ratio = f"{miou / full:.2f}" if full else "—"
        print(f"| {label} | {100 * frac:.1f}% | {'—' if prop is None else f'{100 * prop:.1f}'} | {100 * miou:.1f} | {ratio} "
              f"| {epochs} | {'—' if minutes is None else f'{minutes:.1f}'} |")


if __name__ == "__main__":
    main()
