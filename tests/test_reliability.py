"""Reliability (issue 7): a poisonous hyperparameter costs one trial, never the study; a crashed
worker, a stopped study or a tracking-server outage costs no recorded work.

Real local Ray (Tune + Train), real MLflow (SQLite, or a real ``mlflow server`` started here), real
Parquet tables, the real analysis. Faults are injected with ``train.fault_nan_at_step`` (the losses
are numerically stable, so a real NaN is not reproducible on demand) and ``train.fault_oom_at_step``
(a real allocation of 1 PiB, which torch's allocator refuses): the fault sits at global step 3 and
the grid searches ``epochs`` over [1, 2] with 2 steps per epoch, so the 1-epoch trial never reaches
it and the 2-epoch trial hits it at epoch 2 step 1 -- the same spec, one trial poisoned.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from scaling.spec import spec_from_dict
from scaling.study import failure_reason, run_study
from tests.conftest import free_port, start_scaling_run
from tests.test_study import children, tiny_spec

pytestmark = pytest.mark.integration
REASON = "non-finite loss at epoch 2 step 1"
OOM_REASON = "out of memory at epoch 2 step 1: DefaultCPUAllocator: can't allocate memory"
BIN = Path(sys.executable).parent


def _poisoned_study(name: str, tmp_path: Path, **fault: int) -> tuple[Any, float, set[str], set[str]]:
    """The 2-trial grid (epochs 1 or 2) with a fault at global step 3; returns the result, its wall time,
    the Ray Train worker actors and the controllers it started (one log file each)."""
    raw = tiny_spec(name, trials=2, sampler="grid")
    raw["search"]["space"] = {"epochs": {"kind": "choice", "values": [1, 2]}}
    raw["train"].update(fault)
    before = _train_logs("ray-train-app-*.log")
    start = time.monotonic()
    result = run_study(spec_from_dict(raw), storage=tmp_path / "studies", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                       progress=False)
    new = _train_logs("ray-train-app-*.log") - before
    return (result, time.monotonic() - start, {n for n in new if "-worker-" in n},
            {n for n in new if "-controller-" in n})


@pytest.mark.timeout(420)
def test_non_finite_loss_fails_one_trial_and_the_study_goes_on(ray_local: None, tmp_path: Path) -> None:
    """The poisoned trial fails once -- no retry from its checkpoint (a deterministic failure would only
    fail again) -- with the reason everywhere; the other trial completes; the analysis counts it."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result, wall, workers, controllers = _poisoned_study("nan-trial", tmp_path, fault_nan_at_step=3)

    # the TrialTable: one failed with the reason, the other completed
    rows = {r["epochs"]: r for r in pq.read_table(result.study_dir / "trials.parquet").to_pylist()}
    assert set(rows) == {1, 2}, rows
    bad, good = rows[2], rows[1]
    assert bad["status"] == "failed" and REASON in bad["failure_reason"], bad
    assert bad["failure_reason"].startswith("NonFiniteLossError: "), bad["failure_reason"]  # one line, no traceback
    # ran once: one worker per trial (Ray Train's FailureConfig(max_failures=2) would have started 2 more
    # for the poisoned trial), and the controller decided to raise at once
    assert len(workers) == 2, workers
    assert _controller_decisions(controllers, bad["trial_id"]) == ["RAISE"]
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


