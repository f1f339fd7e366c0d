"""Generated TrialTables with a planted ground truth (for recovery tests and the benchmark).

The planted metric (a kNN top-1 fraction) of one configuration is additive except for the
temperature-batch interaction:

    m = base[loss]
        - k_t * (log10 tau - log10 tau*(loss, B))^2        inverted U in log temperature,
                                                            tau*(loss, B) = tau0[loss] (B/256)^beta
        - batch_amp * (B / 64)^(-batch_exp)                saturating in batch size
        + views_gain * (views - 2)
        - k_lr * (log10 lr - log10 lr_opt)^2
        - compute_amp * (C / C0)^(-compute_exp)            C = samples_seen * views
        - k_mu * (mu - mu_opt)^2                           adnce only
        + N(0, noise^2)                                    one draw per (configuration, seed)

Trials are drawn by random search from :data:`SEARCH_SPACE` (independent dimensions), so the
truth of a 1-D sensitivity curve is the partial dependence (the average over the other
dimensions' sampling distribution), available from :meth:`PlantedTruth.optimum` and
:meth:`PlantedTruth.marginal`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from analysis.table import with_metadata

__all__ = ["SEARCH_SPACE", "PlantedTruth", "sample_configs", "make_trials"]

BATCH_SIZES = (64, 128, 256, 512, 1024)
LOSSES = ("infonce", "dcl", "adnce")

#: The search space of the generated studies (DESIGN.md's YAML form, serialised as JSON).
SEARCH_SPACE: dict[str, Any] = {
    "temperature": {"kind": "loguniform", "low": 0.02, "high": 2.0},
    "batch_size": {"kind": "choice", "values": list(BATCH_SIZES)},
    "views": {"kind": "int", "low": 2, "high": 4},
    "loss": {"kind": "choice", "values": {
        "infonce": {}, "dcl": {},
        "adnce": {"mu": {"kind": "uniform", "low": 0.3, "high": 1.0},
                  "sigma": {"kind": "uniform", "low": 0.3, "high": 1.5}}}},
    "lr": {"kind": "loguniform", "low": 0.03, "high": 3.0},
    "epochs": {"kind": "intlog", "low": 4, "high": 32},
    "width": {"kind": "choice", "values": [16, 32, 64]},
}


@dataclass(frozen=True)
class PlantedTruth:
    """Parameters of the planted metric (see the module docstring)."""

    base: Mapping[str, float] = field(default_factory=lambda: {"infonce": 0.55, "dcl": 0.56, "adnce": 0.57})
    tau0: Mapping[str, float] = field(default_factory=lambda: {"infonce": 0.2, "dcl": 0.1, "adnce": 0.35})
    tau_batch_slope: float = 0.15
    k_t: float = 0.08
    batch_amp: float = 0.06
    batch_exp: float = 0.7
    views_gain: float = 0.01
    lr_opt: float = 0.3
    k_lr: float = 0.03
    compute_amp: float = 0.25
    compute_exp: float = 0.35
    mu_opt: float = 0.7
    k_mu: float = 0.05
    n_images: int = 6000
    noise: float = 0.01

    def tau_star(self, loss: Any, batch: Any) -> np.ndarray:
        t0 = np.vectorize(lambda s: self.tau0[str(s)])(np.asarray(loss, dtype=object))
        return t0 * (np.asarray(batch, dtype=float) / 256.0) ** self.tau_batch_slope

    def compute(self, samples_seen: Any, views: Any) -> np.ndarray:
        return np.asarray(samples_seen, dtype=float) * np.asarray(views, dtype=float)

    def metric(self, cfg: Mapping[str, Any], samples_seen: Any | None = None) -> np.ndarray:
        """Noise-free metric of configurations (columns as arrays); ``samples_seen`` defaults to
        ``epochs * n_images`` (a completed trial)."""
        loss = np.asarray(cfg["loss"], dtype=object)
        tau = np.asarray(cfg["temperature"], dtype=float)
        b = np.asarray(cfg["batch_size"], dtype=float)
        v = np.asarray(cfg["views"], dtype=float)
        lr = np.asarray(cfg["lr"], dtype=float)
        if samples_seen is None:
            samples_seen = np.asarray(cfg["epochs"], dtype=float) * self.n_images
        c = self.compute(samples_seen, v)
        c0 = 4 * self.n_images * 2.0
        mu = np.asarray(cfg.get("loss.mu", np.full(tau.size, np.nan)), dtype=float)
        base = np.vectorize(lambda s: self.base[str(s)])(loss)
        m = (base
             - self.k_t * (np.log10(tau) - np.log10(self.tau_star(loss, b))) ** 2
             - self.batch_amp * (b / 64.0) ** (-self.batch_exp)
             + self.views_gain * (v - 2.0)
             - self.k_lr * (np.log10(lr) - math.log10(self.lr_opt)) ** 2
             - self.compute_amp * (c / c0) ** (-self.compute_exp))
        return m - np.where(np.isfinite(mu), self.k_mu * (mu - self.mu_opt) ** 2, 0.0)

    def marginal(self, param: str, grid: Sequence[float], *, loss: str | None = None,
                 n: int = 20000, seed: int = 12345) -> np.ndarray:
        """The true partial dependence of the metric on ``param`` (random-search distribution)."""
        cfg = sample_configs(n, seed=seed, losses=(loss,) if loss else LOSSES)
        if param == "loss.mu":
            cfg = {k: v[cfg["loss"] == "adnce"] for k, v in cfg.items()}
        out = []
        for g in grid:
            c = dict(cfg)
            c[param] = np.full(c["temperature"].size, g)
            out.append(self.metric(c).mean())
        return np.asarray(out)

    def optimum(self, param: str, *, loss: str | None = None) -> float:
        """The optimum of the true partial dependence (closed forms of the planted terms)."""
        if param == "temperature":
            losses = (loss,) if loss else LOSSES
            logb = np.log10(np.asarray(BATCH_SIZES, dtype=float) / 256.0)
            mean_log = np.mean([math.log10(self.tau0[s]) for s in losses]) + self.tau_batch_slope * logb.mean()
            return float(10.0 ** mean_log)
        if param == "lr":
            return self.lr_opt
        if param == "loss.mu":
            return self.mu_opt
        if param in ("batch_size", "views", "epochs"):
            return float({"batch_size": max(BATCH_SIZES), "views": 4, "epochs": 32}[param])
        raise KeyError(f"no planted optimum for {param!r}")

    def batch_tolerance_low(self, delta: float) -> float:
        """Smallest batch size whose planted batch term is within ``delta`` of the largest's."""
        bmax = float(max(BATCH_SIZES))
        best = -self.batch_amp * (bmax / 64.0) ** (-self.batch_exp)
        return float(64.0 * ((best - delta) / -self.batch_amp) ** (-1.0 / self.batch_exp))


