"""Encoder-decoder models (FCN, U-Net, SegNet, FC-DenseNet) against the papers and reference nets."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pixelwise.models import create_model
from pixelwise.models.backbones import load_backbone_weights
from pixelwise.models.densenet import FCDenseNet
from pixelwise.models.fcn import load_vgg16_weights
from pixelwise.models.layers import mirror_pad
from pixelwise.models.segnet import SegNetDecoder
from pixelwise.models.unet import ResidualBlock, UNetOriginal


def n_params(model: nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in model.parameters() if trainable is None or p.requires_grad == trainable)


def meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **kwargs)


def caffe_upsample_filter(k: int) -> np.ndarray:
    """The FCN reference ``upsample_filt`` (surgery.py), written out independently."""
    factor = (k + 1) // 2
    center = factor - 1 if k % 2 == 1 else factor - 0.5
    og = np.ogrid[:k, :k]
    return (1 - abs(og[0] - center) / factor) * (1 - abs(og[1] - center) / factor)


def deconv_weight(channels: int, k: int) -> torch.Tensor:
    w = np.zeros((channels, channels, k, k), dtype=np.float32)
    for c in range(channels):
        w[c, c] = caffe_upsample_filter(k)
    return torch.from_numpy(w)


# ----------------------------------------------------------------------------------------- FCN

FCN_COUNTS = {  # REFERENCE.md, 21 classes: (learnable, frozen bilinear deconvs)
    "fcn32s": (134_346_581, 1_806_336),
    "fcn16s": (134_357_354, 458_640),
    "fcn8s": (134_362_751, 127_008),
}
FCN_DECONVS = {  # name -> (kernel, stride), from the reference prototxts
    "fcn32s": {"upscore": (64, 32)},
    "fcn16s": {"upscore2": (4, 2), "upscore16": (32, 16)},
    "fcn8s": {"upscore2": (4, 2), "upscore_pool4": (4, 2), "upscore8": (16, 8)},
}


@pytest.mark.parametrize("name", sorted(FCN_COUNTS))
def test_fcn_parameter_counts_match_reference(name: str) -> None:
    learnable, frozen = FCN_COUNTS[name]
    model = meta_model(name, num_classes=21)
    assert n_params(model, trainable=True) == learnable
    assert n_params(model, trainable=False) == frozen
    trained = meta_model(name, num_classes=21, learnable_upsampling=True)
    assert n_params(trained, trainable=True) == learnable + frozen


@pytest.mark.parametrize("name", sorted(FCN_COUNTS))
@pytest.mark.parametrize("learnable", [False, True])
def test_fcn_deconvs_are_bias_free_and_frozen_unless_asked(name: str, learnable: bool) -> None:
    model = meta_model(name, num_classes=3, learnable_upsampling=learnable)
    deconvs = {n: m for n, m in model.named_modules() if isinstance(m, nn.ConvTranspose2d)}
    assert set(deconvs) == set(FCN_DECONVS[name])
    for layer_name, (k, s) in FCN_DECONVS[name].items():
        up = deconvs[layer_name]
        assert up.bias is None and up.kernel_size == (k, k) and up.stride == (s, s) and up.padding == (0, 0)
        assert up.weight.requires_grad is learnable


def caffe_conv(h: int, k: int, pad: int) -> int:
    return h + 2 * pad - k + 1


def caffe_pool(h: int) -> int:
    return math.ceil((h - 2) / 2) + 1  # Caffe pools round up


def caffe_deconv(h: int, k: int, stride: int) -> int:
    return (h - 1) * stride + k


def caffe_fcn_shapes(size: int) -> dict[str, int]:
    """Side of each blob of the voc-fcn nets for a square input, by Caffe's size arithmetic."""
    conv, pool, deconv = caffe_conv, caffe_pool, caffe_deconv
    h = conv(size, 3, 100)
    sides = {}
    for i in range(1, 6):
        h = pool(h)
        sides[f"pool{i}"] = h
    sides["score_fr"] = conv(h, 7, 0)
    sides["upscore2"] = deconv(sides["score_fr"], 4, 2)
    sides["upscore_pool4"] = deconv(sides["upscore2"], 4, 2)
    sides["upscore8"] = deconv(sides["upscore_pool4"], 16, 8)
    sides["upscore16"] = deconv(sides["upscore2"], 32, 16)
    sides["upscore"] = deconv(sides["score_fr"], 64, 32)
    return sides


