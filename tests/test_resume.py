"""Integration: a study killed mid-way (SIGKILL of `scaling run`) completes with `scaling resume`:
no completed trial runs again and every trial has exactly one MLflow child run."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import SCALING, start_scaling_run
from tests.test_study import tiny_spec

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def finished_children(db: Path) -> set[str]:
    """Trial ids whose MLflow child run the study closed as FINISHED."""
    if not db.exists():
        return set()
    with sqlite3.connect(db) as con:
        try:
            rows = con.execute(
                "select t.value from runs r join tags t on t.run_uuid = r.run_uuid "
                "where t.key = 'scaling.trial_id' and r.status = 'FINISHED'"
            ).fetchall()
        except sqlite3.OperationalError:  # schema not created yet
            return set()
    return {r[0] for r in rows}


def checkpoints(study_dir: Path, trial: str) -> list[str]:
    """A trial's Ray Train checkpoint directories: training again would write new ones."""
    return sorted(p.name for p in (study_dir / "train" / trial).glob("checkpoint_*"))


def test_killed_study_resumes_without_duplicates(tmp_path: Path) -> None:
    spec = tiny_spec("resumable", trials=4, epochs=3)
    spec["train"]["max_steps_per_epoch"] = 3
    db = tmp_path / "mlflow.db"
    proc, env = start_scaling_run(tmp_path, spec)
    deadline = time.time() + 240
    while len(finished_children(db)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, "the study finished before it could be interrupted: " + (proc.stdout.read() if proc.stdout else "")
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait(timeout=30)
    done_before = finished_children(db)
    assert len(done_before) >= 2, "no trial completed in time"
    study_dir = next((tmp_path / "studies").iterdir())
    assert not (study_dir / "trials.parquet").exists()
    before = {t: checkpoints(study_dir, t) for t in done_before}
    assert all(before.values()), before

    res = subprocess.run([SCALING, "resume", str(study_dir)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    for name in done_before:
        assert checkpoints(study_dir, name) == before[name], f"{name} trained again"
    trials = pq.read_table(study_dir / "trials.parquet").to_pylist()
    assert len(trials) == 4 and all(r["status"] == "completed" for r in trials), trials

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("resumable")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`scaling.role` = 'study'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    kids = client.search_runs([exp.experiment_id], filter_string="tags.`scaling.role` = 'trial'")
    names = sorted(r.data.tags["scaling.trial_id"] for r in kids)
    assert names == sorted(r["trial_id"] for r in trials) and len(set(names)) == 4
    for run in kids:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "knn_top1")]
        assert sorted(steps) == [1, 2, 3], (run.data.tags["scaling.trial_id"], steps)  # no gap, no duplicate
    assert json.loads((study_dir / "study.json").read_text())["status"] == "finished"
