"""`python -m sweep.copy`: a machine's sqlite store, brought back with its artifacts, copied into another sqlite store
and into a team's `mlflow server` on PostgreSQL (slow), once however often it runs."""

from __future__ import annotations

import hashlib
import io
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from mlflow.entities import Metric, Run
from mlflow.tracking import MlflowClient
from test_server import (
    LOCAL_ENV,
    Server,
    _loopback_without_proxy,  # noqa: F401  (autouse: this module's clients skip proxies too)
    free_port,
    mlflow_server,
    run_report,
)

from sweep.config import TrackingConfig
from sweep.copy import main
from sweep.records.results import JobResult, RunStatus
from sweep.store.copy import COPIED_FROM_TAG
from sweep.store.tracking import Tracker
from sweep.views.summary import job_description

EXPERIMENT = TrackingConfig.experiment
GB10 = {"gpu_name": "NVIDIA GB10", "device_capability": "12.1", "host": "gb10-desk", "torch_version": "2.11.0",
        "cuda_version": "13.0"}
REWRITTEN = {"mlflow.parentRunId", "sweep_id", "mlflow.note.content", COPIED_FROM_TAG}


@dataclass
class Brought:
    """A machine's `runs/` folder brought here: its sqlite store and its artifacts, which MLflow still looks for
    where the machine wrote them."""
    uri: str
    artifact_root: Path
    sweeps: list[str]  # parent run ids, oldest first

    def copy_args(self, target: str, *more: str) -> list[str]:
        return ["--from", self.uri, "--to", target, "--from-artifact-root", str(self.artifact_root), *more]


def job(kernels: str, status: RunStatus = RunStatus.measured, reason: str = "") -> JobResult:
    result = JobResult(name=f"fp32 {kernels}", status=status, reason=reason, tags=dict(GB10),
                       params={"model": "tiny-llama", "dtype": "fp32", "kernels": kernels, "prompt_len": "16",
                               "batch_size": "1", "device": "cuda", "timing_mode": "graph", "workload": "prefill"},
                       metrics={"latency_ms_baseline": 2.0, "latency_ms_kernel": 1.6, "speedup": 1.25,
                                "speedup_ci_low": 1.2, "speedup_ci_high": 1.3, "job_wall_s": 3.0}
                       if status == RunStatus.measured else {"job_wall_s": 1.0})
    result.artifacts["config.yaml"] = f"kernels: {kernels}\n"
    return result


def log_two_sweeps(uri: str, artifact_root: Path) -> list[str]:
    """Through sweep's own Tracker, as the machine's sweeps did: the first measures rms and silu (silu also logs a
    metric over three steps) and links them from its description; the second resumes rms and fails on both."""
    tracker = Tracker(TrackingConfig(uri=uri, artifact_root=str(artifact_root)), describe=job_description)
    first = tracker.start_sweep("python -m sweep -m kernels=rms,silu", tags={"total_jobs": "2"})
    rms, silu = (tracker.log_job(first, job(kernels)) for kernels in ("rms", "silu"))
    tracker.client.log_batch(silu, metrics=[Metric("loss", 1.0 / (step + 1), 1_700_000_000_000 + step, step)
                                            for step in range(3)])
    tracker.describe_sweep(first, f"[rms]({tracker.run_link(rms)}) ![chart]({tracker.artifact_link(first, 'c.png')})",
                           {"c.png": b"\x89PNG", "summary/results.csv": f"run_id\n{rms}\n{silu}\n"})
    tracker.end_sweep(first, {"jobs_measured": 2.0}, failed=False)
    second = tracker.start_sweep("python -m sweep -m kernels=rms,both", tags={"total_jobs": "2"})
    tracker.note_resumed(second, "0123456789abcdef0123", "fp32 rms", rms)
    tracker.log_job(second, job("both", RunStatus.failed, "CUDA out of memory"))
    tracker.end_sweep(second, {"jobs_measured": 0.0, "jobs_failed": 1.0, "jobs_resumed": 1.0}, failed=True)
    return [first, second]


