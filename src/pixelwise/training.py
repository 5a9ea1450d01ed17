"""One training loop: SGD/AdamW, poly LR, bf16 autocast, gradient accumulation, EMA of weights, DDP, resume.

Example:
    >>> from pixelwise.training import TrainConfig, train
    >>> result = train(TrainConfig(data="camvid:../shared/data/camvid", model="segnet_basic", epochs=1))

A run folder holds ``checkpoint.safetensors`` (everything needed to resume, written
atomically at the end of every epoch), ``model_best`` / ``model_last`` (weights +
JSON, for ``eval`` / ``predict``), ``history.json`` and the report written by the CLI.
Under ``torchrun`` the loop runs distributed (gloo on CPU, nccl on GPU); only rank 0
writes files.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pixelwise.config import check_field_types, load_yaml
from pixelwise.io import atomic_write, atomic_write_text, remove_stale_temp_files
from pixelwise.models import create_model, load_model, save_model
from pixelwise.models.registry import model_kind, spatial_dims
from pixelwise.report import plot_history
from pixelwise.tasks import Task, get_task


@dataclass
class TrainConfig:
    """Everything a run needs; a YAML file holds the same keys (see ``configs/``).

    ``data`` is a dataset spec for :func:`pixelwise.data.open_dataset` (``camvid:PATH``,
    ``isbi2012:PATH``, ``voc:PATH``, ``cityscapes:PATH`` or a folder). ``task`` names a
    :mod:`pixelwise.tasks` entry: ``semantic``, or ``edges`` to train an edge detector (HED)
    on the class boundaries of the label maps; ``task_args`` are that task's own options
    (e.g. ``task=scribbles task_args.method=scribblesup task_args.rounds=3``).
    ``val_scales`` are the test-time scales of validation (e.g. ``[0.5]`` for a model
    trained on half-size crops); ``max_minutes`` fits the poly schedule after every epoch
    so that training ends within the budget (the epochs of a resumed run's earlier parts
    count). ``val_fraction`` is the share of a plain folder (images/ + masks/, no train/
    and val/) held out for validation. ``ema_decay`` (e.g. 0.999) keeps an exponential
    moving average of the weights (:class:`WeightAverage`), which is then what is validated,
    saved as ``model_best`` / ``model_last`` and handed to the task (e.g. for ScribbleSup's
    propagation); the optimiser still steps the raw weights, kept in the checkpoint.
    ``bf16`` autocasts forward and loss to bfloat16; it pays only where bfloat16 is native
    (:func:`native_bf16`): elsewhere training warns, since it runs many times slower.
    """

    data: str
    out: str = "runs/train"
    model: str = "unet"
    model_args: dict[str, Any] = field(default_factory=dict)
    task: str = "semantic"
    task_args: dict[str, Any] = field(default_factory=dict)
    train_split: str = "train"
    val_split: str = "val"
    epochs: int = 10
    max_minutes: float | None = None
    batch_size: int = 8
    accumulate: int = 1
    crop_size: list[int] | None = None
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    hflip: bool = True
    color_jitter: float = 0.2
    elastic: bool | str = False
    mean: list[float] | None = None
    std: list[float] | None = None
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    loss: str = "ce"
    class_weights: str | list[float] | None = None
    unet_weight_map: bool = False
    bf16: bool = False
    channels_last: bool = False
    workers: int = 0
    seed: int = 0
    val_every: int = 1
    val_scales: list[float] = field(default_factory=lambda: [1.0])
    threads: int | None = None
    val_fraction: float = 0.2
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.scale_range is not None and len(self.scale_range) != 2:
            raise ValueError(f"scale_range={self.scale_range!r} must hold two numbers, e.g. [0.5, 2.0]")
        dims = spatial_dims(self.model)  # also rejects an unknown model name
        if self.crop_size is not None and len(self.crop_size) != dims:
            example = "[256, 256]" if dims == 2 else "[16, 64, 64] (depth, height, width)"
            count = {2: "two", 3: "three"}[dims]
            raise ValueError(f"crop_size={self.crop_size!r} must hold {count} numbers for {self.model}, e.g. {example}")
        get_task(self.task)
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer={self.optimizer!r}: use 'sgd' or 'adamw'")
        for name in ("epochs", "batch_size", "accumulate", "val_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a whole number >= 1")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay={self.ema_decay!r} must be in (0, 1), e.g. 0.999 (or null: no weight average)")


RESUME_MAY_CHANGE = ("epochs", "max_minutes", "out", "data", "val_split", "val_every", "val_scales", "workers", "threads",
                     "channels_last")
"""Config keys that may differ from the checkpoint's on ``--resume``: the run's length (the
poly LR schedule is refit to a new ``epochs`` / ``max_minutes``), where the data lives (its
classes and steps per epoch must not change), how validation and workers run, and the
memory layout (``channels_last`` gives the same losses within rounding). Every
other key shapes the weights' trajectory (model, task, optimiser and its LR, batches, loss,
augmentation, seed), so a resumed run would match no unbroken run: those are refused, and
a changed model, model_args or class list would not even load the checkpoint."""


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML config and apply ``key=value`` overrides (``model_args.backbone=resnet50``).

    Values are parsed as YAML (``epochs=3`` is an int, ``crop_size=[256,256]`` a list).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist; pass a YAML file like configs/camvid.yaml")
        try:
            raw = load_yaml(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping of keys to values")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value, e.g. epochs=5")
        target = raw
        *parents, leaf = key.split(".")
        for p in parents:
            target = target.setdefault(p, {})
        target[leaf] = load_yaml(value)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
    if raw.get("data") in (None, ""):
        raise ValueError("the config needs a 'data' value (e.g. data=camvid:../shared/data/camvid or a folder path)")
    return TrainConfig(**raw)


# ---------------------------------------------------------------------------------------
# Distributed helpers


def _init_distributed() -> tuple[int, int, torch.device, bool]:
    """Join the process group when launched by torchrun.

    Returns (rank, world_size, device, joined): ``joined`` when this call created the group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    joined = world > 1 and not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device, joined


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 autocast runs natively on ``device``: a GPU, or a CPU with AVX512-BF16 or AMX.

    Elsewhere PyTorch emulates it: on a 2-core AVX2 EPYC, U-Net trained at 0.05x the samples/s
    of float32 (``benchmarks/train_speed.py --configs eager bf16``), against 1.7x on a CPU with AMX.
    """
    if device.type != "cpu":
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _seed_everything(seed: int, dataset: Dataset) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    transform = getattr(dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


# ---------------------------------------------------------------------------------------
# Checkpoints: one safetensors file with model and optimiser tensors + JSON metadata


class WeightAverage:
    """Exponential moving average of a model's weights and buffers (Polyak averaging).

    After optimiser step t, every floating-point tensor of the state dict moves as
    ``ema = d_t * ema + (1 - d_t) * w`` with ``d_t = min(decay, (1 + t) / (10 + t))``: the
    warm-up of TensorFlow's ``ExponentialMovingAverage(num_updates=...)``, so that a short
    run is not dominated by its first weights. Integer buffers (BN's batch count) are copied.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema, value in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema.dtype.is_floating_point:
                ema.lerp_(value, 1 - d)
            else:
                ema.copy_(value)


def _save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
                     ema: WeightAverage | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().contiguous().cpu() for k, v in ema.module.state_dict().items()})
        meta = {**meta, "ema_updates": ema.updates}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for name, value in state.items():
            if value is not None:
                tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value).detach().contiguous().cpu()
    meta = {**meta, "param_groups": opt["param_groups"]}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"pixelwise": json.dumps(meta)}))


