"""Datasets as in-memory tensors: readers, a registry with checksums, downloads, a fast loader.

>>> from neuronwise import data
>>> train, val = data.train_val_split(data.load("mnist", "train"), val_fraction=0.1, seed=0)
>>> loader = data.TensorLoader(train, batch_size=100, shuffle=True, seed=0)
"""

from .catalog import DATASETS, DatasetInfo, FileInfo
from .dataset import ArrayDataset, train_val_split
from .download import download, fetch
from .errors import DataError
from .loader import TensorLoader, random_crop_flip
from .registry import FileStatus, load, load_image_folder, resolve_root, status, verify

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DataError",
    "DatasetInfo",
    "FileInfo",
    "FileStatus",
    "TensorLoader",
    "download",
    "fetch",
    "load",
    "load_image_folder",
    "random_crop_flip",
    "resolve_root",
    "status",
    "train_val_split",
    "verify",
]
