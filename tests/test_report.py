"""`python -m sweep.report` and sweep.views.report against two real sqlite MLflow stores holding synthetic sweeps."""

from __future__ import annotations

import io
import socket
from dataclasses import dataclass
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from sweep.records.results import JobResult
from sweep.report import main
from sweep.views.report import load_runs, speedup_pivot
from sweep.views.table import FINGERPRINT, latest_runs, results_table

H100 = "NVIDIA H100 80GB HBM3"
H200 = "NVIDIA H200"
GB10 = "NVIDIA GB10"
KERNELS = ("none", "rms", "silu", "both")
LENGTHS = (128, 512)
KERNEL_GAIN = {"none": 0.0, "rms": 0.10, "silu": 0.05, "both": 0.20}
GPU_GAIN = {H100: 0.0, H200: 0.30}
LENGTH_GAIN = {128: 0.0, 512: 0.07}
T0 = 1_700_000_000_000  # ms


def expected_speedup(gpu: str, kernels: str, prompt_len: int) -> float:
    return 1.0 + KERNEL_GAIN[kernels] + GPU_GAIN[gpu] + LENGTH_GAIN[prompt_len]


@dataclass
class Stores:
    a: str  # H100: sweep a1 (full grid + a failed run), then sweep a2 (re-measures rms at 128)
    b: str  # H200: sweep b1 (full grid, with gen_match)
    a1: str
    a2: str
    b1: str


class StoreWriter:
    def __init__(self, uri: str, root: Path):
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = self.client.create_experiment(
            "kernel-sweep", artifact_location=(root / "artifacts").as_uri())
        self.clock = T0

    def _run(self, tags: dict[str, str]) -> str:
        self.clock += 1000
        return self.client.create_run(self.experiment_id, start_time=self.clock, tags=tags).info.run_id

    def parent(self) -> str:
        return self._run({"sweep_role": "parent"})

    def child(self, sweep_id: str, gpu: str, kernels: str, prompt_len: int, *, speedup: float | None = None,
              status: str = "measured", reason: str = "", extra: dict[str, float] | None = None) -> str:
        tags = {"mlflow.parentRunId": sweep_id, "sweep_id": sweep_id, "sweep_role": "job",
                "run_status": status, "status_reason": reason, **fingerprint(gpu)}
        run_id = self._run(tags)
        params = {"model": "tiny-llama", "dtype": "bf16", "kernels": kernels, "prompt_len": prompt_len,
                  "batch_size": 1, "device": "cuda", "timing_mode": "graph"}
        metrics = {} if status != "measured" else metrics_for(
            speedup if speedup is not None else expected_speedup(gpu, kernels, prompt_len), kernels, prompt_len)
        metrics |= extra or {}
        self.client.log_batch(run_id, metrics=[Metric(k, v, self.clock, 0) for k, v in metrics.items()],
                              params=[Param(k, str(v)) for k, v in params.items()])
        self.client.set_terminated(run_id, status="FAILED" if status == "failed" else "FINISHED")
        return run_id


def fingerprint(gpu: str) -> dict[str, str]:
    return {"gpu_name": gpu, "device_capability": "9.0", "gpu_memory_gb": "79.2" if gpu == H100 else "139.8",
            "sm_count": "132", "driver_version": "570.1", "cuda_version": "12.8", "cpu_model": "Xeon",
            "host": "node-h100" if gpu == H100 else "node-h200", "torch_version": "2.8.0",
            "transformers_version": "5.21.0", "kernels_version": "0.17.2", "triton_version": "3.4.0",
            "liger_kernel_version": "0.6.1", "sweep_version": "0.1.0", "git_commit": "abc123", "git_dirty": "false"}


