"""Experiment: is the between-job excess at 118 tokens the side order (seed) or the work between jobs?"""
import math, random, statistics, sys, time
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from sweep.__main__ import CONFIG_DIR
from sweep.config import kernel_selection, register_configs
from sweep.kernelization import KernelSwitch, resolve_kernel
from sweep.models import load_model, torch_dtype
from sweep.numerics import forward_logits
from sweep.prompts import prompt_inputs
from sweep.timing import GraphPlacement, GraphRunner, timed_rounds

register_configs()
with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
    cfg = compose("config", overrides=["dtype=bf16", "kernels=rms", "kernels.source=bundled"])
device = torch.device("cuda")
loaded = load_model(cfg.model, torch_dtype(cfg.dtype.torch_dtype), device)
model = loaded.model
sel = kernel_selection(cfg.kernels)
switch = KernelSwitch.apply(model, [resolve_kernel(l, s, sel.source) for l, s in sel.specs.items()], device)

def orders(seed, blocks, rounds_per_block):
    rng = random.Random(seed); first = []
    for b in range(blocks):
        if b > 0: rng.sample(range(2), 2)
        for _ in range(rounds_per_block):
            o = [0, 1]; rng.shuffle(o); first.append(o[0])
    return first

def run(length, seed, disturb):
    cfg.prompt.length = length
    inputs = prompt_inputs(loaded.tokenizer, cfg.prompt, cfg.timing.input_sets, device)
    fwd = lambda ids: forward_logits(model, ids)
    pl = GraphPlacement(sides=2)
    b = GraphRunner(fwd, inputs, lambda: switch.select(False), pl)
    k = GraphRunner(fwd, inputs, lambda: switch.select(True), pl)
    r = timed_rounds(b, k, len(inputs), cfg.timing, device, seed)
    del b, k
    lr = np.log(np.array(r.baseline_ms) / np.array(r.kernel_ms))
    blocks = np.array(r.blocks); nb = blocks.max() + 1; rpb = len(lr) // nb
    first = np.array(orders(seed, nb, rpb))
    strat = 0.5 * (lr[first == 0].mean() + lr[first == 1].mean())
    if disturb:
        cfg.prompt.length = 8192
        big = prompt_inputs(loaded.tokenizer, cfg.prompt, 1, device)[0]
        switch.select(True); forward_logits(model, big); switch.select(False); forward_logits(model, big)
        torch.cuda.synchronize(); torch.cuda.empty_cache(); time.sleep(1.0)
    return math.exp(lr.mean()), math.exp(strat), lr[first == 0].mean() - lr[first == 1].mean(), r.estimate.low, r.estimate.high

for length in (118,):
    for name, seeds, disturb in (("seeds vary", range(20), False), ("seed 0", [0] * 20, False),
                                 ("seeds vary, 8192 fwd + 1 s idle between", range(20), True)):
        rows = [run(length, s, disturb) for s in seeds]
        raw = [x[0] for x in rows]; st = [x[1] for x in rows]; od = [x[2] for x in rows]
        med = statistics.median(raw)
        cov = sum(lo <= med <= hi for *_, lo, hi in rows)
        sd = lambda v: statistics.stdev(np.log(v)) * 100
        print(f"T={length} {name}: raw sd {sd(raw):.3f}% range {100*(max(raw)-min(raw))/min(raw):.2f}% first5 {100*(max(raw[:5])-min(raw[:5]))/min(raw[:5]):.2f}% cov {cov}/20 | "
              f"order-stratified sd {sd(st):.3f}% range {100*(max(st)-min(st))/min(st):.2f}% | order effect (base-first minus kernel-first, log) mean {100*np.mean(od):.3f}% sd {100*np.std(od):.3f}%", flush=True)
