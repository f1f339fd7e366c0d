"""``shapes``: a procedurally generated 10-class image dataset, harder than digits for raw pixels.

Each image is one shape drawn as a soft mask ``sigmoid(-sdf / softness)`` of a signed distance
function evaluated on a pixel grid, with random rotation, scale, translation, random foreground and
background colours and light Gaussian noise (optionally a background grating). Images are made in
chunks, all images of a chunk at once (a Python loop runs over the 10 classes, never over images).

Why these nuisances (measured with the quickstart recipe, 8 epochs, 7.5k training images):
position, scale and colour make raw-pixel nearest neighbours weak (about 30 % kNN top-1, chance is
10 %). Colours come in opposite luminance bands -- one light, one dark, either one the shape -- so
every shape stands out with a clear edge. With freely random colours (the first version of this
generator) about one image in five had a faint shape, and an image's colour pair was a cue that
identified it among all others: contrastive training learnt colour instead of shape and stayed
*below* raw pixels (0.24 vs 0.30 kNN), whereas the banded colours give 0.58 vs 0.30 in the same
8 epochs. Instance discrimination learns whatever identifies an image and survives augmentation;
a synthetic nuisance must not be such a cue.

Signed distance functions after Inigo Quilez, "2D distance functions"
(https://iquilezles.org/articles/distfunctions2d/).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from scaling.data._select import FIXED_SEED, Stream, argsort_stable, generator

__all__ = ["SHAPE_NAMES", "ShapesStyle", "generate_shapes", "split_sizes"]

SHAPE_NAMES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "cross",
    "star",
    "ring",
    "crescent",
    "half-disk",
    "L",
    "hollow square",
)

DEFAULT_SIZE = 10_000

# Pixels per chunk: keeps the float working set (about 15 buffers of this size) near 100 MB.
_CHUNK_PIXELS = 2_000_000


@dataclass(frozen=True)
class ShapesStyle:
    """Nuisance ranges of the generator; the default is a flat background with banded colours.

    Lengths are in units of the image half-width (the image spans ``[-1, 1]``); a shape has a
    radius of about one unit before scaling.

    Attributes:
        scale: range of the shape scale (``0.5`` is a shape about half the image wide).
        max_shift: largest translation of the shape centre along each axis.
        noise: standard deviation of the per-pixel Gaussian noise, intensities in ``[0, 1]``.
        texture: amplitude of a random sinusoidal grating added to the background (0 = flat).
        band_gap: gap between the dark band ``[0, (1 - gap) / 2]`` and the light band
            ``[(1 + gap) / 2, 1]`` that each channel of the two colours is drawn from; which of the
            two colours is the foreground is random.
        softness: edge width of the soft masks, in pixels.
    """

    scale: tuple[float, float] = (0.3, 0.6)
    max_shift: float = 0.4
    noise: float = 0.03
    texture: float = 0.0
    band_gap: float = 0.2
    softness: float = 0.5


TEXTURED = ShapesStyle(noise=0.06, texture=0.15)
"""A harder preset: a random background grating (a per-image cue that survives crops) and more noise."""


def split_sizes(size: int) -> tuple[int, int]:
    """``(train_pool, test)`` sizes for a dataset of ``size`` images: the test split is ``size // 6``."""
    test = size // 6
    return size - test, test


# --- signed distance functions; inputs are (B, H, W) shape-frame coordinates -------------------


def _box(x: torch.Tensor, y: torch.Tensor, bx: float, by: float) -> torch.Tensor:
    dx = x.abs() - bx
    dy = y.abs() - by
    outside = torch.hypot(dx.clamp(min=0), dy.clamp(min=0))
    return outside + torch.maximum(dx, dy).clamp(max=0)


def _circle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.hypot(x, y) - 0.85


