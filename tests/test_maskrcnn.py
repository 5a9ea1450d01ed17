"""Mask R-CNN: sizes and keys as torchvision, the losses on hand-made inputs, the test-time path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pixelwise.models import create_model, list_models, load_model, model_kind, save_model
from pixelwise.models.detection import load_torchvision_weights
from pixelwise.models.detection.anchors import AnchorGenerator
from pixelwise.models.detection.ops import BoxCoder
from pixelwise.models.detection.roi_heads import RoIHeads, box_losses, mask_loss
from pixelwise.models.detection.rpn import RegionProposalNetwork, RPNHead

TINY = dict(backbone="resnet18", fpn_channels=16, representation_size=32, mask_channels=16, anchor_sizes=(16, 32, 64, 128, 256), rpn_pre_nms_top_n=(200, 100),
            rpn_post_nms_top_n=(100, 50), rpn_batch_size_per_image=64, box_batch_size_per_image=64, detections_per_image=20)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("num_classes", "frozen_bn", "expected"), [(91, False, 44_454_513), (2, False, 43_975_515), (91, True, 44_401_393)])
def test_parameter_counts_equal_torchvision(num_classes: int, frozen_bn: bool, expected: int) -> None:
    # /work/shared/REFERENCE.md; 44,401,393 is torchvision's MaskRCNN_ResNet50_FPN_Weights num_params
    with torch.device("meta"):
        model = create_model("maskrcnn_resnet50_fpn", num_classes=num_classes, frozen_bn=frozen_bn)
    assert count(model) == expected


def test_registry_kind_keeps_detection_out_of_dense_tests() -> None:
    assert model_kind("maskrcnn_resnet50_fpn") == "detection"
    assert "maskrcnn_resnet101_fpn" in list_models(kind="detection")
    assert not set(list_models(kind="detection")) & set(list_models(kind="dense"))
    assert model_kind("unet") == "dense"


def torchvision_state(num_classes: int, legacy: bool) -> dict[str, torch.Tensor]:
    """A state dict with torchvision maskrcnn_resnet50_fpn's keys and shapes, written out here.

    ``legacy``: the spelling of checkpoints from torchvision < 0.13 (the published COCO file),
    with frozen BN (no ``num_batches_tracked``).
    """
    g = torch.Generator().manual_seed(0)
    shapes: dict[str, tuple[int, ...]] = {"backbone.body.conv1.weight": (64, 3, 7, 7)}
    shapes.update({f"backbone.body.bn1.{k}": (64,) for k in ("weight", "bias", "running_mean", "running_var")})
    cin = 64
    for layer, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), 1):
        for b in range(blocks):
            p = f"backbone.body.layer{layer}.{b}."
            convs = [(width, cin if b == 0 else width * 4, 1), (width, width, 3), (width * 4, width, 1)]
            for i, (co, ci, k) in enumerate(convs, 1):
                shapes[f"{p}conv{i}.weight"] = (co, ci, k, k)
                shapes.update({f"{p}bn{i}.{s}": (co,) for s in ("weight", "bias", "running_mean", "running_var")})
            if b == 0:
                shapes[f"{p}downsample.0.weight"] = (width * 4, cin, 1, 1)
                shapes.update({f"{p}downsample.1.{s}": (width * 4,) for s in ("weight", "bias", "running_mean", "running_var")})
        cin = width * 4
    sub = "" if legacy else ".0"
    for i, c in enumerate((256, 512, 1024, 2048)):
        shapes[f"backbone.fpn.inner_blocks.{i}{sub}.weight"] = (256, c, 1, 1)
        shapes[f"backbone.fpn.inner_blocks.{i}{sub}.bias"] = (256,)
        shapes[f"backbone.fpn.layer_blocks.{i}{sub}.weight"] = (256, 256, 3, 3)
        shapes[f"backbone.fpn.layer_blocks.{i}{sub}.bias"] = (256,)
    conv = "rpn.head.conv" if legacy else "rpn.head.conv.0.0"
    shapes.update({f"{conv}.weight": (256, 256, 3, 3), f"{conv}.bias": (256,)})
    shapes.update({"rpn.head.cls_logits.weight": (3, 256, 1, 1), "rpn.head.cls_logits.bias": (3,),
                   "rpn.head.bbox_pred.weight": (12, 256, 1, 1), "rpn.head.bbox_pred.bias": (12,)})
    shapes.update({"roi_heads.box_head.fc6.weight": (1024, 256 * 7 * 7), "roi_heads.box_head.fc6.bias": (1024,),
                   "roi_heads.box_head.fc7.weight": (1024, 1024), "roi_heads.box_head.fc7.bias": (1024,),
                   "roi_heads.box_predictor.cls_score.weight": (num_classes, 1024), "roi_heads.box_predictor.cls_score.bias": (num_classes,),
                   "roi_heads.box_predictor.bbox_pred.weight": (4 * num_classes, 1024), "roi_heads.box_predictor.bbox_pred.bias": (4 * num_classes,)})
    for i in range(4):
        name = f"mask_fcn{i + 1}" if legacy else f"{i}.0"
        shapes[f"roi_heads.mask_head.{name}.weight"] = (256, 256, 3, 3)
        shapes[f"roi_heads.mask_head.{name}.bias"] = (256,)
    shapes.update({"roi_heads.mask_predictor.conv5_mask.weight": (256, 256, 2, 2), "roi_heads.mask_predictor.conv5_mask.bias": (256,),
                   "roi_heads.mask_predictor.mask_fcn_logits.weight": (num_classes, 256, 1, 1),
                   "roi_heads.mask_predictor.mask_fcn_logits.bias": (num_classes,)})
    state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    if not legacy:  # trainable BatchNorm also has num_batches_tracked
        state.update({k.replace("running_var", "num_batches_tracked"): torch.tensor(7) for k in shapes if k.endswith("running_var")})
    return state


@pytest.mark.parametrize("legacy", [False, True])
def test_torchvision_state_dict_loads(legacy: bool) -> None:
    state = torchvision_state(num_classes=5, legacy=legacy)
    model = create_model("maskrcnn_resnet50_fpn", num_classes=5, frozen_bn=legacy)
    own = model.state_dict()
    if not legacy:  # the model's keys are exactly torchvision's
        assert set(own) == set(state)
    load_torchvision_weights(model, state)
    mask_fcn3 = state["roi_heads.mask_head.mask_fcn3.weight" if legacy else "roi_heads.mask_head.2.0.weight"]
    assert torch.equal(model.roi_heads.mask_head[2][0].weight, mask_fcn3)
    inner = state["backbone.fpn.inner_blocks.1.weight" if legacy else "backbone.fpn.inner_blocks.1.0.weight"]
    assert torch.equal(model.backbone.fpn.inner_blocks[1][0].weight, inner)
    assert torch.equal(model.backbone.body.layer3[5].bn2.running_var, state["backbone.body.layer3.5.bn2.running_var"])


def test_torchvision_state_dict_with_other_classes_is_refused() -> None:
    model = create_model("maskrcnn_resnet50_fpn", num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        load_torchvision_weights(model, torchvision_state(num_classes=5, legacy=False))


def test_trainable_backbone_layers_freeze_the_first_stages() -> None:
    with torch.device("meta"):
        model = create_model("maskrcnn", num_classes=2, backbone="resnet18", trainable_backbone_layers=3)
    frozen = {n.split(".")[2] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1"}


def test_rpn_loss_on_hand_made_anchors() -> None:
    rpn = RegionProposalNetwork(RPNHead(4, 1), AnchorGenerator((32,) * 5, (1.0,)))
    gt = torch.tensor([[10.0, 10, 50, 50]])
    anchors = torch.tensor([[12.0, 10, 52, 50], [100, 100, 140, 140], [10, 10, 70, 50]])
    # IoU with gt: 38*40/(2*1600-1520) = 0.905 (positive), 0 (negative), 1600/2400 = 0.667 (ignored)
    logits = torch.tensor([[2.0, -1.0, 5.0]])
    deltas = torch.zeros(1, 3, 4)
    losses = rpn.loss(anchors, logits, deltas, [gt])
    expected_obj = (F.softplus(torch.tensor(-2.0)) + F.softplus(torch.tensor(-1.0))) / 2  # BCE(2, 1), BCE(-1, 0)
    assert torch.allclose(losses["loss_objectness"], expected_obj)
    # target deltas of anchor 0: dx = -2 / 40 = -0.05, others 0; smooth L1 (beta 1/9) of 0.05 = 0.05 - 1/18 < 0 -> quadratic
    expected_box = 0.5 * 0.05**2 / (1 / 9) / 2  # summed, divided by 2 sampled anchors
    assert torch.allclose(losses["loss_rpn_box_reg"], torch.tensor(expected_box))


def test_box_losses_hand_values() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    deltas = torch.zeros(2, 12)
    deltas[1, 8:12] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # class 2's deltas of RoI 1
    deltas[1, 4:8] = 100.0  # another class's deltas: must not count
    labels = torch.tensor([0, 2])
    targets = torch.tensor([[9.0, 9, 9, 9], [0.0, 0, 0, 0]])  # RoI 0 is background: its target is ignored
    out = box_losses(logits, deltas, labels, targets)
    ce = (-(F.log_softmax(logits[0], 0)[0]) - F.log_softmax(logits[1], 0)[2]) / 2
    assert torch.allclose(out["loss_classifier"], ce)
    assert torch.allclose(out["loss_box_reg"], torch.tensor((1.0 - 0.5 / 9) / 2))  # |1| >= beta: |x| - beta / 2


def test_mask_loss_uses_only_the_gt_class_channel() -> None:
    logits = torch.zeros(2, 3, 2, 2)
    logits[0, 1] = 2.0
    logits[1, 2] = -1.0
    targets = torch.tensor([[[1.0, 0], [1, 1]], [[0.0, 0], [0, 1]]])
    labels = torch.tensor([1, 2])
    expected = torch.stack([
        F.softplus(torch.tensor(-2.0)) * 3 + F.softplus(torch.tensor(2.0)),  # logit 2: three ones, one zero
        F.softplus(torch.tensor(-1.0)) * 3 + F.softplus(torch.tensor(1.0)),  # logit -1: three zeros, one one
    ]).sum() / 8
    assert torch.allclose(mask_loss(logits, labels, targets), expected)
    other = logits.clone()
    other[0, 0] = 50.0
    other[1, 1] = -50.0
    assert torch.allclose(mask_loss(other, labels, targets), expected)


class FixedPredictor(nn.Module):
    """Box predictor that returns fixed scores / deltas for the RoIs, in order."""

    def __init__(self, logits: torch.Tensor, deltas: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.deltas = logits, deltas

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logits, self.deltas


class FixedMask(nn.Module):
    """Mask predictor: (R, K, 28, 28) logits +10 for class 1 everywhere, -10 for the others."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.full((len(x), 3, 28, 28), -10.0)
        out[:, 1] = 10.0
        return out


