"""How precise is each way of timing a kernel's speedup, and do its intervals hold from one run to the next?
(CUDA only.)

On the tiny model with the bundled Liger RMSNorm, in one process, repeats three methods `--repeats` times and
prints, per method: the speedups summarised (median, min and max), the coverage (how many of the repeats'
intervals contain the median of all repeats), the spread (max - min) of the first 5 speedups and the seconds of
timing each spent:
  1. one eager forward per side, unpaired (how the original report was made; no interval);
  2. 100 eager forwards per side, unpaired, with a Welch t interval on the log times (how `kernels benchmark`
     does it);
  3. this harness: paired rounds of CUDA-graph replays in a fixed number of blocks of fresh captures
     (sweep.timing, default settings).

    python benchmarks/timing_precision.py --lengths 118 8192 --repeats 20

With `--between-jobs`, only the sweep's method, and each repeat starts as a sweep's job does, after other work: one
8192-token forward of each side, then 1 s with the GPU idle (another job's timing, then this job's untimed
numerics). Its repeats then scatter more than back to back: that is what `timing.rerun_sd` covers.

With `--store URI` it reads a sweep's job runs instead and prints the same columns for them, per prompt length
(`timing_s` as the seconds), e.g. after
`python -m sweep -m 'seed=range(20)' kernels=rms prompt.length=118,8192 numerics.gen_tokens=0 numerics.per_layer=false`,
and writes the `timing.rerun_sd` their repeats show to the store, per GPU model and workload, as such a sweep
does at its end (docs/timing.md): later sweeps' jobs add it to their intervals.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from scipy import stats

from sweep.__main__ import CONFIG_DIR
from sweep.config import TrackingConfig, kernel_selection
from sweep.measure.kernelization import KernelSwitch, resolve_kernel
from sweep.measure.models import load_model, torch_dtype
from sweep.measure.numerics import forward_logits
from sweep.measure.prompts import prompt_inputs
from sweep.measure.timing import GraphPlacement, GraphRunner, timed_rounds
from sweep.run.registration import register_configs
from sweep.store.calibration import write_rerun_sd
from sweep.store.tracking import job_result
from sweep.views.repeats import estimate_note, rerun_sd_estimates
from sweep.views.table import results_table

Side = tuple[Callable[[], None], Callable[[], object]]  # (select the side, untimed; its forward, timed)


def eager_ms(side: Side) -> float:
    select, forward = side
    select()
    torch.cuda.synchronize()
    start = time.perf_counter()
    forward()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


Estimate = tuple[float, float | None, float | None]  # speedup, interval low, interval high


def other_work(model: torch.nn.Module, switch: KernelSwitch, heavy: torch.Tensor) -> None:
    """What a sweep's job follows: another job's forwards of a long prompt, then the GPU idle during this job's
    untimed numerics."""
    for kernels_on in (False, True):
        switch.select(kernels_on)
        forward_logits(model, heavy)
    torch.cuda.synchronize()
    time.sleep(1.0)


def single_forward(base: Side, kern: Side) -> Estimate:
    return eager_ms(base) / eager_ms(kern), None, None


def hundred_forwards(base: Side, kern: Side) -> Estimate:
    base_log = np.log([eager_ms(base) for _ in range(100)])
    kern_log = np.log([eager_ms(kern) for _ in range(100)])
    interval = stats.ttest_ind(base_log, kern_log, equal_var=False).confidence_interval(0.95)
    return float(np.exp(base_log.mean() - kern_log.mean())), float(np.exp(interval.low)), float(np.exp(interval.high))


def summary_row(estimates: list[Estimate], timing_s: list[float]) -> str:
    """The table's columns after T and method: the speedups summarised (median [min, max], their range in % of the
    median), the intervals containing the median, the spread of the first 5 (% of their mean), mean seconds."""
    speedups = [e[0] for e in estimates]
    median = statistics.median(speedups)
    first = speedups[:5]
    spread = (max(first) - min(first)) / statistics.mean(first) * 100
    scatter = (max(speedups) - min(speedups)) / median * 100
    intervals = [(low, high) for _, low, high in estimates if low is not None and high is not None]
    covered = f"{sum(low <= median <= high for low, high in intervals)}/{len(intervals)}" if intervals else "-"
    return (f"{len(speedups)} | {median:.4f}x [{min(speedups):.4f}, {max(speedups):.4f}] ({scatter:.2f}%) | "
            f"{covered} | {spread:.2f}% | {statistics.mean(timing_s):.2f}")


def print_table(rows: list[tuple[str, str, str]]) -> None:
    print("\n| T | method | jobs | speedups: median [min, max] (range) | intervals containing the median "
          "| spread of first 5 | mean timing seconds |")
    print("|---|---|---|---|---|---|---|")
    for length, method, columns in rows:
        print(f"| {length} | {method} | {columns} |")


def from_store(uri: str, label: str) -> None:
    """The same columns for a sweep's measured job runs, one row per prompt length (`label` names the method),
    and the `timing.rerun_sd` their repeats show, written to the store for later sweeps as a sweep's are."""
    tracking = TrackingConfig(uri=uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(tracking.experiment)
    runs = client.search_runs([experiment.experiment_id],
                              "tags.sweep_role = 'job' and tags.run_status = 'measured' and params.kernels != 'none'",
                              max_results=5000, order_by=["attributes.start_time ASC"])
    by_length: dict[str, list] = {}
    for run in runs:
        by_length.setdefault(run.data.params["prompt_len"], []).append(run.data.metrics)
    rows = []
    for length, metrics in sorted(by_length.items(), key=lambda item: int(item[0])):
        estimates = [(m["speedup"], m["speedup_ci_low"], m["speedup_ci_high"]) for m in metrics]
        rows.append((length, label, summary_row(estimates, [m["timing_s"] for m in metrics])))
    print_table(rows)
    for estimate in rerun_sd_estimates(results_table({uri: {run.info.run_id: job_result(run) for run in runs}})):
        write_rerun_sd(client, tracking, estimate)
        print(estimate_note(estimate))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[118, 8192])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--store", help="summarise a sweep's job runs in this MLflow store instead")
    parser.add_argument("--label", default="sweep jobs", help="the method's name in the table (with --store)")
    parser.add_argument("--between-jobs", action="store_true",
                        help="the sweep's method only, each repeat after an 8192-token forward of each side and 1 s idle")
    args = parser.parse_args()
    if args.store:
        from_store(args.store, args.label)
        return
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=[f"dtype={args.dtype}", "kernels=rms", "kernels.source=bundled"])
    device = torch.device("cuda")
    loaded = load_model(cfg.model, torch_dtype(cfg.dtype.torch_dtype), device)
    model = loaded.model
    selection = kernel_selection(cfg.kernels)
    kernels = [resolve_kernel(layer, spec, selection.source) for layer, spec in selection.specs.items()]
    switch = KernelSwitch.apply(model, kernels, device)
    print(f"kernelized: {switch.replaced}  gpu: {torch.cuda.get_device_name()}")

    between = ""
    if args.between_jobs:
        heavy = prompt_inputs(loaded.tokenizer, OmegaConf.merge(cfg.prompt, {"length": 8192}), 1, device)[0]
        between = ", after other work"
    rows = []
    for length in args.lengths:
        cfg.prompt.length = length
        inputs = prompt_inputs(loaded.tokenizer, cfg.prompt, cfg.timing.input_sets, device)

        base: Side = (lambda: switch.select(False), lambda: forward_logits(model, inputs[0]))
        kern: Side = (lambda: switch.select(True), lambda: forward_logits(model, inputs[0]))
        for _ in range(3):  # warm-up: Triton compilation, cuBLAS heuristics
            eager_ms(base), eager_ms(kern)

        def harness() -> Estimate:
            forward = lambda ids: forward_logits(model, ids)  # noqa: E731
            placement = GraphPlacement(sides=2)  # as the sweep's jobs do
            baseline = GraphRunner(forward, inputs, lambda: switch.select(False), placement, side="baseline")
            kernel = GraphRunner(forward, inputs, lambda: switch.select(True), placement, side="kernel")
            seed = len(timed)  # as `seed=range(N)` gives each job its own order of the sides
            rounds = timed_rounds(baseline, kernel, len(inputs), cfg.timing, device, seed)
            assert rounds.estimate is not None
            timed.append(rounds.seconds)
            return rounds.estimate.speedup, rounds.estimate.low, rounds.estimate.high

        methods: dict[str, Callable[[], Estimate]] = {
            "1 eager forward/side, unpaired": lambda: single_forward(base, kern),
            "100 eager forwards/side, unpaired": lambda: hundred_forwards(base, kern),
            "sweep: paired graph rounds in blocks of fresh captures": harness,
        }
        if args.between_jobs:
            methods = {name: measure for name, measure in methods.items() if measure is harness}
        for method, measure in methods.items():
            estimates, seconds, timed = [], [], []
            for _ in range(args.repeats):
                if args.between_jobs:
                    other_work(model, switch, heavy)
                start = time.perf_counter()
                estimates.append(measure())
                seconds.append(time.perf_counter() - start)
            rows.append((length, method + between, summary_row(estimates, timed or seconds)))
    print_table(rows)


if __name__ == "__main__":
    main()
