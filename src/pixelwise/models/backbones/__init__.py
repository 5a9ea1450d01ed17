"""Backbones: feature extractors returning ``{"c1": ..., "c5": ...}`` dicts of (N, C, h, w) maps.

``ci`` is the output of stage i (nominal stride 2**i). Each backbone has ``out_channels``
(a dict like its output) and, where it can dilate, ``output_stride`` and
``set_output_stride``. State-dict keys follow torchvision, and pretrained weights are only
ever read from a local file (:func:`load_backbone_weights`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from pixelwise.models.backbones.mobilenetv2 import MobileNetV2
from pixelwise.models.backbones.resnet import ResNet
from pixelwise.models.backbones.vgg import VGG16
from pixelwise.models.backbones.xception import Xception65

__all__ = [
    "MobileNetV2",
    "ResNet",
    "VGG16",
    "Xception65",
    "create_backbone",
    "load_backbone_weights",
    "read_state_dict",
]

RESNET_DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}
BACKBONES = (*RESNET_DEPTHS, "xception65", "mobilenetv2")


def create_backbone(
    name: str,
    in_channels: int = 3,
    output_stride: int = 32,
    multi_grid: Sequence[int] | None = None,
) -> nn.Module:
    """Build a dilatable backbone by name: ``resnet18/34/50/101``, ``xception65``, ``mobilenetv2``.

    ``multi_grid`` sets the rate multipliers of the last stage (ResNet: one per block of
    ``layer4``; Xception-65: three, for the convs of the last exit-flow block); MobileNetV2
    takes none.
    """
    if name in RESNET_DEPTHS:
        return ResNet(RESNET_DEPTHS[name], in_channels, output_stride, multi_grid)
    if name == "xception65":
        return Xception65(in_channels, output_stride, multi_grid)
    if name == "mobilenetv2":
        if multi_grid is not None:
            raise ValueError(f"multi_grid={multi_grid} is not supported by mobilenetv2; pass multi_grid=None")
        return MobileNetV2(in_channels, output_stride)
    raise ValueError(f"unknown backbone {name!r}; choose one of {list(BACKBONES)}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from a ``.safetensors`` file or a ``torch.save`` file, never unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist; pass the path of a local .pth or .safetensors file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors come in many types; the message says which
        raise ValueError(f"cannot read weights from {str(path)!r}: {err}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} does not hold a state dict")
    return state


def load_backbone_weights(module: nn.Module, weights: str | Path | Mapping[str, torch.Tensor]) -> list[str]:
    """Load a torchvision-style checkpoint into ``module``; returns the keys it skipped.

    ``weights`` is a local ``.pth`` / ``.safetensors`` path or a state dict already read
    with :func:`read_state_dict`. Keys the module lacks (e.g. torchvision's ``fc.*`` or
    ``classifier.*``) are skipped; every key the module has must be present with the right
    shape, else ``ValueError``. The input conv is adapted when ``in_channels`` differs from
    3 (channel mean, repeated).
    """
    if isinstance(weights, Mapping):
        state, source = weights, "the state dict"
    else:
        state, source = read_state_dict(weights), repr(str(weights))
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(
            f"{source} lacks {len(missing)} keys the backbone needs, e.g. {missing[:3]}; "
            "is it a checkpoint of the same architecture?"
        )
    loaded = {}
    for key, value in own.items():
        if key not in state:
            continue
        src = state[key]
        if src.ndim == 4 and value.ndim == 4 and src.shape[1] == 3 and value.shape[1] != 3 and src.shape[0] == value.shape[0]:
            src = src.mean(1, keepdim=True).repeat(1, value.shape[1], 1, 1) * (3 / value.shape[1])
        if src.shape != value.shape:
            raise ValueError(f"{source}: {key} has shape {tuple(src.shape)}, the backbone needs {tuple(value.shape)}")
        loaded[key] = src
    module.load_state_dict(loaded, strict=False)
    return sorted(k for k in state if k not in own)
