"""DeepLab v1/v2/v3/v3+ and the Xception-65 / MobileNetV2 backbones: sizes, strides, output-stride switching."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pixelwise.models import create_model
from pixelwise.models.backbones import VGG16, MobileNetV2, Xception65, create_backbone
from pixelwise.models.deeplab import ASPPL, DeepLabV1, caffe_interp, load_deeplabv1_vgg16
from pixelwise.models.layers import SeparableConv2d


def _count(name: str, **kwargs: object) -> int:
    with torch.device("meta"):
        model = create_model(name, num_classes=21, **kwargs)
    return sum(p.numel() for p in model.parameters())


def _calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give every BN the statistics of one batch (random-init eval nets otherwise fade to ~0), then eval."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool((a - b).abs().max() <= 1e-4 * b.abs().max())


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("deeplabv1", {}, 20_505_429),
        ("deeplabv2", {}, 44_048_532),
        ("deeplabv3", {"aux": True, "head": "torchvision"}, 42_004_074),
        ("deeplabv3", {"backbone": "resnet101", "aux": True, "head": "torchvision"}, 60_996_202),
        ("deeplabv3", {"backbone": "resnet101", "head": "torchvision"}, 58_630_997),
        ("deeplabv3plus", {"backbone": "resnet50", "separable": False}, 40_352_181),
        ("deeplabv3plus", {"backbone": "resnet101", "separable": False}, 59_344_309),
    ],
)
def test_parameter_counts_match_reference(name: str, kwargs: dict, expected: int) -> None:
    # REFERENCE.md's v3 / v3+ counts are torchvision's layout and the common ResNet ports.
    assert _count(name, **kwargs) == expected


TORCHVISION_3X3 = 256 * 256 * 9 + 2 * 256  # torchvision's extra 3x3 conv (no bias) + BN


@pytest.mark.parametrize(("backbone", "torchvision_count"), [("resnet50", 42_004_074 - 2_365_205), ("resnet101", 58_630_997)])
def test_deeplabv3_paper_head_drops_torchvisions_3x3_conv_and_dropout(backbone: str, torchvision_count: int) -> None:
    # R50 without aux: REFERENCE's 42,004,074 minus torchvision's FCNHead on 1024 channels
    # (1024*256*9 + BN 512 + 256*21 + 21 = 2,365,205).
    assert _count("deeplabv3", backbone=backbone) == torchvision_count - TORCHVISION_3X3
    with torch.device("meta"):
        model = create_model("deeplabv3", num_classes=21)
    head = model.classifier
    assert len(head) == 2 and isinstance(head[1], nn.Conv2d) and head[1].kernel_size == (1, 1)
    assert [type(m) for m in head[0].project] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]  # 1x1 conv 256 + BN, no dropout
    assert head[0].project[0].weight.shape == (256, 5 * 256, 1, 1)
    with torch.device("meta"):
        tv = create_model("deeplabv3", num_classes=21, head="torchvision")
    assert [m.p for m in tv.modules() if isinstance(m, nn.Dropout)] == [0.5]
    with pytest.raises(ValueError, match="head='caffe'"):
        create_model("deeplabv3", num_classes=2, head="caffe")


def test_separable_v3plus_replaces_each_3x3_conv_by_depthwise_bn_relu_pointwise_bn_relu() -> None:
    def dense(cin: int, cout: int) -> int:  # 3x3 conv without bias + BN
        return cin * cout * 9 + 2 * cout

    def separable(cin: int, cout: int) -> int:  # depthwise 3x3 + BN, pointwise 1x1 + BN
        return cin * 9 + 2 * cin + cin * cout + 2 * cout

    convs = [(2048, 256)] * 3 + [(256 + 48, 256), (256, 256)]  # ASPP 3x3 branches, decoder
    expected = 40_352_181 + sum(separable(i, o) - dense(i, o) for i, o in convs)
    assert _count("deeplabv3plus", backbone="resnet50", separable=True) == expected


def test_deeplabv3plus_default_is_the_papers_xception65_with_separable_convs_and_dropout_0_1() -> None:
    with torch.device("meta"):
        model = create_model("deeplabv3plus", num_classes=21)
    assert isinstance(model.backbone, Xception65)
    assert all(isinstance(b, SeparableConv2d) for b in model.aspp.convs[1:4])
    assert all(isinstance(b, SeparableConv2d) for b in model.decoder.fuse)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.1]  # TF DeepLab


def test_deeplabv3_state_dict_follows_torchvision_layout() -> None:
    with torch.device("meta"):
        model = create_model("deeplabv3", num_classes=21, aux=True, head="torchvision")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    head = {k: s for k, s in shapes.items() if not k.startswith("backbone.") and not k.endswith("num_batches_tracked")}
    # torchvision deeplabv3_resnet50: DeepLabHead(ASPP, conv, BN, ReLU, conv) and FCNHead.
    expected = {"classifier.0.convs.0.0.weight": (256, 2048, 1, 1)}
    for i in (1, 2, 3):
        expected[f"classifier.0.convs.{i}.0.weight"] = (256, 2048, 3, 3)
    expected["classifier.0.convs.4.1.weight"] = (256, 2048, 1, 1)
    expected["classifier.0.project.0.weight"] = (256, 1280, 1, 1)
    expected["classifier.1.weight"] = (256, 256, 3, 3)
    expected["classifier.4.weight"] = (21, 256, 1, 1)
    expected["classifier.4.bias"] = (21,)
    expected["aux_classifier.0.weight"] = (256, 1024, 3, 3)
    expected["aux_classifier.4.weight"] = (21, 256, 1, 1)
    expected["aux_classifier.4.bias"] = (21,)
    bns = [f"classifier.0.convs.{i}.1" for i in range(4)]
    bns += ["classifier.0.convs.4.2", "classifier.0.project.1", "classifier.2", "aux_classifier.1"]
    for bn in bns:
        for p in ("weight", "bias", "running_mean", "running_var"):
            expected[f"{bn}.{p}"] = (256,)
    assert head == expected
    assert shapes["backbone.layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    assert not any(k.startswith("backbone.fc") for k in shapes)


def test_deeplabv1_fc6_sees_stride_8_features_of_vgg_with_dilated_conv5() -> None:
    model = create_model("deeplabv1", num_classes=3).eval()
    pools = [m for m in model.backbone.features if isinstance(m, nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride, p.padding) for p in pools] == [(3, 2, 1)] * 3 + [(3, 1, 1)] * 2
    convs = [m for m in model.backbone.features if isinstance(m, nn.Conv2d)]
    assert [c.dilation[0] for c in convs] == [1] * 10 + [2] * 3
    fc6 = model.head.fc6
    assert (fc6.kernel_size, fc6.dilation, fc6.padding, fc6.out_channels) == ((3, 3), (12, 12), (12, 12), 1024)
    seen = []
    model.head.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 80))
        model(torch.randn(1, 3, 41, 49))
    assert seen == [(1, 512, 8, 10), (1, 512, 6, 7)]  # ceil(H / 8), ceil(W / 8)
    assert out.shape == (1, 3, 64, 80)


def test_deeplabv2_uses_stride_8_features_and_sums_four_atrous_branches() -> None:
    model = create_model("deeplabv2", num_classes=3, backbone="resnet50").eval()
    seen = []
    model.aspp.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 40))
    assert seen == [(1, 2048, 4, 5)]
    torch.manual_seed(0)
    aspp = ASPPL(8, 3)
    x = torch.randn(2, 8, 13, 11)
    direct = sum(F.conv2d(x, b.weight, b.bias, padding=r, dilation=r) for b, r in zip(aspp.branches, (6, 12, 18, 24)))
    assert torch.allclose(aspp(x), direct, atol=1e-6)


def test_deeplabv3_output_stride_switch_rewires_backbone_and_aspp() -> None:
    torch.manual_seed(0)
    model = create_model("deeplabv3", num_classes=4).eval()
    aspp = model.classifier[0]
    c5_sizes = []
    model.backbone.register_forward_hook(lambda mod, args, out: c5_sizes.append(tuple(out["c5"].shape[-2:])))
    layer4 = [blk.conv2.dilation[0] for blk in model.backbone.layer4]
    assert (aspp.rates, layer4) == ((6, 12, 18), [2, 4, 8])  # multi-grid (1, 2, 4) x rate 2
    x = torch.randn(1, 3, 48, 32)
    with torch.no_grad():
        out16 = model(x)
        model.set_output_stride(8)
        assert aspp.rates == (12, 24, 36)
        assert [aspp.convs[i][0].padding[0] for i in (1, 2, 3)] == [12, 24, 36]
        assert [blk.conv2.dilation[0] for blk in model.backbone.layer4] == [4, 8, 16]
        assert [blk.conv2.dilation[0] for blk in model.backbone.layer3] == [1] + [2] * (len(model.backbone.layer3) - 1)
        out8 = model(x)
        model.set_output_stride(16)
        again = model(x)
    assert c5_sizes == [(3, 2), (6, 4), (3, 2)]
    assert out8.shape == out16.shape == (1, 4, 48, 32)
    assert not torch.equal(out8, out16)
    assert torch.equal(again, out16)
    with pytest.raises(ValueError, match="output_stride=12"):
        model.set_output_stride(12)


def test_deeplabv3plus_at_os8_computes_the_os16_aspp_branches_densely() -> None:
    # MobileNetV2 dilates exactly (TF DeepLab's rule), so each ASPP conv branch of a model
    # built at 16 and switched to 8 equals the output stride 16 branch on every other pixel.
    torch.manual_seed(0)
    model = create_model("deeplabv3plus", num_classes=3, backbone="mobilenetv2", separable=True)
    x = torch.randn(2, 3, 48, 64)
    _calibrate(model, x)
    x = x[:1]  # eval mode works with a batch of one
    seen: list[torch.Tensor] = []  # branches 0 (1x1), 1-3 (3x3 atrous) at 16, then at 8
    for branch in model.aspp.convs[:4]:
        branch.register_forward_hook(lambda mod, args, out: seen.append(out))
    with torch.no_grad():
        logits16 = model(x)
        model.set_output_stride(8)
        logits8 = model(x)
    assert model.aspp.rates == (12, 24, 36)
    branches16, branches8 = seen[:4], seen[4:]
    assert branches16[0].shape[-2:] == (3, 4) and branches8[0].shape[-2:] == (6, 8)
    for a, b in zip(branches8, branches16):
        assert _close(a[..., ::2, ::2], b)
    assert logits8.shape == logits16.shape == (1, 3, 48, 64)


@pytest.mark.parametrize("name", ["mobilenetv2", "xception65"])
def test_backbone_strides_and_exact_dilation_at_every_output_stride(name: str) -> None:
    torch.manual_seed(0)
    backbone = create_backbone(name, in_channels=2, output_stride=32)
    x = torch.randn(1, 2, 32, 64)
    _calibrate(backbone, x)
    features = {}
    with torch.no_grad():
        for os in (32, 16, 8):
            backbone.set_output_stride(os, backbone.multi_grid)
            features[os] = backbone(x)
    channels = {"mobilenetv2": (16, 24, 32, 96, 320), "xception65": (64, 256, 256, 728, 2048)}[name]
    assert tuple(backbone.out_channels.values()) == channels
    for os, f in features.items():
        strides = [2, 4, 8, min(16, os), min(32, os)]
        expected = [(1, c, 32 // s, 64 // s) for c, s in zip(channels, strides)]
        assert [tuple(f[k].shape) for k in ("c1", "c2", "c3", "c4", "c5")] == expected
    for key in ("c2", "c3"):
        assert torch.equal(features[8][key], features[32][key])
    assert _close(features[8]["c4"][..., ::2, ::2], features[16]["c4"])
    assert _close(features[8]["c5"][..., ::2, ::2], features[16]["c5"])
    assert _close(features[8]["c5"][..., ::4, ::4], features[32]["c5"])


def test_xception_multi_grid_and_mobilenet_options() -> None:
    with torch.device("meta"):
        xception = Xception65(output_stride=16, multi_grid=(1, 2, 4))
        mobilenet = MobileNetV2(output_stride=8)
    last = xception.exit_flow[1]
    assert [sep[0][0].dilation[0] for sep in last.convs] == [2, 4, 8]
    assert xception.exit_flow[0].convs[2][0][0].stride == (1, 1)
    assert xception.entry_flow[2].convs[2][0][0].stride == (2, 2)
    xception.set_output_stride(8, xception.multi_grid)
    assert [sep[0][0].dilation[0] for sep in last.convs] == [4, 8, 16]
    assert {blk.convs[0][0][0].dilation[0] for blk in xception.middle_flow} == {2}
    # MobileNetV2 at 8: the block that loses its stride keeps rate 1, later blocks double it.
    dilations = [blk.conv[-3][0].dilation[0] for blk in mobilenet.features[1:]]
    assert dilations == [1, 1, 1, 1, 1, 1] + [1] + [2] * 6 + [2] + [4] * 3
    with pytest.raises(ValueError, match="multi_grid"):
        create_backbone("mobilenetv2", multi_grid=(1, 2, 4))
    with pytest.raises(ValueError, match="xception65"):
        create_backbone("xception", output_stride=16)


def test_deeplabv3_aux_head() -> None:
    torch.manual_seed(0)
    model = create_model("deeplabv3", num_classes=5, aux=True).eval()
    assert model.aux_weights == {"aux": 0.4}
    c4 = []
    model.aux_classifier.register_forward_pre_hook(lambda mod, args: c4.append(tuple(args[0].shape)))
    x = torch.randn(1, 3, 33, 25)
    with torch.no_grad():
        outputs = model.forward_with_aux(x)
        out = model(x)
    assert sorted(outputs) == ["aux", "out"]
    assert outputs["out"].shape == outputs["aux"].shape == (1, 5, 33, 25)
    assert c4 == [(1, 1024, 3, 2)]
    assert torch.equal(out, outputs["out"])
    assert not torch.allclose(outputs["aux"], outputs["out"])
    plain = create_model("deeplabv3", num_classes=5)
    assert plain.aux_classifier is None and plain.aux_weights == {}
    assert sorted(plain.eval().forward_with_aux(x)) == ["out"]


@pytest.mark.parametrize("backbone", ["xception65", "mobilenetv2"])
def test_deeplabv3plus_decoder_reads_stride4_features_and_trains(backbone: str) -> None:
    torch.manual_seed(0)
    model = create_model("deeplabv3plus", num_classes=3, backbone=backbone)
    fused = []
    model.decoder.fuse.register_forward_pre_hook(lambda mod, args: fused.append(tuple(args[0].shape)))
    x = torch.randn(2, 3, 21, 29)
    out = model(x)
    assert out.shape == (2, 3, 21, 29)
    assert fused == [(2, 256 + 48, 6, 8)]
    F.cross_entropy(out, torch.randint(0, 3, (2, 21, 29))).backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        assert model.eval()(x[:1]).shape == (1, 3, 21, 29)


def test_bad_options_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="deeplabv3 backbone='mobilenetv2'"):
        create_model("deeplabv3", num_classes=2, backbone="mobilenetv2")
    with pytest.raises(ValueError, match="deeplabv2 backbone='resnet18'"):
        create_model("deeplabv2", num_classes=2, backbone="resnet18")
    with pytest.raises(ValueError, match="output_stride=4"):
        create_model("deeplabv3plus", num_classes=2, backbone="mobilenetv2", output_stride=4)
    with pytest.raises(ValueError, match="multi_grid"):
        create_model("deeplabv3plus", num_classes=2, backbone="mobilenetv2", multi_grid=(1, 2, 4))


# ---------------------------------------------------------------------------- DeepLab v1 geometry, MSc, VGG init


def test_caffe_interp_puts_feature_pixel_j_on_image_pixel_8j() -> None:
    # Caffe Interp, zoom 8: 41 -> 321 = (41 - 1) * 8 + 1; image pixel y reads feature coordinate y / 8.
    ramp = torch.arange(41.0).view(1, 1, 41, 1).expand(1, 1, 41, 3)
    out = caffe_interp(ramp, 8, (321, 3))
    torch.testing.assert_close(out[0, 0, :, 0], torch.arange(321.0) / 8)
    # Wider than (h - 1) * 8 + 1: the last row repeats (41 -> 328 for a 328-pixel input, ceil(328 / 8) = 41).
    out = caffe_interp(ramp, 8, (328, 3))
    assert out.shape[-2:] == (328, 3)
    assert torch.equal(out[0, 0, 320:, 0], torch.full((8,), 40.0))
    # align_corners=False x8 would put feature pixel j on 8j + 3.5: 3.5 image pixels off.
    old = F.interpolate(ramp, scale_factor=8, mode="bilinear", align_corners=False)
    assert old[0, 0, 8 * 20 + 3, 0] < 20 < old[0, 0, 8 * 20 + 4, 0]


def test_deeplabv1_logits_are_fc8_scores_at_every_8th_pixel() -> None:
    torch.manual_seed(0)
    model = create_model("deeplabv1", num_classes=3).eval()
    scores = []
    model.fc8.register_forward_hook(lambda mod, args, out: scores.append(out))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 65, 73))
    assert scores[0].shape[-2:] == (9, 10)  # ceil(65 / 8), ceil(73 / 8)
    torch.testing.assert_close(out[..., ::8, ::8], scores[0])


def test_deeplabv1_msc_concatenates_five_128_channel_mlps_before_fc8() -> None:
    mlp = sum(c * 128 * 9 + 128 + 128 * 128 + 128 for c in (3, 64, 128, 256, 512))
    assert _count("deeplabv1_msc") == 20_505_429 + mlp + 5 * 128 * 21 == 21_711_445
    model = create_model("deeplabv1_msc", num_classes=3).eval()
    seen = []
    for branch in model.ms:
        branch.register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape)))
    model.fc8.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 41, 50))
    assert seen == [(1, 128, 6, 7)] * 5 + [(1, 1024 + 640, 6, 7)]
    assert [m.conv1.stride[0] for m in model.ms] == [8, 4, 2, 1, 1]
    assert out.shape == (1, 3, 41, 50)


def test_deeplabv1_fc6_fc7_are_subsampled_from_a_vgg16_checkpoint(tmp_path) -> None:
    # A small VGG16 (width 8: pool5 has 64 channels) with fc layers 4 x 6 = 24 wide, as
    # torchvision lays them out: classifier.0 (24, 64 * 7 * 7) flattened (C, H, W).
    torch.manual_seed(0)
    model = DeepLabV1(num_classes=2, base_channels=8, fc_channels=6)
    state = {k: torch.randn_like(v) for k, v in VGG16(base_channels=8).state_dict().items()}
    state |= {"classifier.0.weight": torch.randn(24, 64 * 49), "classifier.0.bias": torch.randn(24)}
    state |= {"classifier.3.weight": torch.randn(24, 24), "classifier.3.bias": torch.randn(24)}
    state |= {"classifier.6.weight": torch.randn(1000, 24), "classifier.6.bias": torch.randn(1000)}
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    unused = load_deeplabv1_vgg16(model, path)
    assert unused == ["classifier.6.bias", "classifier.6.weight"]
    assert torch.equal(model.backbone.features[28].weight, state["features.28.weight"])
    fc6, fc7 = model.head.fc6.weight, model.head.fc7.weight
    assert fc6.shape == (6, 64, 3, 3) and fc7.shape == (6, 6, 1, 1)
    for o, c, i, j in [(0, 0, 0, 0), (5, 63, 2, 2), (3, 17, 1, 2), (2, 40, 2, 0)]:
        assert fc6[o, c, i, j] == state["classifier.0.weight"][4 * o, c * 49 + (3 * i) * 7 + 3 * j]
    for o, i in [(0, 0), (5, 5), (2, 4)]:
        assert fc7[o, i, 0, 0] == state["classifier.3.weight"][4 * o, 4 * i]
    assert torch.equal(model.head.fc6.bias, state["classifier.0.bias"][[0, 4, 8, 12, 16, 20]])
    bad = tmp_path / "bad.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("classifier.3")}, bad)
    with pytest.raises(ValueError, match="bad.pth.*classifier.3"):
        load_deeplabv1_vgg16(model, bad)


# ---------------------------------------------------------------------------- DeepLab v3 cascaded


def test_deeplabv3_cascade_count_and_doubling_block_rates() -> None:
    unit = 2048 * 512 + 512 * 512 * 9 + 512 * 2048 + 2 * (512 + 512 + 2048)  # bottleneck, BN = 2 C
    resnet50 = 25_557_032 - 2_049_000  # torchvision resnet50 without fc
    assert _count("deeplabv3_cascade") == resnet50 + 9 * unit + 2048 * 21 + 21 == 63_714_389
    with torch.device("meta"):
        model = create_model("deeplabv3_cascade", num_classes=21)
    blocks = [model.backbone.layer4, *model.blocks]
    # Output stride 16: block rates 2, 4, 8, 16 (each stride after output stride 16 becomes atrous), times (1, 2, 4).
    assert [[u.conv2.dilation[0] for u in b] for b in blocks] == [[2, 4, 8], [4, 8, 16], [8, 16, 32], [16, 32, 64]]
    assert {u.conv2.stride[0] for b in blocks for u in b} == {1}
    model.set_output_stride(8)
    assert [[u.conv2.dilation[0] for u in b] for b in blocks] == [[4, 8, 16], [8, 16, 32], [16, 32, 64], [32, 64, 128]]
    with pytest.raises(ValueError, match="output_stride=32"):
        model.set_output_stride(32)


def test_deeplabv3_cascade_at_os8_computes_the_os16_scores_densely() -> None:
    torch.manual_seed(0)
    model = create_model("deeplabv3_cascade", num_classes=3, multi_grid=(1, 2, 1))
    x = torch.randn(2, 3, 17, 33)
    _calibrate(model, x)
    scores = []
    model.classifier.register_forward_hook(lambda mod, args, out: scores.append(out))
    with torch.no_grad():
        model(x[:1])
        model.set_output_stride(8)
        out = model(x[:1])
    assert scores[0].shape[-2:] == (2, 3) and scores[1].shape[-2:] == (3, 5)
    assert _close(scores[1][..., ::2, ::2], scores[0])
    assert out.shape == (1, 3, 17, 33)