def _read_checkpoint_meta(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["pixelwise"])
    except Exception as err:  # safetensors raises several types for damaged files
        raise ValueError(f"cannot resume: {str(path)!r} is not a pixelwise checkpoint ({err}); train without --resume") from err


def _check_resumable(path: Path, meta: dict[str, Any], cfg: TrainConfig, extra: dict[str, Any], steps_per_epoch: int) -> None:
    """Refuse to resume when ``cfg`` differs from the checkpoint's config outside :data:`RESUME_MAY_CHANGE`,
    when the data's classes changed, or when an epoch no longer has the same number of optimiser steps."""
    # A key the checkpoint lacks (written before the key existed) had its default then.
    defaults = dataclasses.asdict(TrainConfig(data=cfg.data, model=cfg.model, task=cfg.task))
    saved, now = {**defaults, **meta["config"]}, dataclasses.asdict(cfg)
    differ = [f"{key}={saved[key]!r} in the checkpoint, {now[key]!r} now"
              for key in now if key not in RESUME_MAY_CHANGE and saved[key] != now[key]]
    for key in ("class_names", "task"):
        if key in meta.get("extra", {}) and meta["extra"][key] != extra.get(key):
            differ.append(f"data {key} {meta['extra'][key]!r} in the checkpoint, {extra.get(key)!r} now")
    saved_steps = meta["scheduler"]["last_epoch"] // max(meta["epoch"], 1)
    if saved_steps != steps_per_epoch:
        differ.append(f"{saved_steps} optimiser steps per epoch in the checkpoint, {steps_per_epoch} now "
                      "(training samples, processes or batch size changed)")
    if differ:
        raise ValueError(
            f"cannot resume from {str(path)!r}: {'; '.join(differ)}. Only {', '.join(RESUME_MAY_CHANGE)} may change "
            "on resume; to train with other settings, start a new run (another out=)"
        )


