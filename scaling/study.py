"""The study engine: Optuna samples, Ray Tune schedules, Ray Train trains, MLflow records.

Three layers (Ray's Train-inside-Tune pattern for Train V2, see NOTES.md):

1. ``scaling.worker.train_fn``: the per-worker function (DDP, global negatives).
2. ``scaling.trial.trial_driver``: the Tune trainable, one per trial; builds a ``TorchTrainer`` for the
   sampled config and forwards rank 0's per-epoch reports to Tune (``TuneReportCallback``).
   It reserves no CPU of its own (a custom ``scaling_trial`` resource, or 0.01 CPU on a cluster
   that lacks it), so drivers plus their workers never deadlock the cluster.
3. ``run_study`` / ``resume_study``: the ``Tuner`` with ``OptunaSearch`` (define-by-run space from
   ``scaling.space``), optional ``Repeater`` for seed repeats, ASHA on epochs, and two callbacks:
   MLflow tracking (``scaling.tracking``) and live progress.

A study lives in its own directory: the raw and resolved spec, ``study.json``, Tune's experiment
state (``tune/``), each trial's Ray Train checkpoints (``train/``) and at the end ``trials.parquet``
and ``curves.parquet`` (the TrialTable contract).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from ray import tune
from ray.tune.logger import JsonLoggerCallback
from rich.console import Console
from rich.live import Live
from rich.table import Table

from scaling.spec import StudySpec, SpecError, dump_resolved, is_remote_uri, load_spec, redact_uri
from scaling.tracking import (STOP_FLUSH_TIMEOUT_S, StudyTracker, TrackingError, active_tracker, connectable_uri,
                              resolve_tracking_uri)
from scaling.trial import trial_driver

TRIAL_RESOURCE = "scaling_trial"
RESULT_KEYS = ("train_loss", "knn_top1", "knn_top1_test", "linear_top1", "linear_top1_test", "alignment", "uniformity",
               "effective_rank", "samples_seen", "wall_s", "throughput", "last_lr")
# Ray Train's controller polls workers every 2 s by default; per-epoch reports would stall on it.
# A reused trial driver (``reuse_actors``) gets this long to abort a stopped trial's run (default 2 s).
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "RAY_TRAIN_V2_ENABLED": "1", "RAY_AIR_NEW_OUTPUT": "0",
           "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "RAY_DEDUP_LOGS": "0", "TUNE_FUNCTION_THREAD_TIMEOUT_S": "60"}


class StudyError(RuntimeError):
    """A study that cannot start or continue (exit status 2 at the CLI)."""


@dataclass(frozen=True)
class StudyResult:
    study_dir: Path
    trials: pa.Table
    curves: pa.Table
    best: dict[str, Any] | None
    raw_pixel_knn: float
    tracking_uri: str
    experiment_id: str | None
    parent_run_id: str | None
    ui_hint: str


# ---------------------------------------------------------------------------------------------
# resources


def trial_resources(spec: StudySpec) -> dict[str, float]:
    """What one trial needs from the cluster: its workers (the driver itself takes a trial slot)."""
    r = spec.resources
    return {"CPU": r.workers_per_trial * r.cpus_per_worker, "GPU": r.workers_per_trial * r.gpus_per_worker}


def check_fits(spec: StudySpec, cluster: dict[str, float]) -> int:
    """Refuse a study whose single trial can never fit; return how many trials may run at once."""
    need = trial_resources(spec)
    for key in ("CPU", "GPU"):
        if need[key] > cluster.get(key, 0.0) + 1e-9:
            raise SpecError(
                None, f"resources.{'cpus' if key == 'CPU' else 'gpus'}_per_worker",
                f"one trial needs {need[key]:g} {key} ({spec.resources.workers_per_trial} workers) "
                f"but the cluster has {cluster.get(key, 0.0):g}",
            )
    fits = [math.floor(cluster.get(k, 0.0) / need[k] + 1e-9) for k in ("CPU", "GPU") if need[k] > 0]
    concurrent = max(1, min(fits)) if fits else 1
    if spec.resources.max_concurrent_trials:
        concurrent = min(concurrent, spec.resources.max_concurrent_trials)
    return concurrent


def local_cluster_resources() -> dict[str, float]:
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def init_ray(address: str | None, concurrent: int, *, study_dir: Path) -> None:
    """Start (or join) Ray with the environment the trials need."""
    import ray

    os.environ.update(RAY_ENV)
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": dict(RAY_ENV)}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    else:
        ray.init(resources={TRIAL_RESOURCE: concurrent}, runtime_env=runtime_env, log_to_driver=False,
                 include_dashboard=True, dashboard_host="127.0.0.1", configure_logging=False)


# ---------------------------------------------------------------------------------------------
# callbacks (run in the Tune driver process)


def _trial_name(trial: Any) -> str:
    return str(trial)


def _error_reason(trial: Any) -> str:
    """The one-line reason of a trial's failure (the last ``SomeError: message`` line of its traceback)."""
    path = getattr(trial, "error_file", None)
    return failure_reason(Path(path).read_text(errors="replace") if path and Path(path).exists() else "")


