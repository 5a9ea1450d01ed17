"""CPU training throughput: samples/s of one training step (forward, loss, backward, optimiser) per configuration.

Configurations (each against ``eager``: fp32, contiguous, ``AdamW(foreach=False)``, the
for-loop update that is PyTorch's default on the CPU):

- ``channels_last``: model and batches in channels-last memory format;
- ``foreach``: ``AdamW(foreach=True)`` (one multi-tensor kernel per update step);
- ``fused``: ``AdamW(fused=True)`` (one fused kernel);
- ``compile``: ``torch.compile`` of the model and of the loss (forward and backward graphs);
  the optimiser step stays eager;
- ``bf16``: forward and loss under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (weights,
  gradients and optimiser in fp32), as ``TrainConfig.bf16`` does;
- ``all``: channels_last + fused + compile + bf16;
- ``memory_efficient``: FC-DenseNet models only, ``memory_efficient=True`` (checkpointed dense
  layers, :mod:`pixelwise.models.densenet`), to compare peak memory and time with eager.

Every (model, configuration) runs in its own process with the same seed, the same weights and
the same batches (synthetic shapes, :func:`pixelwise.data.synthetic.make_synthetic_sample`,
mean/std normalised, cross-entropy). Columns: ``setup`` (first step: compilation for
compile), ``samples/s`` over ``--steps`` timed steps after ``--warmup``, the speed-up over
eager, ``step peak MB`` (the process's peak RSS minus its RSS before the first step: the
activations, gradients and optimiser state of training), and, to show that speed does not
cost correctness, the largest relative difference between this configuration's loss and
eager's over the first ``--compare-steps`` steps, and the loss after them.

Usage:
    python benchmarks/train_speed.py --threads 2
    python benchmarks/train_speed.py --models fcdensenet56 --configs eager memory_efficient --size 224
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from speed import parse_model  # benchmarks/speed.py, beside this script

CONFIGS = ("eager", "channels_last", "foreach", "fused", "compile", "bf16", "all", "memory_efficient")
FLAGS = {  # configuration -> what it switches on
    "eager": set(),
    "channels_last": {"channels_last"},
    "foreach": {"foreach"},
    "fused": {"fused"},
    "compile": {"compile"},
    "bf16": {"bf16"},
    "all": {"channels_last", "fused", "compile", "bf16"},
    "memory_efficient": {"memory_efficient"},
}
DEFAULT_MODELS = ("unet:base_channels=16", "segnet_basic", "deeplabv3plus:backbone=mobilenetv2", "fcdensenet56")
NUM_CLASSES = 8


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def synthetic_batches(count: int, batch: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of (batch, 3, size, size) normalised images and (batch, size, size) labels."""
    from pixelwise.data.synthetic import make_synthetic_sample

    rng = np.random.default_rng(0)
    samples = [make_synthetic_sample(rng, (size, size), NUM_CLASSES) for _ in range(count * batch)]
    images = torch.from_numpy(np.stack([s[0] for s in samples])).permute(0, 3, 1, 2).float() / 255
    images = (images - images.mean((0, 2, 3), keepdim=True)) / images.std((0, 2, 3), keepdim=True)
    labels = torch.from_numpy(np.stack([s[1] for s in samples])).long()
    return list(zip(images.split(batch), labels.split(batch)))