def _refit_length(schedule: dict[str, int], saved: dict[str, Any], cfg: TrainConfig, steps_per_epoch: int, done: int,
                  history: list[dict[str, Any]]) -> str | None:
    """Refit the poly schedule when ``epochs`` or ``max_minutes`` changed on resume; returns what changed, or None.

    The schedule is then ``epochs`` long (fitted to the time budget as after every epoch), so
    the LR continues from the step reached along the new, longer or shorter, poly curve.
    """
    changes = [f"{key} {saved.get(key)} -> {getattr(cfg, key)}" for key in ("epochs", "max_minutes")
               if saved.get(key) != getattr(cfg, key)]
    if not changes:
        return None
    if cfg.epochs < done:
        raise ValueError(f"epochs={cfg.epochs} but the checkpoint has already trained {done} epochs; "
                         f"pass epochs > {done} to train longer")
    schedule["total_steps"] = cfg.epochs * steps_per_epoch
    if cfg.max_minutes is not None and done:
        elapsed = sum(record["seconds"] for record in history)
        _fit_time_budget(schedule, cfg, steps_per_epoch, done, elapsed / done, elapsed)
    return f"{', '.join(changes)}, poly LR schedule refit to {schedule['total_steps'] // steps_per_epoch} epochs"


def _load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: WeightAverage | None) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["pixelwise"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema.module.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        ema.updates = meta["ema_updates"]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    return meta


# ---------------------------------------------------------------------------------------


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.data``; returns ``{"history", "best", "run_dir", "rank", ...}``.

    With ``resume=True`` training continues from ``cfg.out/checkpoint.safetensors``
    exactly where the last finished epoch left it (weights, optimiser state, LR step; the
    data order and augmentation are seeded per epoch, so the run matches an unbroken one).
    ``cfg`` may differ from the checkpoint's config only in :data:`RESUME_MAY_CHANGE`; a new
    ``epochs`` or ``max_minutes`` refits the LR schedule to the new length.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, device, joined = _init_distributed()
    run_dir = Path(cfg.out)
    ckpt_path = run_dir / "checkpoint.safetensors"
    if resume and not ckpt_path.is_file():
        raise ValueError(f"cannot resume: {str(ckpt_path)!r} does not exist; train without --resume first")

    task = get_task(cfg.task)
    train_set, val_set = task.datasets(cfg)
    in_channels = train_set[0][0].shape[0]

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=task.output_channels(train_set), in_channels=in_channels, **cfg.model_args)
    model = model.to(device)
    if cfg.channels_last:  # NHWC convolutions: 1.2-1.4x samples/s for U-Net, SegNet, FC-DenseNet (benchmarks/train_speed.py)
        if model_kind(cfg.model) != "dense" or spatial_dims(cfg.model) != 2:
            raise ValueError(f"channels_last=true applies to 2D dense models; {cfg.model!r} is not one: drop channels_last")
        model = model.to(memory_format=torch.channels_last)
    task.setup(cfg, train_set, model, device)
    if cfg.bf16 and not native_bf16(device) and rank == 0:
        print("warning: bf16=true on a CPU without AVX512-BF16 or AMX: bfloat16 is emulated and trains many times "
              "slower than float32 (0.05x for U-Net on an AVX2 CPU); set bf16=false", flush=True)
    ema = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None
    scored = ema.module if ema else model  # the weights that are validated, saved and handed to the task
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    per_rank = len(train_set) // world  # equal on every rank, so DDP ranks step together
    if per_rank < 1:
        raise ValueError(f"the training split of {cfg.data!r} has {len(train_set)} samples, fewer than {world} processes")
    drop_last = per_rank >= cfg.batch_size
    batches = per_rank // cfg.batch_size if drop_last else 1
    steps_per_epoch = math.ceil(batches / cfg.accumulate)
    schedule = {"total_steps": cfg.epochs * steps_per_epoch}

    def poly(step: int) -> float:
        return max(0.0, 1 - step / schedule["total_steps"]) ** cfg.poly_power

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly)
    extra = {**task.model_extra(train_set, cfg), "task": cfg.task}
    start_epoch, history, best = 1, [], None
    if resume:
        meta = _read_checkpoint_meta(ckpt_path)
        _check_resumable(ckpt_path, meta, cfg, extra, steps_per_epoch)
        _load_checkpoint(ckpt_path, model, optimizer, ema)
        scheduler.load_state_dict(meta["scheduler"])
        schedule["total_steps"] = meta["total_steps"]
        start_epoch, history, best = meta["epoch"] + 1, meta["history"], meta["best"]
        if rank == 0:
            remove_stale_temp_files(run_dir)  # a kill mid-write leaves the atomic writer's temp files
            atomic_write_text(run_dir / "history.json", json.dumps(history, indent=2))  # the checkpoint is the truth
        note = _refit_length(schedule, meta["config"], cfg, steps_per_epoch, meta["epoch"], history)
        if note:
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base * poly(scheduler.last_epoch)
        done = meta["epoch"]
        if rank == 0:
            remaining = math.ceil(schedule["total_steps"] / steps_per_epoch) - done
            print(f"resuming {run_dir} after epoch {done}: {note or 'same schedule'}; "
                  + (f"{remaining} epoch(s) to train" if remaining > 0 else
                     f"nothing to train: all {done} epochs are done (raise epochs= or max_minutes= to train longer)"),
                  flush=True)

    module = task.train_module(model)
    if world > 1:
        module = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    trained_before = sum(record["seconds"] for record in history)  # max_minutes counts the whole run
    started = time.monotonic()
    total_epochs = math.ceil(schedule["total_steps"] / steps_per_epoch)
    epoch = start_epoch
    while epoch <= total_epochs:
        epoch_start = time.monotonic()
        _seed_everything(cfg.seed * 1000 + epoch * 10 + rank, train_set)
        task.start_epoch(epoch, scored, train_set, trained_before + epoch_start - started)
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        mine = order[rank::world][:per_rank].tolist()
        loader = DataLoader(
            torch.utils.data.Subset(train_set, mine),
            batch_size=cfg.batch_size,
            collate_fn=task.collate,
            num_workers=cfg.workers,
            generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch * 10 + rank),
            drop_last=drop_last,
        )
        train_loss = _train_one_epoch(task, module, loader, optimizer, scheduler, cfg, device, rank, progress, epoch, total_epochs,
                                      after_step=(lambda: ema.update(model)) if ema else None)
        record: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"]}

        def validate() -> None:
            nonlocal best
            metrics = task.evaluate(
                scored, val_set, device=device, scales=tuple(cfg.val_scales), rank=rank, world_size=world,
                progress=progress and rank == 0,
            ).metrics
            score = metrics[task.score_key]
            record.update({"val_score": score, **{f"val_{k}": v for k, v in metrics.items() if isinstance(v, float)}})
            if rank == 0 and (best is None or score > best["score"]):
                best = {"epoch": epoch, "score": score}
                save_model(scored, run_dir / "model_best", extra)

        if epoch % cfg.val_every == 0 or epoch == total_epochs:
            validate()
        if cfg.max_minutes is not None:
            elapsed = trained_before + time.monotonic() - started
            _fit_time_budget(schedule, cfg, steps_per_epoch, epoch, elapsed / epoch, elapsed)
            if world > 1:  # every rank must run the same number of epochs: rank 0 decides
                total = torch.tensor([schedule["total_steps"]], device=device)
                dist.broadcast(total, 0)
                schedule["total_steps"] = int(total.item())
            total_epochs = math.ceil(schedule["total_steps"] / steps_per_epoch)
            if epoch == total_epochs and "val_score" not in record:  # the budget ends the run here: score it
                validate()
        record["seconds"] = time.monotonic() - epoch_start
        history.append(record)
        if rank == 0:
            save_model(scored, run_dir / "model_last", extra)
            meta = {"epoch": epoch, "history": history, "best": best, "scheduler": scheduler.state_dict(),
                    "total_steps": schedule["total_steps"], "config": dataclasses.asdict(cfg), "world_size": world,
                    "extra": extra}
            _save_checkpoint(ckpt_path, model, optimizer, meta, ema)
            atomic_write_text(run_dir / "history.json", json.dumps(history, indent=2))
        epoch += 1
    if world > 1:
        dist.barrier()
    if joined:
        dist.destroy_process_group()
    return {"history": history, "best": best, "run_dir": run_dir, "rank": rank, "world_size": world, "steps_per_epoch": steps_per_epoch}


