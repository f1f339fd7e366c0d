"""Unit tests of scaling.augment: each op against torchvision.transforms.v2.functional, and the
batched pipeline against a per-view loop over torchvision with the same random parameters."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from scaling import augment as A
from scaling.augment import AugmentConfig, augment_views, eval_transform, multicrop_views

# Everything off: a blank canvas for testing one op at a time (mean 0 / std 1 = no normalisation).
OFF = AugmentConfig(
    crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
    mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
)


def _images(n: int = 6, c: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rgb(n: int = 8, size: int = 12, seed: int = 1) -> torch.Tensor:
    """Float RGB views in [0, 1] with plenty of channel ties, greys, pure colours and extremes."""
    g = _gen(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    x[:, :, :3] = torch.randint(0, 4, (n, 3, 3, size), generator=g) / 3.0  # ties: 0, 1/3, 2/3, 1
    x[:, :, 3, :2] = 0.5  # grey
    x[:, :, 3, 2:5] = torch.eye(3).T.unsqueeze(0)  # pure red, green, blue
    return x


def _factors(n: int, low: float, high: float, seed: int = 2) -> torch.Tensor:
    return torch.rand(n, generator=_gen(seed)) * (high - low) + low


# ---------------------------------------------------------------------------------------------
# Contract: shapes, dtype, device, validation, determinism.


@pytest.mark.parametrize(("views", "out_size", "channels"), [(2, None, 3), (3, 10, 3), (2, 20, 1)])
def test_shape_dtype_device(views: int, out_size: int | None, channels: int) -> None:
    x = _images(n=5, c=channels, size=16)
    out = augment_views(x, views, generator=_gen(), out_size=out_size)
    s = 16 if out_size is None else out_size
    assert out.shape == (views, 5, channels, s, s)
    assert out.dtype == torch.float32 and out.device == x.device
    assert torch.isfinite(out).all()


def test_non_square_defaults_to_shorter_side() -> None:
    x = torch.randint(0, 256, (3, 3, 12, 20), dtype=torch.uint8)
    assert augment_views(x, 2, generator=_gen()).shape == (2, 3, 3, 12, 12)


@pytest.mark.parametrize("views", [0, 1, -2])
def test_views_below_two_rejected(views: int) -> None:
    with pytest.raises(ValueError, match="views must be >= 2"):
        augment_views(_images(), views)


@pytest.mark.parametrize(
    "bad",
    [
        {"crop_scale": (0.0, 1.0)}, {"crop_scale": (0.5, 0.2)}, {"crop_scale": (0.2, 1.5)}, {"crop_ratio": (0.0, 1.0)},
        {"flip_p": 1.5}, {"jitter_p": -0.1}, {"brightness": -0.1}, {"hue": 0.6}, {"hue": 0.3, "strength": 2.0},
        {"blur_sigma": (0.0, 1.0)}, {"std": (0.2, 0.0, 0.2)}, {"mean": (0.5, 0.5)}, {"crop_scale": (0.2, 0.5, 1.0)},
    ],
)
def test_config_validation(bad: dict) -> None:
    with pytest.raises(ValueError, match="AugmentConfig"):
        AugmentConfig(**bad)


def test_config_coerces_sequences_to_tuples() -> None:
    config = AugmentConfig(crop_scale=[0.3, 1], mean=[0, 0, 0])  # type: ignore[arg-type]
    assert config.crop_scale == (0.3, 1.0) and config.mean == (0.0, 0.0, 0.0)
    hash(config)


def test_bad_images_rejected() -> None:
    with pytest.raises(ValueError, match="uint8"):
        augment_views(_images().float(), 2)
    with pytest.raises(ValueError, match="channels"):
        augment_views(torch.zeros(2, 4, 8, 8, dtype=torch.uint8), 2)


def test_generator_on_wrong_device_rejected() -> None:
    # images on the "meta" device stand in for a GPU: the check fires before any computation
    with pytest.raises(ValueError, match="generator is on"):
        augment_views(_images().to("meta"), 2, generator=_gen())


def test_deterministic_under_seed_and_different_across_seeds() -> None:
    x = _images()
    a = augment_views(x, 2, generator=_gen(7))
    b = augment_views(x, 2, generator=_gen(7))
    c = augment_views(x, 2, generator=_gen(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def _aten_calls(fn) -> int:  # type: ignore[no-untyped-def]
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.calls


def test_one_batched_pass_no_loop_over_images_or_views() -> None:
    config = AugmentConfig(jitter_p=1.0, grayscale_p=1.0, blur_p=1.0)
    calls = {
        (n, views): _aten_calls(lambda n=n, views=views: augment_views(_images(n=n), views, config, generator=_gen()))
        for n, views in ((2, 2), (16, 2), (16, 5))
    }
    assert len(set(calls.values())) == 1, calls


def test_per_sample_parameters_differ() -> None:
    p = A._sample_params(256, 32, 32, AugmentConfig(), _gen(), torch.device("cpu"))
    assert p.boxes.unique(dim=0).shape[0] == 256
    assert 0.3 < p.flip.float().mean() < 0.7 and 0.05 < p.grayscale.float().mean() < 0.4
    jitter = p.hue != 0
    assert 0.65 < jitter.float().mean() < 0.95
    for factor in (p.brightness, p.contrast, p.saturation, p.hue):
        assert factor[jitter].unique().numel() == int(jitter.sum())
    assert ((p.brightness == 1) == ~jitter).all()
    blurred = p.sigma > 0
    assert 0.35 < blurred.float().mean() < 0.65
    assert p.sigma[blurred].min() >= 0.1 and p.sigma.max() <= 2.0
    # ... and the views of one image differ from each other.
    out = augment_views(_images(n=4), 2, generator=_gen())
    assert (out[0] - out[1]).abs().flatten(1).amax(dim=1).min() > 0.1


# ---------------------------------------------------------------------------------------------
# Geometry: crop + flip.


def test_crop_of_whole_image_is_identity() -> None:
    x = _images()
    out = augment_views(x, 2, OFF, generator=_gen())
    torch.testing.assert_close(out, (x.float() / 255).expand(2, *x.shape), atol=1e-5, rtol=0)


def test_flip_matches_torchvision_hflip() -> None:
    x = _images()
    out = augment_views(x, 2, replace(OFF, flip_p=1.0), generator=_gen())
    expected = TF.horizontal_flip(x).float() / 255
    torch.testing.assert_close(out, expected.expand(2, *x.shape), atol=1e-5, rtol=0)


def test_integer_box_at_native_scale_is_a_slice() -> None:
    x = torch.rand(3, 3, 16, 20)
    boxes = torch.tensor([[4.0, 2.0, 8.0, 8.0], [0.0, 8.0, 8.0, 8.0], [12.0, 0.0, 8.0, 8.0]])
    flip = torch.tensor([False, True, False])
    out = A._crop_flip(x, boxes, flip, 8)
    expected = torch.stack([x[0, :, 2:10, 4:12], x[1, :, 8:16, 0:8].flip(-1), x[2, :, 0:8, 12:20]])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_sampling_grid_of_several_views_comes_out_image_major() -> None:
    # View-major parameters (row v * N + n) in, the V grids of each image stacked along the rows out.
    g = _gen(5)
    n, views = 4, 3
    boxes = torch.rand(views * n, 4, generator=g) * torch.tensor([4.0, 4.0, 12.0, 10.0]) + 1
    flip = torch.rand(views * n, generator=g) < 0.5
    angle = torch.rand(views * n, generator=g) * 6 - 3
    for a in (None, angle):
        grid = A._sampling_grid(boxes, flip, a, 8, 16, 20, views=views)
        single = A._sampling_grid(boxes, flip, a, 8, 16, 20)
        assert grid.shape == (n, views * 8, 8, 2) and single.shape == (views * n, 8, 8, 2)
        assert torch.equal(grid, single.view(views, n, 8, 8, 2).transpose(0, 1).reshape(n, views * 8, 8, 2))


def test_sample_views_equals_crops_of_the_repeated_batch() -> None:
    g = _gen(6)
    x, n, views = _images(n=4, size=16), 4, 2
    boxes = torch.rand(views * n, 4, generator=g) * torch.tensor([4.0, 4.0, 10.0, 10.0]) + 1
    flip = torch.rand(views * n, generator=g) < 0.5
    scale = torch.rand(views * n, generator=g) / 255
    out = A._sample_views(x, A._sampling_grid(boxes, flip, None, 8, 16, 16, views=views), scale)
    expected = A._crop_flip(x.float().repeat(views, 1, 1, 1), boxes, flip, 8) * scale.view(-1, 1, 1, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_crop_resize_close_to_torchvision_resized_crop() -> None:
    # Away from the box edges: there grid_sample blends in the pixels just outside the box, where
    # resized_crop (which sees only the box) replicates the box's edge.
    x = torch.rand(2, 3, 16, 16)
    boxes = torch.tensor([[2.0, 4.0, 8.0, 8.0], [1.0, 0.0, 12.0, 6.0]])
    out = A._crop_flip(x, boxes, torch.tensor([False, False]), 24)
    for i, (x0, y0, w, h) in enumerate(boxes.int().tolist()):
        expected = TF.resized_crop(x[i], y0, x0, h, w, [24, 24], antialias=False)
        torch.testing.assert_close(out[i, :, 2:-2, 2:-2], expected[:, 2:-2, 2:-2], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("height", "width", "scale"), [(32, 32, (0.2, 1.0)), (24, 40, (0.08, 1.0))])
def test_crop_boxes_follow_random_resized_crop_sampling(
    height: int, width: int, scale: tuple[float, float]
) -> None:
    config = AugmentConfig(crop_scale=scale)
    boxes = A._sample_params(4000, height, width, config, _gen(), torch.device("cpu")).boxes
    x0, y0, w, h = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= width + 1e-4).all() and (y0 + h <= height + 1e-4).all()
    area = w * h / (height * width)
    assert area.min() >= scale[0] - 1e-6 and area.max() <= 1 + 1e-6
    ratio = w / h
    assert ratio.min() >= 3 / 4 - 1e-6 and ratio.max() <= 4 / 3 + 1e-6
    # Same distribution as torchvision's rejection sampler (which rounds boxes to whole pixels).
    torch.manual_seed(0)
    crop = T.RandomResizedCrop(8, scale=scale)
    image = torch.zeros(1, height, width)
    ref = torch.tensor(
        [[p["width"], p["height"]] for p in (crop.make_params([image]) for _ in range(1500))], dtype=torch.float32
    )
    ref_area = ref.prod(1) / (height * width)
    assert abs(area.mean() - ref_area.mean()) < 0.03
    assert abs(area.std() - ref_area.std()) < 0.03
    assert abs(ratio.log().mean() - (ref[:, 0] / ref[:, 1]).log().mean()) < 0.03


def test_crop_falls_back_to_centre_crop_when_no_attempt_fits() -> None:
    # A 8 x 64 strip: no box of >= 90 % of the area with ratio <= 4/3 fits, so every view takes
    # torchvision's fallback, the centred crop of the whole height at the largest allowed ratio.
    boxes = A._sample_params(50, 8, 64, AugmentConfig(crop_scale=(0.9, 1.0)), _gen(), torch.device("cpu")).boxes
    w = 8 * 4 / 3
    expected = torch.tensor([(64 - w) / 2, 0.0, w, 8.0]).expand(50, 4)
    torch.testing.assert_close(boxes, expected)


# ---------------------------------------------------------------------------------------------
# Colour ops against torchvision, per view.


@pytest.mark.parametrize(
    ("op", "reference", "low", "high"),
    [
        (A._adjust_contrast_, TF.adjust_contrast, 0.0, 2.0),
        (A._adjust_saturation_, TF.adjust_saturation, 0.0, 2.0),
        (A._adjust_hue_, TF.adjust_hue, -0.5, 0.5),
    ],
)
def test_colour_op_matches_torchvision(op, reference, low: float, high: float) -> None:  # type: ignore[no-untyped-def]
    x = _rgb()
    factors = _factors(x.shape[0], low, high)
    if op is A._adjust_hue_:
        factors[:4] = torch.tensor([0.0, 0.5, -0.5, 1 / 6])
    out = op(x.clone(), factors)
    expected = torch.stack([reference(x[i], float(f)) for i, f in enumerate(factors)])
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)


def test_contrast_on_one_channel_matches_torchvision() -> None:
    x = torch.rand(4, 1, 8, 8, generator=_gen())
    factors = _factors(4, 0.0, 2.0)
    expected = torch.stack([TF.adjust_contrast(x[i], float(f)) for i, f in enumerate(factors)])
    torch.testing.assert_close(A._adjust_contrast_(x.clone(), factors), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("channels", [3, 1])
def test_pipeline_brightness_matches_torchvision(channels: int) -> None:
    # Brightness has no op of its own: it rides on the crop's uint8 -> [0, 1] scaling, clamped after.
    # Only it is on, with factors in [0.1, 1.9], so that the clamp at 1 is exercised.
    config = replace(OFF, jitter_p=1.0, brightness=0.9, contrast=0.0, saturation=0.0, hue=0.0)
    x = _images(n=5, c=channels, size=16)
    out = augment_views(x, 2, config, generator=_gen(4))
    p = A._sample_params(2 * x.shape[0], 16, 16, config, _gen(4), x.device)
    expected = torch.stack([TF.adjust_brightness(x[i % 5].float() / 255, float(f))
                            for i, f in enumerate(p.brightness)])  # view-major: view i is image i % 5
    torch.testing.assert_close(out.flatten(0, 1), expected, atol=1e-5, rtol=0)
    assert (p.brightness > 1.2).any() and (out == 1).any()


def test_grayscale_matches_torchvision() -> None:
    x = _rgb()
    mask = torch.arange(x.shape[0]) % 2 == 0
    out = A._grayscale_(x.clone(), mask)
    expected = torch.where(mask.view(-1, 1, 1, 1), TF.rgb_to_grayscale(x, num_output_channels=3), x)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("size", "kernel_size"), [(32, 3), (48, 5), (64, 7)])
def test_blur_matches_torchvision_gaussian_blur(size: int, kernel_size: int) -> None:
    assert A._blur_kernel_size(size) == kernel_size
    x = torch.rand(5, 3, size, size + 6, generator=_gen())
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 0.0])
    out = A._gaussian_blur_(x.clone(), sigma, kernel_size)
    for i in range(4):
        expected = TF.gaussian_blur(x[i], [kernel_size, kernel_size], [float(sigma[i])] * 2)
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[4], x[4], atol=1e-6, rtol=0)  # sigma 0 = blur off


def test_blur_kernel_sizes() -> None:
    assert [A._blur_kernel_size(s) for s in (8, 32, 96, 224)] == [3, 3, 9, 23]


# ---------------------------------------------------------------------------------------------
# The batched pipeline against a per-view loop over torchvision with the same parameters.


@pytest.mark.parametrize("shuffle_p", [0.0, 0.6])  # 0.6: the shuffle rides on the hue op's last pass
@pytest.mark.parametrize("channels", [3, 1])
def test_pipeline_matches_per_view_torchvision_loop(channels: int, shuffle_p: float) -> None:
    config = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), strength=1.2, channel_shuffle_p=shuffle_p)
    x = _images(n=5, c=channels, size=16)
    views = 3
    out = augment_views(x, views, config, generator=_gen(3))
    p = A._sample_params(views * x.shape[0], 16, 16, config, _gen(3), x.device)
    mean = torch.tensor(config.mean[:channels]).view(-1, 1, 1)
    std = torch.tensor(config.std[:channels]).view(-1, 1, 1)
    for v in range(views):
        for n in range(x.shape[0]):
            i = v * x.shape[0] + n
            y = x[n].float() / 255
            if p.flip[i]:
                y = TF.horizontal_flip(y)
            y = TF.adjust_brightness(y, float(p.brightness[i]))
            y = TF.adjust_contrast(y, float(p.contrast[i]))
            y = TF.adjust_saturation(y, float(p.saturation[i]))
            y = TF.adjust_hue(y, float(p.hue[i]))
            if p.grayscale[i]:
                y = TF.rgb_to_grayscale(y, num_output_channels=channels)
            if channels == 3:
                y = y[list(A._PERMS[int(p.perm[i])])]  # output channel c is input channel order[c]
            if p.sigma[i] > 0:
                y = TF.gaussian_blur(y, [3, 3], [float(p.sigma[i])] * 2)
            torch.testing.assert_close(out[v, n], (y - mean) / std, atol=1e-4, rtol=0)


def test_strength_scales_jitter_ranges() -> None:
    weak = A._sample_params(2000, 8, 8, AugmentConfig(jitter_p=1.0, strength=0.5), _gen(), torch.device("cpu"))
    strong = A._sample_params(2000, 8, 8, AugmentConfig(jitter_p=1.0, strength=2.0), _gen(), torch.device("cpu"))
    assert weak.brightness.min() >= 0.8 - 1e-6 and weak.brightness.max() <= 1.2 + 1e-6
    assert strong.brightness.min() >= 0.0 and strong.brightness.max() > 1.7
    assert weak.hue.abs().max() <= 0.05 + 1e-6 and strong.hue.abs().max() > 0.18


# ---------------------------------------------------------------------------------------------
# Multi-crop, evaluation, hygiene.


def test_multicrop_shapes_and_determinism() -> None:
    x = _images(n=3, size=32)
    big, small = multicrop_views(x, generator=_gen())
    assert big.shape == (2, 3, 3, 32, 32) and small.shape == (4, 3, 3, 14, 14)
    big2, small2 = multicrop_views(x, generator=_gen())
    assert torch.equal(big, big2) and torch.equal(small, small2)
    big, small = multicrop_views(x, global_views=3, local_views=0, global_size=24, generator=_gen())
    assert big.shape == (3, 3, 3, 24, 24) and small.shape == (0, 3, 3, 10, 10)
    _, small = multicrop_views(x, local_views=1, local_size=8)
    assert small.shape == (1, 3, 3, 8, 8)
    with pytest.raises(ValueError, match="global_views"):
        multicrop_views(x, global_views=1)
    with pytest.raises(ValueError, match="crop_scale"):
        multicrop_views(x, local_scale=(0.5, 0.1))


def test_eval_transform_normalises_without_augmenting() -> None:
    x = _images()
    out = eval_transform(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, (x.float() / 255 - 0.5) / 0.25)
    assert eval_transform(x[:, :1], AugmentConfig(mean=(0.1, 0.2, 0.3))).shape == (6, 1, 16, 16)


def test_module_imports_only_torch() -> None:
    tree = ast.parse(Path(A.__file__).read_text())
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert imported <= {"__future__", "math", "dataclasses", "typing", "torch"}
    assert "torch.distributed" not in Path(A.__file__).read_text()


def test_rotation_zero_matches_axis_aligned_path_and_rotates() -> None:
    """The rotating sampler with angle 0 equals the fast path; 90 degrees equals torch.rot90."""
    from scaling.augment import _crop_flip, _crop_flip_rotate

    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(6, 3, 16, 16, generator=g)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 3 + [[2.0, 3.0, 9.0, 11.0]] * 3)
    flip = torch.tensor([False, True, False, True, False, True])
    zero = torch.zeros(6)
    assert torch.allclose(_crop_flip_rotate(imgs, boxes, flip, zero, 16), _crop_flip(imgs, boxes, flip, 16), atol=1e-5)
    quarter = torch.full((6,), torch.pi / 2)
    rotated = _crop_flip_rotate(imgs[:1], boxes[:1], flip[:1], quarter[:1], 16)
    expected = torch.rot90(imgs[:1], k=1, dims=(2, 3))  # sampling at R(u) turns the image by -90 degrees
    assert torch.allclose(rotated, expected, atol=1e-4) or torch.allclose(rotated, torch.rot90(imgs[:1], k=-1, dims=(2, 3)), atol=1e-4)
    cfg = AugmentConfig(rotation=180.0)
    out = augment_views((imgs * 255).to(torch.uint8), 2, cfg, generator=torch.Generator().manual_seed(1))
    assert out.shape == (2, 6, 3, 16, 16) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="rotation"):
        AugmentConfig(rotation=270.0)


def test_channel_shuffle_permutes_channels_per_view() -> None:
    x = torch.zeros(64, 3, 8, 8, dtype=torch.uint8)
    x[:, 0], x[:, 1], x[:, 2] = 10, 100, 200  # flat channels: every output is a permutation of (10, 100, 200)
    cfg = AugmentConfig(channel_shuffle_p=1.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, crop_scale=(1.0, 1.0),
                        crop_ratio=(1.0, 1.0), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    out = augment_views(x, 2, cfg, generator=torch.Generator().manual_seed(0))
    levels = (out.mean(dim=(-1, -2)) * 255).round().long().view(-1, 3).tolist()
    assert all(sorted(v) == [10, 100, 200] for v in levels)
    perms = {tuple(v) for v in levels}
    assert (10, 100, 200) not in perms and len(perms) == 5  # p = 1: never the identity, all 5 others drawn


def test_channel_order_is_the_perms_table() -> None:
    assert A._channel_order(torch.arange(len(A._PERMS))).tolist() == [list(p) for p in A._PERMS]
