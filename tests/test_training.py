"""The training loop: exact resume after a kill, config parsing, edges task, DDP with gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import pixelwise.training as training
from pixelwise.tasks import semantic
from pixelwise.data import write_synthetic_dataset
from pixelwise.training import TrainConfig, load_config, train


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "shapes", n_train=8, n_val=4, size=(32, 48))


def _config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), model="unet", model_args={"base_channels": 4, "depth": 2},
                epochs=3, batch_size=4, lr=0.05, threads=1)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_resume_after_a_kill_matches_an_unbroken_run(tiny_data, tmp_path, monkeypatch, ema_decay) -> None:
    unbroken = train(_config(tiny_data, tmp_path / "a", ema_decay=ema_decay), progress=False)

    real_epoch = training._train_one_epoch

    def killed_in_epoch_3(*args, **kwargs):
        if args[-2] == 3:  # epoch argument
            raise KeyboardInterrupt("simulated kill")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(training, "_train_one_epoch", killed_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tiny_data, tmp_path / "b", ema_decay=ema_decay), progress=False)
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(training, "_train_one_epoch", real_epoch)
    resumed = train(_config(tiny_data, tmp_path / "b", ema_decay=ema_decay), resume=True, progress=False)

    a = load_file(tmp_path / "a" / "model_last.safetensors")
    b = load_file(tmp_path / "b" / "model_last.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in unbroken["history"]]
    assert [h["lr"] for h in resumed["history"]] == [h["lr"] for h in unbroken["history"]]


def test_poly_schedule_counts_accumulated_steps(tiny_data, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)  # a CPU without native bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    result = train(_config(tiny_data, tmp_path, epochs=2, batch_size=2, accumulate=2, bf16=True, lr=0.01), progress=False)
    assert "bf16=true on a CPU without AVX512-BF16 or AMX" in capsys.readouterr().out  # emulated there: the run says so
    # 8 samples / batch 2 = 4 batches -> 2 optimiser steps per epoch; poly(0.9) after 2 of 4 steps.
    assert result["steps_per_epoch"] == 2
    assert result["history"][0]["lr"] == pytest.approx(0.01 * (1 - 2 / 4) ** 0.9)
    assert result["history"][1]["lr"] == 0.0
    with safe_open(str(tmp_path / "checkpoint.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["pixelwise"])
        assert any(k.startswith("optim.") for k in f.keys())  # SGD momentum buffers
    assert meta["scheduler"]["last_epoch"] == 4 and meta["epoch"] == 2


def test_edges_task_trains_hed_on_class_boundaries(tiny_data, tmp_path) -> None:
    result = train(_config(tiny_data, tmp_path, model="hed", model_args={}, task="edges", epochs=1, lr=1e-3,
                           optimizer="adamw"), progress=False)
    record = result["history"][0]
    assert 0.0 <= record["val_ods_f"] <= 1.0 and "val_mean_iou" not in record
    meta = json.loads((tmp_path / "model_best.json").read_text())
    assert meta["model"]["num_classes"] == 1 and meta["extra"]["task"] == "edges"


def test_median_frequency_weights_reach_the_loss(tiny_data, tmp_path, monkeypatch) -> None:
    seen = {}
    real = semantic.build_loss

    def spy(name, **kw):
        seen.update(kw)
        return real(name, **kw)

    monkeypatch.setattr(semantic, "build_loss", spy)
    train(_config(tiny_data, tmp_path, epochs=1, class_weights="median_frequency"), progress=False)
    weights = seen["class_weights"]
    assert weights.shape == (4,) and torch.isfinite(weights).all()
    assert weights[0] == weights.min()  # background is the most frequent class


def test_load_config_applies_typed_overrides(tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("data: somewhere\nmodel: unet\nmodel_args: {base_channels: 8}\n")
    cfg = load_config(path, ["epochs=3", "crop_size=[64,64]", "model_args.depth=3", "bf16=true"])
    assert (cfg.epochs, cfg.crop_size, cfg.model_args, cfg.bf16) == (3, [64, 64], {"base_channels": 8, "depth": 3}, True)
    with pytest.raises(ValueError, match="unknown config key.*epoch\\b"):
        load_config(path, ["epoch=3"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(path, ["epochs"])
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_resume_without_checkpoint_is_a_clear_error(tiny_data, tmp_path) -> None:
    with pytest.raises(ValueError, match="cannot resume.*checkpoint.safetensors"):
        train(_config(tiny_data, tmp_path / "fresh"), resume=True, progress=False)


DDP_CHILD = """
import os, sys
from safetensors.torch import save_file
import pixelwise.training as training
from pixelwise.cli import app

