"""Scale-out: GPU leases between processes, concurrent writers to one store, sweeps whose jobs run in local
worker processes under one parent run, resume, Ctrl-C and SIGTERM, and the Slurm launcher (its configuration
through submitit's own objects everywhere; a real one-node Slurm where `.ci/slurm.sh` started one)."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from hydra import compose, initialize_config_dir
from kernel_repos import EXACT_RMSNORM, write_kernel_repo
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from test_server import LOCAL_ENV, PROXY_VARIABLES, mlflow_server

from sweep.__main__ import CONFIG_DIR
from sweep.config import TrackingConfig
from sweep.run.lease import worker_count
from sweep.store.tracking import Tracker
from sweep.views.report import FINGERPRINT
from sweep.views.summary import job_description

pytestmark = pytest.mark.slow  # processes, launchers and leases: the slow tier, `python -m pytest -m slow`

# Four quick jobs without kernels: they run on any machine (the CPU-kernel repositories need a CPU build of torch).
FOUR_JOBS = ["dtype=fp32,bf16", "kernels=none", "prompt.length=24,32", "timing=quick", "numerics.gen_tokens=2"]
JOB_METRICS = {"latency_ms_baseline", "ref_err_baseline", "timing_rounds", "timing_s", "job_wall_s"}
JOB_TAGS = {"run_status", "combination_hash", "worker_pid", "gpu_name", "git_commit", "mlflow.parentRunId", "sweep_id"}


@pytest.fixture(autouse=True)
def _loopback_without_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def sweep_command(tmp_path: Path, uri: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "sweep", *overrides, f"tracking.uri={uri}",
            f"tracking.artifact_root={tmp_path}/artifacts", f"hydra.sweep.dir={tmp_path}/hydra",
            f"hydra.run.dir={tmp_path}/hydra", f"lease.lock_dir={tmp_path}/locks"]


def run(command: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=LOCAL_ENV,
                          stdin=subprocess.DEVNULL)


def runs_of(uri: str) -> tuple[list, list]:
    """(parents, children) in the experiment, oldest first."""
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("kernel-sweep")
    runs = sorted(client.search_runs([experiment.experiment_id], max_results=1000), key=lambda r: r.info.start_time)
    return ([r for r in runs if r.data.tags.get("sweep_role") == "parent"],
            [r for r in runs if r.data.tags.get("sweep_role") == "job"])


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout_s} s")
        time.sleep(0.2)


# --- GPU leases ----------------------------------------------------------------------------------------------------

LEASE_HOLDER = textwrap.dedent("""
    import sys, time
    from sweep.config import LeaseConfig
    from sweep.run.lease import gpu_lease
    devices, lock_dir, hold_s = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    with gpu_lease(LeaseConfig(devices=devices, lock_dir=lock_dir, poll_s=0.02),
                   waiting=lambda note: print("waiting:", note, flush=True)) as device:
        start = time.time()
        print("holding", device.uuid, flush=True)
        time.sleep(hold_s)
        print("held", device.uuid, start, time.time(), flush=True)
""")


def hold_lease(devices: int, lock_dir: Path, hold_s: float) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", LEASE_HOLDER, str(devices), str(lock_dir), str(hold_s)],
                            stdout=subprocess.PIPE, text=True, env=LOCAL_ENV)


def overlapping(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    ordered = sorted(intervals)
    return [b for a, b in zip(ordered, ordered[1:], strict=False) if b[0] < a[1]]


def test_processes_competing_for_two_devices_never_share_one(tmp_path):
    holders = [hold_lease(2, tmp_path, 0.8) for _ in range(6)]
    held: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for holder in holders:
        out, _ = holder.communicate(timeout=120)
        assert holder.returncode == 0
        device, start, end = next(line for line in out.splitlines() if line.startswith("held")).split()[1:]
        held[device].append((float(start), float(end)))
    assert set(held) == {"slot-0", "slot-1"}
    assert sum(len(v) for v in held.values()) == 6
    for device, intervals in held.items():
        assert not overlapping(intervals), f"two processes held {device} at once: {intervals}"


def test_a_lease_is_released_when_its_holder_is_killed_with_sigkill(tmp_path):
    first = hold_lease(1, tmp_path, 600)
    assert first.stdout.readline().split() == ["holding", "slot-0"]
    second = hold_lease(1, tmp_path, 0)
    try:
        waiting = second.stdout.readline()
        assert waiting.startswith("waiting:") and f"pid {first.pid}" in waiting, waiting
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        assert second.stdout.readline().split() == ["holding", "slot-0"]
        assert second.wait(timeout=30) == 0
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.kill()


LEASE_TWICE = textwrap.dedent("""
    import sys
    from sweep.config import LeaseConfig
    from sweep.run.lease import gpu_lease
    config = LeaseConfig(devices=2, lock_dir=sys.argv[1], poll_s=0.02)
    for _ in range(2):
        with gpu_lease(config, waiting=lambda note: print("waiting:", note, flush=True)) as device:
            print("holding", device.uuid, flush=True)
        sys.stdin.readline()
