"""Speed of light: each kernelized layer timed alone at the model's shapes, against eager and against a copy of its
bytes, and the Amdahl prediction; through real jobs on the CPU, on a one-layer model whose RMSNorm input is wide
(2048) so that its bytes take longer to copy than a Python call."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest
from conftest import local_kernel
from kernel_repos import write_kernel_repo
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from rich.console import Console
from test_report import md_tables, run_main
from transformers import LlamaConfig
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from sweep.config import TrackingConfig
from sweep.measure.ops import compute_bound, predicted_speedup
from sweep.records.results import OPS_PLOT, JobResult, RunStatus
from sweep.run.job import run_job
from sweep.run.session import SweepSession
from sweep.store.tracking import DESCRIPTION_LIMIT, Tracker
from sweep.views.ops import AT_THE_LIMIT, BYTES_MISCOUNTED, op_frame
from sweep.views.summary import job_description, sweep_tables
from sweep.views.sweep_page import Links, report_files, sweep_page
from sweep.views.table import job_row, results_table

HIDDEN = 2048
# One decoder layer (two RMSNorms, and the final one: 3 calls), a single narrow attention head and a narrow MLP:
# cheap to run, while each RMSNorm call moves megabytes.
WIDE_NORM_MODEL = [f"model.architecture.hidden_size={HIDDEN}", "model.architecture.intermediate_size=64",
                   "model.architecture.num_hidden_layers=1", "model.architecture.num_attention_heads=1",
                   "model.architecture.num_key_value_heads=1", "+model.architecture.head_dim=64"]
# Per workload: the prompt, and the shape (batch, tokens) of what each RMSNorm call normalises.
PROMPTS = {"prefill": (["prompt.length=64", "prompt.batch_size=4"], (4, 64)),
           "decode": (["prompt.length=8", "prompt.batch_size=256"], (256, 1)),
           "train": (["prompt.length=64", "prompt.batch_size=4"], (4, 64))}
# Op timing long enough per measurement (2 ms) and over 6 blocks that Python's jitter averages out on a busy CPU.
OP_TIMING = ["timing=quick", "timing.blocks=6", "timing.min_measure_ms=2", "timing.ops_budget_s=0.3",
             "numerics.per_layer=false", "numerics.gen_tokens=0", "dtype=fp32", "kernels=none"]

# Does less than an RMSNorm: returns its input unchanged, and its backward passes the incoming gradient through
# (with a zero gradient for the weight). It moves far fewer bytes than an RMSNorm must.
PASS_THROUGH_FUNCTION = """
class PassThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_states, weight):
        ctx.save_for_backward(weight)
        return hidden_states.view_as(hidden_states)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        return grad_output, torch.zeros_like(weight)
