"""Every MLflow call of the platform: a parent run per study, a nested child run per trial.

One writer per run: the Tune driver process owns every run's lifecycle (workers never talk to
MLflow). Runs are found by tags, so a resumed study reuses its parent and child runs instead of
duplicating them. Metrics go out in batches (``log_batch``), one call per Tune result.

Tags (relied on by ``analysis.table``):
  parent: ``scaling.role=study``, ``scaling.study``, ``scaling.spec_hash``, ``scaling.git_commit``
  child:  ``mlflow.parentRunId``, ``scaling.role=trial``, ``scaling.study``, ``scaling.trial_id``,
          ``scaling.status`` (running|completed|pruned|failed), ``scaling.failure_reason``
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from scaling.spec import StudySpec, dump_resolved, redact_uri

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PARAM_LIMIT = 100  # MLflow's log_batch limit on params per call
METRIC_LIMIT = 1000
_PACKAGES = ("scaling", "torch", "torchvision", "ray", "optuna", "mlflow", "pyarrow", "numpy")


def resolve_tracking_uri(uri: str | None, *, cwd: Path | None = None) -> str:
    """Absolute form of a tracking URI: Ray workers and resumed studies run from other directories."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    cwd = cwd or Path.cwd()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str((cwd / uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:  # a plain directory: MLflow's file store
        return str((cwd / uri).resolve())
    return uri


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit(path: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path or Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class StudyTracker:
    """MLflow bookkeeping of one study (runs in the Tune driver process)."""

    def __init__(self, spec: StudySpec, *, tracking_uri: str | None = None, raw_spec: str | None = None) -> None:
        self.spec = spec
        self.tracking_uri = resolve_tracking_uri(tracking_uri or spec.tracking.uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.raw_spec = raw_spec
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self._children: dict[str, str] = {}
        self._logged_epochs: dict[str, set[int]] = {}

    # -- study ------------------------------------------------------------------------------

    def start_study(self, *, study_dir: Path) -> str:
        """Create (or find, on resume) the experiment and the study's parent run; returns its id."""
        exp = self.client.get_experiment_by_name(self.spec.experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(self.spec.experiment)
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`scaling.role` = 'study' and tags.`scaling.study_dir` = '{_quote(str(study_dir))}'",
            max_results=1,
        )
        if found:
            self.parent_run_id = found[0].info.run_id
            self.client.update_run(self.parent_run_id, status="RUNNING")
            self._load_children()
            return self.parent_run_id
        tags = {
            "scaling.role": "study",
            "scaling.study": self.spec.name,
            "scaling.study_dir": str(study_dir),
            "scaling.spec_hash": self.spec.spec_hash(),
            "mlflow.runName": self.spec.name,
            **{f"scaling.version.{k}": v for k, v in package_versions().items()},
        }
        commit = git_commit()
        if commit:
            tags["scaling.git_commit"] = commit
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=self.spec.name)
        self.parent_run_id = run.info.run_id
        s = self.spec.search
        params = {
            "study.sampler": s.sampler, "study.trials": s.trials, "study.repeats": s.repeats, "study.seed": s.seed,
            "study.metric": s.metric, "study.mode": s.mode, "study.scheduler": s.scheduler.kind,
            "study.workers_per_trial": self.spec.resources.workers_per_trial,
            "study.tracking_uri": redact_uri(self.tracking_uri),
            "scaling.search_space": json.dumps(self.spec.space.describe(), sort_keys=True),
        }
        self._log_params(self.parent_run_id, params)
        self.client.log_text(self.parent_run_id, dump_resolved(self.spec), "spec/resolved.yaml")
        if self.raw_spec is not None:
            self.client.log_text(self.parent_run_id, self.raw_spec, "spec/spec.yaml")
        self.client.log_dict(self.parent_run_id, package_versions(), "spec/versions.json")
        return self.parent_run_id

    def end_study(self, *, status: str = "FINISHED", summary: Mapping[str, Any] | None = None) -> None:
        """Close the parent run with the right status (MLflow's exit handler would mark it FINISHED)."""
        if self.parent_run_id is None:
            return
        if summary:
            metrics = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self._log_metrics(self.parent_run_id, metrics, step=0)
            tags = {f"scaling.{k}": str(v) for k, v in summary.items() if k not in metrics}
            if tags:
                self.client.log_batch(self.parent_run_id, tags=[RunTag(k, v[:5000]) for k, v in tags.items()])
        self.client.set_terminated(self.parent_run_id, status=status)

    # -- trials -----------------------------------------------------------------------------

    def _load_children(self) -> None:
        assert self.experiment_id and self.parent_run_id
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
                max_results=1000, page_token=token,
            )
            for run in page:
                tid = run.data.tags.get("scaling.trial_id")
                if tid:
                    self._children[tid] = run.info.run_id
            token = page.token
            if not token:
                break

    def child_run(self, trial_id: str) -> str | None:
        return self._children.get(trial_id)

    def start_trial(self, trial_id: str, params: Mapping[str, Any]) -> str:
        """The trial's child run, created once; a resumed trial continues its run."""
        assert self.experiment_id and self.parent_run_id, "start_study first"
        run_id = self._children.get(trial_id)
        if run_id is not None:
            history = self.client.get_metric_history(run_id, "epoch")
            self._logged_epochs[trial_id] = {int(m.step) for m in history}
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, "scaling.status", "running")
            return run_id
        tags = {
            "mlflow.parentRunId": self.parent_run_id,
            "scaling.role": "trial",
            "scaling.study": self.spec.name,
            "scaling.trial_id": trial_id,
            "scaling.status": "running",
        }
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=trial_id)
        self._children[trial_id] = run.info.run_id
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, trial_id: str, params: Mapping[str, Any]) -> None:
        run_id = self._children[trial_id]
        existing = self.client.get_run(run_id).data.params
        self._log_params(run_id, {k: v for k, v in params.items() if k not in existing})

    def log_epoch(self, trial_id: str, metrics: Mapping[str, float], *, epoch: int) -> None:
        """Per-epoch metrics with step = epoch. Re-logging an epoch after a restore is skipped."""
        run_id = self._children[trial_id]
        logged = self._logged_epochs.setdefault(trial_id, set())
        if epoch in logged:
            return
        self._log_metrics(run_id, {**metrics, "epoch": epoch}, step=epoch)
        logged.add(epoch)

    def end_trial(self, trial_id: str, *, status: str, reason: str | None = None,
                  final: Mapping[str, float] | None = None) -> None:
        """Close a child run: status completed|pruned|failed (+ reason), final metrics."""
        run_id = self._children.get(trial_id)
        if run_id is None:
            return
        tags = [RunTag("scaling.status", status)]
        if reason:
            tags.append(RunTag("scaling.failure_reason", reason[:5000]))
        self.client.log_batch(run_id, tags=tags)
        mlflow_status = {"completed": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}[status]
        self.client.set_terminated(run_id, status=mlflow_status)

    # -- batching -----------------------------------------------------------------------------

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), PARAM_LIMIT):
            self.client.log_batch(run_id, params=items[i:i + PARAM_LIMIT])

    def _log_metrics(self, run_id: str, metrics: Mapping[str, float], *, step: int) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(items), METRIC_LIMIT):
            self.client.log_batch(run_id, metrics=items[i:i + METRIC_LIMIT])

    def experiment_url_hint(self) -> str:
        """The command that opens the MLflow UI on this study."""
        uri = self.tracking_uri
        if uri.startswith(("http://", "https://")):
            return f"open {redact_uri(uri)}/#/experiments/{self.experiment_id}/runs"
        return f"mlflow ui --backend-store-uri {uri}   # then open http://127.0.0.1:5000/#/experiments/{self.experiment_id}/runs"


def _param_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return s[:6000]


def _quote(s: str) -> str:
    return s.replace("'", "\\'")

