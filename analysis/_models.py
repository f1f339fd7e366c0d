"""Batched weighted least-squares curve models and shared helpers (private to :mod:`analysis.fit`).

Every model fits ``B`` weight vectors at once: ``W`` has shape ``(B, n)`` (bootstrap counts, CV
training masks or a single row of ones) and the fit is closed form or a 1-D grid over a
nonlinear exponent, so 200 bootstrap resamples cost a few matrix products instead of 200 solver
runs.

Models (``x`` raw, ``u`` the scaled working coordinate, log10 x for log-scale parameters):

* ``quadratic``: ``y = b0 + b1 u + b2 u^2``. In ``u = log x`` this is the inverted U of the
  temperature (Wang & Liu, CVPR 2021; Zhang et al. 2022 on temperature sensitivity).
* ``linear``: ``y = b0 + b1 u``; only used when the parameter took exactly two values.
* ``power_law``: saturating ``y = a + b (x / x_ref)^(-c)``, ``c > 0``: the batch-size / epochs /
  compute form (Kaplan et al. 2020; Hestness et al. 2017). Profile least squares: exact
  ``(a, b)`` for each ``c`` of a log grid, best ``c`` per weight row.
* ``spline``: penalised cubic B-spline in ``u`` (Eilers & Marx 1996, P-splines), the smoothing
  fallback; the smoothing parameter is chosen once by GCV on the full data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.preprocessing import SplineTransformer

Array = np.ndarray
_RIDGE = 1e-9


def _wy(W: Array, y: Array, F: Array) -> Array:
    """``sum_i W[r, i] y[(r,) i] F[i, :]`` for a shared ``y`` (n,) or one per row (B, n)."""
    if y.ndim == 1:
        return W @ (F * y[:, None])
    return (W * y) @ F


def _batched_lstsq(W: Array, F: Array, y: Array, penalty: Array | None = None) -> Array:
    """Solve ``argmin_b sum_i W[r, i] (y_i - F_i b)^2 + b' P b`` for every row ``r`` of ``W``.

    W: (B, n); F: (n, k); y: (n,) or (B, n) (a response per row). Returns (B, k).
    """
    n, k = F.shape
    gram = (W @ (F[:, :, None] * F[:, None, :]).reshape(n, k * k)).reshape(-1, k, k)
    rhs = _wy(W, y, F)
    if penalty is not None:
        gram = gram + penalty[None]
    scale = np.maximum(np.trace(gram, axis1=1, axis2=2) / k, 1e-300)
    gram = gram + (_RIDGE * scale)[:, None, None] * np.eye(k)[None]
    return np.linalg.solve(gram, rhs[:, :, None])[:, :, 0]


class PolyModel:
    """Polynomial of ``degree`` in the working coordinate ``u``."""

    def __init__(self, degree: int) -> None:
        self.degree = degree
        self.name = {1: "linear", 2: "quadratic"}[degree]
        self.min_unique = degree + 1

    def prepare(self, u: Array, x: Array, y: Array) -> None:
        pass

    def _design(self, u: Array) -> Array:
        return np.vander(u, self.degree + 1, increasing=True)

    def fit(self, W: Array, u: Array, x: Array, y: Array) -> Array:
        return _batched_lstsq(W, self._design(u), y)

    def predict(self, params: Array, u: Array, x: Array) -> Array:
        return params @ self._design(u).T

    def describe(self, params: Array) -> dict[str, Any]:
        return {f"b{i}": float(v) for i, v in enumerate(params)}


class PowerLawModel:
    """Saturating power law ``y = a + b (x / x_ref)^(-c)`` with ``c`` on a log grid."""

    name = "power_law"
    min_unique = 3

    def __init__(self, exponents: Array | None = None) -> None:
        self.exponents = np.geomspace(0.02, 4.0, 64) if exponents is None else np.asarray(exponents)
        self.x_ref = 1.0

    def prepare(self, u: Array, x: Array, y: Array) -> None:
        self.x_ref = float(np.exp(np.mean(np.log(x))))

    def _features(self, x: Array) -> Array:
        return (x / self.x_ref)[:, None] ** (-self.exponents[None, :])  # (n, C)

    def fit(self, W: Array, u: Array, x: Array, y: Array) -> Array:
        f = self._features(x)
        s0 = W.sum(axis=1)[:, None]
        Wy = W * y if y.ndim == 2 else None
        sy = ((W @ y) if Wy is None else Wy.sum(axis=1))[:, None]
        syy = ((W @ (y * y)) if Wy is None else (Wy * y).sum(axis=1))[:, None]
        sf = W @ f
        sff = W @ (f * f)
        sfy = _wy(W, y, f)
        det = s0 * sff - sf * sf
        ok = det > 1e-12 * np.maximum(s0 * sff, 1e-300)
        det = np.where(ok, det, 1.0)
        b = np.where(ok, (s0 * sfy - sf * sy) / det, 0.0)
        a = np.where(ok, (sy - b * sf) / np.maximum(s0, 1e-300), sy / np.maximum(s0, 1e-300))
        sse = syy - a * sy - b * sfy
        sse = np.where(ok, sse, np.inf)
        best = np.argmin(sse, axis=1)
        rows = np.arange(W.shape[0])
        return np.stack([a[rows, best], b[rows, best], self.exponents[best]], axis=1)

    def predict(self, params: Array, u: Array, x: Array) -> Array:
        a, b, c = params[:, 0:1], params[:, 1:2], params[:, 2:3]
        return a + b * (x[None, :] / self.x_ref) ** (-c)

    def describe(self, params: Array) -> dict[str, Any]:
        return {"a": float(params[0]), "b": float(params[1]), "c": float(params[2]),
                "x_ref": self.x_ref}


class SplineModel:
    """Penalised cubic B-spline (P-spline) in ``u``; smoothing chosen by GCV in :meth:`prepare`."""

    name = "spline"
    min_unique = 4

    def __init__(self, n_knots: int = 8) -> None:
        self.n_knots = n_knots
        self.lam = 1.0
        self._basis: SplineTransformer | None = None
        self._penalty: Array | None = None

    def prepare(self, u: Array, x: Array, y: Array) -> None:
        n_knots = int(min(self.n_knots, max(3, np.unique(u).size)))
        self._basis = SplineTransformer(n_knots=n_knots, degree=3, extrapolation="linear")
        self._basis.fit(u[:, None])
        F = self._basis.transform(u[:, None])
        k = F.shape[1]
        D = np.diff(np.eye(k), n=2, axis=0)
        P = D.T @ D
        gram = F.T @ F
        best = (np.inf, 1.0)
        n = u.size
        scale = np.trace(gram) / k
        for lam in np.geomspace(1e-5, 1e3, 17) * scale:
            A = np.linalg.solve(gram + lam * P + _RIDGE * scale * np.eye(k), np.eye(k))
            coef = A @ (F.T @ y)
            rss = float(np.sum((y - F @ coef) ** 2))
            edf = float(np.trace(A @ gram))
            gcv = n * rss / max(n - edf, 1.0) ** 2
            if gcv < best[0]:
                best = (gcv, lam)
        self.lam = best[1]
        self._penalty = self.lam * P

    def _design(self, u: Array) -> Array:
        assert self._basis is not None
        return self._basis.transform(u[:, None])

    def fit(self, W: Array, u: Array, x: Array, y: Array) -> Array:
        return _batched_lstsq(W, self._design(u), y, self._penalty)

    def predict(self, params: Array, u: Array, x: Array) -> Array:
        return params @ self._design(u).T

    def describe(self, params: Array) -> dict[str, Any]:
        return {"n_basis": int(params.shape[-1]), "lambda": float(self.lam)}


def build_model(name: str) -> PolyModel | PowerLawModel | SplineModel:
    """One model by name: ``quadratic``, ``linear``, ``power_law`` or ``spline``."""
    if name == "quadratic":
        return PolyModel(2)
    if name == "linear":
        return PolyModel(1)
    if name == "power_law":
        return PowerLawModel()
    if name == "spline":
        return SplineModel()
    raise ValueError(f"unknown curve model {name!r}; expected quadratic, linear, power_law or spline")


def cluster_bootstrap_weights(groups: Array, n_resamples: int, rng: np.random.Generator) -> Array:
    """Bootstrap weights (B, n): resample whole clusters (seed repeats of one configuration).

    ``groups`` holds integer cluster ids ``0..G-1`` per observation.
    """
    n_groups = int(groups.max()) + 1
    draws = rng.integers(0, n_groups, size=(n_resamples, n_groups))
    flat = draws + (np.arange(n_resamples) * n_groups)[:, None]
    counts = np.bincount(flat.ravel(), minlength=n_resamples * n_groups).reshape(n_resamples, n_groups)
    return counts[:, groups].astype(float)


def group_folds(groups: Array, n_folds: int, rng: np.random.Generator) -> Array:
    """Training masks (K, n) of a K-fold split that keeps each cluster in one fold."""
    n_groups = int(groups.max()) + 1
    k = int(min(n_folds, n_groups))
    fold_of_group = rng.permutation(n_groups) % k
    fold = fold_of_group[groups]
    return (fold[None, :] != np.arange(k)[:, None]).astype(float)


# --------------------------------------------------------------------------- shared helpers


def percentile_ci(a: Array, ci: float, axis: int = 0) -> tuple[Array, Array]:
    lo = (1.0 - ci) / 2.0 * 100.0
    a = np.asarray(a, dtype=float)
    fn = np.nanpercentile if np.isnan(a).any() else np.percentile
    out = fn(a, [lo, 100.0 - lo], axis=axis)
    return out[0], out[1]


def group_ids(groups: Any, n: int) -> Array:
    """Cluster labels -> integer ids 0..G-1 (each trial its own cluster when None)."""
    if groups is None:
        return np.arange(n)
    arr = np.asarray(groups)
    if arr.dtype.kind in "iub":
        return np.unique(arr, return_inverse=True)[1].ravel().astype(int)
    codes, _ = pd.factorize(pd.Series(arr, dtype=object), use_na_sentinel=False)
    return np.asarray(codes, dtype=int)


def check_estimator_args(n_bootstrap: int, ci: float, mode: str) -> None:
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1 (200 or more for reported CIs), got {n_bootstrap}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")


def discretize(values: Array, max_levels: int, log: bool) -> tuple[Array, Array]:
    """Discretise ``values`` into at most ``max_levels`` levels: (level index per value, centres)."""
    uniq = np.unique(values)
    if uniq.size <= max_levels:
        return np.searchsorted(uniq, values), uniq
    t = np.log(values) if log else values
    edges = np.quantile(t, np.linspace(0, 1, max_levels + 1))
    edges = np.unique(edges)
    idx = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, edges.size - 2)
    centres = np.array([np.median(t[idx == k]) if (idx == k).any() else np.nan for k in range(edges.size - 1)])
    return idx, np.exp(centres) if log else centres
