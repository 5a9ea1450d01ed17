"""Training from scribbles: simulated strokes, ScribbleSup propagation, regularized losses.

Superpixels and graph cuts need the ``weak`` extra (scikit-image, PyMaxflow); the names
below are imported on first use, so ``pixelwise.weak.regularized`` (plain PyTorch) and the
rest of pixelwise work without it.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "alpha_expansion": "graphcut",
    "potts_energy": "graphcut",
    "propagate_labels": "scribblesup",
    "labelled_fraction": "simulate",
    "simulate_scribbles": "simulate",
    "SuperpixelGraph": "superpixels",
    "build_superpixel_graph": "superpixels",
    "RegularizedLoss": "regularized",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'pixelwise.weak' has no attribute {name!r}")
    try:
        module = importlib.import_module(f"pixelwise.weak.{_WHERE[name]}")
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"{err}; training from scribbles needs the weak extra: pip install 'pixelwise[weak]'") from err
    return getattr(module, name)
