"""Reliability (issue 7): a poisonous hyperparameter costs one trial, never the study.

Real local Ray (Tune + Train), real MLflow (SQLite), real Parquet tables, the real analysis. The
non-finite loss is injected with ``train.fault_nan_at_step`` (the losses are numerically stable, so a
real NaN is not reproducible on demand): the fault sits at global step 3 and the grid searches
``epochs`` over [1, 2] with 2 steps per epoch, so the 1-epoch trial never reaches it and the
2-epoch trial hits it at epoch 2 step 1 -- the same spec, one trial poisoned.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from scaling.spec import spec_from_dict
from scaling.study import run_study
from tests.test_study import children, tiny_spec

pytestmark = pytest.mark.integration
REASON = "non-finite loss at epoch 2 step 1"


@pytest.mark.timeout(420)
def test_non_finite_loss_fails_one_trial_and_the_study_goes_on(ray_local: None, tmp_path: Path) -> None:
    raw = tiny_spec("nan-trial", trials=2, sampler="grid")
    raw["search"]["space"] = {"epochs": {"kind": "choice", "values": [1, 2]}}
    raw["train"]["fault_nan_at_step"] = 3
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    start = time.monotonic()
    result = run_study(spec_from_dict(raw), storage=tmp_path / "studies", tracking_uri=uri, progress=False)
    wall = time.monotonic() - start

    # the TrialTable: one failed with the reason, the other completed
    rows = {r["epochs"]: r for r in pq.read_table(result.study_dir / "trials.parquet").to_pylist()}
    assert set(rows) == {1, 2}, rows
    bad, good = rows[2], rows[1]
    assert bad["status"] == "failed" and REASON in bad["failure_reason"], bad
    assert bad["failure_reason"].startswith("FloatingPointError: "), bad["failure_reason"]  # one line, no traceback
    assert good["status"] == "completed" and good["failure_reason"] is None and good["knn_top1"] is not None
    assert result.best is not None and result.best["trial_id"] == good["trial_id"]

    # MLflow: the failed trial's child run is FAILED with status and reason tags; the study FINISHED
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_failed"] == 1 and parent.data.metrics["trials_completed"] == 1
    kids = {r.data.tags["scaling.trial_id"]: r for r in children(client, result.experiment_id, result.parent_run_id)}
    assert set(kids) == {bad["trial_id"], good["trial_id"]}
    failed = kids[bad["trial_id"]]
    assert failed.info.status == "FAILED" and failed.data.tags["scaling.status"] == "failed"
    assert REASON in failed.data.tags["scaling.failure_reason"], failed.data.tags
    assert [m.step for m in client.get_metric_history(failed.info.run_id, "knn_top1")] == [1]  # epoch 1 was recorded
    ok = kids[good["trial_id"]]
    assert ok.info.status == "FINISHED" and ok.data.tags["scaling.status"] == "completed"

    # the analysis excludes the failed trial and counts it with its reason
    from analysis.report import analyze

    report = analyze(trials=result.study_dir / "trials.parquet", out=tmp_path / "report", log_to_mlflow=False)
    counts = report["trials"]
    assert counts["total"] == 2 and counts["failed"] == 1 and counts["completed"] == 1
    assert [r for r in counts["failure_reasons"] if REASON in r] and sum(counts["failure_reasons"].values()) == 1
    assert all(c.get("n_trials", 0) <= 1 for c in report["curves"])  # fitted on the completed trial only
    assert json.loads((tmp_path / "report" / "sensitivity.json").read_text())["trials"]["failed"] == 1
    print(f"non-finite study: {wall:.1f} s wall for 2 trials")


def _train_logs(pattern: str) -> set[str]:
    """Ray Train's per-actor log files of this Ray session (one file per worker actor ever started)."""
    import ray._private.worker as worker

    return {p.name for p in (Path(worker._global_node.get_session_dir_path()) / "logs" / "train").glob(pattern)}


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_killed_worker_resumes_from_its_checkpoint(ray_local: None, tmp_path: Path) -> None:
    """SIGKILL of the Ray Train worker mid-trial: Ray Train (FailureConfig(max_failures=2)) starts a new
    worker, which continues from the last checkpoint; the trial completes with one continuous history."""
    import os
    import signal
    import threading

    from ray.util.state import list_actors

    epochs, steps = 6, 4
    raw = tiny_spec("worker-kill", trials=1, epochs=epochs)
    raw["search"]["space"] = {}
    raw["train"]["max_steps_per_epoch"] = steps
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    workers_before = _train_logs("ray-train-app-worker-*.log")
    killed: dict[str, int] = {}

    def kill_after_epoch_2() -> None:
        client = MlflowClient(tracking_uri=uri)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            time.sleep(0.2)
            try:
                runs = client.search_runs(client.search_experiments(filter_string="name = 'worker-kill'")[0].experiment_id,
                                          filter_string="tags.`scaling.role` = 'trial'")
            except Exception:  # the experiment or its tables are not there yet
                continue
            if not runs:
                continue
            done = {int(m.step) for m in client.get_metric_history(runs[0].info.run_id, "knn_top1")}
            if len(done) < 2:
                continue
            if len(done) >= epochs:
                return  # finished before we could kill: the test fails below
            alive = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], detail=True)
            if alive:
                os.kill(alive[0].pid, signal.SIGKILL)
                killed.update(pid=alive[0].pid, after_epoch=max(done))

    killer = threading.Thread(target=kill_after_epoch_2, daemon=True)
    killer.start()
    result = run_study(spec_from_dict(raw), storage=tmp_path / "studies", tracking_uri=uri, progress=False)
    killer.join(timeout=10)
    assert killed, "the trial finished before its worker could be killed"

    # a second worker was started (the restart), and the trial completed
    new_workers = _train_logs("ray-train-app-worker-*.log") - workers_before
    assert len(new_workers) == 2, new_workers
    (row,) = pq.read_table(result.study_dir / "trials.parquet").to_pylist()
    assert row["status"] == "completed" and row["epochs_completed"] == epochs, row

    # Tune saw each epoch once, in order: the restart continued after its checkpoint instead of epoch 1
    tune_dir = result.study_dir / "tune" / row["trial_id"]
    reported = [json.loads(line)["epoch"] for line in (tune_dir / "result.json").read_text().splitlines()]
    assert reported == list(range(1, epochs + 1)), reported

    # MLflow: one continuous history, no gap, no duplicate; samples_seen grows by one epoch each step
    client = MlflowClient(tracking_uri=uri)
    (run,) = children(client, result.experiment_id, result.parent_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["scaling.status"] == "completed"
    for key in ("knn_top1", "train_loss", "epoch"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == list(range(1, epochs + 1)), key
    seen = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "samples_seen"))
    assert [v for _, v in seen] == [e * steps * 64 for e in range(1, epochs + 1)], seen
    print(f"worker {killed['pid']} killed after epoch {killed['after_epoch']}; trial completed {epochs} epochs")
