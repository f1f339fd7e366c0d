"""Integration: real local Ray (Tune + Train), real MLflow store, real Parquet tables."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from scaling.spec import spec_from_dict
from scaling.study import run_study

pytestmark = pytest.mark.integration


def tiny_spec(name: str, *, workers: int = 1, trials: int = 4, epochs: int = 2, **search: object) -> dict:
    return {
        "name": name,
        "data": {"name": "shapes", "size": 480, "image_size": 16, "seed": 0},
        "model": {"encoder": "small_cnn", "width": 8, "proj_hidden": 32, "proj_dim": 16},
        "train": {"epochs": epochs, "batch_size": 64, "optimizer": "adam", "lr": 0.002, "warmup_epochs": 0,
                  "max_steps_per_epoch": 2},
        "eval": {"knn_k": 5},
        "search": {
            "space": {
                "temperature": {"kind": "loguniform", "low": 0.05, "high": 1.0},
                "loss": {"kind": "choice", "values": {"infonce": {}, "adnce": {"mu": {"kind": "uniform", "low": 0.3, "high": 1.0}}}},
            },
            "sampler": "random", "trials": trials, "seed": 3, "scheduler": {"kind": "none"}, **search,
        },
        "resources": {"workers_per_trial": workers, "cpus_per_worker": 1},
        "tracking": {"experiment": name},
    }


def children(client: MlflowClient, exp_id: str, parent: str) -> list:
    return client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


def test_two_worker_study_tracks_every_trial(ray_local: None, tmp_path: Path) -> None:
    """4 trials x 2 epochs, 2 Ray Train workers per trial: MLflow structure, params, histories, tables."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = spec_from_dict(tiny_spec("two-workers", workers=2))
    result = run_study(spec, storage=tmp_path / "studies", tracking_uri=uri, progress=False)

    trials = pq.read_table(result.study_dir / "trials.parquet")
    curves = pq.read_table(result.study_dir / "curves.parquet")
    rows = trials.to_pylist()
    assert len(rows) == 4 and {r["status"] for r in rows} == {"completed"}
    for col in ("study", "trial_id", "status", "batch_size", "temperature", "views", "loss", "lr", "loss.mu",
                "knn_top1", "knn_top1_test", "epochs", "samples_seen", "wall_s", "failure_reason", "seed"):
        assert col in trials.column_names, col
    for r in rows:
        assert 0.0 <= r["knn_top1"] <= 1.0 and r["samples_seen"] == 2 * 2 * 64
        assert (r["loss.mu"] is None) == (r["loss"] == "infonce")
    assert sorted(r["trial_id"] for r in rows) == [f"trial_{i:04d}" for i in range(4)]
    assert curves.num_rows == 8 and set(curves.column("epoch").to_pylist()) == {1, 2}
    assert b"scaling.search_space" in trials.schema.metadata

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("two-workers")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`scaling.role` = 'study'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags["scaling.spec_hash"] == spec.spec_hash()
    assert "scaling.version.torch" in parent.data.tags
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "spec")}
    assert "spec/resolved.yaml" in arts
    kids = children(client, exp.experiment_id, parent.info.run_id)
    assert len(kids) == 4
    for run in kids:
        assert run.info.status == "FINISHED" and run.data.tags["scaling.status"] == "completed"
        p = run.data.params
        assert {"temperature", "loss", "derived.per_worker_batch", "derived.world_size"} <= set(p)
        assert p["derived.per_worker_batch"] == "32" and p["derived.world_size"] == "2"
        hist = client.get_metric_history(run.info.run_id, "knn_top1")
        assert sorted(m.step for m in hist) == [1, 2]
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2


def test_same_seed_same_configs_and_metrics(ray_local: None, tmp_path: Path) -> None:
    """Reproducibility on CPU: same spec and seed twice -> identical sampled configs and final metrics."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tables = []
    for i in range(2):
        spec = spec_from_dict(tiny_spec(f"repro{i}", trials=2))
        tables.append(run_study(spec, storage=tmp_path / f"s{i}", tracking_uri=uri, progress=False).trials)
    keep = ["trial_id", "temperature", "loss", "loss.mu", "knn_top1", "train_loss"]
    a, b = ([{k: r.get(k) for k in keep} for r in t.to_pylist()] for t in tables)
    assert [r["temperature"] for r in a] == [r["temperature"] for r in b]
    assert a == b


def test_study_against_a_real_mlflow_server(ray_local: None, mlflow_server: str, tmp_path: Path) -> None:
    """The same layout through an http tracking server (what a cluster uses)."""
    spec = spec_from_dict(tiny_spec("via-server", trials=2))
    result = run_study(spec, storage=tmp_path / "studies", tracking_uri=mlflow_server, progress=False)
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("via-server")
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.experiment_id == exp.experiment_id
    kids = children(client, exp.experiment_id, result.parent_run_id)
    assert sorted(r.data.tags["scaling.trial_id"] for r in kids) == ["trial_0000", "trial_0001"]
    assert all(len(client.get_metric_history(r.info.run_id, "knn_top1")) == 2 for r in kids)
    arts = {a.path for a in client.list_artifacts(result.parent_run_id, "tables")}
    assert arts == {"tables/trials.parquet", "tables/curves.parquet"}
    assert result.ui_hint.startswith(f"open {mlflow_server}/#/experiments/")


def test_every_loss_runs_in_a_study(ray_local: None, tmp_path: Path) -> None:
    """Every member of the loss family is selectable in a spec and trains as a Tune trial (grid over losses)."""
    from scaling.losses import LOSS_NAMES

    raw = tiny_spec("all-losses", trials=len(LOSS_NAMES), epochs=1)
    raw["search"].update(sampler="grid", space={"loss": {"kind": "choice", "values": list(LOSS_NAMES)}})
    raw["train"]["max_steps_per_epoch"] = 1
    spec = spec_from_dict(raw)
    result = run_study(spec, storage=tmp_path / "studies", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", progress=False)
    rows = result.trials.to_pylist()
    assert sorted(r["loss"] for r in rows) == sorted(LOSS_NAMES)
    assert all(r["status"] == "completed" and r["train_loss"] is not None for r in rows), rows


def test_asha_prunes_trials_and_their_driver_is_reused(ray_local: None, tmp_path: Path) -> None:
    """ASHA stops trials mid-run; Tune reuses the stopped trial's driver actor for the next trial
    (``reuse_actors``), which works only if the stopped trial's Ray Train run was aborted."""
    import json

    search = {"scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2}}
    raw = tiny_spec("asha", trials=6, epochs=4, **search)
    raw["resources"]["max_concurrent_trials"] = 1
    result = run_study(spec_from_dict(raw), storage=tmp_path / "studies", tracking_uri=f"sqlite:///{tmp_path}/m.db",
                       progress=False)

    rows = result.trials.to_pylist()
    statuses = [r["status"] for r in rows]
    assert len(rows) == 6 and "failed" not in statuses, [(r["status"], r["failure_reason"]) for r in rows]
    assert "pruned" in statuses and "completed" in statuses
    last_epoch: dict[str, int] = {}
    for c in result.curves.to_pylist():
        last_epoch[c["trial_id"]] = max(last_epoch.get(c["trial_id"], 0), c["epoch"])
    assert all((last_epoch[r["trial_id"]] < 4) == (r["status"] == "pruned") for r in rows)
    # one trial at a time: every trial ran in the same (reused) trial-driver process
    pids = set()
    for trial_dir in (result.study_dir / "tune").glob("trial_*"):
        pids |= {json.loads(line)["pid"] for line in (trial_dir / "result.json").read_text().splitlines()}
    assert len(pids) == 1
