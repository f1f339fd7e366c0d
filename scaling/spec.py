"""Study specs: one loader from YAML to frozen, validated pydantic models.

``load_spec(path, overrides)`` is the only place that reads a spec. It safe-loads the YAML (never
evaluates it), resolves the search space (a path relative to the spec, or an inline mapping),
applies ``--set`` overrides and validates everything, including rules that cross sections
(a loss parameter searched for a loss that is not chosen, a batch that does not split across the
workers, a metric measured on the training split). Every problem is raised as one ``SpecError``
that names the file, the field path, what was expected and what was got.

Flat hyperparameter names (``batch_size``, ``temperature``, ``loss.mu``, ``width``, ...) are the
vocabulary shared by search spaces, ``--set``, MLflow params and the TrialTable; ``HYPERPARAMETERS``
maps each to its place in the nested ``TrialConfig``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from scaling.data import DATASET_NAMES
from scaling.losses import LOSS_NAMES, LOSS_PARAMS
from scaling.models import ENCODER_NAMES
from scaling.space import Choice, ConditionalChoice, Fixed, IntLog, IntRange, SearchSpace, parse_space

METRICS = ("knn_top1", "linear_top1", "train_loss", "alignment", "uniformity", "effective_rank")
SAMPLERS = ("tpe", "random", "grid", "cmaes", "nsga2")

# flat name -> (section, field) in TrialConfig
HYPERPARAMETERS: dict[str, tuple[str, str]] = {
    "dataset": ("data", "name"),
    "data_size": ("data", "size"),
    "image_size": ("data", "image_size"),
    "fraction": ("data", "fraction"),
    "encoder": ("model", "encoder"),
    "width": ("model", "width"),
    "proj_dim": ("model", "proj_dim"),
    "proj_hidden": ("model", "proj_hidden"),
    "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"),
    "temperature": ("train", "temperature"),
    "views": ("train", "views"),
    "loss": ("train", "loss"),
    "optimizer": ("train", "optimizer"),
    "lr": ("train", "lr"),
    "momentum": ("train", "momentum"),
    "weight_decay": ("train", "weight_decay"),
    "warmup_epochs": ("train", "warmup_epochs"),
    "lr_scaling": ("train", "lr_scaling"),
    "augment_strength": ("train", "augment_strength"),
    "crop_min_scale": ("train", "crop_min_scale"),
    "rotation": ("train", "rotation"),
    "blur_p": ("train", "blur_p"),
    "channel_shuffle_p": ("train", "channel_shuffle_p"),
    "seed": ("train", "seed"),
}


def _is_numeric(annotation: Any) -> bool:
    """``int``, ``float`` or an optional/union of them (not ``bool``, which is an int to Python)."""
    if annotation in (int, float):
        return True
    args = typing.get_args(annotation)
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and any(a in (int, float) for a in args)


def loss_defaults(loss: str) -> dict[str, Any]:
    """Default values of a loss's own parameters (from the loss family's LOSS_PARAMS table)."""
    return {p: default for p, (_typ, default, _rng) in LOSS_PARAMS.get(loss, {}).items()}


def _check_loss_params(loss: str, params: Mapping[str, Any]) -> None:
    valid = LOSS_PARAMS.get(loss, {})
    for p, v in params.items():
        if p not in valid:
            names = ", ".join(valid) or "none"
            raise ValueError(f"{p!r} is not a parameter of loss {loss!r} (its parameters: {names})")
        typ, _default, (low, high) = valid[p]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (typ is int and not float(v).is_integer()):
            raise ValueError(f"loss {loss!r} parameter {p!r} must be a {typ.__name__}, got {v!r}")
        if not (low <= v <= high):
            raise ValueError(f"loss {loss!r} parameter {p!r} must be in [{low}, {high}], got {v}")


class SpecError(ValueError):
    """A spec that cannot run; the message names file, field, expectation and the value got."""

    def __init__(self, file: str | Path | None, field: str, message: str) -> None:
        self.file, self.field, self.reason = (str(file) if file else "<spec>"), field, message
        super().__init__(f"{self.file}: {field}: {message}")


# numpy's and Optuna's RandomState take seeds below 2**32; torch overflows on larger ones at run time.
MAX_SEED = 2**32 - 1


class _Model(BaseModel):
    # inf/nan would pass one-sided bounds (``gt=1``) and fail only once a trial runs.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads `batch_size: true` as 1 and `lr: false` as 0.0: a typo, never a number.
        annotation = cls.model_fields[info.field_name].annotation if info.field_name else None
        if isinstance(v, bool) and _is_numeric(annotation):
            raise ValueError("expected a number, not a boolean")
        if isinstance(v, dict) and typing.get_origin(annotation) is dict and _is_numeric(typing.get_args(annotation)[-1]):
            for key, item in v.items():  # loss_params: {mu: true}
                if isinstance(item, bool):
                    raise ValueError(f"{key}: expected a number, not a boolean")
        return v


class DataConfig(_Model):
    name: Literal[DATASET_NAMES] = "shapes"  # type: ignore[valid-type]
    root: str | None = None
    size: int | None = Field(default=None, ge=20, le=10_000_000, description="images held in memory")
    image_size: int = Field(default=32, ge=8, le=512)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    val_fraction: float = Field(default=0.1, gt=0.0, lt=0.5)
    fraction: float = Field(default=1.0, gt=0.0, le=1.0)


class ModelConfig(_Model):
    encoder: Literal[ENCODER_NAMES] = "small_cnn"  # type: ignore[valid-type]
    width: int = Field(default=32, ge=1, le=1024)
    proj_hidden: int = Field(default=128, ge=1, le=16384)
    proj_dim: int = Field(default=64, ge=2, le=16384)


class TrainConfig(_Model):
    epochs: int = Field(default=8, ge=1, le=10_000)
    batch_size: int = Field(default=256, ge=4, le=1_048_576, description="global batch, all workers together")
    temperature: float = Field(default=0.2, gt=0.0, le=100.0)
    views: int = Field(default=2, ge=2, le=16)
    loss: str = "infonce"
    loss_params: dict[str, float | int] = Field(default_factory=dict)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(default=0.3, gt=0.0, le=100.0, description="learning rate at base_batch_size")
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=1e-4, ge=0.0, le=1.0)
    warmup_epochs: int = Field(default=1, ge=0)
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    base_batch_size: int = Field(default=256, ge=1)
    augment_strength: float = Field(default=1.0, ge=0.0, le=2.0)
    crop_min_scale: float = Field(default=0.2, gt=0.0, le=1.0)
    rotation: float = Field(default=0.0, ge=0.0, le=180.0, description="max degrees of random rotation (augmentation)")
    channel_shuffle_p: float = Field(default=0.0, ge=0.0, le=1.0, description="probability of an RGB permutation")
    blur_p: float = Field(default=0.5, ge=0.0, le=1.0, description="probability of Gaussian blur (SimCLR omits it on CIFAR)")
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    max_steps_per_epoch: int | None = Field(default=None, ge=1, description="cap for smoke tests")
    fault_nan_at_step: int | None = Field(
        default=None, ge=1, description="fault injection: make the loss NaN at this global step (tests of failure handling)"
    )
    fault_oom_at_step: int | None = Field(
        default=None, ge=1, description="fault injection: allocate more memory than any machine has at this global step"
    )

    @model_validator(mode="after")
    def _check_loss(self) -> "TrainConfig":
        if self.loss not in LOSS_NAMES:
            raise ValueError(f"loss must be one of {', '.join(LOSS_NAMES)}, got {self.loss!r}")
        _check_loss_params(self.loss, self.loss_params)
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be <= epochs ({self.epochs})")
        return self


class EvalConfig(_Model):
    knn_k: int = Field(default=20, ge=1)
    knn_temperature: float = Field(default=0.1, gt=0.0)
    linear_probe: bool = False
    test: bool = True


class TrialConfig(_Model):
    """Everything that defines one training run (no search, no resources, no tracking)."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    def flat(self) -> dict[str, Any]:
        """Flat hyperparameters under their spec names, loss parameters as ``loss.<p>`` (defaults filled in)."""
        out = {name: getattr(getattr(self, sec), fld) for name, (sec, fld) in HYPERPARAMETERS.items()}
        params = loss_defaults(self.train.loss) | dict(self.train.loss_params)
        out.update({f"loss.{p}": v for p, v in params.items()})
        return out

    def with_params(self, params: Mapping[str, Any]) -> "TrialConfig":
        """A new config with flat hyperparameters replaced (validated); unknown names raise KeyError."""
        raw = self.model_dump()
        loss_params: dict[str, Any] = {}
        for name, value in params.items():
            if name.startswith("loss."):
                loss_params[name[5:]] = value
                continue
            if name not in HYPERPARAMETERS:
                raise KeyError(name)
            sec, fld = HYPERPARAMETERS[name]
            raw[sec][fld] = value
        if "loss" in params and params["loss"] != self.train.loss:
            raw["train"]["loss_params"] = {}
        raw["train"]["loss_params"] = {**raw["train"]["loss_params"], **loss_params}
        return TrialConfig.model_validate(raw)