def work(job: dict[str, Any]) -> dict[str, Any]:
    """One (model, configuration): time ``warmup + steps`` training steps, record the losses."""
    from pixelwise.models import create_model

    torch.set_num_threads(job["threads"])
    flags = FLAGS[job["config"]]
    options = dict(job["options"])
    if "memory_efficient" in flags:
        options["memory_efficient"] = True
    torch.manual_seed(0)
    model = create_model(job["name"], num_classes=NUM_CLASSES, **options).train()
    memory_format = torch.channels_last if "channels_last" in flags else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    fast = {"foreach": "foreach" in flags, "fused": True} if "fused" in flags else {"foreach": "foreach" in flags}
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3, **fast)
    forward = torch.compile(model) if "compile" in flags else model
    criterion = torch.compile(F.cross_entropy) if "compile" in flags else F.cross_entropy
    total = job["warmup"] + job["steps"]
    batches = synthetic_batches(job["distinct_batches"], job["batch"], job["size"])

    def step(i: int) -> float:
        images, labels = batches[i % len(batches)]
        images = images.contiguous(memory_format=memory_format)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in flags):
            out = forward(images)
            loss = criterion(out.float(), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        return loss.item()

    before = current_rss_mb()
    start = time.perf_counter()
    losses = [step(0)]
    setup = time.perf_counter() - start
    for i in range(1, job["warmup"]):
        losses.append(step(i))
    start = time.perf_counter()
    for i in range(job["warmup"], total):
        losses.append(step(i))
    elapsed = time.perf_counter() - start
    return {
        "setup_s": setup, "samples_per_s": job["steps"] * job["batch"] / elapsed, "losses": losses,
        "step_peak_mb": peak_rss_mb() - before,
    }


def spawn(job: dict[str, Any]) -> dict[str, Any]:
    """Run ``job`` in a fresh Python process; returns its result or ``{"error": ...}``."""
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) if i < 2 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="name or name:key=value,...")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="square crop side in px")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (the first also compiles)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--compare-steps", type=int, default=10, help="steps whose losses are compared with eager")
    parser.add_argument("--distinct-batches", type=int, default=4, help="different synthetic batches, cycled")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(work(json.loads(args.worker))))
        return
    if not 1 <= args.compare_steps <= args.warmup + args.steps:
        raise SystemExit("--compare-steps must be at least 1 and at most --warmup + --steps (the steps that are run)")

    print(f"# pixelwise training step: torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs; "
          f"batch {args.batch} x 3 x {args.size} x {args.size}, {NUM_CLASSES} classes, AdamW; "
          f"samples/s over {args.steps} steps after {args.warmup} warm-up steps\n")
    started = time.perf_counter()
    header = ["model", "config", "setup", "samples/s", "vs eager", "step peak MB",
              f"max loss diff, {args.compare_steps} steps", f"loss at step {args.compare_steps}"]
    rows = []
    for text in args.models:
        spec = parse_model(text, NUM_CLASSES)
        name, options = spec["name"], spec["options"]
        configs = [c for c in CONFIGS if c in args.configs and (c != "memory_efficient" or name.startswith("fcdensenet"))]
        if "eager" not in configs:
            configs.insert(0, "eager")  # the reference for speed-up and losses
        reference = None
        for config in configs:
            print(f"[{time.perf_counter() - started:6.0f}s] {text} {config}", file=sys.stderr, flush=True)
            result = spawn({
                "name": name, "options": options, "config": config, "threads": args.threads, "batch": args.batch,
                "size": args.size, "warmup": args.warmup, "steps": args.steps, "distinct_batches": args.distinct_batches,
            })
            if "error" in result:
                rows.append([text, config, "failed: " + result["error"], *[""] * 5])
                continue
            reference = result if config == "eager" else reference
            losses = np.array(result["losses"][: args.compare_steps])
            diff, speedup = "", ""
            if reference is not None:
                eager = np.array(reference["losses"][: args.compare_steps])
                diff = f"{np.max(np.abs(losses - eager) / np.abs(eager)) * 100:.2f}%"
                speedup = f"{result['samples_per_s'] / reference['samples_per_s']:.2f}x"
            rows.append([
                text, config, f"{result['setup_s']:.1f} s", f"{result['samples_per_s']:.2f}", speedup,
                f"{result['step_peak_mb']:.0f}", diff, f"{losses[-1]:.4f}",
            ])
    print_table(rows, header)
    print(f"\n# total wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
