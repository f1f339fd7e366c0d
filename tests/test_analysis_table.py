"""TrialTable loading: Parquet round trip, search-space metadata and inference, validation, and
the MLflow reader against a real sqlite store filled in the study engine's layout."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from analysis.synthetic import make_trials
from analysis.table import (
    META_PARENT_RUN,
    AnalysisError,
    load_trials_mlflow,
    load_trials_parquet,
    metadata_of,
    parse_search_space,
    prepare_trials,
    search_space_of,
    with_metadata,
    write_trials,
)


def test_parquet_round_trip_keeps_rows_curves_and_metadata(tmp_path):
    trials, curves = make_trials(60, seed=0, pruned_fraction=0.1, failed_fraction=0.05)
    write_trials(tmp_path, trials, curves)
    got, got_curves = load_trials_parquet(tmp_path / "trials.parquet")
    assert got.num_rows == 60 and got_curves is not None and got_curves.num_rows == curves.num_rows
    assert got.schema.field("batch_size").type == pa.int64()
    assert got.schema.field("loss").type == pa.string()
    meta = metadata_of(got)
    assert meta["scaling.metric"] == "knn_top1" and meta["scaling.mode"] == "max"
    space = search_space_of(got)
    assert space["temperature"].kind == "loguniform" and space["temperature"].log
    assert space["batch_size"].kind == "choice" and space["batch_size"].numeric and space["batch_size"].log
    assert space["views"].numeric and not space["views"].log
    assert space["loss"].values == ("infonce", "dcl", "adnce") and not space["loss"].numeric
    assert space["loss.mu"].condition == {"loss": ("adnce",)}
    # A directory works as well as the file.
    again, _ = load_trials_parquet(tmp_path)
    assert again.equals(got)


def test_search_space_is_inferred_without_metadata():
    trials, _ = make_trials(80, seed=1, metadata=False, with_curves=False)
    assert not metadata_of(trials)
    space = search_space_of(trials, metric="knn_top1")
    assert space["temperature"].kind == "loguniform"  # positive, spans two decades
    assert space["batch_size"].kind == "intlog"  # a geometric ladder 64..1024
    assert space["views"].kind == "int" and not space["views"].log
    assert space["loss"].kind == "choice" and set(space["loss"].values) == {"infonce", "dcl", "adnce"}
    assert space["loss.mu"].condition == {"loss": ("adnce",)}
    for result in ("knn_top1", "train_loss", "samples_seen", "wall_s", "seed", "flops_per_sample"):
        assert result not in space


def test_parse_search_space_flattens_conditional_variants():
    space = parse_search_space({
        "temperature": {"kind": "loguniform", "low": 0.03, "high": 2.0},
        "batch_size": {"kind": "choice", "values": [64, 128, 256, 512]},
        "loss": {"kind": "choice", "values": {
            "infonce": {}, "dcl": None,
            "adnce": {"mu": {"kind": "uniform", "low": 0.3, "high": 1.0}},
            "hcl": {"mu": {"kind": "uniform", "low": 0.1, "high": 0.5}}}},
        "lr": {"kind": "float", "low": 1e-3, "high": 1.0, "log": True},
        "epochs": 8,
    })
    assert space["loss"].values == ("infonce", "dcl", "adnce", "hcl")
    assert space["loss.mu"].condition == {"loss": ("adnce", "hcl")}
    assert (space["loss.mu"].low, space["loss.mu"].high) == (0.1, 1.0)
    assert space["lr"].kind == "loguniform"
    assert not space["epochs"].searched
    assert space["batch_size"].log  # geometric ladder, ratio 8 < 10
    with pytest.raises(AnalysisError, match="unknown kind"):
        parse_search_space({"x": {"kind": "gaussian"}})


def test_prepare_rejects_bad_tables_with_clear_messages():
    trials, _ = make_trials(30, seed=2, with_curves=False)
    with pytest.raises(AnalysisError, match="empty"):
        prepare_trials(trials.slice(0, 0))
    with pytest.raises(AnalysisError, match="'accuracy' is not in the trial table"):
        prepare_trials(trials, metric="accuracy")
    with pytest.raises(AnalysisError, match="expected a number"):
        prepare_trials(trials, metric="loss")
    failed = trials.set_column(trials.column_names.index("status"), "status",
                               pa.array(["failed"] * trials.num_rows))
    failed = failed.set_column(failed.column_names.index("failure_reason"), "failure_reason",
                               pa.array(["CUDA out of memory"] * trials.num_rows))
    with pytest.raises(AnalysisError, match=r"all 30 trials failed.*CUDA out of memory \(30\)"):
        prepare_trials(failed)
    no_metric = trials.set_column(trials.column_names.index("knn_top1"), "knn_top1",
                                  pa.array([None] * trials.num_rows, type=pa.float64()))
    with pytest.raises(AnalysisError, match="no completed trial has a value"):
        prepare_trials(no_metric)
    bare = pa.table({"trial_id": ["a", "b"], "status": ["completed"] * 2, "temperature": [0.1, 0.2],
                     "acc": [0.5, 0.6]})
    with pytest.raises(AnalysisError, match="pass --metric, one of: temperature, acc"):
        prepare_trials(bare)


def test_prepare_counts_statuses_and_keeps_metadata_mode():
    trials, curves = make_trials(100, seed=3, pruned_fraction=0.2, failed_fraction=0.1)
    data = prepare_trials(trials, curves)
    assert data.counts == {"completed": 70, "pruned": 20, "failed": 10, "total": 100,
                           "completed_with_metric": 70}
    assert data.failure_reasons == {"synthetic failure: CUDA out of memory": 10}
    assert len(data.completed) == 70 and len(data.reached) == 90
    assert data.mode == "max" and data.metric == "knn_top1"
    # The metadata's mode belongs to the metadata's metric; another metric's is inferred.
    assert prepare_trials(trials, metric="train_loss").mode == "min"
    assert prepare_trials(with_metadata(trials, mode="min")).mode == "min"


# --------------------------------------------------------------------------- MLflow

# The search space as scaling/space.py describes it (flat loss.<param>, explicit "log").
SPACE = {
    "temperature": {"kind": "loguniform", "low": 0.05, "high": 1.0, "log": True},
    "batch_size": {"kind": "choice", "values": [64, 128], "log": False},
    "loss": {"kind": "choice", "values": ["infonce", "adnce"], "log": False},
    "loss.mu": {"kind": "uniform", "low": 0.3, "high": 1.0, "log": False},
}
# The DESIGN.md form: nested loss variants.
NESTED = {
    "temperature": {"kind": "loguniform", "low": 0.05, "high": 1.0},
    "batch_size": {"kind": "choice", "values": [64, 128]},
    "loss": {"kind": "choice",
             "values": {"infonce": {}, "adnce": {"mu": {"kind": "uniform", "low": 0.3, "high": 1.0}}}},
}


def _fill_store(uri: str, root) -> dict[str, str]:
    """Two studies in one experiment, in the layout of scaling/tracking.py: a parent run
    (``scaling.role=study``) and one child run per trial. "quick" logs like the study engine
    (params ``study.metric``, ``repeat``, ``derived.*``; per-epoch metric ``epoch``); "other" in
    the alternative spellings the reader also accepts (``scaling.metric``, ``seed``, ``epochs``,
    a metric named ``loss``). Neither study's trials may leak into the other's table."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    eid = client.create_experiment("quick", artifact_location=str(root / "artifacts"))
    ids: dict[str, str] = {}
    for study, n in (("other", 3), ("quick", 6)):
        engine = study == "quick"
        parent = client.create_run(eid, run_name=study, tags={"scaling.role": "study", "scaling.study": study})
        pid = parent.info.run_id
        meta = ([Param("study.metric", "knn_top1"), Param("study.mode", "max")] if engine
                else [Param("scaling.metric", "knn_top1"), Param("scaling.mode", "max")])
        client.log_batch(pid, params=[Param("scaling.search_space", json.dumps(SPACE if engine else NESTED)), *meta])
        for i in range(n):
            status = {4: "pruned", 5: "failed"}.get(i, "completed")
            loss = "adnce" if i % 2 else "infonce"
            run = client.create_run(eid, run_name=f"{study}-{i}", tags={
                "mlflow.parentRunId": pid, "scaling.role": "trial", "scaling.trial_id": f"{study}_{i:03d}",
                "scaling.status": status, "scaling.study": study})
            rid = run.info.run_id
            params = [Param("temperature", str(0.05 * (i + 1))), Param("batch_size", str(64 * (1 + i % 2))),
                      Param("loss", loss), Param("repeat" if engine else "seed", "0")]
            params += [Param("derived.flops_per_image", "1000000.0")] if engine else [Param("epochs", "3")]
            if loss == "adnce":
                params.append(Param("loss.mu", "0.5"))
            n_ep = {4: 1, 5: 0}.get(i, 3)
            metrics = []
            for ep in range(1, n_ep + 1):
                metrics += [Metric("knn_top1", 0.1 * ep + 0.01 * i, 0, ep), Metric("samples_seen", 1000.0 * ep, 0, ep),
                            Metric("train_loss" if engine else "loss", 5.0 - ep, 0, ep),
                            Metric("epoch" if engine else "epochs", float(ep), 0, ep)]
            if n_ep:
                metrics.append(Metric("wall_s", 2.5, 0, n_ep))
            client.log_batch(rid, metrics=metrics, params=params)
            if status == "failed":
                client.set_tag(rid, "scaling.failure_reason", "OOM")
            client.set_terminated(rid, {"failed": "FAILED", "pruned": "KILLED"}.get(status, "FINISHED"))
        client.set_terminated(pid, "FINISHED")
        ids[study] = pid
    return ids


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    ids = _fill_store(uri, root)
    return uri, ids, root


