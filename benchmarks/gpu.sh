#!/usr/bin/env bash
# Everything sweep asks of a lent GPU, in one call; stores and logs go to $OUT (the device tool brings it back).
#   bash benchmarks/gpu.sh [section ...]
#   sections: env mission install tests accuracy llama8b coverage precision oom workloads workloads8b
# With no section, all run in that order. Set STORE to name the sqlite store ($OUT/$STORE.db, default gpu).
set -uo pipefail
source .gpu/env.sh || exit 1
export PYTHONPATH=src:$PYTHONPATH COLUMNS=200
store="sqlite:///$OUT/${STORE:-gpu}.db"

env_info() {
    nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, transformers, kernels; print('torch', torch.__version__, 'transformers', transformers.__version__, 'kernels', kernels.__version__)"
}

install() {  # the README's install command, as far as a machine without a network allows
    python3 -m pip install -e . --no-index --find-links .whl 2>&1 | tail -3
    python3 -m pip install -q -e . --no-deps --no-index --no-build-isolation 2>&1 | tail -3
    PYTHONPATH=/tmp/site python3 -m sweep 2>&1 | tail -12  # the README's run command (python is python3 there)
}

tests() { python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -3; }

mission() {  # the original report's table; wall time from process start to the summary table, bytecode compiled
    python3 -m compileall -q -j 16 /tmp/site src
    for run in first-on-this-machine cold-triton-cache; do
        rm -rf ~/.triton/cache
        local start=$(date +%s%N)
        python3 -m sweep -m dtype=bf16,fp32 kernels=rms,silu,both tracking.uri=$store > $OUT/mission-$run.log 2>&1
        echo "mission sweep wall ($run): $(( ($(date +%s%N) - start) / 1000000 )) ms (process start to summary table)"
    done
    grep -A12 "^ *sweep " $OUT/mission-cold-triton-cache.log | head -14
}

coverage() {  # the same combination as 20 jobs: do the intervals hold from one job to the next?
    python3 -m sweep -m 'seed=range(20)' kernels=rms prompt.length=118,8192 numerics.gen_tokens=0 \
        numerics.per_layer=false tracking.uri=sqlite:///$OUT/coverage.db > $OUT/coverage.log 2>&1
    python3 benchmarks/timing_precision.py --store sqlite:///$OUT/coverage.db
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

precision() { python3 benchmarks/timing_precision.py --lengths 118 8192 --repeats 10 2>&1 | tail -9; }

oom() {  # a combination that cannot fit between two that do: the sweep goes on and the next job measures
    python3 -m sweep -m model=llama3-8b-shape,tiny-llama prompt.batch_size=1,48 prompt.length=2048 kernels=rms \
        timing.budget_s=5 tracking.uri=$store > $OUT/oom.log 2>&1  # the 8B shape at batch 48 cannot fit
    echo "oom sweep exit code: $?"
    tail -16 $OUT/oom.log
}

workloads() {  # decode at 118, 2048 and 8192 positions (8191 cached + 1), train at T=512 and 2048 with batch 8
    python3 -m sweep -m workload=decode dtype=bf16 kernels=rms,silu,both prompt.length=118,2048,8191 \
        tracking.uri=$store > $OUT/decode.log 2>&1
    python3 -m sweep -m workload=train dtype=bf16 kernels=rms,silu,both prompt.length=512,2048 prompt.batch_size=8 \
        tracking.uri=$store > $OUT/train.log 2>&1
    tail -40 $OUT/decode.log $OUT/train.log
    python3 -m sweep.report --tracking-uri $store --filter "params.workload != 'prefill'" --out $OUT/report-workloads
}

workloads8b() {  # the Llama-3-8B shape on one GPU; train timed eagerly: two graphs of an 8B step do not fit in 80 GB
    python3 -m sweep -m model=llama3-8b-shape workload=decode dtype=bf16 kernels=rms,silu,both prompt.length=2048 \
        tracking.uri=$store > $OUT/decode8b.log 2>&1
    python3 -m sweep -m model=llama3-8b-shape workload=train dtype=bf16 kernels=rms,silu,both prompt.length=2048 \
        prompt.batch_size=1 timing.mode=eager tracking.uri=$store > $OUT/train8b.log 2>&1
    tail -30 $OUT/decode8b.log $OUT/train8b.log
}

sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(env mission install tests accuracy llama8b coverage precision oom)
for section in "${sections[@]}"; do
    echo "== $section"
    case $section in env) env_info ;; *) "$section" ;; esac
done