def sample_configs(n: int, *, seed: int = 0, losses: Sequence[str] = LOSSES) -> dict[str, np.ndarray]:
    """``n`` random-search draws from :data:`SEARCH_SPACE` (columns as arrays)."""
    rng = np.random.default_rng(seed)
    loss = rng.choice(np.asarray(losses, dtype=object), n)
    adnce = loss == "adnce"
    return {
        "temperature": 10.0 ** rng.uniform(math.log10(0.02), math.log10(2.0), n),
        "batch_size": rng.choice(np.asarray(BATCH_SIZES), n),
        "views": rng.integers(2, 5, n),
        "loss": loss,
        "lr": 10.0 ** rng.uniform(math.log10(0.03), math.log10(3.0), n),
        "epochs": np.round(np.exp(rng.uniform(math.log(4), math.log(32), n))).astype(int),
        "width": rng.choice(np.asarray([16, 32, 64]), n),
        "loss.mu": np.where(adnce, rng.uniform(0.3, 1.0, n), np.nan),
        "loss.sigma": np.where(adnce, rng.uniform(0.3, 1.5, n), np.nan),
    }


def make_trials(n_trials: int, *, seed: int = 0, truth: PlantedTruth | None = None,
                losses: Sequence[str] = LOSSES, repeats: int = 1, pruned_fraction: float = 0.0,
                failed_fraction: float = 0.0, with_curves: bool = True, study: str = "synthetic",
                fix: Mapping[str, Any] | None = None, metadata: bool = True) -> tuple[pa.Table, pa.Table | None]:
    """A TrialTable (+ curves) of ``n_trials`` rows drawn by random search with a planted truth.

    ``repeats`` runs each configuration with that many seeds (``n_trials`` rows in all).
    ``pruned_fraction`` of the trials, taken among the worse half like ASHA would, stop early;
    ``failed_fraction`` fail without a metric. ``fix`` pins parameters to one value.
    """
    truth = truth or PlantedTruth()
    rng = np.random.default_rng(seed + 1)
    n_cfg = math.ceil(n_trials / repeats)
    cfg = sample_configs(n_cfg, seed=seed, losses=losses)
    for k, v in (fix or {}).items():
        cfg[k] = np.full(n_cfg, v, dtype=object if isinstance(v, str) else None)
        if k == "loss" and v != "adnce":
            cfg["loss.mu"] = np.full(n_cfg, np.nan)
            cfg["loss.sigma"] = np.full(n_cfg, np.nan)
    cfg = {k: np.repeat(v, repeats)[:n_trials] for k, v in cfg.items()}
    seeds = np.tile(np.arange(repeats), n_cfg)[:n_trials]
    n = n_trials
    final = truth.metric(cfg)
    noise = rng.normal(0.0, truth.noise, n)
    status = np.full(n, "completed", dtype=object)
    worse = np.flatnonzero(final < np.median(final))
    n_pruned = min(int(round(pruned_fraction * n)), worse.size)
    pruned = rng.choice(worse, n_pruned, replace=False) if n_pruned else np.array([], dtype=int)
    status[pruned] = "pruned"
    free = np.flatnonzero(status == "completed")
    n_failed = min(int(round(failed_fraction * n)), free.size)
    failed = rng.choice(free, n_failed, replace=False) if n_failed else np.array([], dtype=int)
    status[failed] = "failed"
    epochs_cfg = cfg["epochs"].astype(int)
    reached = epochs_cfg.copy()
    reached[pruned] = np.maximum(1, (epochs_cfg[pruned] * rng.uniform(0.1, 0.5, pruned.size)).astype(int))
    reached[failed] = 0
    samples_seen = reached * truth.n_images
    metric = truth.metric(cfg, samples_seen=np.maximum(samples_seen, 1)) + noise
    metric[failed] = np.nan
    flops = 2.0e6 * (cfg["width"] / 32.0) ** 2
    wall = truth.compute(samples_seen, cfg["views"]) * flops * 1e-12 * (1 + 0.1 * rng.random(n))
    cols: dict[str, Any] = {
        "study": pa.array([study] * n),
        "trial_id": pa.array([f"t{i:05d}" for i in range(n)]),
        "status": pa.array(status.tolist(), type=pa.string()),
    }
    for k in ("batch_size", "temperature", "views", "loss", "lr", "epochs", "width", "loss.mu", "loss.sigma"):
        v = cfg[k]
        if k == "loss":
            cols[k] = pa.array([str(s) for s in v], type=pa.string())
        elif k in ("batch_size", "views", "width"):
            cols[k] = pa.array(np.asarray(v, dtype=np.int64))
        elif k == "epochs":
            cols[k] = pa.array(reached.astype(np.int64))
        else:
            vv = np.asarray(v, dtype=float)
            cols[k] = pa.array(vv, mask=~np.isfinite(vv))
    ok = np.isfinite(metric)
    cols["knn_top1"] = pa.array(metric, mask=~ok)
    cols["samples_seen"] = pa.array(samples_seen.astype(np.int64))
    cols["wall_s"] = pa.array(wall)
    cols["train_loss"] = pa.array(5.0 - 3.0 * metric, mask=~ok)
    cols["knn_top1_test"] = pa.array(metric - 0.01 + rng.normal(0, 0.005, n), mask=~ok)
    cols["flops_per_sample"] = pa.array(flops)
    cols["seed"] = pa.array(seeds.astype(np.int64))
    reasons = [("synthetic failure: CUDA out of memory" if s == "failed" else None) for s in status]
    cols["failure_reason"] = pa.array(reasons, type=pa.string())
    trials = pa.table(cols)
    if metadata:
        space = dict(SEARCH_SPACE)
        for k in fix or {}:
            space[k] = {"kind": "fixed", "value": fix[k]} if k != "loss" else {"kind": "choice", "values": [fix[k]]}
        trials = with_metadata(trials, search_space=space, metric="knn_top1", mode="max")
    curves = None
    if with_curves:
        idx = np.repeat(np.arange(n), reached)
        ep = np.concatenate([np.arange(1, r + 1) for r in reached]) if reached.sum() else np.array([], dtype=int)
        sub = {k: v[idx] for k, v in cfg.items()}
        m = truth.metric(sub, samples_seen=ep * truth.n_images) + noise[idx] + rng.normal(0, 0.003, idx.size)
        curves = pa.table({
            "trial_id": pa.array([f"t{i:05d}" for i in idx], type=pa.string()),
            "epoch": pa.array(ep.astype(np.int64)),
            "knn_top1": pa.array(m),
            "train_loss": pa.array(5.0 - 3.0 * m),
        })
    return trials, curves