def metrics_for(speedup: float, kernels: str, prompt_len: int) -> dict[str, float]:
    baseline = 10.0 * prompt_len / 128
    return {"latency_ms_baseline": baseline, "latency_ms_kernel": baseline / speedup, "speedup": speedup,
            "speedup_ci_low": speedup - 0.01, "speedup_ci_high": speedup + 0.01,
            "max_abs_diff": 0.0 if kernels == "none" else 0.0039, "mean_abs_diff": 0.0001,
            "argmax_match": 1.0, "ref_err_baseline": 0.01, "ref_err_kernel": 0.01 * (1 + KERNEL_GAIN[kernels]),
            "err_ratio": 1 + KERNEL_GAIN[kernels], "kernelized_total": 4.0}


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Stores:
    root = tmp_path_factory.mktemp("stores")
    a, b = f"sqlite:///{root}/a.db", f"sqlite:///{root}/b.db"
    store_a, store_b = StoreWriter(a, root / "a"), StoreWriter(b, root / "b")

    a1 = store_a.parent()
    for kernels in KERNELS:
        for length in LENGTHS:
            store_a.child(a1, H100, kernels, length)
    store_a.child(a1, H100, "silu", 2048, status="failed", reason="CUDA out of memory")
    a2 = store_a.parent()
    store_a.child(a2, H100, "rms", 128, speedup=1.50)

    b1 = store_b.parent()
    for kernels in KERNELS:
        for length in LENGTHS:
            store_b.child(b1, H200, kernels, length, extra={"gen_match": 1.0})

    empty = store_a.client.create_experiment("empty", artifact_location=(root / "empty").as_uri())
    store_a.client.create_run(empty, tags={"sweep_role": "parent"})
    return Stores(a, b, a1, a2, b1)


