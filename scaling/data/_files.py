"""Resolving a dataset root and reporting missing files with instructions (``DataError``)."""

from __future__ import annotations

import os
from pathlib import Path

from scaling.data.base import DataError

PathArg = str | os.PathLike[str]
"""A file-system path as users pass it."""


def require_root(dataset: str, root: PathArg | None, how: str) -> Path:
    """The absolute dataset root; ``DataError`` when none was given or it does not exist.

    Args:
        dataset: the dataset name, for the message.
        root: the user's root (``~`` expanded, made absolute).
        how: how to obtain the data, for the message.
    """
    if root is None:
        raise DataError(f"dataset {dataset!r} needs a root directory (root=None was given); {how}")
    path = Path(root).expanduser().absolute()
    if not path.is_dir():
        raise DataError(f"dataset {dataset!r}: root directory {path} does not exist; {how}")
    return path


def require_file(dataset: str, path: Path, how: str) -> Path:
    """``path`` itself; ``DataError`` naming it when it is not a file."""
    if not path.is_file():
        raise DataError(f"dataset {dataset!r}: missing file {path}; {how}")
    return path
