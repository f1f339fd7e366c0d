"""From a dataset's raw parts to ``DatasetSplits``: test carving, ``size``, val carving, ``fraction``.

The order is fixed and documented in ``load_dataset``. Selections work on index tensors; pixels
are gathered, resized and expanded to RGB once per split at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scaling.data import _select
from scaling.data._image import resize, to_rgb
from scaling.data._select import FIXED_SEED, Stream
from scaling.data.base import DataError, DatasetSplits, ImageSet

TEST_SHARE = 1.0 / 6.0

Part = tuple[torch.Tensor, torch.Tensor]
"""``(images, labels)``: uint8 ``(N, C, H, W)`` with ``C`` in {1, 3} (any strides), int64 ``(N,)``."""


@dataclass(frozen=True, eq=False)
class Source:
    """A dataset as read from its source, before any selection.

    ``test`` is ``None`` when the source has no held-out split (a fixed one is carved from
    ``pool``); ``val`` is ``None`` unless the source stores one (else it is carved from ``pool``).
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    pool: Part
    test: Part | None = None
    val: Part | None = None


@dataclass(frozen=True, eq=False)
class _Selection:
    """Some samples of a part: ``images[idx]`` with labels ``labels[idx]``."""

    images: torch.Tensor
    labels: torch.Tensor
    idx: torch.Tensor

    @staticmethod
    def of(part: Part) -> _Selection:
        return _Selection(part[0], part[1], torch.arange(part[1].shape[0]))

    @property
    def selected_labels(self) -> torch.Tensor:
        return self.labels[self.idx]

    def narrow(self, positions: torch.Tensor) -> _Selection:
        """Keep the selected samples at ``positions`` (indices into the current selection)."""
        return _Selection(self.images, self.labels, self.idx[positions])

    def materialise(self, image_size: int) -> ImageSet:
        images = resize(self.images.index_select(0, self.idx), image_size)
        return ImageSet(images=to_rgb(images).contiguous(), labels=self.labels[self.idx].contiguous())


def _check_labels(source: Source) -> None:
    for split, part in (("train", source.pool), ("test", source.test), ("val", source.val)):
        if part is None or part[1].numel() == 0:
            continue
        if part[1].min() < 0 or part[1].max() >= source.num_classes:
            raise DataError(f"dataset {source.name!r}: {split} labels outside [0, {source.num_classes})")


def _limit_size(name: str, parts: list[_Selection], size: int) -> list[_Selection]:
    """Keep ``size`` samples over all ``parts``, each part in proportion to its length."""
    available = sum(len(p.idx) for p in parts)
    if size > available:
        raise DataError(f"dataset {name!r} has {available} images, fewer than size={size}")
    gen = _select.generator(FIXED_SEED, Stream.SIZE)
    counts = _select.proportional_sizes([len(p.idx) for p in parts], size)
    return [
        p.narrow(_select.take_count(p.selected_labels, c, gen)) for p, c in zip(parts, counts, strict=True)
    ]


def build_splits(
    source: Source, *, size: int | None, image_size: int, seed: int, val_fraction: float, fraction: float
) -> DatasetSplits:
    """Apply the selections of ``load_dataset`` to ``source`` and materialise the three splits."""
    _check_labels(source)
    pool = _Selection.of(source.pool)
    if source.test is None:
        test_gen = _select.generator(FIXED_SEED, Stream.TEST)
        test_pos, pool_pos = _select.split_off(
            pool.selected_labels, TEST_SHARE, test_gen, keep_every_class=True
        )
        test, pool = pool.narrow(test_pos), pool.narrow(pool_pos)
    else:
        test = _Selection.of(source.test)
    stored_val = None if source.val is None else _Selection.of(source.val)

    if size is not None:
        parts = _limit_size(source.name, [pool, test] + ([] if stored_val is None else [stored_val]), size)
        pool, test = parts[0], parts[1]
        stored_val = None if stored_val is None else parts[2]
    if len(pool.idx) == 0:
        raise DataError(f"dataset {source.name!r}: no training images left (size={size})")

    if stored_val is None:
        val_gen = _select.generator(seed, Stream.VAL)
        val_pos, train_pos = _select.split_off(
            pool.selected_labels, val_fraction, val_gen, keep_every_class=True
        )
        val, train = pool.narrow(val_pos), pool.narrow(train_pos)
    else:
        val, train = stored_val, pool
    fraction_gen = _select.generator(seed, Stream.FRACTION)
    train = train.narrow(_select.keep_fraction(train.selected_labels, fraction, fraction_gen))

    return DatasetSplits(
        train=train.materialise(image_size),
        val=val.materialise(image_size),
        test=test.materialise(image_size),
        num_classes=source.num_classes,
        name=source.name,
        class_names=source.class_names,
    )
