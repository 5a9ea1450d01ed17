"""The model zoo behind one registry.

Example:
    >>> from pixelwise.models import create_model, list_models
    >>> model = create_model("deeplabv3plus", num_classes=12, backbone="resnet50", output_stride=16)
"""

from pixelwise.models import deconvnet, deeplab, densenet, fcn, fpn, hed, pspnet, refinenet, segnet, unet, volumetric
from pixelwise.models.registry import MODELS, create_model, list_models, load_model, save_model, spatial_dims

for _module in (fcn, unet, segnet, deconvnet, densenet, deeplab, pspnet, refinenet, fpn, hed, volumetric):
    MODELS.update(_module.MODELS)

__all__ = ["create_model", "list_models", "load_model", "save_model", "spatial_dims"]
