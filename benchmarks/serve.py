"""Load test of ``pixelwise serve``: concurrent clients on loopback, throughput, latency, rejections, server memory.

Starts ``pixelwise serve`` in a subprocess on a free 127.0.0.1 port, then runs one phase per
``--clients`` value: that many client threads POST the same image to
``/v1/models/NAME/predict`` until ``--duration`` seconds or ``--requests`` requests (whichever
comes first; every loop is bounded in count and time). A phase with more clients than
``--max-jobs`` fills the server's job queue, so the extra requests are refused with 503.
Per phase it prints requests/s (answered 200), p50/p95 latency of the answered requests,
the count refused (503: clients retry at once, the worst case for the server) and other failures, and the server's peak RSS, sampled from
``/proc/PID/status`` every 20 ms; the last column is the server's own high-water mark
(VmHWM) at the end of the phase. Memory stays bounded when the full-queue phase peaks no
higher than the phase that only just fills the queue.

Usage:
    python benchmarks/serve.py                                  # random U-Net (base 16), 256 x 256 images
    python benchmarks/serve.py --model runs/demo/model_best.safetensors --size 512 --clients 1 4 16 --duration 20
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memory_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_model(folder: Path) -> Path:
    import torch

    from pixelwise.models import create_model, save_model

    torch.manual_seed(0)
    net = create_model("unet", num_classes=4, base_channels=16)
    return save_model(net, folder / "bench" / "model_best.safetensors",
                      extra={"class_names": ["a", "b", "c", "d"], "palette": [(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)]})


def start_server(model: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    command = [sys.executable, "-m", "pixelwise.cli", "serve", "--model", f"bench={model}", "--port", str(port),
               "--max-jobs", str(args.max_jobs), "--workers", str(args.workers), "--timeout", str(args.timeout)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited: {server.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit("server did not become ready in 120 s")


def run_phase(url: str, body: bytes, clients: int, duration: float, max_requests: int, pid: int) -> dict:
    """``clients`` threads POST ``body`` until ``duration`` s or ``max_requests`` requests in all."""
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: dict[int | str, int] = {}
    sent = 0
    deadline = time.monotonic() + duration
    peak = memory_mb(pid)

    def client() -> None:
        nonlocal sent
        with httpx.Client(timeout=duration + 60) as http:
            while time.monotonic() < deadline:
                with lock:
                    if sent >= max_requests:
                        return
                    sent += 1
                started = time.monotonic()
                try:
                    status: int | str = http.post(url, files={"image": ("bench.png", body, "image/png")}).status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        latencies.append(time.monotonic() - started)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, memory_mb(pid))
        time.sleep(0.02)
        if time.monotonic() > deadline + 120:
            raise SystemExit("clients did not finish within 120 s of the deadline")
    elapsed = time.monotonic() - started
    ok = statuses.get(200, 0)
    return {
        "clients": clients, "seconds": elapsed, "requests": sum(statuses.values()), "ok": ok, "rps": ok / elapsed,
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p95": statistics.quantiles(latencies, n=20)[-1] if len(latencies) >= 2 else float("nan"),
        "rejected": statuses.get(503, 0), "failed": sum(n for s, n in statuses.items() if s not in (200, 503)),
        "peak_rss": peak, "hwm": memory_mb(pid, "VmHWM"), "statuses": statuses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="Model file; default: a random U-Net (base_channels 16, 4 classes).")
    parser.add_argument("--size", type=int, default=256, help="Side of the square test image in px.")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="Concurrent clients, one phase each.")
    parser.add_argument("--duration", type=float, default=10.0, help="Seconds per phase (at most).")
    parser.add_argument("--requests", type=int, default=500, help="Requests per phase (at most).")
    parser.add_argument("--max-jobs", type=int, default=4, help="The server's --max-jobs.")
    parser.add_argument("--workers", type=int, default=1, help="The server's --workers.")
    parser.add_argument("--timeout", type=float, default=60.0, help="The server's --timeout.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="pixelwise-bench-") as tmp:
        model = args.model or make_model(Path(tmp))
        port = free_port()
        server = start_server(model, port, args)
        try:
            url = f"http://127.0.0.1:{port}/v1/models/bench/predict"
            rng = np.random.default_rng(0)
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(buffer, format="PNG")
            body = buffer.getvalue()
            httpx.post(url, files={"image": ("warm.png", body, "image/png")}, timeout=args.timeout).raise_for_status()
            idle = memory_mb(server.pid)
            print(f"server: pid {server.pid}, --max-jobs {args.max_jobs}, --workers {args.workers}; "
                  f"image {args.size} x {args.size} PNG ({len(body) / 1e3:.0f} kB); RSS after one request {idle:.0f} MB; "
                  f"{os.cpu_count()} CPUs")
            print("| clients | seconds | requests | 200 | requests/s | p50 ms | p95 ms | 503 | other | peak RSS MB | VmHWM MB |")
            print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
            for clients in args.clients:
                r = run_phase(url, body, clients, args.duration, args.requests, server.pid)
                print(f"| {r['clients']} | {r['seconds']:.1f} | {r['requests']} | {r['ok']} | {r['rps']:.1f} | {1e3 * r['p50']:.0f} | "
                      f"{1e3 * r['p95']:.0f} | {r['rejected']} | {r['failed']} | {r['peak_rss']:.0f} | {r['hwm']:.0f} |",
                      flush=True)
                if r["failed"]:
                    print(f"  statuses: {r['statuses']}")
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    main()
