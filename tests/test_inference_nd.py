"""N-D overlap-tile: the sliding-window machinery on volumes (N, C, D, H, W), against whole-volume references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pixelwise import inference
from pixelwise.inference import importance_map, importance_map_nd, sliding_window, sliding_window_labels, window_starts


class Pointwise3d(nn.Module):
    """Per-voxel function of the input: 3 * tanh(1x1x1 conv), C -> K."""

    spatial_dims = 3

    def __init__(self, in_channels: int = 2, num_classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(in_channels, num_classes, 1).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * torch.tanh(self.conv(x))


class ValidMean(nn.Module):
    """Valid-convolution volume model: logits = box mean over the (2m+1) neighbourhood per axis, margins (m_d, m_h, m_w)."""

    spatial_dims = 3

    def __init__(self, margins: tuple[int, int, int]) -> None:
        super().__init__()
        self.valid_margin = margins

    def forward_valid(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(x, [2 * m + 1 for m in self.valid_margin], stride=1)


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(1)


@pytest.mark.parametrize(
    ("shape", "tile", "overlap", "blend", "pad"),
    [
        ((2, 2, 9, 13, 11), (4, 6, 5), 0.25, "gaussian", "reflect"),  # several windows on every axis
        ((1, 2, 3, 5, 4), (8, 8, 8), 0.5, "constant", "reflect"),  # volume smaller than the tile
        ((1, 2, 7, 6, 10), 4, 0.0, "gaussian", "constant"),  # int tile from the model's spatial_dims
    ],
)
def test_per_voxel_predictor_matches_the_whole_volume(shape, tile, overlap, blend, pad):
    model = Pointwise3d()
    volume = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    probs = sliding_window(model, volume, tile=tile, overlap=overlap, blend=blend, pad=pad)
    torch.testing.assert_close(probs, _probs(model(volume)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("margins", "shape", "tile"), [((1, 2, 2), (6, 9, 8), (5, 8, 7)), ((3, 5, 4), (2, 3, 4), (9, 12, 11))])
def test_valid_model_sees_the_volume_mirrored_repeatedly(margins, shape, tile):
    """Per-axis margins; in the second case the margins exceed the volume, so the reflection repeats."""
    model = ValidMean(margins)
    volume = torch.randn(1, 3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    padded = np.pad(volume.numpy(), [(0, 0), (0, 0), *((m, m) for m in margins)], mode="reflect")
    expected = _probs(model.forward_valid(torch.from_numpy(padded)))
    probs = sliding_window(model, volume, tile=tile, overlap=0.25)
    torch.testing.assert_close(probs, expected, rtol=1e-12, atol=1e-12)


def test_volume_of_single_sections_equals_the_2d_tiling_of_each_section():
    """The N-D path with a (1, h, w) tile reproduces the 2D path section by section (spatial 3x3 model)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()

    def per_section(x: torch.Tensor) -> torch.Tensor:  # (B, C, d, h, w) -> (B, K, d, h, w)
        b, c, d, h, w = x.shape
        y = conv(x.transpose(1, 2).reshape(b * d, c, h, w))
        return y.reshape(b, d, -1, h, w).transpose(1, 2)

    volume = torch.randn(1, 2, 4, 19, 23, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    probs = sliding_window(per_section, volume, tile=(1, 8, 8), overlap=0.25)
    for d in range(4):
        planar = sliding_window(conv, volume[:, :, d], tile=8, overlap=0.25)
        torch.testing.assert_close(probs[:, :, d], planar, rtol=1e-12, atol=1e-12)


def test_slab_buffer_does_not_grow_with_volume_depth(monkeypatch):
    buffers, popped = [], []

    class Recording(inference._StripAccumulator):
        def __init__(self, *args):
            super().__init__(*args)
            buffers.append(self)

        def blend(self, rows):
            done = super().blend(rows)
            popped.append(done.shape[2])
            return done

    monkeypatch.setattr(inference, "_StripAccumulator", Recording)
    model = Pointwise3d(in_channels=1, num_classes=2)
    sizes = {}
    for depth in (32, 128):
        buffers.clear()
        popped.clear()
        volume = torch.randn(1, depth, 12, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        labels = sliding_window_labels(model, volume, tile=(8, 8, 8), overlap=0.5)
        assert len(buffers) == 1
        sizes[depth] = (tuple(buffers[0].probs.shape), tuple(buffers[0].weight.shape))
        assert sum(popped) == depth and max(popped) <= 8
        assert len(popped) == len(window_starts(depth, 8, 4))
        assert torch.equal(labels.long(), model(volume[None])[0].argmax(0))
    # K x tile_d x H x W, the same for a volume four times deeper.
    assert sizes[32] == sizes[128] == ((1, 2, 8, 12, 10), (8, 12, 10))


def test_importance_map_nd_is_the_outer_product_of_the_2d_map():
    w3 = importance_map_nd((5, 6, 7), "gaussian", sigma_scale=0.2)
    w1 = importance_map_nd((5,), "gaussian", sigma_scale=0.2)
    torch.testing.assert_close(w3, (w1[:, None, None] * importance_map(6, 7, "gaussian", 0.2)).clamp(min=1e-3))
    assert torch.equal(importance_map_nd((2, 3, 4), "constant"), torch.ones(2, 3, 4, dtype=torch.float64))


def test_volume_shape_errors_name_the_expected_layout():
    with pytest.raises(ValueError, match=r"\(N, C, D, H, W\)"):
        sliding_window(Pointwise3d(), torch.randn(2, 5, 6, 7, dtype=torch.float64), tile=(4, 4, 4))
    with pytest.raises(ValueError, match=r"one volume \(C, D, H, W\)"):
        sliding_window_labels(Pointwise3d(), torch.randn(1, 2, 5, 6, 7, dtype=torch.float64), tile=4)
    with pytest.raises(ValueError, match=r"tile must be .*\(depth, height, width\)"):
        sliding_window(Pointwise3d(), torch.randn(1, 2, 5, 6, 7, dtype=torch.float64), tile=(4, 4, 4, 4))
    with pytest.raises(ValueError, match=r"valid_margin = \(2, 4, 4\)"):
        sliding_window(ValidMean((1, 2, 2)), torch.randn(1, 1, 5, 6, 7), tile=(4, 4, 4))


def test_valid_3d_unet_tiled_on_its_stride_equals_one_whole_pass():
    """Anisotropic valid 3D U-Net (margins (6, 8, 8) at depth 1): windows at even offsets, so every
    tile sees the pooling phase of one whole-volume pass of the mirror-padded volume."""
    from pixelwise.models import create_model
    from pixelwise.models.layers import mirror_pad_nd

    torch.manual_seed(0)
    model = create_model("unet3d_original", num_classes=3, in_channels=1, base_channels=2, depth=1, anisotropic=True).eval()
    assert model.valid_margin == (6, 8, 8)
    volume = torch.randn(1, 1, 6, 20, 20, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        whole = model.forward_valid(mirror_pad_nd(volume, [(6, 6), (8, 8), (8, 8)])).softmax(1)
    tiled = sliding_window(model, volume, tile=(14, 26, 26), overlap=0.0)  # outputs 2 x 10 x 10, starts 0/10
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-6)
