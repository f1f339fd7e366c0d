"""Hyperparameter importance with Optuna's evaluators (private; see :mod:`analysis.fit`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from analysis._models import cluster_bootstrap_weights, group_ids, percentile_ci
from analysis.table import ParamSpec

Array = np.ndarray


class ParamImportance:
    """Optuna importance evaluators (fANOVA, PED-ANOVA) on a study rebuilt from the trials.

    Each completed trial becomes ``optuna.trial.create_trial(params=..., distributions=...,
    value=metric)`` with distributions from the search space (widened to the observed values).
    CIs: percentile bootstrap over configurations (``n_bootstrap`` re-evaluations).
    fANOVA only assesses parameters present in every trial (conditional ``loss.<param>`` are
    left out); PED-ANOVA covers them.

    Fitted: ``importances_ = {evaluator: {param: value}}``, ``ci_ = {evaluator: {param: (lo, hi)}}``,
    ``n_trials_``.
    """

    def __init__(self, *, evaluators: Sequence[str] = ("fanova", "ped_anova"), n_bootstrap: int = 10,
                 max_trials: int = 500, ci: float = 0.9, seed: int = 0) -> None:
        self.evaluators = evaluators
        self.n_bootstrap = n_bootstrap
        self.max_trials = max_trials
        self.ci = ci
        self.seed = seed

    @staticmethod
    def distributions(frame: pd.DataFrame, space: Mapping[str, ParamSpec]) -> dict[str, Any]:
        """Optuna distributions for the searched parameters, covering every observed value."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        out: dict[str, Any] = {}
        for name, spec in space.items():
            if name not in frame.columns:
                continue
            col = frame[name]
            if spec.numeric:
                v = pd.to_numeric(col, errors="coerce").to_numpy(dtype=float)
                v = v[np.isfinite(v)]
                if v.size == 0:
                    continue
                low = min(v.min(), spec.low if spec.low is not None else v.min())
                high = max(v.max(), spec.high if spec.high is not None else v.max())
                if spec.kind == "choice":
                    low, high = min(v.min(), min(map(float, spec.values))), max(v.max(), max(map(float, spec.values)))
                if high <= low:
                    continue
                log = spec.log and low > 0
                if spec.integer:
                    log = log and low >= 1
                    out[name] = IntDistribution(int(math.floor(low)), int(math.ceil(high)), log=log)
                else:
                    out[name] = FloatDistribution(float(low), float(high), log=log)
            else:
                vals = list(dict.fromkeys([str(c) for c in spec.values]
                                          + [str(c) for c in col.dropna().unique()]))
                if len(vals) >= 2:
                    out[name] = CategoricalDistribution(vals)
        return out

    def _study(self, frame: pd.DataFrame, y: Array, dists: Mapping[str, Any], direction: str) -> Any:
        import optuna
        from optuna.distributions import CategoricalDistribution, IntDistribution

        trials = []
        cols = {k: frame[k].to_numpy(dtype=object) for k in dists}
        for i in range(len(frame)):
            params: dict[str, Any] = {}
            used: dict[str, Any] = {}
            for k, d in dists.items():
                v = cols[k][i]
                if v is None or (isinstance(v, float) and math.isnan(v)):
                    continue
                if isinstance(d, CategoricalDistribution):
                    v = str(v)
                elif isinstance(d, IntDistribution):
                    v = int(round(float(v)))
                else:
                    v = float(v)
                params[k] = v
                used[k] = d
            trials.append(optuna.trial.create_trial(params=params, distributions=used, value=float(y[i])))
        study = optuna.create_study(direction="maximize" if direction == "max" else "minimize")
        study.add_trials(trials)
        return study

    def _evaluate(self, study: Any, name: str, seed: int) -> dict[str, float]:
        import optuna

        if name == "fanova":
            ev = optuna.importance.FanovaImportanceEvaluator(n_trees=32, max_depth=6, seed=seed)
        elif name == "ped_anova":
            ev = optuna.importance.PedAnovaImportanceEvaluator()
        else:
            raise ValueError(f"unknown importance evaluator {name!r}; expected fanova or ped_anova")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = optuna.importance.get_param_importances(study, evaluator=ev)
        return {k: float(v) for k, v in res.items()}

    def fit(self, frame: pd.DataFrame, y: Any, space: Mapping[str, ParamSpec], *, mode: str = "max",
            groups: Any = None) -> ParamImportance:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        y = np.asarray(y, dtype=float)
        if len(frame) != y.size or y.size < 3:
            raise ValueError(f"need at least 3 trials with a metric, got {y.size}")
        rng = np.random.default_rng(self.seed)
        dists = self.distributions(frame, space)
        if not dists:
            raise ValueError("no searched parameter varies: nothing to rank")
        g = group_ids(groups, y.size)
        idx = np.arange(y.size)
        if idx.size > self.max_trials:
            idx = np.sort(rng.choice(idx, self.max_trials, replace=False))
        sub = frame.iloc[idx]
        self.n_trials_ = int(idx.size)
        self.importances_: dict[str, dict[str, float]] = {}
        self.ci_: dict[str, dict[str, tuple[float, float]]] = {}
        study = self._study(sub, y[idx], dists, mode)
        for ev in self.evaluators:
            self.importances_[ev] = self._evaluate(study, ev, self.seed)
        if self.n_bootstrap > 0:
            W = cluster_bootstrap_weights(group_ids(g[idx], idx.size), self.n_bootstrap, rng)
            reps: dict[str, list[dict[str, float]]] = {ev: [] for ev in self.evaluators}
            for b in range(self.n_bootstrap):
                take = np.repeat(np.arange(idx.size), W[b].astype(int))
                s = self._study(sub.iloc[take], y[idx][take], dists, mode)
                for ev in self.evaluators:
                    reps[ev].append(self._evaluate(s, ev, self.seed + b + 1))
            for ev in self.evaluators:
                keys = self.importances_[ev].keys()
                mat = np.array([[r.get(k, 0.0) for k in keys] for r in reps[ev]])
                lo, hi = percentile_ci(mat, self.ci)
                self.ci_[ev] = {k: (float(a), float(c)) for k, a, c in zip(keys, lo, hi)}
        return self

    def to_dict(self) -> dict[str, Any]:
        return {ev: {k: {"value": v, "ci": list(self.ci_.get(ev, {}).get(k, (v, v)))}
                     for k, v in vals.items()} for ev, vals in self.importances_.items()} | {
            "n_trials": self.n_trials_, "n_bootstrap": self.n_bootstrap}
