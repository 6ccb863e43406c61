"""The one results table behind every view, and the machine-vs-machine table: real sqlite MLflow stores written with
sweep's own Tracker (no model runs), read back and rendered by every view."""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console
from test_report import md_tables, run_main

from sweep.config import TrackingConfig
from sweep.records.results import JobResult, RunStatus
from sweep.store.tracking import DESCRIPTION_LIMIT, Tracker
from sweep.views.comparison import HEADER as COMPILE_HEADER
from sweep.views.machines import export_pairs, machine_pairs, pair_table, speedup_ratio
from sweep.views.ops import AT_THE_LIMIT
from sweep.views.report import MACHINES_CSV, load_runs, speedup_pivot
from sweep.views.summary import job_description, sweep_tables
from sweep.views.sweep_page import Links, sweep_page
from sweep.views.table import latest_runs, results_table

H100 = "NVIDIA H100 80GB HBM3"
H200 = "NVIDIA H200"
KERNEL_A = "local:/home/a/rms_exact@1a2b3c4d5e6f"  # two local kernels under the one subset name `rms`
KERNEL_B = "local:/home/a/rms_fast@6f5e4d3c2b1a"
SILU = "bundled:triton_silu@c7f05e49a99f"
T0 = 1_700_000_000_000  # ms


def fingerprint(gpu: str, **changes: str) -> dict[str, str]:
    h100 = gpu == H100
    return {"gpu_name": gpu, "device_capability": "9.0", "gpu_memory_gb": "79.2" if h100 else "139.8",
            "gpu_memory_integrated": "false", "sm_count": "132", "driver_version": "570.1", "cuda_version": "12.8",
            "cpu_model": "Xeon", "cpu_arch": "x86_64", "host": "node-h100" if h100 else "node-h200",
            "torch_version": "2.8.0", "transformers_version": "5.21.0", "kernels_version": "0.17.2",
            "triton_version": "3.4.0", "liger_kernel_version": "0.6.1", "sweep_version": "0.1.0",
            "git_commit": "abc123", "git_dirty": "false"} | changes


