"""Benchmark of ``scaling analyze`` on a generated 10,000-trial study (issue 5: <= 30 s).

The table (10 % pruned, 5 % failed, seed repeats, per-epoch curves) has a planted truth
(:mod:`analysis.synthetic`); the run is the product path end to end: read Parquet, validate,
fit every curve with 200 bootstrap resamples, importance, interactions, compute scaling, draw
and save every figure (PNG), write sensitivity.json and report.html. Wall time, this process's
CPU time and the load average are recorded: the machine has 2 shared cores, so the wall time
moves with the neighbours' load while the CPU time does not.

``--calibration`` adds the product path's calibration at the default surrogate (a GP at 300
trials) and with the forest, over 50 replications: coverage of the planted optimum by the 90 %
CI and the share of optima within 10 % (log scale).

Run: ``python -m benchmarks.analysis [--trials 10000] [--calibration]``; writes
``benchmarks/results/analysis.json`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from analysis.report import analyze
from analysis.synthetic import PlantedTruth, make_trials
from analysis.table import write_trials

TARGET_S = 30.0
RESULTS = Path(__file__).parent / "results" / "analysis.json"


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


_STAGES = (("loading", "load Parquet"), ("start", "load Parquet"), ("fitting the surrogate", "surrogate"),
           ("curve ", "curves"), ("importance", "importance"), ("interaction", "interactions"),
           ("compute scaling", "compute scaling"), ("plotting", "figures"), ("report written", "figures"))


def _stage(message: str) -> str:
    """Progress line -> stage name (the line announces the stage that starts)."""
    for prefix, name in _STAGES:
        if message.startswith(prefix):
            return name
    return "validate" if " trials: " in message else message[:40]


def time_analysis(n_trials: int, seed: int = 0) -> dict[str, Any]:
    trials, curves = make_trials(n_trials, seed=seed, repeats=2, pruned_fraction=0.1, failed_fraction=0.05)
    with tempfile.TemporaryDirectory(prefix="bench-analysis-") as tmp:
        root = Path(tmp)
        write_trials(root / "study", trials, curves)
        stages: list[tuple[float, str]] = []
        load_before = _load()
        cpu0, t0 = time.process_time(), time.perf_counter()
        result = analyze(trials=root / "study", out=root / "report", formats=("png",),
                         progress=lambda m: stages.append((time.perf_counter() - t0, m)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        n_files = len(list((root / "report" / "figures").iterdir()))
    marks = [(0.0, "start"), *stages, (wall, "end")]
    breakdown: dict[str, float] = {}
    for (t_a, m_a), (t_b, _) in zip(marks[:-1], marks[1:]):
        breakdown[_stage(m_a)] = round(breakdown.get(_stage(m_a), 0.0) + (t_b - t_a), 3)
    fitted = [c for c in result["curves"] if not c["skipped"]]
    truth = PlantedTruth()
    errors = {str(c["loss"]): round(math.log(c["optimum"] / truth.optimum("temperature", loss=c["loss"])), 4)
              for c in fitted if c["param"] == "temperature"}
    return {
        "n_trials": n_trials,
        "trial_counts": {k: result["trials"][k] for k in ("completed", "pruned", "failed")},
        "curve_rows": int(curves.num_rows),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "target_s": TARGET_S,
        "meets_target": wall <= TARGET_S,
        "load_average_before": load_before,
        "load_average_after": _load(),
        "n_curves": len(result["curves"]),
        "n_curves_fitted": len(fitted),
        "n_figures": len(result["figures"]),
        "n_files": n_files,
        "surrogate": result["surrogate"],
        "temperature_optimum_log_error": errors,
        "stage_seconds": breakdown,
    }


def calibration(n_reps: int = 50, n_trials: int = 300) -> dict[str, Any]:
    """Coverage of the planted temperature optima by the product's 90 % CIs."""
    from analysis.fit import PartialResiduals, SensitivityCurve, Surrogate, config_groups, encode_features
    from analysis.table import prepare_trials

    truth = PlantedTruth()
    out: dict[str, Any] = {"replications": n_reps, "trials_per_replication": n_trials, "n_bootstrap": 200,
                           "curves_per_replication": "temperature: pooled + infonce, dcl, adnce"}
    for kind in ("gp", "forest", "none"):
        cover, close, t0 = [], [], time.perf_counter()
        for rep in range(n_reps):
            trials, _ = make_trials(n_trials, seed=1000 + rep, with_curves=False)
            data = prepare_trials(trials)
            comp = data.completed.reset_index(drop=True)
            y = comp["knn_top1"].to_numpy()
            X, names, cat = encode_features(comp, data.space)
            groups = config_groups(comp, list(data.space))
            sur = None if kind == "none" else Surrogate(kind=kind, seed=rep).fit(X, y, categorical=cat)
            for loss in (None, "infonce", "dcl", "adnce"):
                rows = np.arange(len(comp)) if loss is None else np.flatnonzero(comp["loss"].to_numpy() == loss)
                off = (None if sur is None else
                       PartialResiduals(sur, seed=rep).fit(rows, [names.index("temperature")], continuous=0))
                c = SensitivityCurve(models=("quadratic",), log_scale=True, seed=rep).fit(
                    comp["temperature"].to_numpy()[rows], y[rows], groups=groups[rows], offset=off)
                target = truth.optimum("temperature", loss=loss)
                cover.append(c.optimum_ci_[0] <= target <= c.optimum_ci_[1])
                close.append(abs(math.log(c.optimum_ / target)) <= math.log(1.1))
        out[kind] = {"coverage_of_90pct_ci": round(float(np.mean(cover)), 3),
                     "within_10pct": round(float(np.mean(close)), 3),
                     "seconds": round(time.perf_counter() - t0, 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10_000)
    ap.add_argument("--calibration", action="store_true", help="also measure CI calibration (about 2 min)")
    args = ap.parse_args()
    result: dict[str, Any] = {
        "benchmark": "scaling analyze on a generated study: all fits + all figures (PNG) + report",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "analysis": time_analysis(args.trials),
    }
    if args.calibration:
        result["calibration"] = calibration()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