def test_fcn_blob_shapes_follow_caffe_arithmetic_at_500() -> None:
    expected = caffe_fcn_shapes(500)
    assert (expected["pool5"], expected["score_fr"], expected["upscore8"]) == (22, 16, 568)
    for name in FCN_COUNTS:
        model = meta_model(name, num_classes=21)
        seen: dict[str, tuple[int, ...]] = {}

        def record(layer: str):
            return lambda module, inputs, output: seen.update({layer: tuple(output.shape[-2:])})

        for layer in ("score_fr", "score_pool4", "score_pool3", *FCN_DECONVS[name]):
            if hasattr(model, layer):
                getattr(model, layer).register_forward_hook(record(layer))
        out = model(torch.empty(1, 3, 500, 500, device="meta"))
        assert out.shape == (1, 21, 500, 500)
        for layer in ("score_fr", *FCN_DECONVS[name]):
            assert seen[layer] == (expected[layer],) * 2, layer
        if name != "fcn32s":
            assert seen["score_pool4"] == (expected["pool4"],) * 2


@pytest.mark.parametrize("name", sorted(FCN_COUNTS))
def test_fcn_returns_input_size_for_any_size(name: str) -> None:
    model = meta_model(name, num_classes=21)
    for h, w in [(1, 1), (2, 3), (31, 32), (32, 32), (33, 47), (97, 131), (224, 224), (333, 500), (500, 375)]:
        assert model(torch.empty(1, 3, h, w, device="meta")).shape == (1, 21, h, w)


@pytest.mark.parametrize("name", sorted(FCN_COUNTS))
def test_fcn_starts_at_zero_and_fuses_with_reference_crop_offsets(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=3).eval()
    x = torch.randn(1, 3, 37, 52)
    for layer_name, (k, _) in FCN_DECONVS[name].items():  # bilinear kernels, channel-diagonal
        torch.testing.assert_close(getattr(model, layer_name).weight.detach(), deconv_weight(3, k), rtol=0, atol=1e-7)
    with torch.no_grad():
        assert torch.count_nonzero(model(x)) == 0  # all score layers start at zero

    # Feed known blobs into the head (hooks replace pool3 / pool4 / drop7) with random scores,
    # then redo the head by hand with the prototxt's literal crop offsets.
    g = torch.Generator().manual_seed(1)
    blobs: dict[str, torch.Tensor] = {}

    def replace(name_: str):
        def hook(module, inputs, output):
            blobs[name_] = torch.randn(output.shape, generator=g)
            return blobs[name_]

        return hook

    stages = model.backbone.stages()
    stages[2][1].register_forward_hook(replace("pool3"))
    stages[3][1].register_forward_hook(replace("pool4"))
    model.drop7.register_forward_hook(replace("drop7"))
    with torch.no_grad():
        for layer in ("score_fr", "score_pool4", "score_pool3"):
            if hasattr(model, layer):
                getattr(model, layer).weight.normal_(generator=g)
                getattr(model, layer).bias.normal_(generator=g)
        out = model(x)

        def score(layer: str, blob: str) -> torch.Tensor:
            conv = getattr(model, layer)
            return F.conv2d(blobs[blob], conv.weight, conv.bias)

        def up(t: torch.Tensor, k: int, s: int) -> torch.Tensor:
            return F.conv_transpose2d(t, deconv_weight(3, k), stride=s)

        s = score("score_fr", "drop7")
        if name == "fcn32s":
            expected = up(s, 64, 32)[..., 19 : 19 + 37, 19 : 19 + 52]
        else:
            s = up(s, 4, 2)
            s = s + score("score_pool4", "pool4")[..., 5 : 5 + s.shape[-2], 5 : 5 + s.shape[-1]]
            if name == "fcn16s":
                expected = up(s, 32, 16)[..., 27 : 27 + 37, 27 : 27 + 52]
            else:
                s = up(s, 4, 2)
                s = s + score("score_pool3", "pool3")[..., 9 : 9 + s.shape[-2], 9 : 9 + s.shape[-1]]
                expected = up(s, 16, 8)[..., 31 : 31 + 37, 31 : 31 + 52]
    assert expected.abs().mean() > 1.0
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-3)


