"""Where a kernel's difference comes from, and whether it matters: per-layer attribution and generation."""

from __future__ import annotations

import csv
import io
import math
import sys

import pytest
import torch
from conftest import SHORT_PROMPT, local_kernel
from mlflow.tracking import MlflowClient

from sweep.config import TrackingConfig
from sweep.measure.forensics import distribution_metrics, generation_agreement
from sweep.measure.numerics import compare_outputs, ulp_distance
from sweep.records.results import JobResult, RunStatus
from sweep.run.job import run_job
from sweep.store.tracking import Tracker
from sweep.views.summary import format_number as summary_number
from sweep.views.summary import job_description


def _rows(result) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(result.artifacts["layers/layers.csv"])))


def test_different_rmsnorm_is_attributed_to_the_rmsnorms_not_the_silus(make_config, models, kernel_repos):
    cfg = make_config("dtype=bf16", "kernels=none", *SHORT_PROMPT,
                      *local_kernel("RMSNorm", kernel_repos["low_rms"], "LowRMSNorm"),
                      *local_kernel("SiLU", kernel_repos["exact_silu"], "ExactSilu"))
    result = run_job(cfg, models)
    assert result.status == RunStatus.measured, result.reason
    rows = _rows(result)
    assert len(rows) == 13 and [int(r["index"]) for r in rows] == list(range(13))
    rms = [r for r in rows if r["layer"] == "RMSNorm"]
    silu = [r for r in rows if r["layer"] == "SiLU"]
    assert len(rms) == 9 and len(silu) == 4
    assert rms[0]["name"] == "model.layers.0.input_layernorm" and rms[-1]["name"] == "model.norm"
    assert sum(float(r["err_ratio"]) > 1.0 for r in rms) >= 7  # low-precision arithmetic: worse than eager
    assert all(float(r["err_ratio"]) == 1.0 for r in silu)  # exact: same error as eager on the same input
    assert float(rms[0]["propagated_max_diff"]) > 0
    assert result.metrics["first_divergent_layer"] == 0
    assert result.metrics["layer_err_ratio_max"] == max(float(r["err_ratio"]) for r in rows)
    assert result.artifacts["layers/layers.png"][:8] == b"\x89PNG\r\n\x1a\n"


def test_exact_kernels_give_zero_everywhere(make_config, models, kernel_repos):
    cfg = make_config("dtype=bf16", "kernels=none", *SHORT_PROMPT,
                      *local_kernel("RMSNorm", kernel_repos["exact_rms"], "ExactRMSNorm"),
                      *local_kernel("SiLU", kernel_repos["exact_silu"], "ExactSilu"))
    result = run_job(cfg, models)
    assert result.status == RunStatus.measured, result.reason
    assert all(float(r["propagated_max_diff"]) == 0.0 and float(r["err_ratio"]) == 1.0 for r in _rows(result))
    metrics = result.metrics
    assert metrics["first_divergent_layer"] == -1 and metrics["layer_err_ratio_max"] == 1.0
    assert metrics["max_abs_diff"] == 0.0 and metrics["max_abs_diff_ulp"] == 0.0
    assert metrics["gen_match"] == 1.0 and metrics["gen_first_divergence"] == -1
    assert metrics["kl_div"] == 0.0 and metrics["top5_overlap"] == 1.0


def test_layer_table_and_plot_land_in_mlflow(make_config, models, kernel_repos, tmp_path):
    cfg = make_config("dtype=bf16", "kernels=none", *SHORT_PROMPT,
                      *local_kernel("RMSNorm", kernel_repos["low_rms"], "LowRMSNorm"))
    result = run_job(cfg, models)
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/m.db", artifact_root=str(tmp_path / "art")),
                      describe=job_description)
    run_id = tracker.log_job(tracker.start_sweep("t", {}), result)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    assert {a.path for a in client.list_artifacts(run_id, "layers")} == {"layers/layers.csv", "layers/layers.png"}
    png = client.download_artifacts(run_id, "layers/layers.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    stored = client.get_run(run_id).data.metrics
    names = ("layer_err_ratio_max", "first_divergent_layer", "gen_match", "gen_first_divergence", "kl_div",
             "top5_overlap", "max_abs_diff_ulp", "max_abs_diff", "err_ratio")
    assert {name: stored[name] for name in names} == {name: result.metrics[name] for name in names}
    rows = list(csv.DictReader(io.StringIO(open(client.download_artifacts(run_id, "layers/layers.csv",
                                                                          str(tmp_path))).read())))
    assert stored["layer_err_ratio_max"] == max(float(r["err_ratio"]) for r in rows) > 1.0
    assert stored["first_divergent_layer"] == 0 and float(rows[0]["propagated_max_diff"]) > 0
    assert 0.0 <= stored["gen_match"] <= 1.0 and 0.0 <= stored["top5_overlap"] <= 1.0 and stored["kl_div"] > 0


def test_infinite_ratio_is_stored_as_mlflows_inf_and_named_in_a_tag(tmp_path):
    result = JobResult(name="inf", params={}, metrics={"err_ratio": math.inf, "kl_div": math.nan, "speedup": 1.5})
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/m.db", artifact_root=str(tmp_path / "art")),
                      describe=job_description)
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/m.db").get_run(
        tracker.log_job(tracker.start_sweep("t", {}), result))
    assert run.data.metrics["err_ratio"] == sys.float_info.max  # MLflow's stand-in for +inf
    assert run.data.tags["infinite_metrics"] == "err_ratio" and run.data.tags["nan_metrics"] == "kl_div"
    assert "kl_div" not in run.data.metrics
    assert summary_number(run.data.metrics["err_ratio"], ".3f") == "∞"
    assert summary_number(math.inf, ".3f") == "∞" and summary_number(1.25, ".3f") == "1.250"


