"""``load_dataset``: one entry point from a dataset name to in-memory ``DatasetSplits``."""

from __future__ import annotations

from scaling.data import cifar, digits, imagefolder, parquet, shapes, stl10
from scaling.data._files import PathArg
from scaling.data._pipeline import Source, build_splits
from scaling.data.base import DataError, DatasetSplits

__all__ = ["DATASET_NAMES", "load_dataset"]

DATASET_NAMES: tuple[str, ...] = (
    "shapes",
    "digits",
    "cifar10",
    "cifar100",
    "stl10",
    "imagefolder",
    "parquet",
)


def _check_arguments(
    name: str, size: int | None, image_size: int, seed: int, val_fraction: float, fraction: float
) -> None:
    if name not in DATASET_NAMES:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"dataset {name!r}: size must be a positive integer or None, got {size!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"dataset {name!r}: image_size must be a positive integer, got {image_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"dataset {name!r}: seed must be a non-negative integer, got {seed!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"dataset {name!r}: val_fraction must lie in [0, 1), got {val_fraction!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"dataset {name!r}: fraction must lie in (0, 1], got {fraction!r}")


def _read_source(name: str, root: PathArg | None, *, size: int | None, image_size: int, seed: int) -> Source:
    """Read dataset ``name`` as it comes (no selection yet)."""
    if name == "shapes":
        pool, test = shapes.load_shapes(size=size, image_size=image_size, seed=seed)
        return Source(name, len(shapes.SHAPE_NAMES), shapes.SHAPE_NAMES, pool, test)
    if name == "digits":
        return Source(name, 10, digits.CLASS_NAMES, digits.load_digits_pool())
    if name in ("cifar10", "cifar100"):
        layout = cifar.CIFAR10 if name == "cifar10" else cifar.CIFAR100
        train, test, names = cifar.load_cifar(layout, root)
        return Source(name, layout.num_classes, names, train, test)
    if name == "stl10":
        train, test, names = stl10.load_stl10(root)
        return Source(name, stl10.NUM_CLASSES, names, train, test)
    if name == "imagefolder":
        train, maybe_test, names = imagefolder.load_imagefolder(root, image_size=image_size)
        return Source(name, len(names), names, train, maybe_test)
    if name == "parquet":
        parts, num_classes, names = parquet.read_parquet(root, image_size=image_size)
        stored_train = parts["train"]
        assert stored_train is not None  # read_parquet raises without train shards
        if num_classes is None:
            labels = [p[1] for p in parts.values() if p is not None and p[1].numel()]
            num_classes = 1 + max((int(label.max()) for label in labels), default=0)
        return Source(name, num_classes, names, stored_train, parts["test"], parts["val"])
    raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")


def load_dataset(
    name: str,
    *,
    root: PathArg | None = None,
    size: int | None = None,
    image_size: int = 32,
    seed: int = 0,
    val_fraction: float = 0.1,
    fraction: float = 1.0,
) -> DatasetSplits:
    """Load dataset ``name`` into memory as uint8 RGB tensors of ``image_size x image_size``.

    Steps, in this order (each selection stratified by class and deterministic):

    1. Read the source. ``shapes`` generates ``size`` images (default 10,000): a train pool from
       ``seed`` and ``size // 6`` test images that do not depend on ``seed``. ``cifar10``,
       ``cifar100``, ``stl10`` (labelled part) and ``imagefolder`` (when ``ROOT/test`` exists) come
       with their own test split; ``parquet`` with its stored train/val/test shards.
    2. Sources without a test split (``digits``, ``imagefolder`` without ``ROOT/test``, ``parquet``
       without test shards) get a fixed one sixth of their images as test, independent of ``seed``.
    3. ``size`` (not for ``shapes``, which generates exactly ``size``): keep ``size`` images in total,
       spread over the splits in proportion to their sizes, independent of ``seed``. Larger than
       the dataset: ``DataError``.
    4. ``val``: ``val_fraction`` of every class of the train pool, drawn from ``seed`` (a ``parquet``
       export with val shards keeps its stored val split and ignores ``val_fraction``).
    5. ``fraction``: the train split keeps that fraction of every class (at least one image per
       class), drawn from ``seed``; subsets are nested across fractions and ``val`` is unchanged.
    6. Resize to ``image_size`` (antialiased bilinear on uint8) where needed; grayscale -> 3 channels.

    Selections keep the source order, so a Parquet export loads back byte-identical (png/raw).

    Args:
        name: one of ``DATASET_NAMES``.
        root: the data directory; required for ``cifar10``, ``cifar100``, ``stl10``, ``imagefolder``
            and ``parquet``, ignored by ``shapes`` and ``digits``.
        size: total images over train, val and test (``None``: all; 10,000 for ``shapes``).
        image_size: output height and width.
        seed: seeds the val split, the fraction subset and the ``shapes`` train pool.
        val_fraction: share of the train pool carved out as val, in ``[0, 1)``.
        fraction: share of the train split kept, in ``(0, 1]`` (a scaling axis).
    Returns:
        ``DatasetSplits`` whose images are contiguous uint8 ``(N, 3, image_size, image_size)``.
    Raises:
        DataError: unknown name, missing root or files (the message names the path and how to get
            the data), malformed files, or ``size`` larger than the dataset.
        ValueError: an argument out of range.
    """
    _check_arguments(name, size, image_size, seed, val_fraction, fraction)
    source = _read_source(name, root, size=size, image_size=image_size, seed=seed)
    return build_splits(
        source,
        size=None if name == "shapes" else size,
        image_size=image_size,
        seed=seed,
        val_fraction=val_fraction,
        fraction=fraction,
    )