VGG16_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # torchvision vgg16 features.{i}
VGG16_WIDTHS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


def test_fcn_loads_torchvision_vgg16_and_convolutionalizes_the_classifier(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    c_in = 3
    for i, c in zip(VGG16_CONVS, VGG16_WIDTHS):
        state[f"features.{i}.weight"] = torch.randn(c, c_in, 3, 3, generator=g)
        state[f"features.{i}.bias"] = torch.randn(c, generator=g)
        c_in = c
    for i, (out_f, in_f) in {0: (4096, 25088), 3: (4096, 4096), 6: (1000, 4096)}.items():
        state[f"classifier.{i}.weight"] = torch.rand(out_f, in_f, generator=g)
        state[f"classifier.{i}.bias"] = torch.rand(out_f, generator=g)
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)

    model = create_model("fcn16s", num_classes=21)
    unused = load_vgg16_weights(model, path)
    assert unused == ["classifier.6.bias", "classifier.6.weight"]
    for i in VGG16_CONVS:
        assert torch.equal(model.backbone.features[i].weight, state[f"features.{i}.weight"])
        assert torch.equal(model.backbone.features[i].bias, state[f"features.{i}.bias"])
    fc6, fc7 = model.fc6.weight, model.fc7.weight
    assert fc6.shape == (4096, 512, 7, 7) and fc7.shape == (4096, 4096, 1, 1)
    # torchvision flattens pool5 (512, 7, 7) as c * 49 + y * 7 + x.
    for o, c, y, x in [(0, 0, 0, 0), (17, 3, 6, 2), (4095, 511, 6, 6), (2048, 256, 3, 5)]:
        assert fc6[o, c, y, x] == state["classifier.0.weight"][o, c * 49 + y * 7 + x]
    assert torch.equal(fc7[:, :, 0, 0], state["classifier.3.weight"])
    assert torch.equal(model.fc6.bias, state["classifier.0.bias"])
    assert torch.equal(model.fc7.bias, state["classifier.3.bias"])
    assert torch.count_nonzero(model.score_fr.weight) == 0  # heads untouched

    features_only = tmp_path / "features.pth"
    torch.save({k: v for k, v in state.items() if k.startswith("features.")}, features_only)
    with pytest.raises(ValueError, match="classifier.0"):
        load_vgg16_weights(model, features_only)
    torch.save({k: v for k, v in state.items() if k.startswith("classifier.")}, tmp_path / "heads.pth")
    with pytest.raises(ValueError, match="heads.pth.*lacks 26 keys"):
        load_vgg16_weights(model, tmp_path / "heads.pth")


def test_fcn8s_resnet50_starts_at_zero_and_fuses_strides_8_16_32() -> None:
    torch.manual_seed(0)
    model = create_model("fcn8s_resnet50", num_classes=4).eval()
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        assert torch.count_nonzero(model(x)) == 0
        for conv in (model.score_c3, model.score_c4, model.score_c5):
            conv.weight.normal_()
            conv.bias.normal_()
        feats = model.backbone(x)
        sizes = [tuple(feats[c].shape[-2:]) for c in ("c3", "c4", "c5")]
        assert sizes == [(9, 12), (5, 6), (3, 3)]  # strides 8, 16, 32 of 70x90
        s = F.conv2d(feats["c5"], model.score_c5.weight, model.score_c5.bias)
        s = F.interpolate(s, size=(5, 6), mode="bilinear", align_corners=False)
        s = s + F.conv2d(feats["c4"], model.score_c4.weight, model.score_c4.bias)
        s = F.interpolate(s, size=(9, 12), mode="bilinear", align_corners=False)
        s = s + F.conv2d(feats["c3"], model.score_c3.weight, model.score_c3.bias)
        expected = F.interpolate(s, size=(70, 90), mode="bilinear", align_corners=False)
        torch.testing.assert_close(model(x), expected)


