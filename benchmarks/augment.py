"""Benchmark of scaling.augment, measured side by side in one run on 2 threads.

1. Throughput: ``augment_views`` on 256 uint8 images of 32 x 32 px x 2 views, against
   ``torchvision.transforms.v2`` applied per sample with the same ops (RandomResizedCrop,
   RandomHorizontalFlip, RandomApply(ColorJitter with hue), RandomGrayscale, RandomApply(GaussianBlur),
   then ToDtype + Normalize) on the same uint8 tensors. Target: >= 15x.
2. Share of a quickstart training step: the trial of ``jobs/quickstart.yaml`` as ``scaling.loop``
   builds it (its small CNN and projection head, its augmentation -- crops of area 0.5-1, rotation,
   channel shuffle, no blur -- its loss and Adam): ``augment_views`` of one batch against the
   rest of the step (forward, loss, backward, optimizer step) on the 2 x 256 views. Target: <= 5 %.

Timings are medians over interleaved repetitions (the machine is shared, so the two sides of each
ratio are measured alternately). Run: ``python -m benchmarks.augment``; writes
``benchmarks/results/augment.json`` and prints it.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torchvision
import torchvision.transforms.v2 as T

from scaling import augment as A
from scaling.augment import AugmentConfig, augment_views

THREADS = 2
BATCH = 256
VIEWS = 2
SIZE = 32
TARGET_SPEEDUP = 15.0
TARGET_SHARE = 0.05
QUICKSTART = Path(__file__).resolve().parents[1] / "jobs" / "quickstart.yaml"
RESULTS = Path(__file__).parent / "results" / "augment.json"


def torchvision_pipeline(config: AugmentConfig, size: int) -> T.Compose:
    """The same recipe as ``augment_views``, as torchvision's per-sample transforms."""
    s = config.strength
    return T.Compose([
        T.RandomResizedCrop(size, scale=config.crop_scale, ratio=config.crop_ratio, antialias=True),
        T.RandomHorizontalFlip(config.flip_p),
        T.RandomApply(
            [T.ColorJitter(config.brightness * s, config.contrast * s, config.saturation * s, config.hue * s)],
            p=config.jitter_p,
        ),
        T.RandomGrayscale(config.grayscale_p),
        T.RandomApply([T.GaussianBlur(A._blur_kernel_size(size), sigma=config.blur_sigma)], p=config.blur_p),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(list(config.mean), list(config.std)),
    ])


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved(
    fns: dict[str, Callable[[], object]], reps: dict[str, int], rounds: int
) -> dict[str, list[list[float]]]:
    """Seconds per call, per round: each function runs ``reps[name]`` times per round, alternating."""
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[list[float]]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append([_timed(fn) for _ in range(reps[name])])
    return times


def _median(rounds: list[list[float]]) -> float:
    return statistics.median(t for r in rounds for t in r)


def _ms(seconds: float) -> float:
    return round(1e3 * seconds, 3)


def _per_round(a: list[list[float]], b: list[list[float]], fn: Callable[[float, float], float]) -> float:
    """Median over rounds of ``fn(median of a in the round, median of b in the round)``.

    The machine is shared: a burst of load hits the calls of one round together, so ratios taken
    within a round are much steadier than ratios of medians pooled over the run.
    """
    return statistics.median(fn(statistics.median(x), statistics.median(y)) for x, y in zip(a, b, strict=True))


