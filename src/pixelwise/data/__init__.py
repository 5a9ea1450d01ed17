"""Data: segmentation data sets, joint image + mask transforms, and a synthetic data set."""

from pixelwise.data.datasets import (
    CamVid,
    Cityscapes,
    ClassInfo,
    DataCheck,
    FolderDataset,
    ISBI2012,
    SegmentationDataset,
    VOC,
    check_dataset,
    open_dataset,
    read_classes_file,
    write_classes_file,
)
from pixelwise.data.synthetic import make_synthetic_sample, write_synthetic_dataset
from pixelwise.data.transforms import ToTensor, TrainTransform, eval_transform, train_transform

__all__ = [
    "CamVid",
    "Cityscapes",
    "ClassInfo",
    "DataCheck",
    "FolderDataset",
    "ISBI2012",
    "SegmentationDataset",
    "ToTensor",
    "TrainTransform",
    "VOC",
    "check_dataset",
    "eval_transform",
    "make_synthetic_sample",
    "open_dataset",
    "read_classes_file",
    "train_transform",
    "write_classes_file",
    "write_synthetic_dataset",
]