def test_fcn8s_resnet50_parameter_count() -> None:
    """The README's 23,583,359 (21 classes): torchvision's ResNet-50 without its classifier plus three 1x1 score convs."""
    backbone = 25_557_032 - (2048 * 1000 + 1000)  # torchvision docs' ResNet-50 count minus fc
    scores = (512 + 1024 + 2048) * 21 + 3 * 21  # weights + biases on c3, c4, c5
    assert backbone + scores == 23_583_359
    assert n_params(meta_model("fcn8s_resnet50", num_classes=21)) == 23_583_359


def test_fcn8s_resnet50_deconv_upsampling_is_learnable_bilinear() -> None:
    torch.manual_seed(0)
    model = create_model("fcn8s_resnet50", num_classes=3, upsampling="deconv").eval()
    ups = [model.upscore2, model.upscore_pool4, model.upscore8]
    assert [(u.kernel_size[0], u.stride[0], u.padding[0]) for u in ups] == [(4, 2, 1), (4, 2, 1), (16, 8, 4)]
    for up in ups:
        assert up.bias is None and up.weight.requires_grad
        assert torch.equal(up.weight, deconv_weight(3, up.kernel_size[0]))
    extra = 3 * 3 * (16 + 16 + 256)
    assert n_params(meta_model("fcn8s_resnet50", num_classes=3, upsampling="deconv")) == n_params(
        meta_model("fcn8s_resnet50", num_classes=3)
    ) + extra
    # Away from the border the initial deconvs equal the bilinear resize (align_corners=False).
    score = torch.randn(1, 3, 6, 7)
    with torch.no_grad():
        up2 = model.upscore2(score)
        up8 = model.upscore8(score)
    torch.testing.assert_close(up2[..., 1:-1, 1:-1], F.interpolate(score, scale_factor=2, mode="bilinear")[..., 1:-1, 1:-1])
    torch.testing.assert_close(up8[..., 4:-4, 4:-4], F.interpolate(score, scale_factor=8, mode="bilinear")[..., 4:-4, 4:-4])
    x = torch.randn(2, 3, 70, 90)
    for conv in (model.score_c3, model.score_c4, model.score_c5):
        nn.init.normal_(conv.weight, std=0.01)
    out = model.train()(x)
    assert out.shape == (2, 3, 70, 90)
    out.square().mean().backward()
    assert all(up.weight.grad is not None and up.weight.grad.abs().sum() > 0 for up in ups)


# -------------------------------------------------------------------------------------- U-Net


def unet_conv_params(widths: list[int], c_in: int, k: int, batch_norm: bool) -> int:
    """Parameters of a 4-level U-Net: 18 3x3 convs, 4 up-convs 2x2, 1x1 head."""
    firsts = [*zip([c_in, *widths[:-1]], widths), *((2 * c, c) for c in widths[:-1])]
    convs = firsts + [(c, c) for _, c in firsts]
    total = sum(a * b * 9 + (2 * b if batch_norm else b) for a, b in convs)
    total += sum(widths[i + 1] * widths[i] * 4 + widths[i] for i in range(4))
    return total + widths[0] * k + k


def unet_residual_params(widths: list[int], c_in: int, k: int) -> int:
    """Parameters of a 4-level residual U-Net with BN: per block two 3x3 convs (no bias) + BN and,
    as every block changes the width, a 1x1 projection (no bias) + BN; 2x2 up-convs; 1x1 head."""
    blocks = [*zip([c_in, *widths[:-1]], widths), *((2 * c, c) for c in widths[:-1])]
    total = sum(a * b * 9 + 2 * b + b * b * 9 + 2 * b + a * b + 2 * b for a, b in blocks)
    total += sum(widths[i + 1] * widths[i] * 4 + widths[i] for i in range(4))
    return total + widths[0] * k + k


