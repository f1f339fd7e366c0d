"""Search spaces: YAML data -> typed dimensions -> Optuna define-by-run sampling.

A search space is a mapping from a hyperparameter's flat name (``batch_size``, ``temperature``,
``views``, ``loss``, ``lr``, ``width``, ``fraction``, ...) to a dimension. The dimension kinds form
one discriminated union on ``kind``::

    temperature: {kind: loguniform, low: 0.03, high: 2.0}
    batch_size:  {kind: choice, values: [64, 128, 256]}
    views:       {kind: int, low: 2, high: 4, step: 1}
    width:       {kind: intlog, low: 8, high: 64}
    lr:          {kind: uniform, low: 0.1, high: 1.0}
    epochs:      {kind: fixed, value: 8}          # a bare scalar means the same
    loss:                                          # conditional sub-spaces: a loss's own parameters
      kind: choice                                 # exist only when that loss is chosen
      values:
        infonce: {}
        adnce: {mu: {kind: uniform, low: 0.3, high: 1.0}, sigma: 0.5}

This module is the one place where dimensions become Optuna distributions (``suggest``), so a
sampled trial's flat parameters (``loss.mu`` for loss parameters) always match the space.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal, Union

import optuna
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Scalar = Union[bool, int, float, str]


class _Dim(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Fixed(_Dim):
    """A constant: recorded with every trial but not searched."""

    kind: Literal["fixed"] = "fixed"
    value: Scalar

    @property
    def is_log(self) -> bool:
        return False


class Uniform(_Dim):
    """A float drawn uniformly from [low, high]."""

    kind: Literal["uniform"]
    low: float
    high: float

    @model_validator(mode="after")
    def _check(self) -> "Uniform":
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"low and high must be finite numbers, got low={self.low}, high={self.high}")
        if self.low >= self.high:
            raise ValueError(f"low must be < high, got low={self.low}, high={self.high}")
        return self

    @property
    def is_log(self) -> bool:
        return False


class LogUniform(Uniform):
    """A positive float drawn uniformly in log space from [low, high]."""

    kind: Literal["loguniform"]  # type: ignore[assignment]

    @model_validator(mode="after")
    def _check_positive(self) -> "LogUniform":
        if self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got low={self.low}")
        return self

    @property
    def is_log(self) -> bool:
        return True


class IntRange(_Dim):
    """An integer in [low, high] on a grid of ``step``."""

    kind: Literal["int"]
    low: int
    high: int
    step: int = 1

    @model_validator(mode="after")
    def _check(self) -> "IntRange":
        if self.low > self.high:
            raise ValueError(f"low must be <= high, got low={self.low}, high={self.high}")
        if self.step < 1:
            raise ValueError(f"step must be >= 1, got {self.step}")
        return self

    @property
    def is_log(self) -> bool:
        return False

    def values(self) -> list[int]:
        return list(range(self.low, self.high + 1, self.step))


class IntLog(_Dim):
    """A positive integer in [low, high] drawn uniformly in log space."""

    kind: Literal["intlog"]
    low: int
    high: int

    @model_validator(mode="after")
    def _check(self) -> "IntLog":
        if self.low < 1:
            raise ValueError(f"intlog needs low >= 1, got low={self.low}")
        if self.low > self.high:
            raise ValueError(f"low must be <= high, got low={self.low}, high={self.high}")
        return self

    @property
    def is_log(self) -> bool:
        return True


class Choice(_Dim):
    """One of a list of values (categorical)."""

    kind: Literal["choice"]
    values: list[Scalar] = Field(min_length=1)

    @field_validator("values")
    @classmethod
    def _unique(cls, values: list[Scalar]) -> list[Scalar]:
        if len({json.dumps(v) for v in values}) != len(values):
            raise ValueError(f"values must be distinct, got {values}")
        return values

    @property
    def is_log(self) -> bool:
        numeric = [v for v in self.values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return len(numeric) == len(self.values) and min(numeric) > 0 and max(numeric) / min(numeric) >= 10


Dimension = Annotated[Union[Fixed, Uniform, LogUniform, IntRange, IntLog, Choice], Field(discriminator="kind")]


class ConditionalChoice(_Dim):
    """A categorical whose options carry their own sub-space (e.g. a loss and its parameters)."""

    kind: Literal["choice"]
    values: dict[str, dict[str, Dimension]] = Field(min_length=1)

    @property
    def is_log(self) -> bool:
        return False


class SearchSpace(BaseModel):
    """A validated search space: flat hyperparameter name -> dimension; ``loss`` may be conditional."""

    model_config = ConfigDict(frozen=True)

    dims: dict[str, Dimension]
    loss: ConditionalChoice | None = None

    def names(self) -> list[str]:
        """Every flat parameter name this space can produce, loss parameters as ``loss.<p>``."""
        names = list(self.dims)
        if self.loss is not None:
            names.append("loss")
            for params in self.loss.values.values():
                names.extend(f"loss.{p}" for p in params if f"loss.{p}" not in names)
        return names

    def searched(self) -> list[str]:
        """Names whose value varies across trials (not fixed)."""
        out = [n for n, d in self.dims.items() if not isinstance(d, Fixed)]
        if self.loss is not None:
            out.append("loss")
            for params in self.loss.values.values():
                out.extend(f"loss.{p}" for p, d in params.items() if not isinstance(d, Fixed) and f"loss.{p}" not in out)
        return out

    def describe(self) -> dict[str, dict[str, Any]]:
        """JSON-able summary ``{name: {"kind": ..., "log": bool, ...}}`` (stored with the trial table)."""
        out: dict[str, dict[str, Any]] = {}
        for name, dim in self.dims.items():
            out[name] = {**dim.model_dump(), "log": dim.is_log}
        if self.loss is not None:
            out["loss"] = {"kind": "choice", "values": list(self.loss.values), "log": False}
            for params in self.loss.values.values():
                for p, dim in params.items():
                    out.setdefault(f"loss.{p}", {**dim.model_dump(), "log": dim.is_log})
        return out

    def grid(self) -> dict[str, list[Any]]:
        """The full grid for Optuna's GridSampler; every dimension must be discrete."""
        grid: dict[str, list[Any]] = {}
        for name, dim in self.dims.items():
            if not isinstance(dim, Fixed):  # fixed values are never suggested, so not part of the grid
                grid[name] = _discrete_values(name, dim)
        if self.loss is not None:
            grid["loss"] = list(self.loss.values)
            for loss_name, params in self.loss.values.items():
                for p, dim in params.items():
                    if not isinstance(dim, Fixed):
                        raise ValueError(
                            f"loss.{loss_name}.{p}: the grid sampler needs loss parameters fixed, got kind={dim.kind}"
                        )
        return grid

    def size(self) -> int | None:
        """Number of distinct configurations when every dimension is discrete, else None."""
        try:
            grid = self.grid()
        except ValueError:
            return None
        return math.prod(len(v) for v in grid.values())


