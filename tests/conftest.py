"""Shared fixtures: one local Ray per test session, started only by tests that need it."""

from __future__ import annotations

import os
import secrets
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