def test_unet_parameter_counts_in_the_readme() -> None:
    """The README's padded U-Net figures (3 channels in, 21 classes) from the layer formulas."""
    widths = [64, 128, 256, 512, 1024]
    assert unet_conv_params(widths, 3, 21, batch_norm=True) == 31_038_933
    assert n_params(meta_model("unet", num_classes=21)) == 31_038_933
    assert unet_residual_params(widths, 3, 21) == 32_437_653
    assert n_params(meta_model("unet_residual", num_classes=21)) == 32_437_653


def test_unet_parameter_counts() -> None:
    widths = [64, 128, 256, 512, 1024]
    assert unet_conv_params(widths, 1, 2, batch_norm=False) == 31_030_658
    assert n_params(meta_model("unet_original", num_classes=2, in_channels=1)) == 31_030_658
    # The padded form has the same layers; BN replaces each conv bias by a scale and shift.
    assert n_params(meta_model("unet", num_classes=2, in_channels=1, batch_norm=False)) == 31_030_658
    assert n_params(meta_model("unet", num_classes=2, in_channels=1)) == unet_conv_params(widths, 1, 2, True)


def simulate_valid_output(size: int) -> int | None:
    """Output side of the unpadded U-Net for one input side, or None if some step fails."""
    skips = []
    for _ in range(4):
        size -= 4
        if size <= 0 or size % 2:
            return None
        skips.append(size)
        size //= 2
    size -= 4
    for skip in reversed(skips):
        size = 2 * size
        if size <= 0 or size > skip:
            return None
        size -= 4
    return size if size > 0 else None


def test_unet_original_valid_sizes() -> None:
    model = meta_model("unet_original", num_classes=2, in_channels=1)
    assert model.valid_margin == 92
    assert model(torch.empty(1, 1, 572, 572, device="meta")).shape == (1, 2, 572, 572)
    assert model.forward_valid(torch.empty(1, 1, 572, 572, device="meta")).shape == (1, 2, 388, 388)
    valid = {s: o for s in range(1, 800) if (o := simulate_valid_output(s)) is not None}
    assert min(valid) == 188 and valid[572] == 388
    for s, o in valid.items():
        assert UNetOriginal.valid_output_size(s) == o == s - 2 * model.valid_margin
    for o in range(1, 500):
        assert UNetOriginal.valid_input_size(o) == min(s for s, out in valid.items() if out >= o)
    for s in (571, 573, 187, 100):
        with pytest.raises(ValueError, match="not valid"):
            model.forward_valid(torch.empty(1, 1, s, 572, device="meta"))