@dataclass
class Spec:
    """One job as a sweep would log it: every axis of a run's identity, its outcome and when it ended."""
    gpu: str = H100
    workload: str = "prefill"
    baseline: str = "eager"
    model: str = "tiny-llama"
    dtype: str = "bf16"
    reference: str = "float32"
    length: int = 118
    text: str = "Hello world! "
    batch: int = 1
    kernels: str = "rms"
    kernel: str = KERNEL_A  # kernel_RMSNorm (kernel_SiLU for silu), empty for none
    forward_path: str = "default"
    attn: str = "sdpa"
    compile_mode: str = "default"
    timing_mode: str = "auto"
    status: RunStatus = RunStatus.measured
    old_schema: bool = False  # logged before workload, baseline, prompt text, reference dtype and kernels were
    speedup: tuple[float, float, float] = (1.25, 1.24, 1.26)
    baseline_ms: float = 2.0
    max_abs_diff: float = 0.0039
    ended_ms: int = T0
    machine: dict[str, str] = field(default_factory=dict)  # fingerprint changes
    sol: tuple[float, float, float] | None = None  # RMSNorm timed alone: op_sol_RMSNorm and its interval
    prediction_gap: float = 1.0  # of a run with `sol`

    def identity(self) -> tuple[object, ...]:
        """What the test itself takes for the run's identity: what was recorded of it, and the machine."""
        unknown = "?" if self.old_schema else None
        return (self.workload, self.baseline, self.model, self.dtype, str(self.length), self.batch, self.kernels,
                self.timing_mode, unknown or self.reference, unknown or self.text, unknown or self.kernel,
                unknown or self.forward_path, unknown or self.attn,
                self.compile_mode if self.baseline == "compile" else "", self.gpu, tuple(sorted(self.machine.items())))

    def job(self) -> JobResult:
        params = {"model": self.model, "dtype": self.dtype, "kernels": self.kernels, "prompt_len": str(self.length),
                  "batch_size": str(self.batch), "device": "auto", "timing_mode": self.timing_mode}
        tags = fingerprint(self.gpu, **self.machine)
        if not self.old_schema:
            params |= {"workload": self.workload, "baseline": self.baseline, "prompt_text": self.text,
                       "reference_dtype": self.reference}
            if self.kernel:
                params[f"kernel_{'SiLU' if self.kernels == 'silu' else 'RMSNorm'}"] = self.kernel
            if self.baseline == "compile":
                params |= {"compile_mode": self.compile_mode, "compile_dynamic": "False",
                           "compile_fullgraph": "False", "compile_backend": "inductor",
                           "compile_undeclared_kernels": "compile"}
            tags |= {"forward_path": self.forward_path, "attn_implementation": self.attn}
        result = JobResult(name=f"{self.dtype} {self.kernels} T={self.length}", params=params, status=self.status,
                           tags=tags, ended_ms=self.ended_ms)
        if self.status == RunStatus.measured:
            result.tags["timing_mode_used"] = "graph" if self.timing_mode == "auto" else "eager"
            result.metrics = self.metrics()
            if self.sol is not None:
                result.tags["op_bound_RMSNorm"] = "memory"
        elif self.status != RunStatus.killed:
            result.reason = f"{self.status.value} on purpose: CUDA out of memory"
            result.metrics = {"job_wall_s": 0.5}
        return result

    def metrics(self) -> dict[str, float]:
        value, low, high = self.speedup
        metrics = {"latency_ms_baseline": self.baseline_ms, "job_wall_s": 1.0}
        if self.kernels != "none":
            metrics |= {"latency_ms_kernel": self.baseline_ms / value, "speedup": value, "speedup_ci_low": low,
                        "speedup_ci_high": high, "speedup_significant": float(not low <= 1 <= high),
                        "max_abs_diff": self.max_abs_diff, "err_ratio": 1.0 + self.max_abs_diff,
                        "argmax_match": 1.0}
        if self.workload == "decode":
            metrics["tokens_per_s_kernel"] = 1000.0 / self.baseline_ms * value
        if self.workload == "train":
            metrics |= {"loss_diff": 0.001, "grad_err_ratio": 1.1, "peak_mem_mb_baseline": 900.0,
                        "peak_mem_mb_kernel": 800.0}
        if self.baseline == "compile":
            metrics |= {"latency_ms_compiled": self.baseline_ms / 1.5, "compile_speedup": 1.5,
                        "compile_speedup_ci_low": 1.45, "compile_speedup_ci_high": 1.55}
        if self.sol is not None:
            sol, sol_low, sol_high = self.sol
            metrics |= {"op_calls_RMSNorm": 9.0, "op_speedup_RMSNorm": 2.0, "op_sol_RMSNorm": sol,
                        "op_sol_RMSNorm_ci_low": sol_low, "op_sol_RMSNorm_ci_high": sol_high,
                        "predicted_speedup": value / self.prediction_gap, "prediction_gap": self.prediction_gap}
        return metrics


class Store:
    """A sqlite store's experiment (`kernel-sweep` unless given), written through sweep's Tracker."""

    def __init__(self, root: Path, name: str, experiment: str = "kernel-sweep"):
        self.uri = f"sqlite:///{root}/{name}.db"
        self.tracker = Tracker(TrackingConfig(uri=self.uri, experiment=experiment,
                                              artifact_root=str(root / f"{name}-artifacts")), describe=job_description)
        self.sweeps: dict[str, list[str]] = {}  # sweep id: its run ids
        self.written: dict[str, Spec] = {}  # run id: what it holds

    def sweep(self, specs: list[Spec]) -> str:
        sweep_id = self.tracker.start_sweep("sweep", tags={})
        self.sweeps[sweep_id] = [self.log(sweep_id, spec) for spec in specs]
        return sweep_id

    def log(self, sweep_id: str, spec: Spec) -> str:
        job = spec.job()
        if spec.status == RunStatus.killed:  # started, then interrupted: the run carries no result
            run_id = self.tracker.start_job(sweep_id, job, tags={})
            self.tracker.kill_job(run_id, "interrupted (SIGTERM)")
        else:
            run_id = self.tracker.log_job(sweep_id, job)
        self.written[run_id] = spec
        return run_id


