"""Studies on an existing Ray cluster, through the Ray Jobs API (the dashboard, port 8265).

``submit`` ships the project code and the resolved spec as the job's ``working_dir`` and runs
``python -m scaling.cli run <spec> --address auto`` on the head node; the trials then spread over
every node of the cluster. ``job_status``, ``job_logs``, ``follow``, ``stop_job`` and ``list_jobs``
are thin wrappers over ``ray.job_submission.JobSubmissionClient``.

Token authentication (as Ray 2.60 implements it): the token is read like Ray does, from ``RAY_AUTH_TOKEN``, the
file named by ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, and sent as
``Authorization: Bearer <token>``. A cluster that answers 401/403, or does not answer at all,
raises :class:`ClusterError` with a message that says what to set.

What every node must see: the MLflow server (an ``http(s)://`` tracking URI, never a local SQLite
file) and the study storage (``--storage``: a shared directory; on a one-machine cluster the local
``./studies`` is fine). The job's Python is the cluster's: start the nodes from the project's
environment; nothing is pip-installed into the job.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import secrets
import shlex
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from scaling.spec import SpecError, StudySpec, dump_resolved, redact_uri

__all__ = ["EXCLUDES", "TERMINAL", "ClusterError", "JobSummary", "Submission", "Token", "dashboard_url",
           "find_token", "follow", "job_logs", "job_status", "list_jobs", "stop_job", "submit"]

# Never shipped to the cluster (the job's working_dir is the project minus these). As in .gitignore, a
# leading "/" anchors at the project root; other patterns match a name at any depth (so /data drops
# the project's datasets but keeps the scaling/data package).
EXCLUDES = ("/.venv", "/.git", "/data", "/mlruns", "/mlartifacts", "/mlflow.db", "/studies", "/reports",
            "/benchmarks/results", "/.gl", "/.whl", "__pycache__", "*.pyc", "*.egg-info", ".mypy_cache",
            ".ruff_cache", ".pytest_cache", ".hypothesis", ".ipynb_checkpoints")
MAX_WORKING_DIR_BYTES = 50 * 2**20
JOB_SPEC_DIR = "_job"  # where the resolved spec lands inside the job's working_dir
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
# COLUMNS: the job's log is no terminal: keep rich from wrapping paths at 80 columns.
# RAY_JOB_STOP_WAIT_TIME_S: `ray job stop` sends SIGTERM, then SIGKILL after this many seconds (Ray's
# default 3): time for the driver to close the study's MLflow runs as KILLED (read by the job's supervisor).
JOB_ENV = {"COLUMNS": "200", "RAY_JOB_STOP_WAIT_TIME_S": "20"}
_TOKEN_HELP = ("set RAY_AUTH_TOKEN=<token>, or RAY_AUTH_TOKEN_PATH=<file with the token>, or put the token in "
               "~/.ray/auth_token (on the head node `ray get-auth-token` prints it)")


class ClusterError(RuntimeError):
    """The cluster cannot be reached, refused the request, or the job cannot be found."""


@dataclass(frozen=True)
class Token:
    value: str
    source: str  # where it was found, for error messages (never the token itself)


@dataclass(frozen=True)
class Submission:
    job_id: str
    address: str
    entrypoint: str
    tracking_uri: str
    storage: str
    experiment: str


@dataclass(frozen=True)
class JobSummary:
    job_id: str
    status: str
    message: str
    study: str | None
    entrypoint: str
    start_time: datetime | None
    end_time: datetime | None

    @property
    def duration_s(self) -> float | None:
        if self.start_time is None:
            return None
        end = self.end_time or datetime.now()
        return (end - self.start_time).total_seconds()


# ---------------------------------------------------------------------------------------------
# addresses and tokens


def dashboard_url(address: str) -> str:
    """The ``http://HOST:PORT`` of a Ray dashboard; a bare ``HOST:PORT`` gets ``http://``.

    Raises ValueError for addresses the Jobs API cannot use (``auto``, ``ray://``, a GCS port given
    without scheme is accepted but will not answer like a dashboard).
    """
    a = (address or "").strip().rstrip("/")
    if not a:
        raise ValueError("--address: expected the Ray dashboard address, e.g. http://HEAD:8265")
    if a == "auto" or a.startswith(("ray://", "local")):
        raise ValueError(f"--address: {address!r} is not a Jobs API address; give the head's dashboard, "
                         f"e.g. http://HEAD:8265")
    if "://" not in a:
        a = "http://" + a
    url = urlparse(a)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"--address: expected http(s)://HOST:PORT of the Ray dashboard, got {address!r}")
    return a


def is_loopback(url: str) -> bool:
    """Whether a URL points at this machine (then local paths are visible to every node)."""
    host = urlparse(url if "://" in url else "http://" + url).hostname or ""
    if host in ("localhost", socket.gethostname()):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def find_token(env: Mapping[str, str] | None = None) -> Token | None:
    """The Ray auth token, looked up in Ray's order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return Token(env["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    path = env.get("RAY_AUTH_TOKEN_PATH")
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={p} names no file; {_TOKEN_HELP}")
        return Token(p.read_text().strip(), f"RAY_AUTH_TOKEN_PATH={p}")
    home = Path(env.get("HOME") or Path.home()) / ".ray" / "auth_token"
    if home.is_file():
        return Token(home.read_text().strip(), str(home))
    return None


