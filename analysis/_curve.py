"""One-dimensional sensitivity curves (private; the public names live in :mod:`analysis.fit`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from analysis._models import (
    build_model,
    check_estimator_args,
    cluster_bootstrap_weights,
    group_folds,
    group_ids,
    percentile_ci,
)

Array = np.ndarray

DEFAULT_MODELS = ("quadratic", "power_law", "spline")
#: Parameters whose response is expected to saturate: the power law is preferred on CV ties.
SATURATING = ("batch_size", "epochs", "width", "fraction", "samples_seen", "proj_dim")


def default_models(param: str) -> tuple[str, ...]:
    """Candidate models in order of preference for a parameter (see :class:`SensitivityCurve`)."""
    return ("power_law", "quadratic", "spline") if param in SATURATING else DEFAULT_MODELS


def _compress(u: Array, x: Array, max_points: int) -> tuple[Array, Array, Array] | None:
    """Map observations to at most ``max_points`` levels of x for the weighted fits.

    Exact when x has few distinct values; otherwise quantile bins of ``u`` whose level is the
    bin's mean ``u`` (each bin holds 1/``max_points`` of the trials). ``None`` when there is
    nothing to gain. Returns (level per observation, u per level, x per level).
    """
    uniq, inv = np.unique(x, return_inverse=True)
    inv = inv.ravel()
    if uniq.size <= max_points:
        if uniq.size * 2 > x.size:
            return None
        return inv, np.array([u[inv == k][0] for k in range(uniq.size)]), uniq
    edges = np.unique(np.quantile(u, np.linspace(0.0, 1.0, max_points + 1)))
    lvl = np.clip(np.searchsorted(edges, u, side="right") - 1, 0, edges.size - 2)
    lvl = np.unique(lvl, return_inverse=True)[1].ravel()
    cnt = np.bincount(lvl)
    ul = np.bincount(lvl, weights=u) / cnt
    xl = np.bincount(lvl, weights=x) / cnt
    return lvl, ul, xl


def _aggregate(W: Array, Y: Array, lvl: Array, n_levels: int) -> tuple[Array, Array]:
    """Per-level weights and weighted mean responses: (B, L) each. ``Y`` is (n,) or (B, n)."""
    B = W.shape[0]
    flat = (lvl[None, :] + (np.arange(B) * n_levels)[:, None]).ravel()
    wl = np.bincount(flat, weights=W.ravel(), minlength=B * n_levels).reshape(B, n_levels)
    wy = W * (Y[None, :] if Y.ndim == 1 else Y)
    syl = np.bincount(flat, weights=wy.ravel(), minlength=B * n_levels).reshape(B, n_levels)
    return wl, np.where(wl > 0, syl / np.where(wl > 0, wl, 1.0), 0.0)

class SensitivityCurve:
    """Metric against one numeric hyperparameter, with a bootstrap band and optimum CI.

    Parameters
    ----------
    models: candidate model names in order of preference (``quadratic``, ``power_law``,
        ``spline``; ``linear`` is used alone when x took two values). The CV winner is replaced
        by the first preferred model within ``se_rule`` standard errors of it (paired over
        trials; the "one-SE rule" with a stricter default of 2, as the spline is the fallback).
        One name fixes the model (no CV).
    log_scale: work in ``log10 x`` (quadratic and spline are then in log x).
    mode: ``max`` or ``min`` (the direction of the metric).
    tolerance: the tolerance width's Δ in metric units (0.01 = 1 point on a [0, 1] metric).
    n_bootstrap: resamples of whole configurations (``groups``) for the CIs.
    ci: the two-sided confidence level (0.9 -> 5th..95th percentiles).
    n_folds: grouped K-fold for model choice.
    grid_size: points of the evaluation grid over the observed x range.
    max_points, max_levels: above ``max_points`` trials the weighted fits run on per-level
        sufficient statistics (x's distinct values, or ``max_levels`` quantile bins of a
        continuous x with the bin's mean as its level): same estimates, a fraction of the cost.
    se_rule: how many standard errors of CV error a preferred model may trail the best by.
    seed: the random seed of folds and resamples.

    With partial residuals (``offset``) the curve is the *marginal* response: its level, and
    ``metric_at_optimum_``, are averages over the other hyperparameters, not the metric of the
    best configuration.

    Fitted attributes
    -----------------
    model_, cv_errors_, params_, grid_ (x), curve_, band_ (lo, hi), optimum_, optimum_ci_,
    metric_at_optimum_, metric_at_optimum_ci_, tolerance_width_, tolerance_width_ci_,
    bootstrap_optima_, n_trials_, n_configs_, x_, y_ (the fitted, possibly adjusted, values).
    """

    def __init__(self, *, models: Sequence[str] = DEFAULT_MODELS, log_scale: bool = False,
                 mode: str = "max", tolerance: float = 0.01, n_bootstrap: int = 200,
                 ci: float = 0.9, n_folds: int = 5, grid_size: int = 401, max_points: int = 1000,
                 max_levels: int = 400, se_rule: float = 2.0, seed: int = 0) -> None:
        self.models = models
        self.log_scale = log_scale
        self.mode = mode
        self.tolerance = tolerance
        self.n_bootstrap = n_bootstrap
        self.ci = ci
        self.n_folds = n_folds
        self.grid_size = grid_size
        self.max_points = max_points
        self.max_levels = max_levels
        self.se_rule = se_rule
        self.seed = seed

    # -- coordinates
    def _t(self, x: Array) -> Array:
        return np.log10(x) if self.log_scale else x

    def _u(self, x: Array) -> Array:
        return (self._t(x) - self._center) / self._half

    def fit(self, x: Any, y: Any, *, groups: Any = None, offset: Any = None) -> SensitivityCurve:
        """Fit ``y - offset`` against ``x``; ``groups`` labels seed repeats of one config.

        ``offset`` is an array (n,) or a fitted :class:`~analysis.fit.PartialResiduals`, whose
        offsets are recomputed under every bootstrap resample.
        """
        check_estimator_args(self.n_bootstrap, self.ci, self.mode)
        x = np.asarray(x, dtype=float)
        y = np.asarray(y, dtype=float)
        if x.ndim != 1 or x.shape != y.shape:
            raise ValueError(f"x and y must be 1-D of equal length, got {x.shape} and {y.shape}")
        y_raw = y
        resampled = offset if callable(getattr(offset, "offset", None)) else None  # PartialResiduals
        if resampled is not None:
            y = y - resampled.offset()
        elif offset is not None:
            y = y - np.asarray(offset, dtype=float)
        ok = np.isfinite(x) & np.isfinite(y)
        if not ok.all():
            raise ValueError("x and y must be finite (drop missing trials before fitting)")
        if np.unique(x).size < 2:
            raise ValueError("x must take at least two distinct values")
        if self.log_scale and (x <= 0).any():
            raise ValueError("log_scale needs x > 0")
        g = group_ids(groups, x.size)
        rng = np.random.default_rng(self.seed)
        t = self._t(x)
        self._center = (t.max() + t.min()) / 2.0
        self._half = max((t.max() - t.min()) / 2.0, 1e-12)
        u = self._u(x)
        n_unique = np.unique(x).size
        names = [m for m in self.models
                 if build_model(m).min_unique <= n_unique and not (m == "power_law" and (x <= 0).any())]
        if not names:
            names = ["linear"] if n_unique < 3 else ["quadratic"]
        cands = [build_model(m) for m in names]
        for m in cands:
            m.prepare(u, x, y)
        packed = _compress(u, x, self.max_levels) if x.size > self.max_points else None

        def wfit(m: Any, W: Array, Y: Array) -> Array:
            # Weighted fits on per-level sufficient statistics when there are many trials.
            if packed is None:
                return m.fit(W, u, x, Y)
            lvl, ul, xl = packed
            wl, yl = _aggregate(W, Y, lvl, ul.size)
            return m.fit(wl, ul, xl, yl)

        self.cv_errors_: dict[str, float] = {}
        if len(cands) > 1 and np.unique(g).size >= 3:
            masks = group_folds(g, self.n_folds, rng)
            held = 1.0 - masks
            sq = {}
            for m in cands:
                pred = m.predict(wfit(m, masks, y), u, x)
                sq[m.name] = np.sum(held * (pred - y[None, :]) ** 2, axis=0)  # each trial's CV error
                self.cv_errors_[m.name] = float(sq[m.name].mean())
            best = min(self.cv_errors_, key=self.cv_errors_.__getitem__)
            # Standard-error rule (paired over trials): the first model in preference order whose
            # CV error is within ``se_rule`` SEs of the best wins; the spline (last) only wins when
            # the parametric models are clearly worse.
            chosen = best
            for m in cands:
                d = sq[m.name] - sq[best]
                se = d.std(ddof=1) / np.sqrt(d.size) if d.size > 1 else 0.0
                if d.mean() <= self.se_rule * se:
                    chosen = m.name
                    break
            model = cands[[m.name for m in cands].index(chosen)]
        else:
            model = cands[0]
        self._model = model
        self.model_ = model.name
        params = wfit(model, np.ones((1, x.size)), y)
        self.params_ = model.describe(params[0])
        self._params = params
        tg = np.linspace(t.min(), t.max(), self.grid_size)
        self.grid_ = 10.0 ** tg if self.log_scale else tg
        ug = self._u(self.grid_)
        self.curve_ = model.predict(params, ug, self.grid_)[0]
        W = cluster_bootstrap_weights(g, self.n_bootstrap, rng)
        Y = y if resampled is None else y_raw[None, :] - resampled.offset(W)
        self._boot_params = wfit(model, W, Y)
        boot = model.predict(self._boot_params, ug, self.grid_)
        self.band_ = percentile_ci(boot, self.ci)
        sign = 1.0 if self.mode == "max" else -1.0
        i_opt = int(np.argmax(sign * self.curve_))
        t_opt = _refine_argmax(tg, sign * self.curve_[None, :], np.array([i_opt]))[0]
        self.optimum_ = float(self._inv(t_opt))
        self.metric_at_optimum_ = float(self.predict(np.array([self.optimum_]))[0])
        b_opt = np.argmax(sign * boot, axis=1)
        tb = _refine_argmax(tg, sign * boot, b_opt)
        self.bootstrap_optima_ = self._inv_array(tb)
        lo, hi = percentile_ci(tb, self.ci)
        self.optimum_ci_ = (float(self._inv(lo)), float(self._inv(hi)))
        self.metric_at_optimum_ci_ = tuple(float(v) for v in percentile_ci(boot[np.arange(len(boot)), b_opt], self.ci))
        lo_i, hi_i = _tolerance_bounds(sign * self.curve_[None, :], np.array([i_opt]), self.tolerance)
        self.tolerance_width_ = (float(self.grid_[lo_i[0]]), float(self.grid_[hi_i[0]]))
        blo, bhi = _tolerance_bounds(sign * boot, b_opt, self.tolerance)
        self.tolerance_width_ci_ = (
            tuple(float(self._inv(v)) for v in percentile_ci(self._t(self.grid_[blo]), self.ci)),
            tuple(float(self._inv(v)) for v in percentile_ci(self._t(self.grid_[bhi]), self.ci)),
        )
        edge = None
        if i_opt == 0:
            edge = "lower"
        elif i_opt == self.grid_size - 1:
            edge = "upper"
        self.optimum_at_edge_ = edge
        self.n_trials_ = int(x.size)
        self.n_configs_ = int(np.unique(g).size)
        self.x_, self.y_ = x, y
        return self

    def _inv(self, t: float) -> float:
        return 10.0 ** t if self.log_scale else t

    def _inv_array(self, t: Array) -> Array:
        return 10.0 ** t if self.log_scale else t

    def predict(self, x: Any) -> Array:
        """The point fit at ``x``."""
        x = np.asarray(x, dtype=float)
        return self._model.predict(self._params, self._u(x), x)[0]

    def predict_interval(self, x: Any) -> tuple[Array, Array]:
        """The pointwise bootstrap band (``ci``) at ``x``."""
        x = np.asarray(x, dtype=float)
        return percentile_ci(self._model.predict(self._boot_params, self._u(x), x), self.ci)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_,
            "optimum": self.optimum_,
            "optimum_ci": list(self.optimum_ci_),
            "metric_at_optimum": self.metric_at_optimum_,
            "metric_at_optimum_ci": list(self.metric_at_optimum_ci_),
            "tolerance_width": list(self.tolerance_width_),
            "tolerance_width_ci": [list(self.tolerance_width_ci_[0]), list(self.tolerance_width_ci_[1])],
            "optimum_at_edge": self.optimum_at_edge_,
            "n_trials": self.n_trials_,
            "n_configs": self.n_configs_,
            "cv_mse": self.cv_errors_,
            "params": self.params_,
            "scale": "log" if self.log_scale else "linear",
            "n_bootstrap": self.n_bootstrap,
            "ci_level": self.ci,
        }

def _refine_argmax(t: Array, score: Array, idx: Array) -> Array:
    """Sub-grid argmax: the vertex of the parabola through each row's best grid point and its
    neighbours (exact for a quadratic), kept within the neighbouring grid points."""
    G = t.size
    rows = np.arange(score.shape[0])
    inner = (idx > 0) & (idx < G - 1)
    i = np.clip(idx, 1, G - 2)
    y0, y1, y2 = score[rows, i - 1], score[rows, i], score[rows, i + 1]
    denom = y0 - 2.0 * y1 + y2
    step = t[1] - t[0] if G > 1 else 0.0
    shift = np.where(denom < 0, 0.5 * (y0 - y2) / np.where(denom < 0, denom, -1.0), 0.0)
    shift = np.clip(shift, -1.0, 1.0)
    return np.where(inner, t[i] + shift * step, t[idx])


def _tolerance_bounds(score: Array, opt: Array, tol: float) -> tuple[Array, Array]:
    """Per row: the contiguous index range around ``opt`` with ``score >= score[opt] - tol``."""
    rows = np.arange(score.shape[0])
    best = score[rows, opt]
    bad = score < (best - tol)[:, None]
    idx = np.arange(score.shape[1])[None, :]
    left_bad = np.where(bad & (idx < opt[:, None]), idx, -1).max(axis=1)
    right_bad = np.where(bad & (idx > opt[:, None]), idx, score.shape[1]).min(axis=1)
    return left_bad + 1, right_bad - 1
