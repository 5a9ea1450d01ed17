"""CPU speed and memory of every registry model: eager, prepared torch, torch.compile, ONNX Runtime (fp32, int8).

For each model and runtime, two workloads:

- ``image``: one forward of a 1 x 3 x H x W batch (default 360 x 480, CamVid), median
  latency over ``--runs`` after warm-up;
- ``tiled``: :func:`pixelwise.inference.sliding_window_labels` over one 3 x S x S image
  (default S = 4096) in ``--tile`` tiles, median over ``--tiled-runs``.

Runtimes: ``eager`` (the model in eval mode under ``torch.inference_mode``), ``torch``
(:func:`pixelwise.export.prepare_for_cpu` "torch": BN folded, channels-last), ``compile``
(the same in ``torch.compile``), ``onnx`` (exported at the workload's input size, run by
ONNX Runtime), ``onnx-int8`` (:func:`pixelwise.export.export_onnx_int8` at that size: int8
QDQ, calibrated on ``--calib-images`` CamVid train images when ../shared/data/camvid exists,
else on standard-normal noise; the models are untrained, so only the speed means anything).
GFLOP are counted once per model with ``FlopCounterMode`` on an eager forward (tiled: per
tile, times the tiles the run made); achieved GFLOP/s are compared with the best of ten
2048 x 2048 fp32 matmuls measured at the start of the same run. Every (model, workload,
runtime) cell runs in its own subprocess, so "peak RSS" is that process's own high-water mark (``ru_maxrss``): it includes the
interpreter and the imported libraries (the "baseline" in the header), the weights, and
for ``compile`` the compilation itself; peaks do not accumulate across rows.

Usage:
    python benchmarks/speed.py --models unet segnet_basic deeplabv3plus:backbone=mobilenetv2 --runtimes eager torch onnx
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RUNTIMES = ("eager", "torch", "compile", "onnx", "onnx-int8")
CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"
WORKLOADS = ("image", "tiled")


# ---------------------------------------------------------------------------------------
# Worker side: one measurement per process
# ---------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build_model(spec: dict[str, Any]) -> torch.nn.Module:
    from pixelwise.models import create_model

    torch.manual_seed(0)
    return create_model(spec["name"], num_classes=spec["num_classes"], **spec["options"]).eval()


def make_predictor(job: dict[str, Any], model: torch.nn.Module | None) -> Any:
    from pixelwise.export import OnnxPredictor, prepare_for_cpu

    runtime = job["runtime"]
    if runtime == "eager":
        # A plain callable, so sliding_window runs forward() as for the other runtimes
        # (not forward_valid of a valid-convolution model).
        return lambda x: model(x)
    if runtime in ("onnx", "onnx-int8"):
        return OnnxPredictor(job["onnx_path"], threads=job["threads"])
    return prepare_for_cpu(model, runtime)


def calibration_images(height: int, width: int, count: int) -> torch.Tensor:
    """(count, 3, height, width): CamVid train crops in [0, 1] if the data is here, else N(0, 1) noise."""
    if not CAMVID.is_dir():
        return torch.randn(count, 3, height, width, generator=torch.Generator().manual_seed(0))
    from pixelwise.data import open_dataset
    from pixelwise.export import calibration_batch

    dataset = open_dataset(f"camvid:{CAMVID}", "train")
    return calibration_batch(dataset, height=height, width=width, in_channels=3, num_images=count, normalised=False)


def time_calls(fn: Any, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def work(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job described by ``job`` and return its measurements."""
    if job["threads"] is not None:
        torch.set_num_threads(job["threads"])
    kind = job["kind"]
    if kind == "baseline":
        import onnxruntime  # noqa: F401  (imported for its memory)

        import pixelwise.export  # noqa: F401

        return {"peak_rss_mb": peak_rss_mb()}
    model = None if kind == "run" and job["runtime"].startswith("onnx") else build_model(job["model"])
    if kind == "flops":
        from torch.utils.flop_counter import FlopCounterMode

        flops = {}
        for key, (h, w) in job["sizes"].items():
            with torch.inference_mode(), FlopCounterMode(display=False) as counter:
                model(torch.randn(1, 3, h, w))
            flops[key] = counter.get_total_flops()
        return {"flops": flops, "params": sum(p.numel() for p in model.parameters())}
    if kind == "export":
        from pixelwise.export import export_onnx

        start = time.perf_counter()
        export_onnx(model, job["onnx_path"], height=job["height"], width=job["width"])
        return {"export_s": time.perf_counter() - start}
    if kind == "export-int8":
        from pixelwise.export import export_onnx_int8

        images = calibration_images(job["height"], job["width"], job["calib_images"])
        start = time.perf_counter()
        export_onnx_int8(model, job["onnx_path"], images, height=job["height"], width=job["width"])
        return {"export_s": time.perf_counter() - start}
    # kind == "run"
    start = time.perf_counter()
    predictor = make_predictor(job, model)
    h, w = job["height"], job["width"]
    if job["workload"] == "image":
        x = torch.randn(1, 3, h, w)
        with torch.inference_mode():
            predictor(x)  # compiles for "compile"
            setup = time.perf_counter() - start
            predictor(x)
            times = time_calls(lambda: predictor(x), job["runs"])
        return {"setup_s": setup, "times": times, "calls": 1, "peak_rss_mb": peak_rss_mb()}
    from pixelwise.inference import sliding_window_labels

    tile, batch, overlap = job["tile"], job["batch"], job["overlap"]
    # Warm-up on one strip of tiles: the same batch sizes as every strip of the full image.
    sliding_window_labels(predictor, torch.randn(3, tile, w), tile=tile, overlap=overlap, batch=batch)
    setup = time.perf_counter() - start
    tiles = 0

    def counted(x: torch.Tensor) -> torch.Tensor:
        nonlocal tiles
        tiles += x.shape[0]
        return predictor(x)

    image = torch.randn(3, h, w)
    times = time_calls(lambda: sliding_window_labels(counted, image, tile=tile, overlap=overlap, batch=batch), job["runs"])
    return {"setup_s": setup, "times": times, "calls": tiles // job["runs"], "peak_rss_mb": peak_rss_mb()}


# ---------------------------------------------------------------------------------------
# Driver side: orchestrate subprocesses, print the table
# ---------------------------------------------------------------------------------------


def parse_model(text: str, num_classes: int) -> dict[str, Any]:
    """``name`` or ``name:key=value,key=value`` (values as Python literals, else strings)."""
    name, _, rest = text.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--models: option {item!r} of {text!r} is not key=value")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return {"name": name, "options": options, "num_classes": num_classes, "label": text}


def spawn(job: dict[str, Any]) -> dict[str, Any]:
    """Run ``job`` in a fresh Python process; returns its result or ``{"error": ...}``."""
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_gflops(n: int = 2048, runs: int = 10) -> float:
    """Best-of-``runs`` GFLOP/s of an n x n fp32 matmul: the machine's practical peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    return 2 * n**3 / min(time_calls(lambda: a @ b, runs)) / 1e9


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {i for i, h in enumerate(header) if h not in ("model", "workload", "runtime")}

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    print(line(header))
    print("|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|")
    for row in rows:
        print(line(row))


def main() -> None:
    from pixelwise.models import list_models

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=None, help="registry names, optionally name:key=value,...; default: all")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--width", type=int, default=480)
    parser.add_argument("--runs", type=int, default=10, help="timed forwards per image cell (after 2 warm-up calls)")
    parser.add_argument("--tiled-size", type=int, default=4096, help="side of the square image for the tiled workload")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=1, help="tiles per model call in the tiled workload")
    parser.add_argument("--tiled-runs", type=int, default=1)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--calib-images", type=int, default=8, help="calibration images of the onnx-int8 export")
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime intra-op threads (default: theirs)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(work(json.loads(args.worker))))
        return

    specs = [parse_model(m, args.num_classes) for m in (args.models or list_models())]
    unknown = [s["name"] for s in specs if s["name"] not in list_models()]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; choose from {', '.join(list_models())}")
    runtimes = [r for r in RUNTIMES if r in args.runtimes]
    sizes = {"image": (args.height, args.width), "tiled": (args.tiled_size, args.tiled_size)}
    workloads = {w: sizes[w] for w in WORKLOADS if w in args.workloads}
    call_size = {"image": (args.height, args.width), "tiled": (args.tile, args.tile)}  # input of one model call
    common = {"threads": args.threads}
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    peak = matmul_gflops()
    baseline = spawn({"kind": "baseline", **common}).get("peak_rss_mb", float("nan"))
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = "not installed"
    print(f"# pixelwise speed: {cpu_name()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {ort_version}")
    print(f"# 2048x2048 fp32 matmul (best of 10): {peak:.1f} GFLOP/s; baseline RSS (python + torch + onnxruntime): {baseline:.0f} MB")
    described = {
        "image": f"image = 1x3x{args.height}x{args.width}, median of {args.runs}",
        "tiled": f"tiled = 3x{args.tiled_size}x{args.tiled_size} in {args.tile}px tiles, overlap {args.overlap}, "
        f"batch {args.batch}, median of {args.tiled_runs}",
    }
    print(f"# {'; '.join(described[w] for w in workloads)}; setup = build the predictor and run it once "
          "(compilation for compile; plus the export for onnx, and the calibration for onnx-int8)\n")

    header = ["model", "workload", "runtime", "setup", "median", "GFLOP", "GFLOP/s", "% matmul", "peak RSS MB"]
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="pixelwise-speed-") as tmp:
        for spec in specs:
            sizes = {workload: call_size[workload] for workload in workloads}
            counted = spawn({"kind": "flops", "model": spec, "sizes": sizes, **common})
            flops = counted.get("flops", {})
            for workload, (h, w) in workloads.items():
                per_call = flops.get(workload)
                for runtime in runtimes:
                    export_s, onnx_path = 0.0, ""
                    print(f"[{time.perf_counter() - started:7.0f}s] {spec['label']} {workload} {runtime}", file=sys.stderr, flush=True)
                    if runtime.startswith("onnx"):
                        eh, ew = call_size[workload]
                        onnx_path = str(Path(tmp) / f"{len(rows)}-{runtime}.onnx")
                        exported = spawn({
                            "kind": "export" if runtime == "onnx" else "export-int8", "model": spec, "onnx_path": onnx_path,
                            "height": eh, "width": ew, "calib_images": args.calib_images, **common,
                        })
                        if "error" in exported:
                            rows.append([spec["label"], workload, runtime, "export failed: " + exported["error"], *[""] * 5])
                            continue
                        export_s = exported["export_s"]
                    job = {
                        "kind": "run", "model": spec, "runtime": runtime, "workload": workload, "height": h, "width": w,
                        "runs": args.runs if workload == "image" else args.tiled_runs, "tile": args.tile,
                        "batch": args.batch, "overlap": args.overlap, "onnx_path": onnx_path, **common,
                    }
                    result = spawn(job)
                    if "error" in result:
                        rows.append([spec["label"], workload, runtime, "failed: " + result["error"], *[""] * 5])
                        continue
                    median = statistics.median(result["times"])
                    gflop = per_call * result["calls"] / 1e9 if per_call is not None else float("nan")
                    rows.append([
                        spec["label"], workload, runtime, fmt_time(result["setup_s"] + export_s), fmt_time(median),
                        f"{gflop:.1f}", f"{gflop / median:.1f}", f"{100 * gflop / median / peak:.0f}%", f"{result['peak_rss_mb']:.0f}",
                    ])
    print_table(rows, header)
    print(f"\n# matmul again at the end: {matmul_gflops():.1f} GFLOP/s (a big gap to the start means the machine was busy)")
    print(f"# total wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
