"""PSPNet, Semantic FPN and HED: parameter counts, structure and outputs against direct computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pixelwise.models import create_model
from pixelwise.models.fpn import FPN, SemanticFPNHead
from pixelwise.models.pspnet import PyramidPoolingModule

# torchvision resnet50 / resnet101 totals (25,557,032 / 44,549,160) minus the fc layer (2,049,000).
RESNET_PARAMS = {"resnet50": 23_508_032, "resnet101": 42_500_160}
VGG16_CONV_PARAMS = 14_714_688  # the 13 convs of torchvision vgg16 (weights + biases)
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def count_params(name: str, num_classes: int, **kwargs: object) -> int:
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, **kwargs)
    return sum(p.numel() for p in model.parameters())


def randomise_batch_norm(module: torch.nn.Module) -> None:
    """Non-trivial BN statistics and affine terms, so eval-mode BN is not the identity."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


# ---------------------------------------------------------------------------- PSPNet


@pytest.mark.parametrize(("backbone", "reference"), [("resnet50", 46.6e6), ("resnet101", 65.6e6)])
def test_pspnet_parameter_count(backbone: str, reference: float) -> None:
    k = 21
    ppm = 4 * (2048 * 512 + 2 * 512)  # four 1x1 convs (no bias) + BN
    bottleneck = 4096 * 512 * 9 + 2 * 512
    classifier = 512 * k + k
    expected = RESNET_PARAMS[backbone] + ppm + bottleneck + classifier
    got = count_params("pspnet", k, backbone=backbone, stem="standard")
    assert got == expected  # 46,592,597 / 65,584,725
    assert abs(got - reference) / reference < 0.005
    aux = 1024 * 256 * 9 + 2 * 256 + 256 * k + k
    assert count_params("pspnet", k, backbone=backbone, stem="standard", aux=True) == expected + aux
    # The default is the paper's deep stem: three 3x3 convs (64 s2, 64, 128) and BNs instead of
    # the 7x7 conv, a 128-channel bn1, and layer1.0 reading 128 channels.
    deep = (3 * 64 * 9 + 64 * 64 * 9 + 64 * 128 * 9 + 2 * 2 * 64) - 3 * 64 * 49 + 2 * 64 + 64 * 64 + 64 * 256
    got = count_params("pspnet", k, backbone=backbone)
    assert got == expected + deep  # 46,716,373 / 65,708,501
    assert abs(got - reference) / reference < 0.005


