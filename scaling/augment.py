"""Batched, per-sample-random multi-view augmentations on the training device.

The SimCLR recipe (Chen et al., 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", appendix A) made into tensor programs over the whole batch: every one of the
``V * N`` views gets its own random parameters, but all of them are processed in one pass of a
few dozen batched tensor operations -- no Python loop over images or views, no DataLoader
workers. The pipeline, in this fixed order:

1. random resized crop + horizontal flip (+ a random rotation about the crop centre, up to
   ``rotation`` degrees): one affine map per view (the flip folded into it), applied with
   ``F.grid_sample`` (bilinear, border padding) on the grid ``F.affine_grid`` would build --
   constructed directly, as one broadcast add of complex numbers, at a fraction of the cost. The
   crop box is drawn with torchvision's ``RandomResizedCrop`` rules (10 attempts of area ~ U(scale)
   and log-ratio ~ U(log ratio), the first box that fits, else the centre-crop fallback),
   vectorised over views and attempts; boxes are continuous (sub-pixel), not rounded to whole
   pixels;
2. colour jitter with probability ``jitter_p``: brightness, contrast, saturation, hue -- always in
   this order (torchvision shuffles the order per image; a fixed order is a documented choice),
   each op clamped to [0, 1] like torchvision's. Hue is the exact HSV hue rotation of
   ``torchvision.transforms.v2.functional.adjust_hue``, vectorised;
3. grayscale with probability ``grayscale_p`` (ITU-R 601 luma, replicated over the channels);
4. a random non-identity permutation of the RGB channels with probability ``channel_shuffle_p``;
5. Gaussian blur with probability ``blur_p`` and per-view sigma ~ U(blur_sigma): separable, reflect
   padding, odd kernel of about 10 % of the output size (at least 3), one kernel per view, as
   batched multiply-adds per tap (kernels of <= 5 taps) or a grouped convolution (larger ones);
6. normalisation with ``mean`` / ``std``.

On the CPU the cost is the number of full passes over the batch, so steps share passes where the
arithmetic allows: brightness rides on the uint8 -> [0, 1] scaling of the crop, and the channel
shuffle on the last pass of the hue rotation (``_augment`` says where).

Randomness comes only from the ``generator`` argument (or the global RNG of the images' device
when it is None): for a seeded generator the output is a pure function of the seed and the input.
The generator must live on the same device as the images (``torch.Generator(device=images.device)``),
because the parameters are drawn where the images are, so nothing crosses the host/device boundary.

Views come out view-major: ``out[v, n]`` is view ``v`` of image ``n``.

Differences from the per-sample torchvision pipeline, all deliberate: crop boxes are not rounded
to whole pixels, resizing uses bilinear sampling without antialiasing (irrelevant when crops are
upscaled, as for 32 px images) and reads the pixels just outside the box at its edges, and the
jitter order is fixed. Colour ops, grayscale and blur match torchvision's to float precision
(``tests/test_augment.py`` checks each against ``torchvision.transforms.v2.functional``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["AugmentConfig", "augment_views", "eval_transform", "multicrop_views"]

# ITU-R 601-2 luma, the weights of torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)
# torchvision.transforms.v2.RandomResizedCrop tries this many boxes before its centre-crop fallback.
_CROP_ATTEMPTS = 10


def _pair(value: tuple[float, float] | list[float], name: str) -> tuple[float, float]:
    if len(value) != 2:
        raise ValueError(f"AugmentConfig.{name} must be a (low, high) pair, got {value!r}")
    low, high = float(value[0]), float(value[1])
    if not low <= high:
        raise ValueError(f"AugmentConfig.{name} must have low <= high, got {value!r}")
    return low, high


def _probability(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"AugmentConfig.{name} is a probability and must lie in [0, 1], got {value!r}")


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of the SimCLR augmentation pipeline (defaults: SimCLR's CIFAR-style recipe).

    ``strength`` is SimCLR's colour-distortion strength ``s``: it multiplies ``brightness``,
    ``contrast``, ``saturation`` and ``hue``. Brightness, contrast and saturation factors are drawn
    from ``U(max(0, 1 - m), 1 + m)`` with ``m = magnitude * strength``; the hue shift from
    ``U(-hue * strength, hue * strength)`` (in turns, so at most 0.5). ``mean`` / ``std`` are per
    channel; 1-channel images use the first entry. Sequences are stored as tuples of floats.
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    strength: float = 1.0
    channel_shuffle_p: float = 0.0  # probability of a random RGB channel permutation (breaks colour identity)
    rotation: float = 0.0  # max degrees of a random rotation about the crop centre (0: off, SimCLR's default)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)

    def __post_init__(self) -> None:
        if not 0.0 <= self.rotation <= 180.0:
            raise ValueError(f"AugmentConfig.rotation is in degrees: need 0 <= rotation <= 180, got {self.rotation!r}")
        scale = _pair(self.crop_scale, "crop_scale")
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(
                f"AugmentConfig.crop_scale is a fraction of the image area: need 0 < low <= high <= 1, "
                f"got {self.crop_scale!r}"
            )
        ratio = _pair(self.crop_ratio, "crop_ratio")
        if not ratio[0] > 0.0:
            raise ValueError(f"AugmentConfig.crop_ratio (width / height) must be positive, got {self.crop_ratio!r}")
        sigma = _pair(self.blur_sigma, "blur_sigma")
        if not sigma[0] > 0.0:
            raise ValueError(f"AugmentConfig.blur_sigma must be positive, got {self.blur_sigma!r}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "channel_shuffle_p"):
            _probability(getattr(self, name), name)
        for name in ("brightness", "contrast", "saturation", "hue", "strength"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"AugmentConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.hue * self.strength > 0.5:
            raise ValueError(
                f"AugmentConfig.hue * strength is a hue shift in turns and must be <= 0.5, "
                f"got {self.hue} * {self.strength}"
            )
        mean = tuple(float(m) for m in self.mean)
        std = tuple(float(s) for s in self.std)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"AugmentConfig.mean and .std need 3 entries (RGB), got {self.mean!r} and {self.std!r}")
        if not all(s > 0.0 for s in std):
            raise ValueError(f"AugmentConfig.std must be positive, got {self.std!r}")
        for name, value in (("crop_scale", scale), ("crop_ratio", ratio), ("blur_sigma", sigma),
                            ("mean", mean), ("std", std)):
            object.__setattr__(self, name, value)


class _Params(NamedTuple):
    """Per-view random parameters for a batch of B views (all tensors on the images' device)."""

    boxes: torch.Tensor  # (B, 4) crop box x0, y0, w, h in pixels (continuous)
    flip: torch.Tensor  # (B,) bool
    brightness: torch.Tensor  # (B,) factor, 1 where jitter is off
    contrast: torch.Tensor  # (B,)
    saturation: torch.Tensor  # (B,)
    hue: torch.Tensor  # (B,) shift in turns, 0 where jitter is off
    grayscale: torch.Tensor  # (B,) bool
    sigma: torch.Tensor  # (B,) blur sigma, 0 where blur is off
    angle: torch.Tensor  # (B,) rotation in radians
    perm: torch.Tensor  # (B,) index into _PERMS, 0 (identity) where the shuffle is off


# Row layout of the single uniform draw behind _sample_params.
_C_AREA = slice(0, _CROP_ATTEMPTS)
_C_RATIO = slice(_CROP_ATTEMPTS, 2 * _CROP_ATTEMPTS)
_C_X, _C_Y, _C_FLIP, _C_JITTER, _C_B, _C_C, _C_S, _C_H, _C_GRAY, _C_BLUR, _C_SIGMA, _C_ROT, _C_SHUF, _C_PERM = range(
    2 * _CROP_ATTEMPTS, 2 * _CROP_ATTEMPTS + 14
)
_N_UNIFORMS = 2 * _CROP_ATTEMPTS + 14
# The 6 permutations of RGB; index 0 is the identity.
_PERMS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


class _Tables(NamedTuple):
    """Lookup tables of the colour ops."""

    perms: torch.Tensor  # (6, 3) int64: _PERMS
    luma: torch.Tensor  # (3,) _LUMA


# Built once on the host, and copied once to each other device that uses them (a copy per call
# would be a synchronising host-to-device transfer on a GPU).
_TABLES = {torch.device("cpu"): _Tables(perms=torch.tensor(_PERMS), luma=torch.tensor(_LUMA))}


def _tables(device: torch.device) -> _Tables:
    """The lookup tables on ``device``."""
    if device not in _TABLES:
        cpu = _TABLES[torch.device("cpu")]
        _TABLES[device] = _Tables(perms=cpu.perms.to(device), luma=cpu.luma.to(device))
    return _TABLES[device]


def _uniform(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return u * (high - low) + low


def _sample_params(
    batch: int, height: int, width: int, config: AugmentConfig, generator: torch.Generator | None,
    device: torch.device,
) -> _Params:
    """Draw the parameters of ``batch`` views of ``height x width`` images from one uniform draw.

    One row of uniforms per parameter (``_C_*``), so that the small ops below run on contiguous
    rows (on strided columns of a (B, 34) draw they cost about twice as much).
    """
    u = torch.rand(_N_UNIFORMS, batch, generator=generator, device=device)

    # RandomResizedCrop: first of 10 (area, ratio) attempts that fits, else the centre-crop fallback.
    area = _uniform(u[_C_AREA], *config.crop_scale).mul_(height * width)  # (attempts, B)
    log_lo, log_hi = math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1])
    aspect = _uniform(u[_C_RATIO], log_lo, log_hi).exp_()
    w_try = torch.mul(area, aspect).sqrt_()
    h_try = area.div_(aspect).sqrt_()
    fits = (w_try <= width).logical_and_(h_try <= height)
    any_fit, first = fits.byte().max(dim=0, keepdim=True)  # max returns the first of equal maxima
    w = w_try.gather(0, first).squeeze(0)
    h = h_try.gather(0, first).squeeze(0)
    in_ratio = width / height
    if in_ratio < config.crop_ratio[0]:
        fallback_w, fallback_h = float(width), width / config.crop_ratio[0]
    elif in_ratio > config.crop_ratio[1]:
        fallback_w, fallback_h = height * config.crop_ratio[1], float(height)
    else:
        fallback_w, fallback_h = float(width), float(height)
    any_fit = any_fit.squeeze(0).bool()
    w = torch.where(any_fit, w, fallback_w)
    h = torch.where(any_fit, h, fallback_h)
    # Fitting boxes get a uniform position; the fallback is centred (position fraction 1/2).
    x_frac, y_frac = torch.where(any_fit, u[_C_X:_C_Y + 1], 0.5).unbind(dim=0)
    boxes = torch.stack((x_frac.mul_(width - w), y_frac.mul_(height - h), w, h), dim=1)

    jitter = u[_C_JITTER] < config.jitter_p
    s = config.strength

    def factor(row: int, magnitude: float) -> torch.Tensor:
        m = magnitude * s
        value = _uniform(u[row], max(0.0, 1.0 - m), 1.0 + m)
        return torch.where(jitter, value, 1.0)

    hue = torch.where(jitter, _uniform(u[_C_H], -config.hue * s, config.hue * s), 0.0)
    blur = u[_C_BLUR] < config.blur_p
    sigma = torch.where(blur, _uniform(u[_C_SIGMA], *config.blur_sigma), 0.0)
    return _Params(
        boxes=boxes,
        flip=u[_C_FLIP] < config.flip_p,
        brightness=factor(_C_B, config.brightness),
        contrast=factor(_C_C, config.contrast),
        saturation=factor(_C_S, config.saturation),
        hue=hue,
        grayscale=u[_C_GRAY] < config.grayscale_p,
        sigma=sigma,
        angle=_uniform(u[_C_ROT], -1.0, 1.0).mul_(math.radians(config.rotation)),
        perm=torch.where(u[_C_SHUF] < config.channel_shuffle_p,
                         (u[_C_PERM] * 5).long().clamp_(max=4) + 1, 0),  # a non-identity permutation
    )


