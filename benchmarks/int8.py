"""int8 against fp32 on trained CamVid models: ONNX Runtime latency and CamVid val mIoU side by side.

Train the models first (any CamVid checkpoint of pixelwise works; the standard split, since
this scores on CamVid val), then give their files:

    python benchmarks/camvid.py --holdout none --model segnet_basic --model-args '{}' --minutes 10 --out runs/int8/segnet_basic
    python benchmarks/int8.py runs/int8/*/model_last.safetensors --threads 2

Each model is exported twice at the evaluation input (``--height`` x ``--width``, default
180 x 240: the half-size CamVid frames that benchmarks/camvid.py trains and evaluates at):
fp32 (:func:`pixelwise.export.export_onnx`) and int8 (:func:`pixelwise.export.export_onnx_int8`,
static QDQ, per-channel weights, first and last convolution kept in fp32, activation ranges
calibrated on ``--calib-images`` CamVid train frames at the same scale). Columns: median
latency of one 1 x 3 x H x W forward in ONNX Runtime over ``--runs`` after two warm-up
calls, the speed-up, and mIoU on the 101 val frames (scale 0.5, probabilities resized to
full resolution, 11 classes, void ignored) for each; the header gives the best 2048² fp32
matmul rate of the same run (measured again at the end: a gap means the machine was busy).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from speed import matmul_gflops, time_calls

from pixelwise.data import eval_transform, open_dataset
from pixelwise.export import OnnxPredictor, calibration_batch, export_onnx, export_onnx_int8
from pixelwise.models import load_model
from pixelwise.tasks import get_task

CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"


class Rescaled(torch.utils.data.Dataset):
    """A data set's (C, H, W) images resized by ``scale`` (bilinear), labels dropped: calibration input."""

    def __init__(self, dataset, scale: float) -> None:
        self.dataset, self.scale, self.class_names = dataset, scale, dataset.class_names

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, None]:
        image = self.dataset[i][0]
        return F.interpolate(image[None], scale_factor=self.scale, mode="bilinear", align_corners=False)[0], None


class OnnxModule(torch.nn.Module):
    """An :class:`OnnxPredictor` behind the ``nn.Module`` interface that evaluation expects."""

    def __init__(self, predictor: OnnxPredictor) -> None:
        super().__init__()
        self.predictor = predictor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="trained CamVid models (.safetensors)")
    parser.add_argument("--root", type=Path, default=CAMVID, help="CamVid folder (SegNet layout)")
    parser.add_argument("--height", type=int, default=180)
    parser.add_argument("--width", type=int, default=240)
    parser.add_argument("--calib-images", type=int, default=32, help="CamVid train frames that calibrate the int8 ranges")
    parser.add_argument("--runs", type=int, default=20, help="timed forwards per runtime")
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime intra-op threads")
    args = parser.parse_args()
    if not (args.root / "val").is_dir():
        raise SystemExit(f"CamVid not found at {args.root}; pass --root")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    scale = args.height / 360
    peak = matmul_gflops()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pixelwise-int8-bench-") as tmp:
        for path in args.models:
            model, extra = load_model(path)
            transform = eval_transform(extra.get("mean"), extra.get("std"))
            val = open_dataset(f"camvid:{args.root}", "val", transform=transform)
            train = Rescaled(open_dataset(f"camvid:{args.root}", "train", transform=transform), scale)
            calibration = calibration_batch(train, height=args.height, width=args.width, in_channels=3,
                                            num_images=args.calib_images, class_names=extra.get("class_names"))
            files = {
                "fp32": export_onnx(model, Path(tmp) / "fp32.onnx", height=args.height, width=args.width, extra=extra),
                "int8": export_onnx_int8(model, Path(tmp) / "int8.onnx", calibration, height=args.height, width=args.width,
                                         extra=extra),
            }
            measured = {}
            for kind, file in files.items():
                predictor = OnnxPredictor(file, threads=args.threads)
                x = calibration[:1].contiguous()
                time_calls(lambda: predictor(x), 2)  # warm-up
                times = time_calls(lambda: predictor(x), args.runs)
                metrics = get_task("semantic").evaluate(OnnxModule(predictor), val, scales=(scale,)).metrics
                measured[kind] = (1000 * statistics.median(times), metrics["mean_iou"])
            name = f"{model.config.get('name', path.parent.name)} ({path.parent.name})"
            rows.append((name, measured))
            print(f"{name}: fp32 {measured['fp32'][0]:.1f} ms, mIoU {100 * measured['fp32'][1]:.1f}; "
                  f"int8 {measured['int8'][0]:.1f} ms, mIoU {100 * measured['int8'][1]:.1f}", flush=True)
    print(f"\n# 2048x2048 fp32 matmul (best of 10): {peak:.1f} GFLOP/s at the start, {matmul_gflops():.1f} at the end; "
          f"input 1 x 3 x {args.height} x {args.width}, {torch.get_num_threads()} threads\n")
    print("| model | fp32 ms | int8 ms | speed-up | fp32 mIoU | int8 mIoU | change |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, m in rows:
        (t32, i32), (t8, i8) = m["fp32"], m["int8"]
        print(f"| {name} | {t32:.1f} | {t8:.1f} | {t32 / t8:.2f}x | {100 * i32:.1f} | {100 * i8:.1f} | {100 * (i8 - i32):+.1f} |")


if __name__ == "__main__":
    main()
