"""The tracking server goes away mid-sweep: a real `mlflow server` on 127.0.0.1, stopped and restarted by the
test. Nothing measured is lost (the spool), the sweep goes on, the spool reaches the store, no secret leaks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from mlflow.tracking import MlflowClient
from test_server import (  # noqa: F401
    HEALTH_TIMEOUT_S,
    LOCAL_ENV,
    _loopback_without_proxy,
    _stop,
    free_port,
    http,
)
from test_survive import FAST, sweep_command

pytestmark = pytest.mark.slow  # a real mlflow server stopped mid-sweep: the slow tier (`-m slow`)

SECRET_PASSWORD = "s3cretPassw0rd"
SECRET_TOKEN = "hf_SECRETtoken123456"
# Each job lasts about 3 s: time enough to stop the server between two jobs.
SLOW_ENOUGH = ["kernels=none", "timing.min_measure_ms=300"]


class RestartableServer:
    """`mlflow server` on a fixed loopback port over one store: stop() and start() again, same URL, same runs."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
                   "--artifacts-destination", str(self.root / "mlartifacts")]
        with (self.root / "server.log").open("ab") as log:
            self.process = subprocess.Popen(command, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            env=LOCAL_ENV | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                if http(f"{self.url}/health", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        pytest.fail(f"mlflow server not healthy after {HEALTH_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)
            self.process = None


@contextmanager
def restartable_server(root: Path) -> Iterator[RestartableServer]:
    root.mkdir(parents=True, exist_ok=True)
    server = RestartableServer(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def sweep_with_outage(tmp_path: Path, server: RestartableServer, uri: str, jobs: list[str], restart_at: str | None,
                      env: dict[str, str] | None = None, while_stopped: Callable[[], None] = lambda: None,
                      ) -> tuple[int, str, float]:
    """Runs the sweep, stops the server once the first job is logged, starts it again once `restart_at` appears
    in the output (never if None). The sweep is paused (SIGSTOP) while the server stops or starts, so that the
    outage falls between the same jobs on a slow machine as on a fast one. Returns exit code, output, seconds."""
    command = sweep_command(tmp_path, "-m", *FAST, *SLOW_ENOUGH, *jobs, tracking_uri=uri)
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               stdin=subprocess.DEVNULL, env=LOCAL_ENV | {"PYTHONUNBUFFERED": "1"} | (env or {}))
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if line.startswith("[1/") and server.process is not None:
            with paused(process):
                server.stop()
                while_stopped()
        elif restart_at and restart_at in line and server.process is None:
            with paused(process):
                server.start()
    return process.wait(timeout=600), "".join(lines), time.monotonic() - started


@contextmanager
def paused(process: subprocess.Popen) -> Iterator[None]:
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


def store_runs(url: str) -> tuple[list, list]:
    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("kernel-sweep")
    runs = client.search_runs([experiment.experiment_id])
    return ([r for r in runs if r.data.tags.get("sweep_role") == "parent"],
            [r for r in runs if r.data.tags.get("sweep_role") == "job"])


def test_a_server_that_goes_away_mid_sweep_loses_nothing(tmp_path):
    with restartable_server(tmp_path / "server") as server:
        code, out, seconds = sweep_with_outage(tmp_path, server, server.url, ["prompt.length=40,41,42,43"],
                                               restart_at="[3/4]")
        assert code == 0, out[-4000:]
        assert out.count("did not take job") == 2 and "kept in" in out  # jobs 2 and 3 went to the spool
        assert "uploaded 2 spooled result(s)" in out  # ... and reached the store when it answered again
        assert seconds < 240, "bounded retries: no call may hang for minutes"
        parents, children = store_runs(server.url)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", out[-5000:]
    assert parents[0].data.metrics["jobs_measured"] == 4
    names = sorted(r.info.run_name for r in children)
    assert names == [f"T={n}" for n in (40, 41, 42, 43)], names  # each once, none lost
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags["run_status"] == "measured"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.metrics["latency_ms_baseline"] > 0
    assert not list((tmp_path / "spool").glob("*.json"))


def test_a_spool_left_by_a_sweep_is_uploaded_by_sweep_sync_and_holds_no_secret(tmp_path):
    with restartable_server(tmp_path / "server") as server:
        uri = f"http://sweeper:{SECRET_PASSWORD}@127.0.0.1:{server.port}"
        jobs = ["prompt.length=40,41", f"prompt.text=Hi {SECRET_TOKEN} "]
        code, out, _ = sweep_with_outage(tmp_path, server, uri, jobs, restart_at=None, env={"HF_TOKEN": SECRET_TOKEN})
        assert code == 0, out[-4000:]  # every job measured; what the store missed is safe in the spool
        spooled = sorted((tmp_path / "spool").glob("*.json"))
        kinds = [json.loads(p.read_text())["kind"] for p in spooled]
        assert kinds == ["job", "sweep_end"], kinds
        for path in spooled:
            text = path.read_text()
            assert SECRET_PASSWORD not in text and SECRET_TOKEN not in text
            assert json.loads(text)["tracking_uri"] == f"http://***@127.0.0.1:{server.port}"

        server.start()
        sync = [sys.executable, "-m", "sweep.sync", "--spool", str(tmp_path / "spool")]
        kept = subprocess.run(sync, cwd=REPO_ROOT, capture_output=True, text=True, env=LOCAL_ENV, timeout=300)
        assert kept.returncode == 1 and "pass --tracking-uri" in kept.stderr
        done = subprocess.run([*sync, "--tracking-uri", uri], cwd=REPO_ROOT, capture_output=True, text=True,
                              env=LOCAL_ENV, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "2 uploaded" in done.stdout and SECRET_PASSWORD not in done.stdout
        assert not list((tmp_path / "spool").glob("*.json"))
        parents, children = store_runs(server.url)
        client = MlflowClient(tracking_uri=server.url)
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert parents[0].data.metrics["jobs_measured"] == 2
        assert sorted(r.info.run_name for r in children) == ["T=40", "T=41"]
        for run in [*parents, *children]:
            logged = json.dumps([run.info.run_name, run.data.params, run.data.tags])
            if run in children:
                logged += Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text()
                assert "prompt.text" not in logged and "text: Hi ***" in logged
            assert SECRET_PASSWORD not in logged and SECRET_TOKEN not in logged, logged


def test_a_lost_store_and_an_unwritable_spool_stop_the_sweep_with_exit_3(tmp_path):
    spool = tmp_path / "spool"
    with restartable_server(tmp_path / "server") as server:
        code, out, _ = sweep_with_outage(tmp_path, server, server.url, ["prompt.length=40,41,42"], restart_at=None,
                                         while_stopped=lambda: spool.write_text("a file where the spool should be"))
        assert code == 3, out[-4000:]
        assert "cannot finish" in out and "cannot write the spool" in out
        server.start()
        parents, children = store_runs(server.url)
    assert [r.info.run_name for r in children] == ["T=40"]  # the jobs after it never ran
    assert len(parents) == 1
