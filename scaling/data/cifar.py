"""``cifar10`` and ``cifar100``: the "python version" pickles of CIFAR, read straight into tensors.

On-disk format (https://www.cs.toronto.edu/~kriz/cifar.html): every batch file is a pickled dict
with ``data`` (uint8 ``(N, 3072)``: 1024 red, 1024 green, then 1024 blue values of a 32x32 image,
row-major) and ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100). CIFAR-10 has
``data_batch_1..5``, ``test_batch`` and ``batches.meta``; CIFAR-100 has ``train``, ``test`` and
``meta``. The layout is that of ``torchvision.datasets.CIFAR10/100``; this reader does not insist
on the md5 sums of the official files (so small files in the same format load too) and unpickles
only numpy arrays and plain containers.
"""

from __future__ import annotations

import importlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scaling.data._files import PathArg, require_file, require_root
from scaling.data.base import DataError

__all__ = ["CIFAR10", "CIFAR100", "CifarLayout", "load_cifar"]


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its files and labels."""

    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    meta_file: str
    names_key: str
    num_classes: int
    how: str


def _how(title: str, archive: str, folder: str) -> str:
    return (
        f"download the {title} python version ({archive}) from "
        f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it into the root so that "
        f"ROOT/{folder}/ exists (tar -xzf {archive} -C ROOT), or run "
        f"torchvision.datasets.{title.replace('-', '')}(ROOT, download=True) on a machine with internet"
    )


CIFAR10 = CifarLayout(
    name="cifar10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    label_key="labels",
    meta_file="batches.meta",
    names_key="label_names",
    num_classes=10,
    how=_how("CIFAR-10", "cifar-10-python.tar.gz", "cifar-10-batches-py"),
)

CIFAR100 = CifarLayout(
    name="cifar100",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    label_key="fine_labels",
    meta_file="meta",
    names_key="fine_label_names",
    num_classes=100,
    how=_how("CIFAR-100", "cifar-100-python.tar.gz", "cifar-100-python"),
)


_ALLOWED_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),  # arrays pickled with protocol 5
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and builtin containers only: a dataset file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        # Files written by numpy < 2 (the official ones) name numpy.core, an alias of numpy._core.
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file")
        return getattr(importlib.import_module(module), name)


def _unpickle(dataset: str, path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            entry = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise DataError(f"dataset {dataset!r}: {path} is not a CIFAR pickle ({err})") from err
    if not isinstance(entry, dict):
        raise DataError(f"dataset {dataset!r}: {path} holds a {type(entry).__name__}, expected a dict")
    return entry


def _read_batches(
    layout: CifarLayout, folder: Path, files: tuple[str, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate batch files. Returns uint8 ``(N, 3, 32, 32)`` and int64 ``(N,)``."""
    data, labels = [], []
    for file in files:
        path = require_file(layout.name, folder / file, layout.how)
        entry = _unpickle(layout.name, path)
        try:
            pixels = np.asarray(entry["data"], dtype=np.uint8)
            targets = np.asarray(entry[layout.label_key], dtype=np.int64)
        except KeyError as err:
            raise DataError(
                f"dataset {layout.name!r}: {path} has no key {err}; is it the python version? {layout.how}"
            ) from err
        if pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32 or pixels.shape[0] != targets.shape[0]:
            raise DataError(
                f"dataset {layout.name!r}: {path} holds data of shape {pixels.shape} and "
                f"{targets.shape[0]} labels; expected (N, 3072) and N labels"
            )
        data.append(pixels)
        labels.append(targets)
    # Rows are channel-major already: a reshape gives (N, C, H, W) without copying pixels.
    images = torch.from_numpy(np.concatenate(data).reshape(-1, 3, 32, 32))
    return images, torch.from_numpy(np.concatenate(labels))


def _class_names(layout: CifarLayout, folder: Path) -> tuple[str, ...]:
    path = folder / layout.meta_file
    if not path.is_file():
        return ()
    names = _unpickle(layout.name, path).get(layout.names_key, ())
    return tuple(str(n) for n in names)


def load_cifar(
    layout: CifarLayout, root: PathArg | None
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], tuple[str, ...]]:
    """Read a CIFAR variant from ``root/<layout.folder>``.

    Returns:
        ``(train, test, class_names)`` with ``train`` and ``test`` pairs of uint8
        ``(N, 3, 32, 32)`` images and int64 ``(N,)`` labels.
    """
    folder = require_root(layout.name, root, layout.how) / layout.folder
    if not folder.is_dir():
        raise DataError(f"dataset {layout.name!r}: directory {folder} does not exist; {layout.how}")
    train = _read_batches(layout, folder, layout.train_files)
    test = _read_batches(layout, folder, layout.test_files)
    for split, (_, labels) in (("train", train), ("test", test)):
        if labels.numel() and (labels.min() < 0 or labels.max() >= layout.num_classes):
            raise DataError(
                f"dataset {layout.name!r}: {split} labels in {folder} outside [0, {layout.num_classes})"
            )
    return train, test, _class_names(layout, folder)
