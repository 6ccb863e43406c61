"""sweep against a real `mlflow server` (checked through MLflow's REST API with plain HTTP), and what survives
when an MLflow store is carried to another directory or machine. All traffic goes to 127.0.0.1."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO_ROOT
from mlflow.tracking import MlflowClient

from sweep import report
from sweep.config import TrackingConfig
from sweep.records.results import JobResult, RunStatus
from sweep.store.tracking import Tracker
from sweep.views.summary import job_description

pytestmark = pytest.mark.slow  # a real mlflow server: the slow tier, `python -m pytest -m slow`

HEALTH_TIMEOUT_S = 60
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
# Never route the loopback through a proxy, in this process (urllib, MLflow's requests) or in the subprocesses.
LOCAL_ENV = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES and not k.startswith("MLFLOW_")} | {
    "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", "COLUMNS": "200"}
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

PARAMS = {"model", "dtype", "kernels", "prompt_len", "batch_size", "device", "timing_mode"}
METRICS = {"latency_ms_baseline", "latency_ms_kernel", "speedup", "speedup_ci_low", "speedup_ci_high",
           "max_abs_diff", "mean_abs_diff", "argmax_match", "ref_err_baseline", "ref_err_kernel", "err_ratio",
           "kernelized_total", "job_wall_s"}
TAGS = {"run_status", "status_reason", "gpu_name", "device_capability", "torch_version", "transformers_version",
        "kernels_version", "sweep_id", "sweep_role", "mlflow.parentRunId"}
KERNELIZED = {"rms_cpu": ("kernelized_RMSNorm", 9), "silu_cpu": ("kernelized_SiLU", 4)}


# --- helpers -------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET, or of a JSON POST when `body` is given; no proxy."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with _opener.open(request, timeout=timeout) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read()


def rest(url: str, body: dict | None = None) -> dict:
    status, _, content = http(url, body)
    assert status == 200, f"{url}: HTTP {status}: {content[:500]!r}"
    return json.loads(content)


@dataclass
class Server:
    url: str
    root: Path  # holds mlflow.db and mlartifacts/
    log: Path

    @property
    def artifacts(self) -> Path:
        return self.root / "mlartifacts"

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@contextmanager
def mlflow_server(root: Path, backend_store_uri: str | None = None) -> Iterator[Server]:
    """`mlflow server` on a free loopback port, its store (`backend_store_uri`, by default sqlite in `root`) and
    proxied artifacts in `root`; killed (its whole process group) on exit. Job execution (huey workers for GenAI
    features) is off: sweep does not use it and it doubles the start-up time."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = Server(f"http://127.0.0.1:{port}", root, root / "server.log")
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", backend_store_uri or f"sqlite:///{root}/mlflow.db",
               "--artifacts-destination", str(root / "mlartifacts")]
    env = LOCAL_ENV | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with server.log.open("wb") as log:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow server exited with {process.returncode}:\n{server.log_tail()}")
            try:
                if http(f"{server.url}/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after {HEALTH_TIMEOUT_S} s:\n{server.log_tail()}")
            time.sleep(0.25)
        yield server
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its own session: mlflow, uvicorn and its workers), SIGKILL to
    whatever is left after 15 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            process.poll()  # reap the server itself
            if not _group_alive(process.pid):
                return
            time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is left in the group."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if fields[0] != "Z" and int(fields[2]) == pgid:  # state, ppid, pgrp
            return True
    return False


