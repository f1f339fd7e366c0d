"""Every MLflow call of the platform: a parent run per study, a nested child run per trial.

One writer per study: the Tune driver process owns every run's lifecycle (workers never talk to
MLflow). ``start_study`` talks to MLflow directly; every later write goes through the study's
background writer (``scaling.tracking_writer``), which makes them in order, retries with backoff,
tells the user when the server goes away and comes back, and saves what it could not write in the
study directory (``tracking_pending.jsonl``) for ``scaling resume`` to replay. Every write can be
replayed safely, so a resumed study reuses its parent and child runs instead of duplicating them.
Metrics go out in batches (``log_batch``), one call per Tune result.

A tracking URI with ``user:password@`` is used to connect and shown or stored only redacted
(``redact_uri``/``redact_text``); a study directory keeps the redacted form and ``scaling resume``
takes the credentials from the environment (``connectable_uri``).

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
from urllib.parse import unquote, urlsplit, urlunsplit

from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from scaling.spec import StudySpec, dump_resolved, redact_uri
# PENDING_FILE and redact_text stay importable from here: callers and tests use them from this module.
from scaling.tracking_writer import (PARAM_LIMIT, PENDING_FILE, _quote, _read_pending, _say, _Writer,
                                     redact_text)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
FLUSH_TIMEOUT_S = 60.0  # how long the end of a study waits for buffered writes before saving them
STOP_FLUSH_TIMEOUT_S = 10.0  # the same on SIGTERM (`scaling stop` gives the driver RAY_JOB_STOP_WAIT_TIME_S)
_PACKAGES = ("scaling", "torch", "torchvision", "ray", "optuna", "mlflow", "pyarrow", "numpy")

# MLflow's HTTP client retries a failed call 7 times with backoff factor 2 (about 4 minutes) and
# waits 120 s for an answer: one write to a stopped server would hold the writer for minutes. The
# writer retries on its own, so one call should fail fast. ``setdefault``: the user's settings win.
# MLflow also prints "View run ... at: <tracking URI>" on every set_terminated: the URI may hold a
# password, and the study prints its own link.
MLFLOW_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


class TrackingError(RuntimeError):
    """The tracking server cannot be used to start or continue a study (the message holds no password)."""


def resolve_tracking_uri(uri: str | None, *, cwd: Path | None = None) -> str:
    """Absolute form of a tracking URI: Ray workers and resumed studies run from other directories."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    cwd = cwd or Path.cwd()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str((cwd / uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:  # a plain directory: MLflow's file store
        return str((cwd / uri).resolve())
    return uri