@pytest.mark.parametrize("size", [(100, 120), (30, 41)])
def test_unet_original_forward_is_one_mirror_padded_tile(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = create_model("unet_original", num_classes=2, in_channels=1, base_channels=4).eval()
    h, w = size
    x = torch.randn(1, 1, h, w)
    tile_h, tile_w = UNetOriginal.valid_input_size(h), UNetOriginal.valid_input_size(w)
    pads = ((92, tile_h - h - 92), (92, tile_w - w - 92))
    padded = np.pad(x[0, 0].numpy(), pads, mode="reflect")  # numpy reflects repeatedly past the image side
    with torch.no_grad():
        expected = model.forward_valid(torch.from_numpy(padded)[None, None])[..., :h, :w]
        torch.testing.assert_close(model(x), expected)


def test_mirror_pad_reflects_repeatedly_like_the_sliding_window() -> None:
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    out = mirror_pad(x, 2, 1, 3, 3)
    ref = np.pad(x[0, 0].numpy(), ((2, 1), (0, 0)), mode="reflect")
    ref = np.pad(ref, ((0, 0), (3, 3)), mode="reflect")
    assert torch.equal(out[0, 0], torch.from_numpy(ref))
    # Pads as long as the image or longer keep mirroring (numpy's reflect does the same):
    # rows 0 1 2 -> 1 2 1 0 1 2 1 | 0 1 2 | 1 0 1 2 1 (period 4), never an edge replication.
    out = mirror_pad(x, 7, 5, 0, 9)
    ref = np.pad(x[0, 0].numpy(), ((7, 5), (0, 9)), mode="reflect")
    assert torch.equal(out[0, 0], torch.from_numpy(ref))
    assert out[0, 0, :7, 0].tolist() == [4.0, 8.0, 4.0, 0.0, 4.0, 8.0, 4.0]
    # A one-pixel axis can only repeat its pixel.
    assert torch.equal(mirror_pad(x[..., :1, :], 2, 2, 0, 0)[0, 0, :, 1], torch.ones(5))


def test_mirror_pad_is_the_sliding_window_padding() -> None:
    # One behaviour everywhere: the tile the sliding window reads beyond the image equals mirror_pad's.
    from pixelwise.inference import _source_index

    for size, start, length in [(3, -7, 20), (5, -12, 30), (1, -3, 7)]:
        idx, _ = _source_index(start, length, size, "reflect", torch.device("cpu"))
        row = torch.arange(float(size)).view(1, 1, 1, size)
        padded = mirror_pad(row, 0, 0, -start, start + length - size)
        assert torch.equal(padded[0, 0, 0], idx.float())


@pytest.mark.parametrize("name", ["unet_original", "unet"])
def test_unet_convs_and_up_convs_start_from_n_0_sqrt_2_over_fan_in(name: str) -> None:
    # Paper Sec. 3: "drawing the initial weights from a Gaussian distribution with a standard
    # deviation of sqrt(2/N), where N denotes the number of incoming nodes of one neuron",
    # N = k * k * C_in for every conv and up-conv (PyTorch's default init would give up-convs
    # a uniform distribution of std 1 / sqrt(3 * C_out * k * k)).
    torch.manual_seed(0)
    model = create_model(name, num_classes=2, in_channels=1, base_channels=16)
    ups = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(ups) == 4
    for m in ups + [m for m in model.modules() if isinstance(m, nn.Conv2d)]:
        w = m.weight.detach().double()
        expected = math.sqrt(2 / (m.in_channels * m.kernel_size[0] * m.kernel_size[1]))
        # std of n normal draws: relative standard error 1 / sqrt(2n); allow 5 of them (n >= 32).
        assert abs(w.std().item() / expected - 1) < 5 / math.sqrt(2 * w.numel()), m
        assert abs(w.mean().item()) < 5 * expected / math.sqrt(w.numel())
        assert torch.count_nonzero(m.bias) == 0 if m.bias is not None else True
    big = ups[0].weight.detach().double()  # (256, 128, 2, 2): 131,072 draws
    assert big.std().item() == pytest.approx(math.sqrt(2 / (4 * 256)), rel=0.01)


@pytest.mark.parametrize("name", ["unet", "unet_residual"])
@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("depth", [2, 4])
def test_padded_unet_equals_explicitly_padded_and_cropped(name: str, upsampling: str, batch_norm: bool, depth: int) -> None:
    torch.manual_seed(0)
    model = create_model(
        name, num_classes=3, in_channels=2, base_channels=4, depth=depth, batch_norm=batch_norm, upsampling=upsampling
    ).eval()
    x = torch.randn(1, 2, 21, 35)
    m = 2**depth
    padded = np.pad(x[0].numpy(), ((0, 0), (0, -21 % m), (0, -35 % m)), mode="reflect")
    with torch.no_grad():
        out = model(x)
        assert out.shape == (1, 3, 21, 35)
        torch.testing.assert_close(out, model(torch.from_numpy(padded)[None])[..., :21, :35])


def test_residual_block_shortcuts() -> None:
    same, wider = ResidualBlock(8, 8), ResidualBlock(4, 8)
    assert isinstance(same.shortcut, nn.Identity)
    assert isinstance(wider.shortcut[0], nn.Conv2d) and wider.shortcut[0].kernel_size == (1, 1)
    nn.init.zeros_(same.conv2.weight)  # residual branch off: output = ReLU(x)
    x = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(same.eval()(x), x.relu())


# ------------------------------------------------------------------------------------- SegNet

VGG16_BN_CONVS = [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]  # torchvision vgg16_bn features.{i}


def test_segnet_parameter_counts() -> None:
    assert n_params(meta_model("segnet", num_classes=11)) == 29_449_355
    conv_bn = 64 * 64 * 49 + 64 + 2 * 64
    basic = (3 * 64 * 49 + 64 + 2 * 64) + 3 * conv_bn + 4 * conv_bn + 64 * 11 + 11
    count = n_params(meta_model("segnet_basic", num_classes=11))
    assert count == basic == 1_416_587
    assert abs(count - 1.42e6) / 1.42e6 < 0.01


def test_segnet_encoder_has_torchvision_vgg16_bn_keys_and_loads_them(tmp_path: Path) -> None:
    expected = {}
    c_in = 3
    for i, c in zip(VGG16_BN_CONVS, VGG16_WIDTHS):
        expected[f"features.{i}.weight"] = (c, c_in, 3, 3)
        expected[f"features.{i}.bias"] = (c,)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            expected[f"features.{i + 1}.{stat}"] = (c,)
        expected[f"features.{i + 1}.num_batches_tracked"] = ()
        c_in = c
    model = create_model("segnet", num_classes=11)
    own = {k: tuple(v.shape) for k, v in model.encoder.state_dict().items()}
    assert own == expected
    assert own["features.40.weight"] == (512, 512, 3, 3) and own["features.41.running_var"] == (512,)

    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=g) for k, shape in expected.items() if shape}
    state["classifier.0.weight"] = torch.randn(4, 4, generator=g)
    torch.save(state, tmp_path / "vgg16_bn.pth")
    assert load_backbone_weights(model.encoder, tmp_path / "vgg16_bn.pth") == ["classifier.0.weight"]
    loaded = model.state_dict()
    for k, v in state.items():
        if k.startswith("features."):
            assert torch.equal(loaded[f"encoder.{k}"], v), k


