"""Ray overhead per trial: bare PyTorch loop vs one TorchTrainer worker vs one Tune trial.

The same config and number of steps three ways, side by side in one run:

- ``bare``: ``scaling.loop.train`` in this process;
- ``train``: a ``TorchTrainer`` with one worker running ``scaling.worker.train_fn``;
- ``tune``: studies through ``scaling.study.run_study`` (Tune + TorchTrainer + MLflow), one with
  1 trial and one with 3 identical trials run one after another.

Reported: per-step time ratio to bare (target <= 1.03), and the fixed start-up per trial beyond
bare (target <= 5 s). For the TorchTrainer that is its ``fit()`` wall minus the bare loop's wall.
For Tune it is the *marginal* wall of one more trial, ``(T3 - T1) / 2`` for the 3- and 1-trial
studies, minus the bare loop's wall: what every trial of a study costs on top of its compute. What a
study pays once (MLflow store and parent run, Tune set-up, Parquet export) is reported apart as
``study_fixed_s = T1 - per_trial_wall``. For scale, ``ray_floor_noop_fit_s`` is Ray Train's own
cost for a worker function that does nothing (``fit()`` wall: controller start, worker-group start,
teardown), measured in the same run, and ``tune_ray_train_startup_s`` the medians of the start-up
steps Ray Train's controller logs for the 3-trial study's runs (worker actors created, train context
initialised -- mostly the worker importing torch --, worker group started). A study's trial drivers
are reused from trial to trial (Tune ``reuse_actors``) and run each trial's Ray Train controller
in-process (``scaling.trial.TrialTrainer``); every trial still starts a worker group, a fresh process
per worker that imports torch. ``ray_floor`` and ``train`` use Ray's own ``TorchTrainer``, whose
controller is a fresh actor. JSON in benchmarks/results/overhead.json.

Run: ``python -m benchmarks.overhead`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import re
import statistics
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


def _noop(config: dict[str, Any]) -> None:
    import ray.train

    ray.train.report({"done": 1})


def ray_floor(storage: str) -> dict[str, float]:
    """Ray Train's own floor: ``fit()`` of a TorchTrainer whose worker function only reports once
    (controller and worker-group start-up, process group, teardown). Median of 3."""
    import ray.train
    from ray.train.torch import TorchTrainer

    walls = []
    for i in range(3):
        trainer = TorchTrainer(_noop, scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                               run_config=ray.train.RunConfig(name=f"noop{i}", storage_path=storage))
        start = time.perf_counter()
        trainer.fit()
        walls.append(time.perf_counter() - start)
    return {"total_s": sorted(walls)[1], "all_s": walls}


def with_tune(storage: str, trials: int) -> dict[str, float]:
    import pyarrow.parquet as pq

    from scaling.study import run_study

    # `trials` identical configs (only the seed differs), one at a time.
    space = {"seed": {"kind": "choice", "values": list(range(trials))}}
    spec = spec_from_dict({"name": f"overhead{trials}", **TRIAL,
                           "search": {"space": space, "trials": trials, "sampler": "grid", "scheduler": {"kind": "none"}},
                           "resources": {"max_concurrent_trials": 1},
                           "tracking": {"uri": f"sqlite:///{storage}/mlflow.db"}})
    start = time.perf_counter()
    result = run_study(spec, storage=storage, progress=False)
    total = time.perf_counter() - start
    curves = pq.read_table(result.study_dir / "curves.parquet").to_pylist()
    first = [c for c in curves if c["trial_id"] == curves[0]["trial_id"]]
    return {"total_s": total, "trials": trials, "per_step_s": per_step(first)}


_STARTUP_STEPS = {  # Ray Train's controller log: where a worker group's start-up goes
    "worker_actors_created_s": r"worker actors created in ([\d.]+)s",
    "train_context_initialized_s": r"Train context initialized on workers in ([\d.]+)s",
    "worker_group_startup_s": r"Worker group startup completed in ([\d.]+)s total",
}


def ray_train_breakdown(ray_tmp: str, since: float) -> dict[str, float]:
    """Medians over the Ray Train runs logged after ``since`` (epoch seconds) of the start-up steps
    Ray's controller logs (its ``ray-train-sys-controller-*.log`` in the session directory)."""
    logs = [p for p in Path(ray_tmp).glob("**/logs/train/ray-train-sys-controller-*.log") if p.stat().st_mtime >= since]
    found: dict[str, list[float]] = {k: [] for k in _STARTUP_STEPS}
    for path in logs:
        text = path.read_text(errors="replace")
        for key, pattern in _STARTUP_STEPS.items():
            found[key] += [float(v) for v in re.findall(pattern, text)]
    # one log file per controller process: a trial driver's holds every run it drove
    return {"runs": len(found["worker_group_startup_s"]), **{k: statistics.median(v) for k, v in found.items() if v}}


def main() -> None:
    from scaling.study import init_ray

    tmp = tempfile.mkdtemp(prefix="bench-", dir="/tmp")
    os.environ.setdefault("RAY_TMPDIR", tmp)
    results = {"bare": bare()}
    init_ray(None, 1, study_dir=Path(tmp))
    results["ray_floor"] = ray_floor(tmp)
    results["train"] = with_trainer(tmp)
    results["tune_1"] = with_tune(tmp, 1)
    since = time.time()
    results["tune_3"] = with_tune(tmp, 3)
    results["tune_3_ray_train_startup"] = ray_train_breakdown(os.environ["RAY_TMPDIR"], since)
    results["bare_again"] = bare()  # bracket the Ray runs: machine drift shows up here
    base = min(results["bare"]["per_step_s"], results["bare_again"]["per_step_s"])
    base_total = min(results["bare"]["total_s"], results["bare_again"]["total_s"])
    per_trial_wall = (results["tune_3"]["total_s"] - results["tune_1"]["total_s"]) / 2
    summary = {
        "steps": EPOCHS * STEPS,
        "bare_total_s": base_total,
        "per_step_ratio_train": results["train"]["per_step_s"] / base,
        "per_step_ratio_tune": results["tune_3"]["per_step_s"] / base,
        "fixed_startup_train_s": results["train"]["total_s"] - base_total,
        "tune_per_trial_wall_s": per_trial_wall,
        "fixed_startup_tune_s": per_trial_wall - base_total,
        "study_fixed_s": results["tune_1"]["total_s"] - per_trial_wall,
        "ray_floor_noop_fit_s": results["ray_floor"]["total_s"],
        "tune_ray_train_startup_s": results["tune_3_ray_train_startup"],
        "targets": {"per_step_ratio": 1.03, "fixed_startup_s": 5.0},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"summary": summary, "runs": results}, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
