#!/usr/bin/env bash
# On the lent GPU: the mission sweep and the prompt-length sweep, stores written to $OUT.
source .gpu/env.sh || exit 1
export PYTHONPATH=src:$PYTHONPATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import transformers, kernels, torch; print('transformers', transformers.__version__, 'kernels', kernels.__version__, 'torch', torch.__version__)"
/usr/bin/time -f "mission wall %e s" python3 -m sweep -m dtype=bf16,fp32 kernels=rms,silu,both tracking.uri=sqlite:///$OUT/gpu.db 2>&1 | tail -25
python3 -m sweep -m kernels=rms,silu,both prompt.length=118,8192 tracking.uri=sqlite:///$OUT/gpu.db 2>&1 | tail -25
