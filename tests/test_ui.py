"""The MLflow UI in a real browser: headless Debian Chromium on a real ``mlflow server`` that serves a
finished study (runs from a real local Ray, report from ``scaling analyze``).

Chromium is a test requirement, not an optional extra: ``make test`` (and so CI) installs it when it
is missing; without it these tests fail with a message that says how to install it. Screenshots are
kept in the pytest temp dir (paths printed) as the visual record of what the browser showed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from mlflow.tracking import MlflowClient

from scaling.spec import spec_from_dict
from scaling.study import run_study
from tests.test_study import tiny_spec

pytestmark = pytest.mark.integration

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=15000", "--run-all-compositor-stages-before-draw"]  # the last: stable screenshots
# Nested runs start collapsed under their parent; sorted by name the runs table lists them flat.
BY_NAME = "orderByKey=" + quote("tags.`mlflow.runName`") + "&orderByAsc=true"


def chromium(*args: str, timeout: float = 90) -> str:
    """Run headless Chromium once (fresh profile); returns stdout. Fails, never skips, without it."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("Debian's chromium is not installed: `apt-get update && apt-get install -y chromium` "
                    "(`make test` and .ci/run install it when missing)")
    profile = tempfile.mkdtemp(prefix="chromium-", dir="/tmp")
    proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        try:  # its zygote/renderer children too
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0 or out, f"chromium exited {proc.returncode}"
    return out


def run_links(dom: str) -> dict[str, str]:
    """run id -> run name of every run linked from a runs table (the name cell links to the run page)."""
    return dict(re.findall(r'href="#/experiments/\d+/runs/([0-9a-f]{32})"><span[^>]*>([^<]+)</span>', dom))


def screenshot(url: str, path: Path) -> Path:
    chromium(f"--screenshot={path}", "--window-size=1400,900", url)
    assert path.is_file() and path.stat().st_size > 10_000, f"no screenshot of {url}"
    print(f"\nscreenshot of {url}: {path}")
    return path


@dataclass(frozen=True)
class FinishedStudy:
    url: str
    experiment_id: str
    parent_run_id: str
    trials: dict[str, str]  # run id -> run name
    figures: list[str]


@pytest.fixture(scope="module")
def study(ray_local: None, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> FinishedStudy:
    """A tiny study tracked by the server, then `scaling analyze` logging its report to the parent run."""
    root = tmp_path_factory.mktemp("ui-study")
    result = run_study(spec_from_dict(tiny_spec("ui-study", trials=2)), storage=root / "studies",
                       tracking_uri=mlflow_server, progress=False)
    report = root / "report"
    res = subprocess.run([str(Path(sys.executable).parent / "scaling"), "analyze", "--experiment", "ui-study",
                          "--tracking-uri", mlflow_server, "--out", str(report), "--format", "png,svg"],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    figures = sorted(p.name for p in (report / "figures").glob("sensitivity_*.png"))
    assert figures, "scaling analyze made no sensitivity plot"
    client = MlflowClient(tracking_uri=mlflow_server)
    logged = {a.path for a in client.list_artifacts(result.parent_run_id, "analysis/figures")}
    assert {f"analysis/figures/{f}" for f in figures} <= logged
    trials = {r.info.run_id: r.data.tags["mlflow.runName"] for r in client.search_runs(
        [result.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")}
    assert sorted(trials.values()) == ["trial_0000", "trial_0001"]
    return FinishedStudy(mlflow_server, result.experiment_id, result.parent_run_id, trials, figures)


@pytest.mark.timeout(300)
def test_runs_page_lists_the_study_and_its_trials(study: FinishedStudy, tmp_path_factory: pytest.TempPathFactory) -> None:
    runs = f"{study.url}/#/experiments/{study.experiment_id}/runs"
    listed = run_links(chromium("--dump-dom", runs))
    assert listed == {study.parent_run_id: "ui-study"}, listed  # the study, its trials folded under it
    listed = run_links(chromium("--dump-dom", f"{runs}?{BY_NAME}"))
    assert listed == {study.parent_run_id: "ui-study", **study.trials}, listed
    screenshot(f"{runs}?{BY_NAME}", tmp_path_factory.mktemp("screens") / "runs.png")


@pytest.mark.timeout(120)
def test_parent_run_artifacts_hold_the_sensitivity_plots(study: FinishedStudy,
                                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    base = f"{study.url}/#/experiments/{study.experiment_id}/runs/{study.parent_run_id}/artifacts"
    dom = chromium("--dump-dom", f"{base}/analysis/figures")
    listed = set(re.findall(r'data-testid="artifact-tree-node" artifact-name="([^"]+)"', dom))
    assert {"analysis", "figures", "report.html", "sensitivity.json"} <= listed, sorted(listed)
    for name in study.figures:  # e.g. sensitivity_temperature.png, sensitivity_loss_mu.png
        assert name in listed and name.replace(".png", ".svg") in listed, (name, sorted(listed))
    plot = f"{base}/analysis/figures/{study.figures[-1]}"
    dom = chromium("--dump-dom", plot)
    assert f"analysis/figures/{study.figures[-1]}" in dom  # the preview pane's title: the plot is open
    screenshot(plot, tmp_path_factory.mktemp("screens") / "sensitivity_plot.png")  # tree + the plot's preview
