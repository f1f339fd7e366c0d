"""Figures of a sensitivity study (matplotlib, Agg: no display needed).

Every function takes data plus fitted objects from :mod:`analysis.fit` and returns a
:class:`matplotlib.figure.Figure` on its own Agg canvas (built without pyplot, so no global
backend state is touched and no display is needed). Axes are
logarithmic wherever the search space is, labels carry units, and dense scatters are
subsampled for legibility (the fits use every trial).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.fit import (
    ComputeScaling,
    CurveResult,
    OptimumTrend,
    ParamImportance,
    ViewsBatchComparison,
    pareto_frontier,
)

__all__ = [
    "param_label",
    "metric_label",
    "plot_sensitivity",
    "plot_temperature_batch",
    "plot_importance",
    "plot_learning_curves",
    "plot_compute_scaling",
    "plot_views_batch",
    "plot_message",
]

_PARAM_LABELS = {
    "temperature": "temperature τ",
    "batch_size": "batch size B (images per step)",
    "views": "views per image",
    "lr": "learning rate (peak)",
    "weight_decay": "weight decay",
    "epochs": "epochs",
    "width": "encoder width (channels)",
    "fraction": "fraction of the training set",
    "samples_seen": "images seen",
}
_METRIC_LABELS = {
    "knn_top1": "kNN top-1 accuracy",
    "knn_top1_test": "kNN top-1 accuracy (test)",
    "linear_probe_top1": "linear-probe top-1 accuracy",
    "train_loss": "training loss",
    "alignment": "alignment",
    "uniformity": "uniformity",
    "effective_rank": "effective rank",
}
_MAX_POINTS = 2500
_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
           "tab:olive", "tab:cyan")


def param_label(name: str, *, log: bool = False) -> str:
    """Axis label of a hyperparameter, with its unit."""
    if name in _PARAM_LABELS:
        label = _PARAM_LABELS[name]
    elif name.startswith("loss."):
        label = f"loss parameter {name.split('.', 1)[1]}"
    else:
        label = name
    if log:
        label = label[:-1] + "; log scale)" if label.endswith(")") else label + " (log scale)"
    return label


def metric_label(metric: str, *, fraction: bool = True, mode: str = "max") -> str:
    """Axis label of the study metric (``fraction``: a [0, 1] metric)."""
    base = _METRIC_LABELS.get(metric, metric)
    unit = "fraction" if fraction else "metric units"
    arrow = "higher is better" if mode == "max" else "lower is better"
    return f"{base} ({unit}; {arrow})"


def _color_of(loss: str | None, order: Sequence[str | None]) -> str:
    if loss is None:
        return "black"
    variants = [v for v in order if v is not None]
    return _COLORS[variants.index(loss) % len(_COLORS)] if loss in variants else "tab:gray"


def _figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas: no pyplot, no global backend state."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _fmt(v: float) -> str:
    v = float(v)
    if v.is_integer() and abs(v) < 1e6:
        return str(int(v))
    if abs(v - round(v)) < 1e-9 * max(1.0, abs(v)) and abs(v) < 1e6:
        return str(int(round(v)))
    return f"{v:.3g}"


def _subsample(n: int, k: int, seed: int = 0) -> np.ndarray:
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def plot_message(title: str, message: str) -> Figure:
    """A placeholder figure saying why a plot could not be drawn."""
    fig = _figure(6.4, 2.4)
    ax = fig.add_subplot()
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=10)
    return fig


def plot_sensitivity(curves: Sequence[CurveResult], *, metric: str, mode: str = "max",
                     tolerance: float = 0.01, fraction: bool = True) -> Figure:
    """One hyperparameter: observed trials, the fitted curve per loss variant (pooled dashed),
    the bootstrap band, the optimum with its CI, and the tolerance width (a bar at best - Δ)."""
    if not curves:
        raise ValueError("plot_sensitivity needs at least one CurveResult")
    param = curves[0].param
    log = curves[0].spec.log
    order = [c.loss for c in curves]
    has_variants = any(c.loss is not None for c in curves)
    fig = _figure(7.5, 5.6)
    ax = fig.add_subplot()
    skipped = []
    lanes: list[str] = []
    n_all = sum(c.x.size for c in curves if c.loss is not None or not has_variants)
    size, alpha = (28, 0.75) if n_all <= 200 else (9, 0.25)  # few trials: make every one visible
    for c in curves:
        if has_variants and c.loss is None:
            continue  # the variants' points together are the pooled points
        idx = _subsample(c.x.size, _MAX_POINTS // max(1, len(curves)))
        label = None if c.curve is not None else f"{c.loss or 'all'} trials (no curve)"
        color = _color_of(c.loss, order) if has_variants else "tab:gray"
        ax.scatter(c.x[idx], c.y[idx], s=size, alpha=alpha, color=color, linewidths=0, rasterized=True, label=label)
    for c in curves:
        color = _color_of(c.loss, order)
        name = c.loss if c.loss is not None else "pooled"
        if c.curve is None:
            skipped.append(f"{name}: {c.skipped}")
            continue
        cv = c.curve
        ls = "--" if (c.loss is None and has_variants) else "-"
        lo, hi = cv.band_
        ax.fill_between(cv.grid_, lo, hi, color=color, alpha=0.15, linewidth=0)
        olo, ohi = cv.optimum_ci_
        ax.plot(cv.grid_, cv.curve_, ls, color=color, lw=2,
                label=f"{name} ({cv.model_}): optimum {_fmt(cv.optimum_)} [{_fmt(olo)}, {_fmt(ohi)}]")
        ax.errorbar([cv.optimum_], [cv.metric_at_optimum_],
                    xerr=[[max(cv.optimum_ - olo, 0.0)], [max(ohi - cv.optimum_, 0.0)]],
                    fmt="*", ms=13, color=color, mec="white", mew=0.8, capsize=4, zorder=5)
        tlo, thi = cv.tolerance_width_
        lane = 0.03 + 0.035 * len(lanes)  # one lane per curve along the bottom of the axes
        lanes.append(name)
        ax.plot([tlo, thi], [lane, lane], color=color, lw=5, alpha=0.6, solid_capstyle="butt",
                transform=ax.get_xaxis_transform(), clip_on=False)
    if log:
        ax.set_xscale("log")
    uniq = np.unique(np.concatenate([c.x for c in curves])) if curves else np.array([])
    if 1 < uniq.size <= 8 and curves[0].spec.kind in ("choice", "int", "intlog"):
        ax.set_xticks(uniq)
        ax.set_xticklabels([_fmt(v) for v in uniq])
        ax.minorticks_off()
    ax.set_xlabel(param_label(param, log=log))
    ax.set_ylabel(metric_label(metric, fraction=fraction, mode=mode))
    ax.set_title(f"Sensitivity of {metric} to {param}")
    ax.grid(True, which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if lanes:
        handles.append(Line2D([], [], color="gray", lw=5, alpha=0.6))
        labels.append(f"tolerance width: bars at the bottom (within {tolerance:g} of best)")
        handles.append(Line2D([], [], ls="", marker="*", color="gray", ms=11))
        labels.append("optimum, 90% CI (bootstrap)")
    # Below the axes: inside, it would hide points or the tolerance lanes.
    fig.legend(handles, labels, fontsize=8, loc="outside lower center", ncols=2, frameon=False)
    _clip_y(ax, [c.y for c in curves] + [c.curve.curve_ for c in curves if c.curve is not None])
    if lanes:
        lo_y, hi_y = ax.get_ylim()  # make room for the tolerance lanes under the data
        frac = 0.05 + 0.035 * len(lanes)
        ax.set_ylim(lo_y - frac * (hi_y - lo_y) / (1 - frac), hi_y)
    if skipped:
        note = textwrap.fill("skipped: " + "; ".join(skipped), width=95)
        ax.set_title(f"Sensitivity of {metric} to {param}\n{note}", fontsize=9)
    return fig


def plot_temperature_batch(heat: Mapping[str, Any] | None, trends: Mapping[str | None, OptimumTrend], *,
                           metric: str, mode: str = "max", fraction: bool = True) -> Figure:
    """Heat map of the metric over temperature x batch size, with tau*(B) and its CIs."""
    fig = _figure(7.5, 5.4)
    ax = fig.add_subplot()
    if heat is not None:
        x = np.asarray(heat["x"], dtype=float)
        by = np.asarray(heat["by"], dtype=float)
        z = np.asarray(heat["z"], dtype=float)
        xe = _edges(x, log=True)
        be = _edges(by, log=True)
        mesh = ax.pcolormesh(xe, be, np.ma.masked_invalid(z), cmap="viridis" if mode == "max" else "viridis_r",
                             shading="flat")
        cb = fig.colorbar(mesh, ax=ax)
        cb.set_label(metric_label(metric, fraction=fraction, mode=mode) + f"\n{heat.get('source', '')}", fontsize=8)
    order = list(trends)
    offsets = np.linspace(-0.06, 0.06, max(1, len(order)))
    for k, (loss, tr) in enumerate(trends.items()):
        color = "white" if loss is None else _COLORS[[v for v in order if v is not None].index(loss) % len(_COLORS)]
        lv = np.asarray(tr.levels_)
        opt = np.asarray(tr.optima_)
        ci = np.asarray(tr.optima_ci_)
        yk = lv * 2.0 ** offsets[k]  # small vertical offsets keep overlapping CIs readable
        ax.errorbar(opt, yk, xerr=[np.maximum(opt - ci[:, 0], 0), np.maximum(ci[:, 1] - opt, 0)], fmt="o",
                    color=color, mec="black", ms=6, capsize=3, lw=1.5,
                    label=f"τ*(B) {loss or 'pooled'}" + _slope_text(tr))
        if tr.slope_ is not None:
            bb = np.geomspace(lv.min(), lv.max(), 50)
            ax.plot(tr.predict(bb), bb, "-", color=color, lw=1.2, alpha=0.9)
    ax.set_xscale("log")
    ax.set_yscale("log", base=2)
    if heat is not None:
        ax.set_yticks(np.asarray(heat["by"], dtype=float))
        ax.set_yticklabels([_fmt(v) for v in np.asarray(heat["by"], dtype=float)])
        ax.minorticks_off()
        ax.set_xlim(xe[0], xe[-1])
    ax.set_xlabel(param_label("temperature", log=True))
    ax.set_ylabel(param_label("batch_size", log=True))
    note = (", with optimal τ per batch size (90% CI)" if trends
            else "\n(too few trials per batch size for τ*(B))")
    ax.set_title(f"{metric} over temperature × batch size{note}")
    if trends:
        fig.legend(fontsize=8, loc="outside lower center", ncols=2, frameon=False)
    return fig


def _clip_y(ax: Any, series: Sequence[np.ndarray], pad: float = 0.08) -> None:
    """Y limits from the data and fitted curves: a wide bootstrap band may run off the axes
    rather than squash what was measured."""
    vals = np.concatenate([np.asarray(s, dtype=float).ravel() for s in series]) if series else np.array([])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return
    lo, hi = vals.min(), vals.max()
    span = hi - lo if hi > lo else max(abs(hi), 1e-3) * 0.1
    ax.set_ylim(lo - pad * span, hi + pad * span)


def _slope_text(tr: OptimumTrend) -> str:
    if tr.slope_ is None or tr.slope_ci_ is None:
        return ""
    return f", slope {tr.slope_:.2f} [{tr.slope_ci_[0]:.2f}, {tr.slope_ci_[1]:.2f}]"


def _edges(c: np.ndarray, *, log: bool) -> np.ndarray:
    c = np.asarray(c, dtype=float)
    if c.size == 1:
        return np.array([c[0] / 1.5, c[0] * 1.5]) if log else np.array([c[0] - 0.5, c[0] + 0.5])
    t = np.log(c) if log else c
    mid = (t[1:] + t[:-1]) / 2.0
    e = np.concatenate([[t[0] - (mid[0] - t[0])], mid, [t[-1] + (t[-1] - mid[-1])]])
    return np.exp(e) if log else e


def plot_importance(importance: ParamImportance) -> Figure:
    """Grouped horizontal bars: fANOVA and PED-ANOVA importances with bootstrap 90% CIs."""
    evs = [ev for ev in importance.importances_ if importance.importances_[ev]]
    params: list[str] = []
    for ev in evs:
        for p in sorted(importance.importances_[ev], key=lambda k: -importance.importances_[ev][k]):
            if p not in params:
                params.append(p)
    fig = _figure(7.5, 0.45 * len(params) + 1.8)
    ax = fig.add_subplot()
    h = 0.8 / max(1, len(evs))
    names = {"fanova": "fANOVA (variance explained)", "ped_anova": "PED-ANOVA (top-10% vs all)"}
    for k, ev in enumerate(evs):
        vals = np.array([importance.importances_[ev].get(p, np.nan) for p in params])
        ci = np.array([importance.ci_.get(ev, {}).get(p, (v, v)) for p, v in zip(params, vals)], dtype=float)
        ypos = np.arange(len(params)) + (k - (len(evs) - 1) / 2) * h
        xerr = np.vstack([np.clip(vals - ci[:, 0], 0, None), np.clip(ci[:, 1] - vals, 0, None)])
        ax.barh(ypos, np.nan_to_num(vals), height=h, color=_COLORS[k], label=names.get(ev, ev),
                xerr=np.nan_to_num(xerr), capsize=3, error_kw={"lw": 1})
    ax.set_yticks(np.arange(len(params)))
    ax.set_yticklabels(params)
    ax.invert_yaxis()
    ax.set_xlabel("normalised importance (fraction of total; 90% bootstrap CI)")
    ax.set_title(f"Hyperparameter importance (Optuna evaluators, {importance.n_trials_} trials)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_learning_curves(curves: pd.DataFrame, trials: pd.DataFrame, *, metric: str, color_by: str,
                         log_color: bool = False, mode: str = "max", fraction: bool = True,
                         max_trials: int = 400) -> Figure:
    """Per-trial metric against epoch, coloured by ``color_by``; pruned trials dashed."""
    fig = _figure(7.5, 4.8)
    ax = fig.add_subplot()
    if metric not in curves.columns:
        raise ValueError(f"the curves table has no {metric!r} column")
    info = trials.set_index("trial_id")
    ids = [t for t in curves["trial_id"].unique() if t in info.index]
    ids = [ids[i] for i in _subsample(len(ids), max_trials)]
    cur = curves[curves["trial_id"].isin(ids)].sort_values(["trial_id", "epoch"])
    segs, vals, styles = [], [], []
    for tid, grp in cur.groupby("trial_id", sort=False):
        pts = grp[["epoch", metric]].to_numpy(dtype=float)
        pts = pts[np.isfinite(pts).all(axis=1)]
        if len(pts) < 1:
            continue
        if len(pts) == 1:
            pts = np.vstack([pts, pts])
        segs.append(pts)
        row = info.loc[tid]
        if isinstance(row, pd.DataFrame):
            row = row.iloc[0]
        vals.append(row.get(color_by, np.nan) if color_by in info.columns else np.nan)
        styles.append("--" if row.get("status") == "pruned" else "-")
    numeric = pd.api.types.is_numeric_dtype(pd.Series(vals).dropna()) and len(pd.Series(vals).dropna()) > 0
    if numeric:
        v = np.asarray(vals, dtype=float)
        fin = v[np.isfinite(v)]
        norm = (LogNorm(fin.min(), fin.max()) if log_color and fin.size and fin.min() > 0 and fin.max() > fin.min()
                else Normalize(fin.min() if fin.size else 0, fin.max() if fin.size else 1))
        lc = LineCollection(segs, array=v, cmap="viridis", norm=norm, linestyles=styles, linewidths=1.0, alpha=0.7)
        ax.add_collection(lc)
        cb = fig.colorbar(lc, ax=ax)
        cb.set_label(param_label(color_by, log=log_color))
    else:
        cats = [str(c) for c in pd.unique(pd.Series(vals).astype(str))]
        colors = [_COLORS[cats.index(str(c)) % len(_COLORS)] for c in vals]
        lc = LineCollection(segs, colors=colors, linestyles=styles, linewidths=1.0, alpha=0.7)
        ax.add_collection(lc)
        ax.legend([Line2D([], [], color=_COLORS[i % len(_COLORS)]) for i in range(len(cats))],
                  [f"{color_by}={c}" for c in cats], fontsize=8, loc="lower right")
    ax.autoscale_view()
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric_label(metric, fraction=fraction, mode=mode))
    ax.set_title(f"Learning curves ({len(segs)} trials; dashed = pruned by ASHA)")
    ax.grid(True, alpha=0.3)
    return fig


def plot_compute_scaling(scaling: ComputeScaling | None, points: Mapping[str, Any], *, metric: str,
                         mode: str = "max", fraction: bool = True, note: str | None = None) -> Figure:
    """Metric vs compute: all trials (pruned as x), the Pareto frontier, the power-law fit with
    its extrapolation band, and the hold-out validation. ``scaling=None`` (no fit) draws the
    trials and the frontier with ``note`` saying why."""
    fig = _figure(7.5, 4.8)
    ax = fig.add_subplot()
    c = np.asarray(points["compute"], dtype=float)
    y = np.asarray(points["metric"], dtype=float)
    st = np.asarray(points["status"], dtype=object)
    ok = np.isfinite(c) & np.isfinite(y) & (c > 0)
    kinds = (("completed", "o", "completed trials"), ("pruned", "x", "pruned (at fidelity reached)"))
    size, alpha = (24, 0.7) if ok.sum() <= 200 else (10, 0.35)
    for status, marker, label in kinds:
        m = np.flatnonzero(ok & (st == status))
        m = m[_subsample(m.size, _MAX_POINTS)]
        if m.size:
            ax.scatter(c[m], y[m], s=size, marker=marker, color="tab:gray", alpha=alpha, linewidths=0.8,
                       label=label, rasterized=True)
    front = pareto_frontier(c[ok], y[ok], mode)
    fc, fy = c[ok][front], y[ok][front]
    ax.step(fc, fy, where="post", color="black", lw=1.5, label="Pareto frontier")
    ax.plot(fc, fy, "o", color="black", ms=4)
    shown = [y[ok]]
    if scaling is not None:
        grid, curve = scaling.grid_, scaling.curve_
        lo, hi = scaling.band_
        inside = grid <= scaling.compute_.max()
        p = scaling.params_
        ax.plot(grid[inside], curve[inside], color="tab:red", lw=2,
                label=f"power law a + b·(C/C_ref)^-c: a={p['a']:.3g}, c={p['c']:.2g}")
        ax.plot(grid[~inside], curve[~inside], "--", color="tab:red", lw=2,
                label=f"extrapolation to {scaling.extrapolate:g}× compute")
        ax.fill_between(grid, lo, hi, color="tab:red", alpha=0.15, linewidth=0, label="90% bootstrap band")
        shown.append(curve)
        ho = scaling.holdout_
        if "predicted" in ho:
            ax.axvline(ho["compute_threshold"], color="tab:blue", ls=":", lw=1)
            ax.plot(ho["compute"], ho["observed"], "s", mfc="none", color="tab:blue", ms=6,
                    label=f"held-out frontier (top {ho['holdout_fraction']:.0%} compute)")
            ax.plot(ho["compute"], ho["predicted"], "-", color="tab:blue", lw=1,
                    label=f"fit without them: MAE {ho['mae']:.3g}, coverage {ho['coverage']:.0%}")
    ax.set_xscale("log")
    _clip_y(ax, shown)
    ax.set_xlabel(str(points.get("label", "compute")))
    ax.set_ylabel(metric_label(metric, fraction=fraction, mode=mode))
    title = f"Compute scaling of {metric}"
    if scaling is None and note:
        title += "\n" + textwrap.fill(f"no power-law fit: {note}", width=95)
    ax.set_title(title, fontsize=10 if scaling is None else None)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right" if mode == "max" else "upper right", framealpha=0.85)
    return fig


def plot_views_batch(vb: ViewsBatchComparison, *, metric: str, mode: str = "max", fraction: bool = True) -> Figure:
    """Metric against batch size, one line per view count, at each samples-seen level."""
    cells = vb.cells_
    levels = sorted(cells["samples_seen"].unique())[-4:]
    fig = _figure(4.2 * len(levels) + 1.0, 4.2)
    axes = fig.subplots(1, len(levels), sharey=True, squeeze=False)[0]
    views = sorted(cells["views"].unique())
    for ax, level in zip(axes, levels):
        sub = cells[cells["samples_seen"] == level]
        for k, v in enumerate(views):
            s = sub[sub["views"] == v].sort_values("batch_size")
            if s.empty:
                continue
            ci = np.array(s["ci"].tolist(), dtype=float)
            m = s["metric"].to_numpy(dtype=float)
            ax.errorbar(s["batch_size"], m, yerr=[np.clip(m - ci[:, 0], 0, None), np.clip(ci[:, 1] - m, 0, None)],
                        marker="o", capsize=3, color=_COLORS[k % len(_COLORS)], label=f"{v} views")
        ax.set_xscale("log", base=2)
        bs = sorted(sub["batch_size"].unique())
        ax.set_xticks(bs)
        ax.set_xticklabels([_fmt(b) for b in bs])
        ax.minorticks_off()
        ax.set_xlabel(param_label("batch_size"))
        ax.set_title(f"samples seen ≈ {level:.3g} images", fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(metric_label(metric, fraction=fraction, mode=mode))
    axes[0].legend(fontsize=8)
    fig.suptitle("Views vs batch size at equal samples seen (means, 90% CI)")
    return fig