@pytest.mark.timeout(420)
def test_out_of_memory_fails_one_trial_and_is_not_retried(ray_local: None, tmp_path: Path) -> None:
    """A trial whose step allocates more than the machine has: torch's allocator refuses, the trial fails
    once with `out of memory at epoch E step S: ...` (no retry, no hang), the other trial completes."""
    result, wall, workers, controllers = _poisoned_study("oom-trial", tmp_path, fault_oom_at_step=3)
    rows = {r["epochs"]: r for r in pq.read_table(result.study_dir / "trials.parquet").to_pylist()}
    bad, good = rows[2], rows[1]
    assert bad["status"] == "failed" and bad["failure_reason"].startswith(OOM_REASON), bad["failure_reason"]
    assert good["status"] == "completed" and good["knn_top1"] is not None
    assert len(workers) == 2, workers  # not retried
    assert _controller_decisions(controllers, bad["trial_id"]) == ["RAISE"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    kids = {r.data.tags["scaling.trial_id"]: r for r in children(client, result.experiment_id, result.parent_run_id)}
    failed = kids[bad["trial_id"]]
    assert failed.info.status == "FAILED" and failed.data.tags["scaling.failure_reason"].startswith(OOM_REASON)
    assert kids[good["trial_id"]].info.status == "FINISHED"
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"
    print(f"out-of-memory study: {wall:.1f} s wall for 2 trials; reason: {bad['failure_reason']}")


def _controller_decisions(controllers: set[str], trial: str) -> list[str]:
    """Ray Train's failure-policy decisions (RETRY/RAISE) for one trial, from the structured logs of the
    controllers its study started (their ``run_name`` is the trial's name)."""
    import re

    import ray._private.worker as worker

    logs = Path(worker._global_node.get_session_dir_path()) / "logs" / "train"
    decisions = []
    for name in sorted(controllers):
        for line in (logs / name).read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("run_name") == trial:
                decisions += re.findall(r"^\[FailurePolicy\] (RETRY|RAISE)", record.get("message", ""))
    return decisions


# ---------------------------------------------------------------------------------------------
# failure reasons and retry decisions (pure)


def test_out_of_memory_reasons_read_the_same_however_reported() -> None:
    from scaling.failures import TrialOutOfMemoryError

    assert str(TrialOutOfMemoryError("at epoch 3 step 2", "x")) == "out of memory at epoch 3 step 2: x"
    ours = "Traceback (most recent call last):\n  File x\nscaling.failures.TrialOutOfMemoryError: out of memory at epoch 3 step 2: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert failure_reason(ours) == "out of memory at epoch 3 step 2: CUDA out of memory. Tried to allocate 2.00 GiB"
    cuda = "ray.train.v2.api.exceptions.WorkerGroupError: Training failed\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"
    assert failure_reason(cuda) == "out of memory: CUDA out of memory. Tried to allocate 20.00 GiB"
    ray_kill = ("ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.\n"
                "Worker exit detail: Task was killed due to the node running low on memory.")
    assert failure_reason(ray_kill).startswith("out of memory: the worker was killed by Ray's memory monitor")
    assert failure_reason("FooError: bar\nscaling.loop.NonFiniteLossError: non-finite loss at epoch 1 step 2 (value nan)") \
        == "NonFiniteLossError: non-finite loss at epoch 1 step 2 (value nan)"


def test_deterministic_failures_are_raised_and_crashes_retried() -> None:
    """The failure policy Ray Train's controller uses for every trial (scaling.failures), on the errors
    a worker group really reports (ray.train's WorkerGroupError, RayActorError)."""
    import pickle

    import torch
    from ray.exceptions import RayActorError
    from ray.train import FailureConfig
    from ray.train.v2.api.exceptions import WorkerGroupError

    from scaling.failures import NoRetryOnDeterministicFailure, TrialOutOfMemoryError
    from scaling.loop import NonFiniteLossError

    def decide(*errors: BaseException) -> list[str]:
        policy = pickle.loads(pickle.dumps(NoRetryOnDeterministicFailure(FailureConfig(max_failures=2))))
        group = WorkerGroupError("x", dict(enumerate(errors)))
        return [policy.make_decision(pickle.loads(pickle.dumps(group))).value for _ in range(3)]

    nan = NonFiniteLossError(2, 1, float("nan"))
    assert decide(nan) == ["RAISE"] * 3
    assert decide(nan, ConnectionResetError("peer gone")) == ["RAISE"] * 3  # a collateral error on rank 1
    assert decide(TrialOutOfMemoryError("at epoch 1 step 1", "x")) == ["RAISE"] * 3
    assert decide(torch.OutOfMemoryError("CUDA out of memory.")) == ["RAISE"] * 3
    assert decide(RayActorError()) == ["RETRY", "RETRY", "RAISE"]  # a killed worker: max_failures=2 retries
    assert decide(RuntimeError("NCCL timeout")) == ["RETRY", "RETRY", "RAISE"]


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



def _controller_pids(before: set[str]) -> dict[str, int]:
    """Run name -> pid of the process running its Ray Train controller, from the controller logs
    started since ``before`` (with ``TrialTrainer`` that process is the trial's driver)."""
    import ray._private.worker as worker

    logs = Path(worker._global_node.get_session_dir_path()) / "logs" / "train"
    pids = {}
    for name in _train_logs("ray-train-sys-controller-*.log") - before:
        for line in (logs / name).read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            pids[record["run_name"]] = record["process"]
    return pids


def test_trial_trainer_refuses_to_run_outside_an_actor(ray_local: None, tmp_path: Path) -> None:
    """TrialTrainer's controller runs in the calling actor and its placement-group cleaner watches that
    actor: from a plain driver process it refuses at once, before any worker starts."""
    import ray.train

    from scaling.trial import TrialTrainer

    trainer = TrialTrainer(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1),
                           run_config=ray.train.RunConfig(name="outside", storage_path=str(tmp_path)))
    with pytest.raises(RuntimeError, match="inside the calling Ray actor"):
        trainer.fit()
    assert not trainer.started


