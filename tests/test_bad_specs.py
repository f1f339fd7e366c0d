"""Bad input never runs (issue 7, item 6): a corpus of malformed specs and search spaces, and a fuzz
of the loader.

The corpus lives in ``tests/data/bad_specs/`` (search-space files it points to in
``tests/data/bad_spaces/``); ``bad_specs/expected.yaml`` gives, per file, the field the error must
name and a fragment of the message. Every file goes through

- ``load_spec``: a ``SpecError`` whose ``field`` is exactly the expected one (or, for the
  ``stage: resources`` files, a valid spec that ``check_fits`` refuses on this machine);
- the real CLI, ``scaling validate`` and ``scaling run --storage``: exit status 2, the message names
  the file and the field, and nothing is written (no study directory, no ``mlflow.db``, no
  ``mlruns/`` in the working directory, nothing new next to the corpus), before Ray or MLflow start.

The fuzz (hypothesis) feeds random mappings, spec-shaped mappings with random leaves, random
``--set`` overrides and random YAML text to ``spec_from_dict`` / ``load_spec``: the only exception
allowed is ``SpecError``, and whatever is accepted must survive the round trip a resumed study
makes (``dump_resolved`` -> ``load_spec``, same hash).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from typer.testing import CliRunner

from scaling.spec import HYPERPARAMETERS, SpecError, StudySpec, dump_resolved, load_spec, spec_from_dict

DATA = Path(__file__).parent / "data"
CORPUS = DATA / "bad_specs"
SPACES = DATA / "bad_spaces"
EXPECTED: dict[str, dict[str, str]] = yaml.safe_load((CORPUS / "expected.yaml").read_text())
CASES = sorted(EXPECTED)
runner = CliRunner()


def _snapshot() -> set[str]:
    return {str(p.relative_to(DATA)) for p in DATA.rglob("*")}


def _named_file(name: str) -> Path:
    e = EXPECTED[name]
    return (CORPUS / e["file"]).resolve() if "file" in e else CORPUS / name


def test_corpus_is_complete() -> None:
    """Every file has an expectation and every expectation a file; the corpus keeps >= 30 cases."""
    files = {p.name for p in CORPUS.iterdir() if p.name != "expected.yaml"}
    assert files == set(EXPECTED)
    assert len(files) >= 30
    for name, e in EXPECTED.items():
        assert {"field", "says"} <= set(e), name
        assert _named_file(name).exists() or "missing" in name or "too_long" in name, name


@pytest.mark.parametrize("name", CASES)
def test_loader_names_the_field(name: str) -> None:
    e = EXPECTED[name]
    path = CORPUS / name
    if e.get("stage") == "resources":
        from scaling.study import check_fits, local_cluster_resources

        spec = load_spec(path)  # valid as a spec: only this machine is too small
        with pytest.raises(SpecError) as info:
            check_fits(spec, local_cluster_resources())
    else:
        with pytest.raises(SpecError) as info:
            load_spec(path)
    err = info.value
    assert err.field == e["field"], str(err)
    assert e["says"] in err.reason, str(err)
    if e.get("stage") != "resources":
        assert err.file == str(_named_file(name)), str(err)


def _cli_params() -> list[Any]:
    params = []
    for name in CASES:
        params += [pytest.param(name, command, id=f"{command}-{name}") for command in ("validate", "run")]
    return params


@pytest.fixture
def no_study(monkeypatch: pytest.MonkeyPatch) -> None:
    """If a bad spec ever got through validation, fail instead of starting Ray."""
    import scaling.study

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("validation passed: a study would have started")

    monkeypatch.setattr(scaling.study, "_execute", refuse)
    monkeypatch.setattr(scaling.study, "init_ray", refuse)


@pytest.mark.parametrize("name, command", _cli_params())
def test_cli_exits_2_names_file_and_field_writes_nothing(name: str, command: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, no_study: None) -> None:
    from scaling.cli import app

    e = EXPECTED[name]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = _snapshot()
    args = [command, str(CORPUS / name)] + (["--storage", str(cwd / "studies")] if command == "run" else [])
    res = runner.invoke(app, args)
    out = " ".join(res.output.split())  # the console may wrap long lines
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert f"{_named_file(name)}: {e['field']}: " in out, out
    assert " ".join(e["says"].split()) in out, out
    assert "s3cret" not in out, "a password was echoed"
    assert list(cwd.iterdir()) == [], "something was written"
    assert _snapshot() == before, "something was written next to the corpus"


def test_run_resource_refusal_names_the_spec_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_study: None) -> None:
    from scaling.cli import app

    monkeypatch.chdir(tmp_path)
    path = CORPUS / "too_many_cpus.yaml"
    res = runner.invoke(app, ["run", str(path), "--storage", str(tmp_path / "studies")])
    assert res.exit_code == 2 and f"{path}: resources.cpus_per_worker: " in " ".join(res.output.split()), res.output


def test_installed_console_script(tmp_path: Path) -> None:
    """The real process, as a user runs it: the unsafe-tag spec through `scaling run`, exit 2, nothing runs."""
    scaling = Path(sys.executable).parent / "scaling"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    name = "python_object_apply.yaml"
    res = subprocess.run([str(scaling), "run", str(CORPUS / name), "--storage", str(tmp_path / "studies")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"{CORPUS / name}: <yaml>: " in " ".join(res.stderr.split())
    assert list(tmp_path.iterdir()) == [], "the tag ran or something was written"


# ---------------------------------------------------------------------------------------------
# fuzz

# Keep hypothesis's caches (example database, constants) out of the checkout.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(tempfile.mkdtemp(prefix="hypothesis-"))
FUZZ = settings(max_examples=int(os.environ.get("SCALING_FUZZ_EXAMPLES", "300")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

_numbers = st.one_of(
    st.integers(), st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, 2, -1, 2**31, 2**32, 2**63, 2**64, 10**30, 1e400]),
)
_words = st.sampled_from([
    "name", "data", "model", "train", "eval", "search", "resources", "tracking", "space", "kind", "values", "low",
    "high", "step", "value", "choice", "uniform", "loguniform", "int", "intlog", "fixed", "loss", "infonce", "adnce",
    "mu", "sigma", "dcl", "shapes", "digits", "small_cnn", "knn_top1", "asha", "none", "grid", "nsga2", "tpe",
    "random", "val", "train", "max", "min", "scheduler", "objectives", "loss_params", "seed", "..", "../../x", "",
    *HYPERPARAMETERS,
])
_scalars = st.one_of(st.none(), st.booleans(), _numbers, st.text(max_size=20), _words)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(_words, st.text(max_size=8), st.integers()), inner, max_size=4)),
    max_leaves=20,
)
_dims = st.one_of(
    _values,
    st.fixed_dictionaries({"kind": st.sampled_from(["uniform", "loguniform", "int", "intlog"]), "low": _numbers, "high": _numbers},
                          optional={"step": _numbers}),
    st.fixed_dictionaries({"kind": st.sampled_from(["choice", "fixed"])},
                          optional={"values": st.lists(_scalars, max_size=4), "value": _scalars}),
    st.fixed_dictionaries({"kind": st.just("choice"),
                           "values": st.dictionaries(_words, st.one_of(st.none(), st.dictionaries(_words, _values, max_size=2)), max_size=3)}),
)
_space = st.one_of(st.dictionaries(_words, _dims, max_size=4), _values)
_section = st.just({}) | st.dictionaries(_words, _values, max_size=5)
# Spec-shaped mappings: the real sections with random contents, so the fuzz reaches the deep checks.
_spec_like = st.fixed_dictionaries(
    {"name": st.sampled_from(["fuzz"] * 6 + ["../x", 7])},  # mostly valid: reach the deeper checks
    optional={
        "data": st.one_of(_section, st.fixed_dictionaries({"name": st.sampled_from(["shapes", "digits"])}, optional={"size": _numbers, "seed": _numbers})),
        "model": _section,
        "train": st.one_of(_section, st.fixed_dictionaries({}, optional={
            "epochs": _numbers, "batch_size": _numbers, "temperature": _numbers, "loss": _words,
            "loss_params": st.dictionaries(_words, _scalars, max_size=3), "warmup_epochs": _numbers, "seed": _numbers})),
        "search": st.one_of(_values, st.fixed_dictionaries({"space": _space}, optional={
            "sampler": _words, "trials": _numbers, "repeats": _numbers, "metric": _words, "scheduler": _section,
            "objectives": _values, "seed": _numbers, "split": _words})),
        "resources": st.one_of(_section, st.fixed_dictionaries({}, optional={"workers_per_trial": _numbers, "cpus_per_worker": _numbers})),
        "tracking": _section,
        "eval": _section,
    },
)
_overrides = st.lists(
    st.builds(lambda k, v: f"{k}={v}", st.one_of(_words, st.builds(lambda a, b: f"{a}.{b}", _words, _words), st.text(max_size=10)),
              st.one_of(st.text(max_size=12), st.builds(lambda v: yaml.safe_dump(v, default_flow_style=True).strip(), _values))),
    max_size=3,
) | st.lists(st.text(max_size=12), max_size=2)


def _accepted_survives_resume(spec: StudySpec, tmp: Path) -> None:
    """What validation accepts must load again from the resolved.yaml a resumed study reads."""
    path = tmp / "resolved.yaml"
    path.write_text(dump_resolved(spec))
    again = load_spec(path)
    assert again.spec_hash() == spec.spec_hash()
    spec.space.describe()
    spec.trial.flat()


def _only_spec_errors(fn: Any, *args: Any, **kwargs: Any) -> StudySpec | None:
    try:
        return fn(*args, **kwargs)
    except SpecError:
        return None


@FUZZ
@given(raw=st.one_of(_values, _spec_like))
def test_fuzz_spec_from_dict(raw: Any, tmp_path: Path) -> None:
    spec = _only_spec_errors(spec_from_dict, raw, file=tmp_path / "fuzz.yaml")
    if spec is not None:
        _accepted_survives_resume(spec, tmp_path)


@FUZZ
@given(raw=_spec_like, overrides=_overrides)
def test_fuzz_load_spec_with_overrides(raw: Any, overrides: list[str], tmp_path: Path) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = _only_spec_errors(load_spec, path, overrides)
    if spec is not None:
        _accepted_survives_resume(spec, tmp_path)


_yaml_bits = st.sampled_from([
    "name: x\n", "search:\n  space:\n", "    temperature: {kind: loguniform, low: 0.05, high: 1.0}\n", "  trials: 2\n",
    "train: {epochs: 2}\n", "&a ", "*a", "!!python/object/apply:os.system ['true']", "!!binary aGk=", "!!set {a}",
    "? [a, b]\n: c\n", "<<: {x: 1}\n", "---\n", "...\n", "[", "]", "{", "}", ":", "- ", "\t", "\x00", "\ufeff", "'", '"',
    "%YAML 1.1\n", "!!float", "!!int", ".inf", ".nan", "1e400", "0x1F", "0o17", "~", "null", "2020-01-01", "\n", "  ",
])


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.lists(_yaml_bits, max_size=30).map("".join),
                      st.builds(lambda v, cut: yaml.safe_dump(v)[:cut], _spec_like, st.integers(0, 400))),
       raw_bytes=st.binary(max_size=40))
def test_fuzz_load_spec_random_yaml(text: str, raw_bytes: bytes, tmp_path: Path) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))  # lone surrogates make undecodable bytes
    _only_spec_errors(load_spec, path)
    path.write_bytes(raw_bytes)
    _only_spec_errors(load_spec, path)
