"""Resume: changed configs, schedule refit, stale temp files, and a real ``kill -9`` in a subprocess."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import pixelwise.training as training
from pixelwise.data import write_synthetic_dataset
from pixelwise.training import TrainConfig, train

LR = 0.05


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "shapes", n_train=8, n_val=4, size=(32, 48))


def _config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), model="unet", model_args={"base_channels": 4, "depth": 2},
                epochs=3, batch_size=4, lr=LR, threads=1)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def unbroken(tiny_data, tmp_path_factory) -> dict:
    """One uninterrupted 3-epoch run (2 optimiser steps per epoch)."""
    return train(_config(tiny_data, tmp_path_factory.mktemp("unbroken")), progress=False)


def _meta(run: Path) -> dict:
    with safe_open(str(run / "checkpoint.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["pixelwise"])


def _curve(history: list[dict]) -> list[tuple]:
    return [(h["epoch"], h["train_loss"], h["lr"], h["val_score"]) for h in history]


# ---------------------------------------------------------------------------------------
# A changed config on resume


def test_more_epochs_continue_on_a_refit_schedule(tiny_data, tmp_path, unbroken, capsys) -> None:
    train(_config(tiny_data, tmp_path, epochs=2), progress=False)
    assert _meta(tmp_path)["history"][-1]["lr"] == 0.0  # the 2-epoch schedule ran out
    capsys.readouterr()
    result = train(_config(tiny_data, tmp_path, epochs=4), resume=True, progress=False)
    line = capsys.readouterr().out.strip()
    assert "epochs 2 -> 4" in line and "refit to 4 epochs" in line and "2 epoch(s) to train" in line
    assert len(line.splitlines()) == 1
    lrs = [h["lr"] for h in result["history"]]
    # poly(0.9) over 4 epochs x 2 steps, read after steps 6 and 8: the LR restarts from the new curve.
    assert lrs[2:] == pytest.approx([LR * (1 - 6 / 8) ** 0.9, 0.0], abs=1e-12)
    assert result["history"][2]["train_loss"] != unbroken["history"][2]["train_loss"]  # trained, on new LRs
    assert _meta(tmp_path)["epoch"] == 4 and _meta(tmp_path)["total_steps"] == 8


def test_resuming_a_finished_run_says_there_is_nothing_to_train(tiny_data, tmp_path, capsys) -> None:
    first = train(_config(tiny_data, tmp_path, epochs=1), progress=False)
    capsys.readouterr()
    again = train(_config(tiny_data, tmp_path, epochs=1, workers=0, val_every=2), resume=True, progress=False)
    assert "nothing to train: all 1 epochs are done" in capsys.readouterr().out
    assert _curve(again["history"]) == _curve(first["history"])


def test_resume_refuses_changes_that_make_another_run_naming_every_key(tiny_data, tmp_path) -> None:
    train(_config(tiny_data, tmp_path, epochs=1), progress=False)
    changed = _config(tiny_data, tmp_path, epochs=1, model_args={"base_channels": 8, "depth": 2}, lr=0.1)
    with pytest.raises(ValueError) as err:
        train(changed, resume=True, progress=False)
    message = str(err.value)
    assert "model_args={'base_channels': 4, 'depth': 2} in the checkpoint, {'base_channels': 8, 'depth': 2} now" in message
    assert "lr=0.05 in the checkpoint, 0.1 now" in message
    assert "start a new run" in message and "\n" not in message
    with pytest.raises(ValueError, match=r"model='unet' in the checkpoint, 'segnet_basic' now"):
        train(_config(tiny_data, tmp_path, epochs=1, model="segnet_basic", model_args={}), resume=True, progress=False)
    train(_config(tiny_data, tmp_path, epochs=2), resume=True, progress=False)  # 2 epochs done now
    with pytest.raises(ValueError, match="epochs=1 but the checkpoint has already trained 2 epochs"):
        train(_config(tiny_data, tmp_path, epochs=1), resume=True, progress=False)


def test_resume_refuses_other_classes(tmp_path) -> None:
    four = write_synthetic_dataset(tmp_path / "four", n_train=4, n_val=2, size=(32, 32), num_classes=4)
    five = write_synthetic_dataset(tmp_path / "five", n_train=4, n_val=2, size=(32, 32), num_classes=5)
    train(_config(four, tmp_path / "run", epochs=1), progress=False)
    with pytest.raises(ValueError, match="data class_names .* in the checkpoint"):
        train(_config(five, tmp_path / "run", epochs=1), resume=True, progress=False)


def test_resume_removes_stale_temp_files_and_rewrites_history_from_the_checkpoint(tiny_data, tmp_path) -> None:
    first = train(_config(tiny_data, tmp_path, epochs=1), progress=False)
    stale = [tmp_path / ".checkpoint.safetensors.k2j4x_.tmp", tmp_path / ".history.json.a1b2c3.tmp"]
    for path in stale:
        path.write_bytes(b"")  # what a kill -9 between mkstemp and the write leaves
    (tmp_path / "history.json").write_text("[]")  # lagging one epoch behind the checkpoint
    (tmp_path / ".keep.tmpl").write_text("not ours")
    train(_config(tiny_data, tmp_path, epochs=1), resume=True, progress=False)
    assert not any(p.exists() for p in stale) and (tmp_path / ".keep.tmpl").exists()
    assert _curve(json.loads((tmp_path / "history.json").read_text())) == _curve(first["history"])


def test_max_minutes_fits_the_schedule_and_extends_on_resume(tiny_data, tmp_path, monkeypatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(training, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    real_epoch = training._train_one_epoch

    def sixty_seconds(*args, **kwargs):
        clock[0] += 60.0
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(training, "_train_one_epoch", sixty_seconds)
    # 60 s epochs, 150 s budget: after epoch 1 one more fits (120 s), a third would end at 180 s.
    result = train(_config(tiny_data, tmp_path, epochs=10, max_minutes=2.5), progress=False)
    lrs = [h["lr"] for h in result["history"]]
    assert len(lrs) == 2
    assert lrs == pytest.approx([LR * (1 - 2 / 20) ** 0.9, 0.0], abs=1e-12)  # 10-epoch curve, then refit to 2
    # 4 minutes in all: 120 s already spent, two more 60 s epochs fit.
    resumed = train(_config(tiny_data, tmp_path, epochs=10, max_minutes=4.0), resume=True, progress=False)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4]
    assert resumed["history"][2]["lr"] == pytest.approx(LR * (1 - 6 / 8) ** 0.9, abs=1e-12)
    assert resumed["history"][3]["lr"] == 0.0


def test_a_budget_that_ends_the_run_between_validations_still_scores_the_last_epoch(tiny_data, tmp_path, monkeypatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(training, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    real_epoch = training._train_one_epoch

    durations = iter([60.0, 90.0])

    def slower_and_slower(*args, **kwargs):
        clock[0] += next(durations)
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(training, "_train_one_epoch", slower_and_slower)
    # 200 s budget, val_every=5: after epoch 1 (60 s) the plan is 3 epochs; epoch 2 takes 90 s,
    # so the budget ends the run after epoch 2, which is then validated and kept.
    result = train(_config(tiny_data, tmp_path, epochs=10, max_minutes=200 / 60, val_every=5), progress=False)
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert "val_score" not in result["history"][0] and "val_score" in result["history"][1]
    assert result["best"]["epoch"] == 2 and (tmp_path / "model_best.safetensors").is_file()


def test_resume_keeps_the_best_score_and_model(tiny_data, tmp_path, monkeypatch) -> None:
    from pixelwise.tasks.semantic import SemanticTask

    scores = iter([0.5, 0.9, 0.3])
    real_evaluate = SemanticTask.evaluate

    def scripted(self, model, dataset, **options):
        result = real_evaluate(self, model, dataset, **options)
        result.metrics["mean_iou"] = next(scores)
        return result

    monkeypatch.setattr(SemanticTask, "evaluate", scripted)
    train(_config(tiny_data, tmp_path, epochs=2), progress=False)
    best_bytes = (tmp_path / "model_best.safetensors").read_bytes()
    result = train(_config(tiny_data, tmp_path, epochs=3), resume=True, progress=False)
    assert result["best"] == {"epoch": 2, "score": 0.9}  # epoch 3 scored 0.3: not the best
    assert (tmp_path / "model_best.safetensors").read_bytes() == best_bytes


# ---------------------------------------------------------------------------------------
# kill -9 in a subprocess, then resume

CHILD = """
import json, sys, time
import safetensors.torch
import pixelwise.training as training