class SchedulerConfig(_Model):
    kind: Literal["asha", "none"] = "asha"
    grace_period: int = Field(default=2, ge=1)
    reduction_factor: float = Field(default=3.0, gt=1.0)


class SearchConfig(_Model):
    space: dict[str, Any] = Field(default_factory=dict)
    sampler: Literal[SAMPLERS] = "tpe"  # type: ignore[valid-type]
    trials: int = Field(default=8, ge=1, le=100_000)
    repeats: int = Field(default=1, ge=1, le=100)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    metric: Literal[METRICS] = "knn_top1"  # type: ignore[valid-type]
    mode: Literal["max", "min"] = "max"
    split: Literal["val", "train", "test"] = "val"
    objectives: list[tuple[str, Literal["max", "min"]]] | None = None
    scheduler: SchedulerConfig = SchedulerConfig()

    @field_validator("split")
    @classmethod
    def _validation_split(cls, v: str) -> str:
        if v != "val":
            raise ValueError(
                f"the study objective must be measured on the validation split ('val'), got {v!r}: "
                "optimising on the training or test split overfits the search"
            )
        return v


class ResourcesConfig(_Model):
    workers_per_trial: int = Field(default=1, ge=1, le=1024)
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    gpus_per_worker: float = Field(default=0.0, ge=0.0)
    max_concurrent_trials: int | None = Field(default=None, ge=1)