_WRAPPERS = ("TrainingFailedError", "WorkerGroupError", "RayTaskError", "TuneError")
# What running out of memory looks like: torch's CPU allocator, CUDA, Ray's memory monitor (which kills
# the worker: its death message is all the driver gets).
_OOM = re.compile(r"OutOfMemoryError|out of memory|can't allocate memory|memory pressure|running low on memory", re.I)
_RAY_OOM = re.compile(r"memory pressure|running low on memory", re.I)


def failure_reason(text: str) -> str:
    """The one-line reason of a failed trial, from its traceback text.

    The innermost ``SomeError: message`` line, skipping Ray's wrapper errors; running out of memory,
    however it was reported, reads ``out of memory ...`` (with epoch and step when the worker knew them).
    """
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = re.match(r"^(?:[\w.]+\.)?(TrialOutOfMemoryError): (out of memory.*)$", ln)
        if m:
            return m.group(2)[:1000]
    ray_oom = next((ln for ln in lines if _RAY_OOM.search(ln)), None)
    if ray_oom is not None:
        return f"out of memory: the worker was killed by Ray's memory monitor ({ray_oom})"[:1000]
    for ln in reversed(lines):
        m = re.match(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception|Exit))(?:\(.*\))?: (.+)$", ln)
        if m and m.group(1) not in _WRAPPERS:
            if _OOM.search(ln):
                return f"out of memory: {m.group(2)}"[:1000]
            return f"{m.group(1)}: {m.group(2)}"[:1000]
    return (lines[-1] if lines else "unknown error")[:1000]


class TrackingCallback(tune.Callback):
    """Owns every child run's lifecycle; logs params at start, each epoch in one batch.

    Every call only queues writes for the study's MLflow writer (``scaling.tracking``): Tune's event
    loop never waits for the tracking server. The callback is pickled with Tune's experiment state,
    so it keeps the tracking URI redacted; the study's tracker, opened with the real URI by
    ``run_study``/``resume_study`` in this process, is looked up by the study directory.
    """

    def __init__(self, spec_json: dict[str, Any], tracking_uri: str, study_dir: str, names: Sequence[str]) -> None:
        self._args = (spec_json, redact_uri(tracking_uri), study_dir, list(names))
        self._tracker: StudyTracker | None = None

    def __getstate__(self) -> dict[str, Any]:  # the tracker is looked up again after a restore
        return {"_args": self._args}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._args, self._tracker = state["_args"], None

    @property
    def tracker(self) -> StudyTracker:
        if self._tracker is None:
            spec_json, tracking_uri, study_dir, _ = self._args
            tracker = active_tracker(study_dir)
            if tracker is None:  # a Tuner built without run_study (benchmarks): open the study here
                tracker = StudyTracker(StudySpec.model_validate(spec_json), tracking_uri=connectable_uri(tracking_uri))
                tracker.start_study(study_dir=Path(study_dir))
            self._tracker = tracker
        return self._tracker

    @property
    def names(self) -> list[str]:
        return self._args[3]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        params = {k: v for k, v in trial.config.items() if k in self.names}
        if "__trial_index__" in trial.config:
            params["repeat"] = trial.config["__trial_index__"]
        self.tracker.start_trial(_trial_name(trial), params)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        name = _trial_name(trial)
        if not self.tracker.has_trial(name):
            self.on_trial_start(iteration, trials, trial)
        derived = {k: v for k, v in result.items() if k.startswith("derived.")}
        if derived:
            self.tracker.log_params(name, derived)
            if "derived.node_id" in derived:  # where the trial ran, searchable as a tag
                self.tracker.set_trial_tags(name, {"scaling.node_id": str(derived["derived.node_id"])})
        metrics = {k: result[k] for k in RESULT_KEYS if k in result}
        self.tracker.log_epoch(name, metrics, epoch=int(result.get("epoch", result.get("training_iteration", 0))))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        status = "completed" if last.get("epoch", 0) >= last.get("target_epochs", math.inf) else "pruned"
        self.tracker.end_trial(_trial_name(trial), status=status)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        name = _trial_name(trial)
        if not self.tracker.has_trial(name):
            self.on_trial_start(iteration, trials, trial)
        self.tracker.end_trial(name, status="failed", reason=_error_reason(trial))


