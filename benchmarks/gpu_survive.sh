#!/usr/bin/env bash
# Issue 11's GPU evidence, in one call: a sweep where the Llama-3-8B shape truly runs out of GPU memory between
# two batch sizes that fit; then GPU test kernels that allocate 1 TiB for real (in capture, in eager timing),
# raise in their forward (numerics, capture) or trigger a device-side assert (the sticky-CUDA policy).
# Stores and logs go to $OUT. Usage (see ../shared/device/README.md): bash benchmarks/gpu_survive.sh
source .gpu/env.sh || exit 1
export PYTHONPATH=src:$PYTHONPATH COLUMNS=200
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
store="tracking.uri=sqlite:///$OUT/survive.db"

echo "== 1. Llama-3-8B shape, T=2048: B=1 fits, B=64 cannot (its float32 reference logits alone are 67 GB), B=2 fits"
python3 -m sweep -m model=llama3-8b-shape prompt.length=2048 prompt.batch_size=1,64,2 dtype=bf16 kernels=both \
  kernels.source=bundled timing.budget_s=10 numerics.gen_tokens=4 "$store" > $OUT/oom8b.log 2>&1
echo "exit code $? (1: a job failed)"; tail -22 $OUT/oom8b.log

# GPU kernel repositories: an exact RMSNorm that, from its N-th call on, allocates 1 TiB, raises, or asserts.
python3 - /tmp/survive <<'PY'
import sys
import textwrap
from pathlib import Path
sys.path.insert(0, "tests")
from kernel_repos import EXACT_RMSNORM, write_kernel_repo
root = Path(sys.argv[1]); (root / "conf" / "kernels").mkdir(parents=True, exist_ok=True)
faults = {  # RMSNorm forwards: numerics 1-9 (per_layer off, no generation), graph warm-up 10-27, capture 28-36
    "a_fits": ("", 1),
    "b_oom_capture": ("torch.empty(2**40, dtype=torch.uint8, device=hidden_states.device)", 30),
    "c_raise_numerics": ("raise ValueError('kernel bug at call %d' % _calls)", 1),
    "d_raise_capture": ("raise ValueError('kernel bug at call %d' % _calls)", 30),
    "e_oom_eager_timing": ("torch.empty(2**40, dtype=torch.uint8, device=hidden_states.device)", 40),
    "f_device_assert": ("torch.zeros(1, device=hidden_states.device)[torch.tensor([3], device=hidden_states.device)].item()", 1),
    "g_fits": ("", 1),
}
for name, (fault, at_call) in faults.items():
    body = (f"global _calls\n_calls = globals().get('_calls', 0) + 1\nif _calls >= {at_call}:\n    {fault}\n"
            if fault else "") + textwrap.dedent(EXACT_RMSNORM)
    repo = write_kernel_repo(root, name, "ExactRMSNorm", body, variant="torch-cuda")
    (root / "conf" / "kernels" / f"{name}.yaml").write_text(
        f"name: {name}\nRMSNorm: {{layer_name: ExactRMSNorm, path: {repo}}}\n")
PY
common="--config-dir /tmp/survive/conf dtype=bf16 numerics.per_layer=false numerics.gen_tokens=0 timing.budget_s=3"
echo "== 2. graph timing: fits, OOM in capture, raise in numerics, raise in capture, fits"
python3 -m sweep -m $common kernels=a_fits,b_oom_capture,c_raise_numerics,d_raise_capture,g_fits "$store" \
  > $OUT/kernels-graph.log 2>&1; echo "exit code $?"; tail -16 $OUT/kernels-graph.log
echo "== 3. eager timing: fits, OOM in timing, fits"
python3 -m sweep -m $common timing.mode=eager kernels=a_fits,e_oom_eager_timing,g_fits "$store" \
  > $OUT/kernels-eager.log 2>&1; echo "exit code $?"; tail -12 $OUT/kernels-eager.log
echo "== 4. sticky CUDA error: fits, device-side assert, then every later job 'CUDA context lost'"
python3 -m sweep -m $common kernels=a_fits,f_device_assert,g_fits "$store" > $OUT/kernels-sticky.log 2>&1
echo "exit code $?"; tail -12 $OUT/kernels-sticky.log

python3 - "$OUT/survive.db" <<'PY'
import sys
from mlflow.tracking import MlflowClient
client = MlflowClient(tracking_uri=f"sqlite:///{sys.argv[1]}")
exp = client.get_experiment_by_name("kernel-sweep")
runs = client.search_runs([exp.experiment_id], "tags.sweep_role = 'job'", order_by=["attributes.start_time ASC"])
print(f"{len(runs)} job runs in the store; parents:",
      [r.info.status for r in client.search_runs([exp.experiment_id], "tags.sweep_role = 'parent'")])
for run in runs:
    t, m = run.data.tags, run.data.metrics
    phases = {k.removeprefix("phase_s_"): round(v, 2) for k, v in m.items() if k.startswith("phase_s_")}
    print(f"{run.info.run_name:40} {t['run_status']:8} {t.get('failure_kind', ''):17} {t['status_reason'][:150]}")
    print(f"{'':40} phases {phases} peak_mem_mb={m.get('peak_mem_mb', '-')} speedup={m.get('speedup', '-')}")
PY
