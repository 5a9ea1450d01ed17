"""Instance segmentation: Mask R-CNN and its parts (anchors, RPN, RoI heads, RoIAlign / NMS ops).

Detection models take a list of images and return per-image dicts (boxes, labels, scores,
masks), not dense logits; their builders carry ``kind = "detection"`` in the registry.
"""

from pixelwise.models.detection.maskrcnn import (
    MODELS,
    MaskRCNN,
    load_torchvision_weights,
    maskrcnn,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet101_fpn,
)

__all__ = ["MODELS", "MaskRCNN", "load_torchvision_weights", "maskrcnn", "maskrcnn_resnet50_fpn", "maskrcnn_resnet101_fpn"]
