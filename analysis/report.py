"""``scaling analyze``: trial table -> sensitivity.json, figures and report.html (+ MLflow).

The one public entry point is :func:`analyze`. Every bad input (no such file or experiment, an
empty table, a missing metric column, all trials failed, an unknown figure format) raises
:class:`AnalysisError` with a message naming what is wrong, before anything is written.
A hyperparameter that took a single value is not an error: its curve is marked ``skipped``.

Δ (``delta``) is given in *points*: one point is 0.01 on a metric that is a fraction in [0, 1]
(accuracies, every study metric of the platform), and 1 metric unit otherwise. The default
Δ = 1 point means "within 1 percentage point of the best". sensitivity.json records both
(``delta.points`` and ``delta.metric_units``).

Output layout (``out``)::

    sensitivity.json          the contract of DESIGN.md section 4 (+ interactions, scaling, ...)
    report.html               every figure (relative paths), a table of optima and widths
    figures/<name>.<fmt>      one file per figure and format (png, svg, pdf)

When the trials came from MLflow (``experiment``), the same files are logged as artifacts of the
study's parent run under ``analysis/``.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from analysis import plots
from analysis.fit import SensitivityResult, fit_sensitivity
from analysis.table import (
    META_PARENT_RUN,
    AnalysisError,
    TrialData,
    check_run,
    load_trials_mlflow,
    load_trials_parquet,
    log_report_artifacts,
    metadata_of,
    prepare_trials,
)

__all__ = ["AnalysisError", "analyze", "FORMATS", "write_report"]

FORMATS = ("png", "svg", "pdf")
MIN_BOOTSTRAP = 200


def _check_args(trials: Any, experiment: Any, parent_run_id: Any, formats: Sequence[str], delta: float,
                n_bootstrap: int, out: Any) -> list[str]:
    if (trials is not None and experiment is not None) or (trials is None and experiment is None
                                                            and parent_run_id is None):
        raise AnalysisError("give exactly one source: trials (a trials.parquet file or its directory) "
                            "or experiment (an MLflow experiment name)")
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    fmts = [str(f).lower().lstrip(".") for f in formats]
    bad = [f for f in fmts if f not in FORMATS]
    if not fmts or bad:
        raise AnalysisError(f"figure format(s) {', '.join(bad) or '(none)'} not supported; "
                            f"choose from {', '.join(FORMATS)}")
    if not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta > 0):
        raise AnalysisError(f"delta must be a positive number of points, got {delta!r}")
    if n_bootstrap < MIN_BOOTSTRAP:
        raise AnalysisError(f"n_bootstrap must be at least {MIN_BOOTSTRAP} for reported CIs, got {n_bootstrap}")
    if out is None:
        raise AnalysisError("out (the report directory) is required")
    if Path(out).exists() and not Path(out).is_dir():
        raise AnalysisError(f"out {str(out)!r} exists and is not a directory")
    return list(dict.fromkeys(fmts))


def _is_fraction(data: TrialData) -> bool:
    v = data.completed[data.metric].to_numpy(dtype=float)
    return bool(v.size and v.min() >= 0.0 and v.max() <= 1.0)


def _jsonable(obj: Any) -> Any:
    """Strict JSON: numpy scalars to Python, NaN/inf to null, tuples to lists."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


