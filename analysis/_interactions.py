"""Interactions: optimum of one parameter per level of another, views vs batch (private)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from analysis._curve import SensitivityCurve
from analysis._models import check_estimator_args, cluster_bootstrap_weights, discretize, group_ids, percentile_ci

Array = np.ndarray


class OptimumTrend:
    """The optimum of ``x`` (e.g. temperature) at each level of ``by`` (e.g. batch size).

    Per level a quadratic :class:`SensitivityCurve` (in log x when ``log_x``) gives the optimum
    and its bootstrap CI; a log-log line through the optima gives ``x* ~ by^slope`` with a CI
    from pairing the per-level bootstrap replicates.

    Fitted: ``levels_``, ``optima_``, ``optima_ci_``, ``n_trials_`` (per level), ``curves_``,
    ``slope_``, ``slope_ci_``, ``intercept_``.
    """

    def __init__(self, *, mode: str = "max", log_x: bool = True, log_by: bool = True,
                 n_bootstrap: int = 200, ci: float = 0.9, max_levels: int = 6, min_trials: int = 6,
                 tolerance: float = 0.01, seed: int = 0) -> None:
        self.mode = mode
        self.log_x = log_x
        self.log_by = log_by
        self.n_bootstrap = n_bootstrap
        self.ci = ci
        self.max_levels = max_levels
        self.min_trials = min_trials
        self.tolerance = tolerance
        self.seed = seed

    def fit(self, x: Any, by: Any, y: Any, *, groups: Any = None, offset: Any = None) -> OptimumTrend:
        check_estimator_args(self.n_bootstrap, self.ci, self.mode)
        x, by, y = (np.asarray(a, dtype=float) for a in (x, by, y))
        g = group_ids(groups, x.size)
        lvl, centres = discretize(by, self.max_levels, self.log_by)
        self.levels_, self.optima_, self.optima_ci_, self.n_trials_ = [], [], [], []
        self.curves_: list[SensitivityCurve] = []
        boots = []
        for k, c in enumerate(centres):
            sel = lvl == k
            if sel.sum() < self.min_trials or np.unique(x[sel]).size < 3:
                continue
            if callable(getattr(offset, "subset", None)):  # PartialResiduals: re-weighted per resample
                off: Any = offset.subset(sel)
            else:
                off = None if offset is None else np.asarray(offset, dtype=float)[sel]
            curve = SensitivityCurve(models=("quadratic",), log_scale=self.log_x, mode=self.mode,
                                     tolerance=self.tolerance, n_bootstrap=self.n_bootstrap,
                                     ci=self.ci, seed=self.seed + k).fit(x[sel], y[sel], groups=g[sel],
                                                                         offset=off)
            self.levels_.append(float(c))
            self.optima_.append(curve.optimum_)
            self.optima_ci_.append(curve.optimum_ci_)
            self.n_trials_.append(int(sel.sum()))
            self.curves_.append(curve)
            boots.append(curve.bootstrap_optima_)
        if not self.levels_:
            raise ValueError(f"no level of 'by' has {self.min_trials} trials with 3 distinct x values")
        self.slope_ = self.intercept_ = None
        self.slope_ci_: tuple[float, float] | None = None
        if len(self.levels_) >= 2:
            lb = np.log10(self.levels_) if self.log_by else np.asarray(self.levels_)
            tx = np.log10 if self.log_x else (lambda a: a)
            slope, icpt = np.polyfit(lb, tx(np.asarray(self.optima_)), 1)
            B = np.stack([tx(b) for b in boots], axis=1)  # (n_boot, L)
            lc = lb - lb.mean()
            bs = (B - B.mean(axis=1, keepdims=True)) @ lc / (lc @ lc)
            lo, hi = percentile_ci(bs, self.ci)
            self.slope_, self.intercept_ = float(slope), float(icpt)
            self.slope_ci_ = (float(lo), float(hi))
        return self

    def predict(self, by: Any) -> Array:
        """The log-log trend of the optimum at ``by`` (needs two or more levels)."""
        if self.slope_ is None:
            raise ValueError("the trend needs optima at two or more levels")
        b = np.asarray(by, dtype=float)
        t = self.intercept_ + self.slope_ * (np.log10(b) if self.log_by else b)
        return 10.0 ** t if self.log_x else t

    def to_dict(self) -> dict[str, Any]:
        return {
            "levels": [{"by": lv, "optimum": o, "optimum_ci": list(ci), "n_trials": n,
                        "metric_at_optimum": c.metric_at_optimum_}
                       for lv, o, ci, n, c in zip(self.levels_, self.optima_, self.optima_ci_,
                                                  self.n_trials_, self.curves_)],
            "slope": self.slope_,
            "slope_ci": None if self.slope_ci_ is None else list(self.slope_ci_),
            "slope_meaning": "d log10(optimum) / d log10(by)" if self.log_by and self.log_x else "linear slope",
        }


class ViewsBatchComparison:
    """Metric per (views, batch size) cell at equal samples seen, with bootstrap CIs.

    Within each samples-seen level (exact values, or log-quantile bins when there are many),
    cell means of the (adjusted) metric get percentile CIs from resampling configurations. For
    each product ``views x batch`` (embeddings per step) reached with several view counts, the
    best view count is reported with the CI of its lead over the runner-up.

    Fitted: ``cells_`` (DataFrame), ``iso_`` (list of dicts), ``best_`` (per level).
    """

    def __init__(self, *, mode: str = "max", n_bootstrap: int = 200, ci: float = 0.9,
                 max_levels: int = 4, max_batch_levels: int = 6, min_cell: int = 2, seed: int = 0) -> None:
        self.mode = mode
        self.n_bootstrap = n_bootstrap
        self.ci = ci
        self.max_levels = max_levels
        self.max_batch_levels = max_batch_levels
        self.min_cell = min_cell
        self.seed = seed

    def fit(self, views: Any, batch: Any, samples_seen: Any, y: Any, *, groups: Any = None,
            offset: Any = None) -> ViewsBatchComparison:
        check_estimator_args(self.n_bootstrap, self.ci, self.mode)
        v, b, s, y = (np.asarray(a, dtype=float) for a in (views, batch, samples_seen, y))
        if offset is not None:
            y = y - np.asarray(offset, dtype=float)
        g = group_ids(groups, y.size)
        rng = np.random.default_rng(self.seed)
        s_idx, s_lv = discretize(s, self.max_levels, True)
        b_idx, b_lv = discretize(b, self.max_batch_levels, True)
        sign = 1.0 if self.mode == "max" else -1.0
        rows, iso = [], []
        for k, level in enumerate(s_lv):
            sel = np.flatnonzero(s_idx == k)
            if sel.size < 2 * self.min_cell:
                continue
            gv = group_ids(g[sel], sel.size)
            W = cluster_bootstrap_weights(gv, self.n_bootstrap, rng)
            cells = {}
            for vv in np.unique(v[sel]):
                for bi in np.unique(b_idx[sel]):
                    m = (v[sel] == vv) & (b_idx[sel] == bi)
                    if np.unique(gv[m]).size < self.min_cell:
                        continue  # a CI needs several configurations, not only seed repeats
                    ys = y[sel][m]
                    wsum = W[:, m].sum(axis=1)
                    bm = np.where(wsum > 0, (W[:, m] @ ys) / np.maximum(wsum, 1e-300), np.nan)
                    cells[(vv, bi)] = bm
                    lo, hi = percentile_ci(bm, self.ci)
                    rows.append({"samples_seen": float(level), "views": int(vv),
                                 "batch_size": float(b_lv[bi]), "metric": float(ys.mean()),
                                 "ci": [float(lo), float(hi)], "n_trials": int(m.sum()),
                                 "n_configs": int(np.unique(gv[m]).size)})
            prods: dict[float, list[tuple[float, int]]] = {}
            for (vv, bi) in cells:
                prods.setdefault(float(vv * b_lv[bi]), []).append((vv, bi))
            for prod, members in sorted(prods.items()):
                if len({m[0] for m in members}) < 2:
                    continue
                means = {m: float(np.nanmean(cells[m])) for m in members}
                order = sorted(members, key=lambda m: -sign * means[m])
                lead = sign * (cells[order[0]] - cells[order[1]])
                lo, hi = percentile_ci(lead, self.ci)
                iso.append({"samples_seen": float(level), "views_x_batch": prod,
                            "best_views": int(order[0][0]), "best_batch_size": float(b_lv[order[0][1]]),
                            "runner_up_views": int(order[1][0]),
                            "lead": float(np.nanmean(lead)), "lead_ci": [float(lo), float(hi)]})
        if not rows:
            raise ValueError("no samples-seen level has two (views, batch) cells with enough trials")
        self.cells_ = pd.DataFrame(rows)
        self.iso_ = iso
        best = []
        for level, grp in self.cells_.groupby("samples_seen"):
            top = grp.iloc[int(np.argmax(sign * grp["metric"].to_numpy()))]
            best.append({"samples_seen": float(level), "views": int(top["views"]),
                         "batch_size": float(top["batch_size"]), "metric": float(top["metric"])})
        self.best_ = best
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"cells": self.cells_.to_dict(orient="records"), "iso_embeddings": self.iso_,
                "best": self.best_}
