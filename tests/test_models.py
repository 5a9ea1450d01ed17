"""One shared test over the registry: every dense model, any input size, forward and backward."""

from __future__ import annotations

import pytest
import torch

from pixelwise.models import create_model, list_models


@pytest.mark.parametrize("name", list_models(kind="dense"))
def test_logits_at_input_size_and_gradients_flow(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=3)
    x = torch.randn(2, 3, 97, 131)
    out = model(x)
    assert out.shape == (2, 3, 97, 131)
    assert torch.isfinite(out).all()
    # Cross-entropy on random labels: every trainable parameter must receive a gradient.
    loss = torch.nn.functional.cross_entropy(out, torch.randint(0, 3, (2, 97, 131)))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


@pytest.mark.parametrize("name", list_models(kind="dense"))
def test_grey_input_and_eval_mode(name: str) -> None:
    model = create_model(name, num_classes=2, in_channels=1).eval()
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
