"""Fitters: exact recoveries on noise-free curves, model choice, seed-repeat-aware bootstrap,
the pruned-trial policy, importance, interactions, compute scaling, and the planted-truth
recovery + calibration acceptance tests of issue 5."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.fit import (
    ComputeScaling,
    OptimumTrend,
    ParamImportance,
    PartialResiduals,
    SensitivityCurve,
    Surrogate,
    ViewsBatchComparison,
    config_groups,
    encode_features,
    fit_sensitivity,
    pareto_frontier,
)
from analysis.synthetic import PlantedTruth, make_trials
from analysis.table import prepare_trials

LOG_10PCT = math.log(1.1)


def test_quadratic_in_log_x_recovers_optimum_and_tolerance_exactly():
    x = np.geomspace(0.02, 2.0, 60)
    k, opt = 0.08, 0.2
    y = 0.6 - k * (np.log10(x) - math.log10(opt)) ** 2
    c = SensitivityCurve(log_scale=True, tolerance=0.01).fit(x, y)
    assert c.model_ == "quadratic"
    assert c.optimum_ == pytest.approx(opt, rel=1e-6)
    assert c.metric_at_optimum_ == pytest.approx(0.6, abs=1e-9)
    half = math.sqrt(0.01 / k)  # |log10 x - log10 opt| <= sqrt(delta / k)
    lo, hi = c.tolerance_width_
    assert math.log10(lo) == pytest.approx(math.log10(opt) - half, abs=0.01)
    assert math.log10(hi) == pytest.approx(math.log10(opt) + half, abs=0.01)
    assert c.optimum_ci_[0] == pytest.approx(opt, rel=1e-6) == c.optimum_ci_[1]
    np.testing.assert_allclose(c.predict(x), y, atol=1e-9)
    lo_band, hi_band = c.predict_interval(x)
    assert np.all(lo_band <= y + 1e-9) and np.all(hi_band >= y - 1e-9)
    assert len(c.bootstrap_optima_) == 200


def test_minimised_metric_has_its_optimum_at_the_minimum():
    x = np.linspace(0.1, 1.0, 40)
    y = 2.0 + 3.0 * (x - 0.4) ** 2
    c = SensitivityCurve(models=("quadratic",), mode="min", tolerance=0.03).fit(x, y)
    assert c.optimum_ == pytest.approx(0.4, abs=1e-6)
    assert c.tolerance_width_ == pytest.approx((0.3, 0.5), abs=0.003)


def test_saturating_power_law_wins_and_bounds_the_useful_batch_sizes():
    rng = np.random.default_rng(0)
    x = np.repeat([64, 128, 256, 512, 1024, 2048], 30).astype(float)
    truth = 0.5 - 0.2 * (x / 64.0) ** -0.6
    y = truth + rng.normal(0, 0.004, x.size)
    c = SensitivityCurve(models=("power_law", "quadratic", "spline"), log_scale=True, tolerance=0.01).fit(x, y)
    assert c.model_ == "power_law"
    assert c.params_["c"] == pytest.approx(0.6, rel=0.15)
    assert c.optimum_ == pytest.approx(2048) and c.optimum_at_edge_ == "upper"
    b_delta = 64.0 * ((0.2 * (2048 / 64.0) ** -0.6 + 0.01) / 0.2) ** (-1 / 0.6)  # truth within 0.01
    assert c.tolerance_width_[0] == pytest.approx(b_delta, rel=0.15)


def test_spline_is_the_fallback_for_shapes_no_parametric_model_fits():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, 300)
    y = np.sin(3 * np.pi * x) * 0.05 + rng.normal(0, 0.005, x.size)
    c = SensitivityCurve(models=("quadratic", "power_law", "spline")).fit(x, y)
    assert c.model_ == "spline"
    assert c.cv_errors_["spline"] < 0.5 * c.cv_errors_["quadratic"]


def test_bootstrap_resamples_configurations_not_seed_repeats():
    rng = np.random.default_rng(2)
    cfg_x = np.geomspace(0.05, 1.0, 25)
    cfg_noise = rng.normal(0, 0.02, cfg_x.size)  # shared by a configuration's seeds
    x = np.repeat(cfg_x, 8)
    y = 0.5 - 0.1 * (np.log10(x) + 0.7) ** 2 + np.repeat(cfg_noise, 8) + rng.normal(0, 0.001, x.size)
    groups = np.repeat(np.arange(cfg_x.size), 8)
    aware = SensitivityCurve(models=("quadratic",), log_scale=True).fit(x, y, groups=groups)
    naive = SensitivityCurve(models=("quadratic",), log_scale=True).fit(x, y)
    width = lambda c: math.log(c.optimum_ci_[1] / c.optimum_ci_[0])  # noqa: E731
    assert width(aware) > 2.0 * width(naive)  # 8 repeats are not 8 independent trials
    assert aware.n_configs_ == 25 and aware.n_trials_ == 200


def test_estimators_validate_in_fit_not_init():
    c = SensitivityCurve(n_bootstrap=0)  # stores only
    with pytest.raises(ValueError, match="n_bootstrap"):
        c.fit([1, 2, 3], [1, 2, 3])
    with pytest.raises(ValueError, match="two distinct"):
        SensitivityCurve().fit([1, 1, 1], [1, 2, 3])
    with pytest.raises(ValueError, match="log_scale needs x > 0"):
        SensitivityCurve(log_scale=True).fit([0, 1, 2], [1, 2, 3])


def test_pruned_trials_are_left_out_of_curves_but_kept_for_compute_scaling():
    trials, curves = make_trials(160, seed=4, pruned_fraction=0.25, failed_fraction=0.05)
    data = prepare_trials(trials, curves)
    res = fit_sensitivity(data, params=["temperature"], importance=False, interactions=False)
    pooled = next(c for c in res.curves if c.param == "temperature" and c.loss is None)
    assert pooled.curve is not None and pooled.curve.n_trials_ == data.counts["completed"] == 112
    assert pooled.n_pruned_excluded == data.counts["pruned"] == 40
    sc = res.scaling["view_samples"]
    assert sc.compute_.size == 112 + 40  # pruned trials at the fidelity they reached
    out = res.to_dict()
    assert out["trials"]["failed"] == 8 and "excluded" in out["trials"]["policy"]
    # A pruned trial's low early metric must not drag the curve down: same fit without them.
    alone = prepare_trials(trials.filter(np.asarray(trials.column("status").to_pylist()) != "pruned"), curves)
    res2 = fit_sensitivity(alone, params=["temperature"], importance=False, interactions=False, scaling=False)
    again = next(c for c in res2.curves if c.param == "temperature" and c.loss is None)
    assert again.curve.optimum_ == pytest.approx(pooled.curve.optimum_, rel=1e-9)


def test_importance_rebuilds_an_optuna_study_from_the_space():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    trials, _ = make_trials(200, seed=5, with_curves=False)
    data = prepare_trials(trials)
    comp = data.completed
    d = ParamImportance.distributions(comp, data.space)
    assert isinstance(d["temperature"], FloatDistribution) and d["temperature"].log
    assert isinstance(d["batch_size"], IntDistribution) and d["batch_size"].log
    assert isinstance(d["loss"], CategoricalDistribution) and set(d["loss"].choices) == {"infonce", "dcl", "adnce"}
    imp = ParamImportance(n_bootstrap=3).fit(comp, comp["knn_top1"].to_numpy(), data.space, mode="max")
    fan, ped = imp.importances_["fanova"], imp.importances_["ped_anova"]
    assert "loss.mu" not in fan and "loss.mu" in ped  # fANOVA skips conditional parameters
    assert sum(fan.values()) == pytest.approx(1.0)
    top = sorted(fan, key=fan.get, reverse=True)[:3]
    assert {"temperature", "epochs"} <= set(top)
    for p, (lo, hi) in imp.ci_["fanova"].items():
        assert 0.0 <= lo <= hi <= 1.0


def test_optimum_trend_recovers_tau_star_of_batch_size():
    rng = np.random.default_rng(6)
    b = np.repeat([64, 128, 256, 512, 1024], 120).astype(float)
    tau = 10 ** rng.uniform(-2, 0.3, b.size)
    star = 0.2 * (b / 256) ** 0.3
    y = 0.5 - 0.1 * (np.log10(tau) - np.log10(star)) ** 2 + rng.normal(0, 0.005, b.size)
    tr = OptimumTrend().fit(tau, b, y)
    np.testing.assert_allclose(tr.optima_, 0.2 * (np.asarray(tr.levels_) / 256) ** 0.3, rtol=0.1)
    assert tr.slope_ == pytest.approx(0.3, abs=0.05)
    assert tr.slope_ci_[0] < 0.3 < tr.slope_ci_[1]
    assert tr.predict([256])[0] == pytest.approx(0.2, rel=0.1)


def test_views_vs_batch_finds_the_better_use_of_embeddings():
    rng = np.random.default_rng(7)
    v = np.tile(np.repeat([2, 4], 20), 3).astype(float)
    b = np.repeat([128, 256, 512], 40).astype(float)
    y = 0.4 + 0.03 * (v == 4) + 0.01 * np.log2(b / 128) + rng.normal(0, 0.003, v.size)
    vb = ViewsBatchComparison().fit(v, b, np.full(v.size, 1e5), y)
    iso = {round(r["views_x_batch"]): r for r in vb.iso_}
    assert iso[512]["best_views"] == 4 and iso[512]["lead_ci"][0] > 0  # 4 x 128 beats 2 x 256
    assert vb.best_[0]["views"] == 4 and vb.best_[0]["batch_size"] == 512


def test_compute_scaling_fits_the_frontier_and_validates_on_held_out_compute():
    rng = np.random.default_rng(8)
    c = 10 ** rng.uniform(4, 7, 600)
    y = 0.7 - 0.5 * (c / 1e4) ** -0.3 - np.abs(rng.normal(0, 0.03, c.size))  # the frontier is the truth
    sc = ComputeScaling(extrapolate=10).fit(c, y)
    front = sc.frontier_
    assert np.all(np.diff(sc.compute_[front]) >= 0) and np.all(np.diff(sc.y_[front]) > 0)
    assert set(front.tolist()) == set(pareto_frontier(c, y).tolist())
    assert sc.params_["a"] == pytest.approx(0.7, abs=0.03)
    assert sc.params_["c"] == pytest.approx(0.3, rel=0.25)
    ho = sc.holdout_
    assert ho["n_holdout"] == 120 and ho["mae"] < 0.02
    lo, hi = sc.band_
    assert np.all(lo <= sc.curve_ + 1e-12) and np.all(sc.curve_ <= hi + 1e-12)
    assert sc.grid_.max() == pytest.approx(10 * c.max())


def test_partial_residuals_remove_other_dimensions_and_reweight_under_bootstrap():
    trials, _ = make_trials(300, seed=9, with_curves=False)
    data = prepare_trials(trials)
    comp = data.completed.reset_index(drop=True)
    y = comp["knn_top1"].to_numpy()
    X, names, cat = encode_features(comp, data.space)
    sur = Surrogate(kind="forest", n_estimators=60).fit(X, y, categorical=cat)
    assert sur.heldout_r2_ > 0.5 and sur.kind_ == "forest"
    rows = np.arange(len(comp))
    pr = PartialResiduals(sur).fit(rows, [names.index("temperature")], continuous=0)
    x = comp["temperature"].to_numpy()
    truth = PlantedTruth().marginal("temperature", x, n=2000)
    raw_err = np.std(y - truth)
    adj_err = np.std(y - pr.offset() - truth)
    assert adj_err < 0.6 * raw_err  # most of the other dimensions' spread is gone
    W = np.ones((3, rows.size))
    np.testing.assert_allclose(pr.offset(W)[0], pr.offset(), atol=1e-12)
    sub = pr.subset(comp["loss"].to_numpy() == "dcl")
    assert sub.offset().shape == ((comp["loss"] == "dcl").sum(),)


# --------------------------------------------------------------------------- acceptance


def test_recovery_of_planted_optima_with_other_dimensions_varying():
    """Issue 5: inverted U in log temperature with a different optimum per loss, a saturating
    batch-size curve, noise, every other dimension varying: optimum within 10 % (log scale)."""
    truth = PlantedTruth()
    trials, _ = make_trials(400, seed=0, repeats=2, with_curves=False)
    res = fit_sensitivity(prepare_trials(trials), params=["temperature", "batch_size"], importance=False,
                          scaling=False)
    assert res.surrogate is not None and res.surrogate.kind_ == "gp"
    temps = {c.loss: c for c in res.curves if c.param == "temperature"}
    assert set(temps) == {None, "infonce", "dcl", "adnce"}
    for loss, c in temps.items():
        assert c.adjustment == "partial_dependence(gp)"
        err = abs(math.log(c.curve.optimum_ / truth.optimum("temperature", loss=loss)))
        assert err <= LOG_10PCT, (loss, c.curve.optimum_, truth.optimum("temperature", loss=loss))
    # The three losses' optima are told apart.
    assert temps["dcl"].curve.optimum_ci_[1] < temps["infonce"].curve.optimum_ci_[0]
    assert temps["infonce"].curve.optimum_ci_[1] < temps["adnce"].curve.optimum_ci_[0]
    batch = next(c for c in res.curves if c.param == "batch_size" and c.loss is None).curve
    assert batch.model_ == "power_law" and batch.optimum_at_edge_ == "upper"
    assert batch.tolerance_width_[0] == pytest.approx(truth.batch_tolerance_low(0.01), rel=0.2)
    tau_b = res.trends[None]
    assert tau_b.slope_ci_[0] < truth.tau_batch_slope < tau_b.slope_ci_[1]


def test_calibration_90pct_ci_covers_planted_optimum_in_80pct_of_50_replications():
    """Issue 5's calibration test over 50 random replications (other dimensions varying).

    Product CIs (200 cluster-bootstrap resamples, no shortcut there) on the partial residuals of
    a random-forest surrogate (50 trees to keep the test cheap), and the closed-form path that
    ignores the other dimensions; both must cover the truth at least 80 % of the time.
    """
    truth = PlantedTruth()
    covered = {"pd": [], "none": []}
    close = []
    for rep in range(50):
        trials, _ = make_trials(300, seed=1000 + rep, with_curves=False)
        data = prepare_trials(trials)
        comp = data.completed.reset_index(drop=True)
        y = comp["knn_top1"].to_numpy()
        X, names, cat = encode_features(comp, data.space)
        groups = config_groups(comp, list(data.space))
        sur = Surrogate(kind="forest", n_estimators=50, seed=rep).fit(X, y, categorical=cat)
        for loss in (None, "infonce", "dcl", "adnce"):
            rows = np.arange(len(comp)) if loss is None else np.flatnonzero(comp["loss"].to_numpy() == loss)
            x = comp["temperature"].to_numpy()[rows]
            target = truth.optimum("temperature", loss=loss)
            for path in ("pd", "none"):
                off = (PartialResiduals(sur, seed=rep).fit(rows, [names.index("temperature")], continuous=0)
                       if path == "pd" else None)
                c = SensitivityCurve(models=("quadratic",), log_scale=True, n_bootstrap=200, seed=rep).fit(
                    x, y[rows], groups=groups[rows], offset=off)
                covered[path].append(c.optimum_ci_[0] <= target <= c.optimum_ci_[1])
                if path == "pd":
                    close.append(abs(math.log(c.optimum_ / target)) <= LOG_10PCT)
    assert len(covered["pd"]) == 200
    assert np.mean(covered["pd"]) >= 0.8, np.mean(covered["pd"])
    assert np.mean(covered["none"]) >= 0.8, np.mean(covered["none"])
    assert np.mean(close) >= 0.7


def test_two_valued_parameter_is_skipped_with_a_reason():
    trials, _ = make_trials(150, seed=10, with_curves=False)
    keep = np.isin(np.asarray(trials.column("batch_size").to_pylist()), [64, 128])
    res = fit_sensitivity(prepare_trials(trials.filter(keep)), params=["batch_size"], importance=False,
                          interactions=False, scaling=False)
    assert res.curves and all("only 2 distinct values (64, 128)" in c.skipped for c in res.curves)
    assert res.to_dict()["curves"][0]["optimum"] is None


def test_importance_is_skipped_not_crashing_when_the_metric_is_constant() -> None:
    """fANOVA raises RuntimeError ("zero total variance") on a constant metric: a skipped importance, not a crash."""
    import pandas as pd

    from analysis.fit import fit_sensitivity
    from analysis.table import prepare_trials
    import pyarrow as pa

    n = 8
    table = pa.Table.from_pandas(pd.DataFrame({
        "study": ["s"] * n, "trial_id": [f"t{i}" for i in range(n)], "status": ["completed"] * n,
        "temperature": [0.05 * (i + 1) for i in range(n)], "knn_top1": [0.25] * n,
        "samples_seen": [1000] * n, "epochs": [2] * n,
    }), preserve_index=False)
    res = fit_sensitivity(prepare_trials(table, metric="knn_top1", mode="max"), n_bootstrap=200)
    assert res.importance_skipped