""")


def test_a_process_waits_for_its_own_device_while_another_is_free(tmp_path):
    worker = subprocess.Popen([sys.executable, "-c", LEASE_TWICE, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=LOCAL_ENV)
    try:
        assert worker.stdout.readline().split() == ["holding", "slot-0"]
        other_job = os.open(tmp_path / "slot-0.lock", os.O_RDWR)  # as another sweep's job takes device 0
        fcntl.flock(other_job, fcntl.LOCK_EX)
        os.ftruncate(other_job, 0)
        os.write(other_job, f"{os.getpid()}\n".encode())
        try:
            worker.stdin.write("next\n")
            worker.stdin.flush()
            waiting = worker.stdout.readline()
            assert waiting.startswith("waiting: device 0 leased") and f"pid {os.getpid()}" in waiting, waiting
        finally:
            os.close(other_job)
        assert worker.stdout.readline().split() == ["holding", "slot-0"]  # not slot-1, free all along
        worker.stdin.write("end\n")
        worker.stdin.flush()
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()


# --- concurrent writers --------------------------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    from sweep.config import TrackingConfig
    from sweep.records.results import JobResult
    from sweep.store.tracking import Tracker
    from sweep.views.summary import job_description
    uri, artifacts, sweep_id, worker, jobs = sys.argv[1:4] + [int(sys.argv[4]), int(sys.argv[5])]
    tracker = Tracker(TrackingConfig(uri=uri, artifact_root=artifacts), describe=job_description)
    for job in range(jobs):
        result = JobResult(name=f"worker {worker} job {job}", params={"worker": str(worker), "job": str(job)},
                           metrics={f"metric_{k}": float(k + job) for k in range(40)},
                           artifacts={"config.yaml": f"job: {job}\\n"})
        tracker.log_job(sweep_id, result, tracker.start_job(sweep_id, result, {}))
""")


@pytest.fixture(params=["sqlite", "server"])
def store(request, tmp_path) -> str:
    """A fresh store's tracking URI: a sqlite file, or an `mlflow server` on 127.0.0.1."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/mlflow.db"
        return
    with mlflow_server(tmp_path / "server") as server:
        yield server.url


def test_four_writers_at_once_lose_nothing(store, tmp_path):
    tracker = Tracker(TrackingConfig(uri=store, artifact_root=str(tmp_path / "artifacts")),
                      describe=job_description)  # creates the store
    sweep_id = tracker.start_sweep("writers", tags={})
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, store, str(tmp_path / "artifacts"), sweep_id,
                                 str(worker), "10"], env=LOCAL_ENV, stderr=subprocess.PIPE, text=True)
               for worker in range(4)]
    for writer in writers:
        _, errors = writer.communicate(timeout=300)
        assert writer.returncode == 0, errors[-3000:]
    _, children = runs_of(store)
    assert len(children) == 40
    assert {(r.data.params["worker"], r.data.params["job"]) for r in children} == {
        (str(w), str(j)) for w in range(4) for j in range(10)}
    for run in children:
        assert run.info.status == "FINISHED"
        assert len(run.data.metrics) == 40
        assert run.data.tags["mlflow.parentRunId"] == sweep_id
    assert sorted(job.status.value for job in tracker.sweep_jobs(sweep_id).values()) == ["measured"] * 40


# Opens the store as a sweep does, once the file `go` exists: each process has done its imports by then.
OPENER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from sweep.config import TrackingConfig
    from sweep.store.tracking import Tracker
    from sweep.views.summary import job_description
    uri, artifacts, go = sys.argv[1:]
    print("ready", flush=True)
    while not Path(go).exists():
        time.sleep(0.005)
    tracker = Tracker(TrackingConfig(uri=uri, artifact_root=artifacts), describe=job_description)
    tracker.start_sweep("opened at once", tags={})
""")


