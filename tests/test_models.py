"""One shared test over the registry: every dense model, any input size, forward and backward."""

from __future__ import annotations

import pytest
import torch

from pixelwise.models import create_model, list_models, spatial_dims

PLANAR_MODELS = [name for name in list_models(kind="dense") if spatial_dims(name) == 2]  # 3D models: tests/test_unet3d.py

# Cheaper configurations for models whose defaults are slow on CPU; each default is counted
# and checked in its own test file (DeconvNet: 252M parameters; Xception-65: test_deeplab.py).
SMALL = {
    "deconvnet": {"base_channels": 8, "fc_channels": 64},
    "deeplabv3plus": {"backbone": "mobilenetv2"},
    "refinenet": {"backbone": "resnet18"},
}


@pytest.mark.parametrize("name", PLANAR_MODELS)
def test_logits_at_input_size_and_gradients_flow(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, **SMALL.get(name, {}))
    x = torch.randn(2, 3, 97, 131)
    out = model(x)
    assert out.shape == (2, 3, 97, 131)
    assert torch.isfinite(out).all()
    # Cross-entropy on random labels: every trainable parameter must receive a gradient.
    loss = torch.nn.functional.cross_entropy(out, torch.randint(0, 3, (2, 97, 131)))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


@pytest.mark.parametrize("name", PLANAR_MODELS)
def test_grey_input_and_eval_mode(name: str) -> None:
    model = create_model(name, num_classes=2, in_channels=1, **SMALL.get(name, {})).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 64, 80))
    assert out.shape == (1, 2, 64, 80)


def test_unknown_model_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="Valid names"):
        create_model("unett", num_classes=2)


def test_unknown_option_names_the_argument() -> None:
    name = list_models()[0]
    with pytest.raises(ValueError, match="does not take colour"):
        create_model(name, num_classes=2, colour="red")


def test_config_records_every_option_so_checkpoints_survive_default_changes(tmp_path) -> None:
    from pixelwise.models import load_model, save_model

    model = create_model("unet", num_classes=2, in_channels=1, base_channels=4, depth=2)
    assert model.config == {
        "name": "unet", "num_classes": 2, "in_channels": 1, "base_channels": 4, "depth": 2,
        "batch_norm": True, "upsampling": "transpose",
    }
    with torch.device("meta"):
        v3 = create_model("deeplabv3", num_classes=2)
    assert (v3.config["head"], v3.config["multi_grid"]) == ("paper", [1, 2, 4])
    save_model(model, tmp_path / "m.safetensors")
    again, _ = load_model(tmp_path / "m.safetensors")
    assert again.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value)


def test_save_model_load_model_round_trip(tmp_path) -> None:
    from pixelwise.models import load_model, save_model

    name, options = "unet", {"base_channels": 4, "depth": 2}
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_channels=2, **options)
    for module in model.modules():  # non-default BN statistics must survive too
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.num_batches_tracked.fill_(7)
    extra = {"class_names": list("abcde"), "mean": [0.25, 0.5], "palette": [[1, 2, 3]] * 5}
    path = save_model(model, tmp_path / "run" / "model_best", extra)
    assert path == tmp_path / "run" / "model_best.safetensors" and path.with_suffix(".json").is_file()
    loaded, loaded_extra = load_model(path)
    assert loaded_extra == extra and type(loaded) is type(model)
    assert loaded.config == model.config and {"num_classes": 5, "in_channels": 2, **options}.items() <= loaded.config.items()
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(1, 2, 33, 47)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded.eval()(x))


def test_input_norm_image_makes_predictions_invariant_to_gain_and_offset(tmp_path) -> None:
    from pixelwise.models import load_model, save_model

    torch.manual_seed(0)
    model = create_model("unet", num_classes=3, base_channels=4, depth=2, input_norm="image").eval()
    x = torch.rand(2, 3, 32, 48)
    darker = x * torch.tensor([0.3, 0.4, 0.5]).view(1, 3, 1, 1) + torch.tensor([0.05, 0.0, 0.1]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(darker), model(x), atol=1e-3)
        plain = create_model("unet", num_classes=3, base_channels=4, depth=2).eval()
        plain.load_state_dict(model.state_dict())  # same keys: the standardisation holds no weights
        assert not torch.allclose(plain(darker), plain(x), atol=1e-1)
        save_model(model, tmp_path / "m")
        loaded, _ = load_model(tmp_path / "m.safetensors")
        assert loaded.config["input_norm"] == "image"
        assert torch.equal(loaded.eval()(darker), model(darker))
    with pytest.raises(ValueError, match="input_norm='dataset' is not supported"):
        create_model("unet", num_classes=3, input_norm="dataset")
    with pytest.raises(ValueError, match="applies to dense models"):
        create_model("maskrcnn", num_classes=3, backbone="resnet18", input_norm="image")
