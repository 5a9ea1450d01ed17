"""ISBI 2012 with the challenge's measures: which parts of the U-Net recipe pay on CPU?

    python benchmarks/isbi2012.py --minutes 15                  # four rows, 15 min of training each
    python benchmarks/isbi2012.py --rows original+wmap --minutes 60 --base-channels 64

Trains on the first 20 slices of ``../shared/data/isbi2012`` (the ``train`` split) within a
time budget per row, with the paper's augmentation (its elastic deformation: a 3 x 3 grid of
10-px displacements, bicubic; flips, scales), and evaluates the last checkpoint (not the one
that scored best on these slices) on the last five slices (``val``) with overlap-tile prediction (mirror padding;
572-tiles placing 388-outputs for the valid ``unet_original``). Rows compare the paper's
valid U-Net with the padded U-Net (batch norm), each with and without the boundary weight
map (w0 = 10, sigma = 5 px). Columns: Rand error (1 - adapted Rand F-score of the cell
segments), variation of information (bits), pixel error, mIoU, training minutes, epochs.
Every row trains channels-last (``--no-channels-last`` for NCHW), under bfloat16 autocast
where the CPU has it natively (``--bf16 auto|on|off``), as ``benchmarks/camvid.py`` does.
The U-Net paper reports Rand error 0.0382 and pixel error 0.0611 on the challenge's test
stack (a 64-channel network trained for hours on a GPU).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from pixelwise.models import load_model
from pixelwise.tasks import get_task
from pixelwise.training import TrainConfig, native_bf16, train

ISBI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isbi2012"
ROWS = {  # name: (model, weight map)
    "original+wmap": ("unet_original", True),
    "original": ("unet_original", False),
    "padded+wmap": ("unet", True),
    "padded": ("unet", False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ISBI, help="ISBI 2012 folder (images/, labels/)")
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS))
    parser.add_argument("--minutes", type=float, default=15.0, help="training time budget per row")
    parser.add_argument("--epochs", type=int, default=1000, help="upper bound; the budget usually ends training first")
    parser.add_argument("--base-channels", type=int, default=16, help="64 is the paper's width")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="NCHW training")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="bfloat16 autocast (fp32 weights either way); auto: on where it is native (GPU, AVX512-BF16/AMX CPU)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_isbi2012"))
    args = parser.parse_args()
    bf16 = native_bf16(torch.device("cpu")) if args.bf16 == "auto" else args.bf16 == "on"
    if not (args.root / "images").is_dir():
        raise SystemExit(f"ISBI 2012 not found at {args.root}; pass --root")

    print("| row | model | weight map | train min | epochs | Rand error | VI | pixel error | mIoU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in args.rows:
        model, weight_map = ROWS[row]
        cfg = TrainConfig(
            data=f"isbi2012:{args.root}", out=str(args.out / row), model=model,
            model_args={"base_channels": args.base_channels}, epochs=args.epochs, max_minutes=args.minutes,
            batch_size=args.batch, crop_size=[args.crop, args.crop], scale_range=[0.8, 1.2], elastic="grid",
            optimizer="adamw", lr=args.lr, unet_weight_map=weight_map, val_every=5, threads=args.threads,
            channels_last=args.channels_last, bf16=bf16,
        )
        started = time.monotonic()
        result = train(cfg, progress=False)
        minutes = (time.monotonic() - started) / 60
        net, extra = load_model(args.out / row / "model_last.safetensors")
        task = get_task("semantic")
        val = task.open_eval(cfg.data, "val", extra)
        m = task.evaluate(net, val, tile=572 if model == "unet_original" else 512).metrics
        print(
            f"| {row} | {model} | {'yes' if weight_map else 'no'} | {minutes:.1f} | {len(result['history'])} "
            f"| {m['rand_error']:.4f} | {m['variation_of_information']:.3f} | {m['pixel_error']:.4f} "
            f"| {100 * m['mean_iou']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