def _adaptive_mean(x: torch.Tensor, bins: int) -> torch.Tensor:
    """Adaptive average pooling written out: bin i spans [floor(i*h/b), ceil((i+1)*h/b))."""
    h, w = x.shape[-2:]
    out = torch.empty(*x.shape[:-2], bins, bins, dtype=x.dtype)
    for i in range(bins):
        for j in range(bins):
            rows = slice(i * h // bins, math.ceil((i + 1) * h / bins))
            cols = slice(j * w // bins, math.ceil((j + 1) * w / bins))
            out[..., i, j] = x[..., rows, cols].mean(dim=(-2, -1))
    return out


def test_pyramid_pooling_matches_direct_computation_with_bins_larger_than_the_map() -> None:
    torch.manual_seed(0)
    ppm = PyramidPoolingModule(8).eval()
    randomise_batch_norm(ppm)
    assert ppm.bins == (1, 2, 3, 6) and ppm.out_channels == 16
    x = torch.randn(2, 8, 4, 5)  # smaller than the 6x6 bin
    with torch.no_grad():
        out = ppm(x)
    assert out.shape == (2, 16, 4, 5)
    assert torch.equal(out[:, :8], x)
    for i, (bins, level) in enumerate(zip(ppm.bins, ppm.levels)):
        conv, bn = level[1][0], level[1][1]
        pooled = _adaptive_mean(x, bins)
        y = torch.einsum("oc,nchw->nohw", conv.weight[:, :, 0, 0], pooled)
        y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        y = (y * bn.weight[:, None, None] + bn.bias[:, None, None]).relu()
        expected = F.interpolate(y, size=(4, 5), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[:, 8 + 2 * i : 10 + 2 * i], expected, atol=1e-5, rtol=1e-5)
    # Bin 1 is the global mean: constant over the map.
    assert torch.allclose(out[:, 8:10], out[:, 8:10, :1, :1].expand(-1, -1, 4, 5))


def test_pyramid_pooling_width_is_a_quarter_of_2048() -> None:
    with torch.device("meta"):
        ppm = PyramidPoolingModule(2048)
    assert ppm.out_channels == 4096
    assert [level[1][0].out_channels for level in ppm.levels] == [512] * 4
    assert [level[0].output_size for level in ppm.levels] == [1, 2, 3, 6]


@pytest.mark.parametrize(("output_stride", "size"), [(8, (13, 17)), (16, (7, 9))])
def test_pspnet_pools_the_dilated_c5_map(output_stride: int, size: tuple[int, int]) -> None:
    with torch.device("meta"):
        model = create_model("pspnet", num_classes=5, output_stride=output_stride, aux=True)
        seen = {}
        model.head[0].register_forward_hook(lambda mod, inp, out: seen.update(inp=inp[0].shape, out=out.shape))
        outputs = model.forward_with_aux(torch.empty(2, 3, 97, 131))
    assert seen["inp"] == (2, 2048, *size)
    assert seen["out"] == (2, 4096, *size)
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {"out": (2, 5, 97, 131), "aux": (2, 5, 97, 131)}


def test_pspnet_aux_head_outputs_and_weights() -> None:
    torch.manual_seed(0)
    model = create_model("pspnet", num_classes=4, aux=True)
    assert model.aux_weights == {"aux": 0.4}
    assert model.aux_head[0][0].in_channels == 1024 and model.aux_head[0][0].out_channels == 256
    x = torch.randn(2, 3, 41, 53)
    outputs = model.forward_with_aux(x)  # train mode, batch 2
    (outputs["out"].logsumexp(1).mean() + 0.4 * outputs["aux"].logsumexp(1).mean()).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        outputs = model.forward_with_aux(x[:1])
        assert torch.equal(outputs["out"], model(x[:1]))
    assert outputs["aux"].shape == (1, 4, 41, 53)
    assert not torch.allclose(outputs["aux"], outputs["out"])


def test_pspnet_without_aux_has_only_out() -> None:
    with torch.device("meta"):
        model = create_model("pspnet", num_classes=3)
        outputs = model.forward_with_aux(torch.empty(2, 3, 33, 33))
    assert model.aux_head is None and model.aux_weights == {}
    assert list(outputs) == ["out"]


def test_pspnet_backbone_keys_are_torchvision_and_bad_options_raise() -> None:
    with torch.device("meta"):
        model = create_model("pspnet", num_classes=3, backbone="resnet101", stem="standard")
    keys = model.backbone.state_dict().keys()
    assert {"conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer3.22.conv3.weight"} <= keys
    assert not any(k.startswith("fc.") for k in keys)
    with pytest.raises(ValueError, match="output_stride=32"):
        create_model("pspnet", num_classes=3, output_stride=32)
    for name in ("pspnet", "fpn"):
        with pytest.raises(ValueError, match="backbone='xception65' is not supported; choose one of resnet18"):
            create_model(name, num_classes=3, backbone="xception65")


# ---------------------------------------------------------------------------- Semantic FPN


@pytest.mark.parametrize(("backbone", "expected"), [("resnet50", 28_478_675), ("resnet101", 47_470_803)])
def test_fpn_parameter_count_is_exact(backbone: str, expected: int) -> None:
    k = 19
    lateral = sum(c * 256 + 256 for c in (256, 512, 1024, 2048))
    output = 4 * (256 * 256 * 9 + 256)
    head = 4 * 256 * 128 * 9 + 3 * 128 * 128 * 9 + 7 * 2 * 128  # 7 bias-free convs + GN
    assert RESNET_PARAMS[backbone] + lateral + output + head + 128 * k + k == expected
    assert count_params("fpn", k, backbone=backbone) == expected


@pytest.mark.parametrize(
    ("size", "expected"),
    [((64, 96), [(16, 24), (8, 12), (4, 6), (2, 3)]), ((97, 131), [(25, 33), (13, 17), (7, 9), (4, 5)])],
)
def test_fpn_levels_are_at_strides_4_to_32(size: tuple[int, int], expected: list[tuple[int, int]]) -> None:
    with torch.device("meta"):
        model = create_model("fpn", num_classes=7)
        pyramid = model.pyramid(torch.empty(2, 3, *size))
        out = model(torch.empty(2, 3, *size))
    assert [tuple(p.shape) for p in pyramid] == [(2, 256, *s) for s in expected]
    assert out.shape == (2, 7, *size)


def test_fpn_top_down_pathway_matches_direct_computation() -> None:
    torch.manual_seed(0)
    neck = FPN([4, 6, 8, 10], out_channels=5)
    sizes = [(8, 12), (4, 6), (2, 3), (1, 2)]  # widths 2 -> 3: not an exact 2x
    feats = [torch.randn(1, c, *s) for c, s in zip((4, 6, 8, 10), sizes)]

    def conv(x: torch.Tensor, layer: torch.nn.Conv2d) -> torch.Tensor:
        return F.conv2d(x, layer.weight, layer.bias, padding=layer.padding)

    def nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        rows = (torch.arange(size[0]) * x.shape[-2]) // size[0]
        cols = (torch.arange(size[1]) * x.shape[-1]) // size[1]
        return x[..., rows[:, None], cols[None, :]]

    merged = conv(feats[3], neck.lateral[3])
    expected = [conv(merged, neck.output[3])]
    for i in (2, 1, 0):
        merged = conv(feats[i], neck.lateral[i]) + nearest(merged, sizes[i])
        expected.insert(0, conv(merged, neck.output[i]))
    with torch.no_grad():
        got = neck(feats)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e.detach(), atol=1e-5, rtol=1e-5)
    assert all(c.bias is not None for c in (*neck.lateral, *neck.output))


def test_fpn_head_sums_four_branches_at_stride_4() -> None:
    torch.manual_seed(0)
    head = SemanticFPNHead(num_classes=3, in_channels=16, channels=64).eval()
    assert [len(b) for b in head.branches] == [1, 1, 2, 3]
    blocks = [block for branch in head.branches for block in branch]
    assert all(b[0].bias is None and b[1].num_groups == 32 for b in blocks)
    assert head.classifier.bias is not None
    pyramid = [torch.randn(1, 16, 16 // 2**i, 24 // 2**i) for i in range(4)]
    expected = torch.zeros(1, 64, 16, 24)
    with torch.no_grad():
        for level, (branch, x) in enumerate(zip(head.branches, pyramid)):
            for block in branch:
                x = block(x)
                if level > 0:
                    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            expected += x
        torch.testing.assert_close(head.merge(pyramid), expected)
        logits = torch.einsum("kc,nchw->nkhw", head.classifier.weight[:, :, 0, 0], expected)
        torch.testing.assert_close(head(pyramid), logits + head.classifier.bias[:, None, None], atol=1e-5, rtol=1e-5)


def test_fpn_logits_are_head_output_upsampled_x4() -> None:
    torch.manual_seed(0)
    model = create_model("fpn", num_classes=3, backbone="resnet50").eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        low = model.head(model.pyramid(x))
        out = model(x)
    assert low.shape == (1, 3, 16, 24)
    torch.testing.assert_close(out, F.interpolate(low, scale_factor=4, mode="bilinear", align_corners=False))


# ---------------------------------------------------------------------------- HED


def test_hed_parameter_count_is_exact() -> None:
    sides = sum(c + 1 for c in (64, 128, 256, 512, 512))
    assert VGG16_CONV_PARAMS + sides + 5 + 1 == 14_716_171
    assert count_params("hed", 1) == 14_716_171
    assert count_params("hed", 3) == VGG16_CONV_PARAMS + 3 * sides + (5 * 3 + 3)  # grouped fuse


def test_hed_backbone_keys_are_torchvision_vgg16_features() -> None:
    with torch.device("meta"):
        model = create_model("hed", num_classes=1)
    expected = {f"features.{i}.{p}" for i in VGG16_CONV_INDICES for p in ("weight", "bias")}
    assert set(model.backbone.state_dict()) == expected
    assert "backbone.features.28.weight" in model.state_dict()


@pytest.mark.parametrize("num_classes", [1, 3])
def test_hed_outputs_and_initial_fuse_is_mean_of_sides(num_classes: int) -> None:
    torch.manual_seed(0)
    model = create_model("hed", num_classes=num_classes).eval()
    assert model.fuse.weight.shape == (num_classes, 5, 1, 1)
    assert torch.all(model.fuse.weight == 0.2) and torch.all(model.fuse.bias == 0)
    x = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        outputs = model.forward_with_aux(x)
        fused = model(x)
    assert list(outputs) == ["out", "side1", "side2", "side3", "side4", "side5"]
    assert model.aux_weights == {f"side{i}": 1.0 for i in range(1, 6)}
    assert all(v.shape == (1, num_classes, 37, 45) for v in outputs.values())
    assert torch.equal(fused, outputs["out"])
    sides = torch.stack([outputs[f"side{i}"] for i in range(1, 6)])
    torch.testing.assert_close(outputs["out"], sides.mean(0))


def hed_side1_direct(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """HED side 1 computed by hand: conv1_1, ReLU, conv1_2, ReLU, 1x1 side conv (zero padding)."""
    f = model.backbone.features
    h = F.conv2d(F.conv2d(x, f[0].weight, f[0].bias, padding=1).relu(), f[2].weight, f[2].bias, padding=1).relu()
    return F.conv2d(h, model.sides[0].weight, model.sides[0].bias)


def test_hed_side1_and_grouped_fuse_against_direct_computation() -> None:
    torch.manual_seed(0)
    model = create_model("hed", num_classes=2).eval()
    x = torch.randn(1, 3, 21, 19)
    with torch.no_grad():
        model.fuse.weight[1] = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0])[:, None, None]  # class 1 = its side4
        outputs = model.forward_with_aux(x)
        side1 = hed_side1_direct(model, x)
    torch.testing.assert_close(outputs["side1"], side1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs["out"][:, 1], outputs["side4"][:, 1])
    sides0 = torch.stack([outputs[f"side{i}"][:, 0] for i in range(1, 6)])
    torch.testing.assert_close(outputs["out"][:, 0], sides0.mean(0))


def test_hed_pads_images_under_16_px_and_crops_back() -> None:
    torch.manual_seed(0)
    model = create_model("hed", num_classes=1).eval()
    x = torch.randn(1, 3, 9, 12)
    with torch.no_grad():
        outputs = model.forward_with_aux(x)
        side1 = hed_side1_direct(model, x)
    assert all(v.shape == (1, 1, 9, 12) for v in outputs.values())
    assert all(torch.isfinite(v).all() for v in outputs.values())
    # Two 3x3 convs see 2 px: away from the padded bottom/right border side1 is unchanged.
    torch.testing.assert_close(outputs["side1"][..., :7, :10], side1[..., :7, :10], atol=1e-5, rtol=1e-5)


def test_hed_trains_with_batch_2_and_every_output_reaches_the_backbone() -> None:
    torch.manual_seed(0)
    model = create_model("hed", num_classes=1)
    outputs = model.forward_with_aux(torch.randn(2, 3, 33, 35))
    target = torch.rand(2, 1, 33, 35).round()
    loss = sum(F.binary_cross_entropy_with_logits(v, target) for v in outputs.values())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
