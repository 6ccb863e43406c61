#!/usr/bin/env bash
# Issue 3's evidence on the lent GPU: timing precision of three methods, the mission sweep's wall time,
# and the Llama-3-8B-shape run's peak memory. Usage: bash benchmarks/gpu_timing.sh [store-name]
source .gpu/env.sh || exit 1
export PYTHONPATH=src:$PYTHONPATH COLUMNS=200
store=${1:-gpu}
nvidia-smi --query-gpu=name --format=csv,noheader
start=$(date +%s%N)
python3 -m sweep -m dtype=bf16,fp32 kernels=rms,silu,both tracking.uri=sqlite:///$OUT/$store.db > $OUT/mission.log 2>&1
echo "mission sweep wall: $(( ($(date +%s%N) - start) / 1000000 )) ms (process start to summary table)"
grep -A12 "^ *sweep " $OUT/mission.log | head -14
python3 -m sweep model=llama3-8b-shape prompt.length=2048 dtype=bf16 kernels=both timing.mode=both \
  tracking.uri=sqlite:///$OUT/$store.db > $OUT/llama8b.log 2>&1
grep -B2 -A6 "baseline ms" $OUT/llama8b.log | head -9
python3 benchmarks/timing_precision.py --lengths 118 8192 2>&1 | tail -9
python3 - "$OUT/$store.db" <<'PY'
import sys
from mlflow.tracking import MlflowClient
client = MlflowClient(tracking_uri=f"sqlite:///{sys.argv[1]}")
exp = client.get_experiment_by_name("kernel-sweep")
for run in client.search_runs([exp.experiment_id], "tags.sweep_role = 'job'"):
    m, t = run.data.metrics, run.data.tags
    keys = ("peak_mem_mb", "speedup", "gpu_ms_baseline", "eager_ms_baseline", "launch_overhead", "graph_replay_rel_err",
            "timing_rounds", "job_wall_s")
    print(run.info.run_name, {k: round(m[k], 4) for k in keys if k in m}, t.get("timing_note", ""))
PY
