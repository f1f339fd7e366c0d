"""Integration: a real two-node Ray cluster (``ray start`` head + worker on 127.0.0.1, token auth on),
a real ``mlflow server``, studies submitted through the Ray Jobs API with the ``scaling`` CLI.

The cluster is started and stopped here: each node is one ``ray start --block`` process in its own
session; teardown stops the nodes with SIGTERM and kills whatever they left behind by process id.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from scaling.cli import app
from tests.conftest import free_port, write_token
from tests.test_study import tiny_spec

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# the cluster


@dataclass
class Node:
    proc: subprocess.Popen
    temp_dir: Path
    log: Path


@dataclass
class LocalCluster:
    address: str  # the dashboard: what `scaling submit --address` takes
    token: Path
    env: dict[str, str]  # a client environment that holds the token (and the venv on PATH)
    nodes: list[Node] = field(default_factory=list)
    node_ids: set[str] = field(default_factory=set)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token.read_text().strip()}"}


def _distinct_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports and not 10000 <= p < 20000:  # Ray's worker port range
            ports.append(p)
    return ports


def _ray_start(args: list[str], *, temp_dir: Path, env: dict[str, str]) -> Node:
    log = temp_dir / "node.log"
    proc = subprocess.Popen([str(BIN / "ray"), "start", *args, "--temp-dir", str(temp_dir), "--block",
                             "--disable-usage-stats"], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    return Node(proc, temp_dir, log)


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time): enough to walk a process tree and to notice a reused pid."""
    table = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            table[int(d.name)] = (int(fields[1]), fields[19])
    return table


def _descendants(roots: list[int]) -> dict[int, str]:
    table = _proc_table()
    found = {r: table[r][1] for r in roots if r in table}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, start) in table.items():
            if ppid in found and pid not in found:
                found[pid] = start
                grew = True
    return found


def _stop(nodes: list[Node]) -> None:
    """SIGTERM each `ray start --block` (it stops its node), then SIGKILL anything of ours still alive."""
    ours = _descendants([n.proc.pid for n in nodes])
    for node in reversed(nodes):  # worker first
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
    for node in nodes:
        try:
            node.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.time() + 10
    while True:
        table = _proc_table()
        alive = [pid for pid, start in ours.items() if pid in table and table[pid][1] == start]
        if not alive:
            return
        if time.time() > deadline:
            for pid in alive:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return
        time.sleep(0.5)


def _alive_nodes(cluster: LocalCluster) -> set[str]:
    r = requests.get(f"{cluster.address}/nodes?view=summary", headers=cluster.headers(), timeout=5)
    r.raise_for_status()
    return {n["raylet"]["nodeId"] for n in r.json()["data"]["summary"] if n["raylet"]["state"] == "ALIVE"}


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    """Head (2 CPUs, 2 trial slots) + worker node (1 CPU, 1 trial slot), token auth on, all on 127.0.0.1."""
    head_dir = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))  # short: Ray's unix sockets live below
    worker_dir = Path(tempfile.mkdtemp(prefix="rw-", dir="/tmp"))
    token = write_token(head_dir / "auth_token")
    gcs, dash, client_port, agent_head, agent_worker = _distinct_ports(5)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_TOKEN"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_TMPDIR=str(head_dir),
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is the venv's
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # stop at once on SIGTERM
    cluster = LocalCluster(address=f"http://127.0.0.1:{dash}", token=token, env=env)
    try:
        cluster.nodes.append(_ray_start(
            ["--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(dash), "--ray-client-server-port", str(client_port),
             "--dashboard-agent-listen-port", str(agent_head), "--num-cpus", "2",
             "--resources", json.dumps({"scaling_trial": 2})], temp_dir=head_dir, env=env))
        cluster.nodes.append(_ray_start(
            ["--address", f"127.0.0.1:{gcs}", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
             "--resources", json.dumps({"scaling_trial": 1}), "--dashboard-agent-listen-port", str(agent_worker)],
            temp_dir=worker_dir, env={**env, "RAY_TMPDIR": str(worker_dir)}))
        request.getfixturevalue("mlflow_server")  # starts meanwhile (about 13 s, like the nodes)
        deadline = time.time() + 120
        while True:
            try:
                cluster.node_ids = _alive_nodes(cluster)
            except (requests.RequestException, KeyError, ValueError):
                cluster.node_ids = set()
            if len(cluster.node_ids) == 2:
                break
            dead = [n for n in cluster.nodes if n.proc.poll() is not None]
            if dead or time.time() > deadline:
                logs = "\n".join(n.log.read_text()[-3000:] for n in cluster.nodes)
                raise RuntimeError(f"the Ray cluster did not come up (nodes alive: {len(cluster.node_ids)}):\n{logs}")
            time.sleep(0.5)
        yield cluster
    finally:
        _stop(cluster.nodes)
        for d in (head_dir, worker_dir):
            shutil.rmtree(d, ignore_errors=True)