def test_segnet_unpooling_puts_values_back_at_the_argmax() -> None:
    model = create_model("segnet_basic", num_classes=2, in_channels=1)
    x = torch.tensor([[1.0, 5, 2, 0, 3], [4, 0, 7, 1, 9], [8, 6, 0, 2, 1]])[None, None]
    pooled, indices = model.pools[0](x)  # 3x5 -> 2x3 (Caffe rounding: partial windows kept)
    assert torch.equal(pooled[0, 0], torch.tensor([[5.0, 7, 9], [8, 2, 1]]))
    stage = SegNetDecoder(nn.Identity())
    expected = torch.tensor([[0.0, 5, 0, 0, 0], [0, 0, 7, 0, 9], [8, 0, 0, 2, 1]])
    assert torch.equal(stage(pooled, indices, x.shape[-2:])[0, 0], expected)


@pytest.mark.parametrize("name, size", [("segnet", (37, 45)), ("segnet_basic", (13, 22))])
def test_segnet_decoders_unpool_with_their_mirror_encoder_indices(name: str, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=3).eval()
    pools = [pool for _, pool in model.encoder.stages()] if name == "segnet" else list(model.pools)
    encoder: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (pool input, values, indices)
    decoder: list[tuple[torch.Tensor, torch.Tensor]] = []  # (unpool input, unpool output)
    for pool in pools:
        pool.register_forward_hook(lambda m, args, out: encoder.append((args[0].clone(), *out)))
    for stage in model.decoders:
        stage.unpool.register_forward_hook(lambda m, args, out: decoder.append((args[0].clone(), out.clone())))
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 3, *size)
    assert len(encoder) == len(decoder) == len(pools)
    assert torch.equal(decoder[0][0], encoder[-1][1])  # the deepest decoder unpools the encoder's output
    for (before, values, indices), (sparse_in, unpooled) in zip(encoder, reversed(decoder)):
        flat_idx = indices.flatten(2)
        # The indices point at each window's maximum (Caffe-rounded windows at odd sizes) ...
        window_max = F.max_pool2d(before, 2, 2, ceil_mode=True)
        assert torch.equal(values, window_max)
        assert torch.equal(before.flatten(2).gather(2, flat_idx), window_max.flatten(2))
        # ... and the mirror decoder stage writes its input exactly there, zeros elsewhere.
        expected = torch.zeros_like(before).flatten(2).scatter_(2, flat_idx, sparse_in.flatten(2))
        assert unpooled.shape == before.shape
        assert torch.equal(unpooled.flatten(2), expected)


