"""``digits``: scikit-learn's bundled handwritten digits (1,797 8x8 grayscale images, 10 classes).

Real data that needs no download. Raw-pixel kNN already reaches about 96 % on it (NOTES.md), so
it suits smoke tests more than studies.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["load_digits_pool"]

CLASS_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))


def load_digits_pool() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits.

    Returns:
        ``(images, labels)``: uint8 ``(1797, 1, 8, 8)`` with the 0-16 ink levels scaled to 0-255,
        and int64 ``(1797,)``.
    """
    from sklearn.datasets import load_digits  # sklearn imports are slow; pay only when used

    bunch = load_digits()
    pixels = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0))
    images = torch.from_numpy(pixels.astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return images, labels
