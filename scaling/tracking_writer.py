"""The study's MLflow writer: one background thread that makes every write of a study, in order.

Guarantees (``_Writer``):

* One ordered writer thread per study. Callers only append to its queue and return at once, so a
  slow or unreachable tracking server never stalls Tune's event loop; writes are made in the order
  they were queued, and one leaves the queue only once MLflow accepted it.
* Idempotent writes: a child run is found by its tags before one is created, metrics carry the
  timestamp of their first attempt, epochs already in a run's history are skipped and parameters
  already logged are not sent again, so a retried or replayed write duplicates no run, epoch or parameter.
* Retry with backoff: a transient failure (server down, timeout, 5xx, a locked database) is retried
  with a growing delay (0.5 s to 5 s); a write no retry can fix is reported and dropped.
* The user is warned once when the server becomes unreachable and once when it has recovered.
* Writes still unwritten are saved to the study directory (``PENDING_FILE``): kept up to date during
  an outage and at interpreter exit, so even a killed driver loses nothing it had buffered; the next
  session on the study reads them back (``_read_pending``) and replays them.

This module must not import ``scaling.tracking`` (which builds on it).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Mapping

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

PARAM_LIMIT = 100  # MLflow's log_batch limit on params per call
METRIC_LIMIT = 1000
PENDING_FILE = "tracking_pending.jsonl"

# MLflow error codes that no retry can fix (the request itself is wrong): reported and dropped.
_CLIENT_ERRORS = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                            "BAD_REQUEST", "INVALID_STATE", "FEATURE_DISABLED", "ENDPOINT_NOT_FOUND", "NOT_FOUND"})


# Here, not in scaling.tracking (which re-exports it): the writer's reports must hide passwords too,
# and the writer cannot import scaling.tracking without a cycle.
_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"]+@")


def redact_text(text: str) -> str:
    """Every ``scheme://user:password@`` in a message becomes ``scheme://***@`` (MLflow's errors quote the URL)."""
    return _USERINFO.sub(r"\1***@", text)


def _say(message: str) -> None:
    """A message for the user, on stderr, flushed at once."""
    print(f"[scaling] {message}", file=sys.stderr, flush=True)