"""


@pytest.fixture(scope="module")
def pass_through_rms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_kernel_repo(tmp_path_factory.mktemp("ops"), "pass_through_rms", "PassThroughRMSNorm",
                             "return PassThrough.apply(hidden_states, self.weight)",
                             module_source=PASS_THROUGH_FUNCTION)


def norm_bytes(workload: str) -> int:
    """What one RMSNorm call must move in float32: x read and y written (and the weight read); a training step's
    forward and backward also copies the incoming gradient, reads x, the weight and dy again and writes dx and dW:
    7 tensors of x's size and 3 of the weight's."""
    batch, tokens = PROMPTS[workload][1]
    x, weight = batch * tokens * HIDDEN * 4, HIDDEN * 4
    return 7 * x + 3 * weight if workload == "train" else 2 * x + weight


@pytest.mark.slow  # timed on the CPU: it needs the CPU alone, as the slow tier runs one test at a time
@pytest.mark.parametrize("workload", ["prefill", "decode", "train"])
def test_an_exact_kernel_alone_is_as_fast_as_eager_and_predicts_the_model(make_config, models, kernel_repos, workload):
    """On the CPU one layer's op speedup scatters from one job to the next by about 4% (sd over 6 runs of each
    workload on the 2-core CI machine: 0.93 to 1.10, no bias), far more than its 6 blocks see: with the GPU's default
    `timing.rerun_sd` of 0.1%, 2 of 33 intervals missed 1. The job adds that scatter, as a store's repeats would
    estimate it (docs/timing.md); tests/test_gpu.py checks the exact kernel with CUDA graphs and the default."""
    prompt, _ = PROMPTS[workload]
    result = run_job(make_config(*OP_TIMING, *WIDE_NORM_MODEL, *prompt, f"workload={workload}", "timing.rerun_sd=0.04",
                                 *local_kernel("RMSNorm", kernel_repos["exact_rms"], "ExactRMSNorm")), models)
    assert result.status == RunStatus.measured, result.reason
    m = result.metrics
    assert m["op_calls_RMSNorm"] == 3 == m["kernelized_RMSNorm"]
    assert m["op_bytes_RMSNorm"] == norm_bytes(workload)
    assert m["op_speedup_RMSNorm_ci_low"] <= 1.0 <= m["op_speedup_RMSNorm_ci_high"], m
    assert result.tags["op_bound_RMSNorm"] == "memory" and "op_bytes_miscounted_RMSNorm" not in result.tags
    assert m["op_gbps_kernel_RMSNorm"] == pytest.approx(m["op_bytes_RMSNorm"] / m["op_ms_kernel_RMSNorm"] / 1e6)
    assert m["op_sol_RMSNorm_ci_low"] <= m["op_sol_RMSNorm"] <= m["op_sol_RMSNorm_ci_high"]
    assert "op_sol_baseline_RMSNorm" in m and m["op_ms_copy_RMSNorm"] > 0 and m["device_copy_gbps"] > 0
    assert "device_peak_gbps" not in m  # the CPU reports no memory clock
    share = m["op_share_RMSNorm"]
    assert share == pytest.approx(3 * m["op_ms_baseline_RMSNorm"] / m["latency_ms_baseline"]) and 0 < share < 1
    assert m["predicted_speedup"] == pytest.approx(1 / (1 - share + share / m["op_speedup_RMSNorm"]))
    assert m["prediction_gap"] == pytest.approx(m["speedup"] / m["predicted_speedup"])
    assert result.artifacts[OPS_PLOT].startswith(b"\x89PNG")
    assert m["phase_s_ops"] > 0


# train: the pass-through's step still copies the incoming gradient, 2 of the 7 tensors an RMSNorm step moves; at
# most 3.5x faster than the copy, which a busy CPU's jitter can hide (tests/test_gpu.py checks train on a GPU).
@pytest.mark.slow  # timed on the CPU: it needs the CPU alone, as the slow tier runs one test at a time
@pytest.mark.parametrize("workload", ["prefill", "decode"])
def test_a_kernel_faster_than_a_copy_of_its_bytes_is_reported_as_bytes_counted_wrong(make_config, models,
                                                                                     pass_through_rms, workload):
    prompt, _ = PROMPTS[workload]
    result = run_job(make_config(*OP_TIMING, *WIDE_NORM_MODEL, *prompt, f"workload={workload}",
                                 *local_kernel("RMSNorm", pass_through_rms, "PassThroughRMSNorm")), models)
    assert result.status == RunStatus.measured, result.reason
    m = result.metrics
    assert m["op_bytes_RMSNorm"] == norm_bytes(workload)  # what an RMSNorm must move, whatever the kernel does
    note = result.tags["op_bytes_miscounted_RMSNorm"]
    assert "the kernel measured" in note and "it moves fewer bytes than counted" in note
    assert not {"op_sol_RMSNorm", "op_sol_baseline_RMSNorm", "op_gbps_kernel_RMSNorm"} & m.keys()
    assert m["op_ms_kernel_RMSNorm"] < m["op_ms_copy_RMSNorm"]
    [row] = op_frame([job_row(result)]).to_dict("records")
    assert row["SOL kernel"] == row["SOL baseline"] == BYTES_MISCOUNTED
    assert row["kernel GB/s"] == "-" and row["calls"] == "3"


def test_timing_ops_false_times_no_layer_alone(make_config, models, kernel_repos):
    result = run_job(make_config(*OP_TIMING, *WIDE_NORM_MODEL, "prompt.length=16", "timing.ops=false",
                                 *local_kernel("RMSNorm", kernel_repos["exact_rms"], "ExactRMSNorm")), models)
    assert result.status == RunStatus.measured, result.reason
    assert "speedup" in result.metrics
    assert not [name for name in result.metrics if name.startswith(("op_", "predicted", "phase_s_ops"))]
    assert OPS_PLOT not in result.artifacts


def test_the_op_table_is_printed_on_the_sweeps_page_and_in_the_report(make_config, models, kernel_repos, tmp_path,
                                                                      capsys):
    result = run_job(make_config(*OP_TIMING, *WIDE_NORM_MODEL, "prompt.length=16",
                                 *local_kernel("RMSNorm", kernel_repos["exact_rms"], "ExactRMSNorm")), models)
    assert result.status == RunStatus.measured, result.reason
    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path}/ops.db", artifact_root=str(tmp_path / "artifacts"))
    out = io.StringIO()
    session = SweepSession(tracking, name="ops", total_jobs=1, console=Console(file=out, width=400))
    session.record(result)
    session.close()
    speedup = f"{result.metrics['op_speedup_RMSNorm']:.2f}x [{result.metrics['op_speedup_RMSNorm_ci_low']:.2f}, "
    predicted = f"{result.metrics['predicted_speedup']:.3f}x"
    printed = out.getvalue()
    assert "each kernelized layer alone" in printed
    assert "RMSNorm" in printed and speedup in printed and predicted in printed
    client = MlflowClient(tracking_uri=tracking.uri)
    description = client.get_run(session.sweep_id).data.tags[MLFLOW_RUN_NOTE]
    assert "#### Each kernelized layer alone" in description
    row = next(line for line in description.splitlines() if "| RMSNorm |" in line)
    assert speedup in row and predicted in row and f"[{result.name}](" in row

    [job] = client.search_runs([client.get_run(session.sweep_id).info.experiment_id], "tags.sweep_role = 'job'")
    plot = f"ops_{job.info.run_id}.png"
    assert f"report/{plot}" in {a.path for a in client.list_artifacts(session.sweep_id, "report")}
    report = Path(client.download_artifacts(session.sweep_id, "report/report.md", str(tmp_path))).read_text()
    [row] = md_tables(report)["Each kernelized layer alone"]  # the sweep's own report
    assert row["layer"] == "RMSNorm" and row["op speedup [95% CI]"].startswith(speedup)
    assert row["predicted"] == predicted and row["job"].endswith(" on cpu")
    assert f"![Each kernelized layer alone: {row['job']}]({plot})" in report
    for fmt in ("md", "html", "csv"):  # python -m sweep.report
        code, _, err = run_main(capsys, "--tracking-uri", tracking.uri, "--format", fmt, "--out", str(tmp_path / fmt))
        assert code == 0, err
        assert (tmp_path / fmt / plot).read_bytes() == result.artifacts[OPS_PLOT]
    html = (tmp_path / "html" / "report.html").read_text()
    assert "<h3>Each kernelized layer alone</h3>" in html and f'<img src="{plot}"' in html
    [exported] = pd.read_csv(tmp_path / "csv" / "ops.csv", dtype=str).to_dict("records")
    assert exported["workload"] == "prefill" and exported["layer"] == "RMSNorm"
    assert exported["op speedup [95% CI]"].startswith(speedup) and exported["predicted"] == predicted
    code, terminal, _ = run_main(capsys, "--tracking-uri", tracking.uri)
    assert code == 0 and md_tables(terminal)["Each kernelized layer alone"] == [row]


def _timed_alone(timing_mode_used: str) -> JobResult:
    """An exact RMSNorm kernel's job of timing.mode=auto on a GPU: its step's and its op's intervals include 1."""
    metrics = {"latency_ms_baseline": 2.0, "latency_ms_kernel": 2.0, "speedup": 1.0, "speedup_ci_low": 0.99,
               "speedup_ci_high": 1.01, "speedup_significant": 0.0, "op_calls_RMSNorm": 9.0,
               "op_ms_baseline_RMSNorm": 0.01, "op_ms_kernel_RMSNorm": 0.01, "op_speedup_RMSNorm": 1.0,
               "op_speedup_RMSNorm_ci_low": 0.98, "op_speedup_RMSNorm_ci_high": 1.02, "op_share_RMSNorm": 0.05,
               "predicted_speedup": 1.0, "prediction_gap": 1.0}
    return JobResult(name=f"rms timed {timing_mode_used}",
                     params={"model": "tiny-llama", "dtype": "bf16", "kernels": "rms", "prompt_len": "128",
                             "batch_size": "1", "device": "auto", "timing_mode": "auto", "workload": "prefill"},
                     metrics=metrics, tags={"gpu_name": "NVIDIA H100 80GB HBM3", "timing_mode_used": timing_mode_used,
                                            "op_bound_RMSNorm": "memory"})


