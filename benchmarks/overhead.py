"""Ray overhead per trial: bare PyTorch loop vs one TorchTrainer worker vs one Tune trial.

The same config and number of steps three ways, side by side in one run:

- ``bare``: ``scaling.loop.train`` in this process;
- ``train``: a ``TorchTrainer`` with one worker running ``scaling.worker.train_fn``;
- ``tune``: a one-trial study through ``scaling.study.run_study`` (Tune + TorchTrainer + MLflow).

Reported: per-step time ratio to bare (target <= 1.03) and the fixed start-up per trial beyond
bare (total wall minus steps x per-step time; target <= 5 s). JSON in benchmarks/results/overhead.json.

Run: ``python -m benchmarks.overhead`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from scaling.spec import TrialConfig, spec_from_dict

EPOCHS, STEPS = 3, 15
TRIAL = {
    "data": {"name": "shapes", "size": 4000, "image_size": 32, "seed": 0},
    "model": {"encoder": "small_cnn", "width": 32},
    "train": {"epochs": EPOCHS, "batch_size": 128, "optimizer": "adam", "lr": 0.002, "max_steps_per_epoch": STEPS},
    "eval": {"test": False},
}
OUT = Path(__file__).parent / "results" / "overhead.json"


def per_step(history: list[dict[str, Any]]) -> float:
    """Median training seconds per step over epochs (wall_s is cumulative training time)."""
    walls = [h["wall_s"] for h in history]
    per_epoch = [b - a for a, b in zip([0.0] + walls[:-1], walls)]
    return sorted(per_epoch)[len(per_epoch) // 2] / STEPS


def bare() -> dict[str, float]:
    from scaling.loop import train

    torch.set_num_threads(1)  # what a one-CPU Ray worker gets (OMP_NUM_THREADS=1)
    start = time.perf_counter()
    history = train(TrialConfig.model_validate(TRIAL))
    total = time.perf_counter() - start
    return {"total_s": total, "per_step_s": per_step([m.as_dict() for m in history])}


def with_trainer(storage: str) -> dict[str, float]:
    import ray.train
    from ray.train.torch import TorchTrainer

    from scaling.worker import train_fn

    trainer = TorchTrainer(
        train_fn, train_loop_config={"trial": TrialConfig.model_validate(TRIAL).model_dump(mode="json"), "threads": 1},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="bench", storage_path=storage),
    )
    start = time.perf_counter()
    result = trainer.fit()
    total = time.perf_counter() - start
    history = [m for _, m in result.metrics_dataframe.iterrows()] if result.metrics_dataframe is not None else []
    return {"total_s": total, "per_step_s": per_step([dict(h) for h in history])}


def with_tune(storage: str) -> dict[str, float]:
    import pyarrow.parquet as pq

    from scaling.study import run_study

    spec = spec_from_dict({"name": "overhead", **TRIAL, "search": {"space": {}, "trials": 1, "scheduler": {"kind": "none"}},
                           "tracking": {"uri": f"sqlite:///{storage}/mlflow.db"}})
    start = time.perf_counter()
    result = run_study(spec, storage=storage, progress=False)
    total = time.perf_counter() - start
    curves = pq.read_table(result.study_dir / "curves.parquet").to_pylist()
    return {"total_s": total, "per_step_s": per_step(curves)}


def main() -> None:
    from scaling.study import init_ray

    tmp = tempfile.mkdtemp(prefix="bench-", dir="/tmp")
    os.environ.setdefault("RAY_TMPDIR", tmp)
    results = {"bare": bare()}
    init_ray(None, 1, study_dir=Path(tmp))
    results["train"] = with_trainer(tmp)
    results["tune"] = with_tune(tmp)
    results["bare_again"] = bare()  # bracket the Ray runs: machine drift shows up here
    base = min(results["bare"]["per_step_s"], results["bare_again"]["per_step_s"])
    base_total = min(results["bare"]["total_s"], results["bare_again"]["total_s"])
    summary = {
        "steps": EPOCHS * STEPS,
        "per_step_ratio_train": results["train"]["per_step_s"] / base,
        "per_step_ratio_tune": results["tune"]["per_step_s"] / base,
        "fixed_startup_train_s": (results["train"]["total_s"] - base_total),
        "fixed_startup_tune_s": (results["tune"]["total_s"] - base_total),
        "targets": {"per_step_ratio": 1.03, "fixed_startup_s": 5.0},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"summary": summary, "runs": results}, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