def _transient(exc: BaseException) -> bool:
    """Whether a failed write may succeed later (server down, timeout, 5xx, a locked database)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code not in _CLIENT_ERRORS
    return isinstance(exc, (requests.RequestException, ConnectionError, TimeoutError))


def _short_error(exc: BaseException) -> str:
    """What went wrong, in a few words (MLflow's messages run to the whole urllib3 retry history)."""
    text = redact_text(str(exc))
    for needle, short in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Name or service not known", "unknown host"), ("RemoteDisconnected", "connection dropped")):
        if needle in text:
            return short
    return (text.splitlines() or [type(exc).__name__])[0][:160]


class _Rejected(Exception):
    """A write that can never succeed (its run is gone, its file is missing)."""


class _Writer:
    """One thread, one ordered queue of JSON-serialisable write operations for one study.

    An operation is a dict ``{"op": kind, "run": "study" | "trial:<id>", ...}``; it leaves the queue
    only once MLflow accepted it, so the queue (saved to ``pending``) is always the set of writes not
    yet made. Kinds: ``open_trial``, ``params``, ``metrics``, ``tags``, ``terminate``, ``artifact``.
    """

    def __init__(self, client: MlflowClient, *, display_uri: str, experiment_id: str, parent_run_id: str,
                 children: dict[str, str], pending: Path | None, say: Callable[[str], None] = _say) -> None:
        self.client, self.display_uri, self.say = client, display_uri, say
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.children = children  # trial id -> run id (the writer adds the runs it creates)
        self.pending = pending
        self.written = 0
        self.rejected: list[str] = []
        self._ops: deque[dict[str, Any]] = deque()
        self._busy = False
        # Reentrant: the SIGTERM handler (main thread) may enqueue while the main thread is inside put().
        self._cond = threading.Condition(threading.RLock())
        self._save_lock = threading.Lock()
        self._epochs: dict[str, set[int]] = {}  # trial id -> epochs in its run's history
        self._created: set[str] = set()  # trials whose create_run was attempted (search before trying again)
        self._down_since: float | None = None
        self._down_wall: str = ""
        self._replayed_since_recovery = 0
        self._recovering = False
        self._saved_at = 0.0
        self._file_written = pending is not None and pending.exists()
        self._thread = threading.Thread(target=self._loop, name="scaling-mlflow-writer", daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)

    # -- the public side (any thread) --------------------------------------------------------

    def put(self, op: dict[str, Any]) -> None:
        """Queue one write; returns at once."""
        with self._cond:
            self._ops.append(op)
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._ops)

    def flush(self, timeout_s: float) -> int:
        """Wait until every queued write is made or ``timeout_s`` passed; returns how many are left."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while (self._ops or self._busy) and time.monotonic() < deadline:
                self._cond.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            return len(self._ops)

    def save(self) -> int:
        """Write the queue to the pending file atomically (or remove the file when nothing is left)."""
        if self.pending is None:
            return len(self._ops)
        with self._save_lock:
            with self._cond:
                ops = list(self._ops)
            if not ops:
                if self._file_written:
                    self.pending.unlink(missing_ok=True)
                    self._file_written = False
                return 0
            tmp = self.pending.with_name(f".{self.pending.name}.tmp")
            with open(tmp, "w") as f:
                f.writelines(json.dumps(op, sort_keys=True) + "\n" for op in ops)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self.pending)
            self._file_written = True
            self._saved_at = time.monotonic()
            return len(ops)

    def _at_exit(self) -> None:  # the interpreter is leaving: keep what could not be written
        if self._ops:
            self.flush(2.0)
            self.save()

    # -- the thread ----------------------------------------------------------------------------

    def _loop(self) -> None:
        delay = 0.0
        while True:
            with self._cond:
                while not self._ops:
                    self._cond.wait()
                op = self._ops[0]
                self._busy = True  # until the op's bookkeeping (the pending file included) is done
            try:
                self._apply(op)
            except Exception as exc:  # noqa: BLE001 - every failure is either retried or reported
                if _transient(exc) and not isinstance(exc, _Rejected):
                    self._went_down(exc)
                    delay = min(5.0, max(0.5, 2 * delay))
                    time.sleep(delay)
                    continue
                reason = redact_text(f"{type(exc).__name__}: {exc}")[:300]
                self.rejected.append(f"{op['op']} {op.get('run', op.get('trial', ''))}: {reason}")
                self.say(f"MLflow refused a write ({op['op']} for {op.get('run', op.get('trial', '?'))}), "
                         f"dropped: {reason}")
            else:
                self.written += 1
            delay = 0.0
            with self._cond:
                self._ops.popleft()
                left = len(self._ops)
            if self._down_since is not None:
                self._recovering, self._down_since = True, None
            if self._recovering:
                self._replayed_since_recovery += 1
                if not left:
                    self.say(f"MLflow at {self.display_uri} recovered (unreachable since {self._down_wall}); "
                             f"{self._replayed_since_recovery} buffered writes replayed")
                    self._recovering, self._replayed_since_recovery = False, 0
            if not left and self._file_written:
                self.save()  # everything made: the pending file goes
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _went_down(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self._down_since is None and not self._recovering:
            self._down_since = now
            self._down_wall = time.strftime("%H:%M:%S")
            first = _short_error(exc)
            self.say(f"MLflow at {self.display_uri} unreachable since {self._down_wall}; {len(self._ops)} writes "
                     f"buffered, retrying in the background ({first})")
        elif self._down_since is None:  # failed again while replaying: still the same outage
            self._down_since, self._recovering = now, False
        if now - self._saved_at > 2.0:
            self.save()  # a driver killed during the outage loses nothing it had buffered

    # -- operations --------------------------------------------------------------------------

    def _run_id(self, ref: str) -> str:
        if ref == "study":
            return self.parent_run_id
        trial = ref.removeprefix("trial:")
        run_id = self.children.get(trial) or self._find_child(trial)
        if run_id is None:
            raise _Rejected(f"no MLflow run for {trial}")
        return run_id

    def _find_child(self, trial: str) -> str | None:
        found = self.client.search_runs(
            [self.experiment_id], max_results=1,
            filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and tags.`scaling.trial_id` = '{_quote(trial)}'",
        )
        if found:
            self.children[trial] = found[0].info.run_id
            return found[0].info.run_id
        return None

    def _apply(self, op: dict[str, Any]) -> None:
        kind = op["op"]
        if kind == "open_trial":
            self._open_trial(op["trial"], op["tags"], op["params"])
            return
        run_id = self._run_id(op["run"])
        c = self.client
        if kind == "params":
            params = op["params"]
            if op.get("only_new"):
                existing = c.get_run(run_id).data.params
                params = {k: v for k, v in params.items() if k not in existing}
            self._log_params(run_id, params)
        elif kind == "metrics":
            epoch = op.get("epoch")
            trial = op["run"].removeprefix("trial:")
            if epoch is not None:
                logged = self._epochs.get(trial)
                if logged is None:  # a run from an earlier session: skip what its history has
                    logged = self._epochs[trial] = {int(m.step) for m in c.get_metric_history(run_id, "epoch")}
                if epoch in logged:
                    return
            items = [Metric(k, v, ts, step) for k, v, ts, step in op["metrics"]]
            for i in range(0, len(items), METRIC_LIMIT):
                c.log_batch(run_id, metrics=items[i:i + METRIC_LIMIT])
            if epoch is not None:
                self._epochs[trial].add(epoch)
        elif kind == "tags":
            c.log_batch(run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()])
        elif kind == "terminate":
            c.set_terminated(run_id, status=op["status"])
        elif kind == "artifact":
            if not Path(op["path"]).is_file():
                raise _Rejected(f"{op['path']} is gone")
            c.log_artifact(run_id, op["path"], op.get("dir"))
        else:
            raise _Rejected(f"unknown operation {kind!r}")

    def _open_trial(self, trial: str, tags: dict[str, str], params: dict[str, str]) -> None:
        c = self.client
        run_id = self.children.get(trial)
        if run_id is None and trial in self._created:  # an earlier attempt may have created it
            run_id = self._find_child(trial)
        if run_id is None:
            self._created.add(trial)
            run_id = c.create_run(self.experiment_id, tags=tags, run_name=trial).info.run_id
            self.children[trial] = run_id
            self._epochs[trial] = set()
            self._log_params(run_id, params)
            return
        run = c.get_run(run_id)  # a trial that continues (restart, resume): reopen its run
        if run.info.status != "RUNNING":
            c.update_run(run_id, status="RUNNING")
        c.set_tag(run_id, "scaling.status", "running")
        if "scaling.failure_reason" in run.data.tags:  # left by a stopped study
            c.delete_tag(run_id, "scaling.failure_reason")
        self._log_params(run_id, {k: v for k, v in params.items() if k not in run.data.params})

    def _log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), PARAM_LIMIT):
            self.client.log_batch(run_id, params=items[i:i + PARAM_LIMIT])


def _read_pending(path: Path) -> list[dict[str, Any]]:
    """The writes an earlier session saved with ``_Writer.save``, in order (none when there is no file)."""
    if not path.is_file():
        return []
    ops = []
    for line in path.read_text().splitlines():
        try:
            ops.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line cannot happen (atomic replace), but never crash on it
            continue
    return ops


def _quote(s: str) -> str:
    """A value for a single-quoted string in an MLflow search filter."""
    return s.replace("'", "\\'")
