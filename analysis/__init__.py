"""Analysis of scaling studies: TrialTable -> fitted sensitivity curves -> figures + report.

Public surface (imported lazily, so ``import analysis`` stays cheap for the CLI):

* :func:`analysis.report.analyze` and :class:`AnalysisError`;
* :func:`analysis.table.load_trials_parquet`, :func:`analysis.table.load_trials_mlflow`;
* the estimators of :mod:`analysis.fit`: :class:`SensitivityCurve`, :class:`Surrogate`,
  :class:`ParamImportance`, :class:`OptimumTrend`, :class:`ViewsBatchComparison`,
  :class:`ComputeScaling`, and :func:`fit_sensitivity`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "AnalysisError",
    "analyze",
    "load_trials_parquet",
    "load_trials_mlflow",
    "prepare_trials",
    "SensitivityCurve",
    "Surrogate",
    "PartialResiduals",
    "ParamImportance",
    "OptimumTrend",
    "ViewsBatchComparison",
    "ComputeScaling",
    "fit_sensitivity",
]

_WHERE = {
    "AnalysisError": "analysis.table",
    "load_trials_parquet": "analysis.table",
    "load_trials_mlflow": "analysis.table",
    "prepare_trials": "analysis.table",
    "analyze": "analysis.report",
}


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(import_module(_WHERE.get(name, "analysis.fit")), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