class ProgressCallback(tune.Callback):
    """Live view: trials running/completed/pruned/failed, best so far with its config, elapsed, ETA."""

    def __init__(self, spec_json: dict[str, Any], total: int, enabled: bool) -> None:
        self._args = (spec_json, total, enabled)
        self._spec = StudySpec.model_validate(spec_json)
        self._searched = self._spec.space.searched()
        self._live: Live | None = None
        self._start = time.time()
        self._best: tuple[float, str, dict] | None = None

    def __getstate__(self) -> dict[str, Any]:  # consoles do not pickle; rebuilt after a restore
        return {"_args": self._args}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(*state["_args"])

    def setup(self, **info: Any) -> None:
        self._start = time.time()
        if self._args[2]:
            self._live = Live(self._render([]), console=Console(stderr=True), refresh_per_second=2, transient=False)
            self._live.start()

    def _render(self, trials: list) -> Table:
        counts = {"running": 0, "completed": 0, "pruned": 0, "failed": 0, "pending": 0}
        for t in trials:
            if t.status == "RUNNING":
                counts["running"] += 1
            elif t.status == "ERROR":
                counts["failed"] += 1
            elif t.status == "TERMINATED":
                last = t.last_result or {}
                counts["completed" if last.get("epoch", 0) >= last.get("target_epochs", math.inf) else "pruned"] += 1
            else:
                counts["pending"] += 1
        done = counts["completed"] + counts["pruned"] + counts["failed"]
        elapsed = time.time() - self._start
        total = self._args[1]
        eta = (elapsed / done * (total - done)) if done else float("nan")
        table = Table(title=f"study {self._spec.name}", show_header=False, expand=False)
        table.add_row("trials", f"{done}/{total} done · {counts['running']} running · {counts['completed']} completed · "
                                f"{counts['pruned']} pruned · {counts['failed']} failed")
        if self._best:
            value, name, cfg = self._best
            short = ", ".join(f"{k}={_fmt(v)}" for k, v in cfg.items())
            table.add_row(f"best {self._spec.search.metric} (any epoch)", f"{value:.4f} ({name}: {short})")
        table.add_row("elapsed / ETA", f"{_hms(elapsed)} / {_hms(eta) if math.isfinite(eta) else '?'}")
        return table

    def _update(self, trials: list) -> None:
        if self._live is not None:
            self._live.update(self._render(trials))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        value = result.get(self._spec.search.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            best = self._best[0] if self._best else None
            if best is None or (value > best if self._spec.search.mode == "max" else value < best):
                cfg = {k: v for k, v in trial.config.items() if k in self._searched}
                self._best = (float(value), _trial_name(trial), cfg)
        self._update(trials)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trials)
        if not self._args[2]:  # no live view (a Ray Job's log, a pipe): one line per event
            print(f"[scaling] trial {_trial_name(trial)} started", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trials)
        if not self._args[2]:
            done = 1 + sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial)
            best = ""
            if self._best:  # the trials' tables and the summary keep each trial's final value instead
                best = f"; best {self._spec.search.metric} at any epoch {self._best[0]:.4f} ({self._best[1]})"
            print(f"[scaling] trial {_trial_name(trial)} finished: {done}/{self._args[1]} done{best}", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trials)
        print(f"[scaling] trial {_trial_name(trial)} failed: {_error_reason(trial)}", flush=True)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if iteration % 20 == 0:
            self._update(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._update(trials)
        if self._live is not None:
            self._live.stop()


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class SpaceSampler:
    """Picklable define-by-run function for OptunaSearch (Tune checkpoints the searcher)."""

    def __init__(self, space: Any) -> None:
        self.space = space

    def __call__(self, trial: Any) -> dict[str, Any]:
        from scaling.space import suggest

        # The Optuna trial number names the Tune trial: deterministic, and it survives a restore.
        return {**suggest(trial, self.space), "__number__": trial.number}


def trial_name(trial: Any) -> str:
    """Deterministic trial names: ``trial_0007`` from the Optuna trial number (``_r1`` for seed repeats)."""
    number = int(trial.config.get("__number__", 0))
    repeat = trial.config.get("__trial_index__")
    return f"trial_{number:04d}" + (f"_r{repeat}" if repeat is not None else "")


# ---------------------------------------------------------------------------------------------
# layer 3: the tuner


def _sampler(spec: StudySpec) -> Any:
    import optuna

    s, seed = spec.search, spec.search.seed
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.sampler == "grid":
        return optuna.samplers.GridSampler(spec.space.grid(), seed=seed)
    if s.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _objective(spec: StudySpec) -> tuple[str | list[str], str | list[str]]:
    if spec.search.sampler == "nsga2" and spec.search.objectives:
        return [m for m, _ in spec.search.objectives], [d for _, d in spec.search.objectives]
    return spec.search.metric, spec.search.mode


def num_samples(spec: StudySpec) -> int:
    trials = spec.search.trials
    if spec.search.sampler == "grid":
        trials = min(trials, spec.space.size() or trials)
    return trials * spec.search.repeats


def _build_tuner(spec: StudySpec, *, study_dir: Path, tracking_uri: str, concurrent: int, on_cluster: bool,
                 progress: bool, restore: bool) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter, Repeater
    from ray.tune.search.optuna import OptunaSearch

    space = spec.space
    names = space.names()
    r = spec.resources
    train_storage = str(study_dir / "train")
    trainable = tune.with_parameters(
        trial_driver, base=spec.trial.model_dump(mode="json"), names=names, workers=r.workers_per_trial,
        cpus_per_worker=r.cpus_per_worker, gpus_per_worker=r.gpus_per_worker, train_storage=train_storage,
        failures=2,
    )
    driver_resources = {"cpu": 0.01} if on_cluster else {"cpu": 0, TRIAL_RESOURCE: 1}
    trainable = tune.with_resources(trainable, driver_resources)
    if restore:
        return tune.Tuner.restore(str(study_dir / "tune"), trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)
    metric, mode = _objective(spec)
    searcher: Any = OptunaSearch(space=SpaceSampler(space), metric=metric, mode=mode,
                                 sampler=_sampler(spec))
    if spec.search.repeats > 1:
        searcher = Repeater(searcher, repeat=spec.search.repeats, set_index=True)
    searcher = ConcurrencyLimiter(searcher, max_concurrent=concurrent)
    sched = spec.search.scheduler
    if sched.kind == "asha" and spec.search.sampler != "nsga2":
        scheduler: Any = ASHAScheduler(time_attr="epoch", metric=spec.search.metric, mode=spec.search.mode,
                                       max_t=_max_epochs(spec), grace_period=sched.grace_period,
                                       reduction_factor=sched.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    spec_json = spec.model_dump(mode="json")
    callbacks = [
        JsonLoggerCallback(),  # result.json per trial: the per-epoch curves of the TrialTable
        TrackingCallback(spec_json, tracking_uri, str(study_dir), names),
        ProgressCallback(spec_json, num_samples(spec), progress),
    ]
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples(spec),
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_name,
                                    # one trial driver process per concurrent slot, not per trial
                                    reuse_actors=True),
        run_config=tune.RunConfig(name="tune", storage_path=str(study_dir), callbacks=callbacks, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )


def _max_epochs(spec: StudySpec) -> int:
    dim = spec.space.dims.get("epochs")
    if dim is None:
        return spec.train.epochs
    from scaling.space import Choice, Fixed

    if isinstance(dim, Fixed):
        return int(dim.value)
    if isinstance(dim, Choice):
        return int(max(dim.values))
    return int(dim.high)


# ---------------------------------------------------------------------------------------------
# public entry points


def new_study_dir(spec: StudySpec, storage: str | Path | None) -> Path:
    root = Path(storage or "studies").resolve()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = root / f"{spec.name}-{stamp}"
    n = 1
    while path.exists():
        path, n = root / f"{spec.name}-{stamp}-{n}", n + 1
    return path


def validate_tracking(spec: StudySpec, tracking_uri: str, address: str | None) -> None:
    remote_cluster = bool(address) and not address.startswith(("local", "127.0.0.1", "localhost", "auto"))
    if remote_cluster and not is_remote_uri(tracking_uri):
        raise SpecError(None, "tracking.uri", f"a remote Ray cluster needs an http(s):// MLflow server that every node "
                                              f"can reach, got {tracking_uri!r}: the study runs on the cluster's "
                                              f"nodes, which cannot write to a SQLite file or a directory on this "
                                              f"machine; start `mlflow server` (README: Running on a cluster) and "
                                              f"pass --tracking-uri http://MLFLOW_HOST:5000")


def run_study(spec: StudySpec, *, raw_spec: str | None = None, storage: str | Path | None = None,
              tracking_uri: str | None = None, address: str | None = None, progress: bool = True,
              study_dir: Path | None = None) -> StudyResult:
    """Run a whole study; returns its TrialTable. Python mirror of ``scaling run``."""
    tracking_uri = resolve_tracking_uri(tracking_uri or spec.tracking.uri)
    validate_tracking(spec, tracking_uri, address)
    study_dir = study_dir or new_study_dir(spec, storage)
    if not address:  # refuse a study whose trial can never fit before anything is written
        check_fits(spec, local_cluster_resources())
    study_dir.mkdir(parents=True, exist_ok=False)
    (study_dir / "spec.yaml").write_text(raw_spec if raw_spec is not None else dump_resolved(spec))
    (study_dir / "resolved.yaml").write_text(dump_resolved(spec))
    # Stored redacted: a password never lands on disk; `scaling resume` takes it from the environment.
    _write_json(study_dir / "study.json", {"name": spec.name, "spec_hash": spec.spec_hash(),
                                           "tracking_uri": redact_uri(tracking_uri), "address": address,
                                           "status": "running"})
    return _execute(spec, study_dir=study_dir, tracking_uri=tracking_uri, address=address, progress=progress,
                    restore=False, raw_spec=raw_spec)


def resume_study(study_dir: str | Path, *, address: str | None = None, progress: bool = True) -> StudyResult:
    """Continue an interrupted study: finished trials are kept, unfinished ones continue from checkpoints."""
    study_dir = Path(study_dir).resolve()
    info_path = study_dir / "study.json"
    if not info_path.is_file() or not (study_dir / "tune").is_dir():
        raise StudyError(f"{study_dir}: not a study directory (expected study.json and tune/ from `scaling run`)")
    info = json.loads(info_path.read_text())
    spec = load_spec(study_dir / "resolved.yaml")
    try:
        tracking_uri = connectable_uri(info["tracking_uri"])
    except TrackingError as exc:
        raise StudyError(f"{study_dir}: {exc}") from None
    return _execute(spec, study_dir=study_dir, tracking_uri=tracking_uri, address=address or info.get("address"),
                    progress=progress, restore=True, raw_spec=None)


def _execute(spec: StudySpec, *, study_dir: Path, tracking_uri: str, address: str | None, progress: bool,
             restore: bool, raw_spec: str | None) -> StudyResult:
    import ray

    cluster = None if address else local_cluster_resources()
    concurrent = check_fits(spec, cluster) if cluster else 1
    tracker = StudyTracker(spec, tracking_uri=tracking_uri, raw_spec=raw_spec)
    try:
        tracker.start_study(study_dir=study_dir)
    except TrackingError as exc:
        if not restore:  # a new study holds nothing yet but its spec files: leave no half-made study behind
            shutil.rmtree(study_dir, ignore_errors=True)
        raise StudyError(str(exc)) from None
    info = json.loads((study_dir / "study.json").read_text())
    info.update(experiment_id=tracker.experiment_id, parent_run_id=tracker.parent_run_id)
    _write_json(study_dir / "study.json", info)
    status = "FAILED"
    try:
        with _killed_on_sigterm(tracker):  # from here a stop closes the study's runs at once
            init_ray(address, concurrent, study_dir=study_dir)
            if address:
                total = ray.cluster_resources()
                concurrent = check_fits(spec, {"CPU": total.get("CPU", 0.0), "GPU": total.get("GPU", 0.0)})
                if total.get(TRIAL_RESOURCE):  # the cluster declares trial slots: never sample more than fit
                    concurrent = max(1, min(concurrent, int(total[TRIAL_RESOURCE])))
            on_cluster = bool(address) and TRIAL_RESOURCE not in ray.cluster_resources()
            tuner = _build_tuner(spec, study_dir=study_dir, tracking_uri=tracking_uri, concurrent=concurrent,
                                 on_cluster=on_cluster, progress=progress, restore=restore)
            grid = tuner.fit()
        trials, curves = results_to_tables(grid, spec)
        write_tables(study_dir, trials, curves)
        best = best_trial(trials, spec)
        summary = {"trials_total": trials.num_rows, **_status_counts(trials), "raw_pixel_knn_top1": raw_baseline(spec)}
        if best:
            summary[f"best_{spec.search.metric}"] = best[spec.search.metric]
            summary["best_trial"] = best["trial_id"]
        for name in ("trials.parquet", "curves.parquet"):
            tracker.log_artifact(study_dir / name, "tables")
        status = "FINISHED"
        info.update(status="finished")
        info.pop("tracking_pending", None)  # an earlier session's, replayed by start_study
        _write_json(study_dir / "study.json", info)
        left = tracker.end_study(status="FINISHED", summary=summary)
        if left:  # saved in tracking_pending.jsonl; `scaling resume` replays them
            info.update(tracking_pending=left)
            _write_json(study_dir / "study.json", info)
        return StudyResult(study_dir, trials, curves, best, summary["raw_pixel_knn_top1"], tracking_uri, tracker.experiment_id,
                           tracker.parent_run_id, tracker.experiment_url_hint())
    except BaseException as exc:
        if status != "FINISHED":
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                tracker.end_study(status="KILLED", timeout_s=STOP_FLUSH_TIMEOUT_S)
            else:  # a crash: the parent run says why
                reason = failure_reason("".join(traceback.format_exception_only(type(exc), exc)))
                tracker.end_study(status="FAILED", reason=reason, timeout_s=STOP_FLUSH_TIMEOUT_S)
        raise


@contextmanager
def _killed_on_sigterm(tracker: StudyTracker) -> Iterator[None]:
    """Close the study's runs as KILLED the moment SIGTERM arrives (`scaling stop` / `ray job stop` send
    SIGTERM and SIGKILL a few seconds later, too soon for Tune's own shutdown to reach our ``except``):
    the parent and every child run still open, after the writes already queued.

    ``ray.init`` installs SIGTERM handlers of its own (``ray._private.utils.set_sigterm_handler``, Ray
    2.60), whose ``sys.exit`` can be swallowed mid-start-up, leaving the parent run RUNNING. While this
    block runs, those installs are kept aside and ours stays in place; the last of Ray's is restored
    at the end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import ray._private.utils as ray_utils

    def on_sigterm(signum: int, frame: Any) -> None:
        try:
            tracker.end_study(status="KILLED", timeout_s=STOP_FLUSH_TIMEOUT_S)
        finally:
            raise SystemExit(128 + signum)

    def keep_aside(handler: Any) -> None:
        nonlocal previous
        previous = handler

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    ray_install, ray_utils.set_sigterm_handler = ray_utils.set_sigterm_handler, keep_aside
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = ray_install
        signal.signal(signal.SIGTERM, previous)


def raw_baseline(spec: StudySpec) -> float:
    """Validation kNN top-1 on raw pixels: the floor every trial's encoder is compared with."""
    from scaling.loop import load_data, raw_pixel_knn

    return raw_pixel_knn(load_data(spec.trial), k=spec.eval.knn_k, temperature=spec.eval.knn_temperature)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# TrialTable


def results_to_tables(grid: Any, spec: StudySpec) -> tuple[pa.Table, pa.Table]:
    """Tune's ResultGrid -> (trials, curves) per the TrialTable contract (DESIGN.md §4)."""
    space = spec.space
    names = space.names()
    metric = spec.search.metric
    base_flat = spec.trial.flat()
    rows: list[dict[str, Any]] = []
    curve_rows: list[dict[str, Any]] = []
    for result in grid:
        cfg = result.config or {}
        trial_id = Path(result.path).name if result.path else "?"
        df = result.metrics_dataframe
        history = df.to_dict("records") if df is not None and len(df) else []
        last = history[-1] if history else (result.metrics or {})
        status = "failed" if result.error else (
            "completed" if last.get("epoch", 0) >= last.get("target_epochs", math.inf) else "pruned")
        row: dict[str, Any] = {"study": spec.name, "trial_id": trial_id, "status": status}
        params = {k: v for k, v in cfg.items() if k in names}
        loss = params.get("loss", base_flat["loss"])
        for name in names:
            if name.startswith("loss."):
                row[name] = params.get(name) if name in params else None
            else:
                row[name] = params.get(name, base_flat.get(name))
        for fixed in ("batch_size", "temperature", "views", "loss", "lr", "epochs", "width", "fraction"):
            row.setdefault(fixed, base_flat[fixed])
        for k, v in base_flat.items():  # loss params of the chosen loss when fixed in the spec
            if k.startswith("loss.") and loss == spec.train.loss and row.get(k) is None:
                row[k] = v
        row["seed"] = spec.train.seed + int(cfg.get("__trial_index__", 0) or 0)
        for key in RESULT_KEYS:
            row[key] = _num(last.get(key))
        row["epochs_completed"] = int(last.get("epoch", 0) or 0)
        row["trial_wall_s"] = _num(last.get("time_total_s"))
        row["flops_per_image"] = _num(last.get("derived.flops_per_image")) or _first(history, "derived.flops_per_image")
        row["failure_reason"] = _result_error(result) if result.error else None
        row[metric] = _num(last.get(metric))
        rows.append(row)
        seen: set[int] = set()
        for rec in history:
            if "epoch" not in rec or _num(rec["epoch"]) is None or int(rec["epoch"]) in seen:
                continue  # a resumed trial reports its checkpoint's epochs again (worker: replay_history)
            seen.add(int(rec["epoch"]))
            curve_rows.append({"trial_id": trial_id, "epoch": int(rec["epoch"]),
                               **{k: _num(rec.get(k)) for k in RESULT_KEYS}})
    rows.sort(key=lambda r: r["trial_id"])
    curve_rows.sort(key=lambda r: (r["trial_id"], r["epoch"]))
    meta = {b"scaling.search_space": json.dumps(space.describe()).encode(),
            b"scaling.metric": metric.encode(), b"scaling.mode": spec.search.mode.encode()}
    trials = _to_table(rows).replace_schema_metadata(meta)
    curves = _to_table(curve_rows) if curve_rows else pa.table({"trial_id": pa.array([], pa.string()),
                                                                 "epoch": pa.array([], pa.int64())})
    return trials, curves


def _to_table(rows: list[dict[str, Any]]) -> pa.Table:
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    return pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _first(history: list[dict[str, Any]], key: str) -> float | None:
    for rec in history:
        if _num(rec.get(key)) is not None:
            return _num(rec.get(key))
    return None


def _result_error(result: Any) -> str:
    err = result.error
    text = "".join(traceback.format_exception_only(type(err), err)) if isinstance(err, BaseException) else str(err)
    return failure_reason(text)


def write_tables(study_dir: Path, trials: pa.Table, curves: pa.Table) -> None:
    """Write trials.parquet and curves.parquet atomically."""
    for name, table in (("trials.parquet", trials), ("curves.parquet", curves)):
        tmp = study_dir / f".{name}.tmp"
        pq.write_table(table, tmp)
        tmp.replace(study_dir / name)


def _status_counts(trials: pa.Table) -> dict[str, int]:
    statuses = trials.column("status").to_pylist() if trials.num_rows else []
    return {f"trials_{s}": statuses.count(s) for s in ("completed", "pruned", "failed")}


def best_trial(trials: pa.Table, spec: StudySpec) -> dict[str, Any] | None:
    metric, mode = spec.search.metric, spec.search.mode
    rows = [r for r in trials.to_pylist() if r.get(metric) is not None and r["status"] != "failed"]
    if not rows:
        return None
    return (max if mode == "max" else min)(rows, key=lambda r: r[metric])
