"""Surrogates of the metric and partial residuals (private; see :mod:`analysis.fit`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.ensemble import RandomForestRegressor
from threadpoolctl import threadpool_limits

from analysis._models import discretize
from analysis.table import ParamSpec

Array = np.ndarray


def encode_features(frame: pd.DataFrame, space: Mapping[str, ParamSpec]) -> tuple[Array, list[str], list[int]]:
    """Trials -> numeric features: log10 for log-scale params, integer codes for choices.

    Returns ``(X, names, categorical)``; ``X`` holds NaN where a (conditional) parameter does
    not apply, and ``categorical`` lists the columns that are codes.
    """
    cols: list[Array] = []
    names: list[str] = []
    categorical: list[int] = []
    for name, spec in space.items():
        if name not in frame.columns:
            continue
        if spec.numeric:
            v = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float)
            if spec.log:
                with np.errstate(divide="ignore", invalid="ignore"):
                    v = np.where(v > 0, np.log10(np.where(v > 0, v, 1.0)), np.nan)
        else:
            cats = [str(c) for c in spec.values] if spec.values else None
            s = frame[name].astype(object).where(frame[name].notna(), None)
            s = s.map(lambda v: None if v is None else str(v))
            codes = pd.Categorical(s, categories=cats).codes if cats else pd.factorize(s)[0]
            v = np.where(np.asarray(codes) >= 0, np.asarray(codes, dtype=float), np.nan)
            categorical.append(len(names))
        cols.append(v)
        names.append(name)
    X = np.column_stack(cols) if cols else np.empty((len(frame), 0))
    return X, names, categorical


def config_groups(frame: pd.DataFrame, params: Sequence[str]) -> Array:
    """Cluster id per trial: trials with equal hyperparameters (seed repeats) share one."""
    present = [p for p in params if p in frame.columns]
    if not present:
        return np.arange(len(frame))
    keys = frame[present].astype(object).where(frame[present].notna(), "<na>").astype(str)
    return keys.groupby(present, sort=False).ngroup().to_numpy()


def _lbfgs(maxiter: int) -> Callable[..., tuple[Array, float]]:
    """An L-BFGS-B optimizer for scikit-learn's GP with a bounded number of iterations."""
    from scipy.optimize import minimize

    def run(obj_func: Callable[..., Any], initial_theta: Array, bounds: Array) -> tuple[Array, float]:
        r = minimize(obj_func, initial_theta, method="L-BFGS-B", jac=True, bounds=bounds,
                     options={"maxiter": maxiter})
        return r.x, float(r.fun)

    return run


