"""Sliding-window / overlap-tile prediction, strip-wise labels and TTA against analytic predictors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pixelwise import inference
from pixelwise.inference import importance_map, predict_tta, sliding_window, sliding_window_labels, window_starts

# ---------------------------------------------------------------------------------------
# Analytic predictors
# ---------------------------------------------------------------------------------------


class Pointwise(nn.Module):
    """Per-pixel function of the input: 3 * tanh(1x1 conv), C -> K."""

    def __init__(self, in_channels: int = 3, num_classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * torch.tanh(self.conv(x))


def mult_two(x: torch.Tensor) -> torch.Tensor:
    """MONAI's analytic predictor: K = C logits equal to twice the patch."""
    return 2.0 * x


class ValidCorners(nn.Module):
    """Valid-convolution model: output (h - 2m, w - 2m) at p reads the input at p and at the far corners p +- m."""

    def __init__(self, margin: int) -> None:
        super().__init__()
        self.valid_margin = margin

    def forward_valid(self, x: torch.Tensor) -> torch.Tensor:
        m = self.valid_margin
        h, w = x.shape[-2] - 2 * m, x.shape[-1] - 2 * m
        centre = x[..., m : m + h, m : m + w]
        return 2 * centre - x[..., :h, :w] + 0.5 * x[..., 2 * m :, 2 * m :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Any-size forward (package convention): mirror-pad by the margin, then the valid pass."""
        m = self.valid_margin
        return self.forward_valid(F.pad(x, (m, m, m, m), mode="reflect"))


def valid_reference(image: torch.Tensor, margin: int, pad: str) -> torch.Tensor:
    """ValidCorners applied once to the whole image mirror-padded (numpy's reflect) or zero-padded by the margin."""
    mode = "reflect" if pad == "reflect" else "constant"
    padded = np.pad(image.numpy(), ((0, 0), (0, 0), (margin, margin), (margin, margin)), mode=mode)
    logits = ValidCorners(margin).forward_valid(torch.from_numpy(padded))
    return logits.sigmoid() if logits.shape[1] == 1 else logits.softmax(1)


# ---------------------------------------------------------------------------------------
# Window positions and weights
# ---------------------------------------------------------------------------------------


def test_window_starts_snap_last_window_to_the_edge():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(8, 8, 6) == [0]
    assert window_starts(100, 64, 48) == [0, 36]
    assert window_starts(5, 1, 1) == [0, 1, 2, 3, 4]


def test_gaussian_importance_map_matches_formula():
    w = importance_map(8, 6, "gaussian", sigma_scale=0.25)
    gy = np.exp(-((np.arange(8) - 3.5) ** 2) / (2 * 2.0**2))
    gx = np.exp(-((np.arange(6) - 2.5) ** 2) / (2 * 1.5**2))
    np.testing.assert_allclose(w.numpy(), np.maximum(np.outer(gy, gx), 1e-3), rtol=1e-12)
    tiny = importance_map(5, 5, "gaussian", sigma_scale=1e-9)  # sigma clamped to 1e-3: only the centre survives
    assert tiny[2, 2] == 1.0 and tiny.min() == pytest.approx(1e-3)
    assert torch.equal(importance_map(3, 4, "constant"), torch.ones(3, 4, dtype=torch.float64))


@pytest.mark.parametrize("size", [1, 2, 5])
def test_mirror_index_matches_numpy_reflect_for_pads_larger_than_the_image(size):
    idx, inside = inference._source_index(-13, size + 26, size, "reflect", torch.device("cpu"))
    assert inside is None
    np.testing.assert_array_equal(idx.numpy(), np.pad(np.arange(size), 13, mode="reflect" if size > 1 else "edge"))
    idx, inside = inference._source_index(-2, size + 4, size, "constant", torch.device("cpu"))
    np.testing.assert_array_equal(inside.numpy(), np.pad(np.ones(size, bool), 2))


def test_overlap_is_blended_with_the_gaussian_weights():
    """Two windows along x returning different constants: the overlap is their importance-weighted mean."""
    logits = iter([torch.tensor(-1.0), torch.tensor(2.0)])

    def two_constants(x: torch.Tensor) -> torch.Tensor:
        return next(logits).expand(x.shape[0], 1, *x.shape[-2:])

    out = sliding_window(two_constants, torch.zeros(1, 1, 8, 12), tile=8, overlap=0.5, batch=1)[0, 0]
    a, b = torch.sigmoid(torch.tensor([-1.0, 2.0])).double()
    g = np.exp(-((np.arange(8) - 3.5) ** 2) / 2.0)  # sigma = 0.125 * 8 = 1
    w = torch.from_numpy(np.maximum(np.outer(g, g), 1e-3))
    left, right = torch.zeros(8, 12, dtype=torch.float64), torch.zeros(8, 12, dtype=torch.float64)
    left[:, :8], right[:, 4:] = w, w
    expected = (left * a + right * b) / (left + right)
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=0)
    assert out[3, 5] != pytest.approx((a + b).item() / 2, abs=0.05)  # not a plain average


# ---------------------------------------------------------------------------------------
# Exactness: tiling an analytic predictor changes nothing
# ---------------------------------------------------------------------------------------

SAME_CASES = [
    # (N, C, H, W), tile, overlap, batch, blend, pad
    ((1, 3, 64, 64), 32, 0.25, 4, "gaussian", "reflect"),  # 2D, tiles fit
    ((2, 3, 37, 53), 16, 0.5, 3, "constant", "reflect"),  # odd sizes, two images
    ((1, 3, 20, 30), 64, 0.25, 4, "gaussian", "reflect"),  # image smaller than the tile
    ((1, 3, 20, 30), 64, 0.25, 4, "gaussian", "constant"),  # ... zero padding
    ((1, 3, 50, 10), (16, 32), 0.0, 1, "gaussian", "reflect"),  # overlap 0, one side smaller
    ((2, 3, 31, 47), 17, 0.75, 5, "constant", "constant"),  # high overlap, odd tile
    ((1, 3, 9, 7), 1, 0.0, 7, "gaussian", "reflect"),  # 1-pixel tiles
    ((1, 3, 1, 1), 5, 0.25, 2, "gaussian", "reflect"),  # 1-pixel image
]


@pytest.mark.parametrize(("shape", "tile", "overlap", "batch", "blend", "pad"), SAME_CASES)
@pytest.mark.parametrize(
    "model", [Pointwise(), mult_two, Pointwise(num_classes=1)], ids=["conv", "mult_two", "sigmoid"]
)
def test_sliding_window_equals_whole_image(shape, tile, overlap, batch, blend, pad, model):
    image = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(image)
    expected = logits.sigmoid() if logits.shape[1] == 1 else logits.softmax(1)
    probs = sliding_window(model, image, tile=tile, overlap=overlap, batch=batch, blend=blend, pad=pad)
    assert probs.shape == expected.shape and probs.dtype == torch.float32
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=0)


