"""``analyze``: sensitivity.json contract, figure files (valid PNG/SVG/PDF), report.html
references, Δ in points, skipped curves, and bad inputs that fail cleanly before writing."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pyarrow as pa
import pytest
from PIL import Image

from analysis.report import AnalysisError, analyze
from analysis.synthetic import SEARCH_SPACE, make_trials
from analysis.table import with_metadata, write_trials

CURVE_KEYS = {"param", "loss", "model", "optimum", "optimum_ci", "metric_at_optimum", "tolerance_width",
              "n_trials", "skipped"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    trials, curves = make_trials(160, seed=7, repeats=2, pruned_fraction=0.1, failed_fraction=0.05)
    write_trials(root / "study", trials, curves)
    lines: list[str] = []
    result = analyze(trials=root / "study" / "trials.parquet", out=root / "out", formats=("png", "svg", "pdf"),
                     delta=2.0, progress=lines.append)
    return root / "out", result, lines


def test_sensitivity_json_follows_the_contract(report):
    out, result, lines = report
    on_disk = json.loads((out / "sensitivity.json").read_text())
    assert on_disk["metric"] == result["metric"] == "knn_top1" and on_disk["mode"] == "max"
    assert on_disk["delta"] == {"points": 2.0, "metric_units": 0.02, "point": "0.01 (metric is a fraction in [0, 1])"}
    numeric = ["temperature", "batch_size", "views", "lr", "epochs", "width"]
    seen = {(c["param"], c["loss"]) for c in on_disk["curves"]}
    for p in numeric:  # one curve per numeric parameter per loss variant, plus the pooled one
        assert {(p, None), (p, "infonce"), (p, "dcl"), (p, "adnce")} <= seen
    assert ("loss.mu", "adnce") in seen and ("loss.mu", "infonce") not in seen
    for c in on_disk["curves"]:
        assert CURVE_KEYS <= set(c)
        if c["skipped"] is None:
            lo, hi = c["optimum_ci"]
            assert lo <= c["optimum"] <= hi and c["tolerance_width"][0] <= c["optimum"] <= c["tolerance_width"][1]
            assert c["model"] in ("quadratic", "power_law", "spline", "linear") and c["n_bootstrap"] >= 200
    assert set(on_disk["importance"]) >= {"temperature", "batch_size", "epochs"}
    assert on_disk["trials"]["failed"] == 8 and on_disk["trials"]["pruned"] == 16
    assert on_disk["scaling"]["view_samples"]["holdout"]["n_holdout"] > 0
    assert on_disk["interactions"]["temperature_vs_batch"][0]["levels"]
    assert "NaN" not in (out / "sensitivity.json").read_text()  # strict JSON
    assert any("curve" in line for line in lines) and lines[-1].startswith("report written")


def test_every_figure_is_a_valid_file_and_referenced_by_the_html(report):
    out, result, _ = report
    html = (out / "report.html").read_text()
    expected = {"sensitivity_temperature", "sensitivity_batch_size", "temperature_batch", "importance",
                "learning_curves", "compute_view_samples", "compute_flops", "views_batch"}
    assert expected <= set(result["figures"])
    for name, fig in result["figures"].items():
        assert len(fig["files"]) == 3
        for rel in fig["files"]:
            path = out / rel
            data = path.read_bytes()
            if rel.endswith(".png"):
                with Image.open(path) as im:
                    im.verify()
                    assert im.size[0] >= 600
                assert f"src='{rel}'" in html
            elif rel.endswith(".svg"):
                assert ET.fromstring(data).tag.endswith("svg")
            else:
                assert data.startswith(b"%PDF") and b"%%EOF" in data[-1024:]
            assert f"href='{rel}'" in html
    referenced = set(re.findall(r"(?:src|href)='(figures/[^']+)'", html))
    assert all((out / r).exists() for r in referenced)
    assert "Optima and tolerance widths" in html and "<td class=l>temperature</td>" in html


def test_single_valued_parameter_gives_a_skipped_curve_not_an_error(tmp_path):
    trials, curves = make_trials(60, seed=3, fix={"width": 32}, metadata=False)
    trials = with_metadata(trials, search_space=SEARCH_SPACE, metric="knn_top1", mode="max")
    write_trials(tmp_path / "s", trials, curves)
    result = analyze(trials=tmp_path / "s", out=tmp_path / "out")
    width = [c for c in result["curves"] if c["param"] == "width"]
    assert width and all(c["skipped"] and "single value (32)" in c["skipped"] for c in width)
    assert (tmp_path / "out" / "figures" / "sensitivity_width.png").exists()
    assert "skipped: width took a single value" in (tmp_path / "out" / "report.html").read_text()


def _bad(tmp_path, table: pa.Table, name: str) -> str:
    write_trials(tmp_path / name, table)
    return str(tmp_path / name)


def test_bad_inputs_raise_analysis_error_and_write_nothing(tmp_path):
    trials, _ = make_trials(30, seed=1, with_curves=False)
    out = tmp_path / "out"
    cases = [
        (dict(trials=tmp_path / "missing.parquet"), "does not exist"),
        (dict(trials=_bad(tmp_path, trials.drop_columns(["knn_top1"]), "nometric")),
         "'knn_top1' is not in the trial table"),
        (dict(trials=_bad(tmp_path, trials.slice(0, 0), "empty")), "empty"),
        (dict(trials=_bad(tmp_path, trials.set_column(2, "status", pa.array(["failed"] * 30)), "failed")),
         "all 30 trials failed"),
        (dict(trials=_bad(tmp_path, trials, "ok"), formats=("png", "gif")), "gif"),
        (dict(trials=_bad(tmp_path, trials, "ok2"), delta=0), "delta"),
        (dict(trials=_bad(tmp_path, trials, "ok3"), n_bootstrap=50), "at least 200"),
        (dict(), "exactly one source"),
        (dict(trials="x", experiment="y"), "exactly one source"),
    ]
    for kwargs, message in cases:
        with pytest.raises(AnalysisError, match=message):
            analyze(out=out, **kwargs)
        assert not out.exists()
    assert issubclass(AnalysisError, ValueError)