class TrackingConfig(_Model):
    uri: str | None = None
    experiment: str | None = None

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        # The spec is copied verbatim into the study directory and the parent run's artifacts.
        if v and redact_uri(v) != v:
            raise ValueError("no credentials in the spec (it is saved with the study and logged to MLflow): set "
                             "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or pass --tracking-uri")
        return v


class StudySpec(_Model):
    """A validated study: what to train (``trial``), what to search, with which resources, tracked where."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    search: SearchConfig = SearchConfig()
    resources: ResourcesConfig = ResourcesConfig()
    tracking: TrackingConfig = TrackingConfig()

    @property
    def trial(self) -> TrialConfig:
        """The base trial config: the spec's fixed values before any search-space sample."""
        return TrialConfig(data=self.data, model=self.model, train=self.train, eval=self.eval)

    @property
    def space(self) -> SearchSpace:
        return parse_space(self.search.space)

    @property
    def num_trials(self) -> int:
        return self.search.trials * self.search.repeats

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    def spec_hash(self) -> str:
        """Stable hash of the resolved spec: identifies a study across resumes."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# loading


def _safe_load(path: Path) -> Any:
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise SpecError(path, "<file>", "file not found") from None
    except IsADirectoryError:
        raise SpecError(path, "<file>", "expected a YAML file, got a directory") from None
    except UnicodeDecodeError as exc:
        raise SpecError(path, "<file>", f"expected UTF-8 text, got undecodable bytes at offset {exc.start}") from None
    except OSError as exc:  # permission denied, name too long, ...
        raise SpecError(path, "<file>", f"cannot read the file ({exc.strerror or exc})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        _check_duplicate_keys(path, node)
        return yaml.safe_load(text)
    except SpecError:
        raise
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        loc = f"line {where.line + 1}, column {where.column + 1}: " if where else ""
        raise SpecError(path, "<yaml>", f"{loc}not valid safe YAML ({getattr(exc, 'problem', exc)})") from None
    except RecursionError:
        raise SpecError(path, "<yaml>", "nested too deeply to be a spec") from None
    except (ValueError, LookupError, TypeError, OverflowError) as exc:  # PyYAML constructors: `!!float` (empty), `!!bool maybe`
        raise SpecError(path, "<yaml>", f"not valid safe YAML (a tagged value cannot be read: {type(exc).__name__}: {exc})") from None


def _check_duplicate_keys(path: Path, root: yaml.Node | None) -> None:
    """PyYAML keeps the last of two equal keys silently; a spec that says a thing twice is refused."""
    stack: list[tuple[yaml.Node, str]] = [(root, "")] if root is not None else []
    seen_nodes: set[int] = set()  # anchors/aliases share nodes (and may be recursive)
    while stack:
        node, where = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for key, value in node.value:
                name = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
                field = f"{where}.{name}" if where else name
                if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                    if key.value in keys:
                        raise SpecError(path, field, f"line {key.start_mark.line + 1}: duplicate key (YAML would keep only the last value)")
                    keys.add(key.value)
                stack.append((value, field))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{where}.{i}" if where else str(i)) for i, item in enumerate(node.value))


def _parse_value(text: str) -> Any:
    """``--set`` values are YAML scalars/flow collections (``0.2``, ``[64, 128]``, ``dcl``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], file: Path | None = None) -> dict[str, Any]:
    """Apply ``key=value`` overrides: a flat hyperparameter name (fixes it: removed from the search
    space) or a dotted spec path (``search.trials=4``, ``train.lr=0.1``)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise SpecError(file, f"--set {item}", "expected key=value")
        key, text = item.split("=", 1)
        key, value = key.strip(), _parse_value(text.strip())
        if key in HYPERPARAMETERS or key.startswith("loss."):
            search = raw.get("search")
            if isinstance(search, dict) and isinstance(search.get("space"), dict):
                search["space"].pop(key, None)
            sec, fld = ("train", "loss_params") if key.startswith("loss.") else HYPERPARAMETERS[key]
            section = raw.setdefault(sec, {})
            if not isinstance(section, dict):
                raise SpecError(file, sec, f"expected a mapping (to apply --set {key}), got {type(section).__name__}")
            if key.startswith("loss."):
                params = section.setdefault("loss_params", {})
                if not isinstance(params, dict):
                    raise SpecError(file, "train.loss_params", f"expected a mapping (to apply --set {key}), got {type(params).__name__}")
                params[key[5:]] = value
                continue
            section[fld] = value
            continue
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.get(part) if isinstance(node, dict) else None
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise SpecError(file, f"--set {key}", f"{part!r} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return raw


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> StudySpec:
    """Read, resolve and validate a study spec. Raises SpecError naming file and field."""
    path = Path(path)
    raw = _safe_load(path)
    if not isinstance(raw, dict):
        raise SpecError(path, "<root>", f"expected a mapping with at least 'name', got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides, path)
    return spec_from_dict(raw, file=path)


def spec_from_dict(raw: dict[str, Any], *, file: str | Path | None = None) -> StudySpec:
    """Validate an already-loaded spec mapping (search-space paths resolve relative to ``file``)."""
    if not isinstance(raw, dict):
        raise SpecError(file, "<root>", f"expected a mapping with at least 'name', got {type(raw).__name__}")
    try:
        raw = copy.deepcopy(raw)
    except RecursionError:
        raise SpecError(file, "<root>", "nested too deeply to be a spec") from None
    space_file = file
    search = raw.get("search")
    if isinstance(search, dict) and isinstance(search.get("space"), str):
        base = Path(file).parent if file else Path.cwd()
        try:
            space_path = (base / search["space"]).resolve()
            is_file = space_path.is_file()
        except (OSError, ValueError):  # a name too long for the file system, a NUL byte
            space_path, is_file = base / search["space"], False
        space_file = space_path
        if not is_file:
            raise SpecError(file, "search.space", f"search-space file not found: {space_path}")
        loaded = _safe_load(space_path)
        if not isinstance(loaded, dict):
            raise SpecError(space_path, "<root>", f"expected a mapping of parameter to dimension, got {type(loaded).__name__}")
        search["space"] = loaded
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as exc:
        raise _spec_error(file, exc) from None
    try:
        space = parse_space(spec.search.space)
    except ValidationError as exc:
        raise _spec_error(space_file, exc, prefix="" if space_file != file else "search.space.") from None
    except TypeError as exc:
        raise SpecError(space_file, "search.space", str(exc)) from None
    _check_space(spec, space, space_file if space_file != file else None, file)
    return spec


def _spec_error(file: str | Path | None, exc: ValidationError, prefix: str = "") -> SpecError:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-after", "tagged-union"))]
    # The discriminated union puts the kind into the path; drop pydantic's internal layers.
    loc = [p for p in loc if p not in ("dims", "fixed", "uniform", "loguniform", "int", "intlog", "choice")]
    # A union of scalars (a choice/fixed value, a loss parameter): pydantic names the member it tried.
    scalar_union = bool(loc) and loc[-1] in ("bool", "float", "str")
    if scalar_union or (loc and loc[-1] == "[key]"):
        loc = loc[:-1]
    field = prefix + ".".join(loc) if loc else prefix.rstrip(".") or "<root>"
    got = err.get("input")
    if isinstance(got, str):
        got = redact_uri(got)  # error messages are printed and logged: never echo a password
    msg = err["msg"].removeprefix("Value error, ")
    if scalar_union and err["type"] in ("bool_type", "float_type", "string_type"):
        msg = "expected a number, a string or a boolean"
    if err["type"] == "extra_forbidden":
        msg = "unknown key (not allowed here)"
    elif err["type"] == "missing":
        msg = "required field is missing"
    elif not isinstance(got, (dict, list)):
        msg = f"{msg}; got {got!r}"
    return SpecError(file, field, msg)


def _check_space(spec: StudySpec, space: SearchSpace, space_file: Path | None, file: str | Path | None) -> None:
    where = (lambda f: f) if space_file else (lambda f: f"search.space.{f}")
    src = space_file or file
    _check_bool_bounds(spec.search.space, "", src, where)
    for name in space.dims:
        if name.startswith("loss."):
            raise SpecError(src, where(name), "loss parameters go under the loss choice (loss: {kind: choice, values: {adnce: {mu: ...}}})")
        if name not in HYPERPARAMETERS:
            raise SpecError(src, where(name), f"unknown hyperparameter; expected one of {', '.join(HYPERPARAMETERS)}")
        if name == "loss":
            dim = space.dims[name]
            values = dim.values if isinstance(dim, Choice) else [dim.value] if isinstance(dim, Fixed) else []
            for v in values:
                if v not in LOSS_NAMES:
                    raise SpecError(src, where("loss"), f"unknown loss {v!r}; expected one of {', '.join(LOSS_NAMES)}")
    if space.loss is not None:
        for loss, params in space.loss.values.items():
            if loss not in LOSS_NAMES:
                raise SpecError(src, where(f"loss.values.{loss}"), f"unknown loss; expected one of {', '.join(LOSS_NAMES)}")
            valid = LOSS_PARAMS.get(loss, {})
            for p, dim in params.items():
                field = where(f"loss.values.{loss}.{p}")
                if p not in valid:
                    raise SpecError(src, field, f"not a parameter of loss {loss!r} (its parameters: {', '.join(valid) or 'none'})")
                _, _, (low, high) = valid[p]
                for bound in _bounds(dim):
                    if isinstance(bound, bool):
                        raise SpecError(src, field, f"expected a number, not a boolean; got {bound!r}")
                    if not (low <= bound <= high):
                        raise SpecError(src, field, f"values must lie in [{low}, {high}], got {bound}")
    # Every value a dimension can produce must itself be a valid trial config.
    base = spec.trial
    for name, dim in space.dims.items():
        for value in _probe_values(dim):
            try:
                base.with_params({name: value})
            except ValidationError as exc:
                err = exc.errors()[0]
                raise SpecError(src, where(name), f"{err['msg'].removeprefix('Value error, ')}; got {value!r}") from None
    _check_batches(spec, space, src, where)
    if spec.search.sampler == "grid":
        try:
            space.grid()
        except ValueError as exc:
            raise SpecError(src, "search.sampler", f"grid: {exc}") from None
    if spec.search.sampler == "nsga2" and not spec.search.objectives:
        raise SpecError(file, "search.objectives", "nsga2 is multi-objective: list objectives, e.g. [[knn_top1, max], [samples_seen, min]]")
    if spec.search.repeats > 1 and spec.search.scheduler.kind != "none":
        raise SpecError(
            file, "search.scheduler.kind",
            "repeats > 1 averages complete repeats (Ray's Repeater); early stopping would cut repeats short: set kind: none",
        )
    if spec.search.scheduler.kind == "asha" and spec.search.scheduler.grace_period > _max_epochs(spec, space):
        raise SpecError(file, "search.scheduler.grace_period", f"must be <= epochs ({_max_epochs(spec, space)}), got {spec.search.scheduler.grace_period}")


def _check_bool_bounds(raw: Any, path: str, src: Any, where: Any) -> None:
    """Range bounds are read as floats by the space models, so ``low: true`` would become 1.0: refuse it."""
    if not isinstance(raw, dict):
        return
    for key, value in raw.items():
        field = f"{path}.{key}" if path else str(key)
        if key in ("low", "high", "step") and isinstance(value, bool):
            raise SpecError(src, where(field), f"expected a number, not a boolean; got {value!r}")
        if isinstance(value, dict):
            _check_bool_bounds(value, field, src, where)


def _bounds(dim: Any) -> list[float]:
    if isinstance(dim, Fixed):
        return [dim.value]
    if isinstance(dim, Choice):
        return list(dim.values)
    return [dim.low, dim.high]


def _probe_values(dim: Any) -> list[Any]:
    if isinstance(dim, (Fixed, Choice)):
        return _bounds(dim)
    if isinstance(dim, ConditionalChoice):  # pragma: no cover - handled separately
        return []
    return [dim.low, dim.high]


def _max_epochs(spec: StudySpec, space: SearchSpace) -> int:
    dim = space.dims.get("epochs")
    return int(max(_bounds(dim))) if dim is not None else spec.train.epochs


def _check_batches(spec: StudySpec, space: SearchSpace, src: Any, where: Any) -> None:
    workers = spec.resources.workers_per_trial
    dim = space.dims.get("batch_size")
    if dim is None:
        if spec.train.batch_size % workers:
            raise SpecError(src, "train.batch_size", f"the global batch must split evenly over {workers} workers, got {spec.train.batch_size}")
        return
    if isinstance(dim, (IntRange,)):
        if dim.low % workers or dim.step % workers:
            raise SpecError(src, where("batch_size"), f"low and step must be multiples of workers_per_trial ({workers}), got low={dim.low}, step={dim.step}")
        return
    if isinstance(dim, IntLog):
        raise SpecError(src, where("batch_size"), "use kind: choice (e.g. powers of two) for batch_size so each value splits over the workers")
    for v in _bounds(dim):
        if not isinstance(v, int) or v % workers:
            raise SpecError(src, where("batch_size"), f"every value must be an integer multiple of workers_per_trial ({workers}), got {v!r}")


def dump_resolved(spec: StudySpec) -> str:
    """The resolved spec as YAML (search space inlined): what actually ran."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def is_remote_uri(uri: str | None) -> bool:
    return bool(uri) and re.match(r"^https?://", uri or "") is not None


def redact_uri(uri: str) -> str:
    """Hide credentials in a URI (``scheme://user:pass@host`` -> ``scheme://***@host``)."""
    return re.sub(r"(//)[^/@]+@", r"\1***@", uri)