pause, resume, config = sys.argv[1], sys.argv[2] == "resume", json.loads(sys.argv[3])
if pause == "epoch-2":  # the kill lands after the first checkpoint, while epoch 2 trains
    real_epoch = training._train_one_epoch
    def epoch(*args, **kwargs):
        if args[-2] == 2:
            time.sleep(120)
        return real_epoch(*args, **kwargs)
    training._train_one_epoch = epoch
if pause == "checkpoint-3":  # the kill lands inside the atomic write of epoch 3's checkpoint
    real_save = safetensors.torch.save_file
    def save(tensors, filename, metadata=None):
        if metadata and json.loads(metadata["pixelwise"])["epoch"] == 3:
            time.sleep(120)  # the temp file exists, still empty
        return real_save(tensors, filename, metadata=metadata)
    safetensors.torch.save_file = save
training.train(training.TrainConfig(**config), resume=resume, progress=False)
"""


def _kill_when(config: TrainConfig, pause: str, resume: bool, ready) -> None:
    """Run training in a child process and ``kill -9`` it as soon as ``ready(run_dir)`` holds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [pause, "resume" if resume else "fresh", json.dumps(dataclasses.asdict(config))]
    child = subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    run, deadline = Path(config.out), time.monotonic() + 120
    try:
        while not ready(run):
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the child never reached the kill point"
            time.sleep(0.01)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL


def test_kill_9_then_resume_equals_an_unbroken_run(tiny_data, tmp_path, unbroken) -> None:
    config = _config(tiny_data, tmp_path)
    _kill_when(config, "epoch-2", False, lambda run: (run / "checkpoint.safetensors").is_file())
    assert _meta(tmp_path)["epoch"] == 1

    def writing_checkpoint_3(run: Path) -> bool:
        # The meta first: once it reads 2, epoch 2's temp file is renamed, so a temp file is epoch 3's.
        return _meta(run)["epoch"] == 2 and any(run.glob(".checkpoint.safetensors.*.tmp"))

    _kill_when(config, "checkpoint-3", True, writing_checkpoint_3)
    assert [p.stat().st_size for p in tmp_path.glob(".checkpoint.safetensors.*.tmp")] == [0]
    assert _meta(tmp_path)["epoch"] == 2  # the old checkpoint is intact
    resumed = train(config, resume=True, progress=False)
    assert _curve(resumed["history"]) == _curve(unbroken["history"])
    assert _curve(json.loads((tmp_path / "history.json").read_text())) == _curve(unbroken["history"])
    assert not list(tmp_path.glob(".*.tmp"))
    a = load_file(Path(unbroken["run_dir"]) / "model_last.safetensors")
    b = load_file(tmp_path / "model_last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------
# Weight average (EMA)


def test_weight_average_follows_the_warmed_up_decay_by_hand() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    ema = training.WeightAverage(model, decay=0.5)
    for value in (3.0, 5.0):
        with torch.no_grad():
            model[0].weight.fill_(value)
        model[1].num_batches_tracked += 7
        ema.update(model)
    # d_1 = min(0.5, 2/11) = 2/11, d_2 = min(0.5, 3/12) = 1/4
    first = 2 / 11 * 1.0 + 9 / 11 * 3.0
    assert ema.module[0].weight.item() == pytest.approx(0.25 * first + 0.75 * 5.0)
    assert ema.module[1].num_batches_tracked.item() == 14  # integer buffers are copied, not averaged
    assert not ema.module[0].weight.requires_grad and not ema.module.training


def test_ema_run_saves_the_average_and_refuses_to_resume_without_it(tiny_data, tmp_path) -> None:
    train(_config(tiny_data, tmp_path, ema_decay=0.9), progress=False)
    with safe_open(str(tmp_path / "checkpoint.safetensors"), framework="pt") as f:
        raw = {k[6:]: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}
        average = {k[4:]: f.get_tensor(k) for k in f.keys() if k.startswith("ema.")}
    assert _meta(tmp_path)["ema_updates"] == 6  # 3 epochs x 2 steps
    last = load_file(tmp_path / "model_last.safetensors")
    assert all(torch.equal(last[k], average[k]) for k in last)  # model_last holds the average ...
    assert not all(torch.equal(average[k], raw[k]) for k in raw)  # ... not the weights the optimiser stepped
    with pytest.raises(ValueError, match=r"ema_decay=0.9 in the checkpoint, None now"):
        train(_config(tiny_data, tmp_path, epochs=4), resume=True, progress=False)


def test_resume_reads_a_key_missing_from_an_older_checkpoint_as_its_default(tiny_data, tmp_path, monkeypatch) -> None:
    train(_config(tiny_data, tmp_path, epochs=1), progress=False)
    meta = _meta(tmp_path)
    del meta["config"]["ema_decay"]  # as written before the key existed
    real_read = training._read_checkpoint_meta
    monkeypatch.setattr(training, "_read_checkpoint_meta", lambda path: meta if path == tmp_path / "checkpoint.safetensors" else real_read(path))
    with pytest.raises(ValueError, match=r"ema_decay=None in the checkpoint, 0.99 now"):
        train(_config(tiny_data, tmp_path, epochs=2, ema_decay=0.99), resume=True, progress=False)
    assert len(train(_config(tiny_data, tmp_path, epochs=2), resume=True, progress=False)["history"]) == 2