real_epoch = training._train_one_epoch

def epoch(task, module, *args, **kwargs):  # keep this rank's parameters after every epoch
    loss = real_epoch(task, module, *args, **kwargs)
    params = {name.removeprefix("module."): p.detach().clone() for name, p in module.named_parameters()}
    save_file(params, os.path.join(sys.argv[1], "rank" + os.environ["RANK"] + ".safetensors"))
    return loss

training._train_one_epoch = epoch
app(["train", *sys.argv[2:]], standalone_mode=False)
"""


def test_ddp_with_two_gloo_processes_keeps_the_ranks_in_step(tiny_data, tmp_path) -> None:
    out = tmp_path / "ddp"
    script = tmp_path / "child.py"
    script.write_text(DDP_CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path),
           f"data={tiny_data}", f"out={out}", "model=unet", "model_args={base_channels: 4, depth: 2}", "epochs=2",
           "batch_size=2", "threads=1", "lr=0.05"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["pixelwise"])
    # 8 samples over 2 ranks of batch 2 -> 2 steps per epoch (4 on one process).
    assert meta["world_size"] == 2
    assert meta["scheduler"]["last_epoch"] == 4
    assert (out / "metrics.json").is_file()
    # each rank saw other images; only averaged gradients keep their parameters identical
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    last = load_file(out / "model_last.safetensors")  # what rank 0 saved is what the ranks trained
    assert all(torch.equal(v, last[k.removeprefix("model.")]) for k, v in rank0.items())


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path: Path) -> None:
    from pixelwise.models import create_model

    cfg = load_config(path)
    with torch.device("meta"):
        create_model(cfg.model, num_classes=11, **cfg.model_args)
    assert cfg.data.split(":")[0] in ("camvid", "isbi2012")


def test_unet_weight_map_reaches_the_loss(tiny_data, tmp_path, monkeypatch) -> None:
    seen = []
    real = semantic.build_loss

    def spy(name, **kw):
        criterion = real(name, **kw)

        def call(logits, target, **extra):
            seen.append(extra.get("pixel_weights"))
            return criterion(logits, target, **extra)

        return SimpleNamespace(to=lambda device: call)

    monkeypatch.setattr(semantic, "build_loss", spy)
    train(_config(tiny_data, tmp_path, epochs=1, unet_weight_map=True), progress=False)
    assert seen and all(w is not None for w in seen)
    weights = torch.cat([w.flatten() for w in seen])
    assert weights.min() > 0 and weights.max() > 1.5  # not all ones: class balance and border terms


def test_unknown_task_names_the_known_ones(tiny_data, tmp_path) -> None:
    with pytest.raises(ValueError, match="task='instances' is not known; use one of edges, instance, scribbles, semantic, volume"):
        _config(tiny_data, tmp_path, task="instances")


def test_channels_last_trains_the_same_run_in_nhwc(tiny_data, tmp_path, monkeypatch) -> None:
    formats = []
    original = semantic.SemanticTask.loss

    def spy(self, module, batch, device):
        formats.append(next(p for p in module.parameters() if p.ndim == 4).is_contiguous(memory_format=torch.channels_last))
        return original(self, module, batch, device)

    monkeypatch.setattr(semantic.SemanticTask, "loss", spy)
    plain = train(_config(tiny_data, tmp_path / "plain"), progress=False)["history"]
    assert not any(formats)
    formats.clear()
    nhwc = train(_config(tiny_data, tmp_path / "nhwc", channels_last=True), progress=False)["history"]
    assert formats and all(formats)
    for a, b in zip(plain, nhwc):  # same numbers up to the convolutions' float rounding
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
    formats.clear()  # the layout may change on resume: an NCHW run continues in NHWC
    resumed = train(_config(tiny_data, tmp_path / "plain", epochs=4, channels_last=True), resume=True, progress=False)["history"]
    assert formats and all(formats) and len(resumed) == 4
    with pytest.raises(ValueError, match="channels_last=true applies to 2D dense models"):
        train(_config(tiny_data, tmp_path / "3d", model="unet3d", channels_last=True), progress=False)
