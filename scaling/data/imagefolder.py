"""``imagefolder``: image files sorted into one directory per class.

Layout: ``ROOT/train/<class>/*.png|jpg|jpeg|webp|gif`` and optionally ``ROOT/test/<class>/...``
(same class names). Classes are the sorted directory names under ``ROOT/train``; images are put
in a fixed random order (class-sorted order would make prefixes of a split one-class). Every file is
decoded with ``torchvision.io`` to RGB and resized to ``image_size`` on its own, since files may
differ in size; a Python loop over files is unavoidable here, so this loader suits datasets of
up to some ten thousand images (export them once with ``export_parquet`` for faster loading).
"""

from __future__ import annotations

from pathlib import Path

import torch

from scaling.data._files import PathArg, require_root
from scaling.data._image import decode_rgb, quiet_codecs, resize
from scaling.data._select import FIXED_SEED, Stream, generator
from scaling.data.base import DataError

__all__ = ["IMAGE_SUFFIXES", "load_imagefolder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
HOW = (
    "put the images into ROOT/train/<class name>/ (png, jpg, jpeg, webp or gif files) and, for a held-out "
    "split, into ROOT/test/<class name>/ with the same class names"
)


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(class_dir: Path) -> list[Path]:
    return sorted(
        p
        for p in class_dir.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def _read_split(split_dir: Path, classes: list[str], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image under ``split_dir/<class>``. Returns uint8 ``(N, 3, S, S)``, int64 ``(N,)``."""
    images: list[torch.Tensor] = []
    labels: list[int] = []
    with quiet_codecs():
        for label, name in enumerate(classes):
            class_dir = split_dir / name
            if not class_dir.is_dir():
                continue
            for path in _image_files(class_dir):
                try:
                    image = decode_rgb(str(path))
                except RuntimeError as err:
                    raise DataError(f"dataset 'imagefolder': cannot decode {path} ({err})") from err
                images.append(resize(image.unsqueeze(0), image_size)[0])
                labels.append(label)
    if not images:
        empty = torch.empty((0, 3, image_size, image_size), dtype=torch.uint8)
        return empty, torch.empty(0, dtype=torch.int64)
    # Files come sorted by class; a fixed shuffle makes any prefix of a split a fair sample.
    order = torch.randperm(len(labels), generator=generator(FIXED_SEED, Stream.FILE_ORDER))
    return torch.stack(images)[order], torch.tensor(labels, dtype=torch.int64)[order]


def load_imagefolder(
    root: PathArg | None, *, image_size: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None, tuple[str, ...]]:
    """Read ``root/train`` and, when present, ``root/test``.

    Returns:
        ``(train, test_or_None, class_names)``; images uint8 ``(N, 3, image_size, image_size)``,
        labels int64 ``(N,)`` indexing ``class_names``.
    """
    base = require_root("imagefolder", root, HOW)
    train_dir = base / "train"
    if not train_dir.is_dir():
        raise DataError(f"dataset 'imagefolder': directory {train_dir} does not exist; {HOW}")
    classes = [p.name for p in _class_dirs(train_dir)]
    if not classes:
        raise DataError(f"dataset 'imagefolder': no class directories in {train_dir}; {HOW}")
    train = _read_split(train_dir, classes, image_size)
    if len(train[1]) == 0:
        raise DataError(f"dataset 'imagefolder': no image files under {train_dir}; {HOW}")
    test_dir = base / "test"
    test = None
    if test_dir.is_dir():
        unknown = sorted({p.name for p in _class_dirs(test_dir)} - set(classes))
        if unknown:
            raise DataError(
                f"dataset 'imagefolder': {test_dir} has classes {unknown} that {train_dir} lacks; {HOW}"
            )
        test = _read_split(test_dir, classes, image_size)
    return train, test, tuple(classes)
