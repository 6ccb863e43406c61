#!/usr/bin/env bash
# Everything the issues ask of the lent GPU, in one call: GPU tests, the mission sweep (wall time), the
# accuracy sweep, the 8B-shape run. Stores and logs go to $OUT. Usage: bash benchmarks/gpu_check.sh [store-name]
source .gpu/env.sh || exit 1
export PYTHONPATH=src:$PYTHONPATH COLUMNS=200
store=${1:-gpu}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -3
start=$(date +%s%N)
python3 -m sweep -m dtype=bf16,fp32 kernels=rms,silu,both tracking.uri=sqlite:///$OUT/$store.db > $OUT/mission.log 2>&1
echo "mission sweep wall: $(( ($(date +%s%N) - start) / 1000000 )) ms (process start to summary table)"
tail -25 $OUT/mission.log
python3 -m sweep -m dtype=bf16,fp16,fp32 kernels=rms,silu prompt.length=118,8192 \
  tracking.uri=sqlite:///$OUT/$store.db > $OUT/accuracy.log 2>&1
tail -36 $OUT/accuracy.log
python3 -m sweep model=llama3-8b-shape prompt.length=2048 dtype=bf16 kernels=both timing.budget_s=30 \
  tracking.uri=sqlite:///$OUT/$store.db > $OUT/llama8b.log 2>&1
tail -14 $OUT/llama8b.log
python3 - "$OUT/$store.db" <<'PY'
import sys
from mlflow.tracking import MlflowClient
client = MlflowClient(tracking_uri=f"sqlite:///{sys.argv[1]}")
exp = client.get_experiment_by_name("kernel-sweep")
for run in client.search_runs([exp.experiment_id], "tags.sweep_role = 'job' and params.model = 'llama3-8b-shape'"):
    m = run.data.metrics
    print(run.info.run_name, {k: round(m[k], 4) for k in ("peak_mem_mb", "speedup", "gpu_ms_baseline", "job_wall_s") if k in m})
PY
