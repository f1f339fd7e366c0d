"""``stl10``: the labelled part of STL-10's binary release (96x96 colour images, 10 classes).

On-disk format (https://cs.stanford.edu/~acoates/stl10/, ``stl10_binary.tar.gz``): ``*_X.bin`` is
raw uint8 pixels, each image 3 x 96 x 96 stored channel by channel in column-major order;
``*_y.bin`` is one uint8 label per image, 1-based. The 100,000 unlabelled images
(``unlabeled_X.bin``) are not used. Same layout as ``torchvision.datasets.STL10``, read without
the md5 check of the official files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from scaling.data._files import PathArg, require_file, require_root
from scaling.data.base import DataError

__all__ = ["load_stl10"]

FOLDER = "stl10_binary"
NUM_CLASSES = 10
HOW = (
    "download stl10_binary.tar.gz from https://cs.stanford.edu/~acoates/stl10/ and extract it into the "
    "root so that ROOT/stl10_binary/train_X.bin exists (tar -xzf stl10_binary.tar.gz -C ROOT), or run "
    "torchvision.datasets.STL10(ROOT, split='train', download=True) on a machine with internet access"
)
_PIXELS = 3 * 96 * 96


def _read_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``<split>_X.bin`` and ``<split>_y.bin``. Returns uint8 ``(N, 3, 96, 96)``, int64 ``(N,)``."""
    x_path = require_file("stl10", folder / f"{split}_X.bin", HOW)
    y_path = require_file("stl10", folder / f"{split}_y.bin", HOW)
    pixels = np.fromfile(x_path, dtype=np.uint8)
    labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1
    if pixels.size % _PIXELS or pixels.size // _PIXELS != labels.size:
        raise DataError(
            f"dataset 'stl10': {x_path} holds {pixels.size} bytes for {labels.size} labels in {y_path}; "
            f"expected {_PIXELS} bytes per image"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"dataset 'stl10': labels in {y_path} outside 1..{NUM_CLASSES}")
    # Column-major images: swapping the last two axes gives (N, C, H, W); the copy happens once,
    # after the selection of the samples, when the loader makes the images contiguous.
    images = torch.from_numpy(pixels.reshape(-1, 3, 96, 96)).transpose(2, 3)
    return images, torch.from_numpy(labels)


def _class_names(folder: Path) -> tuple[str, ...]:
    path = folder / "class_names.txt"
    if not path.is_file():
        return ()
    return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())


def load_stl10(
    root: PathArg | None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], tuple[str, ...]]:
    """Read the labelled train (5,000) and test (8,000) splits of STL-10 from ``root/stl10_binary``.

    Returns:
        ``(train, test, class_names)``; image tensors are uint8 ``(N, 3, 96, 96)`` views (not
        contiguous), labels int64 ``(N,)`` in ``[0, 10)``.
    """
    folder = require_root("stl10", root, HOW) / FOLDER
    if not folder.is_dir():
        raise DataError(f"dataset 'stl10': directory {folder} does not exist; {HOW}")
    return _read_split(folder, "train"), _read_split(folder, "test"), _class_names(folder)
