"""Volumetric models: (N, C, D, H, W) in, (N, K, D, H, W) logits out."""

from pixelwise.models.volumetric import unet3d

MODELS = {**unet3d.MODELS}