def _fit_time_budget(schedule: dict[str, int], cfg: TrainConfig, steps_per_epoch: int, epoch: int, epoch_seconds: float, elapsed: float) -> None:
    """Set the poly schedule's length so that the run ends within ``cfg.max_minutes``.

    Called after every epoch with the mean epoch time so far; never beyond ``cfg.epochs``.
    """
    remaining = max(0.0, cfg.max_minutes * 60 - elapsed)
    fit = epoch + int(remaining // max(epoch_seconds, 1e-6))
    schedule["total_steps"] = min(cfg.epochs, max(epoch, fit)) * steps_per_epoch


def _train_one_epoch(
    task: Task,
    module: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainConfig,
    device: torch.device,
    rank: int,
    progress: bool,
    epoch: int,
    total_epochs: int,
    after_step: Callable[[], None] | None = None,
) -> float:
    """One pass over ``loader``; returns the mean loss per sample. ``after_step`` runs after every optimiser step."""
    from rich.progress import Progress

    module.train()
    total, count = 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    with Progress(transient=True, disable=not progress or rank != 0) as bar:
        bar_task = bar.add_task(f"epoch {epoch}/{total_epochs}", total=len(loader))
        for i, batch in enumerate(loader, 1):
            loss = task.loss(module, batch, device)
            (loss / cfg.accumulate).backward()
            if i % cfg.accumulate == 0 or i == len(loader):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if after_step is not None:
                    after_step()
            total += loss.item() * len(batch[0])
            count += len(batch[0])
            bar.update(bar_task, advance=1, description=f"epoch {epoch}/{total_epochs} loss {total / count:.4f}")
    return total / max(count, 1)


def write_run_report(run_dir: str | Path, cfg: TrainConfig, history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Report of a training run: ``history.png``, then the best model evaluated on the validation split.

    Loads ``run_dir/model_best.safetensors``, evaluates it on ``cfg.val_split`` of ``cfg.data``
    (GPU when available) with the run's task and writes the task's report into ``run_dir``
    (for the semantic task the files of :func:`pixelwise.report.write_eval_report`).

    Args:
        run_dir: The run folder written by :func:`pixelwise.training.train`.
        cfg: The run's :class:`TrainConfig` (``data``, ``val_split``,
            ``task``, ``mean``, ``std`` are used).
        history: Per-epoch records (see :func:`pixelwise.report.plot_history`).

    Returns:
        The validation metrics.
    """
    run_dir = Path(run_dir)
    plot_history(run_dir / "history.png", history)
    model, extra = load_model(run_dir / "model_best.safetensors")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    task = get_task(cfg.task)
    dataset = task.open_eval(cfg.data, cfg.val_split, {**extra, "mean": cfg.mean, "std": cfg.std})
    result = task.evaluate(
        model.to(device), dataset, device=device, scales=tuple(cfg.val_scales), mean=cfg.mean, std=cfg.std, keep_samples=4,
    )
    return task.write_report(run_dir, result, dataset)
