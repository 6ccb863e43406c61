# session 5, call 3: first generation's cost; mission before/after on one lease; the repeats; coverage
source .gpu/env.sh || exit 1
export COLUMNS=200
path=$(python3 -c "import sys; print(' '.join(p for p in sys.path[1:] if p and not p.endswith('.zip')))")
python3 -m compileall -q -j 16 $path src .gpu/old/src > /dev/null
PYTHONPATH=src:$PYTHONPATH python3 .gpu/first_generate.py 2>&1 | grep -v Warning
mission() {  # $1: before|after
  local src=src db=mission; [ $1 = before ] && src=.gpu/old/src db=mission-before
  rm -rf ~/.triton/cache; local start=$(date +%s%N)
  PYTHONPATH=$src:$PYTHONPATH python3 -m sweep -m dtype=bf16,fp32 kernels=rms,silu,both resume=false \
      tracking.uri=sqlite:///$OUT/$db.db > /tmp/mission-$1.log 2>&1
  echo "mission $1: exit $?, $(( ($(date +%s%N) - start) / 1000000 )) ms from process start to its end"
}
mission before; mission after; mission before; mission after; mission after
cp /tmp/mission-after.log $OUT/
for db in mission-before mission; do PYTHONPATH=src:$PYTHONPATH python3 benchmarks/phases.py sqlite:///$OUT/$db.db; done
export PYTHONPATH=src:$PYTHONPATH
python3 -m sweep -m seed=1,2,3,4,5 kernels=rms prompt.length=118,8192 tracking.uri=sqlite:///$OUT/repeats.db > /tmp/repeats.log 2>&1
echo "repeats: exit $?, $(grep -o 'sweep [0-9a-f]\{8\} ([0-9.]* s)' /tmp/repeats.log)"; grep "^\[" /tmp/repeats.log | cut -c1-60
python3 benchmarks/timing_precision.py --store sqlite:///$OUT/repeats.db --label "sweep, the issue's command" 2>&1 | grep -v -i "warn\|resolver\|^$\|See https"
python3 -m sweep -m 'seed=range(20)' kernels=rms prompt.length=118,8192 numerics.gen_tokens=0 numerics.per_layer=false \
    tracking.uri=sqlite:///$OUT/coverage.db > /tmp/coverage.log 2>&1
echo "coverage: exit $?, $(grep -o 'sweep [0-9a-f]\{8\} ([0-9.]* s)' /tmp/coverage.log)"
python3 benchmarks/timing_precision.py --store sqlite:///$OUT/coverage.db --label "sweep, 20 jobs" 2>&1 | grep -v -i "warn\|resolver\|^$\|See https"