def _discrete_values(name: str, dim: Any) -> list[Any]:
    if isinstance(dim, Fixed):
        return [dim.value]
    if isinstance(dim, Choice):
        return list(dim.values)
    if isinstance(dim, IntRange):
        return dim.values()
    raise ValueError(f"{name}: the grid sampler needs choice, int or fixed dimensions, got kind={dim.kind}")


def parse_space(raw: Any) -> SearchSpace:
    """Validate a raw mapping (already safe-loaded YAML) into a SearchSpace.

    Bare scalars are shorthand for ``{kind: fixed, value: ...}``. Raises pydantic's
    ValidationError with field paths relative to the space.
    """
    if not isinstance(raw, dict):
        raise TypeError(f"a search space must be a mapping of parameter name to dimension, got {type(raw).__name__}")
    dims: dict[str, Any] = {}
    loss: Any = None
    for name, dim in raw.items():
        if not isinstance(dim, dict):
            dim = {"kind": "fixed", "value": dim}
        if name == "loss" and dim.get("kind") == "choice" and isinstance(dim.get("values"), dict):
            loss = {
                "kind": "choice",
                "values": {k: {p: _fixed_shorthand(v) for p, v in (sub or {}).items()} for k, sub in dim["values"].items()}
                if all(isinstance(sub, dict) or sub is None for sub in dim["values"].values())
                else dim["values"],
            }
        else:
            dims[name] = dim
    return SearchSpace.model_validate({"dims": dims, "loss": loss})


def _fixed_shorthand(v: Any) -> Any:
    return v if isinstance(v, dict) else {"kind": "fixed", "value": v}


def suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """Sample one configuration define-by-run; returns flat params (loss parameters as ``loss.<p>``).

    Fixed values are returned (so trials record them) but not suggested, keeping Optuna's
    distributions to what is actually searched.
    """
    out: dict[str, Any] = {}
    for name, dim in space.dims.items():
        out[name] = _suggest_one(trial, name, dim)
    if space.loss is not None:
        loss = trial.suggest_categorical("loss", list(space.loss.values))
        out["loss"] = loss
        for p, dim in space.loss.values[loss].items():
            # Parameter names are namespaced by loss so that Optuna never mixes distributions.
            value = _suggest_one(trial, f"{loss}.{p}", dim)
            out[f"loss.{p}"] = value
    return out


def _suggest_one(trial: optuna.Trial, name: str, dim: Any) -> Any:
    if isinstance(dim, Fixed):
        return dim.value
    if isinstance(dim, LogUniform):
        return trial.suggest_float(name, dim.low, dim.high, log=True)
    if isinstance(dim, Uniform):
        return trial.suggest_float(name, dim.low, dim.high)
    if isinstance(dim, IntRange):
        return trial.suggest_int(name, dim.low, dim.high, step=dim.step)
    if isinstance(dim, IntLog):
        return trial.suggest_int(name, dim.low, dim.high, log=True)
    if isinstance(dim, Choice):
        return trial.suggest_categorical(name, list(dim.values))
    raise TypeError(f"unknown dimension {dim!r}")  # pragma: no cover - the union is closed


def to_distribution(dim: Any) -> optuna.distributions.BaseDistribution | None:
    """The Optuna distribution of one dimension (None for fixed values, which are not searched)."""
    D = optuna.distributions
    if isinstance(dim, Fixed):
        return None
    if isinstance(dim, LogUniform):
        return D.FloatDistribution(dim.low, dim.high, log=True)
    if isinstance(dim, Uniform):
        return D.FloatDistribution(dim.low, dim.high)
    if isinstance(dim, IntRange):
        return D.IntDistribution(dim.low, dim.high, step=dim.step)
    if isinstance(dim, IntLog):
        return D.IntDistribution(dim.low, dim.high, log=True)
    if isinstance(dim, (Choice, ConditionalChoice)):
        return D.CategoricalDistribution(list(dim.values))
    raise TypeError(f"unknown dimension {dim!r}")  # pragma: no cover


def distributions(space: SearchSpace) -> dict[str, optuna.distributions.BaseDistribution]:
    """Optuna distributions keyed by Optuna parameter name (loss params as ``<loss>.<p>``), fixed ones left out."""
    dists = {n: to_distribution(d) for n, d in space.dims.items()}
    if space.loss is not None:
        dists["loss"] = to_distribution(space.loss)
        for loss, params in space.loss.values.items():
            dists.update({f"{loss}.{p}": to_distribution(d) for p, d in params.items()})
    return {n: d for n, d in dists.items() if d is not None}
