"""Pixel-level helpers shared by the loaders: channel expansion, resizing, PNG/JPEG codecs."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# torchvision is imported inside the functions that need it: importing it costs about 1 s (it pulls
# in torch._dynamo), which every Ray process of a trial on generated data would otherwise pay.

# Bounds the float buffers of the resize to about 100 MB whatever the dataset size.
_RESIZE_CHUNK_PIXELS = 8_000_000


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """Repeat grayscale to three channels.

    Args:
        images: uint8 tensor ``(N, C, H, W)`` with ``C`` in ``{1, 3}``.
    Returns:
        uint8 tensor ``(N, 3, H, W)`` (the input itself when it already has three channels).
    """
    channels = images.shape[1]
    if channels == 3:
        return images
    if channels == 1:
        return images.expand(-1, 3, -1, -1)
    raise ValueError(f"expected 1 or 3 channels, got {channels}")


def resize(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resize to ``image_size x image_size`` (antialiased bilinear, on uint8), in chunks.

    Args:
        images: uint8 tensor ``(N, C, H, W)``.
    Returns:
        contiguous uint8 tensor ``(N, C, image_size, image_size)``; the input made contiguous when
        it already has that size.
    """
    n, c, h, w = images.shape
    if (h, w) == (image_size, image_size):
        return images.contiguous()
    import torchvision.transforms.v2.functional as TF

    out = torch.empty((n, c, image_size, image_size), dtype=torch.uint8)
    step = max(1, _RESIZE_CHUNK_PIXELS // (c * max(h * w, image_size * image_size)))
    for start in range(0, n, step):
        chunk = images[start : start + step].contiguous()
        out[start : start + step] = TF.resize(
            chunk,
            [image_size, image_size],
            interpolation=TF.InterpolationMode.BILINEAR,
            antialias=True,
        )
    return out


@contextmanager
def quiet_codecs() -> Iterator[None]:
    """Silence torchvision 0.29's deprecation notice for its image codecs (one per call).

    The contract names ``torchvision.io``; its successor (TorchCodec) is not a dependency.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*TorchVision are deprecated", DeprecationWarning)
        yield


def decode_rgb(data: torch.Tensor | str) -> torch.Tensor:
    """Decode one PNG/JPEG/GIF/WebP (1-D uint8 bytes tensor or a path) to uint8 ``(3, H, W)``.

    Call inside ``quiet_codecs()``.
    """
    import torchvision.io as tvio

    image: torch.Tensor = tvio.decode_image(data, mode=tvio.ImageReadMode.RGB)
    return image


def encode(image: torch.Tensor, encoding: str) -> bytes:
    """Encode one uint8 ``(C, H, W)`` image as ``png`` or ``jpeg`` bytes. Call inside ``quiet_codecs()``."""
    import torchvision.io as tvio

    if encoding == "png":
        data = tvio.encode_png(image)
    elif encoding == "jpeg":
        data = tvio.encode_jpeg(image, quality=95)
    else:
        raise ValueError(f"unknown image encoding {encoding!r}; expected 'png' or 'jpeg'")
    return bytes(data.numpy().tobytes())