def run_sweep(tmp_path: Path, conf: Path, tracking: list[str], *overrides: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sweep", "--config-dir", str(conf), "-m", "timing=quick", "prompt.length=40",
               *overrides, *tracking, f"hydra.sweep.dir={tmp_path}/hydra", f"hydra.run.dir={tmp_path}/hydra"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=LOCAL_ENV,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def run_report(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = report.main(list(args))
    return code, out.getvalue()


def search_runs(url: str) -> list[dict]:
    experiment = rest(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=kernel-sweep")["experiment"]
    found = rest(f"{url}/api/2.0/mlflow/runs/search",
                 {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000})
    return found.get("runs", [])


def as_dicts(run: dict) -> tuple[dict[str, str], dict[str, float], dict[str, str]]:
    """params, metrics, tags of a REST run."""
    data = run["data"]
    return ({p["key"]: p["value"] for p in data.get("params", [])},
            {m["key"]: m["value"] for m in data.get("metrics", [])},
            {t["key"]: t["value"] for t in data.get("tags", [])})


def artifact_paths(url: str, run_id: str, path: str = "") -> set[str]:
    query = urllib.parse.urlencode({"run_id": run_id, **({"path": path} if path else {})})
    return {f["path"] for f in rest(f"{url}/api/2.0/mlflow/artifacts/list?{query}").get("files", [])}


@pytest.fixture(autouse=True)
def _loopback_without_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process clients (sweep.report through MLflow's requests session) skip any proxy too."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


# --- a sweep logged to a tracking server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as running:
        yield running


@pytest.fixture(scope="module")
def server_sweep(server: Server, cpu_kernel_configs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 x (rms_cpu, silu_cpu) logged to the server; returns the local artifact_root that must stay unused."""
    tmp = tmp_path_factory.mktemp("server-sweep")
    unused = tmp / "local-artifacts"
    run_sweep(tmp, cpu_kernel_configs, [f"tracking.uri={server.url}", f"tracking.artifact_root={unused}"],
              "dtype=fp32", "kernels=rms_cpu,silu_cpu")
    return unused


def test_the_sweep_logs_a_parent_and_its_children_with_the_contract(server, server_sweep):
    runs = search_runs(server.url)
    parents = [r for r in runs if as_dicts(r)[2].get("sweep_role") == "parent"]
    children = [r for r in runs if as_dicts(r)[2].get("sweep_role") == "job"]
    assert len(parents) == 1 and len(children) == 2
    parent_id = parents[0]["info"]["run_id"]
    assert parents[0]["info"]["status"] == "FINISHED"
    assert as_dicts(parents[0])[1]["jobs_measured"] == 2
    assert sorted(r["info"]["run_name"] for r in children) == ["rms_cpu", "silu_cpu"]
    for run in children:
        params, metrics, tags = as_dicts(run)
        assert run["info"]["status"] == "FINISHED"
        assert tags["mlflow.parentRunId"] == parent_id and tags["sweep_id"] == parent_id
        assert tags["run_status"] == "measured", tags["status_reason"]
        assert tags["gpu_name"] == "cpu"
        assert PARAMS <= set(params) and METRICS <= set(metrics) and TAGS <= set(tags)
        assert params["dtype"] == "fp32" and params["prompt_len"] == "40"
        metric, count = KERNELIZED[params["kernels"]]
        assert metrics[metric] == count and metrics["kernelized_total"] == count
        assert metrics["speedup_ci_low"] <= metrics["speedup"] <= metrics["speedup_ci_high"]
        assert tags[f"kernel_source_{metric.removeprefix('kernelized_')}"].startswith("local:")
        if params["kernels"] == "silu_cpu":  # an exact re-implementation
            assert metrics["max_abs_diff"] == 0.0 and metrics["err_ratio"] == 1.0


def test_the_server_stores_and_serves_the_artifacts(server, server_sweep):
    experiment = rest(f"{server.url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=kernel-sweep")
    # Proxied artifacts: the runs hold server-relative URIs, the files land in --artifacts-destination.
    assert experiment["experiment"]["artifact_location"].startswith("mlflow-artifacts:/")
    assert not server_sweep.exists(), "tracking.artifact_root must not be used with a tracking server"
    children = [r for r in search_runs(server.url) if as_dicts(r)[2].get("sweep_role") == "job"]
    for run in children:
        run_id = run["info"]["run_id"]
        assert "config.yaml" in artifact_paths(server.url, run_id)
        assert list(server.artifacts.glob(f"*/{run_id}/artifacts/config.yaml"))
        status, _, content = http(f"{server.url}/get-artifact?"
                                  + urllib.parse.urlencode({"run_uuid": run_id, "path": "config.yaml"}))
        assert status == 200
        assert f"name: {as_dicts(run)[0]['kernels']}" in content.decode()


def test_the_ui_is_served(server):
    status, content_type, body = http(f"{server.url}/")
    assert status == 200
    assert content_type.startswith("text/html")
    assert "mlflow" in body.decode(errors="replace").lower()


def test_the_report_reads_the_server(server, server_sweep):
    code, out = run_report("--tracking-uri", server.url)
    assert code == 0, out
    assert server.url in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line.endswith("| measured |")]
    assert {row.split("|")[1].strip() for row in rows} == {"rms_cpu", "silu_cpu"}
    assert "dtype=fp32, prompt_len=40" in out and " on cpu" in out


# --- carrying stores -----------------------------------------------------------------------------------------------


@dataclass
class CarriedStore:
    old: Path  # where the sweep wrote runs/ (deleted)
    new: Path  # where runs/ was copied to


@pytest.fixture(scope="module")
def carried_store(cpu_kernel_configs: Path, tmp_path_factory: pytest.TempPathFactory) -> CarriedStore:
    """A sweep logged to machine-A/runs (sqlite + artifacts), then runs/ copied to machine-B/runs and the
    original deleted: what moving a store to another machine or directory does."""
    tmp = tmp_path_factory.mktemp("carry")
    old, new = tmp / "machine-A" / "runs", tmp / "machine-B" / "runs"
    run_sweep(tmp, cpu_kernel_configs, [f"tracking.uri=sqlite:///{old}/mlflow.db",
                                        f"tracking.artifact_root={old}/artifacts"],
              "dtype=bf16", "kernels=rms_cpu")
    shutil.copytree(old, new)
    shutil.rmtree(old.parent)
    return CarriedStore(old, new)


def test_a_copied_sqlite_store_keeps_params_metrics_and_tags(carried_store):
    code, out = run_report("--tracking-uri", f"sqlite:///{carried_store.new}/mlflow.db", "--format", "csv")
    assert code == 0, out
    runs = pd.read_csv(io.StringIO(out))
    assert len(runs) == 1
    run = runs.iloc[0]
    assert (run["dtype"], run["kernels"], run["run_status"], run["gpu"]) == ("bf16", "rms_cpu", "measured", "cpu")
    assert run["kernelized_total"] == 9 and run["err_ratio"] > 1  # bf16 normalised without the fp32 upcast
    assert run["speedup"] > 0


def test_a_copied_sqlite_store_still_points_at_the_old_artifact_path(carried_store):
    """MLflow stores absolute file URIs (experiment artifact_location and each run's artifact_uri): after the
    copy the files are in the new place, but MLflow looks in the old one, and silently lists nothing."""
    client = MlflowClient(tracking_uri=f"sqlite:///{carried_store.new}/mlflow.db")
    experiment = client.get_experiment_by_name("kernel-sweep")
    assert experiment.artifact_location == (carried_store.old / "artifacts").as_uri()
    (run,) = client.search_runs([experiment.experiment_id], "tags.sweep_role = 'job'")
    assert run.info.artifact_uri.startswith((carried_store.old / "artifacts").as_uri())
    assert (carried_store.new / "artifacts" / run.info.run_id / "artifacts" / "config.yaml").is_file()
    assert client.list_artifacts(run.info.run_id) == []
    # The remedy: runs/ at its old absolute path again (a copy there, or here a symbolic link).
    carried_store.old.parent.mkdir(parents=True, exist_ok=True)
    carried_store.old.symlink_to(carried_store.new, target_is_directory=True)
    try:
        assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    finally:
        carried_store.old.unlink()


def test_new_runs_in_a_copied_sqlite_store_write_artifacts_to_the_old_path(carried_store, tmp_path):
    """Logging into the copy follows the experiment's recorded location, not tracking.artifact_root: the new
    run's artifacts go to the old absolute path, recreated silently."""
    copy = tmp_path / "runs"
    shutil.copytree(carried_store.new, copy)
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{copy}/mlflow.db", artifact_root=str(copy / "artifacts")),
                      describe=job_description)
    sweep_id = tracker.start_sweep("into the copy", tags={})
    result = JobResult(name="fp32 none T=40", params={"kernels": "none"}, status=RunStatus.skipped)
    result.artifacts["config.yaml"] = "kernels: none\n"
    try:
        run_id = tracker.log_job(sweep_id, result)
        assert (carried_store.old / "artifacts" / run_id / "artifacts" / "config.yaml").is_file()
        assert not (copy / "artifacts" / run_id).exists()
    finally:
        shutil.rmtree(carried_store.old.parent, ignore_errors=True)


def test_a_server_store_moves_with_its_artifacts(server, server_sweep, tmp_path):
    """Proxied artifacts are addressed relative to --artifacts-destination: copy mlflow.db and mlartifacts/
    anywhere, serve them from there, and every artifact is found."""
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copy2(server.root / "mlflow.db", moved / "mlflow.db")
    shutil.copytree(server.artifacts, moved / "mlartifacts")
    with mlflow_server(moved) as second:
        children = [r for r in search_runs(second.url) if as_dicts(r)[2].get("sweep_role") == "job"]
        assert len(children) == 2
        for run in children:
            assert "config.yaml" in artifact_paths(second.url, run["info"]["run_id"])


def test_the_report_merges_stores_at_read_time(server, server_sweep, carried_store):
    sqlite_uri = f"sqlite:///{carried_store.new}/mlflow.db"
    code, out = run_report("--tracking-uri", server.url, "--tracking-uri", sqlite_uri, "--format", "csv")
    assert code == 0, out
    runs = pd.read_csv(io.StringIO(out))
    by_store = runs.groupby("store")["kernels"].apply(lambda k: sorted(k)).to_dict()
    assert by_store == {server.url: ["rms_cpu", "silu_cpu"], sqlite_uri: ["rms_cpu"]}
    assert sorted(runs["dtype"]) == ["bf16", "fp32", "fp32"]