def _refused(url: str, token: Token | None, status: int) -> ClusterError:
    if token is None or status == 401:
        return ClusterError(f"the Ray cluster at {url} requires an auth token and none was sent (401); {_TOKEN_HELP}")
    return ClusterError(f"the Ray cluster at {url} refused the auth token from {token.source} (403: wrong token); "
                        f"{_TOKEN_HELP}")


@contextmanager
def _talking_to(url: str, token: Token | None) -> Iterator[None]:
    """Turn the Jobs SDK's failures into ClusterErrors that say what to do."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:  # the SDK's 401/403
        raise _refused(url, token, 401 if "required" in str(exc).lower() else 403) from None
    except (ConnectionError, requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise ClusterError(f"cannot reach the Ray dashboard at {url} ({type(exc).__name__}); check that the head "
                           f"is running (`ray start --head --dashboard-host 0.0.0.0`), that --address is its "
                           f"dashboard address (port 8265 by default) and that no firewall blocks it") from None
    except RuntimeError as exc:  # the SDK's "Request failed with status code N: ..."
        m = re.search(r"status code (\d+): (.*)", str(exc), re.S)
        if m and m.group(1) == "404":
            raise ClusterError(f"{url}: {m.group(2).strip().rstrip('.')}") from None
        raise ClusterError(f"{url}: {exc}") from None


def _preflight(url: str, headers: dict[str, str], token: Token | None, timeout_s: float) -> None:
    """One bounded request first: the SDK's own requests have no timeout and hang on a silent host."""
    import requests

    with _talking_to(url, token):
        r = requests.get(f"{url}/api/version", headers=headers, timeout=timeout_s)
    if r.status_code in (401, 403):
        raise _refused(url, token, r.status_code)
    if r.status_code != 200:
        raise ClusterError(f"{url}/api/version answered {r.status_code}: is --address the Ray dashboard "
                           f"(port 8265 by default) of a Ray >= 2.0 head?")


@dataclass(frozen=True)
class _Jobs:
    """A JobSubmissionClient plus what its error messages need (the URL, where the token came from)."""

    client: Any
    url: str
    token: Token | None

    def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with _talking_to(self.url, self.token):
            return getattr(self.client, method)(*args, **kwargs)


def _connect(address: str, token: Token | None = None, *, timeout_s: float = 15.0) -> _Jobs:
    from ray.job_submission import JobSubmissionClient

    url = dashboard_url(address)
    token = token if token is not None else find_token()
    headers = {"Authorization": f"Bearer {token.value}"} if token else {}
    _preflight(url, headers, token, timeout_s)
    with _talking_to(url, token):
        return _Jobs(JobSubmissionClient(url, headers=headers), url, token)


