"""One registry of model builders: ``create_model``, ``list_models``, ``save_model``, ``load_model``."""

from __future__ import annotations

import difflib
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from pixelwise.io import atomic_write, atomic_write_text

MODELS: dict[str, Callable[..., nn.Module]] = {}
"""Model name -> keyword-only builder ``(num_classes, in_channels, ...) -> nn.Module``.

Filled in :mod:`pixelwise.models` from the model files, one line per model.
"""


def model_kind(name: str) -> str:
    """What a model returns: ``"dense"`` ((N, K, H, W) logits) or ``"detection"`` (per-image instance dicts)."""
    return getattr(get_builder(name), "kind", "dense")


def list_models(kind: str | None = None) -> list[str]:
    """Names accepted by :func:`create_model`, sorted; only those of ``kind`` (see :func:`model_kind`) if given."""
    return sorted(n for n in MODELS if kind is None or getattr(MODELS[n], "kind", "dense") == kind)


def spatial_dims(name: str) -> int:
    """Spatial dimensions of the inputs model ``name`` takes: 2 for (N, C, H, W), 3 for (N, C, D, H, W).

    Read from the builder's ``spatial_dims`` attribute (volumetric builders set 3); default 2.
    """
    return getattr(get_builder(name), "spatial_dims", 2)


def get_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name``; an unknown name raises a ValueError listing valid ones."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Valid names: {', '.join(list_models())}")
    return MODELS[name]


def create_model(name: str, num_classes: int, in_channels: int = 3, input_norm: str | None = None, **kwargs: Any) -> nn.Module:
    """Build a model by name.

    A dense model maps (N, in_channels, H, W) float images to (N, num_classes, H, W) logits
    for any H, W (a 3D one, :func:`spatial_dims`, (N, C, D, H, W) volumes); a detection
    model (:func:`model_kind`) returns instances. Its creation arguments, defaults included,
    are kept in ``model.config`` so that :func:`save_model` / :func:`load_model` can rebuild it.

    ``input_norm="image"`` (dense models) standardises each input image per channel by its
    own mean and standard deviation before the network sees it (a forward pre-hook, so the
    weights and state-dict keys are the builder's): predictions become invariant to a
    per-channel gain and offset of the image, e.g. a darker drive. Statistics are those of
    what the model is given: one tile at a time under tiled prediction.

    Example:
        >>> model = create_model("unet", num_classes=3, base_channels=8)
    """
    builder = get_builder(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    accepted = inspect.signature(builder).parameters
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        options = [p for p in accepted if p not in ("num_classes", "in_channels")]
        raise ValueError(f"model {name!r} does not take {', '.join(unknown)}; its options are: {', '.join(options) or 'none'}")
    if input_norm not in (None, "image"):
        raise ValueError(f"input_norm={input_norm!r} is not supported; use 'image' (per-image standardisation) or leave it unset")
    if input_norm is not None and getattr(builder, "kind", "dense") != "dense":
        raise ValueError(f"input_norm applies to dense models; {name!r} is a {builder.kind} model")
    model = builder(num_classes=num_classes, in_channels=in_channels, **kwargs)
    if input_norm == "image":
        model.register_forward_pre_hook(_standardise_each_image)
    # Every option, defaults included, so a checkpoint rebuilds the same network even after
    # a default changes (tuples as lists, as JSON gives them back).
    bound = inspect.signature(builder).bind(num_classes=num_classes, in_channels=in_channels, **kwargs)
    bound.apply_defaults()
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in bound.arguments.items()}
    model.config = {"name": name, **options, **({"input_norm": input_norm} if input_norm else {})}
    return model


def _standardise_each_image(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook of ``input_norm="image"``: (N, C, ...) -> per image and channel, zero mean and unit std."""
    x = args[0]
    dims = tuple(range(2, x.ndim))
    mean = x.mean(dims, keepdim=True)
    std = x.std(dims, keepdim=True, unbiased=False)
    return ((x - mean) / (std + 1e-5), *args[1:])


def save_model(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``path`` (.safetensors weights) and ``path`` with suffix ``.json`` (config), atomically.

    ``extra`` (e.g. class names, normalisation) is stored in the JSON under ``"extra"``.
    """
    from safetensors.torch import save_file

    path = Path(path).with_suffix(".safetensors")
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("save_model needs a model built by create_model (it has no .config)")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))
    atomic_write_text(path.with_suffix(".json"), json.dumps({"model": config, "extra": extra or {}}, indent=2))
    return path


def read_model_description(path: str | Path) -> dict[str, Any]:
    """The JSON :func:`save_model` wrote beside ``path`` (``{"model": {"name", ...}, "extra": {...}}``).

    Raises:
        ValueError: The JSON is missing, unreadable or describes no model; the message names it.
    """
    path = Path(path).with_suffix(".safetensors")
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise ValueError(f"checkpoint file {str(meta_path)!r} does not exist; pass a .safetensors written by pixelwise")
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta["model"]["name"], str):
            raise TypeError("the model name is not a string")
    except (ValueError, KeyError, TypeError) as e:  # bad JSON, not UTF-8, no model entry
        raise ValueError(
            f"model file {str(meta_path)!r} is not a pixelwise model description ({e!r}); it must be the JSON that "
            f"pixelwise wrote beside {path.name}"
        ) from e
    return meta


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_model`; returns ``(model, extra)``. Never unpickles.

    Raises:
        ValueError: A file is missing or unreadable, or the weights do not fit the model the
            JSON describes; the message names the file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path).with_suffix(".safetensors")
    meta_path = path.with_suffix(".json")
    if not path.is_file():
        raise ValueError(f"checkpoint file {str(path)!r} does not exist; pass a .safetensors written by pixelwise")
    meta = read_model_description(path)
    config = dict(meta["model"])
    name = config.pop("name")
    fix = f"it must be the JSON that pixelwise wrote beside {path.name}"
    try:
        model = create_model(name, **config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"model file {str(meta_path)!r} describes no model pixelwise can build: {e}; {fix}") from e
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(
            f"cannot read weights file {str(path)!r} ({e}); it is truncated or not a safetensors file: "
            "copy it again or retrain"
        ) from e
    mismatch = _state_mismatch(model, state)
    if mismatch:
        raise ValueError(
            f"weights file {str(path)!r} does not fit the model described in {str(meta_path)!r} "
            f"({name}, num_classes={config.get('num_classes')}): {mismatch}; the .json and .safetensors must "
            "come from the same save"
        )
    model.load_state_dict(state)
    return model, meta.get("extra", {})


def _state_mismatch(model: nn.Module, state: dict[str, Any]) -> str:
    """'' when ``state`` fits ``model`` exactly, else a short account of missing, extra and misshapen tensors."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    parts = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in
             ((missing, "tensors missing"), (extra, "unexpected tensors"), (shapes, "tensors of another shape"))
             if keys]
    return ", ".join(parts)