@pytest.mark.parametrize("timing_mode_used", ["graph", "eager"])
def test_every_view_writes_a_speedup_alike_and_explains_the_eager_mark_only_where_it_shows_it(tmp_path,
                                                                                              timing_mode_used):
    """The step's and the op's speedups, with ~ where their interval includes 1, and (eager) where the job's CUDA
    graph could not be captured; the captions of the timing and op tables name (eager) only then."""
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "a")),
                      describe=job_description)
    sweep_id = tracker.start_sweep("auto", tags={})
    job = _timed_alone(timing_mode_used)
    logged = results_table({tracker.uri: {tracker.log_job(sweep_id, job): job}})
    console = Console(file=io.StringIO(), width=400)
    for table in sweep_tables(logged, "auto"):
        console.print(table)
    page = sweep_page(sweep_id, logged, "auto", Links(tracker.run_link, tracker.artifact_link), DESCRIPTION_LIMIT,
                      report_files(tracker.uri, tracker.experiment, sweep_id))
    report = page.artifacts["report/report.md"].decode()
    mark = " (eager)" if timing_mode_used == "eager" else ""
    views = {"terminal": (console.file.getvalue(), "1.000x [0.990, 1.010] ~"),
             "sweep page": (page.description, "1.000x [0.990, 1.010] ~"), "report": (report, "1.00x [0.99, 1.01] ~")}
    for view, (text, speedup) in views.items():
        for shown in (speedup, "1.00x [0.98, 1.02] ~"):  # the step's, the op's
            assert shown + mark in text and (mark or shown + " (" not in text), (view, shown)
    [ops_caption] = [line for line in report.splitlines() if line.startswith("*each layer timed alone")]
    intro = report.split("\n\n")[1]
    captions = {"terminal": views["terminal"][0], "sweep page": page.description, "report": ops_caption,
                "report's introduction": intro}
    for view, text in captions.items():
        assert ("timed eagerly" in " ".join(text.split())) == bool(mark), view


