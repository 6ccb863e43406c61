"""Session 5: what the first job's generation and inputs cost on a fresh process (bf16 tiny-llama, no kernels)."""
import time
import torch
from hydra import compose, initialize_config_dir
from sweep.__main__ import CONFIG_DIR
from sweep.forensics import greedy_tokens
from sweep.models import load_model
from sweep.numerics import forward_logits
from sweep.prompts import prompt_inputs

def timed(label, fn):
    torch.cuda.synchronize(); t = time.perf_counter(); out = fn(); torch.cuda.synchronize()
    print(f"{label}: {time.perf_counter() - t:.3f} s", flush=True); return out

with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
    cfg = compose("config")
torch.ones(1, device="cuda")
loaded = timed("load bf16", lambda: load_model(cfg.model, torch.bfloat16, torch.device("cuda")))
ids = timed("prompt_inputs (1st)", lambda: prompt_inputs(loaded.tokenizer, cfg.prompt, 3, torch.device("cuda")))
timed("prompt_inputs (2nd)", lambda: prompt_inputs(loaded.tokenizer, cfg.prompt, 3, torch.device("cuda")))
for k in range(2):
    timed(f"forward T=118 ({k + 1})", lambda: forward_logits(loaded.model, ids[0]))
for k in range(3):
    timed(f"greedy_tokens 32 ({k + 1})", lambda: greedy_tokens(loaded.model, ids[0], 32))
timed("load fp32 (cached draw)", lambda: load_model(cfg.model, torch.float32, torch.device("cuda")))
