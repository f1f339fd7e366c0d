"""Study specs: loading, overrides, cross-field rules, and clear errors naming file and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from scaling.spec import HYPERPARAMETERS, SpecError, TrialConfig, load_spec

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def base(**over: object) -> dict:
    spec = {
        "name": "t",
        "data": {"name": "shapes", "size": 400},
        "train": {"epochs": 2, "batch_size": 64},
        "search": {"space": {"temperature": {"kind": "loguniform", "low": 0.05, "high": 1.0}}, "trials": 2},
    }
    spec.update(over)
    return spec


@pytest.mark.parametrize("job", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_jobs_validate(job: Path) -> None:
    spec = load_spec(job)
    assert spec.num_trials >= 1
    assert spec.search.split == "val"
    spec.space.searched()


def test_space_file_is_resolved_relative_to_spec(tmp_path: Path) -> None:
    (tmp_path / "spaces").mkdir()
    write(tmp_path / "spaces", {"batch_size": {"kind": "choice", "values": [32, 64]}}, "s.yaml")
    spec = load_spec(write(tmp_path, base(search={"space": "spaces/s.yaml"})))
    assert spec.space.searched() == ["batch_size"]


def test_overrides_fix_hyperparameters_and_paths(tmp_path: Path) -> None:
    path = write(tmp_path, base())
    spec = load_spec(path, ["temperature=0.2", "loss=dcl", "search.trials=5", "train.lr=0.05"])
    assert spec.train.temperature == 0.2 and "temperature" not in spec.space.dims
    assert spec.train.loss == "dcl" and spec.search.trials == 5 and spec.train.lr == 0.05


def test_trial_config_flat_and_with_params() -> None:
    cfg = TrialConfig()
    flat = cfg.flat()
    assert set(HYPERPARAMETERS) <= set(flat)
    new = cfg.with_params({"loss": "adnce", "loss.mu": 0.5, "batch_size": 128, "width": 16})
    assert new.train.loss == "adnce" and new.train.loss_params == {"mu": 0.5}
    assert new.flat()["loss.mu"] == 0.5 and "loss.sigma" in new.flat()  # defaults filled in
    assert cfg.train.batch_size == 256  # never mutated
    with pytest.raises(KeyError):
        cfg.with_params({"nope": 1})


BAD = [
    ({"train": {"epochs": "many"}}, "train.epochs", "integer"),
    ({"train": {"epochs": 0}}, "train.epochs", "greater than or equal to 1"),
    ({"train": {"temperature": -0.1}}, "train.temperature", "greater than 0"),
    ({"trian": {}}, "trian", "unknown key"),
    ({"train": {"loss": "simclr2"}}, "train", "loss must be one of"),
    ({"train": {"loss": "infonce", "loss_params": {"mu": 0.5}}}, "train", "not a parameter of loss 'infonce'"),
    ({"search": {"space": {"loss": {"kind": "choice", "values": {"infonce": {"mu": {"kind": "uniform", "low": 0, "high": 1}}}}}}},
     "search.space.loss.values.infonce.mu", "not a parameter of loss 'infonce'"),
    ({"search": {"space": {"temperature": {"kind": "uniform", "low": 1.0, "high": 0.5}}}}, "search.space.temperature", "low must be < high"),
    ({"search": {"space": {"batch_size": {"kind": "choice", "values": []}}}}, "search.space.batch_size.values", "at least 1"),
    ({"search": {"space": {"colour": {"kind": "uniform", "low": 0, "high": 1}}}}, "search.space.colour", "unknown hyperparameter"),
    ({"search": {"space": "missing.yaml"}}, "search.space", "not found"),
    ({"search": {"space": {}, "split": "train"}}, "search.split", "validation split"),
    ({"search": {"space": {}, "metric": "accuracy"}}, "search.metric", "knn_top1"),
    ({"resources": {"workers_per_trial": 3}, "train": {"batch_size": 64}}, "train.batch_size", "split evenly"),
    ({"search": {"space": {"views": {"kind": "int", "low": 1, "high": 3}}}}, "search.space.views", "greater than or equal to 2"),
    ({"name": "bad name/../x"}, "name", "pattern"),
]


@pytest.mark.parametrize("over, field, fragment", BAD, ids=[b[1] + ":" + b[2][:20] for b in BAD])
def test_bad_specs_name_the_field(tmp_path: Path, over: dict, field: str, fragment: str) -> None:
    spec = base()
    for key, value in over.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and isinstance(spec.get(key), dict) else value
    path = write(tmp_path, spec)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.field == field, str(info.value)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("override, field", [
    ("batch_size=true", "train.batch_size"), ("temperature=false", "train.temperature"),
    ("data.size=yes", "data.size"), ("eval.knn_k=on", "eval.knn_k"), ("search.repeats=true", "search.repeats"),
    ("resources.cpus_per_worker=true", "resources.cpus_per_worker"), ("train.fault_nan_at_step=true", "train.fault_nan_at_step"),
    ("loss.mu=true", "train.loss_params"),
])
def test_booleans_are_not_numbers(tmp_path: Path, override: str, field: str) -> None:
    """pydantic's lax mode would read `true` as 1 and `false` as 0.0: a boolean where a number belongs is refused."""
    path = write(tmp_path, base(train={"epochs": 2, "batch_size": 64, "loss": "adnce"}))
    with pytest.raises(SpecError) as info:
        load_spec(path, [override])
    assert info.value.field == field, str(info.value)
    assert "boolean" in info.value.reason or "must be a float" in info.value.reason, str(info.value)


def test_boolean_fields_still_take_booleans(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, base()), ["eval.linear_probe=true", "eval.test=false"])
    assert spec.eval.linear_probe is True and spec.eval.test is False


def test_yaml_python_tags_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="not valid safe YAML"):
        load_spec(path)


def test_non_utf8_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(SpecError, match="UTF-8"):
        load_spec(path)
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_spec_hash_is_stable(tmp_path: Path) -> None:
    path = write(tmp_path, base())
    assert load_spec(path).spec_hash() == load_spec(path).spec_hash()
    assert load_spec(path, ["train.lr=0.01"]).spec_hash() != load_spec(path).spec_hash()


@pytest.mark.parametrize("space", sorted((ROOT / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_search_spaces_validate(tmp_path: Path, space: Path) -> None:
    spec = load_spec(write(tmp_path, base(search={"space": str(space), "trials": 2})))
    assert spec.space.searched()