# ---------------------------------------------------------------------------------------------
# The ops. The geometry turns uint8 (N, C, H, W) images into float views; the colour ops take
# float views in [0, 1] of shape (B, C, H, W) and per-view parameters of shape (B,). Ops whose
# name ends in `_` write their result over `images` and return it: at 512 views of 32 x 32 px a
# full-size temporary costs as much as the arithmetic (allocation plus first-touch page faults), so
# the pipeline works in one buffer. No op copies data to or from the host (constants are Python
# scalars, or tables copied to a device once: `_tables`), so on a GPU the whole pass stays
# asynchronous.


def _centred_coordinates(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(size,) centres of ``size`` output pixels in [-1, 1] (``align_corners=False`` convention)."""
    return torch.arange(size, device=device, dtype=dtype).add_(0.5).mul_(2.0 / size).sub_(1.0)


def _sampling_grid(boxes: torch.Tensor, flip: torch.Tensor, angle: torch.Tensor | None, size: int, height: int,
                   width: int, views: int = 1) -> torch.Tensor:
    """``F.grid_sample`` grid of the resized crop of ``boxes`` (x0, y0, w, h; pixels), mirrored where
    ``flip``, rotated by ``angle`` (radians) about the box centre (None: no rotation).

    Shape: boxes (V * N, 4), flip (V * N,), angle (V * N,) or None, view-major -> (N, V * size,
    size, 2): the V grids of each image stacked along the rows (as ``_sample_views`` wants them),
    normalised to the ``height x width`` input (``align_corners=False``: -1 and 1 are the outer
    pixel edges). With ``views=1``, simply (B, size, size, 2).

    Output pixel (i, j) reads the input at ``centre + R(angle) (u_j, v_i)``, with (u, v) its offset
    from the output centre scaled to the box (u negated where flipped). The map is worked out in
    pixel units, so rotation keeps shapes on non-square images. The point is the sum of a column
    term (B, 1, S) and a row term (B, S, 1); held as complex numbers x + iy, the whole grid is a
    single broadcast add, and ``view_as_real`` lays it out as the (..., 2) grid -- no full-size x
    and y planes interleaved by ``stack`` (which cost as much as the sampling). The add also does
    the view-major to image-major reordering, by writing into an image-major output.
    """
    b = boxes.shape[0]
    x0, y0, w, h = (t.view(b, 1, 1) for t in boxes.unbind(dim=1))
    base = _centred_coordinates(size, boxes.dtype, boxes.device)
    u = base.view(1, 1, size) * torch.where(flip.view(b, 1, 1), -w, w).mul_(0.5)  # (B, 1, S) pixels
    v = base.view(1, size, 1) * (h / 2)  # (B, S, 1) pixels
    sx, sy = 2.0 / width, 2.0 / height
    cos, sin = (1.0, 0.0) if angle is None else (torch.cos(angle).view(b, 1, 1), torch.sin(angle).view(b, 1, 1))
    # x = cx + cos u - sin v, y = cy + sin u + cos v, each scaled to [-1, 1].
    columns = torch.complex((cos * u).add_(x0 + w / 2).mul_(sx).sub_(1.0),
                            (sin * u).add_(y0 + h / 2).mul_(sy).sub_(1.0))  # (B, 1, S)
    rows = torch.complex((sin * v).mul_(-sx), (cos * v).mul_(sy))  # (B, S, 1)
    n = b // views
    grid = columns.new_empty(n, views, size, size)
    torch.add(columns.view(views, n, 1, size).transpose(0, 1), rows.view(views, n, size, 1).transpose(0, 1),
              out=grid)
    return torch.view_as_real(grid).view(n, views * size, size, 2)


def _sample(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _crop_flip(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Resized crop of ``boxes`` (x0, y0, w, h; pixels) to ``size x size``, mirrored where ``flip``.

    Shape: images (B, C, H, W), boxes (B, 4), flip (B,) -> (B, C, size, size).

    ``F.grid_sample`` samples the grid of ``_sampling_grid`` bilinearly. Sampling uses the whole
    image, so output pixels at a box edge blend in the pixels just outside it (``resized_crop``,
    which sees only the box, replicates the edge instead).
    """
    return _sample(images, _sampling_grid(boxes, flip, None, size, *images.shape[-2:]))


def _crop_flip_rotate(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, angle: torch.Tensor,
                      size: int) -> torch.Tensor:
    """Like ``_crop_flip`` but the box is also rotated by ``angle`` (radians, (B,)) about its centre."""
    return _sample(images, _sampling_grid(boxes, flip, angle, size, *images.shape[-2:]))


def _sample_views(images: torch.Tensor, grid: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Sample ``V`` views of each uint8 image at ``grid``, times ``scale``, in view-major order.

    Shape: images (N, C, H, W) uint8, grid (N, V * S, S, 2) from ``_sampling_grid``, scale (V * N,)
    view-major -> (V * N, C, S, S) float.

    The V grids of an image are stacked along the output rows, so ``F.grid_sample`` reads the N
    images once rather than a V-fold repeated copy of the batch (converted to float and scaled by
    1 / 255 in two more full passes). The view-major order this leaves out of place, and the
    scaling to [0, 1] (folded into ``scale`` with the brightness factor: sampling is linear), cost
    one pass together.
    """
    n, c = images.shape[:2]
    size = grid.shape[2]
    views = grid.shape[1] // size
    samples = _sample(images.float(), grid).view(n, c, views, size, size)
    out = samples.new_empty(views, n, c, size, size)
    torch.mul(samples.permute(2, 0, 1, 3, 4), scale.view(views, n, 1, 1, 1), out=out)
    return out.view(views * n, c, size, size)


def _luma(images: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) ITU-R 601 luma (torchvision's rgb_to_grayscale).

    ``weights`` (B, 3): per-view weights of the three channels instead of ``_LUMA``.
    """
    r, g, b = images.unbind(dim=1)
    if weights is None:
        return (r * _LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)
    w0, w1, w2 = weights.to(images.dtype).view(-1, 3, 1, 1).unbind(dim=1)
    return (r * w0).addcmul_(g, w1).addcmul_(b, w2).unsqueeze(1)


def _blend_(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """In place: ``clamp(factor * images + (1 - factor) * other, 0, 1)``; factor is (B,).

    ``other`` is (B, 1, H, W): one ``lerp_`` towards it. Or (B,): then it is folded into a per-view
    offset first, because ternary ops with two per-view scalars (``lerp_``, ``addcmul_``) miss the
    vectorised CPU kernels and run several times slower than ``mul_`` plus ``add_``.
    """
    f = factor.view(-1, 1, 1, 1)
    if other.dim() == 1:
        offset = torch.addcmul(other, other, factor, value=-1.0)  # (1 - factor) * other
        return images.mul_(f).add_(offset.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
    return images.lerp_(other, 1 - f).clamp_(0.0, 1.0)


def _adjust_contrast_(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """In place: torchvision's adjust_contrast (blend with the mean luma) with a per-view factor (B,)."""
    means = images.mean(dim=(2, 3))  # (B, C); the mean luma is the luma of the means
    luma = means.mv(_tables(images.device).luma.to(images.dtype)) if images.shape[1] == 3 else means.view(-1)
    return _blend_(images, luma, factor)


def _adjust_saturation_(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """In place: torchvision's adjust_saturation (blend with the luma) with a per-view factor (B,)."""
    if images.shape[1] == 1:
        return images
    return _blend_(images, _luma(images), factor)


def _adjust_hue_(images: torch.Tensor, shift: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """In place: rotate the HSV hue of each RGB view by ``shift`` turns (B,); torchvision's adjust_hue.

    With ``order`` (B, 3), the output channels also come out permuted: channel c of view i is the
    rotated channel ``order[i, c]`` (``_shuffle_channels``, for free: a channel enters the closed
    form below only through its offset o, so permuting the offsets permutes the channels).

    A hue rotation keeps the largest and smallest channel (HSV's V and S); only the hue angle
    moves. With ``h`` the rotated hue in sextants wrapped to [-3, 3), the rotated colour has the
    closed form ``c = max - (max - min) * clamp(||h + o| - 3| - 1, 0, 1)`` with o = 3, 1, -1 for R,
    G, B (an algebraic rewrite of the usual ``max - (max - min) * clamp(min(k, 4 - k), 0, 1)``,
    ``k = (n + h) mod 6``), computed as ``(max + delta) - delta * clamp(||h + o| - 3|, 1, 2)``, one
    pass fewer.

    Every step is one whole-tensor pass, so the op count is the cost: the sextant case split (red
    is the max, else green, else blue, as in torchvision) is two exact 0/1 float masks written by
    comparisons, and ``lerp_`` selects with them (exact for weights 0 and 1); boolean masks,
    ``torch.where`` and ``remainder`` are several times slower on the CPU, hence also the wrap by
    ``frac``. Only single-plane temporaries are allocated.
    """
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(dim=1)
    mask = torch.maximum(r, g)  # max(r, g) for now
    maxc = torch.maximum(mask, b)
    delta = torch.minimum(r, g)
    torch.minimum(delta, b, out=delta)
    torch.sub(maxc, delta, out=delta)
    # Sextant numerators: blue (r - g + 4 delta), replaced by green (b - r + 2 delta) where red or
    # green is the max, replaced by red (g - b) where red is: torchvision's priority.
    hue = torch.sub(r, g).add_(delta, alpha=4.0)
    other = torch.sub(b, r).add_(delta, alpha=2.0)
    hue.lerp_(other, torch.eq(mask, maxc, out=mask))  # 1 where red or green is the max, else 0
    hue.lerp_(torch.sub(g, b, out=other), torch.eq(r, maxc, out=mask))  # 1 where red is the max
    # Divide by delta, rotate and wrap, in turns: hue / 6 + shift + 1/2 lies in [-1/6, 11/6]; one
    # more turn keeps it positive for frac, and 6 * frac(.) - 3 is the rotated hue in [-3, 3) (the
    # -3 is in `offsets`). delta == 0 means r = g = b, where every numerator is 0 and so is the hue.
    turns = shift.add(1.5).view(-1, 1, 1)
    torch.addcdiv(turns, hue, torch.clamp_min(delta, 1e-12, out=other), value=1.0 / 6.0, out=hue).frac_()
    if order is None:
        order = torch.arange(3, device=images.device).view(1, 3)
    offsets = order.to(images.dtype).mul_(-2.0).view(-1, 3, 1, 1)  # o - 3, per output channel
    k = torch.add(offsets, hue.unsqueeze(1), alpha=6.0, out=images)  # r, g, b are dead from here on
    k.abs_().sub_(3.0).abs_().clamp_(1.0, 2.0)
    top = maxc.add_(delta).unsqueeze(1)  # max + delta
    return torch.addcmul(top, k, delta.unsqueeze(1), value=-1.0, out=k)


def _grayscale_(images: torch.Tensor, mask: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """In place: replace the views where ``mask`` (B,) by their luma, replicated over channels.

    ``order`` (B, 3): the channels of ``images`` are already permuted by it (``_adjust_hue_``), so
    the luma weighs channel c with the weight of channel ``order[:, c]``. The replicated luma is
    the same in any channel order, so this equals grayscale followed by the permutation.
    """
    if images.shape[1] == 1:
        return images
    weights = None if order is None else _tables(images.device).luma[order]  # each source channel's weight
    return images.lerp_(_luma(images, weights), mask.to(images.dtype).view(-1, 1, 1, 1))


def _blur_kernel_size(size: int) -> int:
    """SimCLR's kernel of 10 % of the image side, made odd, at least 3."""
    k = int(0.1 * size)
    return max(3, k + 1 - k % 2)


def _gaussian_kernels(sigma: torch.Tensor, kernel_size: int, dtype: torch.dtype) -> torch.Tensor:
    """(B,) sigmas -> (B, kernel_size) normalised Gaussian taps; sigma 0 gives the identity kernel."""
    half = kernel_size // 2
    x = torch.arange(-half, half + 1, device=sigma.device, dtype=dtype)
    on = sigma > 0
    safe = torch.where(on, sigma, 1.0).to(dtype).view(-1, 1)
    kernel = torch.softmax(-(x / safe).square() / 2, dim=1)
    return torch.where(on.view(-1, 1), kernel, (x == 0).to(dtype))


def _gaussian_blur_(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-view ``sigma`` (B,), sigma 0 = off; result in ``images``.

    torchvision's kernel (``exp(-d^2 / (2 sigma^2))`` at integer offsets d, normalised) and reflect
    padding. Small kernels (the 3 taps of 32 px images) run as one batched multiply-add per tap,
    which at that size is twice as fast as a depthwise convolution and allocates a single padded
    copy; larger kernels run as a grouped convolution with one 1-D kernel per (view, channel).
    """
    b, c, height, width = images.shape
    half = kernel_size // 2
    kernel = _gaussian_kernels(sigma, kernel_size, images.dtype)
    if kernel_size <= 5:
        taps = kernel.view(b, 1, 1, 1, kernel_size)
        # One buffer holds the row-padded image, then (viewed the other way) the column-padded one.
        buffer = images.new_empty(b * c * (height + 2 * half) * (width + 2 * half))
        for pass_dim in (2, 3):
            n = images.shape[pass_dim]
            shape = (b, c, height + 2 * half, width) if pass_dim == 2 else (b, c, height, width + 2 * half)
            padded = buffer[: math.prod(shape)].view(shape)
            padded.narrow(pass_dim, half, n).copy_(images)
            for i in range(1, half + 1):  # reflect: padded row half - i is image row i, and mirrored
                padded.select(pass_dim, half - i).copy_(images.select(pass_dim, i))
                padded.select(pass_dim, half + n - 1 + i).copy_(images.select(pass_dim, n - 1 - i))
            torch.mul(padded.narrow(pass_dim, 0, n), taps[..., 0], out=images)
            for d in range(1, kernel_size):
                images.addcmul_(padded.narrow(pass_dim, d, n), taps[..., d])
        return images
    weight = kernel.repeat_interleave(c, dim=0)  # (B * C, k): one kernel per (view, channel) group
    padded = F.pad(images, (half, half, half, half), mode="reflect").view(1, b * c, height + 2 * half, -1)
    out = F.conv2d(padded, weight.view(b * c, 1, kernel_size, 1), groups=b * c)
    out = F.conv2d(out, weight.view(b * c, 1, 1, kernel_size), groups=b * c)
    return images.copy_(out.view(b, c, height, width))


def _normalize_(images: torch.Tensor, config: AugmentConfig) -> torch.Tensor:
    """In place: ``(images - mean) / std`` per channel (a 1-channel image uses the first entry).

    Multiplies by ``1 / std`` (a multiplication is cheaper than a division; exact for the usual
    powers of two), over all channels at once where they share mean and std (the usual case).
    """
    channels = images.shape[1]
    mean, std = config.mean[:channels], config.std[:channels]
    if len(set(mean)) == 1 and len(set(std)) == 1:
        return images.sub_(mean[0]).mul_(1.0 / std[0])
    for channel in range(channels):
        images[:, channel].sub_(mean[channel]).mul_(1.0 / std[channel])
    return images


# ---------------------------------------------------------------------------------------------


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(
            f"images must be a uint8 tensor of shape (N, C, H, W), got {images.dtype} of shape {tuple(images.shape)}"
        )
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {images.shape[1]}")


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device} but images are on {device}: create it with "
            f"torch.Generator(device=images.device)"
        )


def _crop_views(images: torch.Tensor, params: _Params, views: int, size: int, config: AugmentConfig) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float (V * N, C, size, size): the resized crops, brightness applied.

    Brightness is a per-view factor on linear samples, so it rides along with the 1 / 255 of the
    uint8 -> [0, 1] conversion in one multiplication (``params.brightness`` is exactly 1 wherever
    brightness is off); only the clamp of torchvision's adjust_brightness is left to do.
    """
    angle = params.angle if config.rotation > 0 else None
    grid = _sampling_grid(params.boxes, params.flip, angle, size, *images.shape[-2:], views=views)
    x = _sample_views(images, grid, params.brightness / 255.0)
    if config.jitter_p > 0 and config.brightness * config.strength > 0:
        x.clamp_(0.0, 1.0)
    return x


def _channel_order(perm: torch.Tensor) -> torch.Tensor:
    """(B,) indices into ``_PERMS`` -> (B, 3): the source channel of each output channel."""
    return _tables(perm.device).perms[perm]


def _shuffle_channels(images: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Permute the RGB channels of each view by ``order`` (B, 3); returns a new tensor.

    ``index_select`` of whole channel planes: ``gather`` with an expanded per-pixel index costs
    fifteen times more.
    """
    b, c, height, width = images.shape
    rows = torch.arange(0, b * c, c, device=images.device).view(b, 1).add(order).view(-1)
    return images.view(b * c, height, width).index_select(0, rows).view(b, c, height, width)


def _augment(
    images: torch.Tensor, views: int, config: AugmentConfig, generator: torch.Generator | None, size: int,
) -> torch.Tensor:
    n, c, height, width = images.shape
    params = _sample_params(views * n, height, width, config, generator, images.device)
    # The channel shuffle comes after grayscale; when the hue op runs, it applies the shuffle to
    # its output for free, and grayscale then reads the shuffled channels through `order`.
    order = _channel_order(params.perm) if config.channel_shuffle_p > 0 and c == 3 else None
    shuffled = False
    x = _crop_views(images, params, views, size, config)  # brightness included
    if config.jitter_p > 0:  # fixed order; saturation and hue are no-ops on 1 channel, as in torchvision
        s = config.strength
        if config.contrast * s > 0:
            _adjust_contrast_(x, params.contrast)
        if config.saturation * s > 0:
            _adjust_saturation_(x, params.saturation)
        if config.hue * s > 0:
            _adjust_hue_(x, params.hue, order)
            shuffled = order is not None
    if config.grayscale_p > 0:
        _grayscale_(x, params.grayscale, order if shuffled else None)
    if order is not None and not shuffled:
        x = _shuffle_channels(x, order)
    if config.blur_p > 0:
        _gaussian_blur_(x, params.sigma, _blur_kernel_size(size))
    return _normalize_(x, config).view(views, n, c, size, size)


def augment_views(
    images: torch.Tensor,
    views: int,
    config: AugmentConfig = AugmentConfig(),
    *,
    generator: torch.Generator | None = None,
    out_size: int | None = None,
) -> torch.Tensor:
    """Make ``views`` independently augmented views of every image, in one batched pass.

    Args:
        images: uint8 images, any device.
        views: number of views per image, at least 2.
        config: the augmentation recipe.
        generator: source of all randomness; must be on ``images.device``. None uses the global RNG.
        out_size: side of the square output; defaults to ``min(H, W)``.

    Shape:
        images (N, C, H, W) uint8 with C in {1, 3} -> (V, N, C, S, S) float32 on the same device,
        normalised with ``config.mean`` / ``config.std``.
    """
    if views < 2:
        raise ValueError(f"views must be >= 2 (a contrastive positive needs two views), got {views}")
    _check_images(images)
    _check_generator(generator, images.device)
    size = min(images.shape[-2:]) if out_size is None else out_size
    if size < 1:
        raise ValueError(f"out_size must be positive, got {out_size}")
    return _augment(images, views, config, generator, size)


def multicrop_views(
    images: torch.Tensor,
    *,
    global_views: int = 2,
    local_views: int = 4,
    global_size: int | None = None,
    local_size: int | None = None,
    local_scale: tuple[float, float] = (0.05, 0.4),
    config: AugmentConfig = AugmentConfig(),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SwAV-style multi-crop (Caron et al., 2020): large global views plus small local views.

    Global views use ``config`` as is; local views use ``config`` with ``crop_scale=local_scale``.
    ``global_size`` defaults to ``min(H, W)``, ``local_size`` to ``round(global_size * 3 / 7)``
    (SwAV's 224 -> 96). Globals are drawn from ``generator`` first, then locals.

    Shape:
        images (N, C, H, W) uint8 -> ((global_views, N, C, G, G), (local_views, N, C, L, L)) float32.
    """
    if global_views < 2:
        raise ValueError(f"global_views must be >= 2, got {global_views}")
    if local_views < 0:
        raise ValueError(f"local_views must be >= 0, got {local_views}")
    _check_images(images)
    _check_generator(generator, images.device)
    g = min(images.shape[-2:]) if global_size is None else global_size
    l_size = max(1, round(g * 3 / 7)) if local_size is None else local_size
    if g < 1 or l_size < 1:
        raise ValueError(f"global_size and local_size must be positive, got {global_size} and {local_size}")
    local_config = replace(config, crop_scale=tuple(local_scale))
    global_out = _augment(images, global_views, config, generator, g)
    n, c = images.shape[:2]
    if local_views == 0:
        return global_out, global_out.new_empty(0, n, c, l_size, l_size)
    return global_out, _augment(images, local_views, local_config, generator, l_size)


def eval_transform(images: torch.Tensor, config: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """No augmentation: uint8 (N, C, H, W) -> float32 (N, C, H, W) scaled to [0, 1] and normalised."""
    _check_images(images)
    return _normalize_(images.float().div_(255.0), config)
