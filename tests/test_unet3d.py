"""3D U-Net (Çiçek et al., MICCAI 2016): paper parameter counts, valid tile sizes, any-size forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from pixelwise.cli import app
from pixelwise.models import create_model, list_models, spatial_dims

VOLUMETRIC = [name for name in list_models() if spatial_dims(name) == 3]


def _paper_count(model: nn.Module) -> int:
    """The paper's reading: conv weights + biases, up-convs without bias, BN parameters not counted."""
    return sum(p.numel() for m in model.modules() if not isinstance(m, nn.BatchNorm3d) for p in m.parameters(recurse=False))


@pytest.mark.parametrize("name", ["unet3d", "unet3d_original"])
def test_parameter_counts_match_the_paper(name: str) -> None:
    # Paper Sec. 2: "The architecture has 19069955 parameters in total" (3 input channels, 3 labels).
    with torch.device("meta"):
        model = create_model(name, num_classes=3, in_channels=3)
    assert _paper_count(model) == 19_069_955
    # PyTorch's BatchNorm3d adds a scale and shift per channel: 2 * 2336 conv output channels.
    assert sum(p.numel() for p in model.parameters()) == 19_074_627


def test_valid_form_maps_the_paper_tile_to_its_output() -> None:
    # Fig. 1: a 132 x 132 x 116 voxel tile gives a 44 x 44 x 28 output.
    with torch.device("meta"):
        model = create_model("unet3d_original", num_classes=3)
        out = model.forward_valid(torch.empty(1, 3, 116, 132, 132))
    assert tuple(out.shape) == (1, 3, 28, 44, 44)
    assert model.valid_margin == (132 - 44) // 2 == (116 - 28) // 2
    assert model.valid_input_size(44) == 132 and model.valid_input_size(28, axis=0) == 116
    with pytest.raises(ValueError, match="not valid along axis 2"):
        model.forward_valid(torch.empty(1, 3, 116, 132, 133))


def test_anisotropic_pooling_never_pools_depth() -> None:
    with torch.device("meta"):
        model = create_model("unet3d_original", num_classes=2, anisotropic=True)
        out = model.forward_valid(torch.empty(1, 3, 29, 92, 92))
    # Depth: seven double convs lose 4 each (28), no pooling; in-plane as isotropic: 92 -> 4.
    assert tuple(out.shape) == (1, 2, 1, 4, 4)
    assert model.valid_margin == (14, 44, 44)
    assert [m.kernel_size for m in model.modules() if isinstance(m, nn.MaxPool3d)] == [(1, 2, 2)]


@pytest.mark.parametrize("name", VOLUMETRIC)
@pytest.mark.parametrize("anisotropic", [False, True])
def test_any_size_volume_gives_logits_of_its_size_and_gradients(name: str, anisotropic: bool) -> None:
    torch.manual_seed(0)
    # depth 1 keeps the valid form's smallest tile at 18 voxels (92 at the paper's depth 3).
    model = create_model(name, num_classes=3, in_channels=1, base_channels=2, depth=1, anisotropic=anisotropic)
    x = torch.randn(1, 1, 5, 11, 14)
    out = model(x)
    assert out.shape == (1, 3, 5, 11, 14) and torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.randint(0, 3, (1, 5, 11, 14))).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_valid_form_is_translation_equivariant_by_its_total_stride() -> None:
    """Shifting the input by 8 voxels (the total pooling stride) shifts the valid output by 8."""
    torch.manual_seed(0)
    model = create_model("unet3d_original", num_classes=2, in_channels=1, base_channels=2, anisotropic=True).eval()
    x = torch.randn(1, 1, 29, 92, 100)
    with torch.no_grad():
        whole = model.forward_valid(x)  # (1, 2, 1, 4, 12)
        shifted = model.forward_valid(x[..., 8:])  # (1, 2, 1, 4, 4)
    assert whole.shape[-1] == 12 and shifted.shape[-1] == 4
    torch.testing.assert_close(shifted, whole[..., 8:12], rtol=1e-4, atol=1e-5)


def test_models_command_lists_3d_models_with_counts() -> None:
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    # 21 classes: the 3-class count plus 18 more 64-channel 1x1x1 filters with bias.
    assert f"{19_074_627 + 18 * 65:,}" in result.output
    assert "3D" in result.output
