"""How precise is each way of timing a kernel's speedup? (CUDA only.)

On the tiny model with the bundled Liger RMSNorm, in one process, repeats three methods `--repeats` times and
prints the spread (max - min) of the speedup each gives, and the seconds of timing each spent:
  1. one eager forward per side, unpaired (how the original report was made);
  2. 100 eager forwards per side, unpaired mean with a CI (how `kernels benchmark` does it);
  3. this harness: paired rounds of CUDA-graph replays, adaptive (sweep.timing).

    python benchmarks/timing_precision.py --lengths 118 8192
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from hydra import compose, initialize_config_dir

from sweep.__main__ import CONFIG_DIR
from sweep.config import kernel_selection, register_configs
from sweep.kernelization import KernelSwitch, resolve_kernel
from sweep.models import load_model, torch_dtype
from sweep.numerics import forward_logits
from sweep.prompts import prompt_inputs
from sweep.timing import GraphRunner, timed_rounds


def eager_ms(forward: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    forward()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def single_forward(base: Callable[[], object], kern: Callable[[], object]) -> float:
    return eager_ms(base) / eager_ms(kern)


def hundred_forwards(base: Callable[[], object], kern: Callable[[], object]) -> float:
    base_ms = [eager_ms(base) for _ in range(100)]
    kern_ms = [eager_ms(kern) for _ in range(100)]
    return statistics.mean(base_ms) / statistics.mean(kern_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[118, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="bf16")
    args = parser.parse_args()
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

    rows = []
    for length in args.lengths:
        cfg.prompt.length = length
        inputs = prompt_inputs(loaded.tokenizer, cfg.prompt, cfg.timing.input_sets, device)

        def base() -> object:
            return forward_logits(model, inputs[0])

        def kern() -> object:
            with switch.active():
                return forward_logits(model, inputs[0])

        for _ in range(3):  # warm-up: Triton compilation, cuBLAS heuristics
            base(), kern()

        def harness() -> float:
            baseline = GraphRunner(lambda ids: forward_logits(model, ids), inputs)

            def kernel_forward(ids: torch.Tensor) -> torch.Tensor:
                with switch.active():
                    return forward_logits(model, ids)

            kernel = GraphRunner(kernel_forward, inputs)
            rounds = timed_rounds(baseline, kernel, len(inputs), cfg.timing, device)
            assert rounds.estimate is not None
            return rounds.estimate.speedup

        methods: dict[str, Callable[[], float]] = {
            "1 eager forward/side, unpaired": lambda: single_forward(base, kern),
            "100 eager forwards/side, unpaired": lambda: hundred_forwards(base, kern),
            "sweep: paired graph rounds, adaptive": harness,
        }
        for method, measure in methods.items():
            speedups, seconds = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                speedups.append(measure())
                seconds.append(time.perf_counter() - start)
            spread = (max(speedups) - min(speedups)) / statistics.mean(speedups) * 100
            rows.append((length, method, statistics.mean(speedups), spread, sum(seconds)))

    print(f"\n| T | method | mean speedup | spread of {args.repeats} (max-min, % of mean) | seconds spent |")
    print("|---|---|---|---|---|")
    for length, method, mean, spread, seconds in rows:
        print(f"| {length} | {method} | {mean:.3f}x | {spread:.2f}% | {seconds:.1f} |")


if __name__ == "__main__":
    main()
