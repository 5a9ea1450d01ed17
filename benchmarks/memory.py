"""Peak memory of predicting one huge image end to end: ``pixelwise predict --tile`` and the Python API.

Writes one S x S RGB PNG (default 8192²) and a K-class model (default 21 classes), then runs
each row in its own Python process and reports that process's peak RSS (``ru_maxrss``)
and wall time. Rows:

- ``eager``: the Python API: ``load_model`` + ``read_image`` +
  :func:`pixelwise.inference.sliding_window_labels` with the plain ``nn.Module``, normalising
  the uint8 image strip by strip (``transform=``), + ``write_mask`` (no colour/overlay PNGs);
- ``torch``, ``onnx``: :func:`pixelwise.inference.predict_files` (what the CLI's ``predict``
  runs) with ``--runtime torch`` / ``onnx``, which also writes the colour and overlay PNGs;
- ``... +tta``: the same with ``--flip --scales 0.75,1`` (TTA on every tile).

The baseline column is the process's RSS after importing torch, onnxruntime and pixelwise and
loading the model, before the image is read. A K x S x S float32 array would take
K * S² * 4 bytes (5.2 GiB for 21 classes at 8192²); the rows stay far below it.

Usage:
    python benchmarks/memory.py                                  # 8192², unet (21 classes), all rows
    python benchmarks/memory.py --size 2048 --rows torch onnx
    python benchmarks/memory.py --model deeplabv3plus:backbone=mobilenetv2
"""

from __future__ import annotations

import argparse
import ast
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROWS = ("eager", "torch", "onnx", "torch+tta", "onnx+tta")
TTA = {"flip": True, "scales": (0.75, 1.0)}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def work(job: dict[str, Any]) -> dict[str, Any]:
    """One row, in this process: returns baseline and peak RSS (MB) and seconds."""
    import numpy as np
    import onnxruntime  # noqa: F401  (imported for every row, so baselines compare)
    import torch

    from pixelwise.data.transforms import ToTensor, to_float
    from pixelwise.inference import predict_files, sliding_window_labels
    from pixelwise.io import read_image, write_mask
    from pixelwise.models import load_model

    torch.set_num_threads(job["threads"])
    runtime, _, tta = job["row"].partition("+")
    options = TTA if tta else {"flip": False, "scales": (1.0,)}
    model, extra = load_model(job["model"])
    model.eval()
    baseline = peak_rss_mb()
    started = time.perf_counter()
    if runtime == "eager":
        raw = read_image(job["image"])
        pixels = torch.from_numpy(raw).permute(2, 0, 1)  # uint8 (C, H, W): normalised strip by strip below
        normalise = ToTensor(extra.get("mean"), extra.get("std")).normalise

        def to_input(strip: torch.Tensor) -> torch.Tensor:
            hwc = normalise(to_float(strip.permute(0, 2, 3, 1).numpy()))
            return torch.from_numpy(np.ascontiguousarray(hwc)).permute(0, 3, 1, 2)

        labels = sliding_window_labels(model, pixels, job["tile"], transform=to_input, **options)
        write_mask(Path(job["out"]) / "eager_labels.png", labels.numpy().astype(np.uint8), extra["palette"])
    else:
        predict_files([job["image"]], job["model"], job["out"], tile=job["tile"], runtime=runtime, **options)
    return {"baseline": baseline, "peak": peak_rss_mb(), "seconds": time.perf_counter() - started}


def prepare(folder: Path, size: int, spec: dict[str, Any]) -> tuple[Path, Path]:
    """Write the test image (smooth colours, cheap to encode) and the model; reuse them if present."""
    import numpy as np
    import torch
    from PIL import Image

    from pixelwise.models import create_model, save_model

    image = folder / f"image_{size}.png"
    if not image.is_file():
        y, x = np.ogrid[:size, :size]
        rgb = np.empty((size, size, 3), np.uint8)
        rgb[..., 0] = (x * 255 // size).astype(np.uint8)
        rgb[..., 1] = (y * 255 // size).astype(np.uint8)
        rgb[..., 2] = ((x // 64 + y // 64) % 2 * 200).astype(np.uint8)
        Image.fromarray(rgb).save(image, compress_level=1)
    model = folder / "model"
    classes = spec["num_classes"]
    torch.manual_seed(0)
    save_model(create_model(spec["name"], num_classes=classes, **spec["options"]), model,
               {"palette": [(k * 37 % 256, k * 91 % 256, k * 53 % 256) for k in range(classes)],
                "class_names": [f"c{k}" for k in range(classes)]})
    return image, model.with_suffix(".safetensors")


def parse_model(text: str, num_classes: int) -> dict[str, Any]:
    name, _, rest = text.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return {"name": name, "options": options, "num_classes": num_classes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192, help="image side S (S x S RGB)")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--model", default="unet:base_channels=8,depth=3", help="name:key=value,...")
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, help="keep the image and outputs here (default: a temporary folder)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(work(json.loads(args.worker))))
        return
    with tempfile.TemporaryDirectory(prefix="pixelwise-memory-") as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        spec = parse_model(args.model, args.classes)
        image, model = prepare(folder, args.size, spec)
        print(f"{args.size} x {args.size} RGB, {args.model} ({args.classes} classes), tile {args.tile}, "
              f"{args.threads} threads; TTA = flip + scales 0.75,1; a K x S x S float32 array would be "
              f"{args.classes * args.size**2 * 4 / 2**30:.1f} GiB", flush=True)
        print(f"{'row':<12}{'baseline MB':>12}{'peak RSS MB':>13}{'seconds':>9}", flush=True)
        for row in args.rows:
            job = {"row": row, "image": str(image), "model": str(model), "tile": args.tile, "threads": args.threads,
                   "out": str(folder / row)}
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{row:<12} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{row:<12}{r['baseline']:>12.0f}{r['peak']:>13.0f}{r['seconds']:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