# -------------------------------------------------------------------------------- FC-DenseNet

TIRAMISU = {  # name -> (down block layers, bottleneck layers, growth rate, paper's parameter count)
    "fcdensenet56": ((4,) * 5, 4, 12, 1.5e6),
    "fcdensenet67": ((5,) * 5, 5, 16, 3.5e6),
    "fcdensenet103": ((4, 5, 7, 10, 12), 15, 16, 9.4e6),
}


def tiramisu_params(blocks: tuple[int, ...], bottleneck: int, k: int, classes: int, c_in: int = 3) -> int:
    """Parameter count of FC-DenseNet from the paper's Table 1 layout."""

    def dense(c: int, n: int) -> int:  # BN (2c) + 3x3 conv to k with bias, per layer
        return sum(2 * (c + i * k) + (c + i * k) * k * 9 + k for i in range(n))

    total, c, skips = c_in * 48 * 9 + 48, 48, []
    for n in blocks:
        total += dense(c, n)
        c += n * k
        skips.append(c)
        total += 2 * c + c * c + c  # transition down: BN + 1x1 conv
    total += dense(c, bottleneck)
    up = bottleneck * k
    for n, skip in zip(reversed(blocks), reversed(skips)):
        total += up * up * 9 + up  # transition up on the new maps only
        c = up + skip
        total += dense(c, n)
        c, up = c + n * k, n * k
    return total + c * classes + classes


@pytest.mark.parametrize("name", sorted(TIRAMISU))
def test_fcdensenet_parameter_counts(name: str) -> None:
    blocks, bottleneck, k, paper = TIRAMISU[name]
    model = meta_model(name, num_classes=11)
    count = n_params(model)
    assert count == tiramisu_params(blocks, bottleneck, k, 11)
    assert abs(count - paper) / paper < 0.10
    # Transition up sees only the new maps of the block below it.
    news = [k * n for n in (bottleneck, *reversed(blocks[1:]))]
    assert [t.conv.in_channels for t in model.trans_up] == news == [t.conv.out_channels for t in model.trans_up]
    assert all(t.conv.kernel_size == (3, 3) and t.conv.stride == (2, 2) for t in model.trans_up)


def test_fcdensenet_tiny_input() -> None:
    model = create_model("fcdensenet56", num_classes=5, in_channels=1).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 5, 7))
    assert out.shape == (2, 5, 5, 7)
    assert torch.isfinite(out).all()


def test_fcdensenet_memory_efficient_matches_plain() -> None:
    """Checkpointed dense layers: same outputs, gradients, BN statistics and state-dict keys."""
    assert meta_model("fcdensenet103", num_classes=11, memory_efficient=True).state_dict().keys() == (
        meta_model("fcdensenet103", num_classes=11).state_dict().keys()
    )
    torch.manual_seed(0)
    small = {"block_layers": (3, 3), "bottleneck_layers": 2, "growth_rate": 6, "first_channels": 8, "dropout": 0.2}
    plain = FCDenseNet(4, 3, **small)
    lean = FCDenseNet(4, 3, **small, memory_efficient=True)
    lean.load_state_dict(plain.state_dict())  # strict: the keys are the same
    x, y = torch.randn(2, 3, 20, 28), torch.randint(0, 4, (2, 20, 28))
    outputs = []
    for model in (plain, lean):
        torch.manual_seed(1)  # the same dropout masks; checkpoint must replay them in backward
        out = model.train()(x)
        F.cross_entropy(out, y).backward()
        outputs.append(out.detach())
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-6, atol=1e-6)
    grads = dict(plain.named_parameters())
    for name, p in lean.named_parameters():
        assert torch.allclose(p.grad, grads[name].grad, rtol=1e-5, atol=1e-7), name
    # Recomputation in backward does not update the running statistics a second time.
    for key, value in plain.state_dict().items():
        assert torch.equal(lean.state_dict()[key], value), key