def scaling(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    return subprocess.run([str(BIN / "scaling"), *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT)


def _spec_file(tmp_path: Path, name: str, **kw: object) -> Path:
    spec = tmp_path / f"{name}.yaml"  # outside the project: the job must get it from the submission
    spec.write_text(yaml.safe_dump(tiny_spec(name, **kw)))
    return spec


# ---------------------------------------------------------------------------------------------
# tests


def cli(cluster: LocalCluster, *args: str) -> tuple[int, str]:
    """A cluster command in this process (the token from RAY_AUTH_TOKEN_PATH, as a user sets it)."""
    res = CliRunner().invoke(app, [*args, "--address", cluster.address],
                             env={"RAY_AUTH_TOKEN_PATH": str(cluster.token), "RAY_AUTH_TOKEN": None})
    return res.exit_code, " ".join(res.output.split()) if args[0] != "logs" else res.output


@pytest.mark.timeout(300)
def test_submit_wait_runs_the_study_on_both_nodes(cluster: LocalCluster, mlflow_server: str, tmp_path: Path) -> None:
    """submit --wait -> SUCCEEDED; every trial is a child run in the server; trials ran on both nodes;
    `scaling status/logs/jobs` report it."""
    spec = _spec_file(tmp_path, "on-cluster", trials=3)
    storage = tmp_path / "studies"
    t0 = time.monotonic()
    res = scaling("submit", str(spec), "--address", cluster.address, "--tracking-uri", mlflow_server,
                  "--storage", str(storage), "--wait", env=cluster.env)
    round_trip = time.monotonic() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    job_id = re.search(r"as job (\S+)", res.stdout).group(1)
    assert f"scaling logs {job_id} --address {cluster.address} --follow" in " ".join(res.stdout.split())
    assert f"job {job_id}: SUCCEEDED" in res.stdout
    for i in range(3):  # the study's progress lines, streamed while waiting
        assert f"[scaling] trial trial_{i:04d} started" in res.stdout
        assert re.search(rf"\[scaling\] trial trial_{i:04d} finished: [123]/3 done", res.stdout)
    assert "finished: 3/3 done" in res.stdout and "study on-cluster: 3 trials: 3 completed" in res.stdout

    code, st = cli(cluster, "status", job_id)
    assert code == 0 and f"{job_id}: SUCCEEDED" in st and "(study on-cluster)" in st, st
    took = re.search(r"SUCCEEDED, (\d+) s", st).group(1)
    print(f"\njob round trip: `scaling submit --wait` {round_trip:.1f} s (CLI start to exit); "
          f"job start -> SUCCEEDED {took} s (Ray's job times)")
    code, logs = cli(cluster, "logs", job_id)
    assert code == 0 and "[scaling] trial trial_0001 started" in logs and "finished: 3/3 done" in logs
    assert "study on-cluster: 3 trials: 3 completed" in logs
    code, listed = cli(cluster, "jobs")
    assert code == 0 and job_id in listed and "SUCCEEDED" in listed

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("on-cluster")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`scaling.role` = 'study'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["scaling.study_dir"].startswith(str(storage))
    kids = client.search_runs([exp.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert sorted(r.data.tags["scaling.trial_id"] for r in kids) == ["trial_0000", "trial_0001", "trial_0002"]
    for run in kids:
        assert run.info.status == "FINISHED" and run.data.tags["scaling.status"] == "completed"
        assert run.data.tags["scaling.node_id"] == run.data.params["derived.node_id"]
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "knn_top1")) == [1, 2]
    used = {r.data.tags["scaling.node_id"] for r in kids}
    assert used == cluster.node_ids, f"trials ran on {used}, cluster nodes {cluster.node_ids}"
    assert len(list(storage.glob("on-cluster-*/trials.parquet"))) == 1  # the study dir on the shared storage


@pytest.mark.timeout(120)
def test_submission_without_or_with_a_wrong_token_is_refused(cluster: LocalCluster, mlflow_server: str,
                                                             tmp_path: Path) -> None:
    spec = _spec_file(tmp_path, "no-token", trials=1)
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    res = scaling("submit", str(spec), "--address", cluster.address, "--tracking-uri", mlflow_server, env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    err = " ".join(res.stderr.split())
    assert "requires an auth token" in err and "RAY_AUTH_TOKEN" in err and "RAY_AUTH_TOKEN_PATH" in err, err

    res = scaling("submit", str(spec), "--address", cluster.address, "--tracking-uri", mlflow_server,
                  env={**env, "RAY_AUTH_TOKEN": "0" * 64})
    assert res.returncode == 1
    err = " ".join(res.stderr.split())
    assert "refused the auth token from RAY_AUTH_TOKEN" in err and "wrong token" in err, err
    assert MlflowClient(tracking_uri=mlflow_server).get_experiment_by_name("no-token") is None


@pytest.mark.timeout(150)
def test_stop_a_running_job_closes_its_study_run(cluster: LocalCluster, mlflow_server: str, tmp_path: Path) -> None:
    spec = _spec_file(tmp_path, "to-stop", trials=2, epochs=50)
    code, out = cli(cluster, "submit", str(spec), "--tracking-uri", mlflow_server, "--storage", str(tmp_path / "s"))
    assert code == 0, out
    job_id = re.search(r"as job (\S+)", out).group(1)
    client = MlflowClient(tracking_uri=mlflow_server)
    deadline = time.time() + 90
    while True:  # stop it once the study is under way (its parent run exists)
        exp = client.get_experiment_by_name("to-stop")
        parents = client.search_runs([exp.experiment_id]) if exp else []
        if parents or time.time() > deadline:
            break
        time.sleep(1)
    assert parents, cli(cluster, "logs", job_id)[1]
    code, out = cli(cluster, "stop", job_id)
    assert code == 0 and "stop requested" in out, out
    deadline = time.time() + 60
    while True:
        code, st = cli(cluster, "status", job_id)
        if "STOPPED" in st or time.time() > deadline:
            break
        time.sleep(1)
    assert f"{job_id}: STOPPED" in st, st
    assert client.get_run(parents[0].info.run_id).info.status == "KILLED"
    code, out = cli(cluster, "status", "no-such-job")
    assert code == 1 and "no-such-job" in out, out


# ---------------------------------------------------------------------------------------------
# input checks: no cluster needed, nothing contacted


runner = CliRunner()


def test_sqlite_tracking_for_a_remote_cluster_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = _spec_file(tmp_path, "local-store")
    res = runner.invoke(app, ["submit", str(spec), "--address", "http://10.0.0.5:8265",
                              "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    out = " ".join(res.output.split())
    assert res.exit_code == 2, out
    assert "tracking.uri" in out and "SQLite" in out and "--tracking-uri http://" in out
    res = runner.invoke(app, ["submit", str(spec), "--address", "http://10.0.0.5:8265"])  # the default store
    assert res.exit_code == 2 and "sqlite:" in res.output


def test_bad_input_exits_2_before_contacting_the_cluster(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "train": {"epochs": -1}}))
    unreachable = "http://127.0.0.1:1"
    res = runner.invoke(app, ["submit", str(bad), "--address", unreachable, "--tracking-uri", "http://x:5000"])
    assert res.exit_code == 2 and "train.epochs" in res.output
    spec = _spec_file(tmp_path, "fine")
    res = runner.invoke(app, ["submit", str(spec), "--address", "ray://head:10001", "--tracking-uri", "http://x:5000"])
    assert res.exit_code == 2 and "dashboard" in res.output
    res = runner.invoke(app, ["submit", str(spec), "--address", "http://10.0.0.5:8265", "--tracking-uri", "http://x:5000"])
    assert res.exit_code == 2 and "--storage" in res.output  # a remote cluster needs shared storage
    res = runner.invoke(app, ["submit", str(spec), "--address", "http://10.0.0.5:8265", "--storage", "/shared",
                              "--tracking-uri", "http://127.0.0.1:5000"])  # the nodes' own localhost
    assert res.exit_code == 2 and "points at this machine" in " ".join(res.output.split())
    res = runner.invoke(app, ["submit", str(spec), "--address", unreachable, "--tracking-uri", "http://x:5000"])
    assert res.exit_code == 1 and "cannot reach the Ray dashboard" in " ".join(res.output.split())


def test_working_dir_ships_code_and_resolved_spec_only(tmp_path: Path) -> None:
    from scaling.cluster import stage_working_dir
    from scaling.spec import load_spec

    spec = load_spec(_spec_file(tmp_path, "staged"), ["search.trials=2"])
    dest = tmp_path / "wd"
    dest.mkdir()
    rel = stage_working_dir(spec, dest)
    assert (dest / "pyproject.toml").is_file()
    for package in ("scaling", "analysis"):  # every module, subpackages included (scaling/data is no dataset)
        code = {p.relative_to(ROOT) for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts}
        assert code and code <= {p.relative_to(dest) for p in (dest / package).rglob("*.py")}
    for excluded in (".venv", ".git", "mlruns", "studies", "data", "benchmarks/results"):
        assert not (dest / excluded).exists(), excluded
    assert not list(dest.rglob("__pycache__")) and not list(dest.rglob("*.egg-info"))
    shipped = load_spec(dest / rel)
    assert shipped.spec_hash() == spec.spec_hash() and shipped.search.trials == 2


def test_token_lookup_order(tmp_path: Path) -> None:
    from scaling.cluster import ClusterError, find_token

    f = write_token(tmp_path / "tok")
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    assert find_token({"RAY_AUTH_TOKEN": "abc", "RAY_AUTH_TOKEN_PATH": str(f)}).value == "abc"
    assert find_token({"RAY_AUTH_TOKEN_PATH": str(f), "HOME": str(home)}).value == f.read_text()
    assert find_token({"HOME": str(home)}).value == "from-home"
    assert find_token({"HOME": str(tmp_path)}) is None
    with pytest.raises(ClusterError, match="names no file"):
        find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