def random_spec(rng: random.Random, gpu: str) -> Spec:
    workload = rng.choice(["prefill", "prefill", "decode", "train"])
    kernels = rng.choice(["none", "rms", "rms", "silu"])
    spec = Spec(
        gpu=gpu, workload=workload, baseline="compile" if workload == "prefill" and rng.random() < 0.3 else "eager",
        model=rng.choice(["tiny-llama", "utf8-lm-tiny"]), dtype=rng.choice(["bf16", "fp32"]),
        length=rng.choice([16, 118]), text=rng.choice(["Hello world! ", "Once upon a time, "]),
        batch=rng.choice([1, 2]), kernels=kernels,
        kernel={"none": "", "rms": rng.choice([KERNEL_A, KERNEL_B]), "silu": SILU}[kernels],
        forward_path={"prefill": rng.choice(["default", "use_cache=False"]), "decode": "static_cache_step",
                      "train": "training_step"}[workload],
        attn=rng.choice(["sdpa", "sdpa", "eager"]), compile_mode=rng.choice(["default", "max-autotune"]),
        reference=rng.choice(["float32", "float64"]), timing_mode=rng.choice(["auto", "auto", "eager"]),
        status=rng.choice([RunStatus.measured] * 5 + [RunStatus.skipped, RunStatus.failed, RunStatus.killed]),
        ended_ms=T0 + rng.randrange(10**9))
    value = rng.uniform(0.9, 1.4)
    spec.speedup = (value, value * 0.99, value * 1.01)
    spec.old_schema = workload == "prefill" and spec.baseline == "eager" and rng.random() < 0.2
    spec.machine = {"torch_version": "2.9.0"} if rng.random() < 0.1 else {}
    return spec


def random_store(store: Store, rng: random.Random) -> Store:
    """Two sweeps, one per machine, of random jobs; some jobs measured again (in either sweep, out of the order
    they ran in), so that identities repeat."""
    specs = {gpu: [random_spec(rng, gpu) for _ in range(6)] for gpu in (H100, H200)}
    for gpu in (H100, H200):  # the same configurations on both machines, to compare
        specs[gpu] += [Spec(**{**vars(spec), "gpu": gpu, "machine": {}}) for spec in rng.sample(specs[H100], 2)]
    for gpu, mine in specs.items():
        again = [Spec(**{**vars(spec), "status": rng.choice(list(RunStatus)), "ended_ms": T0 + rng.randrange(10**9)})
                 for spec in rng.sample(mine, 2)]
        store.sweep(mine + again)
    return store


def shown_identity(row: dict[str, str]) -> tuple[object, ...]:
    """A row of the report's CSV as `Spec.identity` names it (a run of an older schema recorded no reference dtype)."""
    recorded = ["?"] * 5 if row["reference_dtype"] == "" else [
        row["reference_dtype"], row["prompt_text"], row["kernel_identity"].partition("=")[2], row["forward_path"],
        row["attn_implementation"]]
    machine = (("torch_version", row["torch_version"]),) if row["torch_version"] != "2.8.0" else ()
    return (row["workload"], row["baseline"], row["model"], row["dtype"], row["prompt_len"], int(row["batch_size"]),
            row["kernels"], row["timing_mode"], *recorded, row["compile_mode"], row["gpu_name"], machine)


