"""The quickstart study's wall time against the sum of its trials' bare compute.

Runs ``jobs/quickstart.yaml`` as ``make study`` does (a local Ray, MLflow in a temporary SQLite
store) and compares its wall time with what its trials would cost as bare PyTorch loops on one
thread each (a trial's Ray worker gets one CPU):

    bare compute of a trial = set-up + steps x bare step seconds(batch size) + epochs x evaluation seconds

Set-up (data generation, model), one epoch's evaluation and the training step at each batch size
the study used are measured here after the study, bare (``scaling.loop`` in this process, one
thread), not taken from inside the trials: two trials share the 2 cores, so their own timings are
inflated by each other and would flatter the ratio.

Reported (target ``wall / sum <= 1.3``):

- ``wall_over_sum_of_compute``: the issue's ratio. Trials run ``concurrency`` at a time, so a
  fully parallel study could reach ``1 / concurrency``;
- ``wall_over_parallel_compute``: wall over ``sum / concurrency``, the stricter figure: 1.0 means
  no overhead at all on this many CPUs.

Also the trial counts (completed, pruned by ASHA, failed). JSON in benchmarks/results/quickstart.json.

Run: ``python -m benchmarks.quickstart`` (about 5-10 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "jobs" / "quickstart.yaml"
OUT = Path(__file__).parent / "results" / "quickstart.json"


def bare_costs(spec: Any, batch_sizes: list[int]) -> dict[str, Any]:
    """Seconds of set-up (data + model), of one epoch's evaluation and of one training step per
    batch size, bare, on one thread (what a trial's one-CPU Ray worker gets)."""
    from scaling.loop import build_state, evaluate_epoch, load_data, train

    torch.set_num_threads(1)
    cfg = spec.trial
    start = time.perf_counter()
    data = load_data(cfg)
    state = build_state(cfg, num_train=len(data.train))
    setup = time.perf_counter() - start
    evals = []
    for _ in range(3):
        start = time.perf_counter()
        evaluate_epoch(cfg, state.model.eval(), data, torch.device("cpu"))
        evals.append(time.perf_counter() - start)
    steps = 12
    step_s = {}
    for b in batch_sizes:
        short = cfg.with_params({"batch_size": b, "epochs": 2})
        short = short.model_copy(update={"train": short.train.model_copy(update={"max_steps_per_epoch": steps})})
        history = train(short, data=data)
        step_s[b] = (history[-1].wall_s - history[0].wall_s) / steps  # the second epoch: warm
    return {"setup_s": setup, "eval_epoch_s": sorted(evals)[1], "step_s": step_s, "num_train": len(data.train)}


def main() -> None:
    import pyarrow.parquet as pq

    from scaling.spec import load_spec
    from scaling.study import check_fits, local_cluster_resources, run_study

    tmp = tempfile.mkdtemp(prefix="qs-", dir="/tmp")
    os.environ.setdefault("RAY_TMPDIR", tmp)
    spec = load_spec(SPEC)
    concurrency = check_fits(spec, local_cluster_resources())
    start = time.perf_counter()
    result = run_study(spec, storage=tmp, tracking_uri=f"sqlite:///{tmp}/mlflow.db", progress=False)
    wall = time.perf_counter() - start
    from scaling.loop import steps_per_epoch

    trials = pq.read_table(result.study_dir / "trials.parquet").to_pylist()
    curves = pq.read_table(result.study_dir / "curves.parquet").to_pylist()
    costs = bare_costs(spec, sorted({int(t["batch_size"]) for t in trials}))
    per_trial = []
    for t in trials:
        history = [c for c in curves if c["trial_id"] == t["trial_id"]]
        b, epochs = int(t["batch_size"]), len(history)
        train_s = epochs * steps_per_epoch(costs["num_train"], b) * costs["step_s"][b]
        in_trial_s = max((c["wall_s"] for c in history if c.get("wall_s") is not None), default=0.0)
        per_trial.append({"trial_id": t["trial_id"], "status": t["status"], "batch_size": b, "epochs": epochs,
                          "bare_train_s": train_s, "in_trial_train_s": in_trial_s,
                          "bare_compute_s": costs["setup_s"] + train_s + epochs * costs["eval_epoch_s"]})
    total = sum(p["bare_compute_s"] for p in per_trial)
    counts = {s: sum(p["status"] == s for p in per_trial) for s in ("completed", "pruned", "failed")}
    summary = {
        "study_wall_s": wall,
        "trials": len(per_trial),
        **counts,
        "concurrency": concurrency,
        "sum_bare_compute_s": total,
        "wall_over_sum_of_compute": wall / total,
        "wall_over_parallel_compute": wall / (total / concurrency),
        "target": {"wall_over_sum_of_compute": 1.3, "study_wall_s": 600, "min_trials": 12},
        "bare": costs,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"summary": summary, "trials": per_trial}, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
