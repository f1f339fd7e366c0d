"""Search spaces: YAML -> dimensions -> Optuna, with a round trip and conditional loss params."""

from __future__ import annotations

import json
import math

import optuna
import pytest
from pydantic import ValidationError

from scaling.space import Fixed, distributions, parse_space, suggest

SPACE = {
    "temperature": {"kind": "loguniform", "low": 0.03, "high": 2.0},
    "batch_size": {"kind": "choice", "values": [64, 128, 256]},
    "views": {"kind": "int", "low": 2, "high": 4},
    "width": {"kind": "intlog", "low": 8, "high": 64},
    "lr": {"kind": "uniform", "low": 0.1, "high": 1.0},
    "epochs": 5,
    "loss": {"kind": "choice", "values": {"infonce": {}, "adnce": {"mu": {"kind": "uniform", "low": 0.3, "high": 1.0},
                                                                    "sigma": 0.5}}},
}


def test_parse_and_describe() -> None:
    space = parse_space(SPACE)
    assert isinstance(space.dims["epochs"], Fixed)
    assert set(space.names()) == {"temperature", "batch_size", "views", "width", "lr", "epochs", "loss", "loss.mu", "loss.sigma"}
    assert "epochs" not in space.searched() and "loss.sigma" not in space.searched() and "loss.mu" in space.searched()
    d = space.describe()
    assert d["temperature"]["log"] is True and d["lr"]["log"] is False and d["batch_size"]["log"] is False
    json.dumps(d)  # serialisable


def test_suggest_respects_bounds_and_conditionals() -> None:
    space = parse_space(SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen_losses = set()
    for _ in range(60):
        trial = study.ask()
        params = suggest(trial, space)
        study.tell(trial, 0.0)
        assert 0.03 <= params["temperature"] <= 2.0
        assert params["batch_size"] in (64, 128, 256)
        assert 2 <= params["views"] <= 4 and 8 <= params["width"] <= 64
        assert params["epochs"] == 5
        seen_losses.add(params["loss"])
        if params["loss"] == "adnce":
            assert 0.3 <= params["loss.mu"] <= 1.0 and params["loss.sigma"] == 0.5
        else:
            assert "loss.mu" not in params and "adnce.mu" not in trial.params
    assert seen_losses == {"infonce", "adnce"}


def test_distributions_round_trip_through_optuna_json() -> None:
    """The conversion point agrees with what suggest() registers, and survives Optuna's JSON round trip."""
    space = parse_space(SPACE)
    dists = distributions(space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        suggest(trial, space)
        for name, dist in trial.distributions.items():
            assert dists[name] == dist
        study.tell(trial, 1.0)
    for name, dist in dists.items():
        back = optuna.distributions.json_to_distribution(optuna.distributions.distribution_to_json(dist))
        assert back == dist, name
    # and the YAML-side model round-trips through JSON too
    again = parse_space(json.loads(json.dumps({**{k: v.model_dump() for k, v in space.dims.items()},
                                               "loss": space.loss.model_dump()})))
    assert again == space


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ({"t": {"kind": "loguniform", "low": 0.0, "high": 1.0}}, "low > 0"),
        ({"t": {"kind": "uniform", "low": 2.0, "high": 1.0}}, "low must be < high"),
        ({"t": {"kind": "choice", "values": []}}, "at least 1"),
        ({"t": {"kind": "int", "low": 1, "high": 4, "step": 0}}, "step"),
        ({"t": {"kind": "gaussian", "mu": 1}}, "does not match any of the expected tags"),
        ({"t": {"kind": "uniform", "low": 0, "high": 1, "extra": 3}}, "Extra inputs"),
        ({"t": {"kind": "uniform", "low": 0, "high": math.inf}}, "finite"),
    ],
)
def test_bad_dimensions(bad: dict, fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        parse_space(bad)


def test_grid_and_size() -> None:
    space = parse_space({"views": {"kind": "choice", "values": [2, 3]}, "batch_size": {"kind": "int", "low": 64, "high": 192, "step": 64}})
    assert space.size() == 6
    assert parse_space({"t": {"kind": "uniform", "low": 0, "high": 1}}).size() is None
