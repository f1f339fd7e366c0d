"""Shared fixtures: one local Ray per test session, started only by tests that need it."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import torch

# Tests run on 2 cores beside each other; keep torch from oversubscribing them.
torch.set_num_threads(2)


def write_token(path: Path) -> Path:
    """A fresh Ray auth token file (token authentication stays on in every test)."""
    path.write_text(secrets.token_hex(32))
    path.chmod(0o600)
    return path


SCALING = str(Path(sys.executable).parent / "scaling")


def start_scaling_run(tmp_path: Path, spec: dict, *args: str) -> tuple[subprocess.Popen, dict[str, str]]:
    """``scaling run`` on ``spec`` (written to ``tmp_path``), started as a user would, in its own process
    group so a test can signal all of it; SQLite tracking in ``tmp_path/mlflow.db``, a short RAY_TMPDIR
    and a fresh token. Returns the process (stdout and stderr merged) and its environment, for a
    later ``scaling resume``."""
    import yaml

    spec_path = tmp_path / f"{spec['name']}.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # unix socket paths must stay short
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_TOKEN_PATH": str(write_token(tmp_path / "token"))}
    proc = subprocess.Popen(
        [SCALING, "run", str(spec_path), "--storage", str(tmp_path / "studies"), "--tracking-uri",
         f"sqlite:///{tmp_path / 'mlflow.db'}", *args],
        cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, env


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A real local Ray (2 CPUs, 2 trial slots), its temp files and auth token kept out of $HOME."""
    import ray

    from scaling.study import init_ray

    tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    os.environ.setdefault("RAY_TMPDIR", str(tmp))
    os.environ.setdefault("RAY_AUTH_TOKEN_PATH", str(write_token(tmp / "auth_token")))
    init_ray(None, 2, study_dir=tmp)
    yield
    ray.shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend and proxied artifacts."""
    import subprocess
    import sys
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