def _square(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _box(x, y, 0.72, 0.72)


def _triangle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Equilateral, centroid at the origin, circumradius 1.05.
    r = 1.05 * math.sqrt(3) / 2  # half the side length
    k = math.sqrt(3)
    px = x.abs() - r
    py = y + r / k
    fold = px + k * py > 0
    px, py = torch.where(fold, (px - k * py) / 2, px), torch.where(fold, (-k * px - py) / 2, py)
    px = px - px.clamp(-2 * r, 0)
    return -torch.hypot(px, py) * torch.sign(py)


def _cross(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.minimum(_box(x, y, 0.9, 0.27), _box(x, y, 0.27, 0.9))


def _star(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Five points, outer radius 1.0, inner radius ratio 0.45.
    r, rf = 1.0, 0.45
    k1x, k1y = 0.809016994375, -0.587785252292
    k2x, k2y = -k1x, k1y
    px = x.abs()
    py = y
    d = 2 * (k1x * px + k1y * py).clamp(min=0)
    px, py = px - d * k1x, py - d * k1y
    d = 2 * (k2x * px + k2y * py).clamp(min=0)
    px, py = px - d * k2x, py - d * k2y
    px = px.abs()
    py = py - r
    bax, bay = -rf * k1y, rf * k1x - 1.0
    h = ((px * bax + py * bay) / (bax * bax + bay * bay)).clamp(0, r)
    return torch.hypot(px - bax * h, py - bay * h) * torch.sign(py * bax - px * bay)


def _ring(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (torch.hypot(x, y) - 0.68).abs() - 0.22


def _crescent(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x + 0.3  # moves the crescent's mass to the origin
    return torch.maximum(torch.hypot(x, y) - 0.9, 0.75 - torch.hypot(x - 0.45, y))


def _half_disk(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y = y + 0.4  # centroid of a half-disk of radius 0.95 at the origin
    return torch.maximum(torch.hypot(x, y) - 0.95, -y)


def _letter_l(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = x + 0.21, y + 0.21  # centroid at the origin
    return torch.minimum(_box(x + 0.42, y, 0.22, 0.85), _box(x, y + 0.63, 0.64, 0.22))


def _hollow_square(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _box(x, y, 0.7, 0.7).abs() - 0.17


_SDFS: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    _circle,
    _square,
    _triangle,
    _cross,
    _star,
    _ring,
    _crescent,
    _half_disk,
    _letter_l,
    _hollow_square,
)


# --- the generator ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Params:
    """Per-image random parameters; every field has leading dimension N."""

    labels: torch.Tensor  # (N,) int64
    angle: torch.Tensor  # (N,)
    scale: torch.Tensor  # (N,)
    shift: torch.Tensor  # (N, 2)
    fg: torch.Tensor  # (N, 3)
    bg: torch.Tensor  # (N, 3)
    grating: torch.Tensor  # (N, 3): frequency, direction, phase

    def take(self, idx: torch.Tensor) -> _Params:
        """The parameters of the images at ``idx`` (int64 ``(B,)``)."""
        return _Params(*(getattr(self, f.name)[idx] for f in fields(self)))


def _draw_params(n: int, style: ShapesStyle, gen: torch.Generator) -> _Params:
    labels = (torch.arange(n) % len(SHAPE_NAMES))[torch.randperm(n, generator=gen)]
    lo, hi = style.scale
    width = (1.0 - style.band_gap) / 2
    light = (1.0 - width) + width * torch.rand(n, 3, generator=gen)
    dark = width * torch.rand(n, 3, generator=gen)
    light_shape = torch.rand(n, 1, generator=gen) < 0.5
    fg, bg = torch.where(light_shape, light, dark), torch.where(light_shape, dark, light)
    grating = torch.rand(n, 3, generator=gen) * torch.tensor([2.5, 2 * math.pi, 2 * math.pi])
    grating[:, 0] += 1.5
    return _Params(
        labels=labels,
        angle=torch.rand(n, generator=gen) * (2 * math.pi),
        scale=lo + (hi - lo) * torch.rand(n, generator=gen),
        shift=(2 * torch.rand(n, 2, generator=gen) - 1) * style.max_shift,
        fg=fg,
        bg=bg,
        grating=grating,
    )


def _render(p: _Params, image_size: int, style: ShapesStyle, gen: torch.Generator) -> torch.Tensor:
    """Render one chunk whose labels are sorted. Returns uint8 ``(B, 3, image_size, image_size)``."""
    b = p.labels.shape[0]
    axis = (torch.arange(image_size, dtype=torch.float32) + 0.5) * (2.0 / image_size) - 1.0
    gx = axis.view(1, 1, -1)  # x to the right
    gy = -axis.view(1, -1, 1)  # y up
    dx = gx - p.shift[:, 0].view(-1, 1, 1)
    dy = gy - p.shift[:, 1].view(-1, 1, 1)
    inv_scale = (1.0 / p.scale).view(-1, 1, 1)
    cos = torch.cos(p.angle).view(-1, 1, 1) * inv_scale
    sin = torch.sin(p.angle).view(-1, 1, 1) * inv_scale
    qx = cos * dx + sin * dy
    qy = cos * dy - sin * dx

    # Labels are sorted, so every class is one contiguous slice of the chunk.
    ends = torch.cumsum(torch.bincount(p.labels, minlength=len(_SDFS)), 0).tolist()
    sdf = torch.empty(b, image_size, image_size)
    start = 0
    for fn, end in zip(_SDFS, ends, strict=True):
        if end > start:
            sdf[start:end] = fn(qx[start:end], qy[start:end])
        start = end
    # Shape units -> pixels, then a soft edge about 2 * softness pixels wide.
    pixels_per_unit = (p.scale * (image_size / 2.0)).view(-1, 1, 1)
    mask = torch.sigmoid(sdf.mul_(-pixels_per_unit / style.softness)).unsqueeze(1)  # (B, 1, H, W)

    # Intensities in [0, 255] from here on.
    background = (255.0 * p.bg).view(b, 3, 1, 1).expand(b, 3, image_size, image_size)
    if style.texture > 0:
        freq, direction, phase = (p.grating[:, i].view(-1, 1, 1) for i in range(3))
        wave = torch.sin(math.pi * freq * (torch.cos(direction) * gx + torch.sin(direction) * gy) + phase)
        background = background + (255.0 * style.texture) * wave.unsqueeze(1)
    image = torch.lerp(background, (255.0 * p.fg).view(b, 3, 1, 1), mask)
    if style.noise > 0:
        image.add_(torch.randn(image.shape, generator=gen), alpha=255.0 * style.noise)
    # Round half up: truncation of a non-negative value is floor.
    return image.add_(0.5).clamp_(0, 255).to(torch.uint8)


def generate_shapes(
    n: int, *, image_size: int = 32, seed: int = 0, style: ShapesStyle = ShapesStyle()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate ``n`` labelled shape images, byte-identical for the same arguments.

    Classes are balanced (counts differ by at most one) and in random order.

    Returns:
        ``(images, labels)``: contiguous uint8 ``(n, 3, image_size, image_size)`` and int64 ``(n,)``
        with labels indexing ``SHAPE_NAMES``.
    """
    if n < 0 or image_size < 1 or seed < 0:
        raise ValueError(f"need n >= 0, image_size >= 1 and seed >= 0, got {n}, {image_size}, {seed}")
    gen = torch.Generator().manual_seed(seed)
    params = _draw_params(n, style, gen)
    # Render in label order (one slice per class and chunk), then put images in their places.
    order = argsort_stable(params.labels)
    images = torch.empty((n, 3, image_size, image_size), dtype=torch.uint8)
    step = max(1, _CHUNK_PIXELS // (image_size * image_size))
    for start in range(0, n, step):
        idx = order[start : start + step]
        images.index_copy_(0, idx, _render(params.take(idx), image_size, style, gen))
    return images, params.labels


def load_shapes(
    *, size: int | None, image_size: int, seed: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The train pool (drawn from ``seed``) and the test split (seed-independent) of ``shapes``.

    Returns:
        ``((pool_images, pool_labels), (test_images, test_labels))`` with ``size // 6`` test images
        and the rest in the pool; images uint8 ``(N, 3, image_size, image_size)``.
    """
    pool_size, test_size = split_sizes(DEFAULT_SIZE if size is None else size)
    pool_seed = _derived_seed(seed, Stream.SHAPES_TRAIN)
    test_seed = _derived_seed(FIXED_SEED, Stream.SHAPES_TEST)
    pool = generate_shapes(pool_size, image_size=image_size, seed=pool_seed)
    test = generate_shapes(test_size, image_size=image_size, seed=test_seed)
    return pool, test


def _derived_seed(seed: int, stream: Stream) -> int:
    return int(generator(seed, stream).initial_seed())