def test_amdahl_predicts_from_each_layers_share_and_op_speedup():
    assert predicted_speedup({"A": 0.2, "B": 0.1}, {"A": 2.0, "B": 1.0}) == pytest.approx(1 / 0.9)
    assert predicted_speedup({"A": 0.5}, {"A": 1.0}) == pytest.approx(1.0)
    assert predicted_speedup({"A": 0.7, "B": 0.4}, {"A": 2.0, "B": 2.0}) is None  # more than the whole step


def test_a_layer_that_multiplies_by_a_weight_matrix_is_compute_bound():
    config = LlamaConfig(hidden_size=32, intermediate_size=64)
    assert compute_bound(LlamaMLP(config))
    assert not compute_bound(LlamaRMSNorm(32)) and not compute_bound(SiLUActivation())


def test_the_op_table_never_shows_a_speed_of_light_above_1():
    """A compute-bound layer has none; one measured slightly above the copy (within the margin a copy allows) is
    at the limit; one below it shows its fraction."""
    layers = {"MLP": {"op_sol_MLP": 0.5}, "RMSNorm": {"op_sol_RMSNorm": 1.04}, "SiLU": {"op_sol_SiLU": 0.8}}
    metrics = {"speedup": 1.2, "predicted_speedup": 1.1, "prediction_gap": 1.2 / 1.1}
    for layer, sol in layers.items():
        metrics |= {f"op_calls_{layer}": 4.0, f"op_ms_kernel_{layer}": 0.1, f"op_speedup_{layer}": 2.0, **sol,
                    f"op_sol_baseline_{layer}": sol[f"op_sol_{layer}"] / 2}
    result = JobResult("job", {}, metrics=metrics, tags={"op_bound_MLP": "compute"})
    rows = {row["layer"]: row for row in op_frame([job_row(result)]).to_dict("records")}
    assert rows["MLP"]["SOL kernel"] == rows["MLP"]["SOL baseline"] == "compute-bound"
    assert rows["RMSNorm"]["SOL kernel"] == AT_THE_LIMIT and rows["RMSNorm"]["SOL baseline"] == "0.52"
    assert rows["SiLU"]["SOL kernel"] == "0.80" and rows["SiLU"]["kernel µs"] == "100.0"
    assert rows["MLP"]["op speedup [95% CI]"] == "2.00x [no interval]"
    assert rows["MLP"]["predicted"] == "1.100x" and rows["MLP"]["measured"] == "1.200x"
    assert rows["RMSNorm"]["predicted"] == "" and rows["RMSNorm"]["job"] == ""