def analyze(*, trials: str | Path | None = None, experiment: str | None = None,
            tracking_uri: str | None = None, out: str | Path, metric: str | None = None,
            formats: Sequence[str] = ("png",), delta: float = 1.0, log_to_mlflow: bool = True,
            progress: Callable[[str], None] | None = None, mode: str | None = None,
            parent_run_id: str | None = None, n_bootstrap: int = MIN_BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """Analyse one study and write the report; returns the sensitivity.json content.

    Sources: ``trials`` (trials.parquet or a directory with trials.parquet [+ curves.parquet])
    or ``experiment`` (MLflow experiment name at ``tracking_uri``) or ``parent_run_id`` alone (one
    study's parent run). With ``trials`` *and* ``parent_run_id`` the table is read from Parquet and
    the report is logged to that run (what ``scaling run --analyze`` does). ``metric``/``mode`` default to the table's
    metadata. ``delta`` is the tolerance width's Δ in points (see the module docstring).
    ``formats``: any of png, svg, pdf. ``progress`` receives one line per stage.
    """
    say = progress or (lambda _msg: None)
    fmts = _check_args(trials, experiment, parent_run_id, formats, delta, n_bootstrap, out)
    if trials is not None and parent_run_id is not None and log_to_mlflow:
        check_run(parent_run_id, tracking_uri=tracking_uri)
    if trials is not None:
        say(f"loading trials from {trials}")
        table, curves = load_trials_parquet(trials)
    else:
        say(f"loading trials from MLflow experiment {experiment or parent_run_id!r}")
        table, curves = load_trials_mlflow(experiment, parent_run_id=parent_run_id, tracking_uri=tracking_uri)
    data = prepare_trials(table, curves, metric=metric, mode=mode)
    fraction = _is_fraction(data)
    tol = float(delta) * (0.01 if fraction else 1.0)
    c = data.counts
    say(f"{c['total']} trials: {c['completed']} completed, {c['pruned']} pruned, {c['failed']} failed; "
        f"metric {data.metric} ({data.mode}); searched: {', '.join(data.space) or 'nothing'}")
    res = fit_sensitivity(data, tolerance=tol, n_bootstrap=n_bootstrap, seed=seed, progress=say)
    result = res.to_dict()
    result["delta"] = {"points": float(delta), "metric_units": tol,
                       "point": "0.01 (metric is a fraction in [0, 1])" if fraction else "1 metric unit"}
    source: dict[str, Any] = {"trials": str(trials)} if trials is not None else {
        "experiment": experiment, "tracking_uri": metadata_of(table).get("scaling.tracking_uri"),
        "parent_run_id": metadata_of(table).get(META_PARENT_RUN)}
    result["source"] = source
    out = Path(out)
    result["figures"] = write_report(res, data, out, formats=fmts, fraction=fraction, result=result, progress=say)
    result = _jsonable(result)
    (out / "sensitivity.json").write_text(json.dumps(result, indent=2))
    _write_html(out, result)
    if experiment is not None or parent_run_id is not None:
        run = parent_run_id or metadata_of(table).get(META_PARENT_RUN)
        if log_to_mlflow and run:
            say(f"logging the report to MLflow run {run} (artifacts under analysis/)")
            log_report_artifacts(run, out, tracking_uri=tracking_uri or source.get("tracking_uri"))
            result["mlflow"] = {"parent_run_id": run, "artifact_path": "analysis"}
        elif log_to_mlflow:
            result["mlflow"] = {"skipped": "the study has no parent run to log to"}
        (out / "sensitivity.json").write_text(json.dumps(result, indent=2))
    say(f"report written to {out / 'report.html'}")
    return result


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def write_report(res: SensitivityResult, data: TrialData, out: Path, *, formats: Sequence[str],
                 fraction: bool, result: dict[str, Any] | None = None,
                 progress: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """Draw and save every figure; returns ``{name: {"files": [...], "caption": str}}``."""
    say = progress or (lambda _msg: None)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, dict[str, Any]] = {}
    kw = {"metric": res.metric, "mode": res.mode, "fraction": fraction}

    def save(name: str, fig: Any, caption: str) -> None:
        files = []
        for fmt in formats:
            path = fig_dir / f"{name}.{fmt}"
            fig.savefig(path, format=fmt, dpi=120 if fmt == "png" else None)
            files.append(f"figures/{path.name}")
        made[name] = {"files": files, "caption": caption}

    params = list(dict.fromkeys(c.param for c in res.curves))
    for p in params:
        group = [c for c in res.curves if c.param == p]
        say(f"plotting {p}")
        save(f"sensitivity_{_safe(p)}", plots.plot_sensitivity(group, tolerance=res.tolerance, **kw),
             f"Sensitivity of {res.metric} to {p}: fitted curve per loss variant with 90% bootstrap band, "
             f"optimum with 90% CI (star) and tolerance width (bar, within {res.tolerance:g} of the best).")
    if res.trends or res.heat is not None:
        say("plotting temperature x batch size")
        save("temperature_batch", plots.plot_temperature_batch(res.heat, res.trends, **kw),
             "Metric over temperature x batch size with the optimal temperature per batch size (90% CI).")
    if res.importance is not None:
        save("importance", plots.plot_importance(res.importance),
             "Hyperparameter importance from Optuna's fANOVA and PED-ANOVA evaluators (90% bootstrap CI).")
    if data.curves is not None and res.metric in data.curves.columns:
        say("plotting learning curves")
        color_by = next((p for p in ("temperature", "loss") if p in res.space), next(iter(res.space), "status"))
        spec = res.space.get(color_by)
        save("learning_curves", plots.plot_learning_curves(
            data.curves, data.frame, color_by=color_by, log_color=bool(spec and spec.log), **kw),
            f"Per-epoch {res.metric} of each trial coloured by {color_by} (pruned trials dashed).")
    for axis, pts in res.scaling_points.items():
        say(f"plotting compute scaling ({axis})")
        sc = res.scaling.get(axis)
        save(f"compute_{axis}", plots.plot_compute_scaling(sc, pts, note=res.scaling_skipped.get(axis), **kw),
             f"{res.metric} against compute ({pts['label']}): Pareto frontier"
             + (", power-law fit with 90% extrapolation band, validated on the held-out largest-compute trials."
                if sc is not None else f" (no power-law fit: {res.scaling_skipped.get(axis)})."))
    if res.views_batch is not None:
        save("views_batch", plots.plot_views_batch(res.views_batch, **kw),
             "Views vs batch size at equal samples seen (cell means with 90% bootstrap CIs).")
    return made


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}figure{margin:2em 0}img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:0.9em;color:#444}.skipped{color:#888}code{background:#f5f5f5;padding:0 3px}
"""


def _g(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _range(v: Any) -> str:
    if not v:
        return "—"
    return f"[{_g(v[0])}, {_g(v[1])}]"


def _write_html(out: Path, r: dict[str, Any]) -> None:
    e = html.escape
    t = r["trials"]
    title = f"Sensitivity report: {e(str(r.get('study') or ''))}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>Sensitivity report{': ' + e(str(r['study'])) if r.get('study') else ''}</h1>",
             f"<p>Metric <code>{e(r['metric'])}</code> ({'maximised' if r['mode'] == 'max' else 'minimised'}); "
             f"{t['total']} trials: {t['completed']} completed, {t['pruned']} pruned, {t['failed']} failed. "
             f"Tolerance Δ = {r['delta']['points']:g} point(s) = {r['delta']['metric_units']:g} in metric units. "
             f"Curves, importance and interactions use completed trials only; compute scaling also uses pruned "
             f"trials at the fidelity they reached; failed trials are excluded.</p>"]
    if t.get("failure_reasons"):
        parts.append("<p>Failures: " + ", ".join(f"{e(k)} ({v})" for k, v in t["failure_reasons"].items()) + "</p>")
    parts.append("<h2>Optima and tolerance widths</h2><table><tr><th class=l>parameter</th><th class=l>loss</th>"
                 "<th class=l>model</th><th>optimum</th><th>90% CI</th><th>metric at optimum</th>"
                 "<th>tolerance width</th><th>trials</th><th class=l>adjustment / note</th></tr>")
    for c in r["curves"]:
        if c.get("skipped"):
            parts.append(f"<tr class=skipped><td class=l>{e(c['param'])}</td>"
                         f"<td class=l>{_g(c['loss'] or 'pooled')}</td><td class=l>—</td>"
                         + "<td>—</td>" * 4 + f"<td>{c.get('n_trials', 0)}</td>"
                         f"<td class=l>skipped: {e(str(c['skipped']))}</td></tr>")
            continue
        note = c.get("adjustment", "")
        if c.get("optimum_at_edge"):
            note += f"; optimum at the {c['optimum_at_edge']} edge of the searched range"
        parts.append(f"<tr><td class=l>{e(c['param'])}</td><td class=l>{_g(c['loss'] or 'pooled')}</td>"
                     f"<td class=l>{_g(c['model'])}</td><td>{_g(c['optimum'])}</td><td>{_range(c['optimum_ci'])}</td>"
                     f"<td>{_g(c['metric_at_optimum'])}</td><td>{_range(c['tolerance_width'])}</td>"
                     f"<td>{c['n_trials']}</td><td class=l>{e(note)}</td></tr>")
    parts.append("</table>")
    if r.get("importance"):
        parts.append(f"<h2>Importance ({e(str(r.get('importance_method')))})</h2><table><tr><th class=l>parameter</th>"
                     "<th>importance</th></tr>")
        for k, v in sorted(r["importance"].items(), key=lambda kv: -(kv[1] or 0)):
            parts.append(f"<tr><td class=l>{e(k)}</td><td>{_g(v)}</td></tr>")
        parts.append("</table>")
    tvb = r["interactions"]["temperature_vs_batch"]
    rows = [x for x in tvb if "levels" in x]
    if rows:
        parts.append("<h2>Optimal temperature per batch size</h2><table><tr><th class=l>loss</th><th>batch size</th>"
                     "<th>τ*</th><th>90% CI</th><th>trials</th></tr>")
        for x in rows:
            for lv in x["levels"]:
                parts.append(f"<tr><td class=l>{_g(x['loss'] or 'pooled')}</td><td>{_g(lv['by'])}</td>"
                             f"<td>{_g(lv['optimum'])}</td><td>{_range(lv['optimum_ci'])}</td>"
                             f"<td>{lv['n_trials']}</td></tr>")
            if x.get("slope") is not None:
                parts.append(f"<tr><td class=l colspan=5>{_g(x['loss'] or 'pooled')}: log-log slope "
                             f"{_g(x['slope'])} {_range(x['slope_ci'])}</td></tr>")
        parts.append("</table>")
    sc = {k: v for k, v in r["scaling"].items() if "skipped" not in v}
    if sc:
        parts.append("<h2>Compute scaling</h2><table><tr><th class=l>axis</th><th>asymptote a</th><th>exponent c</th>"
                     "<th>extrapolated (×10 compute)</th><th>hold-out MAE</th><th>hold-out coverage</th></tr>")
        for k, v in sc.items():
            ho = v.get("holdout", {})
            ex = v["extrapolation"]
            parts.append(f"<tr><td class=l>{e(k)}</td><td>{_g(v['params']['a'])}</td><td>{_g(v['params']['c'])}</td>"
                         f"<td>{_g(ex['metric'])} {_range(ex['ci'])}</td><td>{_g(ho.get('mae'))}</td>"
                         f"<td>{_g(ho.get('coverage'))}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Figures</h2>")
    for name, fig in r.get("figures", {}).items():
        files = fig["files"]
        shown = next((f for f in files if f.endswith((".png", ".svg"))), None)
        parts.append("<figure>")
        if shown:
            parts.append(f"<img src='{e(shown)}' alt='{e(name)}'>")
        else:
            parts.append(f"<object data='{e(files[0])}' type='application/pdf' width='100%' height='520'></object>")
        links = " · ".join(f"<a href='{e(f)}'>{e(f.rsplit('.', 1)[-1].upper())}</a>" for f in files)
        parts.append(f"<figcaption>{e(fig['caption'])} ({links})</figcaption></figure>")
    parts.append("<p><a href='sensitivity.json'>sensitivity.json</a></p></body></html>")
    (out / "report.html").write_text("\n".join(parts), encoding="utf-8")
