"""Loading datasets into memory, and batched augmentation."""

from .datasets import CIFAR10_CLASSES, DATASETS, DatasetNotFound, default_data_root, load_dataset, load_image_folder
from .folder import DataFormatError, RESIZE_POLICY, read_image_folder
from .imageset import ImageSet

__all__ = [
    "CIFAR10_CLASSES", "DATASETS", "DataFormatError", "DatasetNotFound", "ImageSet", "RESIZE_POLICY",
    "default_data_root", "load_dataset", "load_image_folder", "read_image_folder",
]