def test_four_sweeps_opening_a_new_sqlite_store_at_once_all_open_it(tmp_path):
    """Each creates the store's tables, or upgrades them, while the others do (`table ... already exists`, `Online
    migration expected to match one row`), unless one at a time."""
    uri, go = f"sqlite:///{tmp_path}/new/mlflow.db", tmp_path / "go"
    openers = [subprocess.Popen([sys.executable, "-c", OPENER, uri, str(tmp_path / "artifacts"), str(go)],
                                env=LOCAL_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(4)]
    for opener in openers:
        assert opener.stdout.readline() == "ready\n", opener.communicate(timeout=120)[1][-3000:]
    go.touch()
    for opener in openers:
        _, errors = opener.communicate(timeout=300)
        assert opener.returncode == 0, errors[-3000:]
    parents, _ = runs_of(uri)
    assert [parent.info.run_name for parent in parents] == ["opened at once"] * 4


# --- sweeps in local worker processes ------------------------------------------------------------------------------


def test_parallel_launcher_runs_one_worker_per_device(tmp_path):
    def workers(*overrides: str) -> int:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = compose("config", overrides=["hydra/launcher=parallel", *overrides], return_hydra_config=True)
        return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)["n_jobs"]

    assert workers() == worker_count(None) >= 1
    assert workers("lease.devices=3") == 3