def _stage_breakdown(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> dict[str, float]:
    """Median milliseconds of each stage of augment_views (for finding the next bottleneck).

    The stages of ``config``, plus the rotated grid and the channel shuffle that the quickstart's
    augmentation adds (the shuffle rides on the hue op when the hue op runs, else it is a copy).
    """
    b = VIEWS * images.shape[0]
    p = A._sample_params(b, SIZE, SIZE, config, generator, images.device)
    grid = A._sampling_grid(p.boxes, p.flip, None, SIZE, SIZE, SIZE, views=VIEWS)
    cropped = A._sample_views(images, grid, p.brightness / 255).clamp_(0.0, 1.0)
    order = A._channel_order(torch.randint(1, len(A._PERMS), (b,), generator=generator))
    stages: dict[str, Callable[[], object]] = {
        "sample_params": lambda: A._sample_params(b, SIZE, SIZE, config, generator, images.device),
        "sampling_grid": lambda: A._sampling_grid(p.boxes, p.flip, None, SIZE, SIZE, SIZE, views=VIEWS),
        "sampling_grid_rotated": lambda: A._sampling_grid(p.boxes, p.flip, p.angle, SIZE, SIZE, SIZE, views=VIEWS),
        "sample_views (grid_sample, to [0, 1] x brightness)": lambda: A._sample_views(images, grid, p.brightness / 255),
        "copy (baseline of in-place ops)": lambda: cropped.clone(),
        "contrast": lambda: A._adjust_contrast_(cropped.clone(), p.contrast),
        "saturation": lambda: A._adjust_saturation_(cropped.clone(), p.saturation),
        "hue": lambda: A._adjust_hue_(cropped.clone(), p.hue),
        "hue + channel_shuffle": lambda: A._adjust_hue_(cropped.clone(), p.hue, order),
        "grayscale": lambda: A._grayscale_(cropped.clone(), p.grayscale),
        "channel_shuffle (alone, a new tensor)": lambda: A._shuffle_channels(cropped, order),
        "blur": lambda: A._gaussian_blur_(cropped.clone(), p.sigma, A._blur_kernel_size(SIZE)),
        "normalize": lambda: A._normalize_(cropped.clone(), config),
    }
    times = _interleaved(stages, {name: 5 for name in stages}, rounds=4)
    return {name: _ms(_median(t)) for name, t in times.items()}


def run() -> dict[str, object]:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    config = AugmentConfig()
    images = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    pipeline = torchvision_pipeline(config, SIZE)

    def ours() -> torch.Tensor:
        return augment_views(images, VIEWS, config, generator=generator)

    def per_sample() -> torch.Tensor:
        return torch.stack([torch.stack([pipeline(image) for image in images]) for _ in range(VIEWS)])

    assert ours().shape == per_sample().shape == (VIEWS, BATCH, 3, SIZE, SIZE)

    # (1) throughput, side by side.
    throughput = _interleaved({"ours": ours, "torchvision": per_sample}, {"ours": 10, "torchvision": 1}, rounds=9)
    speedup = _per_round(throughput["torchvision"], throughput["ours"], lambda tv, us: tv / us)

    # (2) share of a quickstart training step: its model, augmentation, loss and optimizer.
    from scaling.loop import augment_config, build_state
    from scaling.spec import load_spec

    cfg = load_spec(QUICKSTART).trial
    assert cfg.train.batch_size == BATCH and cfg.train.views == VIEWS and cfg.data.image_size == SIZE
    state = build_state(cfg, num_train=BATCH)
    quick = augment_config(cfg)

    def quickstart_augment() -> torch.Tensor:
        return augment_views(images, VIEWS, quick, generator=generator)

    views = quickstart_augment()

    def step() -> None:
        state.optimizer.zero_grad(set_to_none=True)
        z = state.model(views.flatten(0, 1)).unflatten(0, (VIEWS, BATCH))
        state.loss_fn(z).backward()
        state.optimizer.step()

    training = _interleaved({"augment": quickstart_augment, "step": step}, {"augment": 5, "step": 1}, rounds=9)
    share = _per_round(training["augment"], training["step"], lambda aug, st: aug / (aug + st))
    best_aug = min(min(r) for r in training["augment"])
    best_step = min(min(r) for r in training["step"])

    return {
        "benchmark": "augment",
        "setup": {
            "threads": THREADS, "batch": BATCH, "views": VIEWS, "image_size": SIZE, "dtype_in": "uint8",
            "config": asdict(config),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
            "machine": platform.machine(),
            "timing": "rounds alternating the two sides; ratios are medians over rounds of within-round ratios",
        },
        "throughput": {
            "augment_views_ms": _ms(_median(throughput["ours"])),
            "torchvision_per_sample_ms": _ms(_median(throughput["torchvision"])),
            "augment_views_images_per_s": round(VIEWS * BATCH / _median(throughput["ours"])),
            "torchvision_images_per_s": round(VIEWS * BATCH / _median(throughput["torchvision"])),
            "speedup": round(speedup, 2),
            "speedup_of_fastest_calls": round(
                min(min(r) for r in throughput["torchvision"]) / min(min(r) for r in throughput["ours"]), 2
            ),
            "target_speedup": TARGET_SPEEDUP,
            "meets_target": speedup >= TARGET_SPEEDUP,
            "rounds": len(throughput["ours"]),
        },
        "train_step_share": {
            "augment_views_ms": _ms(_median(training["augment"])),
            "rest_of_step_ms": _ms(_median(training["step"])),
            "step": f"jobs/quickstart.yaml: {cfg.model.encoder} width {cfg.model.width}, {cfg.train.loss}, "
                    f"{cfg.train.optimizer}; forward + loss + backward + optimizer step",
            "augment_share": round(share, 4),
            "augment_share_of_fastest_calls": round(best_aug / (best_aug + best_step), 4),
            "target_share": TARGET_SHARE,
            "meets_target": share <= TARGET_SHARE,
            "rounds": len(training["step"]),
        },
        "augment_stages_ms": _stage_breakdown(images, config, generator),
    }


def main() -> None:
    result = run()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
