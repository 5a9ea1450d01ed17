"""DeconvNet and RefineNet: parameter counts from the released layouts, structure, unpooling routes, any-size inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pixelwise.models import create_model
from pixelwise.models.backbones import load_backbone_weights
from pixelwise.models.refinenet import ChainedResidualPooling, RefineNetBlock, ResidualConvUnit


def n_params(name: str, num_classes: int = 21, **kwargs: object) -> int:
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, **kwargs)
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- DeconvNet


def conv_bn(c_in: int, c_out: int, k: int) -> int:
    """A conv or deconv with bias, then BN (Caffe BN: scale + shift)."""
    return c_in * c_out * k * k + c_out + 2 * c_out


def test_deconvnet_parameter_count_follows_the_released_prototxt() -> None:
    # DeconvNet_inference_deploy.prototxt (github.com/HyeonwooNoh/DeconvNet): 13 VGG convs,
    # fc6 7x7 4096, fc7 1x1 4096, fc6-deconv 7x7 512, 13 3x3 deconvs, all with bias + BN;
    # seg-score 1x1 to 21 classes. The paper rounds the total to 252M.
    vgg = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256)]
    vgg += [(256, 512)] + [(512, 512)] * 5
    deconvs = [(512, 512)] * 5 + [(512, 256), (256, 256), (256, 256), (256, 128), (128, 128), (128, 64)]
    deconvs += [(64, 64), (64, 64)]
    total = sum(conv_bn(i, o, 3) for i, o in vgg + deconvs)
    total += conv_bn(512, 4096, 7) + conv_bn(4096, 4096, 1) + conv_bn(4096, 512, 7)
    total += 64 * 21 + 21
    assert n_params("deconvnet") == total == 251_805_653
    assert abs(total - 252e6) / 252e6 < 0.001


def test_deconvnet_encoder_is_torchvision_vgg16_bn_and_loads_it(tmp_path) -> None:
    small = dict(base_channels=4, fc_channels=8)
    model = create_model("deconvnet", num_classes=2, **small)
    assert "features.40.weight" in model.encoder.state_dict()  # vgg16_bn's conv5_3
    source = create_model("deconvnet", num_classes=2, **small).encoder
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in source.state_dict().items()}
    path = tmp_path / "vgg16_bn.pth"
    torch.save(state, path)
    load_backbone_weights(model.encoder, path)
    assert torch.equal(model.encoder.features[40].weight, state["features.40.weight"])


@pytest.mark.parametrize("size", [(224, 224), (37, 250), (230, 241)])
def test_deconvnet_unpools_with_its_mirror_pool_indices_at_any_size(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = create_model("deconvnet", num_classes=3, base_channels=4, fc_channels=8).eval()
    x = torch.randn(1, 3, *size)
    pooled, unpooled = [], []
    for _, pool in model.encoder.stages():
        pool.register_forward_hook(lambda mod, args, out: pooled.append((args[0], out[1])))
    for decoder in model.decoders:
        decoder.register_forward_pre_hook(lambda mod, args: unpooled.append(args[0]))
    fc6_out = []
    model.fc6.register_forward_hook(lambda mod, args, out: fc6_out.append(out.shape[-2:]))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, 3, *size)
    # Sides under 224 are mirror-padded to 224: pool5 is then at least 7 x 7 and fc6 (7x7, no pad) fits.
    padded = [max(s, 224) for s in size]
    pool5 = [-(-s // 32) for s in padded]
    assert tuple(fc6_out[0]) == (pool5[0] - 6, pool5[1] - 6)
    # Each unpooling puts the values back where its mirror pool found the maxima; elsewhere zeros.
    for (before, idx), up in zip(reversed(pooled), unpooled):
        assert up.shape == before.shape
        flat = up.flatten(2)
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(2, idx.flatten(2), True)
        assert torch.count_nonzero(flat[~mask]) == 0


def test_deconvnet_224_input_has_1x1_fc7_and_7x7_fc6_deconv() -> None:
    model = create_model("deconvnet", num_classes=2, base_channels=4, fc_channels=8).eval()
    shapes = []
    model.fc7.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape)))
    model.fc6_deconv.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape)))
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert shapes == [(1, 8, 1, 1), (1, 32, 7, 7)]


# ---------------------------------------------------------------------------- RefineNet


def refinenet_params(resnet: int, c: tuple[int, int, int, int], k: int, crp: int) -> int:
    """RefineNet-4 cascade on ResNet stages with channels ``c`` (c2..c5), widths 256 / 512."""
    conv = lambda i, o, bias=False: i * o * 9 + (o if bias else 0)  # noqa: E731
    rcu = lambda w: 2 * conv(w, w, bias=True)  # noqa: E731
    total = resnet + sum(conv(ci, w) for ci, w in zip(c, (256, 256, 256, 512)))
    total += 3 * rcu(512) + crp * conv(512, 512)  # RefineNet-4: 2 RCUs, CRP, output RCU
    # RefineNet-3: RCUs on the 256 path and on RefineNet-4's 512 output, fusion convs to 256.
    total += 2 * rcu(256) + 2 * rcu(512) + conv(256, 256) + conv(512, 256) + crp * conv(256, 256) + rcu(256)
    for _ in range(2):  # RefineNet-2 and -1: two 256 paths
        total += 4 * rcu(256) + 2 * conv(256, 256) + crp * conv(256, 256) + rcu(256)
    return total + 2 * rcu(256) + 256 * k + k


@pytest.mark.parametrize("crp", [2, 4])
def test_refinenet_parameter_counts(crp: int) -> None:
    resnet101 = 44_549_160 - 2_049_000
    expected = refinenet_params(resnet101, (256, 512, 1024, 2048), 21, crp)
    assert n_params("refinenet", crp_blocks=crp) == expected
    assert expected == {2: 109_758_293, 4: 118_015_829}[crp]
    resnet18 = 11_689_512 - 513_000
    assert n_params("refinenet", backbone="resnet18", crp_blocks=crp) == refinenet_params(resnet18, (64, 128, 256, 512), 21, crp)


def test_rcu_and_chained_residual_pooling_match_their_definitions() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 11)
    rcu = ResidualConvUnit(4)
    direct = x + rcu.conv2(F.relu(rcu.conv1(F.relu(x))))
    torch.testing.assert_close(rcu(x), direct)
    crp = ChainedResidualPooling(4, blocks=3)
    r = F.relu(x)
    p1 = crp.convs[0](F.max_pool2d(r, 5, 1, 2))
    p2 = crp.convs[1](F.max_pool2d(p1, 5, 1, 2))
    p3 = crp.convs[2](F.max_pool2d(p2, 5, 1, 2))
    torch.testing.assert_close(crp(x), r + p1 + p2 + p3)
    assert len(ChainedResidualPooling(4).convs) == 2  # the CVPR paper's two pooling blocks


def test_multi_resolution_fusion_adapts_to_the_smallest_width_and_upsamples_to_the_finest() -> None:
    torch.manual_seed(0)
    block = RefineNetBlock((3, 5), crp_blocks=1)
    fine, coarse = torch.randn(1, 3, 8, 10), torch.randn(1, 5, 4, 5)
    assert block.out_channels == 3
    a, b = block.adapt[0](fine), block.adapt[1](coarse)
    fused = block.fuse[0](a) + F.interpolate(block.fuse[1](b), size=(8, 10), mode="bilinear", align_corners=False)
    torch.testing.assert_close(block(fine, coarse), block.out(block.crp(fused)))
    single = RefineNetBlock((5,))
    assert single.fuse is None
    torch.testing.assert_close(single(coarse), single.out(single.crp(single.adapt[0](coarse))))


def test_refinenet_refines_stride_32_to_stride_4_with_256_and_512_channels() -> None:
    torch.manual_seed(0)
    model = create_model("refinenet", num_classes=3, backbone="resnet18").eval()
    shapes = []
    for block in model.refine:
        block.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape)))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    # Hooks fire RefineNet-4 first: stride 32 with 512 channels, then 16, 8, 4 with 256.
    assert shapes == [(1, 512, 2, 3), (1, 256, 4, 6), (1, 256, 8, 12), (1, 256, 16, 24)]
    assert out.shape == (1, 3, 64, 96)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.refine.modules())  # BN removed (Sec. 3.2)
    with pytest.raises(ValueError, match="backbone='xception65'"):
        create_model("refinenet", num_classes=3, backbone="xception65")
    with pytest.raises(ValueError, match="crp_blocks"):
        create_model("refinenet", num_classes=3, crp_blocks=0)
