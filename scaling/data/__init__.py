"""Datasets as in-memory uint8 tensors: synthetic shapes, sklearn digits, CIFAR-10/100, STL-10,
ImageFolder directories and Parquet image shards.

``load_dataset(name, ...)`` returns ``DatasetSplits`` (train / val / test ``ImageSet``s of
contiguous uint8 ``(N, 3, S, S)`` images and int64 labels); ``export_parquet`` writes any
``DatasetSplits`` as Parquet shards that the ``parquet`` loader reads back.
"""

from scaling.data.base import DataError, DatasetSplits, ImageSet
from scaling.data.load import DATASET_NAMES, load_dataset
from scaling.data.parquet import export_parquet
from scaling.data.shapes import SHAPE_NAMES, ShapesStyle, generate_shapes

__all__ = [
    "DATASET_NAMES",
    "SHAPE_NAMES",
    "DataError",
    "DatasetSplits",
    "ImageSet",
    "ShapesStyle",
    "export_parquet",
    "generate_shapes",
    "load_dataset",
]
