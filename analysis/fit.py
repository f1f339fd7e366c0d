"""Fitters for sensitivity studies: response curves, importance, interactions, compute scaling.

Estimators follow the scikit-learn pattern: ``__init__`` stores keyword arguments, ``fit``
validates and computes, fitted state ends in ``_``, ``predict`` / ``predict_interval`` evaluate.

* :class:`SensitivityCurve`: metric against one hyperparameter. Candidate models (quadratic in
  log x, saturating power law ``a + b x^-c``, penalised spline) are compared by grouped K-fold
  cross-validation; the winner is bootstrapped (>= 200 resamples of whole configurations, so seed
  repeats of one configuration move together) for a pointwise band, the optimum's CI and the
  tolerance width (the x range whose predicted metric is within ``tolerance`` of the best).
* :class:`Surrogate`: a scikit-learn Gaussian process (up to a few hundred trials) or random
  forest (more) over all searched hyperparameters. When other hyperparameters vary, a curve is
  fitted to *partial residuals* ``y_i - (g_ho(x_i, z_i) - PD(x_i))``: the surrogate's held-out
  prediction of trial i (GP leave-one-out, forest out-of-bag) minus its partial dependence on x
  (Friedman 2001) removes the other dimensions' share of each trial while keeping the trial's own
  noise, so the 1-D models see the marginal response and the bootstrap sees honest scatter.
* :class:`ParamImportance`: Optuna's fANOVA and PED-ANOVA evaluators on a study rebuilt with
  ``optuna.trial.create_trial`` and distributions from the search space; bootstrap CIs.
* :class:`OptimumTrend`: the optimum of one parameter per level of another (tau*(B)) with CIs
  and a log-log slope.
* :class:`ViewsBatchComparison`: metric per (views, batch size) cell at equal samples seen.
* :class:`ComputeScaling`: Pareto frontier of metric vs compute and a saturating power law on it
  with a bootstrap extrapolation band, validated on the largest-compute trials held out.

Pruned-trial policy (ASHA stops trials early). A pruned trial's last metric was measured at a
lower fidelity than the completed trials' (fewer epochs), so mixing it into final-metric fits
would read "stopped early" as "bad hyperparameters". Therefore:

1. sensitivity curves, importance, tau*(B) and views-vs-batch use **completed trials only**
   (the number of pruned trials left out is recorded with every curve);
2. compute scaling uses completed **and** pruned trials, each at the fidelity it reached
   (its own ``samples_seen`` and last metric): a pruned trial is a legitimate point of the
   metric-vs-compute plane;
3. failed trials are excluded everywhere and counted (``trials.failed`` and failure reasons).

Learning-curve plots show pruned trials (dashed) at every epoch they reached.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from analysis._curve import DEFAULT_MODELS, SATURATING, SensitivityCurve, default_models
from analysis._importance import ParamImportance
from analysis._interactions import OptimumTrend, ViewsBatchComparison
from analysis._models import discretize
from analysis._scaling import FLOPS_COLUMNS, ComputeScaling, compute_axes, pareto_frontier
from analysis._surrogate import PartialResiduals, Surrogate, config_groups, encode_features
from analysis.table import ParamSpec, TrialData

__all__ = [
    "SensitivityCurve",
    "Surrogate",
    "PartialResiduals",
    "ParamImportance",
    "OptimumTrend",
    "ViewsBatchComparison",
    "ComputeScaling",
    "CurveResult",
    "SensitivityResult",
    "fit_sensitivity",
    "encode_features",
    "config_groups",
    "pareto_frontier",
    "compute_axes",
    "default_models",
    "DEFAULT_MODELS",
    "SATURATING",
    "FLOPS_COLUMNS",
]

Array = np.ndarray



@dataclass
class CurveResult:
    """One sensitivity curve of the report (or the reason it was skipped)."""

    param: str
    loss: str | None
    spec: ParamSpec
    curve: SensitivityCurve | None
    skipped: str | None
    adjustment: str
    x: Array
    y: Array
    n_pruned_excluded: int = 0

    def to_dict(self) -> dict[str, Any]:
        base: dict[str, Any] = {"param": self.param, "loss": self.loss, "scale": "log" if self.spec.log else "linear",
                                "adjustment": self.adjustment, "n_pruned_excluded": self.n_pruned_excluded}
        if self.curve is None:
            return base | {"model": None, "optimum": None, "optimum_ci": None, "metric_at_optimum": None,
                           "tolerance_width": None, "n_trials": int(self.x.size), "skipped": self.skipped}
        return base | self.curve.to_dict() | {"skipped": None}


@dataclass
class SensitivityResult:
    """Everything :func:`fit_sensitivity` fitted; ``to_dict`` is the sensitivity.json body."""

    metric: str
    mode: str
    tolerance: float
    study: str
    counts: dict[str, int]
    failure_reasons: dict[str, int]
    space: dict[str, ParamSpec]
    curves: list[CurveResult] = field(default_factory=list)
    surrogate: Surrogate | None = None
    importance: ParamImportance | None = None
    importance_skipped: str | None = None
    trends: dict[str | None, OptimumTrend] = field(default_factory=dict)
    trend_skipped: dict[str | None, str] = field(default_factory=dict)
    heat: dict[str, Any] | None = None
    views_batch: ViewsBatchComparison | None = None
    views_batch_skipped: str | None = None
    scaling: dict[str, ComputeScaling] = field(default_factory=dict)
    scaling_skipped: dict[str, str] = field(default_factory=dict)
    scaling_points: dict[str, dict[str, Array]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        imp: dict[str, float] = {}
        method = None
        if self.importance is not None:
            method = "fanova" if self.importance.importances_.get("fanova") else "ped_anova"
            imp = dict(self.importance.importances_.get(method, {}))
        return {
            "metric": self.metric,
            "mode": self.mode,
            "study": self.study,
            "tolerance": self.tolerance,
            "trials": {**self.counts, "failure_reasons": self.failure_reasons,
                       "policy": "curves/importance/interactions: completed trials only; "
                                 "compute scaling: completed + pruned at the fidelity reached; "
                                 "failed: excluded and counted"},
            "search_space": {k: v.to_json() for k, v in self.space.items()},
            "curves": [c.to_dict() for c in self.curves],
            "importance": imp,
            "importance_method": method,
            "importance_detail": None if self.importance is None else self.importance.to_dict(),
            "importance_skipped": self.importance_skipped,
            "surrogate": None if self.surrogate is None else self.surrogate.describe(),
            "interactions": {
                "temperature_vs_batch": [
                    {"loss": k, **t.to_dict()} for k, t in self.trends.items()]
                + [{"loss": k, "skipped": r} for k, r in self.trend_skipped.items()],
                "views_vs_batch": (self.views_batch.to_dict() if self.views_batch is not None
                                   else {"skipped": self.views_batch_skipped}),
            },
            "scaling": {**{k: s.to_dict() for k, s in self.scaling.items()},
                        **{k: {"skipped": r} for k, r in self.scaling_skipped.items()}},
        }


def _varies(frame: pd.DataFrame, params: Sequence[str]) -> bool:
    return any(frame[p].nunique(dropna=True) > 1 for p in params if p in frame.columns)


def fit_sensitivity(data: TrialData, *, tolerance: float = 0.01, n_bootstrap: int = 200,
                    ci: float = 0.9, models: Sequence[str] | None = None, min_trials: int = 5,
                    min_trials_surrogate: int = 20, surrogate: str = "auto", importance_bootstrap: int = 10,
                    seed: int = 0, params: Sequence[str] | None = None, importance: bool = True,
                    interactions: bool = True, scaling: bool = True,
                    progress: Callable[[str], None] | None = None) -> SensitivityResult:
    """Fit every curve, importance, interaction and scaling law of one study (see module doc).

    ``tolerance`` is Δ in metric units. ``params`` restricts the curves to some parameters;
    ``importance``, ``interactions`` and ``scaling`` switch those parts off (for quick looks).
    """
    say = progress or (lambda _msg: None)
    comp = data.completed.reset_index(drop=True)
    y = comp[data.metric].to_numpy(dtype=float)
    space = data.space
    res = SensitivityResult(metric=data.metric, mode=data.mode, tolerance=tolerance, study=data.study,
                            counts=data.counts, failure_reasons=data.failure_reasons, space=space)
    groups = config_groups(comp, list(space))
    losses: list[str] = []
    if "loss" in space and not space["loss"].numeric and "loss" in comp.columns:
        losses = sorted(str(v) for v in comp["loss"].dropna().unique())
        if len(losses) < 2:
            losses = []
    sur = None
    X, names, categorical = encode_features(comp, space)
    if len(comp) >= min_trials_surrogate and X.shape[1] >= 2:
        say(f"fitting the surrogate on {len(comp)} completed trials")
        sur = Surrogate(kind=surrogate, seed=seed).fit(X, y, categorical=categorical)
        res.surrogate = sur
    use_sur = sur is not None and sur.heldout_r2_ > 0.0
    adjustment = "none" if sur is None else f"partial_dependence({sur.kind_})"

    pruned = data.frame[data.frame["status"] == "pruned"]
    numeric = [p for p, s in space.items() if s.numeric and (params is None or p in params)]
    jobs = [(p, L) for p in numeric for L in [None, *losses]]
    for k, (p, L) in enumerate(jobs):
        spec = space[p]
        sel = comp[p].notna().to_numpy().copy()
        if L is not None:
            sel &= (comp["loss"].astype(object) == L).to_numpy()
            if not sel.any():
                continue  # a conditional parameter of another loss variant
        rows = np.flatnonzero(sel)
        x = pd.to_numeric(comp[p].iloc[rows], errors="coerce").to_numpy(dtype=float)
        n_pruned = int(pruned[p].notna().sum()) if p in pruned.columns else 0
        if L is not None and "loss" in pruned.columns:
            n_pruned = int((pruned[p].notna() & (pruned["loss"].astype(object) == L)).sum())
        cr = CurveResult(p, L, spec, None, None, "none", x, y[rows], n_pruned)
        res.curves.append(cr)
        uniq = np.unique(x)
        if uniq.size < 2:
            cr.skipped = (f"{p} took a single value ({uniq[0]:g}) among the completed trials"
                          if uniq.size else f"no completed trial has {p}")
            continue
        if rows.size < min_trials:
            cr.skipped = f"only {rows.size} completed trials (need {min_trials})"
            continue
        if uniq.size < 3:
            cr.skipped = (f"{p} took only {uniq.size} distinct values ({', '.join(f'{v:g}' for v in uniq)}); "
                          "locating an optimum needs 3")
            continue
        if spec.log and (x <= 0).any():
            spec = ParamSpec(spec.name, "uniform", spec.low, spec.high, (), spec.condition)
            cr.spec = spec
        say(f"curve {k + 1}/{len(jobs)}: {p}" + (f" (loss={L})" if L else " (pooled)"))
        offset = None
        others = [q for q in space if q != p]
        if _varies(comp.iloc[rows], others):
            if use_sur:
                assert sur is not None
                offset = PartialResiduals(sur, seed=seed).fit(rows, [names.index(p)], continuous=0)
                cr.adjustment = adjustment
            else:
                cr.adjustment = ("none: too few trials for a surrogate" if sur is None
                                 else "none: the surrogate explains nothing (held-out R2 <= 0)")
        curve = SensitivityCurve(models=models or default_models(p), log_scale=spec.log, mode=data.mode,
                                 tolerance=tolerance,
                                 n_bootstrap=n_bootstrap, ci=ci, seed=seed + k)
        try:
            curve.fit(x, y[rows], groups=groups[rows], offset=offset)
        except ValueError as exc:
            cr.skipped = str(exc)
            continue
        cr.curve = curve

    if not importance:
        res.importance_skipped = "not requested"
    elif len(comp) >= 5:
        say("importance: fANOVA and PED-ANOVA")
        try:
            res.importance = ParamImportance(n_bootstrap=importance_bootstrap, ci=ci, seed=seed).fit(
                comp, y, space, mode=data.mode, groups=groups)
        except (ValueError, RuntimeError) as exc:  # fANOVA raises RuntimeError when the metric never varies
            res.importance_skipped = str(exc)
    else:
        res.importance_skipped = f"only {len(comp)} completed trials (need 5)"

    if interactions:
        _fit_trends(res, comp, y, groups, losses, sur if use_sur else None, names, tolerance,
                    n_bootstrap, ci, seed, say)
        _fit_views_batch(res, comp, y, groups, sur if use_sur else None, names, n_bootstrap, ci, seed, say)
    if scaling:
        _fit_scaling(res, data, n_bootstrap, ci, seed, say)
    return res


def _fit_trends(res: SensitivityResult, comp: pd.DataFrame, y: Array, groups: Array, losses: list[str],
                sur: Surrogate | None, names: list[str], tolerance: float, n_bootstrap: int, ci: float,
                seed: int, say: Callable[[str], None]) -> None:
    space = res.space
    if "temperature" not in space or "batch_size" not in space:
        missing = [p for p in ("temperature", "batch_size") if p not in space]
        res.trend_skipped[None] = f"{' and '.join(missing)} not searched"
        return
    say("interaction: optimal temperature per batch size")
    t_spec, b_spec = space["temperature"], space["batch_size"]
    for L in [None, *losses]:
        sel = (comp["temperature"].notna() & comp["batch_size"].notna()).to_numpy().copy()
        if L is not None:
            sel &= (comp["loss"].astype(object) == L).to_numpy()
        rows = np.flatnonzero(sel)
        if rows.size < 6:
            res.trend_skipped[L] = f"only {rows.size} completed trials"
            continue
        offset = None
        if sur is not None and _varies(comp.iloc[rows], [q for q in space if q not in ("temperature", "batch_size")]):
            offset = PartialResiduals(sur, seed=seed).fit(
                rows, [names.index("temperature"), names.index("batch_size")], continuous=0)
        try:
            # tau*(B) is read on log-log axes (tau* ~ B^slope) whatever scale the search used.
            log_by = bool((comp["batch_size"].iloc[rows] > 0).all())
            res.trends[L] = OptimumTrend(mode=res.mode, log_x=t_spec.log, log_by=log_by,
                                         n_bootstrap=n_bootstrap, ci=ci, tolerance=tolerance, seed=seed).fit(
                comp["temperature"].to_numpy(dtype=float)[rows], comp["batch_size"].to_numpy(dtype=float)[rows],
                y[rows], groups=groups[rows], offset=offset)
        except ValueError as exc:
            res.trend_skipped[L] = str(exc)
    # Heat map of the metric over (temperature, batch size), pooled over losses.
    t = comp["temperature"].to_numpy(dtype=float)
    b = comp["batch_size"].to_numpy(dtype=float)
    ok = np.isfinite(t) & np.isfinite(b)
    if ok.sum() < 4:
        return
    rows = np.flatnonzero(ok)
    if sur is not None:
        pr = PartialResiduals(sur, seed=seed).fit(
            rows, [names.index("temperature"), names.index("batch_size")], continuous=0)
        grids, pdv = pr.grids_, pr.pd_
        tx = 10.0 ** grids[0] if t_spec.log else grids[0]
        bx = 10.0 ** grids[1] if b_spec.log else grids[1]
        res.heat = {"x": tx, "by": bx, "z": pdv.T, "source": "partial dependence of the surrogate"}
    else:
        tb, tc = discretize(t[rows], 10, t_spec.log)
        bb, bc = discretize(b[rows], 8, b_spec.log)
        z = np.full((bc.size, tc.size), np.nan)
        for i in range(bc.size):
            for j in range(tc.size):
                m = (bb == i) & (tb == j)
                if m.any():
                    z[i, j] = y[rows][m].mean()
        res.heat = {"x": tc, "by": bc, "z": z, "source": "mean of observed trials per cell"}


def _fit_views_batch(res: SensitivityResult, comp: pd.DataFrame, y: Array, groups: Array,
                     sur: Surrogate | None, names: list[str], n_bootstrap: int, ci: float, seed: int,
                     say: Callable[[str], None]) -> None:
    space = res.space
    need = [p for p in ("views", "batch_size") if p not in space]
    if need or "samples_seen" not in comp.columns:
        res.views_batch_skipped = (f"{' and '.join(need)} not searched" if need
                                   else "no samples_seen column")
        return
    say("interaction: views vs batch size at equal samples seen")
    v = comp["views"].to_numpy(dtype=float)
    b = comp["batch_size"].to_numpy(dtype=float)
    s = comp["samples_seen"].to_numpy(dtype=float)
    rows = np.flatnonzero(np.isfinite(v) & np.isfinite(b) & np.isfinite(s) & (s > 0))
    if rows.size < 4:
        res.views_batch_skipped = f"only {rows.size} completed trials with views, batch size and samples seen"
        return
    offset = None
    if sur is not None and _varies(comp.iloc[rows], [q for q in space if q not in ("views", "batch_size")]):
        offset = PartialResiduals(sur, seed=seed).fit(
            rows, [names.index("views"), names.index("batch_size")], continuous=None).offset()
    try:
        res.views_batch = ViewsBatchComparison(mode=res.mode, n_bootstrap=n_bootstrap, ci=ci, seed=seed).fit(
            v[rows], b[rows], s[rows], y[rows], groups=groups[rows], offset=offset)
    except ValueError as exc:
        res.views_batch_skipped = str(exc)


def _fit_scaling(res: SensitivityResult, data: TrialData, n_bootstrap: int, ci: float, seed: int,
                 say: Callable[[str], None]) -> None:
    reached = data.reached.reset_index(drop=True)
    axes = compute_axes(reached)
    if not axes:
        res.scaling_skipped["view_samples"] = "no samples_seen column"
    if "flops" not in axes:
        res.scaling_skipped["flops"] = "no flops_per_sample values (encoder forward FLOPs per image)"
    y = reached[data.metric].to_numpy(dtype=float)
    for axis, (c, label) in axes.items():
        say(f"compute scaling against {axis}")
        res.scaling_points[axis] = {"compute": c, "metric": y, "status": reached["status"].to_numpy(dtype=object),
                                    "label": label}
        try:
            res.scaling[axis] = ComputeScaling(mode=data.mode, n_bootstrap=n_bootstrap, ci=ci, seed=seed).fit(c, y)
        except ValueError as exc:
            res.scaling_skipped[axis] = str(exc)