@pytest.mark.timeout(480)
def test_killed_trial_driver_fails_its_trial_and_frees_its_workers(ray_local: None, tmp_path: Path) -> None:
    """SIGKILL of a trial driver mid-trial -- the actor that runs the trial's Ray Train controller
    (``scaling.trial.TrialTrainer``): that trial fails with the reason, the next trial runs in a new
    driver, and nothing of the dead one is left: its worker is gone and its workers' placement group
    removed (Ray keeps a placement group after the actor that made it dies; the driver's cleaner
    removes it)."""
    from ray.util import placement_group_table
    from ray.util.state import list_actors

    epochs = 6
    raw = tiny_spec("driver-kill", trials=2, epochs=epochs, sampler="grid")
    raw["search"]["space"] = {"seed": {"kind": "choice", "values": [0, 1]}}
    raw["train"]["max_steps_per_epoch"] = 4
    raw["resources"]["max_concurrent_trials"] = 1
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    killed: dict[str, Any] = {}

    controllers_before = _train_logs("ray-train-sys-controller-*.log")

    def kill_the_first_driver_after_epoch_1() -> None:
        client = MlflowClient(tracking_uri=uri)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                exp = client.search_experiments(filter_string="name = 'driver-kill'")[0].experiment_id
                runs = client.search_runs([exp], filter_string="tags.`scaling.role` = 'trial'")
            except Exception:  # the experiment or its tables are not there yet
                continue
            if not runs:
                continue
            done = len(client.get_metric_history(runs[0].info.run_id, "knn_top1"))
            if done >= epochs:
                return  # finished before we could kill: the test fails below
            if done and (driver := _controller_pids(controllers_before)):
                (pid,) = driver.values()
                os.kill(pid, signal.SIGKILL)
                killed.update(trial=runs[0].data.tags["scaling.trial_id"], pid=pid)
                return

    killer = threading.Thread(target=kill_the_first_driver_after_epoch_1, daemon=True)
    killer.start()
    result = run_study(spec_from_dict(raw), storage=tmp_path / "studies", tracking_uri=uri, progress=False)
    killer.join(timeout=10)
    assert killed, "the first trial finished before its driver could be killed"

    rows = {r["trial_id"]: r for r in pq.read_table(result.study_dir / "trials.parquet").to_pylist()}
    bad = rows.pop(killed["trial"])
    (good,) = rows.values()
    assert bad["status"] == "failed" and "died" in bad["failure_reason"], bad
    assert good["status"] == "completed" and good["epochs_completed"] == epochs, good

    # what the dead driver started is gone: no worker left, no placement group holding its CPU
    deadline = time.monotonic() + 20  # the cleaner looks once a second
    while time.monotonic() < deadline:
        left = [v for v in placement_group_table().values() if v["state"] != "REMOVED"]
        if not left:
            break
        time.sleep(0.5)
    assert not left, left
    assert not list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    print(f"trial driver {killed['pid']} killed; its trial failed with: {bad['failure_reason']}")