def test_generation_agreement_on_known_sequences():
    same = torch.tensor([[5, 6, 7, 8]])
    assert generation_agreement(same, same.clone()) == {"gen_match": 1.0, "gen_first_divergence": -1.0}
    assert generation_agreement(same, torch.tensor([[5, 6, 9, 8]])) == {"gen_match": 0.75,
                                                                         "gen_first_divergence": 2.0}


def test_distribution_metrics_on_a_known_pair():
    baseline = torch.tensor([[[0.0, 0.0, -50.0, -50.0, -50.0, -50.0]]])
    kernel = torch.tensor([[[math.log(3.0), 0.0, -50.0, -50.0, -50.0, -60.0]]])
    expected_kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    metrics = distribution_metrics(baseline, kernel)
    assert metrics["kl_div"] == pytest.approx(expected_kl, rel=1e-6)
    assert metrics["top5_overlap"] == pytest.approx(4 / 5)  # index 5 leaves the kernel's top 5


@pytest.mark.parametrize(("diff", "magnitude", "dtype", "ulps"), [
    (0.125, 20.0, torch.bfloat16, 1.0), (0.0625, 8.0, torch.bfloat16, 1.0), (2.0**-10, 1.5, torch.float16, 1.0),
    (2.0**-21, 3.0, torch.float32, 2.0),
])
def test_ulp_distance(diff, magnitude, dtype, ulps):
    assert float(ulp_distance(torch.tensor(diff), torch.tensor(magnitude), dtype)) == ulps


def test_max_ulp_is_the_worst_element_at_its_own_magnitude_not_at_the_largest_difference():
    # The same |diff| (0.125) at a logit of 20 is one bf16 step; at a logit of 12, two steps.
    baseline = torch.tensor([20.0, 12.0, -3.0], dtype=torch.bfloat16)
    kernel = torch.tensor([20.125, 12.125, -3.0], dtype=torch.bfloat16)
    reference = baseline.double()
    metrics = compare_outputs(baseline, kernel, reference)
    assert metrics["max_abs_diff"] == 0.125
    assert metrics["max_abs_diff_ulp"] == 2.0


def test_ulp_of_a_logit_near_zero_counts_at_the_logits_usual_magnitude():
    """A logit of 2^-100 has a spacing of 2^-107 in bf16, but it is a sum of terms of the logits' usual size and
    was rounded at that size: a difference of 2^-8 there is a small fraction of a step at the logits' root mean
    square (about 13 here, a step of 2^-4), not 2^99 steps (the GPU run showed ~1e38)."""
    baseline = torch.tensor([20.0, -10.0, 2.0**-100], dtype=torch.bfloat16)
    kernel = torch.tensor([20.0, -10.0, 2.0**-100 + 2.0**-8], dtype=torch.bfloat16)
    metrics = compare_outputs(baseline, kernel, baseline.double())
    assert metrics["max_abs_diff_ulp"] == pytest.approx(2.0**-8 / 2.0**-4)


def test_float64_reference_does_not_fall_back_to_float32_inside_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from sweep.measure.numerics import KeepPrecision

    norm = LlamaRMSNorm(64).double()
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(4, 64, dtype=torch.float64)
    exact = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))
    with KeepPrecision(torch.float64):
        kept = norm(x)
    assert torch.equal(kept, exact)
    assert not torch.equal(norm(x), exact)  # transformers normalises in float32 on its own
