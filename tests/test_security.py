"""Security guarantees (issue 7, item 8): no credentials in MLflow, YAML only safe-loaded, names that
cannot escape their directories, checkpoints loaded as tensors only, servers on 127.0.0.1.

The cluster path (``ray start`` + Ray Jobs with token auth) is covered by the cluster tests.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator
from urllib.parse import urlsplit

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient

from scaling.spec import SpecError, StudySpec, load_spec, redact_uri, spec_from_dict
from scaling.study import new_study_dir, trial_name
from scaling.tracking import StudyTracker, connectable_uri, redact_text, split_credentials
from tests.test_study import tiny_spec

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cret-Pa55"
NAME_PATTERN = StudySpec.model_fields["name"].metadata[0].pattern


# ---------------------------------------------------------------------------------------------
# credentials


def _all_text_of_study(client: MlflowClient, exp_id: str, tmp: Path) -> str:
    """Every param, tag and text artifact of every run of an experiment, as one string."""
    chunks: list[str] = []
    for run in client.search_runs([exp_id]):
        chunks += [f"{k}={v}" for k, v in run.data.params.items()]
        chunks += [f"{k}={v}" for k, v in run.data.tags.items()]
        local = client.download_artifacts(run.info.run_id, "", str(tmp / run.info.run_id))
        chunks += [p.read_text(errors="replace") for p in Path(local).rglob("*") if p.is_file()]
    return "\n".join(chunks)


@pytest.mark.integration
def test_tracking_password_is_redacted_and_never_reaches_mlflow(mlflow_server: str, tmp_path: Path) -> None:
    """A tracking URI with user:password (flag or MLFLOW_TRACKING_URI) works, is recorded redacted in the
    parent run, and the password is in no param, tag or artifact of the study (parent and child runs)."""
    host = urlsplit(mlflow_server).netloc
    uri = f"http://alice:{SECRET}@{host}"
    spec = spec_from_dict(tiny_spec("credentials", trials=2))
    tracker = StudyTracker(spec, tracking_uri=uri, raw_spec=yaml.safe_dump(tiny_spec("credentials", trials=2)))
    parent = tracker.start_study(study_dir=tmp_path / "study")
    tracker.start_trial("trial_0000", {"temperature": 0.1, "loss": "infonce"})
    tracker.log_epoch("trial_0000", {"knn_top1": 0.5, "train_loss": 3.0}, epoch=1)
    tracker.end_trial("trial_0000", status="failed", reason="NonFiniteLossError: non-finite loss at epoch 1 step 2")
    tracker.end_study(status="FINISHED", summary={"trials_total": 1, "trials_failed": 1})

    client = MlflowClient(tracking_uri=mlflow_server)  # the same server, no credentials
    params = client.get_run(parent).data.params
    assert params["study.tracking_uri"] == f"http://***@{host}"
    everything = _all_text_of_study(client, tracker.experiment_id, tmp_path / "artifacts")
    assert "study.tracking_uri=http://***@" in everything
    assert SECRET not in everything and "alice" not in everything
    assert SECRET not in tracker.experiment_url_hint()


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_credentials_stay_out_of_study_files_logs_and_runs(ray_local: None, mlflow_server: str, tmp_path: Path,
                                                           capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole study tracked through `http://alice:<password>@host`: the password is used to connect but
    is in no file of the study directory (study.json, resolved.yaml, Tune's pickled state, checkpoints),
    no line the study printed, no Ray log, no MLflow param, tag or artifact; study.json keeps the URI
    redacted, so `scaling resume` asks for the credentials instead of reading them from disk."""
    import ray._private.worker as worker

    from scaling.study import StudyError, resume_study, run_study

    host = urlsplit(mlflow_server).netloc
    uri = f"http://alice:{SECRET}@{host}"
    raw = tiny_spec("creds-study", trials=1, epochs=1)
    result = run_study(spec_from_dict(raw), raw_spec=yaml.safe_dump(raw), storage=tmp_path / "studies",
                       tracking_uri=uri, progress=False)
    assert result.trials.to_pylist()[0]["status"] == "completed"

    info = json.loads((result.study_dir / "study.json").read_text())
    assert info["tracking_uri"] == f"http://***@{host}"
    leaks = [str(p) for p in result.study_dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks, leaks
    printed = capfd.readouterr()
    assert SECRET not in printed.out + printed.err
    assert SECRET not in result.ui_hint
    session = Path(worker._global_node.get_session_dir_path())
    leaks = [str(p) for p in session.rglob("*") if p.is_file() and not p.is_symlink() and SECRET.encode() in p.read_bytes()]
    assert not leaks, leaks
    client = MlflowClient(tracking_uri=mlflow_server)
    everything = _all_text_of_study(client, result.experiment_id, tmp_path / "artifacts")
    assert SECRET not in everything and f"study.tracking_uri=http://***@{host}" in everything

    # resume: the credentials come from the environment, never from the study directory
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(StudyError, match="MLFLOW_TRACKING_USERNAME") as info_err:
        resume_study(result.study_dir, progress=False)
    assert SECRET not in str(info_err.value)
    assert connectable_uri(info["tracking_uri"], {"MLFLOW_TRACKING_URI": uri}) == uri
    assert connectable_uri(info["tracking_uri"], {"MLFLOW_TRACKING_USERNAME": "alice"}) == f"http://{host}"


def test_job_request_keeps_the_password_out_of_the_job_listing() -> None:
    """`ray job list`, the dashboard and `scaling status` show a job's entrypoint and metadata: a password
    in the tracking URI goes to the job as MLflow's own environment variables instead."""
    from scaling.cluster import JOB_ENV, job_request

    spec = spec_from_dict(tiny_spec("job-creds"))
    uri = f"https://alice:{SECRET.replace('-', '%2D')}@mlflow.example.org:5000/prefix"
    entrypoint, metadata, env_vars = job_request(spec, rel_spec="_job/job-creds.yaml", tracking_uri=uri,
                                                 storage="/mnt/shared/studies")
    assert SECRET not in entrypoint and "alice" not in entrypoint and "%2D" not in entrypoint
    assert "--tracking-uri https://mlflow.example.org:5000/prefix " in entrypoint
    assert SECRET not in json.dumps(metadata) and metadata["scaling.tracking_uri"] == "https://***@mlflow.example.org:5000/prefix"
    assert env_vars == {**JOB_ENV, "MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": SECRET}
    assert int(env_vars["RAY_JOB_STOP_WAIT_TIME_S"]) > 10  # time to close the study's runs on `scaling stop`
    plain, _, plain_env = job_request(spec, rel_spec="x.yaml", tracking_uri="http://10.0.0.7:5000", storage="/s")
    assert "--tracking-uri http://10.0.0.7:5000 " in plain and "MLFLOW_TRACKING_PASSWORD" not in plain_env


def test_error_messages_are_redacted() -> None:
    text = (f"API request to http://alice:{SECRET}@127.0.0.1:5000/api/2.0/mlflow/runs/log-batch failed; "
            f"postgresql://u:{SECRET}@db/x and 'https://tok@host'")
    out = redact_text(text)
    assert SECRET not in out and "tok@" not in out
    assert "http://***@127.0.0.1:5000/api" in out and "postgresql://***@db/x" in out
    assert split_credentials(f"http://alice:{SECRET}@h:1/p?q=1") == ("http://h:1/p?q=1", "alice", SECRET)
    assert split_credentials("sqlite:////tmp/mlflow.db") == ("sqlite:////tmp/mlflow.db", None, None)


def test_credentials_in_the_spec_are_refused_and_not_echoed(tmp_path: Path) -> None:
    """The spec is saved verbatim with the study and as an MLflow artifact: a URI with a password in it
    is refused, and the error message shows it redacted."""
    raw = tiny_spec("creds-in-spec")
    raw["tracking"]["uri"] = f"https://bob:{SECRET}@mlflow.example.org"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.field == "tracking.uri" and SECRET not in str(info.value)
    assert redact_uri(f"postgresql://u:{SECRET}@db:5432/mlflow") == "postgresql://***@db:5432/mlflow"


# ---------------------------------------------------------------------------------------------
# YAML and pickles


_UNSAFE_LOADING = re.compile(r"yaml\.(load|load_all|full_load|unsafe_load)\s*\(|Loader\s*=\s*yaml\.(Loader|FullLoader|UnsafeLoader)"
                             r"|pickle\.loads?\s*\(|cloudpickle\.loads?\s*\(")


def test_no_unsafe_deserialisation_in_the_code() -> None:
    """Every YAML read is yaml.safe_load/SafeLoader; every torch.load passes weights_only=True; no pickle.load."""
    offenders = []
    for path in sorted([*ROOT.glob("scaling/**/*.py"), *ROOT.glob("analysis/**/*.py")]):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if _UNSAFE_LOADING.search(line) or ("torch.load(" in line and "weights_only=True" not in line):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, offenders


@pytest.mark.parametrize("payload", [
    "name: !!python/object/apply:os.system ['touch {marker}']\n",
    "!!python/object/new:subprocess.Popen [['touch', '{marker}']]\n",
    "name: x\nsearch: {{space: {{temperature: !!python/object/apply:os.system ['touch {marker}']}}}}\n",
])
def test_python_yaml_tags_never_execute(payload: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(payload.format(marker=marker))
    with pytest.raises(SpecError, match="not valid safe YAML"):
        load_spec(path)
    assert not marker.exists()


class _Evil:
    """Unpickling this runs a shell command (what a poisoned checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path: Path) -> None:
    """scaling.worker.load_checkpoint_state (what a restarted trial calls) loads tensors only: a
    checkpoint carrying an arbitrary pickled object is rejected and its code never runs."""
    import ray.train

    from scaling.loop import build_state
    from scaling.spec import TrialConfig
    from scaling.worker import CHECKPOINT_FILE, load_checkpoint_state

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    cfg = TrialConfig.model_validate({k: v for k, v in tiny_spec("ckpt").items() if k in ("data", "model", "train", "eval")})
    state = build_state(cfg, num_train=100).state_dict()
    torch.save({**state, "history": [_Evil(marker)]}, evil / CHECKPOINT_FILE)
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only load failed"):
        load_checkpoint_state(ray.train.Checkpoint.from_directory(str(evil)))
    assert not marker.exists()

    good = tmp_path / "good"
    good.mkdir()
    torch.save(state, good / CHECKPOINT_FILE)  # a real TrainState still loads (resume keeps working)
    loaded = load_checkpoint_state(ray.train.Checkpoint.from_directory(str(good)))
    assert loaded is not None and loaded["epoch"] == 0
    assert torch.equal(loaded["torch_rng"], state["torch_rng"])


# ---------------------------------------------------------------------------------------------
# path traversal


@pytest.mark.parametrize("name", ["../../x", "..", "a/../../b", "/tmp/x", "a\\..\\b", "~root", ".hidden", "-rf", "a b",
                                  "x" * 101, "café", "a\x00b", ""])
def test_study_names_that_could_escape_are_refused(name: str) -> None:
    with pytest.raises(SpecError) as info:
        spec_from_dict({"name": name})
    assert info.value.field == "name"


@settings(max_examples=200, deadline=None, database=None)
@given(name=st.from_regex(NAME_PATTERN, fullmatch=True))
def test_every_valid_study_name_stays_in_the_storage_directory(name: str) -> None:
    storage = Path("/nonexistent/storage")
    path = new_study_dir(spec_from_dict({"name": name}), storage)
    assert path.parent == storage and path.name.startswith(name) and path.resolve().parent == storage


@settings(max_examples=200, deadline=None, database=None)
@given(number=st.integers(0, 10**9), repeat=st.none() | st.integers(0, 10**6))
def test_trial_names_are_fixed_shape(number: int, repeat: int | None) -> None:
    """Run names, Ray Train run directories (storage/train/<trial>) and MLflow run names all come from
    trial_name(): digits only, whatever the config."""
    config: dict[str, Any] = {"__number__": number, **({"__trial_index__": repeat} if repeat is not None else {})}
    assert re.fullmatch(r"trial_\d{4,}(_r\d+)?", trial_name(SimpleNamespace(config=config)))


def test_trial_name_from_a_hostile_config_is_not_a_path() -> None:
    with pytest.raises((TypeError, ValueError)):
        trial_name(SimpleNamespace(config={"__number__": "../../x"}))


def test_artifact_paths_are_fixed(tmp_path: Path) -> None:
    """The study's artifacts land under fixed names in the run's artifact root (no name from input)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = spec_from_dict(tiny_spec("artifacts"))
    tracker = StudyTracker(spec, tracking_uri=uri, raw_spec="name: artifacts\n")
    parent = tracker.start_study(study_dir=tmp_path / "study")
    client = MlflowClient(tracking_uri=uri)
    arts = {a.path for a in client.list_artifacts(parent, "spec")}
    assert arts == {"spec/resolved.yaml", "spec/spec.yaml", "spec/versions.json"}
    root = Path(urlsplit(client.get_run(parent).info.artifact_uri).path)
    assert all(p.resolve().is_relative_to(root.resolve()) for p in root.rglob("*"))


# ---------------------------------------------------------------------------------------------
# servers


def _listening(port: int) -> list[str]:
    import psutil

    return sorted({c.laddr.ip for c in psutil.net_connections(kind="tcp")
                   if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port})


def _other_address() -> str | None:
    """A non-loopback address of this machine, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


@pytest.fixture
def dashboard(ray_local: None) -> Iterator[tuple[str, int]]:
    import ray._private.worker as worker

    url = worker._global_node.webui_url  # what ray.init() returned as address_info["webui_url"]
    host, port = url.rsplit(":", 1)
    yield host, int(port)


@pytest.mark.integration
def test_local_ray_dashboard_listens_on_loopback_only(dashboard: tuple[str, int]) -> None:
    host, port = dashboard
    assert host == "127.0.0.1"
    assert _listening(port) == ["127.0.0.1"]
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    other = _other_address()
    if other:
        with pytest.raises(OSError):
            socket.create_connection((other, port), timeout=5).close()


@pytest.mark.integration
def test_local_ray_dashboard_requires_the_token(dashboard: tuple[str, int]) -> None:
    """Token authentication stays on for the local cluster: the jobs API refuses a request without
    the token (401) or with a wrong one (403) and answers with it."""
    host, port = dashboard
    url = f"http://{host}:{port}/api/jobs/"
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()

    def status(headers: dict[str, str]) -> int:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=20) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status({}) == 401
    assert status({"Authorization": "Bearer " + "0" * len(token)}) == 403
    assert status({"Authorization": f"Bearer {token}"}) == 200