def table_rows(text: str, headings: tuple[str, ...]) -> int:
    """How many rows the markdown tables under headings starting with any of `headings` hold."""
    lines, heading = [], ""
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("|") and heading.startswith(headings):
            lines.append(line)
    return len(lines) - 2 * sum(line.startswith("|---") for line in lines)  # each table's header and rule


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sqlite file for the random stores, each an experiment: MLflow creates a file's tables once."""
    return tmp_path_factory.mktemp("random-stores")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_view_shows_every_identity_once(shared_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              seed: int) -> None:
    """Random stores mixing every axis of a run's identity, statuses, older schemas and two machines: every view
    renders, and the report shows each identity once, as its newest measurement."""
    store = random_store(Store(shared_root, "random", experiment=f"seed-{seed}"), random.Random(seed))
    report = ("--tracking-uri", store.uri, "--experiment", store.tracker.experiment)
    identities: dict[tuple[object, ...], list[str]] = {}
    for run_id, spec in store.written.items():
        identities.setdefault(spec.identity(), []).append(run_id)

    for sweep_id, run_ids in store.sweeps.items():  # the end of a sweep: its terminal tables and its page
        jobs = results_table({store.uri: store.tracker.sweep_jobs(sweep_id)})
        console = Console(file=io.StringIO(), width=300)
        tables = sweep_tables(jobs, "sweep")
        for table in tables:
            console.print(table)
        assert sum(t.row_count for t in tables if str(t.title).startswith(("sweep", COMPILE_HEADER))) == len(run_ids)
        links = Links(store.tracker.run_link, store.tracker.artifact_link)  # its report: the store's, below
        page = sweep_page(sweep_id, jobs, "sweep", links, DESCRIPTION_LIMIT, report_files={})
        assert len(page.description) <= DESCRIPTION_LIMIT
        if "jobs fit here" not in page.description:
            assert table_rows(page.description, ("Timing", COMPILE_HEADER)) == len(run_ids)

    code, _, err = run_main(capsys, *report, "--out", str(tmp_path))  # with its plots
    assert code == 0, err
    code, html, err = run_main(capsys, *report, "--format", "html")
    assert code == 0 and html.startswith("<!doctype html>"), err
    code, csv, err = run_main(capsys, *report, "--format", "csv")
    assert code == 0, err
    code, terminal, err = run_main(capsys, *report)
    assert code == 0, err
    latest = latest_runs(load_runs([store.uri], store.tracker.experiment))
    speedup_pivot(latest[latest["baseline"] != "compile"])  # the CSV beside the report: every workload in one
    pairs = machine_pairs(latest)

    shown = pd.read_csv(io.StringIO(csv), dtype=str, keep_default_na=False)
    assert sorted(map(shown_identity, shown.to_dict("records"))) == sorted(identities)  # none merged, none dropped
    for row in shown.to_dict("records"):
        runs = [store.written[run_id] for run_id in identities[shown_identity(row)]]
        measured = [spec.ended_ms for spec in runs if spec.status == RunStatus.measured]
        if measured:  # the newest measurement, however late it was uploaded
            assert store.written[row["run_id"]].ended_ms == max(measured)
        else:
            assert row["run_status"] != "measured"
        assert int(row["other_runs"]) == len(runs) - 1
    assert table_rows(terminal, ("model=", )) + table_rows(terminal.split(COMPILE_HEADER, 1)[-1], ("tiny", "utf8")) \
        == len(identities)
    if pairs:  # each run in one pair at most
        paired = export_pairs(pairs)
        assert not paired["run_id_a"].duplicated().any() and not paired["run_id_b"].duplicated().any()


