"""Training from scribbles: the scribble folder and its check, and the ``scribbles`` task."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pixelwise.cli import app
from pixelwise.data import write_synthetic_dataset
from pixelwise.data.scribbles import check_scribbles, open_scribbles, write_scribble_dataset
from pixelwise.io import read_mask
from pixelwise.weak import simulate_scribbles


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("scr") / "shapes", n_train=8, n_val=4, size=(48, 64))


def _scribble_folder(root: Path, scribble_maps: dict[str, np.ndarray]) -> Path:
    for sub in ("images", "scribbles"):
        (root / "train" / sub).mkdir(parents=True)
    for name, scr in scribble_maps.items():
        Image.fromarray(np.zeros((*scr.shape, 3), np.uint8)).save(root / "train" / "images" / f"{name}.png")
        Image.fromarray(scr.astype(np.uint8)).save(root / "train" / "scribbles" / f"{name}.png")
    classes = [{"name": n, "color": c} for n, c in (("sky", [0, 0, 255]), ("road", [128, 64, 128]), ("car", [255, 0, 0]))]
    (root / "classes.json").write_text(json.dumps({"classes": classes, "ignore_index": 255}))
    return root


def test_check_scribbles_counts_labelled_fraction_per_image_and_class(tmp_path):
    a = np.full((10, 10), 255)
    a[0, :5] = 0   # 5 px sky
    a[5, :3] = 1   # 3 px road
    b = np.full((10, 20), 255)
    b[2, :8] = 0   # 8 px sky
    root = _scribble_folder(tmp_path, {"a": a, "b": b})
    report = check_scribbles(open_scribbles(root, "train"))
    assert report.fractions == {"a.png": pytest.approx(0.08), "b.png": pytest.approx(0.04)}
    assert report.class_pixels == [13, 3, 0] and report.class_images == [2, 1, 0]
    assert report.ok and report.total_pixels == 300
    text = report.format()
    assert "labelled fraction 5.33% of all pixels" in text and "(never scribbled)" in text


def test_check_data_cli_reports_scribbles_and_fails_on_an_unscribbled_image(tmp_path):
    a = np.full((6, 6), 255)
    a[1, 1:4] = 2
    root = _scribble_folder(tmp_path, {"a": a, "empty": np.full((6, 6), 255)})
    result = CliRunner().invoke(app, ["check-data", str(root), "--split", "train"])
    assert result.exit_code == 2
    assert "no scribbled pixel" in result.output and "empty.png" in result.output
    assert "8.33%" in result.output  # a.png: 3 of 36 pixels


def test_write_scribble_dataset_round_trips_simulated_strokes(shapes, tmp_path):
    root = write_scribble_dataset(shapes, tmp_path / "scr", density=0.4, seed=3)
    train = open_scribbles(root, "train")
    assert len(train) == 8 and train.dense is not None and train.num_classes == 4
    for i in (0, 5):
        truth = read_mask(shapes / "train" / "masks" / f"{i:04d}.png")
        expected = simulate_scribbles(truth, 255, 0.4, 3, 0, np.random.default_rng([3, i]))
        assert (train.read_pair(i)[1] == expected).all()
        assert (train.true_mask(i) == truth).all()
    with pytest.raises(ValueError, match="already exists"):
        write_scribble_dataset(shapes, root)


# ---------------------------------------------------------------- the task


def _config(data, out, method, **task_args):
    from pixelwise.training import TrainConfig

    return TrainConfig(data=str(data), out=str(out), model="unet", model_args={"base_channels": 4, "depth": 2},
                       epochs=2, batch_size=4, lr=0.01, threads=1, task="scribbles",
                       task_args={"method": method, **task_args})


@pytest.mark.parametrize("task_args, match", [({"method": "boxes"}, "method"), ({"rounds": 0}, "rounds"),
                                              ({"first_round": "masks"}, "first_round"),
                                              ({"stroke_weight": -1}, "stroke_weight"),
                                              ({"min_confidence": 2}, "min_confidence"),
                                              ({"colour": 1}, "unknown task_args colour")])
def test_scribble_task_rejects_bad_options(task_args, match):
    from pixelwise.tasks.scribbles import scribble_options

    with pytest.raises(ValueError, match=match):
        scribble_options(task_args)


def test_scribble_task_refuses_semantic_loss_options(shapes, tmp_path):
    from pixelwise.training import train

    cfg = _config(shapes, tmp_path, "partial_ce")
    cfg.loss = "dice"
    with pytest.raises(ValueError, match="picks its loss from task_args.method"):
        train(cfg, progress=False)
    cfg = _config(shapes, tmp_path, "partial_ce")
    cfg.class_weights = "median_frequency"  # only ScribbleSup's dense labels have a class balance to weigh
    with pytest.raises(ValueError, match="class_weights= unless the method is scribblesup"):
        train(cfg, progress=False)
    assert not (tmp_path / "checkpoint.safetensors").exists()


def test_regularized_method_adds_the_crf_term_on_unnormalised_images(shapes, tmp_path):
    from pixelwise.models import create_model
    from pixelwise.tasks import get_task
    from pixelwise.weak.regularized import RegularizedLoss

    cfg = _config(shapes, tmp_path, "regularized", reg_weight=0.3)
    cfg.mean, cfg.std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    task = get_task("scribbles")
    train_set, _ = task.datasets(cfg)
    torch.manual_seed(0)
    model = create_model("unet", num_classes=4, base_channels=4, depth=2)
    task.setup(cfg, train_set, model, torch.device("cpu"))
    batch = task.collate([train_set[0], train_set[1]])
    images, targets, _ = batch
    assert (targets != 255).float().mean() < 0.5  # trained on strokes, not masks
    units = images * torch.tensor(cfg.std).view(1, 3, 1, 1) + torch.tensor(cfg.mean).view(1, 3, 1, 1)
    expected = RegularizedLoss(weight=0.3)(model(images), targets, units)
    assert task.loss(task.train_module(model), batch, torch.device("cpu")).item() == pytest.approx(expected.item(), rel=1e-5)


def test_scribblesup_rounds_propagate_score_and_report(shapes, tmp_path):
    from pixelwise.metrics import ConfusionMatrix
    from pixelwise.training import train, write_run_report
    from pixelwise.weak import build_superpixel_graph, propagate_labels

    cfg = _config(shapes, tmp_path / "run", "scribblesup", rounds=2, superpixel_size=30, density=0.5,
                  first_round="appearance", stroke_weight=0.0)  # the paper's form
    result = train(cfg, progress=False)
    metrics = write_run_report(result["run_dir"], cfg, result["history"])
    rounds = json.loads((tmp_path / "run" / "propagation.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2] and [r["round"] for r in metrics["propagation"]] == [1, 2]
    # Round 1 is the graph cut of the simulated strokes with appearance unaries: recompute it independently.
    cm = ConfusionMatrix(4, 255)
    for i in range(8):
        image = np.asarray(Image.open(shapes / "train" / "images" / f"{i:04d}.png"))
        truth = read_mask(shapes / "train" / "masks" / f"{i:04d}.png")
        scr = simulate_scribbles(truth, 255, 0.5, 3, 0, np.random.default_rng([0, i]))
        expected = propagate_labels(build_superpixel_graph(image, 30), scr, 4, 255)
        written = read_mask(tmp_path / "run" / "propagation" / "round1" / f"{i:04d}.png")
        assert (written == expected).all()
        cm.update(torch.from_numpy(expected)[None], torch.from_numpy(truth)[None])
    assert rounds[0]["mean_iou"] == pytest.approx(cm.compute()["mean_iou"])
    assert rounds[0]["mean_iou"] > 0.8  # strokes on ~6% of pixels propagate to most of each shape
    assert 0 < rounds[0]["labelled_fraction"] < 0.2
    grid = Image.open(tmp_path / "run" / "propagation_round2.png")
    assert grid.size == (3 * 64 + 2 * 4, 4 * 48 + 3 * 4)  # image | scribbles | labels, 4 training images


def test_scribblesup_first_round_on_the_strokes_then_class_weights_of_each_rounds_labels(shapes, tmp_path):
    from pixelwise.losses import class_pixel_counts, median_frequency_weights
    from pixelwise.models import create_model
    from pixelwise.tasks import get_task

    cfg = _config(shapes, tmp_path, "scribblesup", rounds=2, first_round="scribbles", superpixel_size=30)
    cfg.class_weights = "median_frequency"
    task = get_task("scribbles")
    train_set, _ = task.datasets(cfg)
    model = create_model("unet", num_classes=4, base_channels=4, depth=2)
    task.setup(cfg, train_set, model, torch.device("cpu"))
    strokes = [train_set.read_pair(i)[1] for i in range(len(train_set))]

    def weights_of(labels):
        return median_frequency_weights(*class_pixel_counts(labels, 4, 255))

    task.start_epoch(1, model, train_set)  # round 1 (epoch 1 of 2): the strokes alone
    assert train_set.labels is None and (task.collate([train_set[0]])[1] != 255).float().mean() < 0.3
    assert torch.allclose(task.criterion.labels_loss.weight, weights_of(strokes))
    task.start_epoch(2, model, train_set)  # round 2: propagated with the network's predictions
    assert len(train_set.labels) == 8 and all((y != 255).all() for y in train_set.labels)
    assert torch.allclose(task.criterion.labels_loss.weight, weights_of(train_set.labels))
    assert not torch.allclose(weights_of(strokes), weights_of(train_set.labels))
    rounds = json.loads((tmp_path / "propagation.json").read_text())
    assert [(r["round"], r["propagated"], "mean_iou" in r) for r in rounds] == [(1, False, False), (2, True, True)]
    assert not (tmp_path / "propagation" / "round1").exists() and len(list((tmp_path / "propagation" / "round2").iterdir())) == 8


def test_scribblesup_stroke_weight_packs_strokes_and_adds_their_partial_ce(shapes, tmp_path):
    import torch.nn.functional as F

    from pixelwise.data import eval_transform
    from pixelwise.data.scribbles import STROKE_OFFSET
    from pixelwise.models import create_model
    from pixelwise.tasks import get_task
    from pixelwise.tasks.scribbles import LabelsAndStrokesLoss

    # The loss on a hand-made target: class 1 stroked at (0, 0), propagated labels elsewhere, one pixel unlabelled.
    logits = torch.randn(1, 3, 2, 2)
    packed = torch.tensor([[[STROKE_OFFSET + 1, 2], [0, 255]]])
    ce = F.cross_entropy(logits, torch.tensor([[[1, 2], [0, 255]]]), reduction="none", ignore_index=255)[0]
    expected = (ce[0, 0] + ce[0, 1] + ce[1, 0]) / 3 + 0.5 * ce[0, 0]
    assert LabelsAndStrokesLoss(0.5, 255)(logits, packed).item() == pytest.approx(expected.item(), rel=1e-6)

    cfg = _config(shapes, tmp_path, "scribblesup", rounds=2, first_round="scribbles", superpixel_size=30, stroke_weight=0.5)
    task = get_task("scribbles")
    train_set, _ = task.datasets(cfg)
    train_set.transform = eval_transform()  # no random flips: compare pixel for pixel
    model = create_model("unet", num_classes=4, base_channels=4, depth=2)
    task.setup(cfg, train_set, model, torch.device("cpu"))
    task.start_epoch(1, model, train_set)  # round 1: the strokes alone, nothing packed
    strokes = train_set.read_pair(0)[1]
    assert (train_set[0][1].numpy() == strokes).all()
    task.start_epoch(2, model, train_set)  # round 2: propagated labels, strokes packed over them
    target, marked = train_set[0][1].numpy(), strokes != 255
    assert (target[marked] == STROKE_OFFSET + strokes[marked]).all()
    assert (target[~marked] == train_set.labels[0][~marked]).all() and (target[~marked] < 4).all()
    assert isinstance(task.criterion, LabelsAndStrokesLoss) and task.criterion.stroke_weight == 0.5


def test_scribblesup_time_budget_rounds_follow_the_trained_seconds_so_a_resumed_run_keeps_its_round(shapes, tmp_path):
    from pixelwise.models import create_model
    from pixelwise.tasks import get_task

    cfg = _config(shapes, tmp_path, "scribblesup", rounds=3, superpixel_size=30)
    cfg.max_minutes = 1.0  # 20 s per round
    task = get_task("scribbles")
    train_set, _ = task.datasets(cfg)
    model = create_model("unet", num_classes=4, base_channels=4, depth=2)
    task.setup(cfg, train_set, model, torch.device("cpu"))
    task.start_epoch(7, model, train_set, trained_seconds=45.0)  # e.g. the first epoch after --resume
    assert task.round == 3 and [r["round"] for r in json.loads((tmp_path / "propagation.json").read_text())] == [3]
    task.start_epoch(8, model, train_set, trained_seconds=59.0)  # same round: no new propagation
    assert task.round == 3 and not (tmp_path / "propagation" / "round2").exists()


def test_scribblesup_min_confidence_leaves_unsure_superpixels_unlabelled_and_scores_the_rest(shapes, tmp_path):
    from pixelwise.models import create_model
    from pixelwise.tasks import get_task

    def round_one(min_confidence):
        cfg = _config(shapes, tmp_path / str(min_confidence), "scribblesup", rounds=2, superpixel_size=30,
                      first_round="appearance", min_confidence=min_confidence)
        task = get_task("scribbles")
        train_set, _ = task.datasets(cfg)
        model = create_model("unet", num_classes=4, base_channels=4, depth=2)
        task.setup(cfg, train_set, model, torch.device("cpu"))
        return task.propagate(1, model, train_set), train_set

    every, _ = round_one(0.0)
    sure, train_set = round_one(0.9)
    assert every["propagated_fraction"] == 1.0 and sure["labelled_fraction"] < sure["propagated_fraction"] < 1.0
    strokes = [train_set.read_pair(i)[1] for i in range(len(train_set))]
    assert all((y[s != 255] != 255).all() for y, s in zip(train_set.labels, strokes))  # scribbled superpixels stay labelled
    assert sure["mean_iou"] > every["mean_iou"]  # the confident part is the more accurate


def test_scribblesup_resumed_round_keeps_its_first_epoch_and_a_fresh_run_clears_stale_rounds(shapes, tmp_path):
    from pixelwise.models import create_model
    from pixelwise.tasks import get_task

    cfg = _config(shapes, tmp_path, "scribblesup", rounds=2, superpixel_size=30)
    cfg.epochs = 4  # round 2 starts at epoch 3

    def started_task():
        task = get_task("scribbles")
        train_set, _ = task.datasets(cfg)
        model = create_model("unet", num_classes=4, base_channels=4, depth=2)
        task.setup(cfg, train_set, model, torch.device("cpu"))
        return task, model, train_set

    def recorded():
        return [(r["round"], r["epoch"]) for r in json.loads((tmp_path / "propagation.json").read_text())]

    task, model, train_set = started_task()
    for epoch in (1, 2, 3):
        task.start_epoch(epoch, model, train_set)
    assert recorded() == [(1, 1), (2, 3)]
    task, model, train_set = started_task()  # --resume after epoch 3: round 2 is propagated again at epoch 4
    task.start_epoch(4, model, train_set)
    assert task.round == 2 and recorded() == [(1, 1), (2, 3)]
    task, model, train_set = started_task()  # a new run in the same folder
    task.start_epoch(1, model, train_set)
    assert recorded() == [(1, 1)] and not (tmp_path / "propagation" / "round2").exists()