# ---------------------------------------------------------------------------------------------
# credentials


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """``https://user:pw@host/x`` -> (``https://host/x``, user, pw), decoded; (uri, None, None) without userinfo."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), unquote(user), unquote(password) if password else None


def connectable_uri(stored: str, env: Mapping[str, str] | None = None) -> str:
    """The URI to connect with, from the form a study directory stores (credentials redacted to ``***@``).

    The real credentials come from ``MLFLOW_TRACKING_URI`` (when it is the same URI, redacted) or from
    ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (MLflow sends them as basic auth).
    """
    if "***@" not in stored:
        return stored
    env = os.environ if env is None else env
    from_env = env.get("MLFLOW_TRACKING_URI")
    if from_env and redact_uri(from_env) == stored:
        return from_env
    if env.get("MLFLOW_TRACKING_USERNAME") or env.get("MLFLOW_TRACKING_TOKEN"):
        return stored.replace("***@", "", 1)
    raise TrackingError(f"the study tracks to {stored}, whose credentials are not stored with the study: set "
                        f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_URI with the "
                        f"credentials in it) and run the command again")


# ---------------------------------------------------------------------------------------------
# provenance


def package_versions() -> dict[str, str]:
    """Python's version and those of the installed packages the study depends on (recorded with it)."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit(path: Path | None = None) -> str | None:
    """The commit checked out at ``path`` (this package by default); None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path or Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# ---------------------------------------------------------------------------------------------
# the tracker

_ACTIVE: dict[str, "StudyTracker"] = {}  # study dir -> its tracker in this process


def active_tracker(study_dir: str | Path) -> "StudyTracker | None":
    """The tracker that opened this study in this process (the Tune callback shares its writer)."""
    return _ACTIVE.get(str(study_dir))


class StudyTracker:
    """MLflow bookkeeping of one study (runs in the Tune driver process).

    ``start_study`` talks to MLflow directly (a study does not start without its tracking server);
    every later write is queued for the study's writer thread and returns at once.
    """

    def __init__(self, spec: StudySpec, *, tracking_uri: str | None = None, raw_spec: str | None = None) -> None:
        self.spec = spec
        self.tracking_uri = resolve_tracking_uri(tracking_uri or spec.tracking.uri)
        if self.tracking_uri.startswith(("http://", "https://")):
            for key, value in MLFLOW_ENV.items():
                os.environ.setdefault(key, value)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)  # reads (and start_study's writes)
        self.raw_spec = raw_spec
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.study_dir: Path | None = None
        self.writer: _Writer | None = None
        self._children: dict[str, str] = {}
        self._started: set[str] = set()  # trials opened in this process
        self._open: set[str] = set()  # ... and not ended
        self._ended = False

    # -- study ------------------------------------------------------------------------------

    def start_study(self, *, study_dir: Path) -> str:
        """Create (or find, on resume) the experiment and the study's parent run; returns its id.

        Also starts the writer and queues the writes an earlier session left in the study directory.
        Raises TrackingError when MLflow cannot be reached.
        """
        try:
            run_id = self._open_study(study_dir)
        except TrackingError:
            raise
        except Exception as exc:  # MLflow's messages quote the URL, which may hold a password
            raise TrackingError(f"cannot open the study's MLflow runs at {redact_uri(self.tracking_uri)}: "
                                f"{redact_text(str(exc)).splitlines()[0][:500] if str(exc) else type(exc).__name__}") from None
        self.study_dir = Path(study_dir)
        pending = self.study_dir / PENDING_FILE if self.study_dir.is_dir() else None
        saved = _read_pending(pending) if pending is not None else []
        self.writer = _Writer(MlflowClient(tracking_uri=self.tracking_uri), display_uri=redact_uri(self.tracking_uri),
                              experiment_id=str(self.experiment_id), parent_run_id=run_id, children=self._children,
                              pending=pending)
        # Closing runs because the study stopped is undone by this very resume: drop those writes.
        replay = [op for op in saved if not op.get("on_stop")]
        if replay:
            _say(f"replaying {len(replay)} MLflow writes an earlier session could not make ({pending})")
        for op in replay:
            self.writer.put(op)
        _ACTIVE[str(study_dir)] = self
        return run_id

    def _open_study(self, study_dir: Path) -> str:
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
            if "scaling.failure_reason" in found[0].data.tags:
                self.client.delete_tag(self.parent_run_id, "scaling.failure_reason")
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
        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), PARAM_LIMIT):
            self.client.log_batch(self.parent_run_id, params=items[i:i + PARAM_LIMIT])
        self.client.log_text(self.parent_run_id, dump_resolved(self.spec), "spec/resolved.yaml")
        if self.raw_spec is not None:
            self.client.log_text(self.parent_run_id, self.raw_spec, "spec/spec.yaml")
        self.client.log_dict(self.parent_run_id, package_versions(), "spec/versions.json")
        return self.parent_run_id

    def end_study(self, *, status: str = "FINISHED", summary: Mapping[str, Any] | None = None,
                  reason: str | None = None, timeout_s: float = FLUSH_TIMEOUT_S) -> int:
        """Close the parent run with the right status (MLflow's exit handler would mark it FINISHED).

        A study that did not finish (KILLED: stopped; FAILED: crashed, with ``reason``) also closes the
        child runs of the trials still open, as KILLED with ``scaling.failure_reason`` saying so;
        ``scaling resume`` reopens them. Waits up to ``timeout_s`` for the writer; what is still unwritten
        is saved to the study directory and the user is told. Returns the number of writes left.
        Only the first call acts (the SIGTERM handler and the crash path both call it).
        """
        if self.parent_run_id is None or self.writer is None or self._ended:
            return 0
        self._ended = True
        stopped = status != "FINISHED"
        if stopped:
            why = "the study was stopped" if status == "KILLED" else "the study failed"
            for trial in sorted(self._open):
                self._put("tags", f"trial:{trial}", on_stop=True, tags={
                    "scaling.status": "failed",
                    "scaling.failure_reason": f"{why} before the trial ended; `scaling resume` continues it"})
                self._put("terminate", f"trial:{trial}", on_stop=True, status="KILLED")
            self._open.clear()
        if summary:
            metrics = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self._log_metrics("study", metrics, step=0)
            tags = {f"scaling.{k}": str(v)[:5000] for k, v in summary.items() if k not in metrics}
            if tags:
                self._put("tags", "study", tags=tags)
        if reason:
            self._put("tags", "study", on_stop=True, tags={"scaling.failure_reason": redact_text(reason)[:5000]})
        self._put("terminate", "study", on_stop=stopped, status=status)
        left = self.writer.flush(timeout_s)
        if left:
            saved = self.writer.save()
            where = self.study_dir / PENDING_FILE if self.study_dir else "?"
            _say(f"MLflow at {redact_uri(self.tracking_uri)} is still unreachable: {saved} writes saved to {where}; "
                 f"`scaling resume {self.study_dir}` replays them")
        return left

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

    def has_trial(self, trial_id: str) -> bool:
        """Whether ``start_trial`` was called for this trial in this process."""
        return trial_id in self._started

    def start_trial(self, trial_id: str, params: Mapping[str, Any]) -> None:
        """Queue the trial's child run: created once (found by tags), reopened when the trial continues."""
        assert self.experiment_id and self.parent_run_id, "start_study first"
        self._started.add(trial_id)
        self._open.add(trial_id)
        tags = {
            "mlflow.parentRunId": self.parent_run_id,
            "scaling.role": "trial",
            "scaling.study": self.spec.name,
            "scaling.trial_id": trial_id,
            "scaling.status": "running",
        }
        self._put_op({"op": "open_trial", "trial": trial_id, "tags": tags,
                      "params": {k: _param_value(v) for k, v in params.items()}})

    def log_params(self, trial_id: str, params: Mapping[str, Any]) -> None:
        """Parameters the run does not have yet (a restarted trial reports its derived values again)."""
        self._put("params", f"trial:{trial_id}", only_new=True, params={k: _param_value(v) for k, v in params.items()})

    def set_trial_tags(self, trial_id: str, tags: Mapping[str, str]) -> None:
        """Queue tags for the trial's run (values cut to MLflow's 5000 characters)."""
        self._put("tags", f"trial:{trial_id}", tags={k: str(v)[:5000] for k, v in tags.items()})

    def log_epoch(self, trial_id: str, metrics: Mapping[str, float], *, epoch: int) -> None:
        """Per-epoch metrics with step = epoch. An epoch already in the run's history is skipped."""
        self._log_metrics(f"trial:{trial_id}", {**metrics, "epoch": epoch}, step=epoch, epoch=epoch)

    def end_trial(self, trial_id: str, *, status: str, reason: str | None = None,
                  final: Mapping[str, float] | None = None) -> None:
        """Close a child run: status completed|pruned|failed (+ reason), final metrics."""
        if trial_id not in self._started and trial_id not in self._children:
            return
        if self._ended and trial_id not in self._open:
            return  # closed as KILLED by the study's stop; `scaling resume` finishes it
        self._open.discard(trial_id)
        if final:
            self._log_metrics(f"trial:{trial_id}", final, step=0)
        tags = {"scaling.status": status}
        if reason:
            tags["scaling.failure_reason"] = redact_text(reason)[:5000]
        self._put("tags", f"trial:{trial_id}", tags=tags)
        mlflow_status = {"completed": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}[status]
        self._put("terminate", f"trial:{trial_id}", status=mlflow_status)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        """A file of the study directory as an artifact of the parent run (queued: the file must stay)."""
        self._put("artifact", "study", path=str(path), dir=artifact_path)

    def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> int:
        """Wait for the writer; returns the number of writes not made yet."""
        return self.writer.flush(timeout_s) if self.writer else 0

    # -- queueing ------------------------------------------------------------------------------

    def _put(self, kind: str, run: str, **fields: Any) -> None:
        self._put_op({"op": kind, "run": run, **fields})

    def _put_op(self, op: dict[str, Any]) -> None:
        assert self.writer is not None, "start_study first"
        self.writer.put(op)

    def _log_metrics(self, run: str, metrics: Mapping[str, float], *, step: int, epoch: int | None = None) -> None:
        now = int(time.time() * 1000)  # fixed now: a replayed write is the same metric, not a second one
        items = [[k, float(v), now, step] for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if items:
            self._put("metrics", run, metrics=items, epoch=epoch)

    def experiment_url_hint(self) -> str:
        """The command that opens the MLflow UI on this study."""
        uri = self.tracking_uri
        if uri.startswith(("http://", "https://")):
            return f"open {redact_uri(uri)}/#/experiments/{self.experiment_id}/runs"
        return f"mlflow ui --backend-store-uri {uri}   # then open http://127.0.0.1:5000/#/experiments/{self.experiment_id}/runs"


def _param_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return s[:6000]