VALID_CASES = [
    # (N, C, H, W), margin, tile, overlap, batch, blend, pad
    ((1, 2, 37, 53), 3, 16, 0.25, 4, "gaussian", "reflect"),
    ((2, 2, 37, 53), 3, (16, 20), 0.0, 3, "constant", "reflect"),
    ((1, 2, 5, 7), 4, 20, 0.5, 2, "gaussian", "reflect"),  # image smaller than the output tile; pads > image
    ((1, 2, 5, 7), 4, 20, 0.5, 2, "gaussian", "constant"),
    ((1, 2, 10, 10), 3, 16, 0.0, 1, "constant", "reflect"),  # image == output tile: one window
    ((1, 2, 23, 19), 0, 8, 0.5, 4, "gaussian", "reflect"),  # margin 0
]


@pytest.mark.parametrize(("shape", "margin", "tile", "overlap", "batch", "blend", "pad"), VALID_CASES)
def test_overlap_tile_valid_model_equals_whole_padded_image(shape, margin, tile, overlap, batch, blend, pad):
    image = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    probs = sliding_window(ValidCorners(margin), image, tile=tile, overlap=overlap, batch=batch, blend=blend, pad=pad)
    torch.testing.assert_close(probs, valid_reference(image, margin, pad), atol=1e-5, rtol=0)


