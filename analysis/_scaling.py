"""Compute scaling: Pareto frontier and a saturating power law (private; see :mod:`analysis.fit`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from analysis._models import build_model, check_estimator_args, cluster_bootstrap_weights, percentile_ci

Array = np.ndarray


def pareto_frontier(compute: Array, y: Array, mode: str = "max") -> Array:
    """Indices of the Pareto frontier (no other point has less compute and a better metric),
    in increasing compute."""
    sign = 1.0 if mode == "max" else -1.0
    order = np.lexsort((-sign * y, compute))
    ys = sign * y[order]
    prev = np.concatenate([[-np.inf], np.maximum.accumulate(ys)[:-1]])
    return order[ys > prev]


class ComputeScaling:
    """Metric vs compute: Pareto frontier + saturating power law ``y = a + b (C/C_ref)^-c``.

    The power law is fitted to the frontier (the best metric reached at each compute). The band
    comes from bootstrapping the frontier points and refitting; it is evaluated up to
    ``extrapolate`` times the largest compute. Validation: the largest-compute
    ``holdout_fraction`` of trials is held out, the fit is redone on the rest, and its prediction
    (and band) is compared with the held-out frontier points.

    Fitted: ``frontier_`` (indices), ``params_``, ``grid_``, ``curve_``, ``band_``, ``holdout_``.
    """

    def __init__(self, *, mode: str = "max", n_bootstrap: int = 200, ci: float = 0.9,
                 holdout_fraction: float = 0.2, extrapolate: float = 10.0, grid_size: int = 200,
                 min_frontier: int = 5, seed: int = 0) -> None:
        self.mode = mode
        self.min_frontier = min_frontier
        self.n_bootstrap = n_bootstrap
        self.ci = ci
        self.holdout_fraction = holdout_fraction
        self.extrapolate = extrapolate
        self.grid_size = grid_size
        self.seed = seed

    def _fit_core(self, c: Array, y: Array, rng: np.random.Generator,
                  grid: Array) -> tuple[Any, Array, Array, Array]:
        model = build_model("power_law")
        front = pareto_frontier(c, y, self.mode)
        if front.size < self.min_frontier:
            raise ValueError(f"the Pareto frontier has {front.size} points; the power-law fit needs "
                             f"{self.min_frontier} (3 parameters + 2 to check them)")
        model.prepare(np.log10(c[front]), c[front], y[front])
        params = model.fit(np.ones((1, front.size)), np.log10(c[front]), c[front], y[front])
        # Bootstrap the frontier points (pairs bootstrap). Resampling trials and recomputing the
        # frontier would bias it low: the best of a resample is never better than the best of all.
        W = cluster_bootstrap_weights(np.arange(front.size), self.n_bootstrap, rng)
        boot_params = model.fit(W, np.log10(c[front]), c[front], y[front])
        boot = model.predict(boot_params, np.log10(grid), grid)
        return model, params, boot, front

    def fit(self, compute: Any, y: Any) -> ComputeScaling:
        check_estimator_args(self.n_bootstrap, self.ci, self.mode)
        c = np.asarray(compute, dtype=float)
        y = np.asarray(y, dtype=float)
        ok = np.isfinite(c) & np.isfinite(y) & (c > 0)
        if ok.sum() < 4:
            raise ValueError("need at least 4 trials with positive compute and a finite metric")
        c, y = c[ok], y[ok]
        if np.unique(c).size < 3:
            raise ValueError("compute takes fewer than 3 distinct values")
        rng = np.random.default_rng(self.seed)
        self.grid_ = np.geomspace(c.min(), c.max() * self.extrapolate, self.grid_size)
        model, params, boot, front = self._fit_core(c, y, rng, self.grid_)
        self._model, self._params = model, params
        self.params_ = model.describe(params[0])
        self.curve_ = model.predict(params, np.log10(self.grid_), self.grid_)[0]
        self.band_ = percentile_ci(boot, self.ci)
        self.frontier_ = front
        self.compute_, self.y_ = c, y
        self.holdout_ = self._validate(c, y, rng)
        return self

    def _validate(self, c: Array, y: Array, rng: np.random.Generator) -> dict[str, Any]:
        """Refit without the largest-compute trials; score the extrapolation against the
        observed frontier envelope (best metric at compute <= C over all trials) at the held-out
        compute levels."""
        cut = float(np.quantile(c, 1.0 - self.holdout_fraction))
        train = c < cut
        out: dict[str, Any] = {"holdout_fraction": self.holdout_fraction, "compute_threshold": cut,
                               "n_train": int(train.sum()), "n_holdout": int((~train).sum())}
        if train.sum() < 4 or train.all():
            out["skipped"] = "too few trials below the held-out compute threshold"
            return out
        levels = np.unique(c[~train])
        if levels.size > 20:
            levels = np.unique(np.quantile(levels, np.linspace(0, 1, 20), method="nearest"))
        sign = 1.0 if self.mode == "max" else -1.0
        order = np.argsort(c, kind="stable")
        env = np.maximum.accumulate(sign * y[order])
        target = sign * env[np.searchsorted(c[order], levels, side="right") - 1]
        try:
            model, params, boot, _ = self._fit_core(c[train], y[train], rng, levels)
        except ValueError as exc:
            out["skipped"] = str(exc)
            return out
        pred = model.predict(params, np.log10(levels), levels)[0]
        lo, hi = percentile_ci(boot, self.ci)
        err = pred - target
        out.update({"n_levels": int(levels.size), "mae": float(np.mean(np.abs(err))),
                    "max_abs_error": float(np.max(np.abs(err))), "bias": float(np.mean(err)),
                    "coverage": float(np.mean((target >= lo) & (target <= hi))),
                    "compute": levels.tolist(), "observed": target.tolist(), "predicted": pred.tolist(),
                    "band_lo": lo.tolist(), "band_hi": hi.tolist()})
        return out

    def predict(self, compute: Any) -> Array:
        c = np.asarray(compute, dtype=float)
        return self._model.predict(self._params, np.log10(c), c)[0]

    def to_dict(self) -> dict[str, Any]:
        cmax = float(self.compute_.max())
        at = np.searchsorted(self.grid_, cmax * self.extrapolate) - 1
        return {
            "model": "power_law",
            "params": self.params_,
            "asymptote": self.params_["a"],
            "n_points": int(self.compute_.size),
            "n_frontier": int(self.frontier_.size),
            "frontier": [{"compute": float(self.compute_[i]), "metric": float(self.y_[i])} for i in self.frontier_],
            "extrapolation": {"compute": float(self.grid_[at]), "metric": float(self.curve_[at]),
                              "ci": [float(self.band_[0][at]), float(self.band_[1][at])],
                              "factor": self.extrapolate},
            "holdout": {k: v for k, v in self.holdout_.items()
                        if k not in ("compute", "observed", "predicted", "band_lo", "band_hi")},
        }


#: Encoder forward FLOPs per image: the contract's name, then the study engine's spellings.
FLOPS_COLUMNS = ("flops_per_sample", "flops_per_image", "derived.flops_per_image")


def compute_axes(frame: pd.DataFrame) -> dict[str, tuple[Array, str]]:
    """Compute measures per trial: ``view_samples`` (samples seen x views) and ``flops``
    (3 x encoder forward FLOPs per view x views x samples seen: forward + backward ~ 3 forwards)."""
    out: dict[str, tuple[Array, str]] = {}
    if "samples_seen" not in frame.columns:
        return out
    s = pd.to_numeric(frame["samples_seen"], errors="coerce").to_numpy(dtype=float)
    v = (pd.to_numeric(frame["views"], errors="coerce").to_numpy(dtype=float)
         if "views" in frame.columns else np.full(s.size, np.nan))
    if np.isfinite(v).any():
        out["view_samples"] = (s * np.where(np.isfinite(v), v, 2.0), "view-samples (images seen x views)")
    else:
        out["view_samples"] = (s * 2.0, "view-samples (images seen x 2 views)")
    for col in FLOPS_COLUMNS:
        if col in frame.columns:
            f = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=float)
            if np.isfinite(f).any():
                out["flops"] = (3.0 * f * out["view_samples"][0], "training FLOPs (3 x forward x view-samples)")
                break
    return out
