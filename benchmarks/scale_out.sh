#!/usr/bin/env bash
# Issue 12's evidence on a 2-GPU machine: the 36-job sweep with the parallel launcher (one worker per GPU), the
# same sweep serially on one GPU, and the comparison. Each step fits one 10-minute call; stores stay in
# runs/scale-out/ (a warm machine keeps them between calls) and are copied to $OUT.
#   bash benchmarks/scale_out.sh parallel   # then: serial, then: compare
# Extra overrides after the step go to the sweep (give both sweeps the same), e.g. `serial timing.budget_s=10` if
# the serial sweep would not fit a 10-minute call.
source .gpu/env.sh || exit 1
export PYTHONPATH=src:$PYTHONPATH COLUMNS=200
mkdir -p runs/scale-out
grid=(dtype=bf16,fp16,fp32 kernels=none,rms,silu,both prompt.length=118,2048,8192 "${@:2}")
case "$1" in
  parallel)
    nvidia-smi -L
    start=$(date +%s)
    python3 -m sweep -m "${grid[@]}" hydra/launcher=parallel tracking.uri=sqlite:///runs/scale-out/parallel.db \
      > runs/scale-out/parallel.log 2>&1
    echo "parallel sweep: exit $?, $(( $(date +%s) - start )) s from process start"
    tail -45 runs/scale-out/parallel.log ;;
  serial)
    start=$(date +%s)
    CUDA_VISIBLE_DEVICES=0 python3 -m sweep -m "${grid[@]}" tracking.uri=sqlite:///runs/scale-out/serial.db \
      > runs/scale-out/serial.log 2>&1
    echo "serial sweep: exit $?, $(( $(date +%s) - start )) s from process start"
    tail -45 runs/scale-out/serial.log ;;
  compare)
    python3 benchmarks/compare_sweeps.py sqlite:///runs/scale-out/serial.db sqlite:///runs/scale-out/parallel.db \
      --out runs/scale-out/compare.md ;;
  *) echo "usage: $0 parallel|serial|compare" >&2; exit 2 ;;
esac
cp runs/scale-out/*.db runs/scale-out/*.log runs/scale-out/*.md "$OUT"/ 2>/dev/null
true
