"""Batch prediction over processes: rank shards, torchrun with 2 ranks, and resuming an interrupted batch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pixelwise.cli import app
from pixelwise.inference import PREDICTION_KINDS, predict_files, shard_images
from pixelwise.models import create_model, save_model

N_IMAGES = 8


def _write_images(folder: Path, n: int = N_IMAGES) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_shards_are_disjoint_and_cover_the_batch_once(tmp_path) -> None:
    images = _write_images(tmp_path / "a", 5)
    extra = _write_images(tmp_path / "b", 0) + [tmp_path / "b" / "x.tif"]
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    batch = [tmp_path / "a", *extra]
    for world in (1, 2, 3, 7):
        shards = [shard_images(batch, rank, world) for rank in range(world)]
        assert sorted(p for s in shards for p in s) == sorted([*images, *extra])  # each file exactly once
        assert [len(s) for s in shards] == [len(range(r, 6, world)) for r in range(world)]
    assert shard_images(batch, 1, 2) == [images[1], images[3], extra[0]]  # sorted by path, dealt round-robin


def test_shards_refuse_colliding_names_and_bad_ranks(tmp_path) -> None:
    (tmp_path / "b").mkdir()
    one, two = tmp_path / "a.png", tmp_path / "b" / "a.jpg"
    with pytest.raises(ValueError, match="share the name 'a', so their outputs would collide"):
        shard_images([one, two], 0, 1)
    with pytest.raises(ValueError, match=r"rank 2 must be in \[0, world_size=2\)"):
        shard_images([one], 2, 2)


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "1000", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "pixelwise.cli", "predict", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def _outputs(out: Path, stem: str) -> list[Path]:
    return [out / f"{stem}_{kind}.png" for kind in PREDICTION_KINDS]


def test_torchrun_two_ranks_predict_each_image_once_and_resume(tmp_path) -> None:
    images = _write_images(tmp_path / "images")
    torch.manual_seed(0)
    model = save_model(create_model("unet", num_classes=3, base_channels=4, depth=2), tmp_path / "run" / "model.safetensors",
                       extra={"class_names": ["a", "b", "c"], "palette": [(0, 0, 0), (255, 0, 0), (0, 255, 0)]})
    reference = tmp_path / "single"
    predict_files(images, model, reference)
    out = tmp_path / "sharded"
    args = [str(tmp_path / "images"), "--model", str(model), "--out", str(out), "--resume"]
    # Outputs already there for 00 (rank 0's) and 03 (rank 1's) are kept, not recomputed.
    done = {"00": b"done before", "03": b"done before"}
    for stem, content in done.items():
        for path in _outputs(out, stem):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
    # An interrupted batch: rank 1 of 2 (01, 03, 05, 07) stops at 07, unreadable at the time; rank 0 never ran.
    good = images[7].read_bytes()
    images[7].write_bytes(b"\x89PNG\r\n\x1a\n broken")
    partial = CliRunner().invoke(app, ["predict", *args], env={"RANK": "1", "WORLD_SIZE": "2"})
    assert isinstance(partial.exception, ValueError) and "07.png" in str(partial.exception)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for s in ("00", "01", "03", "05") for p in _outputs(out, s))
    finished = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # Resume under torchrun: each rank predicts only its missing images.
    images[7].write_bytes(good)
    resumed = _torchrun(*args)
    assert resumed.returncode == 0, resumed.stderr
    counts = dict(re.findall(r"rank (\d)/2: (wrote \d+ predictions to .*?, skipped \d+) already there", resumed.stdout))
    assert counts["0"] == f"wrote 3 predictions to {out}, skipped 1", resumed.stdout  # 02 04 06; 00
    assert counts["1"] == f"wrote 1 predictions to {out}, skipped 3", resumed.stdout  # 07; 01 03 05
    assert all(out.joinpath(name).stat().st_mtime_ns == t for name, t in finished.items())  # nothing redone
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # atomic writes leave no temporary files
    for image in images:
        for kind in PREDICTION_KINDS:
            name = f"{image.stem}_{kind}.png"
            expected = done[image.stem] if image.stem in done else (reference / name).read_bytes()
            assert (out / name).read_bytes() == expected, name
