"""3D U-Net vs 2D U-Net slice by slice on the ISBI 2012 stack, same training time budget.

    python benchmarks/volume.py --minutes 10

The 30-section EM stack is read as one volume (50 x 4 x 4 nm voxels); both models train on
the first 25 sections and are scored on the last 5 (the same 1.3M voxels, membrane vs cell)
with one confusion matrix: Dice and IoU per class and their means. The 3D U-Net
(Çiçek et al. 2016, padded form) pools 1x2x2 because sections are 12.5 times thicker than
pixels; the 2D U-Net sees one section at a time. Each model trains in its own process so
that its peak RSS is its own. Prints one table: Dice/IoU, training minutes, seconds to
predict the 5-section validation volume, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ISBI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isbi2012"


def run_one(kind: str, args: argparse.Namespace) -> dict:
    """Train and score one model in this process; returns the row of the table."""
    import torch

    from pixelwise.models import load_model
    from pixelwise.tasks import get_task
    from pixelwise.training import TrainConfig, train

    common = dict(data=f"isbi2012:{args.root}", epochs=args.epochs, max_minutes=args.minutes, optimizer="adamw",
                  lr=args.lr, weight_decay=1e-4, color_jitter=0.1, val_every=1000, hflip=True)
    if kind == "3d":
        cfg = TrainConfig(out=str(args.out / "unet3d"), task="volume", model="unet3d", crop_size=list(args.crop3d),
                          model_args={"base_channels": args.base3d, "anisotropic": True}, batch_size=args.batch3d, **common)
    else:
        cfg = TrainConfig(out=str(args.out / "unet2d"), task="semantic", model="unet", crop_size=list(args.crop2d),
                          scale_range=[1.0, 1.0], model_args={"base_channels": args.base2d, "depth": 4},
                          batch_size=args.batch2d, **common)
    started = time.monotonic()
    train(cfg, progress=False)
    train_minutes = (time.monotonic() - started) / 60
    # The weights at the end of the budget (validation during training is off: val_every is large).
    model, extra = load_model(Path(cfg.out) / "model_last.safetensors")
    task = get_task(cfg.task)
    dataset = task.open_eval(cfg.data, "val", extra)
    started = time.monotonic()
    with torch.inference_mode():
        metrics = task.evaluate(model, dataset, tile=args.tile3d if kind == "3d" else None).metrics
    seconds = time.monotonic() - started
    per_class = {row["name"]: row for row in metrics["per_class"]}
    return {
        "model": f"unet3d b{args.base3d} (1x2x2 pool)" if kind == "3d" else f"unet 2D b{args.base2d}, per section",
        "parameters": sum(p.numel() for p in model.parameters()),
        "dice_membrane": per_class["membrane"]["dice"], "dice_cell": per_class["cell"]["dice"],
        "mean_dice": metrics["mean_dice"], "mean_iou": metrics["mean_iou"],
        "train_minutes": train_minutes, "seconds_per_volume": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ISBI)
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per model")
    parser.add_argument("--epochs", type=int, default=1000, help="upper bound; the budget ends training first")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--base3d", type=int, default=8)
    parser.add_argument("--crop3d", type=int, nargs=3, default=[8, 128, 128])
    parser.add_argument("--batch3d", type=int, default=2)
    parser.add_argument("--tile3d", type=int, nargs=3, default=None, help="tile the validation volume (default: whole)")
    parser.add_argument("--base2d", type=int, default=16)
    parser.add_argument("--crop2d", type=int, nargs=2, default=[256, 256])
    parser.add_argument("--batch2d", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_volume"))
    parser.add_argument("--only", choices=["3d", "2d"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (args.root / "images").is_dir():
        raise SystemExit(f"ISBI 2012 not found at {args.root}; pass --root")
    if args.only:
        print(json.dumps(run_one(args.only, args)))
        return
    rows = []
    for kind in ("3d", "2d"):
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", kind], capture_output=True, text=True)
        if child.returncode:
            raise SystemExit(child.stderr[-3000:])
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(f"ISBI 2012: train sections 1-25, scored on sections 26-30; {args.minutes:g} training minutes per model\n")
    print(f"| model | params | Dice membrane | Dice cell | mean Dice | mean IoU | train min | s / val volume | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['parameters']:,} | {r['dice_membrane']:.3f} | {r['dice_cell']:.3f} | {r['mean_dice']:.3f} | "
              f"{r['mean_iou']:.3f} | {r['train_minutes']:.1f} | {r['seconds_per_volume']:.1f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
