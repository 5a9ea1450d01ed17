"""pixelwise: semantic segmentation in PyTorch — give every pixel of an image a class."""

from pixelwise.models import create_model, list_models, load_model, save_model

__version__ = "0.1.0"

__all__ = ["create_model", "list_models", "load_model", "save_model", "__version__"]