@pytest.fixture(scope="module")
def new_store(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], str]:
    """Makes an empty sqlite store at a path, its URI: a copy of one MLflow made (making each takes seconds)."""
    made = tmp_path_factory.mktemp("empty") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{made}").search_experiments()

    def make(path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(made, path)
        return f"sqlite:///{path}"

    return make


@pytest.fixture(scope="module")
def brought(tmp_path_factory: pytest.TempPathFactory, new_store: Callable[[Path], str]) -> Brought:
    tmp = tmp_path_factory.mktemp("gb10")
    machine, here = tmp / "machine" / "runs", tmp / "brought" / "runs"
    sweeps = log_two_sweeps(new_store(machine / "mlflow.db"), machine / "artifacts")
    shutil.copytree(machine, here)
    shutil.rmtree(machine.parent)
    return Brought(f"sqlite:///{here}/mlflow.db", here / "artifacts", sweeps)


def copy(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def runs_by_origin(uri: str) -> dict[str, Run]:
    """Every run of the store, by the id of the run it copies (its own id when it is no copy)."""
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return {run.data.tags.get(COPIED_FROM_TAG, run.info.run_id): run for run in runs}


def artifact(uri: str, run_id: str, path: str) -> bytes:
    return Path(MlflowClient(tracking_uri=uri).download_artifacts(run_id, path)).read_bytes()


def assert_copied(source_uri: str, target_uri: str) -> None:
    """Every run of the source is in the target once, with everything it holds, its run ids rewritten to the
    copies' ids."""
    source, target = runs_by_origin(source_uri), runs_by_origin(target_uri)
    assert len(target) == len(source) == 5 and source.keys() <= target.keys()
    ids = {origin: run.info.run_id for origin, run in target.items()}
    target_experiment = MlflowClient(tracking_uri=target_uri).get_experiment_by_name(EXPERIMENT).experiment_id
    source_client, target_client = MlflowClient(tracking_uri=source_uri), MlflowClient(tracking_uri=target_uri)
    for origin, run in source.items():
        copied = target[origin]
        assert copied.info.run_id != origin and copied.data.tags[COPIED_FROM_TAG] == origin
        assert (copied.info.run_name, copied.info.status, copied.info.start_time, copied.info.end_time) == (
            run.info.run_name, run.info.status, run.info.start_time, run.info.end_time)
        assert copied.data.params == run.data.params and copied.data.metrics == run.data.metrics
        for key in run.data.metrics:
            history = [(m.step, m.timestamp, m.value) for m in source_client.get_metric_history(origin, key)]
            assert [(m.step, m.timestamp, m.value)
                    for m in target_client.get_metric_history(copied.info.run_id, key)] == history
        unchanged = {k: v for k, v in run.data.tags.items() if k not in REWRITTEN and not k.startswith("resumed.")}
        assert {k: v for k, v in copied.data.tags.items() if k in unchanged} == unchanged
        if run.data.tags["sweep_role"] == "job":
            parent = ids[run.data.tags["sweep_id"]]
            assert copied.data.tags["sweep_id"] == copied.data.tags["mlflow.parentRunId"] == parent
            kernels = run.data.params["kernels"]
            assert artifact(target_uri, copied.info.run_id, "config.yaml") == f"kernels: {kernels}\n".encode()
    first, second = (target[origin] for origin in sorted(source, key=lambda o: source[o].info.start_time)
                     if source[origin].data.tags["sweep_role"] == "parent")
    rms = ids[next(o for o, run in source.items() if run.info.run_name == "fp32 rms")]
    note = first.data.tags["mlflow.note.content"]
    assert f"#/experiments/{target_experiment}/runs/{rms}?" in note and f"run_uuid={first.info.run_id}" in note
    assert not any(origin in note for origin in source)
    assert artifact(target_uri, first.info.run_id, "c.png") == b"\x89PNG"
    assert [v for k, v in second.data.tags.items() if k.startswith("resumed.")] == [f"fp32 rms: measured in run {rms}"]


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_brought_store_is_copied_whole_and_copying_again_adds_nothing(brought, tmp_path, capsys):
    target = f"sqlite:///{tmp_path}/team/mlflow.db"
    code, out, err = copy(capsys, *brought.copy_args(target))
    assert code == 0, err
    assert out.count(": new, ") == 2 and "copied 2 sweeps and 3 job runs; already there: 0 sweeps and 0 job runs" in out
    assert_copied(brought.uri, target)
    assert (tmp_path / "team" / "artifacts").is_dir()  # beside the new sqlite store

    code, out, err = copy(capsys, *brought.copy_args(target))
    assert code == 0, err
    assert out.count(": already there, 0 of ") == 2
    assert "copied 0 sweeps and 0 job runs; already there: 2 sweeps and 3 job runs" in out
    assert_copied(brought.uri, target)


def test_a_copy_of_a_copy_names_the_same_runs(brought, new_store, tmp_path, capsys):
    """Runs carried A -> B and B -> C, then A -> C again: C holds each run once."""
    b, c = new_store(tmp_path / "b.db"), new_store(tmp_path / "c.db")
    assert copy(capsys, *brought.copy_args(b))[0] == 0
    assert copy(capsys, "--from", b, "--to", c)[0] == 0
    code, out, err = copy(capsys, *brought.copy_args(c))
    assert code == 0, err
    assert "copied 0 sweeps and 0 job runs" in out
    assert_copied(brought.uri, c)


def test_a_dry_run_says_what_it_would_copy_and_writes_nothing(brought, new_store, tmp_path, capsys):
    missing = tmp_path / "none" / "mlflow.db"
    code, out, err = copy(capsys, *brought.copy_args(f"sqlite:///{missing}", "--dry-run"))
    assert code == 0, err
    assert "would copy 2 sweeps and 3 job runs; already there: 0 sweeps and 0 job runs (dry run" in out
    assert f"sweep {brought.sweeps[0][:8]} 'python -m sweep -m kernels=rms,silu' (" in out
    assert ", FINISHED): new, 2 of 2 job runs to copy" in out and ", FAILED): new, 1 of 1 job runs to copy" in out
    assert not missing.parent.exists()

    target = tmp_path / "half" / "mlflow.db"
    assert copy(capsys, *brought.copy_args(new_store(target)))[0] == 0
    # What a copy interrupted half-way leaves: a job run not yet copied, another not completed, the parent open.
    client = MlflowClient(tracking_uri=f"sqlite:///{target}")
    copies = runs_by_origin(f"sqlite:///{target}")
    first = copies[brought.sweeps[0]].info.run_id
    jobs = [run.info.run_id for run in copies.values() if run.data.tags.get("sweep_id") == first]
    client.delete_run(jobs[0])
    client.set_terminated(jobs[1], status="RUNNING")
    client.set_terminated(first, status="RUNNING")
    before = file_digest(target)
    code, out, err = copy(capsys, *brought.copy_args(f"sqlite:///{target}", "--dry-run"))
    assert code == 0, err
    assert ", FINISHED): out of date, 2 of 2 job runs to copy" in out
    assert "would copy 1 sweep and 2 job runs; already there: 1 sweep and 1 job run" in out
    assert file_digest(target) == before

    code, out, err = copy(capsys, *brought.copy_args(f"sqlite:///{target}"))
    assert code == 0, err
    assert_copied(brought.uri, f"sqlite:///{target}")


@pytest.mark.parametrize("case", ["missing file", "no server", "same store", "no experiment", "moved artifacts"])
def test_bad_input_is_refused_with_a_clear_message(brought, tmp_path, capsys, case):
    team = f"sqlite:///{tmp_path}/team.db"
    args, message = {
        "missing file": (["--from", f"sqlite:///{tmp_path}/gb10.db", "--to", team], "gb10.db does not exist"),
        "no server": (brought.copy_args(f"http://127.0.0.1:{free_port()}"), "cannot reach MLflow server"),
        "same store": (brought.copy_args(brought.uri.replace("/runs/", "/runs/../runs/")), "the same store"),
        "no experiment": (brought.copy_args(team, "--experiment", "gb10"),
                          f"has no experiment 'gb10' (it has '{EXPERIMENT}', 'Default'): pass --experiment"),
        "moved artifacts": (["--from", brought.uri, "--to", team], "pass --from-artifact-root"),
    }[case]
    code, out, err = copy(capsys, *args)
    assert code == 2 and err.startswith("sweep.copy: ") and message in err, err
    assert out == ""
    assert not (tmp_path / "gb10.db").exists() and not (tmp_path / "team.db").exists()


# --- the team's server: mlflow server on PostgreSQL ----------------------------------------------------------------

# What .ci/postgres.sh sets up: a role that may create databases; the tests create their own and drop it.
POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "sweep", "password": "sweep", "dbname": "sweep"}


@pytest.fixture(scope="module")
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database: its URI for MLflow. Skipped without a running PostgreSQL."""
    if not (shutil.which("pg_ctlcluster") and shutil.which("psql")):
        pytest.skip("PostgreSQL is not installed (Debian's `postgresql`; .ci/postgres.sh installs and starts it)")
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2-binary (the `test` extra) is not installed")
    try:
        admin = psycopg2.connect(**POSTGRES, connect_timeout=5)
    except psycopg2.OperationalError as error:
        reason = " ".join(str(error).split())
        pytest.skip(f"PostgreSQL is not up or has no role `sweep` (run .ci/postgres.sh): {reason}")
    admin.autocommit = True
    name = f"sweep_copy_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        # The driver named: SQLAlchemy 2.1 reads a bare `postgresql://` as psycopg 3's.
        yield "postgresql+psycopg2://{user}:{password}@{host}:{port}/".format(**POSTGRES) + name
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE {name} WITH (FORCE)")
        admin.close()


@dataclass
class TeamServer:
    server: Server
    first_copy: str  # what `python -m sweep.copy` printed copying the brought store into it


@pytest.fixture(scope="module")
def team_server(postgres_database: str, brought: Brought,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[TeamServer]:
    """The team's server, its store in PostgreSQL; the brought store is its first content (the experiment then
    exists, as on a server in use)."""
    with mlflow_server(tmp_path_factory.mktemp("team-server"), backend_store_uri=postgres_database) as server:
        out = io.StringIO()
        with redirect_stdout(out):
            code = main(brought.copy_args(server.url))
        assert code == 0, f"{out.getvalue()}\n{server.log_tail()}"
        yield TeamServer(server, out.getvalue())


@pytest.mark.slow
def test_a_brought_store_is_copied_once_into_a_postgresql_server(team_server, brought, capsys):
    assert "copied 2 sweeps and 3 job runs" in team_server.first_copy
    assert_copied(brought.uri, team_server.server.url)
    code, out, err = copy(capsys, *brought.copy_args(team_server.server.url))
    assert code == 0, err
    assert "copied 0 sweeps and 0 job runs; already there: 2 sweeps and 3 job runs" in out
    assert_copied(brought.uri, team_server.server.url)


def machine_sweep(tmp_path: Path, url: str, name: str, host: str | None) -> subprocess.Popen[str]:
    """One `python -m sweep` job on the CPU logging to `url`; on another host name (its own UTS namespace) when
    `host` is given, so that its fingerprint is another machine's."""
    command = [sys.executable, "-m", "sweep", "device=cpu", "dtype=fp32", "kernels=none", "timing=quick",
               "prompt.length=16", f"tracking.uri={url}", f"hydra.run.dir={tmp_path}/{name}"]
    if host is not None:
        command = ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *command]
    return subprocess.Popen(command, cwd=tmp_path, env=LOCAL_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True)


@pytest.mark.slow
def test_two_machines_log_to_a_postgresql_server_at_once_and_the_report_reads_both(team_server, tmp_path):
    if not shutil.which("unshare") or subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode:
        pytest.skip("`unshare --uts` is not permitted here: the second machine's sweep needs its own host name")
    url = team_server.server.url
    machines = {socket.gethostname(): None, "machine-b": "machine-b"}
    running = [machine_sweep(tmp_path, url, name, host) for name, host in machines.items()]
    for process in running:
        out, _ = process.communicate(timeout=600)
        assert process.returncode == 0, f"{out[-3000:]}\n{team_server.server.log_tail()}"
    code, report = run_report("--tracking-uri", url, "--format", "csv")
    assert code == 0, report
    runs = pd.read_csv(io.StringIO(report))
    swept = runs[runs["kernels"] == "none"]
    assert sorted(swept["host"]) == sorted(machines) and set(swept["run_status"]) == {"measured"}
    assert "gb10-desk" in set(runs["host"])  # the copied store's runs are read back beside them
