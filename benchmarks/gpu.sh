#!/usr/bin/env bash
# Everything sweep asks of a lent GPU, in one call; stores and logs go to $OUT (the device tool brings it back).
#   bash benchmarks/gpu.sh [section ...]
#   sections: env mission install tests accuracy llama8b coverage precision survive workloads workloads8b;
#   compile compile8b (baseline=compile, issue 15);
#   scale (2+ GPUs); repeats; timing (issue 10 in one call: mission, repeats, then coverage);
#   speed_of_light (issue 25: each kernelized layer alone, SOL_STEP picks parts); decode_repeats (issue 23 item 11)
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

tests() { python3 -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | tail -4; }

mission() {  # the original report's table. Wall time from process start to the summary table (the parent run's
    # startup_s_table) and to the process's end, bytecode compiled: first on this machine, then with a cold Triton
    # cache; then where the time went (start-up on the parent run, each job's phases) and the slowest imports.
    # As pip leaves an install: bytecode compiled. The image's own packages (torch, sympy) have none, and importing
    # them did not write any (no torch/__pycache__ afterwards): each process compiled them anew, 13 to 17.5 s of
    # imports on the H100 machine instead of 7. So compile everything on the path, the image's packages included.
    local run start path
    path=$(python3 -c "import sys; print(' '.join(p for p in sys.path[1:] if p and not p.endswith('.zip')))")
    python3 -m compileall -q -j 16 $path src > /dev/null
    for run in first-on-this-machine cold-triton-cache; do
        rm -rf ~/.triton/cache
        start=$(date +%s%N)
        python3 -m sweep -m dtype=bf16,fp32 kernels=rms,silu,both resume=false \
            tracking.uri=sqlite:///$OUT/mission.db > $OUT/mission-$run.log 2>&1
        echo "mission sweep ($run): exit $?, $(( ($(date +%s%N) - start) / 1000000 )) ms from process start to its end"
    done
    sed -n '/┏/,/ measured, /p' $OUT/mission-cold-triton-cache.log | head -24
    python3 benchmarks/phases.py sqlite:///$OUT/mission.db
    python3 -X importtime -c "import sweep.__main__" 2> $OUT/importtime.txt
    python3 benchmarks/phases.py --importtime $OUT/importtime.txt
}

store_precision() {  # the precision table of the jobs in $OUT/$1.db, and the rerun spread they show
    python3 benchmarks/timing_precision.py --store sqlite:///$OUT/$1.db --label sweep 2>&1 | grep "^|\|rerun spread\|timing.rerun_sd="
}

coverage() {  # the same combination as 20 jobs: do the intervals hold from one job to the next?
    python3 -m sweep -m 'seed=range(20)' kernels=rms prompt.length=118,8192 numerics.gen_tokens=0 \
        numerics.per_layer=false tracking.uri=sqlite:///$OUT/coverage.db > $OUT/coverage.log 2>&1
    echo "coverage sweep: exit $?, $(grep -o 'sweep [0-9a-f]\{8\} ([0-9.]* s)' $OUT/coverage.log)"
    store_precision coverage
}
repeats() {  # the issue's own command, default settings: 5 repeats at each length (sweep runs each length's back to back)
    python3 -m sweep -m seed=1,2,3,4,5 kernels=rms prompt.length=118,8192 tracking.uri=sqlite:///$OUT/repeats.db \
        > $OUT/repeats.log 2>&1
    echo "repeats sweep: exit $?, $(grep -o 'sweep [0-9a-f]\{8\} ([0-9.]* s)' $OUT/repeats.log)"
    store_precision repeats
}