def test_four_workers_log_every_job_under_one_parent(store, tmp_path):
    done = run(sweep_command(tmp_path, store, "-m", *FOUR_JOBS, "hydra/launcher=parallel", "hydra.launcher.n_jobs=4",
                             "lease.devices=2"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    parents, children = runs_of(store)
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.metrics["jobs_measured"] == 4
    assert {(r.data.params["dtype"], r.data.params["prompt_len"]) for r in children} == {
        (d, t) for d in ("fp32", "bf16") for t in ("24", "32")}
    for run_ in children:
        assert run_.info.status == "FINISHED" and run_.data.tags["run_status"] == "measured"
        assert JOB_METRICS <= set(run_.data.metrics), run_.data.metrics
        assert JOB_TAGS <= set(run_.data.tags)
        assert run_.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert len({r.data.tags["worker_pid"] for r in children}) > 1, "the jobs ran in one process"
    assert {r.data.tags["gpu_index"] for r in children} == {"0", "1"}
    by_device = defaultdict(list)
    for run_ in children:
        by_device[run_.data.tags["gpu_uuid"]].append((run_.info.start_time, run_.info.end_time))
    for device, intervals in by_device.items():
        assert not overlapping(intervals), f"two jobs ran on {device} at once: {intervals}"
    assert "4 measured, 0 skipped, 0 failed" in done.stdout


# Exact RMSNorm that keeps a 400 MB host buffer from its first call on, as a kernel library keeps what it loads and
# compiles (CUDA modules, Triton's compiler and kernels): a sweep's worker grows past loky's 300 MB leak guard.
HUNGRY_RMSNORM = """
    global _workspace
    if globals().get("_workspace") is None:
        _workspace = torch.ones(100_000_000)
""" + EXACT_RMSNORM


def test_the_parallel_launcher_keeps_one_worker_per_device_for_the_whole_sweep(tmp_path):
    repo = write_kernel_repo(tmp_path / "repos", "hungry_rms", "HungryRMSNorm", HUNGRY_RMSNORM)
    (tmp_path / "conf" / "kernels").mkdir(parents=True)
    (tmp_path / "conf" / "kernels" / "hungry.yaml").write_text(
        f"name: hungry\nRMSNorm: {{layer_name: HungryRMSNorm, path: {repo}}}\n")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # Each worker's first job runs without the kernel, its later ones with it: loky measures a worker's size after
    # its first job, and would replace every worker that ran the kernel after that.
    done = run(sweep_command(tmp_path, uri, "-m", "--config-dir", str(tmp_path / "conf"), "dtype=fp32",
                             "kernels=none,hungry", "prompt.length=24,32,40", "timing=quick", "numerics.gen_tokens=2",
                             "hydra/launcher=parallel", "lease.devices=2"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, children = runs_of(uri)
    jobs = [(r.info.run_name, r.data.tags["worker_pid"], r.data.tags["gpu_index"], r.data.tags["run_status"])
            for r in children]
    assert len(jobs) == 6 and all(status == "measured" for *_, status in jobs), jobs
    devices_of: dict[str, set[str]] = defaultdict(set)
    for _, pid, device, _ in jobs:
        devices_of[pid].add(device)
    assert len(devices_of) == 2, f"{len(devices_of)} worker processes ran the 6 jobs, not one per device: {jobs}"
    assert all(len(devices) == 1 for devices in devices_of.values()), f"a worker changed device: {jobs}"
    assert set().union(*devices_of.values()) == {"0", "1"}, jobs
    numbers = sorted(re.findall(r"^\[(\d)/6\] .* measured", done.stdout, re.MULTILINE))
    assert numbers == list("123456"), f"each job is printed with its number in the sweep: {done.stdout[-3000:]}"


# --- interruption and resume ---------------------------------------------------------------------------------------


def start_sweep(tmp_path: Path, uri: str, *overrides: str) -> tuple[subprocess.Popen, Path]:
    """The sweep as a terminal's foreground job: its own process group, Ctrl-C's SIGINT at its default action. A
    process started in the background of a shell without job control inherits SIGINT ignored, as do the sweep and
    its workers, which then run to the end and exit 0 (Python keeps an inherited SIG_IGN, as it should)."""
    log = tmp_path / f"sweep-{time.monotonic_ns()}.log"
    with log.open("w") as out:
        process = subprocess.Popen(sweep_command(tmp_path, uri, *overrides), cwd=REPO_ROOT, env=LOCAL_ENV,
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, preexec_fn=_sigint_at_default)
    return process, log


def _sigint_at_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def group_runs(group: int) -> bool:
    """Whether a process of the process group `group` still runs (zombies, which write nothing, aside)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, process_group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
        if int(process_group) == group and state != "Z":
            return True
    return False


def statuses(uri: str) -> list[tuple[str, str]]:
    try:
        return [(r.data.params.get("prompt_len", ""), r.info.status) for r in runs_of(uri)[1]]
    except Exception:  # the store does not exist yet
        return []


def test_sigterm_kills_the_running_job_and_a_resumed_sweep_redoes_only_that_one(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = ["-m", "dtype=fp32", "kernels=none", "prompt.length=24,32,40", "timing=quick",
                 "numerics.gen_tokens=2"]
    process, log = start_sweep(tmp_path, uri, *overrides)
    try:
        wait_for(lambda: ("24", "FINISHED") in statuses(uri) and ("32", "RUNNING") in statuses(uri), 300,
                 "second job running")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 143, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    parents, children = runs_of(uri)
    assert [p.info.status for p in parents] == ["KILLED"]
    assert {(r.data.params["prompt_len"], r.info.status, r.data.tags["run_status"]) for r in children} == {
        ("24", "FINISHED", "measured"), ("32", "KILLED", "killed")}
    killed, measured = (next(r for r in children if r.info.status == status) for status in ("KILLED", "FINISHED"))
    assert "SIGTERM" in killed.data.tags["status_reason"]
    machine = {tag: measured.data.tags.get(tag) for tag in FINGERPRINT}
    assert machine["gpu_name"] and machine["cpu_model"]
    assert {tag: killed.data.tags.get(tag) for tag in FINGERPRINT} == machine  # the report's machine for it

    done = run(sweep_command(tmp_path, uri, *overrides))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "T=24 already measured" in done.stdout  # the job named after what the sweep varies
    parents, children = runs_of(uri)
    assert [p.info.status for p in parents] == ["KILLED", "FINISHED"]
    measured = [r for r in children if r.data.tags["run_status"] == "measured"]
    assert sorted(r.data.params["prompt_len"] for r in measured) == ["24", "32", "40"]  # nothing twice
    resumed_sweep = parents[1].info.run_id
    assert {r.data.params["prompt_len"] for r in measured if r.data.tags["sweep_id"] == resumed_sweep} == {"32", "40"}
    assert parents[1].data.metrics["jobs_resumed"] == 1 and parents[1].data.metrics["jobs_measured"] == 2

    again = run(sweep_command(tmp_path, uri, "dtype=fp32", "kernels=none", "prompt.length=24", "timing=quick",
                              "numerics.gen_tokens=2", "resume=false"))
    assert again.returncode == 0, again.stderr[-3000:]
    _, children = runs_of(uri)
    assert sum(r.data.params["prompt_len"] == "24" and r.data.tags["run_status"] == "measured"
               for r in children) == 2


def test_ctrl_c_on_a_parallel_sweep_leaves_no_run_running(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    process, log = start_sweep(tmp_path, uri, "-m", *FOUR_JOBS, "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
                               "lease.devices=2")
    try:
        wait_for(lambda: any(s == "RUNNING" for _, s in statuses(uri)), 300, "running job")
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground process group
        assert process.wait(timeout=120) != 0, log.read_text()[-3000:]
        wait_for(lambda: not group_runs(process.pid), 60, "end of the sweep's workers")  # none writes any more
    finally:
        if group_runs(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
    parents, children = runs_of(uri)
    assert [p.info.status for p in parents] == ["KILLED"], log.read_text()[-3000:]
    assert children and all(r.info.status in ("FINISHED", "KILLED") for r in children), [
        (r.info.run_name, r.info.status) for r in children]
    assert any(r.info.status == "KILLED" for r in children)


# --- Slurm ---------------------------------------------------------------------------------------------------------


def slurm_launcher_config(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=False)


@pytest.mark.skipif(shutil.which("srun") is None,
                    reason="needs Slurm's srun (submitit's Slurm executor looks for it): `.ci/slurm.sh` installs it")
def test_slurm_launcher_config_asks_slurm_for_one_gpu_per_job(tmp_path):
    import submitit

    params = slurm_launcher_config("hydra.launcher.partition=gpu", "hydra.launcher.account=team",
                                   "hydra.launcher.timeout_min=90")
    assert params["_target_"].endswith("SlurmLauncher")
    # As hydra-submitit-launcher passes them: queue-generic keys as they are, Slurm's own prefixed with slurm_.
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    generic = ("gpus_per_node", "tasks_per_node", "nodes", "timeout_min", "stderr_to_stdout")
    executor.update_parameters(**{k: params[k] for k in generic},
                               **{f"slurm_{k}": params[k] for k in ("partition", "account")})
    script = executor._executor._make_submission_file_text("python -m sweep", "uid")
    for line in ("#SBATCH --gpus-per-node=1", "#SBATCH --partition=gpu", "#SBATCH --account=team",
                 "#SBATCH --time=90", "#SBATCH --ntasks-per-node=1", "#SBATCH --nodes=1"):
        assert line in script, script
    with pytest.raises(Exception, match="partiton"):
        slurm_launcher_config("hydra.launcher.partiton=gpu")


def slurm_ready() -> bool:
    if shutil.which("sbatch") is None:
        return False
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return state.returncode == 0 and "idle" in state.stdout


@pytest.mark.skipif(not slurm_ready(), reason="no Slurm here: `.ci/slurm.sh` starts a one-node Slurm (as root)")
def test_a_sweep_on_slurm_logs_every_job_under_one_parent(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = run(sweep_command(tmp_path, uri, "-m", "dtype=fp32,bf16", "kernels=none", "prompt.length=24",
                             "timing=quick", "numerics.gen_tokens=2", "hydra/launcher=slurm", "lease.devices=1",
                             "hydra.launcher.timeout_min=20"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    parents, children = runs_of(uri)
    assert len(parents) == 1 and len(children) == 2
    for run_ in children:
        assert run_.data.tags["run_status"] == "measured"
        assert run_.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run_.data.tags["slurm_job_id"]
        assert JOB_METRICS <= set(run_.data.metrics)
    assert len({r.data.tags["slurm_job_id"] for r in children}) == 2


# --- on GPUs (pytest -m gpu) ---------------------------------------------------------------------------------------

cuda_devices = __import__("torch").cuda.device_count() if __import__("torch").cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(cuda_devices < 1, reason="needs CUDA")
def test_a_job_records_its_gpu_and_sees_another_process_on_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, torch; torch.ones(1, device='cuda:0'); "
                               "print('ready', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        done = run(sweep_command(tmp_path, uri, "kernels=none", "timing=quick", "prompt.length=40", "lease.devices=1"))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    finally:
        holder.kill()
    (run_,) = runs_of(uri)[1]
    tags = run_.data.tags
    import torch
    assert tags["gpu_index"] == "0" and tags["gpu_uuid"] == str(torch.cuda.get_device_properties(0).uuid)
    if tags["gpu_contended"] == "unknown":
        pytest.skip(f"nvidia-smi cannot tell here: {tags['gpu_contention_note']}")
    assert tags["gpu_contended"] == "true" and f"pid {holder.pid}" in tags["gpu_other_processes"]


@pytest.mark.gpu
@pytest.mark.skipif(cuda_devices < 2, reason="needs 2 GPUs")
def test_the_parallel_launcher_spreads_jobs_over_the_gpus_one_at_a_time(tmp_path):
    import torch

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep = subprocess.Popen(sweep_command(tmp_path, uri, "-m", "dtype=bf16,fp32", "kernels=none",
                                           "prompt.length=118,1024", "timing=quick", "hydra/launcher=parallel"),
                             cwd=REPO_ROOT, env=LOCAL_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, text=True)
    out, _ = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, out[-3000:]
    _, children = runs_of(uri)
    shown = ("run_status", "worker_pid", "gpu_index", "gpu_contended", "gpu_other_processes", "gpu_contention_note")
    jobs = {r.info.run_name: {k: r.data.tags.get(k) for k in shown} for r in children}
    assert len(children) == 4 and all(job["run_status"] == "measured" for job in jobs.values()), jobs
    gpus_of: dict[str, set[str]] = defaultdict(set)
    for job in jobs.values():
        gpus_of[job["worker_pid"]].add(job["gpu_index"])
    assert len(gpus_of) == 2 and all(len(gpus) == 1 for gpus in gpus_of.values()), f"not one worker per GPU: {jobs}"
    assert set().union(*gpus_of.values()) == {"0", "1"}, jobs
    by_device = defaultdict(list)
    for run_ in children:
        by_device[run_.data.tags["gpu_uuid"]].append((run_.info.start_time, run_.info.end_time))
    assert not any(overlapping(intervals) for intervals in by_device.values()), f"runs overlap on a GPU: {by_device}"
    sweep_processes = {str(sweep.pid), *gpus_of}
    # Earlier tests of this session (tests/test_gpu.py) leave this process a CUDA context: jobs rightly count it.
    this_process = {str(os.getpid())} if torch.cuda.is_initialized() else set()
    for name, job in jobs.items():
        if job["gpu_contended"] == "unknown":
            continue  # nvidia-smi cannot see this PID namespace; the note says so
        others = set(re.findall(r"pid (\d+)", job["gpu_other_processes"] or ""))
        found = f"{name}: {job}; the sweep's processes {sorted(sweep_processes)}, this test's {os.getpid()}"
        assert not others & sweep_processes, f"this sweep's parent or other worker used a job's GPU: {found}"
        assert others <= this_process, f"another process used a GPU during the sweep: {found}"
        assert job["gpu_contended"] == str(bool(others)).lower(), found
