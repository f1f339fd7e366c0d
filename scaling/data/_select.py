"""Deterministic, stratified index selection: test/val carving, ``size`` and ``fraction`` subsets.

Every selection returns sorted indices, so a selection of everything keeps the source order (the
Parquet round trip relies on this). Each purpose draws from its own random stream, derived from
``(seed, purpose)`` with ``numpy.random.SeedSequence``: changing the ``fraction`` never changes the
val split, and streams of different purposes never coincide whatever the seed.
"""

from __future__ import annotations

import math
from enum import IntEnum
from typing import Literal

import numpy as np
import torch


class Stream(IntEnum):
    """Purposes that get their own random stream."""

    TEST = 0
    SIZE = 1
    VAL = 2
    FRACTION = 3
    SHAPES_TRAIN = 4
    SHAPES_TEST = 5
    FILE_ORDER = 6


# Test splits and ``size`` subsets do not depend on the user's seed: evaluation data stays the
# same across the seeds of a study.
FIXED_SEED = 0


def generator(seed: int, stream: Stream) -> torch.Generator:
    """A CPU ``torch.Generator`` for ``stream``, deterministic in ``seed`` (``seed >= 0``)."""
    state = np.random.SeedSequence(seed, spawn_key=(int(stream),)).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def argsort_stable(values: torch.Tensor) -> torch.Tensor:
    """Stable argsort of a 1-D CPU tensor; int64 ``(N,)``."""
    # numpy's stable sort is several times faster than torch's on the CPU for these sizes.
    return torch.from_numpy(np.argsort(values.numpy(), kind="stable"))


def _stratified_order(
    labels: torch.Tensor, gen: torch.Generator, *, one_per_class: Literal["first", "last"] | None
) -> torch.Tensor:
    """A random order of ``range(N)`` whose every prefix is a stratified sample.

    Sample ``i`` of class ``c`` gets the priority ``(rank_i + u_i) / n_c`` (``rank_i`` its random
    position within the class, ``u_i`` uniform in [0, 1)), so a prefix of length ``m`` holds about
    ``m * n_c / N`` samples of class ``c`` (within one), and prefixes are nested.

    Args:
        labels: int64 tensor ``(N,)`` of non-negative class indices.
        one_per_class: ``"first"`` puts one sample of every class ahead of all others,
            ``"last"`` puts one behind all others, ``None`` neither.
    Returns:
        int64 tensor ``(N,)``, a permutation.
    """
    n = labels.shape[0]
    counts = torch.bincount(labels)
    # Sorting by class + a random key in [0, 1) groups the classes in a random order within each.
    grouped = argsort_stable(labels.double() + torch.rand(n, generator=gen, dtype=torch.float64))
    grouped_labels = labels[grouped]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.int64)
    rank[grouped] = torch.arange(n) - starts[grouped_labels]
    priority = (rank.double() + torch.rand(n, generator=gen, dtype=torch.float64)) / counts[labels]
    if one_per_class == "first":
        priority = torch.where(rank == 0, priority - 1.0, priority)
    elif one_per_class == "last":
        priority = torch.where(rank == 0, priority + 1.0, priority)
    return argsort_stable(priority)


def _sorted(order: torch.Tensor, n: int) -> torch.Tensor:
    """The indices in ``order`` (a subset of ``range(n)``) in increasing order."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order] = True
    return mask.nonzero().squeeze(1)


def _num_classes_present(labels: torch.Tensor) -> int:
    return int(torch.count_nonzero(torch.bincount(labels))) if labels.numel() else 0


def split_off(
    labels: torch.Tensor, share: float, gen: torch.Generator, *, keep_every_class: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split off ``round(share * N)`` samples, stratified by class.

    With ``keep_every_class`` the rest keeps at least one sample of every class it has (the
    split-off part may then be smaller).

    Args:
        labels: int64 tensor ``(N,)``.
    Returns:
        ``(taken, rest)``: sorted int64 index tensors that partition ``range(N)``.
    """
    n = labels.shape[0]
    count = min(n, math.floor(share * n + 0.5))
    if keep_every_class:
        count = min(count, n - _num_classes_present(labels))
    if count <= 0:
        return torch.empty(0, dtype=torch.int64), torch.arange(n)
    order = _stratified_order(labels, gen, one_per_class="last" if keep_every_class else None)
    return _sorted(order[:count], n), _sorted(order[count:], n)


def keep_fraction(labels: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Sorted indices of ``round(fraction * N)`` samples, stratified, at least one per class.

    For one ``gen`` state, the subsets of different fractions are nested: a smaller fraction
    keeps a subset of what a larger one keeps.
    """
    n = labels.shape[0]
    if fraction >= 1.0 or n == 0:
        return torch.arange(n)
    count = max(math.floor(fraction * n + 0.5), _num_classes_present(labels))
    return _sorted(_stratified_order(labels, gen, one_per_class="first")[:count], n)


def take_count(labels: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """Sorted indices of ``count`` samples, stratified by class."""
    n = labels.shape[0]
    if count >= n:
        return torch.arange(n)
    return _sorted(_stratified_order(labels, gen, one_per_class=None)[:count], n)


def proportional_sizes(lengths: list[int], total: int) -> list[int]:
    """Split ``total`` over parts in proportion to ``lengths`` (largest remainder), summing to total."""
    available = sum(lengths)
    exact = [total * n / available for n in lengths]
    sizes = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(lengths)), key=lambda i: exact[i] - sizes[i], reverse=True)
    for i in by_remainder[: total - sum(sizes)]:
        sizes[i] += 1
    return sizes
