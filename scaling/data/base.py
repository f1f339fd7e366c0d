"""The in-memory dataset types every loader returns, and the loaders' error type.

Data lives in memory as uint8 tensors (DESIGN.md section 6): encoders and augmentations take
``ImageSet.images`` directly, with no DataLoader and no per-item Python objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["DataError", "DatasetSplits", "ImageSet"]


class DataError(ValueError):
    """A dataset cannot be loaded: missing root, missing or malformed files, impossible size.

    The message names the dataset, the path that was tried and how to obtain the data.
    """


@dataclass(frozen=True, eq=False)
class ImageSet:
    """A labelled set of images held in memory.

    Attributes:
        images: uint8 tensor of shape ``(N, C, H, W)``; loaders always return ``C == 3`` and a
            contiguous tensor.
        labels: int64 tensor of shape ``(N,)`` with class indices in ``[0, num_classes)``.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"ImageSet.images must be a uint8 tensor of shape (N, C, H, W), got dtype "
                f"{self.images.dtype} and shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(
                f"ImageSet.labels must be an int64 tensor of shape (N,), got dtype "
                f"{self.labels.dtype} and shape {tuple(self.labels.shape)}"
            )
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"ImageSet has {self.images.shape[0]} images but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: torch.Tensor) -> ImageSet:
        """The images at ``indices`` (int64 tensor of shape ``(M,)``), in that order, contiguous."""
        return ImageSet(
            images=self.images.index_select(0, indices).contiguous(),
            labels=self.labels.index_select(0, indices).contiguous(),
        )


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """The three splits of one dataset, as returned by ``load_dataset``.

    Attributes:
        train: the training split (after ``fraction`` was applied).
        val: carved deterministically from the training data (or the stored val split of a
            Parquet export); the split that studies measure their objective on.
        test: the dataset's own held-out split (a fixed deterministic split where the source
            has none).
        num_classes: the number of classes; labels lie in ``[0, num_classes)``.
        name: the dataset name passed to ``load_dataset``.
        class_names: human-readable class names, index-aligned with labels (may be empty).
    """

    train: ImageSet
    val: ImageSet
    test: ImageSet
    num_classes: int
    name: str
    class_names: tuple[str, ...] = field(default=())
