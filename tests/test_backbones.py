"""Backbones: torchvision-compatible keys, parameter counts, exact output-stride switching, local loading."""

from __future__ import annotations

import pytest
import torch

from pixelwise.models.backbones import ResNet, VGG16, create_backbone, load_backbone_weights

# torchvision's counts minus the ImageNet classifier (fc: 2048*1000+1000, 512*1000+1000).
RESNET_PARAMS = {18: 11_689_512 - 513_000, 34: 21_797_672 - 513_000, 50: 25_557_032 - 2_049_000, 101: 44_549_160 - 2_049_000}
# torchvision's state_dict() lengths (with num_batches_tracked) minus fc.weight and fc.bias.
RESNET_KEYS = {18: 120, 50: 318, 101: 624}


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_resnet_parameter_count_matches_torchvision(depth: int) -> None:
    with torch.device("meta"):
        net = ResNet(depth)
    assert sum(p.numel() for p in net.parameters()) == RESNET_PARAMS[depth]
    if depth in RESNET_KEYS:
        assert len(net.state_dict()) == RESNET_KEYS[depth]


def test_resnet_key_names_follow_torchvision() -> None:
    keys = set(ResNet(50).state_dict())
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.bias",
                "layer3.5.conv3.weight", "layer4.2.bn3.num_batches_tracked"):
        assert key in keys


def test_vgg16_parameter_counts_and_keys() -> None:
    with torch.device("meta"):
        plain, bn = VGG16(), VGG16(batch_norm=True)
    assert sum(p.numel() for p in plain.parameters()) == 14_714_688
    assert sum(p.numel() for p in bn.parameters()) == 14_723_136
    assert "features.28.weight" in plain.state_dict() and "features.40.weight" in bn.state_dict()
    assert [len(convs) for convs, _ in plain.stages()] == [4, 4, 6, 6, 6]


@pytest.mark.parametrize("depth", [18, 50])
def test_output_stride_8_computes_the_stride_16_features_densely(depth: int) -> None:
    torch.manual_seed(0)
    net = ResNet(depth, output_stride=16).eval()
    x = torch.randn(1, 3, 97, 129)
    with torch.no_grad():
        c5_16 = net(x)["c5"]
        net.set_output_stride(8)
        c5_8 = net(x)["c5"]
    assert c5_8.shape[-2:] == (13, 17) and c5_16.shape[-2:] == (7, 9)
    torch.testing.assert_close(c5_8[..., ::2, ::2], c5_16, rtol=1e-4, atol=1e-4)


def test_multi_grid_rates_are_unit_rates_times_the_block_rate() -> None:
    # DeepLab v3, Sec. 3.2: "when output_stride = 16 and Multi_Grid = (1, 2, 4), the three
    # convolutions will have rates = 2 * (1, 2, 4) = (2, 4, 8) in the block4".
    net = ResNet(50, output_stride=16, multi_grid=(1, 2, 4))
    assert [b.conv2.dilation[0] for b in net.layer4] == [2, 4, 8]
    assert [b.conv2.padding[0] for b in net.layer4] == [2, 4, 8]
    assert [b.conv2.stride[0] for b in net.layer4] == [1, 1, 1]
    net.set_output_stride(8, (1, 2, 4))  # block rate 4
    assert [b.conv2.dilation[0] for b in net.layer4] == [4, 8, 16]
    assert [b.conv2.dilation[0] for b in net.layer3] == [1] + [2] * 5
    net.set_output_stride(32, (1, 2, 4))  # no atrous block: the unit rates themselves
    assert [b.conv2.dilation[0] for b in net.layer4] == [1, 2, 4]
    assert [b.conv2.stride[0] for b in net.layer4] == [2, 1, 1]
    # Without multi-grid: torchvision's replace_stride_with_dilation, first block at the old rate.
    net.set_output_stride(16)
    assert [b.conv2.dilation[0] for b in net.layer4] == [1, 2, 2]
    with pytest.raises(ValueError, match="multi_grid"):
        net.set_output_stride(16, (1, 2))
    with pytest.raises(ValueError, match="output_stride=4"):
        net.set_output_stride(4)


def test_multi_grid_output_stride_8_computes_the_stride_16_features_densely() -> None:
    torch.manual_seed(0)
    net = ResNet(50, output_stride=16, multi_grid=(1, 2, 4)).eval()
    x = torch.randn(1, 3, 33, 49)
    with torch.no_grad():
        c5_16 = net(x)["c5"]
        net.set_output_stride(8, (1, 2, 4))
        c5_8 = net(x)["c5"]
    torch.testing.assert_close(c5_8[..., ::2, ::2], c5_16, rtol=1e-4, atol=1e-4)


def test_deep_stem_is_three_3x3_convs_and_keeps_the_strides() -> None:
    with torch.device("meta"):
        deep, standard = ResNet(50, stem="deep"), ResNet(50)
    convs = [m for m in deep.conv1 if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 64, (3, 3), (2, 2)), (64, 64, (3, 3), (1, 1)), (64, 128, (3, 3), (1, 1))
    ]
    # Extra parameters: the three convs and two BNs replace the 7x7 conv, bn1 doubles, and
    # layer1.0 reads 128 instead of 64 channels (conv1 1x1 to 64, downsample 1x1 to 256).
    extra = (3 * 64 * 9 + 64 * 64 * 9 + 64 * 128 * 9 + 2 * 2 * 64) - 3 * 64 * 49 + 2 * 64 + 64 * 64 + 64 * 256
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(deep) - n(standard) == extra
    x = torch.randn(1, 3, 33, 47)
    feats = ResNet(18, stem="deep").eval()(x)
    assert feats["c1"].shape == (1, 128, 17, 24) and feats["c5"].shape[-2:] == (2, 2)
    with pytest.raises(ValueError, match="stem='wide'"):
        ResNet(18, stem="wide")


def test_load_torchvision_style_checkpoint_from_local_file(tmp_path) -> None:
    torch.manual_seed(0)
    source = ResNet(18)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in source.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    net = create_backbone("resnet18", output_stride=8)
    skipped = load_backbone_weights(net, path)
    assert skipped == ["fc.bias", "fc.weight"]
    assert torch.equal(net.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    # A grey-image backbone takes the channel mean of the RGB filters.
    grey = ResNet(18, in_channels=1)
    load_backbone_weights(grey, path)
    torch.testing.assert_close(grey.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    # A state dict already in memory loads the same way.
    again = create_backbone("resnet18")
    assert load_backbone_weights(again, state) == skipped
    assert torch.equal(again.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_loading_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_backbone_weights(ResNet(18), tmp_path / "missing.pth")
    path = tmp_path / "vgg.pth"
    torch.save(VGG16().state_dict(), path)
    with pytest.raises(ValueError, match="vgg.pth.*lacks"):
        load_backbone_weights(ResNet(18), path)