# ---------------------------------------------------------------------------------------------
# the tracking server goes away


class _MlflowServer:
    """A real `mlflow server` on 127.0.0.1 that the test can kill and start again on the same port and store."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self, timeout_s: float = 90) -> float:
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db", "--artifacts-destination",
             str(self.root / "artifacts")],
            stdout=open(self.root / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout_s:
                self.kill()
                raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)

    def kill(self) -> None:
        """SIGKILL of the server's whole process group (a crash, not a shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def epochs_logged(self) -> int:
        """Per-epoch results in the server's store (read from its SQLite file, not through the server)."""
        db = self.root / "mlflow.db"
        if not db.exists():
            return 0
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
                return int(con.execute("select count(*) from metrics where key = 'epoch'").fetchone()[0])
        except sqlite3.Error:
            return 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mlflow_outage_mid_study_loses_nothing(ray_local: None, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """The tracking server is killed once the first epoch is recorded, stays down 30 s, and comes back
    on the same port and store: the study runs on meanwhile (nothing waits for MLflow), the user is
    told when it went away and when it came back, and afterwards every trial has its child run with
    every epoch of every metric, its params, and its final status."""
    server = _MlflowServer(tmp_path / "mlflow")
    server.start()
    epochs, trials = 3, 4
    raw = tiny_spec("outage", trials=trials, epochs=epochs)
    outage: dict[str, float] = {}

    def stop_for_30_s() -> None:
        deadline = time.monotonic() + 180
        while server.epochs_logged() < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        server.kill()
        outage["down"] = time.time()
        time.sleep(30)
        outage["restart_s"] = server.start()
        outage["up"] = time.time()

    chaos = threading.Thread(target=stop_for_30_s, daemon=True)
    chaos.start()
    try:
        start = time.monotonic()
        result = run_study(spec_from_dict(raw), storage=tmp_path / "studies", tracking_uri=server.url, progress=False)
        wall = time.monotonic() - start
        chaos.join(timeout=120)
        assert "up" in outage, "the server did not come back"

        # the study went on during the outage: Tune recorded epochs while the server was down
        during = [rec for path in (result.study_dir / "tune").glob("trial_*/result.json")
                  for rec in map(json.loads, path.read_text().splitlines()) if outage["down"] < rec["timestamp"] < outage["up"]]
        assert during, "no epoch finished while MLflow was down: the outage was not mid-study"

        # the user was told, once each way
        err = capfd.readouterr().err
        assert err.count(f"MLflow at {server.url} unreachable since ") == 1, err[-3000:]
        assert err.count(f"MLflow at {server.url} recovered") == 1, err[-3000:]
        assert "writes buffered" in err and "buffered writes replayed" in err

        # nothing lost, nothing doubled
        client = MlflowClient(tracking_uri=server.url)
        parent = client.get_run(result.parent_run_id)
        assert parent.info.status == "FINISHED" and parent.data.metrics["trials_completed"] == trials
        assert {a.path for a in client.list_artifacts(result.parent_run_id, "tables")} == {"tables/trials.parquet",
                                                                                           "tables/curves.parquet"}
        kids = children(client, result.experiment_id, result.parent_run_id)
        table = {r["trial_id"]: r for r in result.trials.to_pylist()}
        assert sorted(r.data.tags["scaling.trial_id"] for r in kids) == sorted(table) and len(kids) == trials
        for run in kids:
            row = table[run.data.tags["scaling.trial_id"]]
            assert run.info.status == "FINISHED" and run.data.tags["scaling.status"] == "completed"
            assert {"temperature", "loss", "derived.per_worker_batch"} <= set(run.data.params)
            assert float(run.data.params["temperature"]) == pytest.approx(row["temperature"])
            for key in ("epoch", "knn_top1", "train_loss", "samples_seen"):
                steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
                assert sorted(steps) == list(range(1, epochs + 1)), (row["trial_id"], key, steps)
        assert not (result.study_dir / "tracking_pending.jsonl").exists()
        told = [ln for ln in err.splitlines() if ln.startswith("[scaling] MLflow")]
        print(f"outage: down {outage['up'] - outage['down']:.0f} s (restart {outage['restart_s']:.0f} s), "
              f"{len(during)} epochs finished meanwhile; study {wall:.0f} s for {trials} trials", *told, sep="\n")
    finally:
        server.kill()


# ---------------------------------------------------------------------------------------------
# a study stopped (SIGTERM, what `scaling stop` / `ray job stop` send) and resumed


def _runs(db: Path) -> dict[str, tuple[str, str, dict[str, str]]]:
    """run name -> (run id, MLflow status, tags), read straight from the SQLite store."""
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            runs = con.execute("select run_uuid, name, status from runs").fetchall()
            tags = con.execute("select run_uuid, key, value from tags").fetchall()
    except sqlite3.Error:
        return {}
    by_run: dict[str, dict[str, str]] = {}
    for run_id, key, value in tags:
        by_run.setdefault(run_id, {})[key] = value
    return {name: (run_id, status, by_run.get(run_id, {})) for run_id, name, status in runs}


def _epochs(db: Path, run_id: str) -> list[int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
        return sorted(int(s) for (s,) in con.execute(
            "select step from metrics where run_uuid = ? and key = 'knn_top1'", (run_id,)).fetchall())


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_stopped_study_closes_its_runs_and_resume_reopens_them(tmp_path: Path) -> None:
    """SIGTERM to `scaling run` mid-trial: the parent run and the child runs still open end KILLED, the
    children say why; `scaling resume` reopens the same runs (none duplicated) and completes them with
    one continuous history each."""
    epochs = 8
    spec = tiny_spec("stopped", trials=2, epochs=epochs)
    spec["data"]["size"] = 2000  # epochs of about a second: the trials are mid-way when the stop comes
    spec["train"]["max_steps_per_epoch"] = 20
    db = tmp_path / "mlflow.db"
    proc, env = start_scaling_run(tmp_path, spec, "--no-progress")
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            trials = {n: r for n, r in _runs(db).items() if r[2].get("scaling.role") == "trial"}
            if any(_epochs(db, r[0]) for r in trials.values()):
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the study ended before it could be stopped: " + (proc.stdout.read() if proc.stdout else "")
        t_stop = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # the driver only, as the Ray job supervisor does first
        out, _ = proc.communicate(timeout=120)
        stop_s = time.monotonic() - t_stop
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the local Ray it started is left
        except ProcessLookupError:
            pass
    assert proc.returncode != 0, out

    runs = _runs(db)
    parent = runs["stopped"]
    assert parent[1] == "KILLED", (parent, out[-3000:])
    stopped = {n: r for n, r in runs.items() if r[2].get("scaling.role") == "trial"}
    open_at_stop = [n for n, r in stopped.items() if r[1] != "FINISHED"]
    assert open_at_stop, stopped
    for name, (run_id, status, tags) in stopped.items():
        if name not in open_at_stop:  # finished before the stop: left as it was
            assert tags["scaling.status"] == "completed" and len(_epochs(db, run_id)) == epochs, (name, tags)
            continue
        assert status == "KILLED" and tags["scaling.status"] == "failed", (name, status, tags)
        assert tags["scaling.failure_reason"].startswith("the study was stopped before the trial ended"), tags
        assert len(_epochs(db, run_id)) < epochs
    study_dir = next((tmp_path / "studies").iterdir())
    assert json.loads((study_dir / "study.json").read_text())["status"] == "running"

    res = subprocess.run([str(BIN / "scaling"), "resume", str(study_dir), "--no-progress"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    runs = _runs(db)
    assert runs["stopped"][0] == parent[0] and runs["stopped"][1] == "FINISHED"
    resumed = {n: r for n, r in runs.items() if r[2].get("scaling.role") == "trial"}
    assert len(resumed) == 2 and len(runs) == 3, runs
    assert {n: r[0] for n, r in resumed.items() if n in stopped} == {n: r[0] for n, r in stopped.items()}, \
        "a run was duplicated"
    for name, (run_id, status, tags) in resumed.items():
        assert status == "FINISHED" and tags["scaling.status"] == "completed", (name, status, tags)
        assert "scaling.failure_reason" not in tags
        assert _epochs(db, run_id) == list(range(1, epochs + 1)), (name, _epochs(db, run_id))
    # the TrialTable too: every epoch of both trials once, including those trained before the stop
    curves = pq.read_table(study_dir / "curves.parquet").select(["trial_id", "epoch"]).to_pylist()
    assert sorted((r["trial_id"], r["epoch"]) for r in curves) == [(t, e) for t in sorted(resumed) for e in range(1, epochs + 1)]
    print(f"stopped after SIGTERM in {stop_s:.1f} s with {len(open_at_stop)} trial(s) open; resumed and completed both")
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)  # kept when the test fails: Ray's logs are in there


@pytest.mark.timeout(180)
def test_stop_while_ray_starts_closes_the_parent_run(tmp_path: Path) -> None:
    """SIGTERM in the seconds between the parent run's creation and Tune's start (Ray starting up):
    the parent run ends KILLED, not RUNNING forever."""
    proc, _ = start_scaling_run(tmp_path, tiny_spec("early-stop", trials=1), "--no-progress")
    db = tmp_path / "mlflow.db"
    try:
        deadline = time.time() + 90
        while time.time() < deadline and proc.poll() is None:  # study.json names the parent just before ray.init
            infos = list((tmp_path / "studies").glob("*/study.json"))
            if infos and "parent_run_id" in infos[0].read_text():
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert "trial" not in {r[2].get("scaling.role") for r in _runs(db).values()}  # no trial has started
        proc.send_signal(signal.SIGTERM)
        try:  # as `ray job stop` does: SIGKILL 3 s after SIGTERM
            out, _ = proc.communicate(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode != 0, out
    assert _runs(db)["early-stop"][1] == "KILLED", out[-3000:]


# ---------------------------------------------------------------------------------------------
# the tracking writer (real MLflow store, outage injected between the writer and its client)


class _Flaky:
    """An MlflowClient whose every call fails like a stopped server while ``down`` is set."""

    def __init__(self, client: MlflowClient) -> None:
        self.client, self.down = client, False

    def __getattr__(self, name: str) -> Any:
        from mlflow.exceptions import MlflowException

        attr = getattr(self.client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise MlflowException("API request to http://u:pw@127.0.0.1:9/api/2.0/mlflow/runs/log-batch failed "
                                      "with exception ConnectionError: [Errno 111] Connection refused")
            return attr(*args, **kwargs)
        return call


def test_tracking_writer_buffers_retries_saves_and_replays(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Writes never block the caller; an outage is announced once and its end once; while it lasts the
    queue is kept in tracking_pending.jsonl; what a study could not write before it ended is replayed
    by the next session on the same study directory (the resume), exactly once, without reopening
    what the stop closed."""
    from scaling.tracking import PENDING_FILE, StudyTracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    study_dir = tmp_path / "study"
    study_dir.mkdir()
    spec = spec_from_dict(tiny_spec("writer"))
    tracker = StudyTracker(spec, tracking_uri=uri)
    tracker.start_study(study_dir=study_dir)
    flaky = _Flaky(tracker.writer.client)
    tracker.writer.client = flaky
    flaky.down = True
    t0 = time.monotonic()
    for t in range(3):
        tracker.start_trial(f"trial_{t:04d}", {"temperature": 0.1 * (t + 1)})
        for epoch in (1, 2):
            tracker.log_epoch(f"trial_{t:04d}", {"knn_top1": 0.1 * epoch, "train_loss": 4.0 - epoch}, epoch=epoch)
    tracker.end_trial("trial_0000", status="completed")
    assert time.monotonic() - t0 < 0.5, "a write waited for the server"
    pending = study_dir / PENDING_FILE
    deadline = time.monotonic() + 10
    while not pending.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    saved = [json.loads(line) for line in pending.read_text().splitlines()]
    assert [op["op"] for op in saved][:3] == ["open_trial", "metrics", "metrics"] and len(saved) >= 10

    flaky.down = False  # back: everything goes out, in order, and the file goes
    assert tracker.flush(30) == 0
    assert not pending.exists()
    err = capsys.readouterr().err
    assert err.count("writes buffered, retrying") == 1 and err.count("buffered writes replayed") == 1, err
    assert "connection refused" in err and "pw@" not in err

    flaky.down = True  # the study ends while the server is down: its last writes are saved
    tracker.log_epoch("trial_0001", {"knn_top1": 0.3}, epoch=3)
    tracker.end_trial("trial_0001", status="completed")
    assert tracker.end_study(status="KILLED", timeout_s=1.0) > 0
    assert "still unreachable" in capsys.readouterr().err and pending.exists()
    saved = [json.loads(line) for line in pending.read_text().splitlines()]
    assert any(op.get("on_stop") for op in saved)

    resumed = StudyTracker(spec, tracking_uri=uri)  # `scaling resume`: the same study directory
    resumed.start_study(study_dir=study_dir)
    assert resumed.flush(30) == 0 and not pending.exists()
    assert "replaying" in capsys.readouterr().err
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(resumed.parent_run_id).info.status == "RUNNING"  # the stop's KILLED was not replayed
    kids = {r.data.tags["scaling.trial_id"]: r for r in children(client, resumed.experiment_id, resumed.parent_run_id)}
    assert sorted(kids) == ["trial_0000", "trial_0001", "trial_0002"]
    assert kids["trial_0000"].info.status == "FINISHED" and kids["trial_0001"].info.status == "FINISHED"
    assert kids["trial_0002"].info.status == "RUNNING"  # its KILLED (the stop) was dropped: the resume continues it
    for name, want in (("trial_0000", [1, 2]), ("trial_0001", [1, 2, 3]), ("trial_0002", [1, 2])):
        for key in ("knn_top1", "epoch"):
            assert sorted(m.step for m in client.get_metric_history(kids[name].info.run_id, key)) == want, (name, key)
    assert kids["trial_0001"].data.params["temperature"] == "0.2"
    resumed.end_study(status="FINISHED")


def test_unreachable_tracking_server_leaves_no_half_made_study(tmp_path: Path) -> None:
    """MLflow down when a study starts: a clear error naming the server, and no study directory left
    behind (nothing half-written) -- Ray never starts."""
    from scaling.study import StudyError

    spec = spec_from_dict(tiny_spec("no-mlflow", trials=1))
    storage = tmp_path / "studies"
    with pytest.raises(StudyError, match=r"cannot open the study's MLflow runs at http://127\.0\.0\.1:1"):
        run_study(spec, storage=storage, tracking_uri="http://127.0.0.1:1", progress=False)
    assert storage.is_dir() and not any(storage.iterdir())