decode_repeats() {  # issue 23 item 11: decode's intervals from one job to the next, two processes of 10 repeats;
    # the first sweep writes the rerun spread its repeats show to the store, the second adds it to its intervals
    local half
    for half in 0 10; do
        python3 -m sweep -m workload=decode kernels=rms "seed=range($half,$((half + 10)))" numerics.per_layer=false \
            tracking.uri=sqlite:///$OUT/decode-repeats.db > $OUT/decode-repeats-$half.log 2>&1
        echo "decode repeats from seed $half: exit $?, $(grep -o 'sweep [0-9a-f]\{8\} ([0-9.]* s)' $OUT/decode-repeats-$half.log)"
    done
    store_precision decode-repeats
}

timing() { mission; repeats; coverage; }  # issue 10's evidence in one call (one GPU)

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

precision() {  # back to back, then as jobs follow other work: what one job's blocks see, and what they cannot
    python3 benchmarks/timing_precision.py --lengths 118 8192 --repeats 10 2>&1 | tail -8
    python3 benchmarks/timing_precision.py --lengths 118 --repeats 20 --between-jobs 2>&1 | tail -5
}

survive() {  # issue 11: the 8B shape out of memory between two batch sizes that fit (one model: the cache is
    # dropped and reloaded), then GPU test kernels that allocate 1 TiB for real (in capture, in eager timing), raise
    # in their forward (numerics, capture) or trigger a device-side assert (sticky CUDA error policy)
    local survive_store="sqlite:///$OUT/survive.db"
    echo "== 1. Llama-3-8B shape, T=2048: B=1 fits, B=64 cannot (its float32 reference logits alone are 67 GB), B=2 fits"
    python3 -m sweep -m model=llama3-8b-shape prompt.length=2048 prompt.batch_size=1,64,2 dtype=bf16 kernels=both \
      kernels.source=bundled timing.budget_s=10 numerics.gen_tokens=4 tracking.uri=$survive_store > $OUT/oom8b.log 2>&1
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
    local common="--config-dir /tmp/survive/conf dtype=bf16 numerics.per_layer=false numerics.gen_tokens=0 timing.budget_s=3"
    echo "== 2. graph timing: fits, OOM in capture, raise in numerics, raise in capture, fits"
    python3 -m sweep -m $common kernels=a_fits,b_oom_capture,c_raise_numerics,d_raise_capture,g_fits tracking.uri=$survive_store \
      > $OUT/kernels-graph.log 2>&1; echo "exit code $?"; tail -16 $OUT/kernels-graph.log
    echo "== 3. eager timing: fits, OOM in timing, fits"
    python3 -m sweep -m $common timing.mode=eager kernels=a_fits,e_oom_eager_timing,g_fits tracking.uri=$survive_store \
      > $OUT/kernels-eager.log 2>&1; echo "exit code $?"; tail -12 $OUT/kernels-eager.log
    echo "== 4. sticky CUDA error: fits, device-side assert, then every later job 'CUDA context lost'"
    python3 -m sweep -m $common kernels=a_fits,f_device_assert,g_fits tracking.uri=$survive_store > $OUT/kernels-sticky.log 2>&1
    echo "exit code $?"; tail -12 $OUT/kernels-sticky.log

    python3 - "$survive_store" <<'PY'
import sys
from mlflow.tracking import MlflowClient
client = MlflowClient(tracking_uri=sys.argv[1])
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
}

