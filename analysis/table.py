"""Load the TrialTable (DESIGN.md section 4) from Parquet or from an MLflow study.

This is the only module of ``analysis`` that talks to MLflow (reading trials, and logging the
report's files back to the study's parent run).

The TrialTable is a :class:`pyarrow.Table` with one row per trial. Its schema metadata carries

* ``scaling.search_space``: JSON ``{param: {"kind": "loguniform" | "uniform" | "int" | "intlog" |
  "choice" | "fixed", "low": .., "high": .., "values": [..]}}``. A choice whose ``values`` is a
  mapping of variants to nested spaces (the loss with its parameters) is flattened here into
  ``loss`` plus ``loss.<param>`` entries with a ``condition``;
* ``scaling.metric`` / ``scaling.mode``: the study metric and its direction;
* provenance when read from MLflow: ``scaling.parent_run_id``, ``scaling.tracking_uri``.

Without metadata the search space is inferred from the completed trials: a known hyperparameter
column (or a ``loss.<param>`` / string column) with more than one distinct value is searched; a
numeric one is on a log scale when it is positive and ``max / min >= 10`` or its values form a
geometric ladder (64, 128, 256, 512).

Column-name clash: the hyperparameter ``loss`` (the loss's name, a string) and the training-loss
metric share a name in MLflow's separate namespaces. In the table the hyperparameter keeps
``loss`` and the metric becomes ``train_loss``; any other metric that clashes with a parameter
becomes ``metric.<name>``, except ``epochs``, whose metric (epochs completed) wins over the
configured value by contract.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "AnalysisError",
    "ParamSpec",
    "META_SEARCH_SPACE",
    "META_METRIC",
    "META_MODE",
    "META_PARENT_RUN",
    "META_TRACKING_URI",
    "parse_search_space",
    "search_space_of",
    "metadata_of",
    "with_metadata",
    "load_trials_parquet",
    "load_trials_mlflow",
    "write_trials",
    "log_report_artifacts",
    "check_run",
    "TrialData",
    "prepare_trials",
    "infer_mode",
]

META_SEARCH_SPACE = "scaling.search_space"
META_METRIC = "scaling.metric"
META_MODE = "scaling.mode"
META_PARENT_RUN = "scaling.parent_run_id"
META_TRACKING_URI = "scaling.tracking_uri"

STATUSES = ("completed", "pruned", "failed")
#: Columns that are neither hyperparameters nor metrics.
ID_COLUMNS = ("study", "trial_id", "status", "seed", "failure_reason")
#: Hyperparameters the platform knows by name (used only when the table has no metadata).
KNOWN_PARAMS = (
    "batch_size", "temperature", "views", "loss", "lr", "weight_decay", "epochs", "width",
    "fraction", "optimizer", "proj_dim", "warmup_epochs", "encoder", "momentum",
)
#: Result columns that are never hyperparameters.
KNOWN_RESULTS = (
    "samples_seen", "wall_s", "flops_per_sample", "flops_per_image", "knn_top1", "knn_top1_test",
    "linear_top1", "linear_top1_test", "alignment", "uniformity", "effective_rank", "train_loss",
    "throughput", "last_lr", "epochs_completed", "trial_wall_s",
)
LOSS_METRIC_COLUMN = "train_loss"
_KINDS = ("loguniform", "uniform", "int", "intlog", "choice", "fixed")


class AnalysisError(ValueError):
    """Bad input to the analysis: the message names what is wrong and what was expected."""


# --------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class ParamSpec:
    """One hyperparameter of the search space (flat name, e.g. ``loss.mu``).

    ``condition`` maps a parent choice to the values under which this parameter exists
    (``{"loss": ("adnce",)}``), ``None`` for unconditional parameters.
    """

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()
    condition: Mapping[str, tuple[str, ...]] | None = field(default=None, hash=False)
    log_scale: bool | None = None  # an explicit scale from the metadata wins over the kind

    @property
    def searched(self) -> bool:
        return self.kind != "fixed" and not (self.kind == "choice" and len(self.values) < 2)

    @property
    def numeric(self) -> bool:
        if self.kind in ("loguniform", "uniform", "int", "intlog"):
            return True
        if self.kind == "choice":
            return bool(self.values) and all(_is_number(v) for v in self.values)
        return False

    @property
    def integer(self) -> bool:
        if self.kind in ("int", "intlog"):
            return True
        return self.kind == "choice" and self.numeric and all(float(v).is_integer() for v in self.values)

    @property
    def log(self) -> bool:
        if self.log_scale is not None:
            return self.log_scale and self.numeric
        if self.kind in ("loguniform", "intlog"):
            return True
        if self.kind == "choice" and self.numeric:
            return _looks_log([float(v) for v in self.values])
        return False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.low is not None:
            out["low"] = self.low
        if self.high is not None:
            out["high"] = self.high
        if self.values:
            out["values"] = list(self.values)
        if self.condition:
            out["condition"] = {k: list(v) for k, v in self.condition.items()}
        if self.log_scale is not None:
            out["log"] = self.log_scale
        return out


def redact_uri(uri: str) -> str:
    """Hide credentials in a URI (``scheme://user:pass@host`` -> ``scheme://***@host``): tables and
    reports are shared, passwords must not travel with them."""
    return re.sub(r"(//)[^/@]+@", r"\1***@", uri)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _looks_log(values: Sequence[float]) -> bool:
    """Positive values spanning a decade, or a geometric ladder of at least 3 rungs."""
    v = np.unique(np.asarray([x for x in values if np.isfinite(x)], dtype=float))
    if v.size < 2 or v.min() <= 0:
        return False
    if v.max() / v.min() >= 10:
        return True
    if v.size >= 3:
        ratios = v[1:] / v[:-1]
        return bool(ratios.min() >= 1.9 and ratios.max() / ratios.min() < 1.05)
    return False


def parse_search_space(space: Mapping[str, Any]) -> dict[str, ParamSpec]:
    """Search-space mapping (YAML/JSON form) -> flat ``{name: ParamSpec}``.

    Accepts the spec form (``loss: {kind: choice, values: {adnce: {mu: {...}}}}``), already
    flattened entries (``loss.mu``), Optuna-like aliases (``float`` + ``log``, ``categorical``)
    and bare constants (fixed).
    """
    out: dict[str, ParamSpec] = {}
    for name, raw in space.items():
        _parse_entry(str(name), raw, None, out)
    return out


def _parse_entry(name: str, raw: Any, condition: Mapping[str, tuple[str, ...]] | None,
                 out: dict[str, ParamSpec]) -> None:
    if not isinstance(raw, Mapping):
        spec = ParamSpec(name, "fixed", values=(raw,), condition=condition)
    else:
        kind = str(raw.get("kind", raw.get("type", "fixed"))).lower()
        log = bool(raw.get("log", False))
        explicit_log = bool(raw["log"]) if "log" in raw and raw["log"] is not None else None
        kind = {"float": "loguniform" if log else "uniform", "categorical": "choice",
                "log_uniform": "loguniform", "int_log": "intlog", "constant": "fixed"}.get(kind, kind)
        if kind == "int" and log:
            kind = "intlog"
        if kind not in _KINDS:
            raise AnalysisError(f"search space: parameter {name!r} has unknown kind {kind!r}; "
                                f"expected one of {', '.join(_KINDS)}")
        low = raw.get("low")
        high = raw.get("high")
        values: tuple[Any, ...] = ()
        if kind == "choice":
            vals = raw.get("values", raw.get("choices", ()))
            if isinstance(vals, Mapping):
                values = tuple(str(k) for k in vals)
                for variant, sub in vals.items():
                    for sub_name, sub_raw in (sub or {}).items():
                        cond = {**(condition or {}), name: (str(variant),)}
                        _parse_entry(f"{name}.{sub_name}", sub_raw, cond, out)
            else:
                values = tuple(vals)
        elif kind == "fixed":
            values = (raw.get("value"),) if "value" in raw else tuple(raw.get("values", ()))
        cond = raw.get("condition", condition)
        if cond is not None:
            cond = {str(k): tuple(str(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
                    for k, v in dict(cond).items()}
        spec = ParamSpec(name, kind, None if low is None else float(low),
                         None if high is None else float(high), values, cond, explicit_log)
    prev = out.get(name)
    if prev is not None and prev.condition and spec.condition:
        # The same flat name under several variants (e.g. ``loss.beta`` of hcl and adnce).
        merged = {k: tuple(dict.fromkeys(prev.condition.get(k, ()) + spec.condition.get(k, ())))
                  for k in set(prev.condition) | set(spec.condition)}
        lows = [x for x in (prev.low, spec.low) if x is not None]
        highs = [x for x in (prev.high, spec.high) if x is not None]
        spec = ParamSpec(name, spec.kind, min(lows) if lows else None,
                         max(highs) if highs else None,
                         tuple(dict.fromkeys(prev.values + spec.values)), merged, spec.log_scale)
    out[name] = spec


def metadata_of(table: pa.Table) -> dict[str, str]:
    """The ``scaling.*`` schema metadata as a plain ``str -> str`` dict."""
    meta = table.schema.metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if k.decode().startswith("scaling.")}


def with_metadata(table: pa.Table, **entries: Any) -> pa.Table:
    """Return ``table`` with ``scaling.<key>`` metadata set (dicts are JSON-encoded).

    ``search_space`` may be a mapping of raw entries or of :class:`ParamSpec`.
    """
    meta = dict(table.schema.metadata or {})
    for key, value in entries.items():
        if value is None:
            continue
        if key == "search_space":
            value = {k: (v.to_json() if isinstance(v, ParamSpec) else v) for k, v in value.items()}
        text = value if isinstance(value, str) else json.dumps(value)
        meta[f"scaling.{key}".encode()] = text.encode()
    return table.replace_schema_metadata(meta)


def search_space_of(table: pa.Table, *, metric: str | None = None) -> dict[str, ParamSpec]:
    """The table's search space: from ``scaling.search_space`` metadata, else inferred.

    Only parameters that are columns of the table are returned; fixed ones are included (with
    ``searched == False``) so callers can tell "searched" from "present".
    """
    meta = metadata_of(table)
    if META_SEARCH_SPACE in meta:
        try:
            raw = json.loads(meta[META_SEARCH_SPACE])
        except json.JSONDecodeError as exc:
            raise AnalysisError(f"table metadata {META_SEARCH_SPACE!r} is not valid JSON: {exc}") from exc
        space = parse_search_space(raw)
        space = {k: v for k, v in space.items() if k in table.column_names}
        if space:
            return space
    return infer_search_space(table, metric=metric)


def infer_search_space(table: pa.Table, *, metric: str | None = None,
                       params: Sequence[str] | None = None) -> dict[str, ParamSpec]:
    """Infer the space from the values of the completed trials (all non-failed if none)."""
    cols = table.column_names
    status = _status_array(table)
    rows = status == "completed"
    if not rows.any():
        rows = status != "failed"
    if params is None:
        params = [c for c in cols if _is_param_column(table, c, metric)]
    loss_col = None
    if "loss" in cols and _is_text(table.schema.field("loss").type):
        loss_col = np.asarray(table.column("loss").to_pylist(), dtype=object)
    space: dict[str, ParamSpec] = {}
    for name in params:
        col = table.column(name)
        typ = col.type
        vals = col.to_pylist()
        sel = [v for v, r in zip(vals, rows) if r and v is not None
               and not (isinstance(v, float) and math.isnan(v))]
        condition = None
        if loss_col is not None and name.startswith("loss."):
            present = {str(loss_col[i]) for i, v in enumerate(vals)
                       if v is not None and loss_col[i] is not None}
            condition = {"loss": tuple(sorted(present))} if present else None
        distinct = list(dict.fromkeys(sel))
        if len(distinct) <= 1:
            space[name] = ParamSpec(name, "fixed", values=tuple(distinct[:1]), condition=condition)
        elif pa.types.is_integer(typ) or pa.types.is_floating(typ):
            arr = np.asarray(sel, dtype=float)
            log = _looks_log(arr.tolist())
            if pa.types.is_integer(typ):
                kind = "intlog" if log else "int"
            else:
                kind = "loguniform" if log else "uniform"
            space[name] = ParamSpec(name, kind, float(arr.min()), float(arr.max()), condition=condition)
        else:
            space[name] = ParamSpec(name, "choice", values=tuple(sorted(map(str, distinct))),
                                    condition=condition)
    return space


def _is_param_column(table: pa.Table, name: str, metric: str | None) -> bool:
    if name in ID_COLUMNS or name in KNOWN_RESULTS or name == metric:
        return False
    typ = table.schema.field(name).type
    if name == "loss":
        return _is_text(typ)
    if name in KNOWN_PARAMS or name.startswith("loss."):
        return True
    return _is_text(typ) or pa.types.is_boolean(typ)


def _is_text(typ: pa.DataType) -> bool:
    return bool(pa.types.is_string(typ) or pa.types.is_large_string(typ)
                or pa.types.is_string_view(typ) or pa.types.is_dictionary(typ))


def _status_array(table: pa.Table) -> np.ndarray:
    if "status" not in table.column_names:
        return np.full(table.num_rows, "completed", dtype=object)
    return np.asarray([str(s) if s is not None else "failed" for s in table.column("status").to_pylist()],
                      dtype=object)


# --------------------------------------------------------------------------- Parquet


def load_trials_parquet(path: str | Path) -> tuple[pa.Table, pa.Table | None]:
    """Read ``trials.parquet`` (a file, or a directory holding one) and its ``curves.parquet``.

    The curves are looked up next to the trials file; ``None`` when there are none.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "trials.parquet"
    if not path.exists():
        raise AnalysisError(f"trial table {str(path)!r} does not exist; expected a trials.parquet "
                            "file (or a directory holding one)")
    try:
        trials = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise AnalysisError(f"trial table {str(path)!r} is not a readable Parquet file: {exc}") from exc
    curves = None
    for cand in (path.with_name("curves.parquet"), path.with_name(path.stem.replace("trials", "curves") + ".parquet")):
        if cand != path and cand.exists():
            try:
                curves = pq.read_table(cand)
            except (pa.ArrowInvalid, OSError) as exc:
                raise AnalysisError(f"curves table {str(cand)!r} is not readable Parquet: {exc}") from exc
            break
    return trials, curves


def write_trials(directory: str | Path, trials: pa.Table, curves: pa.Table | None = None) -> Path:
    """Write ``trials.parquet`` (+ ``curves.parquet``) into ``directory``; returns the trials path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(trials, directory / "trials.parquet")
    if curves is not None:
        pq.write_table(curves, directory / "curves.parquet")
    return directory / "trials.parquet"


# --------------------------------------------------------------------------- MLflow


def _client(tracking_uri: str | None) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _search_all(client: Any, experiment_id: str, filter_string: str, order_by: list[str] | None = None) -> list[Any]:
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _cast(text: str | None, kind: str | None) -> Any:
    """An MLflow param string back to a Python value (``kind`` from the search space or None)."""
    if text is None or text in ("None", "null", "nan", ""):
        return None
    if kind in ("int", "intlog"):
        return int(float(text))
    if kind in ("uniform", "loguniform"):
        return float(text)
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _column(values: list[Any]) -> pa.Array:
    """Build one typed column: int64 if all ints, float64 if numbers, else string."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pa.array(values, type=pa.bool_())
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.array(values, type=pa.int64())
    if present and all(_is_number(v) for v in present):
        return pa.array([None if v is None else float(v) for v in values], type=pa.float64())
    return pa.array([None if v is None else str(v) for v in values], type=pa.string())


def _lookup(run: Any, key: str) -> str | None:
    return run.data.tags.get(key, run.data.params.get(key))


def load_trials_mlflow(experiment: str | None = None, *, parent_run_id: str | None = None,
                       tracking_uri: str | None = None) -> tuple[pa.Table, pa.Table]:
    """Read one study's trials from MLflow (layout of ``scaling/tracking.py``).

    The study is the parent run ``parent_run_id``, or else the most recent run tagged
    ``scaling.role=study`` of ``experiment``; its trials are the child runs
    (``mlflow.parentRunId``). Without a parent run, every run tagged ``scaling.role=trial`` of the
    experiment is read. Params are cast back with the parent's ``scaling.search_space`` JSON, or by
    inference. Final metrics are each run's latest value; metrics logged at more than one step
    form the per-epoch ``curves`` table (step = epoch).

    Returns ``(trials, curves)``; the trials' metadata names the parent run and tracking URI.
    Raises :class:`AnalysisError` when the experiment, the run or the trials do not exist.
    """
    from mlflow.exceptions import MlflowException

    if experiment is None and parent_run_id is None:
        raise AnalysisError("load_trials_mlflow: give an experiment name or a parent_run_id")
    client = _client(tracking_uri)
    uri = tracking_uri
    if uri is None:
        import mlflow

        uri = mlflow.get_tracking_uri()
    parent = None
    if parent_run_id is not None:
        try:
            parent = client.get_run(parent_run_id)
        except MlflowException as exc:
            raise AnalysisError(f"MLflow run {parent_run_id!r} does not exist at {uri}") from exc
        experiment_id = parent.info.experiment_id
    else:
        try:
            exp = client.get_experiment_by_name(experiment)
        except MlflowException as exc:
            raise AnalysisError(f"cannot read MLflow at {uri}: {exc}") from exc
        if exp is None:
            names = [e.name for e in client.search_experiments(max_results=50)]
            raise AnalysisError(f"MLflow experiment {experiment!r} does not exist at {uri} "
                                f"(experiments there: {', '.join(names) or 'none'})")
        experiment_id = exp.experiment_id
        parents = _search_all(client, experiment_id, "tags.`scaling.role` = 'study'",
                              order_by=["attributes.start_time DESC"])
        parent = parents[0] if parents else None
    if parent is not None:
        children = _search_all(client, experiment_id,
                               f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        children = [r for r in children if r.data.tags.get("scaling.role", "trial") == "trial"]
    else:
        children = _search_all(client, experiment_id, "tags.`scaling.role` = 'trial'")
    if not children:
        where = f"parent run {parent.info.run_id}" if parent is not None else f"experiment {experiment!r}"
        raise AnalysisError(f"no trial runs found under {where} at {uri}")

    raw_space: dict[str, Any] | None = None
    metric = mode = None
    study_name = experiment
    if parent is not None:
        text = _lookup(parent, META_SEARCH_SPACE)
        if text:
            try:
                raw_space = json.loads(text)
            except json.JSONDecodeError:
                raw_space = None
        metric = (_lookup(parent, META_METRIC) or parent.data.params.get("study.metric")
                  or parent.data.params.get("metric"))
        mode = (_lookup(parent, META_MODE) or parent.data.params.get("study.mode")
                or parent.data.params.get("mode"))
        study_name = parent.data.tags.get("scaling.study", study_name)
    space = parse_search_space(raw_space) if raw_space else {}
    trials, curves = _runs_to_tables(client, children, space, study_name or "")
    space_json: Any = {k: v.to_json() for k, v in space.items()} if space else None
    if space_json is None:
        params = sorted({k for r in children for k in r.data.params
                         if not k.startswith(("scaling.", "derived.")) and k not in (*ID_COLUMNS, "repeat")})
        inferred = infer_search_space(trials, metric=metric,
                                      params=[p for p in params if p in trials.column_names])
        space_json = {k: v.to_json() for k, v in inferred.items()}
    trials = with_metadata(trials, search_space=space_json, metric=metric, mode=mode,
                           parent_run_id=None if parent is None else parent.info.run_id,
                           tracking_uri=redact_uri(uri))
    return trials, curves


def _column_names(runs: list[Any], space: Mapping[str, ParamSpec]) -> tuple[list[str], dict[str, str]]:
    """Parameter columns, and MLflow metric key -> TrialTable column."""
    params = list(dict.fromkeys(
        [p for p in space if any(p in r.data.params for r in runs)]
        + sorted({k for r in runs for k in r.data.params
                  if not k.startswith("scaling.") and k not in (*ID_COLUMNS, "repeat")})))
    keys = sorted({k for r in runs for k in r.data.metrics})
    column: dict[str, str] = {}
    for m in keys:
        if m == "epochs" or m not in params:
            column[m] = m
        else:
            column[m] = LOSS_METRIC_COLUMN if m == "loss" else f"metric.{m}"
    if "epoch" in keys and "epochs" not in keys:
        # scaling/tracking.py logs the epoch index as the metric "epoch"; its latest value is the
        # number of epochs completed: the TrialTable's ``epochs``.
        column["epoch"] = "epochs"
    if "epochs" in column.values() and "epochs" in params:
        params.remove("epochs")  # epochs completed (a result) wins over the configured value
    return params, column


def _runs_to_tables(client: Any, runs: list[Any], space: Mapping[str, ParamSpec],
                    study: str) -> tuple[pa.Table, pa.Table]:
    param_names, column = _column_names(runs, space)
    run_status = {"FINISHED": "completed", "FAILED": "failed", "KILLED": "pruned"}
    rows: dict[str, list[Any]] = {c: [] for c in ("study", "trial_id", "status", *param_names,
                                                  *dict.fromkeys(column.values()), "seed", "failure_reason")}
    curve_rows: dict[tuple[str, int], dict[str, float]] = {}
    per_epoch: set[str] = set()  # columns logged at two or more steps by some run
    for run in runs:
        tags = run.data.tags
        trial_id = str(tags.get("scaling.trial_id") or run.info.run_name or run.info.run_id)
        status = tags.get("scaling.status") or run_status.get(run.info.status)
        reason = tags.get("scaling.failure_reason") or None
        if status not in STATUSES:
            status, reason = "failed", reason or f"run not finished (MLflow status {run.info.status})"
        rows["study"].append(tags.get("scaling.study", study))
        rows["trial_id"].append(trial_id)
        rows["status"].append(status)
        for p in param_names:
            spec = space.get(p)
            rows[p].append(_cast(run.data.params.get(p), spec.kind if spec else None))
        final = {column[k]: v for k, v in run.data.metrics.items()}
        for col in dict.fromkeys(column.values()):
            v = final.get(col)
            rows[col].append(None if v is None or not math.isfinite(v) else float(v))
        seed = run.data.params.get("seed", run.data.params.get("repeat", tags.get("scaling.seed")))
        rows["seed"].append(_cast(seed, "int") if seed is not None else None)
        rows["failure_reason"].append(reason if status == "failed" else None)
        for key in run.data.metrics:
            history = client.get_metric_history(run.info.run_id, key)
            if len(history) >= 2:
                per_epoch.add(column[key])
            for point in history:
                curve_rows.setdefault((trial_id, int(point.step)), {})[column[key]] = float(point.value)
    for p in ("epochs", "samples_seen"):
        if p in rows and all(v is None or float(v).is_integer() for v in rows[p]):
            rows[p] = [None if v is None else int(v) for v in rows[p]]
    trials = pa.table({k: _column(v) for k, v in rows.items()})
    curve_metrics = sorted(per_epoch - {"epochs"})  # the step is the epoch already
    keys = sorted(k for k, d in curve_rows.items() if any(m in d for m in curve_metrics))
    curves = pa.table({
        "trial_id": pa.array([k[0] for k in keys], type=pa.string()),
        "epoch": pa.array([k[1] for k in keys], type=pa.int64()),
        **{m: pa.array([curve_rows[k].get(m) for k in keys], type=pa.float64()) for m in curve_metrics},
    })
    return trials, curves


def check_run(run_id: str, *, tracking_uri: str | None = None) -> None:
    """Raise :class:`AnalysisError` unless the MLflow run exists (checked before any work)."""
    from mlflow.exceptions import MlflowException

    try:
        _client(tracking_uri).get_run(run_id)
    except MlflowException as exc:
        where = tracking_uri or "the default tracking URI"
        raise AnalysisError(f"MLflow run {run_id!r} does not exist at {where}") from exc


def log_report_artifacts(parent_run_id: str, directory: str | Path, *, tracking_uri: str | None = None,
                         artifact_path: str = "analysis") -> None:
    """Log every file of ``directory`` as artifacts of the study's parent run (under ``analysis/``)."""
    from mlflow.exceptions import MlflowException

    try:
        _client(tracking_uri).log_artifacts(parent_run_id, str(directory), artifact_path=artifact_path)
    except (MlflowException, OSError) as exc:
        raise AnalysisError(f"the report is in {directory} but logging it to MLflow run {parent_run_id} "
                            f"failed: {exc}") from exc


# --------------------------------------------------------------------------- prepared trials


@dataclass
class TrialData:
    """A validated TrialTable ready for fitting.

    ``frame`` holds every trial; ``space`` only the searched hyperparameters that are columns.
    ``completed`` and ``reached`` are the two views the pruned-trial policy of
    :mod:`analysis.fit` uses.
    """

    frame: Any  # pandas.DataFrame
    space: dict[str, ParamSpec]
    metric: str
    mode: str
    curves: Any | None  # pandas.DataFrame
    meta: dict[str, str]
    counts: dict[str, int]
    failure_reasons: dict[str, int]

    @property
    def completed(self) -> Any:
        """Completed trials with a finite metric (final-metric fits)."""
        f = self.frame
        return f[(f["status"] == "completed") & np.isfinite(f[self.metric].to_numpy(dtype=float))]

    @property
    def reached(self) -> Any:
        """Completed and pruned trials with a finite metric, each at the fidelity it reached."""
        f = self.frame
        ok = f["status"].isin(["completed", "pruned"]) & np.isfinite(f[self.metric].to_numpy(dtype=float))
        return f[ok]

    @property
    def study(self) -> str:
        if "study" in self.frame.columns and len(self.frame):
            vals = self.frame["study"].dropna()
            if len(vals):
                return str(vals.iloc[0])
        return ""


def infer_mode(metric: str) -> str:
    """``min`` for loss- or error-like metric names, else ``max``."""
    low = metric.lower()
    return "min" if any(w in low for w in ("loss", "error", "perplexity", "wall_s")) else "max"


def prepare_trials(trials: pa.Table, curves: pa.Table | None = None, *, metric: str | None = None,
                   mode: str | None = None) -> TrialData:
    """Validate a TrialTable and return :class:`TrialData`.

    Raises :class:`AnalysisError` for an empty table, a missing or non-numeric metric column,
    a table whose trials all failed, or one without a single completed trial with a metric.
    """
    if trials.num_rows == 0:
        raise AnalysisError("the trial table is empty (0 rows): nothing to analyse")
    meta = metadata_of(trials)
    cols = trials.column_names
    if metric is None:
        metric = meta.get(META_METRIC) or ("knn_top1" if "knn_top1" in cols else None)
    if metric is None:
        numeric = [c for c in cols if pa.types.is_floating(trials.schema.field(c).type)]
        raise AnalysisError("no metric given and the table's metadata names none "
                            f"({META_METRIC!r}); pass --metric, one of: {', '.join(numeric) or 'none'}")
    if metric not in cols:
        raise AnalysisError(f"metric column {metric!r} is not in the trial table; "
                            f"columns are: {', '.join(cols)}")
    typ = trials.schema.field(metric).type
    if not (pa.types.is_floating(typ) or pa.types.is_integer(typ)):
        raise AnalysisError(f"metric column {metric!r} has type {typ}; expected a number")
    if mode is None:
        # The recorded mode belongs to the recorded metric; any other metric's is inferred.
        same = meta.get(META_METRIC, metric) == metric
        mode = (meta.get(META_MODE) if same else None) or infer_mode(metric)
    if mode not in ("max", "min"):
        raise AnalysisError(f"mode {mode!r} is not 'max' or 'min'")
    frame = trials.to_pandas()
    if "trial_id" not in frame.columns:
        frame["trial_id"] = [f"row{i}" for i in range(len(frame))]
    if "status" not in frame.columns:
        frame["status"] = "completed"
    frame["status"] = frame["status"].where(frame["status"].isin(STATUSES), "failed").astype(object)
    status = frame["status"]
    counts = {s: int((status == s).sum()) for s in STATUSES}
    counts["total"] = len(frame)
    reasons: dict[str, int] = {}
    if "failure_reason" in frame.columns:
        for r in frame.loc[status == "failed", "failure_reason"].fillna("unknown"):
            reasons[str(r)] = reasons.get(str(r), 0) + 1
    if counts["failed"] == counts["total"]:
        top = ", ".join(f"{r} ({n})" for r, n in sorted(reasons.items(), key=lambda t: -t[1])[:3])
        raise AnalysisError(f"all {counts['total']} trials failed; nothing to analyse"
                            + (f" (reasons: {top})" if top else ""))
    values = frame[metric].to_numpy(dtype=float)
    done = (status == "completed").to_numpy() & np.isfinite(values)
    counts["completed_with_metric"] = int(done.sum())
    if not done.any():
        raise AnalysisError(f"no completed trial has a value for metric {metric!r} "
                            f"({counts['completed']} completed, {counts['pruned']} pruned, "
                            f"{counts['failed']} failed)")
    space = {k: v for k, v in search_space_of(trials, metric=metric).items()
             if v.searched and k in frame.columns and k != metric}
    curves_frame = curves.to_pandas() if curves is not None and curves.num_rows else None
    return TrialData(frame=frame, space=space, metric=metric, mode=mode, curves=curves_frame,
                     meta=meta, counts=counts, failure_reasons=reasons)
