"""Batched, per-sample-random multi-view augmentations on the training device.

The SimCLR recipe (Chen et al., 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", appendix A) made into tensor programs over the whole batch: every one of the
``V * N`` views gets its own random parameters, but all of them are processed in one pass of a
few dozen batched tensor operations -- no Python loop over images or views, no DataLoader
workers. The pipeline, in this fixed order:

1. random resized crop + horizontal flip: one affine matrix per view (the flip folded into it),
   applied with ``F.grid_sample`` (bilinear, border padding) on the grid ``F.affine_grid`` would
   build -- constructed directly, as the map is axis-aligned, at half the cost. The crop box is
   drawn with torchvision's ``RandomResizedCrop`` rules (10 attempts of area ~ U(scale) and
   log-ratio ~ U(log ratio), the first box that fits, else the centre-crop fallback), vectorised
   over views and attempts; boxes are continuous (sub-pixel), not rounded to whole pixels;
2. colour jitter with probability ``jitter_p``: brightness, contrast, saturation, hue -- always in
   this order (torchvision shuffles the order per image; a fixed order is a documented choice),
   each op clamped to [0, 1] like torchvision's. Hue is the exact HSV hue rotation of
   ``torchvision.transforms.v2.functional.adjust_hue``, vectorised;
3. grayscale with probability ``grayscale_p`` (ITU-R 601 luma, replicated over the channels);
4. Gaussian blur with probability ``blur_p`` and per-view sigma ~ U(blur_sigma): separable, reflect
   padding, odd kernel of about 10 % of the output size (at least 3), one kernel per view, as
   batched multiply-adds per tap (kernels of <= 5 taps) or a grouped convolution (larger ones);
5. normalisation with ``mean`` / ``std``.

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


# Column layout of the single uniform draw behind _sample_params.
_C_AREA = slice(0, _CROP_ATTEMPTS)
_C_RATIO = slice(_CROP_ATTEMPTS, 2 * _CROP_ATTEMPTS)
_C_X, _C_Y, _C_FLIP, _C_JITTER, _C_B, _C_C, _C_S, _C_H, _C_GRAY, _C_BLUR, _C_SIGMA, _C_ROT, _C_SHUF, _C_PERM = range(
    2 * _CROP_ATTEMPTS, 2 * _CROP_ATTEMPTS + 14
)
_N_UNIFORMS = 2 * _CROP_ATTEMPTS + 14
# The 6 permutations of RGB; index 0 is the identity.
_PERMS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


def _uniform(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return u * (high - low) + low


def _sample_params(
    batch: int, height: int, width: int, config: AugmentConfig, generator: torch.Generator | None,
    device: torch.device,
) -> _Params:
    """Draw the parameters of ``batch`` views of ``height x width`` images from one uniform draw."""
    u = torch.rand(batch, _N_UNIFORMS, generator=generator, device=device)

    # RandomResizedCrop: first of 10 (area, ratio) attempts that fits, else the centre-crop fallback.
    area = _uniform(u[:, _C_AREA], *config.crop_scale) * (height * width)
    log_lo, log_hi = math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1])
    aspect = torch.exp(_uniform(u[:, _C_RATIO], log_lo, log_hi))
    w_try = torch.sqrt(area * aspect)
    h_try = torch.sqrt(area / aspect)
    fits = (w_try <= width) & (h_try <= height)
    first = fits.float().argmax(dim=1, keepdim=True)  # argmax returns the first of equal maxima
    w = w_try.gather(1, first).squeeze(1)
    h = h_try.gather(1, first).squeeze(1)
    in_ratio = width / height
    if in_ratio < config.crop_ratio[0]:
        fallback_w, fallback_h = float(width), width / config.crop_ratio[0]
    elif in_ratio > config.crop_ratio[1]:
        fallback_w, fallback_h = height * config.crop_ratio[1], float(height)
    else:
        fallback_w, fallback_h = float(width), float(height)
    any_fit = fits.any(dim=1)
    w = torch.where(any_fit, w, fallback_w)
    h = torch.where(any_fit, h, fallback_h)
    # Fitting boxes get a uniform position; the fallback is centred (position fraction 1/2).
    x_frac = torch.where(any_fit, u[:, _C_X], 0.5)
    y_frac = torch.where(any_fit, u[:, _C_Y], 0.5)
    boxes = torch.stack((x_frac * (width - w), y_frac * (height - h), w, h), dim=1)

    jitter = u[:, _C_JITTER] < config.jitter_p
    s = config.strength

    def factor(column: int, magnitude: float) -> torch.Tensor:
        m = magnitude * s
        value = _uniform(u[:, column], max(0.0, 1.0 - m), 1.0 + m)
        return torch.where(jitter, value, 1.0)

    hue = torch.where(jitter, _uniform(u[:, _C_H], -config.hue * s, config.hue * s), 0.0)
    blur = u[:, _C_BLUR] < config.blur_p
    sigma = torch.where(blur, _uniform(u[:, _C_SIGMA], *config.blur_sigma), 0.0)
    return _Params(
        boxes=boxes,
        flip=u[:, _C_FLIP] < config.flip_p,
        brightness=factor(_C_B, config.brightness),
        contrast=factor(_C_C, config.contrast),
        saturation=factor(_C_S, config.saturation),
        hue=hue,
        grayscale=u[:, _C_GRAY] < config.grayscale_p,
        sigma=sigma,
        angle=_uniform(u[:, _C_ROT], -1.0, 1.0) * math.radians(config.rotation),
        perm=torch.where(u[:, _C_SHUF] < config.channel_shuffle_p,
                         (u[:, _C_PERM] * 5).long().clamp_(max=4) + 1, 0),  # a non-identity permutation
    )


# ---------------------------------------------------------------------------------------------
# The ops. Each takes float images in [0, 1] of shape (B, C, H, W) and per-view parameters of
# shape (B,). Ops whose name ends in `_` write their result over `images` and return it: at 512
# views of 32 x 32 px a full-size temporary costs as much as the arithmetic (allocation plus
# first-touch page faults), so the pipeline works in one buffer. No op copies data to or from the
# host (constants are Python scalars), so on a GPU the whole pass stays asynchronous.


def _crop_flip_rotate(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, angle: torch.Tensor,
                      size: int) -> torch.Tensor:
    """Like ``_crop_flip`` but the box is also rotated by ``angle`` (radians) about its centre.

    The full (B, size, size, 2) grid is built in pixel units (so rotation keeps shapes on
    non-square images), then normalised for ``F.grid_sample``.
    """
    b, _, height, width = images.shape
    x0, y0, w, h = (t.view(b, 1, 1) for t in boxes.unbind(dim=1))
    base = torch.arange(size, device=images.device, dtype=images.dtype).add_(0.5).mul_(2.0 / size).sub_(1.0)
    u = base.view(1, 1, size) * torch.where(flip.view(b, 1, 1), -1.0, 1.0) * (w / 2)  # (B, 1, S) pixels
    v = base.view(1, size, 1) * (h / 2)  # (B, S, 1)
    cos, sin = torch.cos(angle).view(b, 1, 1), torch.sin(angle).view(b, 1, 1)
    x = (x0 + w / 2) + cos * u - sin * v  # (B, S, S)
    y = (y0 + h / 2) + sin * u + cos * v
    grid = torch.stack((x * (2.0 / width) - 1.0, y * (2.0 / height) - 1.0), dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _crop_flip(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Resized crop of ``boxes`` (x0, y0, w, h; pixels) to ``size x size``, mirrored where ``flip``.

    Shape: images (B, C, H, W), boxes (B, 4), flip (B,) -> (B, C, size, size).

    Each view's affine map (output coordinates in [-1, 1] -> input coordinates, pixel edges,
    ``align_corners=False``) is ``theta = [[+-w / W, 0, (2 x0 + w) / W - 1], [0, h / H, (2 y0 + h) / H - 1]]``
    with the flip as the sign of the x scale. Being axis-aligned, its sampling grid is the outer
    sum of two (B, size) coordinate rows -- what ``F.affine_grid(theta)`` returns, built at half its
    cost and memory -- and ``F.grid_sample`` samples it bilinearly. Sampling uses the whole image,
    so output pixels at a box edge blend in the pixels just outside it (``resized_crop``, which
    sees only the box, replicates the edge instead).
    """
    b, _, height, width = images.shape
    x0, y0, w, h = (t.view(b, 1) for t in boxes.unbind(dim=1))
    base = torch.arange(size, device=images.device, dtype=images.dtype).add_(0.5).mul_(2.0 / size).sub_(1.0)
    scale_x = torch.where(flip.view(b, 1), -w, w) / width
    grid_x = (base * scale_x).add_((2 * x0 + w) / width - 1)  # (B, size): x of each output column
    grid_y = (base * (h / height)).add_((2 * y0 + h) / height - 1)  # (B, size): y of each output row
    grid = torch.stack(
        (grid_x.view(b, 1, size).expand(b, size, size), grid_y.view(b, size, 1).expand(b, size, size)), dim=-1
    )
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _luma(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) ITU-R 601 luma (torchvision's rgb_to_grayscale)."""
    r, g, b = images.unbind(dim=1)
    return (r * _LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


def _blend_(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """In place: ``clamp(factor * images + (1 - factor) * other, 0, 1)``; factor is (B,).

    ``other`` is (B, 1, H, W) or (B, 1, 1, 1) (then it is folded into a per-view offset first,
    which is three times faster than a broadcasting ``addcmul_``).
    """
    f = factor.view(-1, 1, 1, 1)
    if other.shape[-2:] == (1, 1):
        return images.mul_(f).add_(other * (1 - f)).clamp_(0.0, 1.0)
    return images.mul_(f).addcmul_(other, 1 - f).clamp_(0.0, 1.0)


def _adjust_brightness_(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """In place: torchvision's adjust_brightness with a per-view factor (B,)."""
    return images.mul_(factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _adjust_contrast_(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """In place: torchvision's adjust_contrast (blend with the mean luma) with a per-view factor (B,)."""
    channel_means = images.mean(dim=(2, 3), keepdim=True)  # the mean luma is the luma of the means
    mean = _luma(channel_means) if images.shape[1] == 3 else channel_means
    return _blend_(images, mean, factor)


def _adjust_saturation_(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """In place: torchvision's adjust_saturation (blend with the luma) with a per-view factor (B,)."""
    if images.shape[1] == 1:
        return images
    return _blend_(images, _luma(images), factor)


def _adjust_hue_(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """In place: rotate the HSV hue of each RGB view by ``shift`` turns (B,); torchvision's adjust_hue.

    A hue rotation keeps the largest and smallest channel (HSV's V and S); only the hue angle
    moves. With ``h`` the hue in sextants wrapped to [-3, 3), the rotated colour has the closed form
    ``c = max - (max - min) * clamp(||h + o| - 3| - 1, 0, 1)`` with o = 3, 1, -1 for R, G, B (an
    algebraic rewrite of the usual ``max - (max - min) * clamp(min(k, 4 - k), 0, 1)``,
    ``k = (n + h) mod 6``). The sextant case split (red is the max, else green, else blue, as in
    torchvision) uses exact 0/1 float masks, because boolean masks and ``torch.where`` are several
    times slower than float arithmetic on the CPU. Only single-plane temporaries are allocated.
    """
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(dim=1)
    maxc = torch.maximum(r, g)
    torch.maximum(maxc, b, out=maxc)
    minc = torch.minimum(r, g)
    torch.minimum(minc, b, out=minc)
    delta = maxc - minc
    is_r = (r - maxc).sign_().add_(1.0)  # 1 where red is the max, else 0 (r <= max)
    is_g = (g - maxc).sign_().add_(1.0).sub_(is_r).clamp_min_(0.0)  # 1 where green is the max, red not
    # Sextant numerators: red (g - b), green (b - r + 2 delta), blue (r - g + 4 delta).
    hue = torch.sub(r, g).add_(delta, alpha=4.0)
    red = torch.sub(g, b).sub_(hue)
    hue.addcmul_(is_r, red)
    green = torch.sub(b, r, out=red).add_(delta, alpha=2.0).sub_(hue)  # reuses `red`'s memory
    hue.addcmul_(is_g, green)
    # delta == 0 means r = g = b, where every numerator is 0 and so is the hue.
    hue.div_(torch.clamp_min(delta, 1e-12, out=green))
    hue.add_(shift.view(-1, 1, 1), alpha=6.0).add_(3.0).remainder_(6.0).sub_(3.0)
    offsets = torch.arange(3, device=images.device, dtype=images.dtype).mul_(-2.0).add_(3.0).view(1, 3, 1, 1)
    k = torch.add(hue.unsqueeze(1), offsets, out=images)  # r, g, b are dead from here on
    k.abs_().sub_(3.0).abs_().sub_(1.0).clamp_(0.0, 1.0)
    return k.mul_(delta.neg_().unsqueeze(1)).add_(maxc.unsqueeze(1))


def _grayscale_(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """In place: replace the views where ``mask`` (B,) by their luma, replicated over channels."""
    if images.shape[1] == 1:
        return images
    return images.lerp_(_luma(images), mask.to(images.dtype).view(-1, 1, 1, 1))


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
    """In place: ``(images - mean) / std`` per channel (a 1-channel image uses the first entry)."""
    for channel, (mean, std) in enumerate(zip(config.mean, config.std, strict=True)):
        if channel < images.shape[1]:
            images[:, channel].sub_(mean).div_(std)
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


def _augment(
    images: torch.Tensor, views: int, config: AugmentConfig, generator: torch.Generator | None, size: int,
) -> torch.Tensor:
    n, c, height, width = images.shape
    params = _sample_params(views * n, height, width, config, generator, images.device)
    repeated = images.expand(views, n, c, height, width).reshape(views * n, c, height, width)
    if config.rotation > 0:
        x = _crop_flip_rotate(repeated.float().div_(255.0), params.boxes, params.flip, params.angle, size)
    else:
        x = _crop_flip(repeated.float().div_(255.0), params.boxes, params.flip, size)
    if config.jitter_p > 0:  # fixed order; saturation and hue are no-ops on 1 channel, as in torchvision
        s = config.strength
        if config.brightness * s > 0:
            _adjust_brightness_(x, params.brightness)
        if config.contrast * s > 0:
            _adjust_contrast_(x, params.contrast)
        if config.saturation * s > 0:
            _adjust_saturation_(x, params.saturation)
        if config.hue * s > 0:
            _adjust_hue_(x, params.hue)
    if config.grayscale_p > 0:
        _grayscale_(x, params.grayscale)
    if config.channel_shuffle_p > 0 and c == 3:
        order = torch.tensor(_PERMS, device=x.device)[params.perm]  # (B, 3)
        x = x.gather(1, order.view(-1, 3, 1, 1).expand_as(x))
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