scale() {  # issue 12, on a machine with 2 or more GPUs: the 36-job grid with the parallel launcher (one worker per
    # GPU for the whole sweep), the same grid serially on one GPU, their comparison (wall times, workers and their
    # pids, GPU time, overlaps, contention, speedups side by side), then the two-GPU tests. ~5 min on 2 H100s.
    # SCALE_STEP="parallel serial compare tests" (the default) or any of them; the stores stay in runs/scale-out/.
    mkdir -p runs/scale-out
    local grid=(dtype=bf16,fp16,fp32 kernels=none,rms,silu,both prompt.length=118,2048,8192 ${SCALE_OVERRIDES:-})
    local step start code
    for step in ${SCALE_STEP:-parallel serial compare tests}; do
        start=$(date +%s%N)
        case $step in
          parallel)
            nvidia-smi -L
            python3 -m sweep -m "${grid[@]}" hydra/launcher=parallel \
                tracking.uri=sqlite:///runs/scale-out/parallel.db > runs/scale-out/parallel.log 2>&1
            code=$?
            echo "parallel sweep: exit $code, $(( ($(date +%s%N) - start) / 1000000 )) ms from process start" \
                | tee runs/scale-out/wall-parallel.txt
            tail -45 runs/scale-out/parallel.log ;;
          serial)
            CUDA_VISIBLE_DEVICES=0 python3 -m sweep -m "${grid[@]}" tracking.uri=sqlite:///runs/scale-out/serial.db \
                > runs/scale-out/serial.log 2>&1
            code=$?
            echo "serial sweep: exit $code, $(( ($(date +%s%N) - start) / 1000000 )) ms from process start" \
                | tee runs/scale-out/wall-serial.txt
            tail -45 runs/scale-out/serial.log ;;
          compare)
            python3 benchmarks/compare_sweeps.py sqlite:///runs/scale-out/serial.db \
                sqlite:///runs/scale-out/parallel.db --out runs/scale-out/compare.md
            cat runs/scale-out/wall-*.txt 2>/dev/null | tee -a runs/scale-out/compare.md ;;
          tests)
            python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_scale.py 2>&1 | tail -30 ;;
        esac
    done
    cp runs/scale-out/*.db runs/scale-out/*.log runs/scale-out/*.md "$OUT"/ 2>/dev/null
}

workloads() {  # decode at 118, 2048 and 8192 positions (8191 cached + 1), train at T=512 and 2048 with batch 8
    python3 -m sweep -m workload=decode dtype=bf16 kernels=rms,silu,both prompt.length=118,2048,8191 \
        tracking.uri=$store > $OUT/decode.log 2>&1
    python3 -m sweep -m workload=train dtype=bf16 kernels=rms,silu,both prompt.length=512,2048 prompt.batch_size=8 \
        tracking.uri=$store > $OUT/train.log 2>&1
    tail -40 $OUT/decode.log $OUT/train.log
    python3 -m sweep.report --tracking-uri $store --filter "params.workload != 'prefill'" --out $OUT/report-workloads
}

workloads8b() {  # the Llama-3-8B shape on one GPU; train timed eagerly: two graphs of an 8B step do not fit in 80 GB.
    # WORKLOADS8B (default "decode train") and TRAIN8B_KERNELS (default rms,silu,both) pick a part.
    local workload
    for workload in ${WORKLOADS8B:-decode train}; do
        case $workload in
          decode) python3 -m sweep -m model=llama3-8b-shape workload=decode dtype=bf16 kernels=rms,silu,both \
                      prompt.length=2048 tracking.uri=$store > $OUT/decode8b.log 2>&1 ;;
          train) python3 -m sweep -m model=llama3-8b-shape workload=train dtype=bf16 \
                     kernels=${TRAIN8B_KERNELS:-rms,silu,both} prompt.length=2048 prompt.batch_size=1 timing.mode=eager \
                     tracking.uri=$store > $OUT/train8b.log 2>&1 ;;
        esac
        echo "$workload: exit code $?"; tail -16 $OUT/${workload}8b.log
    done
}

compile() {  # issue 15, tiny-llama: eager, torch.compile, the kernels and compile+kernels in the same rounds.
    # The bundled kernels declare no compile support: baseline.undeclared_kernels=compile times the 4th option anyway
    # (the issue's table). Inductor compiles each new shape once, ~20-40 s; later jobs hit its on-disk cache.
    python3 -m sweep -m baseline=compile baseline.undeclared_kernels=compile kernels=rms,silu,both \
        prompt.length=118,2048,8192 tracking.uri=sqlite:///$OUT/compile.db > $OUT/compile-tiny.log 2>&1
    echo "exit code $?"; grep -B1 -A40 "torch.compile against the kernels" $OUT/compile-tiny.log | head -60
    python3 -m sweep.report --tracking-uri sqlite:///$OUT/compile.db --out $OUT/report-compile > /dev/null
    grep -A2 "fastest" $OUT/report-compile/report.md | head -20
}

compile8b() {  # issue 15, the Llama-3-8B shape at 2048 tokens against torch.compile
    python3 -m sweep -m baseline=compile baseline.undeclared_kernels=compile model=llama3-8b-shape \
        prompt.length=2048 kernels=${COMPILE8B_KERNELS:-rms,silu,both} tracking.uri=sqlite:///$OUT/compile8b.db \
        > $OUT/compile-8b.log 2>&1
    echo "exit code $?"; grep -B1 -A16 "torch.compile against the kernels" $OUT/compile-8b.log | head -20
}

speed_of_light() {  # issue 25: each kernelized layer alone against a copy of its bytes, and the Amdahl prediction.
    # SOL_STEP="mission tiny llama8b workloads tests" (the default) or any of them; stores and logs in $OUT/sol-*.
    local step ops start
    for step in ${SOL_STEP:-mission tiny llama8b workloads tests}; do
        case $step in
          mission)  # the mission's wall time without and with the op timing (cost bound: about a third); T=118
            for ops in false true; do
                start=$(date +%s%N)
                python3 -m sweep -m dtype=bf16,fp32 kernels=rms,silu,both timing.ops=$ops resume=false \
                    tracking.uri=sqlite:///$OUT/sol-mission-ops-$ops.db > $OUT/sol-mission-ops-$ops.log 2>&1
                echo "mission sweep timing.ops=$ops: exit $?, $(( ($(date +%s%N) - start) / 1000000 )) ms"
            done
            python3 benchmarks/phases.py sqlite:///$OUT/sol-mission-ops-true.db
            sed -n '/each kernelized layer alone/,$p' $OUT/sol-mission-ops-true.log | head -30 ;;
          tiny)
            python3 -m sweep -m dtype=bf16,fp32 kernels=rms,silu,both prompt.length=2048,8192 \
                tracking.uri=sqlite:///$OUT/sol-tiny.db > $OUT/sol-tiny.log 2>&1
            echo "tiny-llama T=2048,8192: exit $?"; sed -n '/each kernelized layer alone/,$p' $OUT/sol-tiny.log | head -50 ;;
          llama8b)
            python3 -m sweep model=llama3-8b-shape prompt.length=2048 dtype=bf16 kernels=rms \
                tracking.uri=sqlite:///$OUT/sol-8b.db > $OUT/sol-8b.log 2>&1
            echo "Llama-3-8B shape T=2048: exit $?"; sed -n '/each kernelized layer alone/,$p' $OUT/sol-8b.log | head -12 ;;
          workloads)  # the issue's decode (1, 1, 1024) and train (1 and 8, 2048, 1024) steps
            python3 -m sweep workload=decode dtype=bf16 kernels=rms tracking.uri=sqlite:///$OUT/sol-workloads.db \
                > $OUT/sol-decode.log 2>&1
            echo "decode: exit $?"; sed -n '/each kernelized layer alone/,$p' $OUT/sol-decode.log | head -12
            python3 -m sweep -m workload=train dtype=bf16 kernels=rms prompt.length=2048 prompt.batch_size=1,8 \
                tracking.uri=sqlite:///$OUT/sol-workloads.db > $OUT/sol-train.log 2>&1
            echo "train: exit $?"; sed -n '/each kernelized layer alone/,$p' $OUT/sol-train.log | head -14 ;;
          tests)
            python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py -k "alone or above_the_limit" 2>&1 \
                | tail -15 ;;
        esac
    done
}

sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(env mission install tests accuracy llama8b coverage precision survive)
for section in "${sections[@]}"; do
    echo "== $section"
    case $section in env) env_info ;; *) "$section" ;; esac
done