def test_original_unet_geometry_572_in_388_out():
    calls = []

    class Recording(ValidCorners):
        def forward_valid(self, x):
            out = super().forward_valid(x)
            calls.append((tuple(x.shape[-2:]), tuple(out.shape[-2:])))
            return out

    image = torch.randn(1, 1, 500, 420, generator=torch.Generator().manual_seed(3))
    probs = sliding_window(Recording(92), image, tile=572, overlap=0.0, batch=1, blend="constant")
    assert calls == [((572, 572), (388, 388))] * 4  # windows at 0 and 112 (rows), 0 and 32 (cols)
    torch.testing.assert_close(probs, valid_reference(image, 92, "reflect"), atol=1e-5, rtol=0)


def test_tiles_are_batched_and_every_window_is_run_once():
    sizes = []

    def counting(x):
        sizes.append(x.shape[0])
        return x

    image = torch.randn(2, 3, 37, 53)
    sliding_window(counting, image, tile=16, overlap=0.5, batch=4)
    n_windows = len(window_starts(37, 16, 8)) * len(window_starts(53, 16, 8))
    assert (len(window_starts(37, 16, 8)), len(window_starts(53, 16, 8))) == (4, 6)
    assert sum(sizes) == 2 * n_windows
    assert max(sizes) == 4
    # tiles are batched within one strip of windows: 2 images x 6 columns = 12 tiles = 3 calls of 4
    assert sizes == [4, 4, 4] * 4


def test_output_is_an_ordinary_tensor():
    probs = sliding_window(Pointwise(), torch.randn(1, 3, 20, 20), tile=8)
    assert not probs.is_inference() and not probs.requires_grad
    probs.mul_(2)  # in-place ops on inference tensors outside inference mode would raise


# ---------------------------------------------------------------------------------------
# Strip-wise labels
# ---------------------------------------------------------------------------------------


