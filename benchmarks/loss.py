"""Benchmark of the loss family, measured side by side in one run on 2 threads.

Each loss's forward + backward on ``z`` of shape (V=2, N=1024, D=128) (raw projections, float32,
gradient w.r.t. z — and w.r.t. the prototypes for swav), relative to the bare similarity matmul
forward + backward: ``S = h @ h.T`` on the 2N = 2048 normalised embeddings, backward with a fixed
random upstream gradient. Target: <= 1.5x.

Timings are medians over repetitions; each loss is timed right after its own baseline run and the
ratio is the median of these paired ratios (the machine is shared, so load changes between runs;
the 1-minute load average is recorded with the result). Inherent costs beyond the baseline:
mochi's per-anchor top-k of the hardest negatives (a topk over the 2048 x 2048 logits costs about
as much as the whole baseline); swav's 3000 prototypes (its logits, 2 x 1024 x 3000, are larger
than the 2048 x 2048 similarity matrix, and Sinkhorn-Knopp passes over them several times).
Run: ``python -m benchmarks.loss``; writes ``benchmarks/results/loss.json`` and prints it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from scaling.losses import LOSS_NAMES, build_loss

THREADS = 2
N, V, D = 1024, 2, 128
TEMPERATURE = 0.1
REPS = 21
WARMUP = 2
TARGET_RATIO = 1.5
RESULTS = Path(__file__).parent / "results" / "loss.json"


def _bare() -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    h = torch.nn.functional.normalize(torch.randn(V * N, D, generator=g), dim=1).requires_grad_(True)
    upstream = torch.randn(V * N, V * N, generator=g)

    def step() -> None:
        h.grad = None
        (h @ h.T).backward(upstream)

    return step


def _loss_step(name: str) -> Callable[[], None]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g)
    z = (x[None] + 0.5 * torch.randn(V, N, D, generator=g)).requires_grad_(True)
    index = torch.arange(N)
    loss = build_loss(name, temperature=TEMPERATURE, dataset_size=N)
    loss(z.detach(), index=index)  # materialise swav's lazily shaped prototypes

    def step() -> None:
        z.grad = None
        for p in loss.parameters():
            p.grad = None
        loss(z, index=index).backward()

    return step


def _time(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> dict:
    torch.set_num_threads(THREADS)
    load_before = os.getloadavg()[0]
    bare = _bare()
    steps = {name: _loss_step(name) for name in LOSS_NAMES}
    for fn in [bare, *steps.values()]:
        for _ in range(WARMUP):
            fn()
    bare_s: list[float] = []
    loss_s: dict[str, list[float]] = {k: [] for k in steps}
    ratio_s: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(REPS):
        for name, fn in steps.items():
            # paired: the baseline right before each loss, so both see the same machine load
            b, t = _time(bare), _time(fn)
            bare_s.append(b)
            loss_s[name].append(t)
            ratio_s[name].append(t / b)
    losses = {
        name: {
            "median_ms": round(1e3 * statistics.median(loss_s[name]), 2),
            "ratio": round(statistics.median(ratio_s[name]), 3),
            "meets_target": statistics.median(ratio_s[name]) <= TARGET_RATIO,
        }
        for name in LOSS_NAMES
    }
    result = {
        "benchmark": "loss forward+backward vs bare similarity matmul forward+backward",
        "shape": {"V": V, "N": N, "D": D, "dtype": "float32"},
        "temperature": TEMPERATURE,
        "defaults": "each loss at its LOSS_PARAMS defaults (swav: 3000 prototypes; mochi: n_hard=128, s=128, s_prime=64)",
        "threads": THREADS,
        "repetitions": REPS,
        "bare_matmul_median_ms": round(1e3 * statistics.median(bare_s), 2),
        "ratio_definition": "median over repetitions of loss time / bare matmul time measured right before it",
        "target_ratio": TARGET_RATIO,
        "losses": losses,
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(RESULTS)
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