def test_mlflow_reader_builds_the_trial_table(store):
    uri, ids, _ = store
    trials, curves = load_trials_mlflow(parent_run_id=ids["quick"], tracking_uri=uri)
    rows = {r["trial_id"]: r for r in trials.to_pylist()}
    assert sorted(rows) == [f"quick_{i:03d}" for i in range(6)]  # not the other study's trials
    assert trials.schema.field("batch_size").type == pa.int64()
    assert trials.schema.field("temperature").type == pa.float64()
    assert trials.schema.field("loss").type == pa.string()
    assert trials.schema.field("seed").type == pa.int64()  # from the "repeat" param
    r1, r4, r5 = rows["quick_001"], rows["quick_004"], rows["quick_005"]
    assert r1["loss"] == "adnce" and r1["loss.mu"] == 0.5 and rows["quick_000"]["loss.mu"] is None
    assert r1["batch_size"] == 128 and math.isclose(r1["temperature"], 0.1)
    assert math.isclose(r1["knn_top1"], 0.31)  # the final (latest) value
    assert r1["train_loss"] == 2.0 and r1["derived.flops_per_image"] == 1e6
    assert r4["status"] == "pruned" and r4["epochs"] == 1  # epochs completed (metric "epoch")
    assert r5["status"] == "failed" and r5["failure_reason"] == "OOM" and r5["knn_top1"] is None
    assert r1["failure_reason"] is None
    meta = metadata_of(trials)
    assert meta[META_PARENT_RUN] == ids["quick"] and meta["scaling.metric"] == "knn_top1"
    space = search_space_of(trials)
    assert space["temperature"].log and not space["batch_size"].log  # the recorded scale wins
    assert set(curves.column_names) >= {"trial_id", "epoch", "knn_top1", "train_loss"}
    assert curves.num_rows == 4 * 3 + 1  # per-epoch rows, the pruned trial's single epoch too
    assert "wall_s" not in curves.column_names and "epochs" not in curves.column_names
    by_name, _ = load_trials_mlflow("quick", tracking_uri=uri)  # newest study of the experiment
    assert sorted(by_name.column("trial_id").to_pylist()) == sorted(rows)
    other, _ = load_trials_mlflow(parent_run_id=ids["other"], tracking_uri=uri)
    o1 = {r["trial_id"]: r for r in other.to_pylist()}["other_001"]
    assert o1["loss"] == "adnce" and o1["train_loss"] == 2.0  # metric "loss" does not clobber the loss
    assert o1["epochs"] == 3 and o1["seed"] == 0 and metadata_of(other)["scaling.metric"] == "knn_top1"
    assert search_space_of(other)["loss.mu"].condition == {"loss": ("adnce",)}