class Spatial(nn.Module):
    """3x3 convolutions: tiles disagree near their borders, so blending matters."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, num_classes, 3, padding=1))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize(("shape", "tile", "overlap", "blend"), [((3, 70, 45), 16, 0.5, "gaussian"),
                                                                  ((3, 33, 70), (12, 20), 0.25, "constant"),
                                                                  ((3, 9, 11), (6, 16), 0.25, "gaussian")])
def test_labels_equal_argmax_of_sliding_window(shape, tile, overlap, blend):
    model = Spatial().eval()
    image = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    probs = sliding_window(model, image[None], tile=tile, overlap=overlap, blend=blend)
    with torch.no_grad():
        assert (probs[0].argmax(0) != model(image[None])[0].argmax(0)).any()  # tiling changed something
    labels = sliding_window_labels(model, image, tile=tile, overlap=overlap, blend=blend)
    assert labels.shape == shape[1:] and labels.dtype == torch.uint8
    assert torch.equal(labels.long(), probs[0].argmax(0))


def test_labels_strip_buffer_does_not_grow_with_image_height(monkeypatch):
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
    model = Spatial(num_classes=6).eval()
    for height in (64, 400):
        buffers.clear()
        popped.clear()
        image = torch.randn(3, height, 40, generator=torch.Generator().manual_seed(5))
        labels = sliding_window_labels(model, image, tile=16, overlap=0.25)
        assert len(buffers) == 1  # one buffer, reused for every strip
        assert tuple(buffers[0].probs.shape) == (1, 6, 16, 40)  # K x tile_h x W, independent of H
        assert tuple(buffers[0].weight.shape) == (16, 40)
        assert sum(popped) == height and max(popped) <= 16
        assert len(popped) == len(window_starts(height, 16, 12))
        expected = sliding_window(model, image[None], tile=16, overlap=0.25)[0].argmax(0)
        assert torch.equal(labels.long(), expected)


def test_label_dtype_and_binary_threshold():
    image = torch.randn(3, 12, 10, generator=torch.Generator().manual_seed(6))
    binary = Pointwise(num_classes=1)
    with torch.no_grad():
        expected = (binary(image[None])[0, 0] > 0).to(torch.uint8)
    assert torch.equal(sliding_window_labels(binary, image, tile=8), expected)
    many = Pointwise(num_classes=300)
    labels = sliding_window_labels(many, image, tile=8)
    assert labels.dtype == torch.int16
    with torch.no_grad():
        assert torch.equal(labels.long(), many(image[None])[0].argmax(0))


# ---------------------------------------------------------------------------------------
# Test-time augmentation
# ---------------------------------------------------------------------------------------


class LeftRight(nn.Module):
    """Not flip-equivariant: logits depend on the column index."""

    def forward(self, x):
        ramp = torch.linspace(-2, 2, x.shape[-1])
        return torch.stack([x[:, 0] * ramp, x[:, 1] - ramp, x[:, 2]], 1)


def test_flip_equivariant_model_is_unchanged_by_flip():
    image = torch.randn(2, 3, 17, 23, generator=torch.Generator().manual_seed(7))
    model = Pointwise()
    torch.testing.assert_close(predict_tta(model, image, flip=True), predict_tta(model, image), atol=1e-6, rtol=0)


def test_flip_average_equals_manual_average():
    image = torch.randn(1, 3, 17, 23, generator=torch.Generator().manual_seed(8))
    model = LeftRight()
    plain = model(image).softmax(1)
    flipped = model(image.flip(-1)).softmax(1).flip(-1)
    assert (plain - flipped).abs().max() > 0.1
    torch.testing.assert_close(predict_tta(model, image, flip=True), (plain + flipped) / 2, atol=1e-6, rtol=0)


def test_multiscale_equals_manual_resize_predict_resize():
    image = torch.randn(1, 3, 20, 30, generator=torch.Generator().manual_seed(9))
    model = LeftRight()
    manual = []
    for scale in (1.0, 0.5, 1.5):
        size = (round(20 * scale), round(30 * scale))
        small = F.interpolate(image, size=size, mode="bilinear", align_corners=False) if scale != 1.0 else image
        probs = model(small).softmax(1)
        manual.append(F.interpolate(probs, size=(20, 30), mode="bilinear", align_corners=False))
    expected = sum(manual) / 3
    torch.testing.assert_close(predict_tta(model, image, scales=(1.0, 0.5, 1.5)), expected, atol=1e-6, rtol=0)


def manual_tta(model, x, scales, flip):
    """Mean over scales (and the horizontal flip) of resize -> softmax(model) -> resize back, written out."""
    maps = []
    for scale in scales:
        size = (round(x.shape[-2] * scale), round(x.shape[-1] * scale))
        small = F.interpolate(x, size=size, mode="bilinear", align_corners=False) if scale != 1.0 else x
        for flipped in (False, True) if flip else (False,):
            probs = model(small.flip(-1) if flipped else small).softmax(1)
            probs = probs.flip(-1) if flipped else probs
            maps.append(F.interpolate(probs, size=x.shape[-2:], mode="bilinear", align_corners=False))
    return sum(maps) / len(maps)


def tiled_reference(model, image, tile, ys, xs, scales, flip, weight):
    """Brute force: every window (hand-listed starts) through manual_tta, weighted sum / weight sum."""
    total = torch.zeros(image.shape[0], 3, *image.shape[-2:], dtype=torch.float64)
    count = torch.zeros(image.shape[-2:], dtype=torch.float64)
    for y in ys:
        for x in xs:
            window = image[..., y : y + tile, x : x + tile]
            total[..., y : y + tile, x : x + tile] += manual_tta(model, window, scales, flip) * weight
            count[y : y + tile, x : x + tile] += weight
    return (total / count).float()


def test_tta_is_applied_to_every_tile():
    image = torch.randn(1, 3, 16, 24, generator=torch.Generator().manual_seed(10))
    model = LeftRight()  # not flip-equivariant: the flip matters
    tiled = predict_tta(model, image, scales=(1.0, 0.75), flip=True, tile=8, overlap=0.5, batch=2, blend="constant")
    expected = tiled_reference(model, image, 8, [0, 4, 8], [0, 4, 8, 12, 16], (1.0, 0.75), True, torch.ones(8, 8))
    torch.testing.assert_close(tiled, expected, atol=1e-6, rtol=0)
    # a tile covering the image is whole-image TTA
    torch.testing.assert_close(predict_tta(model, image, scales=(1.0, 0.75), flip=True, tile=(16, 24)),
                               manual_tta(model, image, (1.0, 0.75), True), atol=1e-6, rtol=0)


def test_tta_with_tiles_and_valid_model():
    image = torch.randn(1, 1, 30, 26, generator=torch.Generator().manual_seed(10))
    valid = ValidCorners(3)
    reference = valid_reference(image, 3, "reflect")
    torch.testing.assert_close(predict_tta(valid, image), reference, atol=1e-5, rtol=0)  # forward
    torch.testing.assert_close(predict_tta(valid, image, tile=12), reference, atol=1e-5, rtol=0)  # forward_valid
    with pytest.raises(ValueError, match="same-size model"):
        predict_tta(valid, image, scales=(1.0, 0.5), tile=12)


def test_tile_larger_than_the_image_is_clamped_to_it():
    sizes = []

    def recording(x):
        sizes.append(tuple(x.shape[-2:]))
        return mult_two(x)

    image = torch.randn(1, 3, 64, 40, generator=torch.Generator().manual_seed(12))
    probs = sliding_window(recording, image, tile=4096)
    assert sizes == [(64, 40)]  # one window, the image itself: no 4096 x 4096 padding
    torch.testing.assert_close(probs, (2 * image).softmax(1), atol=1e-6, rtol=0)
    sizes.clear()
    sliding_window_labels(recording, image[0], tile=(32, 4096), overlap=0.5)
    assert sorted(set(sizes)) == [(32, 40)]


def test_predict_picks_the_path():
    image = torch.randn(1, 3, 19, 24, generator=torch.Generator().manual_seed(11))
    model = LeftRight()
    with torch.no_grad():
        whole = model(image).softmax(1)
    plain = inference.predict(model, image)
    torch.testing.assert_close(plain, whole, atol=1e-6, rtol=0)
    assert not plain.is_inference()
    tiled = inference.predict(model, image, tile=10, overlap=0.5, batch=3, scales=(1.0, 0.5), flip=True)
    gaussian = torch.exp(-((torch.arange(10.0, dtype=torch.float64) - 4.5) ** 2) / (2 * 1.25**2))
    weight = (gaussian[:, None] * gaussian).clamp(min=1e-3)  # importance map: sigma = 0.125 * 10, peak 1
    expected = tiled_reference(model, image, 10, [0, 5, 9], [0, 5, 10, 14], (1.0, 0.5), True, weight)
    torch.testing.assert_close(tiled, expected, atol=1e-6, rtol=0)
    assert (tiled - whole).abs().max() > 1e-3


@pytest.mark.parametrize("scales", [(), (0.0,), (1.0, -0.5), (float("nan"),), ("1",)])
def test_tta_scales_are_validated(scales):
    with pytest.raises(ValueError, match="scales must be"):
        predict_tta(Pointwise(), torch.randn(1, 3, 8, 8), scales=scales)


def test_tta_sliding_options_need_a_tile():
    with pytest.raises(ValueError, match="pass tile"):
        predict_tta(Pointwise(), torch.randn(1, 3, 8, 8), overlap=0.5)


# ---------------------------------------------------------------------------------------
# Argument validation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"overlap": 1.0}, "overlap must be in"),
        ({"overlap": -0.1}, "overlap must be in"),
        ({"tile": 0}, "tile must be"),
        ({"tile": (16,)}, "tile must be"),
        ({"tile": (16, 0)}, "tile must be"),
        ({"tile": True}, "tile must be"),
        ({"tile": 8.0}, "tile must be"),
        ({"blend": "gauss"}, "blend must be one of"),
        ({"pad": "zeros"}, "pad must be one of"),
        ({"batch": 0}, "batch must be"),
        ({"sigma_scale": 0.0}, "sigma_scale must be"),
    ],
)
def test_sliding_window_validates_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sliding_window(Pointwise(), torch.randn(1, 3, 8, 8), **kwargs)


def test_wrong_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        sliding_window(Pointwise(), torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match=r"one image \(C, H, W\)"):
        sliding_window_labels(Pointwise(), torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"expected \(1, K, 8, 8\)"):
        sliding_window(lambda x: x[..., ::2, ::2], torch.randn(1, 3, 20, 20), tile=8, batch=1)
    with pytest.raises(ValueError, match="must exceed 2 \\* valid_margin = 8"):
        sliding_window(ValidCorners(4), torch.randn(1, 3, 20, 20), tile=8)


# ---------------------------------------------------------------------------------------
# Files in, files out: the CLI's predict path in bounded memory
# ---------------------------------------------------------------------------------------


@pytest.fixture()
def saved_model(tmp_path):
    from PIL import Image

    from pixelwise.models import create_model, save_model

    torch.manual_seed(0)
    model = create_model("unet", num_classes=6, base_channels=4, depth=2).eval()
    palette = [(40 * k, 255 - 40 * k, 7 * k) for k in range(6)]
    path = save_model(model, tmp_path / "model", {"palette": palette, "mean": [0.5] * 3, "std": [0.25] * 3})
    rng = np.random.default_rng(0)
    image = tmp_path / "big.png"
    Image.fromarray(rng.integers(0, 256, (96, 64, 3), dtype=np.uint8)).save(image)
    return path, image


def test_predict_files_with_tile_never_holds_k_by_h_by_w(saved_model, tmp_path, monkeypatch):
    from pixelwise import export
    from pixelwise.io import read_image, read_mask

    path, image = saved_model
    buffers, outputs = [], []

    class Recording(inference._StripAccumulator):
        def __init__(self, *args):
            super().__init__(*args)
            buffers.append(tuple(self.probs.shape))

    def no_full_probabilities(*args, **kwargs):
        raise AssertionError("predict_files with a tile must not build (N, K, H, W) probabilities")

    real_prepare = export.prepare_for_cpu

    def recording_prepare(*args, **kwargs):
        predictor = real_prepare(*args, **kwargs)

        def run(x):
            logits = predictor(x)
            outputs.append(tuple(logits.shape))
            return logits

        return run

    monkeypatch.setattr(inference, "_StripAccumulator", Recording)
    monkeypatch.setattr(inference, "predict", no_full_probabilities)
    monkeypatch.setattr(inference, "sliding_window", no_full_probabilities)
    monkeypatch.setattr(export, "prepare_for_cpu", recording_prepare)
    inference.predict_files([image], path, tmp_path / "out", tile=16, scales=(1.0, 0.5), flip=True)
    assert buffers == [(1, 6, 16, 64)]  # one K x tile x W strip for a 96-row image
    assert {shape[1:] for shape in outputs} == {(6, 16, 16), (6, 8, 8)}  # tiles and their 0.5x copies only
    assert len(outputs) == 2 * 2 * len(window_starts(96, 16, 12)) * len(window_starts(64, 16, 12))
    # independently: the whole-probability path of the same predictor, argmax
    monkeypatch.undo()
    from pixelwise.models import load_model

    net, _ = load_model(path)
    x = (torch.from_numpy(read_image(image)).float().permute(2, 0, 1) / 255 - 0.5) / 0.25
    predictor = export.prepare_for_cpu(net.eval(), "torch")
    expected = sliding_window(predictor, x[None], tile=16, scales=(1.0, 0.5), flip=True)[0].argmax(0)
    assert np.array_equal(read_mask(tmp_path / "out" / "big_labels.png"), expected.numpy())


def test_crf_on_an_image_too_big_for_memory_says_what_it_needs(saved_model, tmp_path, monkeypatch):
    path, image = saved_model
    pages = {"SC_AVPHYS_PAGES": 10, "SC_PAGE_SIZE": 4096}  # 40 KiB free; 96 * 64 px * (550 + 80 * 6) B = 6 MiB
    monkeypatch.setattr(inference.os, "sysconf", lambda name: pages[name])
    with pytest.raises(ValueError, match=r"--crf on .*big.png \(96 x 64, 6 classes\) needs about 6 MiB"):
        inference.predict_files([image], path, tmp_path / "out", tile=16, crf="deeplab_v2")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_fixed_size_predictor_runs_smaller_tiles_padded_and_refuses_larger():
    sizes = []

    def graph(x):  # like an exported ONNX file: one input size only
        assert tuple(x.shape[-2:]) == (16, 16)
        sizes.append(tuple(x.shape))
        return 2.0 * x

    fixed = inference._FixedSize(graph, (16, 16))
    image = torch.randn(1, 3, 12, 20, generator=torch.Generator().manual_seed(13))
    probs = sliding_window(fixed, image, tile=16, overlap=0.5, flip=True)  # tile clamped to 12 x 16
    torch.testing.assert_close(probs, (2 * image).softmax(1), atol=1e-6, rtol=0)  # pointwise: padding is invisible
    sliding_window(fixed, image, tile=16, overlap=0.5, scales=(0.5,))  # 6 x 8 tiles, padded too
    assert len(sizes) == 2 * 2 + 2  # 2 windows (x = 0, 4; step 8), flipped too; then 2 at scale 0.5
    with pytest.raises(ValueError, match="runs 16x16 inputs, got 24x24"):
        fixed(torch.zeros(1, 3, 24, 24))
