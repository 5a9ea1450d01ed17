"""The semantic task's loss (class weights, aux heads) and evaluation options against computations by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pixelwise.data import write_synthetic_dataset
from pixelwise.inference import predict
from pixelwise.tasks.semantic import SemanticTask
from pixelwise.training import TrainConfig


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "shapes", n_train=6, n_val=3, size=(32, 40))


class TwoHeads(nn.Module):
    """1x1 convolutions: a main and an aux head, with the aux weight the models declare."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.main, self.side = nn.Conv2d(3, num_classes, 1), nn.Conv2d(3, num_classes, 1)
        self.aux_weights = {"aux": 0.4}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)

    def forward_with_aux(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.main(x), "aux": self.side(x)}


def _task(data: Path, model: nn.Module, **cfg) -> tuple[SemanticTask, tuple]:
    config = TrainConfig(data=str(data), hflip=False, color_jitter=0.0, scale_range=[1.0, 1.0], **cfg)
    task = SemanticTask()
    train_set, _ = task.datasets(config)
    task.setup(config, train_set, model, torch.device("cpu"))
    batch = task.collate([train_set[i] for i in range(3)])
    return task, batch


def _ce(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean cross entropy over non-ignored pixels (255), by hand."""
    keep = labels != 255
    nll = -logits.log_softmax(1).gather(1, labels.clamp(max=logits.shape[1] - 1)[:, None])[:, 0][keep]
    w = torch.ones(()) if weight is None else weight[labels[keep]]
    return (w * nll).sum() / (w * torch.ones_like(nll)).sum()


def test_enet_class_weights_reach_the_loss_with_the_paper_values(tiny_data) -> None:
    model = TwoHeads()
    task, (images, labels, _) = _task(tiny_data, model, class_weights="enet")
    masks = [np.asarray(Image.open(p)) for p in sorted((tiny_data / "train" / "masks").glob("*.png"))]
    counts = np.bincount(np.concatenate([m.ravel() for m in masks]), minlength=4)[:4].astype(np.float64)
    expected = torch.tensor(1 / np.log(1.02 + counts / counts.sum()), dtype=torch.float32)  # Paszke et al. 2016
    with torch.no_grad():
        logits = model(images)
        torch.testing.assert_close(task.criterion(logits, labels), _ce(logits, labels, expected), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(_ce(logits, labels, expected), _ce(logits, labels), atol=1e-3)


def test_square_root_median_frequency_weights_by_hand(tiny_data) -> None:
    model = TwoHeads()
    task, (images, labels, _) = _task(tiny_data, model, class_weights="median_frequency_sqrt")
    masks = [np.asarray(Image.open(p)) for p in sorted((tiny_data / "train" / "masks").glob("*.png"))]
    counts = np.array([sum((m == c).sum() for m in masks) for c in range(4)], np.float64)
    present = np.array([sum(m.size for m in masks if (m == c).any()) for c in range(4)], np.float64)
    freq = counts / present
    expected = torch.tensor(np.sqrt(np.median(freq) / freq), dtype=torch.float32)  # sqrt of Eigen & Fergus 2015
    with torch.no_grad():
        logits = model(images)
        torch.testing.assert_close(task.criterion(logits, labels), _ce(logits, labels, expected), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(_ce(logits, labels, expected), _ce(logits, labels, expected**2), atol=1e-4)


def test_a_list_of_class_weights_reaches_the_loss_as_given(tiny_data) -> None:
    model = TwoHeads()
    task, (images, labels, _) = _task(tiny_data, model, class_weights=[0.5, 1.0, 2.0, 4.0])
    with torch.no_grad():
        logits = model(images)
        expected = _ce(logits, labels, torch.tensor([0.5, 1.0, 2.0, 4.0]))
        torch.testing.assert_close(task.criterion(logits, labels), expected, atol=1e-6, rtol=1e-6)


def test_aux_head_loss_is_weighted_by_the_models_aux_weights(tiny_data) -> None:
    model = TwoHeads()
    task, batch = _task(tiny_data, model)
    images, labels, _ = batch
    loss = task.loss(task.train_module(model), batch, torch.device("cpu"))
    with torch.no_grad():
        expected = _ce(model.main(images), labels) + 0.4 * _ce(model.side(images), labels)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("crf", [None, "deeplab_v2"])
def test_evaluate_applies_tile_flip_scales_and_crf(tiny_data, crf) -> None:
    from pixelwise.crf import dense_crf

    class LeftRight(nn.Module):  # not flip-equivariant, spatially varying: every option changes the result
        def forward(self, x):
            ramp = torch.linspace(-2, 2, x.shape[-1])
            return torch.stack([x[:, 0] * ramp, x[:, 1] - ramp, x[:, 2] + ramp.flip(0), -x[:, 0]], 1)

    model = LeftRight()
    task = SemanticTask()
    dataset = task.open_eval(str(tiny_data), "val", {})
    options = dict(tile=16, overlap=0.5, flip=True, scales=(1.0, 0.5), crf=crf)
    result = task.evaluate(model, dataset, **options)
    confusion = np.zeros((4, 4), np.int64)
    plain = np.zeros((4, 4), np.int64)
    for i in range(len(dataset)):
        image, mask = dataset[i]
        probs = predict(model, image[None], tile=16, overlap=0.5, flip=True, scales=(1.0, 0.5))[0]
        if crf:
            rgb = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            probs = torch.from_numpy(dense_crf(rgb, probs.numpy(), preset=crf))
        keep = mask.numpy() != dataset.ignore_index
        truth, pred = mask.numpy()[keep], probs.argmax(0).numpy()[keep]
        np.add.at(confusion, (truth, pred), 1)
        np.add.at(plain, (truth, model(image[None])[0].argmax(0).numpy()[keep]), 1)
    assert np.array_equal(result.confusion.numpy(), confusion)  # rows: truth, columns: prediction
    assert not np.array_equal(confusion, plain)  # the options mattered
    iou = np.diag(confusion) / (confusion.sum(0) + confusion.sum(1) - np.diag(confusion))
    assert result.metrics["mean_iou"] == pytest.approx(np.nanmean(iou), abs=1e-9)