class Surrogate:
    """Surrogate of the metric over all searched hyperparameters (scikit-learn).

    ``kind``: ``"gp"`` (Gaussian process, ARD RBF + white noise, hyperparameters by marginal
    likelihood on at most ``gp_fit_rows`` trials), ``"forest"`` (random forest) or ``"auto"``
    (GP up to ``gp_max_trials`` trials, forest above: a GP's cost grows as n^3, and with many
    trials the forest's flexibility is affordable).

    Each trial's prediction from a model that did not see it (GP leave-one-out, closed form;
    forest out-of-bag) is ``heldout_prediction_``; ``heldout_r2_`` is its R^2.
    """

    def __init__(self, *, kind: str = "auto", n_estimators: int = 100, min_samples_leaf: int = 3,
                 max_samples: int = 3000, gp_max_trials: int = 600, gp_fit_rows: int = 160,
                 gp_maxiter: int = 80, seed: int = 0, n_jobs: int | None = None) -> None:
        self.kind = kind
        self.n_estimators = n_estimators
        self.min_samples_leaf = min_samples_leaf
        self.max_samples = max_samples
        self.gp_max_trials = gp_max_trials
        self.gp_fit_rows = gp_fit_rows
        self.gp_maxiter = gp_maxiter
        self.seed = seed
        self.n_jobs = n_jobs

    def fit(self, X: Any, y: Any, *, categorical: Sequence[int] = ()) -> Surrogate:
        X = np.asarray(X, dtype=float)
        y = np.asarray(y, dtype=float)
        if X.ndim != 2 or X.shape[0] != y.shape[0] or X.shape[0] < 5:
            raise ValueError(f"need X (n, d) and y (n,) with n >= 5, got {X.shape} and {y.shape}")
        if self.kind not in ("auto", "gp", "forest"):
            raise ValueError(f"kind must be 'auto', 'gp' or 'forest', got {self.kind!r}")
        n = X.shape[0]
        self.kind_ = self.kind if self.kind != "auto" else ("gp" if n <= self.gp_max_trials else "forest")
        self.X_ = X
        self.categorical_ = list(categorical)
        self._prepare_design(X)
        if self.kind_ == "forest":
            self._fit_forest(self._design(X), y)
        else:
            self._fit_gp(self._design(X), y)
        ho = self.heldout_prediction_
        self.heldout_r2_ = float(1.0 - np.sum((y - ho) ** 2) / max(np.sum((y - y.mean()) ** 2), 1e-300))
        self.n_features_ = X.shape[1]
        return self

    # The design: forests take codes and a below-range sentinel for "does not apply"; the GP
    # takes standardised columns (missing -> 0, the column mean) and one-hot choices.
    def _prepare_design(self, X: Array) -> None:
        self._lo = np.nanmin(np.where(np.isfinite(X), X, np.nan), axis=0) if X.size else np.zeros(0)
        self._hi = np.nanmax(np.where(np.isfinite(X), X, np.nan), axis=0) if X.size else np.zeros(0)
        self._lo = np.nan_to_num(self._lo)
        self._hi = np.nan_to_num(self._hi)
        self._mean = np.nanmean(np.where(np.isfinite(X), X, np.nan), axis=0)
        self._sd = np.nanstd(np.where(np.isfinite(X), X, np.nan), axis=0)
        self._mean = np.nan_to_num(self._mean)
        self._sd = np.where(np.nan_to_num(self._sd) > 0, np.nan_to_num(self._sd), 1.0)
        self._n_cat = {j: int(np.nanmax(X[:, j])) + 1 if np.isfinite(X[:, j]).any() else 1
                       for j in self.categorical_}

    def _design(self, X: Array) -> Array:
        if self.kind_ == "forest":
            sentinel = self._lo - (self._hi - self._lo) - 1.0
            return np.where(np.isfinite(X), X, sentinel[None, :])
        cols = []
        for j in range(X.shape[1]):
            v = X[:, j]
            if j in self._n_cat:
                k = self._n_cat[j]
                codes = np.where(np.isfinite(v), v, -1).astype(int)
                cols.append((codes[:, None] == np.arange(k)[None, :]).astype(float))
            else:
                cols.append(np.where(np.isfinite(v), (v - self._mean[j]) / self._sd[j], 0.0)[:, None])
        return np.concatenate(cols, axis=1) if cols else np.empty((X.shape[0], 0))

    def _fit_forest(self, D: Array, y: Array) -> None:
        n = D.shape[0]
        self.model_ = RandomForestRegressor(
            n_estimators=self.n_estimators, min_samples_leaf=self.min_samples_leaf, max_features=0.5,
            max_samples=(self.max_samples / n) if n > self.max_samples else None,
            oob_score=True, random_state=self.seed, n_jobs=self.n_jobs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.model_.fit(D, y)
        oob = self.model_.oob_prediction_
        self.heldout_prediction_ = np.where(np.isfinite(oob), oob, self.model_.predict(D))

    def _fit_gp(self, D: Array, y: Array) -> None:
        from scipy.linalg import cho_factor, cho_solve
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

        rng = np.random.default_rng(self.seed)
        kernel = (ConstantKernel(1.0, (1e-3, 1e3)) * RBF(np.ones(D.shape[1]), (1e-2, 1e3))
                  + WhiteKernel(0.1, (1e-6, 1.0)))
        sub = rng.permutation(D.shape[0])[: self.gp_fit_rows]
        # Single-threaded BLAS: these are many small n x n solves, where a thread pool only adds
        # contention (12 s instead of 0.8 s measured on a busy 2-core machine).
        with threadpool_limits(1), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            hyper = GaussianProcessRegressor(kernel, normalize_y=True, optimizer=_lbfgs(self.gp_maxiter),
                                             random_state=self.seed).fit(D[sub], y[sub])
            self.model_ = GaussianProcessRegressor(hyper.kernel_, normalize_y=True, optimizer=None).fit(D, y)
        # Closed-form leave-one-out means (Rasmussen & Williams 2006, eq. 5.12).
        K = self.model_.kernel_(D)
        ys = (y - y.mean()) / (y.std() or 1.0)
        cf = cho_factor(K + 1e-10 * np.eye(K.shape[0]), lower=True)
        kinv = cho_solve(cf, np.eye(K.shape[0]))
        alpha = kinv @ ys
        self.heldout_prediction_ = y - alpha / np.diag(kinv) * (y.std() or 1.0)

    def predict(self, X: Any) -> Array:
        return self.model_.predict(self._design(np.asarray(X, dtype=float)))

    def describe(self) -> dict[str, Any]:
        name = ("sklearn.ensemble.RandomForestRegressor" if self.kind_ == "forest"
                else "sklearn.gaussian_process.GaussianProcessRegressor")
        out: dict[str, Any] = {"model": name, "kind": self.kind_, "heldout_r2": self.heldout_r2_,
                               "heldout": "out-of-bag" if self.kind_ == "forest" else "leave-one-out"}
        if self.kind_ == "gp":
            out["kernel"] = str(self.model_.kernel_)
        return out


class PartialResiduals:
    """The other hyperparameters' share of each trial: ``g_ho(x_i, z_i) - PD(x_i)``.

    Built from a fitted :class:`Surrogate` for the trials ``rows`` (positions in the surrogate's
    training set) and the surrogate ``columns`` under study (one parameter, or a pair for
    interactions). The partial dependence averages the surrogate over at most ``n_rows`` of those
    trials; under bootstrap weights that average is re-weighted (:meth:`offset` with ``W``), so the
    CIs include the sampling of the other dimensions. The ``continuous`` column gets an
    ``n_points`` grid with linear interpolation; the others their distinct values (at most
    ``max_discrete`` quantile levels).

    Fitted: ``grids_``, ``pd_`` (the partial dependence on the grid), ``heldout_``.
    """

    def __init__(self, surrogate: Surrogate, *, n_rows: int = 512, n_points: int = 24,
                 max_discrete: int = 8, seed: int = 0) -> None:
        self.surrogate = surrogate
        self.n_rows = n_rows
        self.n_points = n_points
        self.max_discrete = max_discrete
        self.seed = seed

    def fit(self, rows: Any, columns: Sequence[int], *, continuous: int | None = 0) -> PartialResiduals:
        sur = self.surrogate
        rows = np.asarray(rows, dtype=int)
        X = sur.X_[rows]
        self.grids_: list[Array] = []
        self._where: list[tuple[Array, Array | None]] = []  # per column: (index, interpolation weight)
        for j, c in enumerate(columns):
            v = X[:, c]
            uniq = np.unique(v)
            if j == continuous and uniq.size > self.n_points:
                grid = np.linspace(v.min(), v.max(), self.n_points)
                k0 = np.clip(np.searchsorted(grid, v, side="right") - 1, 0, grid.size - 2)
                t = np.clip((v - grid[k0]) / (grid[k0 + 1] - grid[k0]), 0.0, 1.0)
                self._where.append((k0, t))
            elif j != continuous and uniq.size > self.max_discrete:
                idx, grid = discretize(v, self.max_discrete, log=False)
                self._where.append((idx, None))
            else:
                grid = uniq
                self._where.append((np.searchsorted(uniq, v), None))
            self.grids_.append(np.asarray(grid, dtype=float))
        rng = np.random.default_rng(self.seed)
        pos = np.arange(rows.size)
        if rows.size > self.n_rows:
            pos = np.sort(rng.choice(pos, self.n_rows, replace=False))
        self._r_pos = pos
        mesh = np.meshgrid(*self.grids_, indexing="ij")
        points = np.stack([m.ravel() for m in mesh], axis=1)
        base = X[pos]
        Xr = np.repeat(base[None, :, :], points.shape[0], axis=0)
        for j, c in enumerate(columns):
            Xr[:, :, c] = points[:, j][:, None]
        pred = sur.predict(Xr.reshape(-1, X.shape[1])).reshape(points.shape[0], pos.size)
        self._M = pred.T.reshape((pos.size, *[g.size for g in self.grids_]))
        self.pd_ = self._M.mean(axis=0)
        self.heldout_ = sur.heldout_prediction_[rows]
        return self

    def _at(self, pdv: Array) -> Array:
        """PD values per trial from a (B, *grid) array -> (B, n)."""
        n = self.heldout_.size
        cont = [j for j, (_, t) in enumerate(self._where) if t is not None]
        if not cont:
            return pdv[(slice(None), *[w[0] for w in self._where])]
        j = cont[0]
        idx = [w[0] for w in self._where]
        k0, t = self._where[j]
        lo = pdv[(slice(None), *[k0 if i == j else idx[i] for i in range(len(idx))])]
        hi = pdv[(slice(None), *[k0 + 1 if i == j else idx[i] for i in range(len(idx))])]
        assert lo.shape[-1] == n
        return (1.0 - t) * lo + t * hi

    def offset(self, W: Array | None = None) -> Array:
        """``g_ho - PD`` per trial: (n,) or, under bootstrap weights ``W`` (B, n), (B, n)."""
        if W is None:
            return self.heldout_ - self._at(self.pd_[None])[0]
        inside = self._r_pos >= 0
        w = np.ones((W.shape[0], self._r_pos.size))
        w[:, inside] = W[:, self._r_pos[inside]]
        tot = w.sum(axis=1)
        w = np.where(tot[:, None] > 0, w / np.maximum(tot, 1e-300)[:, None], 1.0 / w.shape[1])
        return self.heldout_[None, :] - self._at(np.tensordot(w, self._M, axes=(1, 0)))

    def subset(self, mask: Any) -> PartialResiduals:
        """A view on the trials ``mask``; PD rows outside it keep weight 1 under resampling."""
        mask = np.asarray(mask, dtype=bool)
        out = PartialResiduals(self.surrogate, n_rows=self.n_rows, n_points=self.n_points,
                               max_discrete=self.max_discrete, seed=self.seed)
        out.grids_, out.pd_, out._M = self.grids_, self.pd_, self._M
        out._where = [(i[mask], None if t is None else t[mask]) for i, t in self._where]
        out.heldout_ = self.heldout_[mask]
        new_pos = np.cumsum(mask) - 1
        r_in = (self._r_pos >= 0) & mask[np.maximum(self._r_pos, 0)]
        out._r_pos = np.where(r_in, new_pos[np.maximum(self._r_pos, 0)], -1)
        return out