def test_a_week_of_runs_with_two_local_kernels_under_one_name_is_reported(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's store: the mission sweep, prefill, decode and train runs of two local kernels under the one subset
    name `rms`, baseline=compile runs and a failed run. The report crashed in its err_ratio plot (`cannot reindex on
    an axis with duplicate labels`)."""
    store = Store(tmp_path, "week")
    store.sweep([Spec(kernels=k, kernel={"none": "", "rms": KERNEL_A, "silu": SILU, "both": KERNEL_A}[k],
                      length=length) for k in ("none", "rms", "silu", "both") for length in (118, 1024)])
    for kernel, speedup in ((KERNEL_A, (1.2, 1.19, 1.21)), (KERNEL_B, (1.3, 1.29, 1.31))):
        store.sweep([Spec(workload=workload, kernel=kernel, speedup=speedup,
                          forward_path={"prefill": "default", "decode": "static_cache_step",
                                        "train": "training_step"}[workload])
                     for workload in ("prefill", "decode", "train")])
    store.sweep([Spec(baseline="compile", kernel=kernel) for kernel in (KERNEL_A, KERNEL_B)])
    store.sweep([Spec(length=9000, status=RunStatus.failed)])

    code, out, err = run_main(capsys, "--tracking-uri", store.uri, "--out", str(tmp_path / "report"))

    assert code == 0, err
    report = (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "err_ratio.png").read_bytes().startswith(b"\x89PNG")
    for workload in ("prefill", "decode", "train"):  # both kernels, each its own row
        part = report.split(f"## {workload}")[1].split("\n## ")[0]
        rows = [r["kernels"] for r in md_tables(part)["Speedup by GPU"]]
        assert f"rms [RMSNorm={KERNEL_A}]" in rows and f"rms [RMSNorm={KERNEL_B}]" in rows
    compiled = md_tables(report.split(COMPILE_HEADER)[1].split("\n## ")[0])
    assert [row["kernels"] for rows in compiled.values() for row in rows] == [
        f"rms [RMSNorm={KERNEL_A}]", f"rms [RMSNorm={KERNEL_B}]"]


def test_the_newest_measurement_wins_not_the_newest_upload(tmp_path: Path) -> None:
    """A job uploaded late from the spool measured before one logged at once; a later failure counts, never wins."""
    store = Store(tmp_path, "s")
    sweep = store.sweep([Spec(speedup=(1.30, 1.29, 1.31), ended_ms=T0 + 2000)])
    store.log(sweep, Spec(speedup=(1.10, 1.09, 1.11), ended_ms=T0 + 1000))  # logged last, measured first
    store.log(sweep, Spec(status=RunStatus.failed, ended_ms=T0 + 3000))
    store.tracker.start_job(sweep, Spec().job(), tags={})  # still running, or its process died: no result

    runs = load_runs([store.uri], "kernel-sweep")
    (row,) = latest_runs(runs).to_dict("records")
    assert row["speedup"] == 1.30 and row["other_runs"] == 3
    (running,) = runs[runs["status_reason"].str.startswith("no result logged: the run is RUNNING")].to_dict("records")
    assert running["run_status"] == "failed"


def two_machines(tmp_path: Path) -> Store:
    """One store, two machines (their software differs: torch), three configurations measured on both."""
    store = Store(tmp_path, "machines")
    b = {"torch_version": "2.9.0"}
    store.sweep([Spec(length=118, speedup=(1.30, 1.29, 1.31), baseline_ms=2.0),  # clearly faster on the H100
                 Spec(length=1024, speedup=(1.20, 1.19, 1.21), baseline_ms=4.0),  # the same on both
                 Spec(length=2048, speedup=(1.10, 1.08, 1.12), max_abs_diff=0.0, baseline_ms=8.0),
                 Spec(length=4096, kernels="none", kernel="", baseline_ms=16.0)])
    store.sweep([Spec(gpu=H200, machine=b, length=118, speedup=(1.10, 1.09, 1.11), baseline_ms=1.0),
                 Spec(gpu=H200, machine=b, length=1024, speedup=(1.20, 1.19, 1.21), baseline_ms=2.0),
                 Spec(gpu=H200, machine=b, length=2048, speedup=(0.99, 0.97, 1.01), kernel=KERNEL_B,
                      baseline_ms=4.0),
                 Spec(gpu=H200, machine=b, length=4096, kernels="none", kernel="", baseline_ms=8.0)])
    return store


def test_machines_are_compared_configuration_by_configuration(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    store = two_machines(tmp_path)
    (pair,) = machine_pairs(latest_runs(load_runs([store.uri], "kernel-sweep")))
    assert (pair.a, pair.b) == (H100, H200)

    rows = {int(r.prompt_len): r for r in pair.rows.itertuples()}
    assert rows[118].speedups_differ and not rows[1024].speedups_differ
    value, low, high = speedup_ratio(*({"speedup": v, "speedup_ci_low": lo, "speedup_ci_high": hi}
                                       for v, lo, hi in ((1.30, 1.29, 1.31), (1.10, 1.09, 1.11))))
    half = math.hypot(math.log(1.30 / 1.29), math.log(1.11 / 1.10))  # both intervals' lower/upper half-widths
    assert (rows[118].speedup_ratio, rows[118].speedup_ratio_ci_low) == pytest.approx((value, value / math.exp(half)))
    assert value == pytest.approx(1.30 / 1.10) and high == pytest.approx(value * math.exp(
        math.hypot(math.log(1.31 / 1.30), math.log(1.10 / 1.09))))
    assert [rows[length].baseline_ratio for length in (118, 4096)] == [0.5, 0.5]  # the H200 runs it twice as fast
    assert rows[2048].verdict == "helps on A only; exact on A only"
    assert all("torch 2.8.0 / 2.9.0" in rows[length].differs for length in rows)
    assert f"kernels RMSNorm={KERNEL_A} / RMSNorm={KERNEL_B}" in rows[2048].differs
    assert "kernels RMSNorm" not in rows[118].differs
    assert pair.headline.startswith(f"{H100} vs {H200}: speedups differ in 2 of 3 configurations; the verdict "
                                    "changes in 1: prefill tiny-llama bf16 T=2048 B=1 timing=auto rms")
    assert pair_table(pair).loc[0, "A / B speedup [CI]"].endswith(" *")
    assert not [column for column in pair_table(pair).columns if "SOL" in column or "gap" in column]

    code, out, _ = run_main(capsys, "--tracking-uri", store.uri)  # the terminal
    assert code == 0 and pair.headline in out
    table = {row["configuration"]: row for row in md_tables(out)[f"{H100} vs {H200}"]}
    assert table["tiny-llama bf16 T=118 B=1 timing=auto"]["A / B speedup [CI]"].endswith(" *")
    assert not table["tiny-llama bf16 T=1024 B=1 timing=auto"]["A / B speedup [CI]"].endswith("*")
    code, out, _ = run_main(capsys, "--tracking-uri", store.uri, "--format", "csv", "--out", str(tmp_path / "r"))
    assert code == 0 and pair.headline in out
    exported = pd.read_csv(tmp_path / "r" / "machines.csv")
    assert set(exported["machine_a"]) == {H100} and exported["speedups_differ"].sum() == 2
    code, out, _ = run_main(capsys, "--tracking-uri", store.uri, "--format", "html", "--out", str(tmp_path / "h"))
    assert code == 0 and "Machine against machine" in (tmp_path / "h" / "report.html").read_text()


def test_each_machines_share_of_the_limit_sits_beside_its_speedup(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Per configuration both machines measured: each one's op_sol_<Layer> with its interval and its prediction gap;
    a run of an older store, which timed no layer alone, shows none and breaks nothing."""
    store = Store(tmp_path, "limits")
    store.sweep([Spec(length=118, sol=(0.95, 0.93, 0.97), prediction_gap=1.05),
                 Spec(length=1024, sol=(1.04, 1.01, 1.07), prediction_gap=0.98),  # as fast as the copy
                 Spec(length=2048)])  # logged before layers were timed alone
    store.sweep([Spec(gpu=H200, length=118, sol=(0.80, 0.78, 0.82), prediction_gap=0.97),
                 Spec(gpu=H200, length=1024, sol=(0.60, 0.58, 0.62), prediction_gap=0.91),
                 Spec(gpu=H200, length=2048, sol=(0.70, 0.69, 0.71))])
    (pair,) = machine_pairs(latest_runs(load_runs([store.uri], "kernel-sweep")))

    rows = {row["configuration"]: row for row in pair_table(pair).to_dict("records")}
    short, at_limit, older = (rows[f"tiny-llama bf16 T={length} B=1 timing=auto"] for length in (118, 1024, 2048))
    assert (short["A SOL RMSNorm"], short["B SOL RMSNorm"]) == ("0.95 [0.93, 0.97]", "0.80 [0.78, 0.82]")
    assert (short["A prediction gap"], short["B prediction gap"]) == ("1.050", "0.970")
    assert (at_limit["A SOL RMSNorm"], at_limit["B SOL RMSNorm"]) == (AT_THE_LIMIT, "0.60 [0.58, 0.62]")
    assert (older["A SOL RMSNorm"], older["A prediction gap"]) == ("-", "-")
    assert (older["B SOL RMSNorm"], older["B prediction gap"]) == ("0.70 [0.69, 0.71]", "1.000")

    code, out, err = run_main(capsys, "--tracking-uri", store.uri)  # the terminal
    assert code == 0, err
    shown = {row["configuration"]: row for row in md_tables(out)[f"{H100} vs {H200}"]}
    assert shown["tiny-llama bf16 T=118 B=1 timing=auto"]["B SOL RMSNorm"] == "0.80 [0.78, 0.82]"
    code, _, err = run_main(capsys, "--tracking-uri", store.uri, "--format", "csv", "--out", str(tmp_path / "r"))
    assert code == 0, err
    exported = pd.read_csv(tmp_path / "r" / MACHINES_CSV).set_index("prompt_len")
    assert tuple(exported.loc[118, ["op_sol_RMSNorm_a", "op_sol_RMSNorm_ci_low_b", "prediction_gap_b"]]) \
        == (0.95, 0.78, 0.97)
    assert exported.loc[2048, ["op_sol_RMSNorm_a", "prediction_gap_a"]].isna().all()


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Store:
    store = Store(tmp_path_factory.mktemp("good"), "good")
    store.sweep([Spec(old_schema=True), Spec(length=1024)])  # an older schema's run beside a current one
    return store


def bad_store(tmp_path: Path, good: Store, kind: str) -> tuple[str, str]:
    """A store the report cannot read, of `kind`, and what its message says."""
    if kind == "unreadable":
        (tmp_path / "garbage.db").write_bytes(b"not a database at all " * 100)
        return f"sqlite:///{tmp_path}/garbage.db", "cannot read MLflow store"
    if kind == "missing experiment":
        return Store(tmp_path, "other", experiment="elsewhere").uri, "no experiment 'kernel-sweep'"
    if kind == "missing file":
        return f"sqlite:///{tmp_path}/missing.db", "does not exist"
    folder = Path(good.uri.removeprefix("sqlite:///")).parent
    same = good.uri.replace(str(folder), f"{folder}/../{folder.name}")  # the same file, spelt otherwise
    return same, f"is the same store as {good.uri}"


@pytest.mark.parametrize("kind", ["unreadable", "missing experiment", "missing file", "same file"])
def test_a_store_that_cannot_be_read_is_named_and_the_others_reported(tmp_path: Path, good: Store, kind: str,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    bad, message = bad_store(tmp_path, good, kind)

    code, out, err = run_main(capsys, "--tracking-uri", good.uri, "--tracking-uri", bad)

    assert code == 0 and "Traceback" not in err
    assert "warning: store left out of the report: " in err and message in err and bad in err
    assert len(md_tables(out)["Speedup by GPU"]) == 2
    code, _, err = run_main(capsys, "--tracking-uri", bad)
    assert (code, "Traceback" in err) == ((0, False) if kind == "same file" else (2, False))