def test_mlflow_reader_errors_name_what_is_missing(store):
    uri, _, _ = store
    with pytest.raises(AnalysisError, match="experiment 'nope' does not exist.*quick"):
        load_trials_mlflow("nope", tracking_uri=uri)
    with pytest.raises(AnalysisError, match="run 'deadbeef' does not exist"):
        load_trials_mlflow(parent_run_id="deadbeef", tracking_uri=uri)


def test_analyze_from_mlflow_logs_report_to_the_parent_run(store, tmp_path):
    from mlflow.tracking import MlflowClient

    from analysis.report import analyze

    uri, ids, _ = store
    result = analyze(experiment="quick", tracking_uri=uri, out=tmp_path / "report")
    assert result["mlflow"] == {"parent_run_id": ids["quick"], "artifact_path": "analysis"}
    assert result["trials"]["failed"] == 1 and result["trials"]["pruned"] == 1
    client = MlflowClient(tracking_uri=uri)
    names = {a.path for a in client.list_artifacts(ids["quick"], "analysis")}
    assert {"analysis/sensitivity.json", "analysis/report.html", "analysis/figures"} <= names
    figs = {a.path for a in client.list_artifacts(ids["quick"], "analysis/figures")}
    assert "analysis/figures/sensitivity_temperature.png" in figs
    with pytest.raises(AnalysisError, match="does not exist"):
        analyze(experiment="missing", tracking_uri=uri, out=tmp_path / "never")
    assert not (tmp_path / "never").exists()  # nothing half-written on bad input
    # What `scaling run --analyze` does: the table from Parquet, the report to the parent run.
    trials, curves = load_trials_mlflow(parent_run_id=ids["other"], tracking_uri=uri)
    write_trials(tmp_path / "other", trials, curves)
    res = analyze(trials=tmp_path / "other", parent_run_id=ids["other"], tracking_uri=uri, out=tmp_path / "r2")
    assert res["mlflow"]["parent_run_id"] == ids["other"]
    assert "analysis/report.html" in {a.path for a in client.list_artifacts(ids["other"], "analysis")}
    with pytest.raises(AnalysisError, match="run 'nope' does not exist"):
        analyze(trials=tmp_path / "other", parent_run_id="nope", tracking_uri=uri, out=tmp_path / "never")
    assert not (tmp_path / "never").exists()
    np.testing.assert_equal(json.loads((tmp_path / "report" / "sensitivity.json").read_text())["metric"], "knn_top1")


def test_tracking_uri_credentials_are_redacted_before_they_reach_tables() -> None:
    from analysis.table import redact_uri

    assert redact_uri("https://alice:s3cret@mlflow.example:5000/x") == "https://***@mlflow.example:5000/x"
    assert redact_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
