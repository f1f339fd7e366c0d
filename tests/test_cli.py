"""The CLI: validation before compute, exit status 2 on bad input, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from scaling.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_validate_prints_plan() -> None:
    res = runner.invoke(app, ["validate", str(ROOT / "jobs/quickstart.yaml")])
    assert res.exit_code == 0, res.output
    assert "trials: 12" in res.output and "temperature" in res.output and "validation split" in res.output


def test_bad_spec_exits_2_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({"name": "bad", "train": {"epochs": -1}}))
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["run", str(spec), "--storage", str(tmp_path / "studies")])
    assert res.exit_code == 2
    assert "train.epochs" in res.output and str(spec) in res.output
    assert not (tmp_path / "studies").exists() and not (tmp_path / "mlflow.db").exists()


def test_impossible_resources_refused(tmp_path: Path) -> None:
    spec = tmp_path / "big.yaml"
    spec.write_text(yaml.safe_dump({"name": "big", "resources": {"workers_per_trial": 64}, "train": {"batch_size": 256}}))
    res = runner.invoke(app, ["validate", str(spec)])
    assert res.exit_code == 2 and "cluster has" in res.output


def test_set_override_errors_name_the_field(tmp_path: Path) -> None:
    res = runner.invoke(app, ["validate", str(ROOT / "jobs/quickstart.yaml"), "--set", "views=1"])
    assert res.exit_code == 2 and "train.views" in res.output


def test_real_process_exit_status(tmp_path: Path) -> None:
    """The installed console script, as a user runs it."""
    scaling = Path(sys.executable).parent / "scaling"
    res = subprocess.run([str(scaling), "validate", str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert res.returncode == 2 and "file not found" in res.stderr


def test_analyze_requires_one_source() -> None:
    res = runner.invoke(app, ["analyze", "--out", "x"])
    assert res.exit_code == 2 and "exactly one" in res.output