def md_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Markdown tables of a report, keyed by the heading above each."""
    raw: dict[str, list[list[str]]] = {}
    heading = ""
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("|"):
            raw.setdefault(heading, []).append([cell.strip() for cell in line.strip("|").split("|")])
    return {h: [dict(zip(rows[0], row)) for row in rows[2:]] for h, rows in raw.items()}


def section(gpu: str, prompt_len: int) -> str:
    return (f"model=tiny-llama, dtype=bf16, prompt_len={prompt_len}, batch_size=1, "
            f"timing_mode=graph on {gpu}")


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_load_runs_flattens_children_of_every_store(stores: Stores) -> None:
    runs = load_runs([stores.a, stores.b], "kernel-sweep")

    assert len(runs) == 10 + 8  # parents excluded
    assert runs.groupby("store").size().to_dict() == {stores.a: 10, stores.b: 8}
    assert set(runs["gpu_name"]) == {H100, H200}
    assert runs["prompt_len"].dtype.kind == "i"
    failed = runs[runs["run_status"] == "failed"].iloc[0]
    assert failed["status_reason"] == "CUDA out of memory" and pd.isna(failed["speedup"])
    assert runs["layer_err_ratio_max"].isna().all()  # never logged: a NaN column, not a KeyError
    assert not any(column.startswith(("params.", "metrics.", "tags.", "mlflow.")) for column in runs.columns)


def test_markdown_pivot_has_one_column_per_gpu(stores: Stores, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "--tracking-uri", stores.a, "--tracking-uri", stores.b)

    assert code == 0
    pivot = md_tables(out)["Speedup by GPU"]
    assert list(pivot[0]) == ["model", "dtype", "prompt_len", "batch_size", "timing_mode", "kernels", H100, H200]
    cells = {(int(row["prompt_len"]), row["kernels"]): (row[H100], row[H200]) for row in pivot}
    assert cells[(512, "both")] == ("1.27x", "1.57x")
    assert cells[(128, "rms")] == ("1.50x", "1.40x")  # H100: the later sweep a2 wins
    assert cells[(2048, "silu")] == ("", "")  # failed on H100, never run on H200
    assert [row["kernels"] for row in pivot if row["prompt_len"] == "128"] == ["none", "both", "rms", "silu"]


def test_markdown_sections_show_the_original_table(stores: Stores, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_main(capsys, "--tracking-uri", stores.a, "--tracking-uri", stores.b)
    tables = md_tables(out)

    h100 = {row["kernels"]: row for row in tables[section(H100, 512)]}
    assert list(h100) == ["none", "both", "rms", "silu"]
    assert h100["rms"] == {"kernels": "rms", "baseline ms": "40.000", "kernel ms": f"{40 / 1.17:.3f}",
                           "speedup [CI]": "1.17x [1.16, 1.18]", "max diff": "0.0039", "argmax match": "1",
                           "err_ratio": "1.1", "status": "measured"}
    assert tables[section(H200, 512)][1]["speedup [CI]"] == "1.57x [1.56, 1.58]"
    assert "gen_match" in tables[section(H200, 512)][0] and "gen_match" not in h100["rms"]
    failed = tables[section(H100, 2048)]
    assert failed == [{"kernels": "silu", "baseline ms": "", "kernel ms": "", "speedup [CI]": "", "max diff": "",
                       "argmax match": "", "err_ratio": "", "status": "failed: CUDA out of memory"}]


def test_sweep_and_filter_restrict_rows(stores: Stores, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_main(capsys, "--tracking-uri", stores.a, "--tracking-uri", stores.b, "--sweep", stores.a1)
    pivot = md_tables(out)["Speedup by GPU"]
    assert len(pivot) == 9 and H200 not in pivot[0]
    assert {row["kernels"]: row[H100] for row in pivot if row["prompt_len"] == "128"}["rms"] == "1.10x"

    _, out, _ = run_main(capsys, "--tracking-uri", stores.a, "--sweep", stores.a2, "--format", "csv")
    assert pd.read_csv(io.StringIO(out))["sweep_id"].tolist() == [stores.a2]

    _, out, _ = run_main(capsys, "--tracking-uri", stores.a, "--tracking-uri", stores.b,
                         "--filter", "params.prompt_len = '512'")
    assert {row["prompt_len"] for row in md_tables(out)["Speedup by GPU"]} == {"512"}


def test_csv_parses_back(stores: Stores, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "--tracking-uri", stores.a, "--tracking-uri", stores.b, "--format", "csv")

    assert code == 0
    frame = pd.read_csv(io.StringIO(out))
    assert len(frame) == 9 + 8
    assert frame.groupby("gpu").size().to_dict() == {H100: 9, H200: 8}
    row = frame[(frame["gpu"] == H200) & (frame["kernels"] == "silu") & (frame["prompt_len"] == 128)].iloc[0]
    assert row["speedup"] == pytest.approx(1.35) and row["speedup_ci_low"] == pytest.approx(1.34)
    assert row["store"] == stores.b


@pytest.mark.parametrize("fmt", ["md", "html", "csv"])
def test_out_writes_report_and_pngs(stores: Stores, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                    fmt: str) -> None:
    code, out, _ = run_main(capsys, "--tracking-uri", stores.a, "--tracking-uri", stores.b,
                            "--format", fmt, "--out", str(tmp_path / "report"))

    assert code == 0 and "wrote" in out
    report = (tmp_path / "report" / f"report.{fmt}").read_text()
    for name in ("speedup_vs_length.png", "err_ratio.png"):
        path = tmp_path / "report" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 100 and width > 100
        if fmt != "csv":
            assert name in report
    if fmt == "html":
        assert report.startswith("<!doctype html>") and report.count("<table") == 1 + 1 + 5  # machines, pivot, sections
    if fmt == "csv":
        assert len(pd.read_csv(io.StringIO(report))) == 17
        pivot = pd.read_csv(tmp_path / "report" / "speedup_pivot.csv")
        assert set(pivot.columns) >= {H100, H200} and len(pivot) == 9


def job(ended_s: int, speedup: float, **fingerprint: str) -> JobResult:
    """A measured run of one configuration, ended at `ended_s`; fingerprint fields not given are empty."""
    return JobResult(name="rms", params={"model": "m", "dtype": "bf16", "prompt_len": "128", "batch_size": "1",
                                         "timing_mode": "t", "kernels": "rms"},
                     metrics={"speedup": speedup}, tags=dict.fromkeys(FINGERPRINT, "") | fingerprint,
                     ended_ms=ended_s * 1000)


def table_of(*jobs: JobResult) -> pd.DataFrame:
    return latest_runs(results_table({"store": {f"run{i}": j for i, j in enumerate(jobs)}}))


def test_runs_from_different_fingerprints_are_never_merged() -> None:
    def row(gpu: str, torch: str, start: int, speedup: float) -> JobResult:
        return job(start, speedup, gpu_name=gpu, torch_version=torch)

    runs = table_of(row(H100, "2.7.0", 1, 1.1), row(H100, "2.8.0", 2, 1.2), row(H100, "2.8.0", 3, 1.3),
                    row(H200, "2.8.0", 4, 1.4), row("", "2.8.0", 5, 1.0))

    pivot = speedup_pivot(runs)
    assert pivot.iloc[0][[f"{H100} (torch_version=2.7.0)", f"{H100} (torch_version=2.8.0)", H200, "cpu"]].tolist() \
        == [1.1, 1.3, 1.4, 1.0]


def test_runs_that_differ_only_in_cpu_architecture_or_integrated_memory_are_never_merged() -> None:
    runs = table_of(job(1, 1.1, gpu_name=H200, cpu_arch="x86_64", gpu_memory_integrated="false"),
                    job(2, 1.2, gpu_name=H200, cpu_arch="aarch64", gpu_memory_integrated="false"),
                    job(3, 1.3, gpu_name=H200, cpu_arch="x86_64", gpu_memory_integrated="true"))

    columns = [f"{H200} (gpu_memory_integrated={integrated}, cpu_arch={arch})"
               for arch, integrated in (("x86_64", "false"), ("aarch64", "false"), ("x86_64", "true"))]
    assert speedup_pivot(runs).iloc[0][columns].tolist() == [1.1, 1.2, 1.3]


def test_the_intro_names_each_machines_cpu_architecture_and_gpu_memory(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"sqlite:///{tmp_path}/m.db"
    writer = StoreWriter(uri, tmp_path)
    sweep = writer.parent()
    writer.child(sweep, H100, "rms", 128)  # logged before cpu_arch and gpu_memory_integrated were recorded
    for gpu, tags in ((H200, {"cpu_arch": "x86_64", "gpu_memory_integrated": "false"}),
                      (GB10, {"cpu_arch": "aarch64", "gpu_memory_integrated": "true", "gpu_memory_gb": "119.7"})):
        run_id = writer.child(sweep, gpu, "rms", 128, speedup=1.1)
        for tag, value in tags.items():
            writer.client.set_tag(run_id, tag, value)

    code, out, _ = run_main(capsys, "--tracking-uri", uri)
    assert code == 0
    assert (f"machines: {GB10} (aarch64 CPU, 119.7 GB of GPU memory integrated: the system's, shared with the CPU); "
            f"{H100}; {H200} (x86_64 CPU, 139.8 GB of GPU memory).") in out


def test_bad_sqlite_store_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"sqlite:///{tmp_path}/missing.db"
    code, _, err = run_main(capsys, "--tracking-uri", uri)

    assert code == 2 and uri in err and "does not exist" in err and "--tracking-uri" in err
    assert not (tmp_path / "missing.db").exists()


def test_unreachable_server_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
    code, _, err = run_main(capsys, "--tracking-uri", uri)

    assert code == 2 and f"cannot reach MLflow server {uri}" in err


def test_missing_experiment_names_the_store(stores: Stores, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, "--tracking-uri", stores.a, "--experiment", "nope")

    assert code == 2 and "'nope'" in err and stores.a in err and "'kernel-sweep'" in err and "--experiment" in err


def test_invalid_filter_is_reported(stores: Stores, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, "--tracking-uri", stores.a, "--filter", "params.dtype ~ 'x'")

    assert code == 2 and "--filter" in err and stores.a in err


def test_no_runs_exits_1(stores: Stores, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "--tracking-uri", stores.a, "--experiment", "empty")

    assert code == 1 and out == "" and "no runs" in err


def test_one_part_per_workload_and_old_runs_read_as_prefill(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"sqlite:///{tmp_path}/w.db"
    store = StoreWriter(uri, tmp_path)
    sweep = store.parent()
    store.child(sweep, H100, "rms", 128)  # logged before the workload param existed
    for workload, extra in (("decode", {"tokens_per_s_kernel": 2500.0}),
                            ("train", {"grad_err_ratio": 1.25, "peak_mem_mb_baseline": 900.0,
                                       "peak_mem_mb_kernel": 700.0, "loss_diff": 0.002})):
        run_id = store.child(sweep, H100, "rms", 128, speedup=1.05 if workload == "decode" else 1.2, extra=extra)
        store.client.log_param(run_id, "workload", workload)

    assert sorted(load_runs([uri], "kernel-sweep")["workload"]) == ["decode", "prefill", "train"]
    code, out, _ = run_main(capsys, "--tracking-uri", uri)
    assert code == 0
    headings = [line for line in out.splitlines() if line.startswith("## ")]
    assert headings == ["## prefill: one forward over the prompt",
                        "## decode: one generation step after the prompt (KV cache)",
                        "## train: one forward and backward of the loss on the prompt"]
    pivots = out.split("### Speedup by GPU")[1:]
    assert [md_tables(p)[""][0][H100] for p in pivots] == ["1.10x", "1.05x", "1.20x"]  # one column each
    train = md_tables(out.split("## train")[1])[section(H100, 128)][0]
    assert train["grad_err_ratio"] == "1.25" and train["peak MB baseline"] == "900" and "max diff" not in train
    assert md_tables(out.split("## decode")[1].split("## train")[0])[section(H100, 128)][0]["tokens/s kernel"] \
        == "2500"


def test_report_is_honest_about_status_kernels_and_timing_mode(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"sqlite:///{tmp_path}/s.db"
    writer = StoreWriter(uri, tmp_path)
    sweep = writer.parent()

    def child(kernel: str, prompt_len: int, mode: str, **kwargs) -> None:
        run_id = writer.child(sweep, H100, "rms", prompt_len, **kwargs)
        writer.client.log_param(run_id, "kernel_RMSNorm", kernel)
        writer.client.set_tag(run_id, "timing_mode_used", mode)

    child("local:/k/exact@aaaaaaaaaaaa", 128, "graph", speedup=1.25)
    child("local:/k/exact@aaaaaaaaaaaa", 128, "graph", status="skipped", reason="no CUDA")  # later, not measured
    child("local:/k/nan@bbbbbbbbbbbb", 128, "graph", status="failed", reason="kernel output has 5 non-finite values")
    child("local:/k/exact@aaaaaaaaaaaa", 512, "eager", speedup=0.86, extra={"err_ratio": float("inf")})

    code, out, _ = run_main(capsys, "--tracking-uri", uri)
    assert code == 0
    pivot = {(row["prompt_len"], row["kernels"]): row[H100] for row in md_tables(out)["Speedup by GPU"]}
    exact, nan = "rms [RMSNorm=local:/k/exact@aaaaaaaaaaaa]", "rms [RMSNorm=local:/k/nan@bbbbbbbbbbbb]"
    assert pivot == {("128", exact): "1.25x", ("128", nan): "", ("512", exact): "0.86x (eager)"}
    rows = {row["kernels"]: row for row in md_tables(out)[section(H100, 128)]}
    assert rows[exact]["status"] == "measured" and rows[exact]["other runs"] == "1"  # the later skip is counted
    assert rows[nan]["status"].startswith("failed: kernel output has 5 non-finite values")
    [eager] = md_tables(out)[section(H100, 512)]
    assert eager["speedup [CI]"].endswith("(eager)") and eager["timing used"] == "eager"
    assert eager["err_ratio"] == "∞"
