#!/usr/bin/env bash
# Everything sweep asks of a lent GPU, in one call; stores and logs go to $OUT (the device tool brings it back).
#   bash benchmarks/gpu.sh [section ...]      sections: env tests mission accuracy llama8b precision oom
# With no section, all run in that order. Set STORE to name the sqlite store ($OUT/$STORE.db, default gpu).
set -uo pipefail
source .gpu/env.sh || exit 1
export PYTHONPATH=src:$PYTHONPATH COLUMNS=200
store="sqlite:///$OUT/${STORE:-gpu}.db"

env_info() {
    nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, transformers, kernels; print('torch', torch.__version__, 'transformers', transformers.__version__, 'kernels', kernels.__version__)"
}

tests() { python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -3; }

mission() {  # the original report's table; wall time from process start to the summary table
    local start=$(date +%s%N)
    python3 -m sweep -m dtype=bf16,fp32 kernels=rms,silu,both tracking.uri=$store > $OUT/mission.log 2>&1
    echo "mission sweep wall: $(( ($(date +%s%N) - start) / 1000000 )) ms (process start to summary table)"
    grep -A12 "^ *sweep " $OUT/mission.log | head -14
}

accuracy() {
    python3 -m sweep -m dtype=bf16,fp16,fp32 kernels=rms,silu prompt.length=118,8192 tracking.uri=$store \
        > $OUT/accuracy.log 2>&1
    tail -36 $OUT/accuracy.log
}

llama8b() {
    python3 -m sweep model=llama3-8b-shape prompt.length=2048 dtype=bf16 kernels=both timing.mode=both \
        tracking.uri=$store > $OUT/llama8b.log 2>&1
    grep -B2 -A6 "baseline ms" $OUT/llama8b.log | head -9
}

precision() { python3 benchmarks/timing_precision.py --lengths 118 8192 2>&1 | tail -9; }

oom() {  # a combination that cannot fit between two that do: the sweep goes on and the next job measures
    python3 -m sweep -m model=llama3-8b-shape,tiny-llama prompt.batch_size=1,48 prompt.length=2048 kernels=rms \
        timing.budget_s=5 tracking.uri=$store > $OUT/oom.log 2>&1  # the 8B shape at batch 48 cannot fit
    echo "oom sweep exit code: $?"
    tail -16 $OUT/oom.log
}

sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(env tests mission accuracy llama8b precision oom)
for section in "${sections[@]}"; do
    echo "== $section"
    case $section in env) env_info ;; *) "$section" ;; esac
done