def test_detect_thresholds_nms_per_class_and_pastes_masks() -> None:
    proposals = [torch.tensor([[10.0, 10, 30, 30], [11, 10, 31, 30], [40, 40, 60, 60], [0, 0, 20, 20]])]
    probs = torch.tensor([[0.1, 0.9, 0.0], [0.1, 0.8, 0.1], [0.2, 0.0, 0.8], [0.98, 0.01, 0.01]])
    heads = RoIHeads(nn.Flatten(), FixedPredictor(probs.log(), torch.zeros(4, 12)), nn.Identity(), FixedMask())
    pyramid = [torch.zeros(1, 1, 64 // 2**i, 64 // 2**i) for i in range(4)]
    out = heads.detect(pyramid, proposals, [(64, 64)])[0]
    # RoI 1 (class 1, 0.8) overlaps RoI 0 (class 1, 0.9) with IoU 380/420 > 0.5: suppressed;
    # its class-2 score 0.1 survives (own class); RoI 3's scores 0.01 fall under 0.05.
    assert out["labels"].tolist() == [1, 2, 2]
    assert torch.allclose(out["scores"], torch.tensor([0.9, 0.8, 0.1]))
    assert torch.equal(out["boxes"], proposals[0][[0, 2, 1]])  # zero deltas leave the proposals
    assert out["masks"].shape == (3, 1, 64, 64)
    # class 1's mask is on: box 0's inside is ~1; class 2's masks are off
    assert out["masks"][0, 0, 12:28, 12:28].min() > 0.99
    assert out["masks"][1:].max() < 1e-3
    assert BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(torch.zeros(1, 4), proposals[0][:1]).shape == (1, 1, 4)


def tiny_targets() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    images = [torch.randn(3, 64, 80), torch.randn(3, 70, 64)]
    masks = torch.zeros(2, 64, 80, dtype=torch.uint8)
    masks[0, 10:30, 10:40] = 1
    masks[1, 35:60, 40:70] = 1
    targets = [
        {"boxes": torch.tensor([[10.0, 10, 40, 30], [40, 35, 70, 60]]), "labels": torch.tensor([1, 2]), "masks": masks},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 70, 64, dtype=torch.uint8)},
    ]
    return images, targets


def test_tiny_model_trains_and_detects_with_full_size_masks(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("maskrcnn", num_classes=3, **TINY).train()
    images, targets = tiny_targets()
    losses = model(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    with pytest.raises(ValueError, match="needs targets"):
        model(images)
    path = save_model(model, tmp_path / "m")
    model, _ = load_model(path)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert [o["masks"].shape[-2:] for o in out] == [(64, 80), (70, 64)]
    for o, (h, w) in zip(out, [(64, 80), (70, 64)]):
        assert len(o["boxes"]) <= 20
        assert (o["boxes"][:, 0::2] <= w).all() and (o["boxes"][:, 1::2] <= h).all() and (o["boxes"] >= 0).all()
        assert (o["scores"] > 0.05).all() and (o["labels"] >= 1).all()