# ---------------------------------------------------------------------------------------------
# submit


def project_root() -> Path:
    """The checkout this package runs from (its code is what the job ships)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file() or not (root / "scaling" / "cli.py").is_file():
        raise ClusterError(f"submit ships the project checkout, but scaling is installed from {root} "
                           f"(no pyproject.toml there); run it from a checkout (`pip install -e .`)")
    return root


def _excluded(rel: str, name: str) -> bool:
    return any(rel == pat[1:] if pat.startswith("/") else fnmatch.fnmatch(name, pat) for pat in EXCLUDES)


def stage_working_dir(spec: StudySpec, dest: Path, *, project: Path | None = None) -> str:
    """Copy the project (minus EXCLUDES) and the resolved spec into ``dest``; returns the spec's relative path.

    The resolved spec is self-contained (search space inlined, overrides applied), so the job runs
    exactly what was validated here, wherever the spec file lived.
    """
    project = project or project_root()
    total = 0
    for dirpath, dirnames, filenames in os.walk(project):
        rel_dir = os.path.relpath(dirpath, project)
        rel_dir = "" if rel_dir == "." else rel_dir
        dirnames[:] = [d for d in dirnames if not _excluded(os.path.join(rel_dir, d), d)]
        for f in filenames:
            rel = os.path.join(rel_dir, f)
            src = Path(dirpath) / f
            if _excluded(rel, f) or not src.is_file():
                continue
            total += src.stat().st_size
            if total > MAX_WORKING_DIR_BYTES:
                raise ClusterError(f"the job's working_dir ({project}, minus {', '.join(EXCLUDES)}) exceeds "
                                   f"{MAX_WORKING_DIR_BYTES >> 20} MiB at {rel}; keep data and results out of the "
                                   f"project directory (datasets belong on shared storage, see README)")
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.name) or "study"
    rel_spec = f"{JOB_SPEC_DIR}/{name}.yaml"
    (dest / JOB_SPEC_DIR).mkdir(exist_ok=True)
    (dest / rel_spec).write_text(dump_resolved(spec))
    return rel_spec


def resolve_storage(storage: str | Path | None, url: str) -> str:
    """The absolute study storage directory the job writes to (it must be visible on every node)."""
    if storage is None:
        if not is_loopback(url):
            raise SpecError(None, "--storage", "a cluster on other machines needs a directory every node can see "
                                               "(an NFS or other shared mount), e.g. --storage /mnt/shared/studies")
        return str(Path("studies").resolve())
    s = str(storage)
    if "://" in s:
        raise SpecError(None, "--storage", f"expected a directory path mounted on every node, got {s!r}")
    return str(Path(s).expanduser().resolve())


def job_id_for(spec: StudySpec) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", spec.name).strip("-")[:40] or "study"
    return f"scaling-{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def submit(spec: StudySpec, *, address: str, tracking_uri: str | None = None, storage: str | Path | None = None,
           python: str = "python", token: Token | None = None, project: Path | None = None) -> Submission:
    """Submit a study as a Ray Job; returns at once with the job id.

    Raises SpecError for input that cannot work on a cluster (a local tracking store, a storage that
    is not shared) before contacting it, ClusterError when the cluster is unreachable or refuses.
    """
    from scaling.study import validate_tracking
    from scaling.tracking import resolve_tracking_uri

    url = dashboard_url(address)
    tracking = resolve_tracking_uri(tracking_uri or spec.tracking.uri)
    validate_tracking(spec, tracking, url)
    if is_loopback(tracking) and not is_loopback(url):
        raise SpecError(None, "--tracking-uri", f"{redact_uri(tracking)} points at this machine, but the cluster's "
                                                f"nodes would look on their own; give the MLflow server's network "
                                                f"address, e.g. http://MLFLOW_HOST:5000")
    store = resolve_storage(storage, url)
    jobs = _connect(url, token)
    job_id = job_id_for(spec)
    with tempfile.TemporaryDirectory(prefix="scaling-job-") as tmp:
        rel_spec = stage_working_dir(spec, Path(tmp), project=project)
        entrypoint, metadata, env_vars = job_request(spec, rel_spec=rel_spec, tracking_uri=tracking, storage=store,
                                                     python=python)
        jobs("submit_job", entrypoint=entrypoint, submission_id=job_id, metadata=metadata,
             runtime_env={"working_dir": tmp, "env_vars": env_vars})
    return Submission(job_id, url, entrypoint, redact_uri(tracking), store, spec.experiment)


def job_request(spec: StudySpec, *, rel_spec: str, tracking_uri: str, storage: str,
                python: str = "python") -> tuple[str, dict[str, str], dict[str, str]]:
    """The job's entrypoint, metadata and environment.

    The entrypoint and metadata are shown by `ray job list`, the dashboard and `scaling status`: a
    password in the tracking URI is taken out of both and handed to the job as MLflow's own
    ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (runtime_env ``env_vars``); MLflow sends
    them as basic auth to the URI without them.
    """
    from scaling.tracking import split_credentials

    bare, user, password = split_credentials(tracking_uri)
    env_vars = dict(JOB_ENV)
    if user is not None:
        env_vars["MLFLOW_TRACKING_USERNAME"] = user
        if password is not None:
            env_vars["MLFLOW_TRACKING_PASSWORD"] = password
    entrypoint = " ".join([
        shlex.quote(python), "-m", "scaling.cli", "run", shlex.quote(rel_spec), "--address", "auto",
        "--tracking-uri", shlex.quote(bare), "--storage", shlex.quote(storage), "--no-progress",
    ])
    metadata = {"scaling.study": spec.name, "scaling.experiment": spec.experiment,
                "scaling.spec_hash": spec.spec_hash(), "scaling.tracking_uri": redact_uri(tracking_uri),
                "scaling.storage": storage}
    return entrypoint, metadata, env_vars


# ---------------------------------------------------------------------------------------------
# status, logs, stop, list


def _summary(info: Any) -> JobSummary:
    def ts(ms: int | None) -> datetime | None:
        return datetime.fromtimestamp(ms / 1000) if ms else None

    return JobSummary(job_id=info.submission_id or info.job_id or "?", status=str(info.status),
                      message=info.message or "", study=(info.metadata or {}).get("scaling.study"),
                      entrypoint=info.entrypoint, start_time=ts(info.start_time), end_time=ts(info.end_time))


def job_status(address: str, job_id: str, *, token: Token | None = None) -> JobSummary:
    return _summary(_connect(address, token)("get_job_info", job_id))


def job_logs(address: str, job_id: str, *, token: Token | None = None) -> str:
    return str(_connect(address, token)("get_job_logs", job_id))


def stop_job(address: str, job_id: str, *, token: Token | None = None) -> bool:
    """Ask the job to stop (SIGTERM to its driver, SIGKILL 3 s later); False when it had already ended."""
    return bool(_connect(address, token)("stop_job", job_id))


def list_jobs(address: str, *, token: Token | None = None) -> list[JobSummary]:
    jobs = [_summary(j) for j in _connect(address, token)("list_jobs")]
    return sorted(jobs, key=lambda j: j.start_time or datetime.min)


def follow(address: str, job_id: str, write: Callable[[str], None], *, poll_s: float = 1.0,
           timeout_s: float | None = None, token: Token | None = None) -> JobSummary:
    """Stream a job's logs to ``write`` until it ends (or ``timeout_s``); returns its last status.

    Polls status, then the whole log, and writes what is new (the log is read after the status,
    so a terminal status always comes with the complete log).
    """
    jobs = _connect(address, token)
    seen = 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        info = _summary(jobs("get_job_info", job_id))
        text = str(jobs("get_job_logs", job_id))
        if len(text) > seen:
            write(text[seen:])
            seen = len(text)
        if info.status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return info
        time.sleep(poll_s)
