"""Worker processes of `hydra/launcher=parallel` (joblib's loky executor): each one lives as long as the sweep."""

from __future__ import annotations

import sys

LOKY_WORKER_LOOP = "joblib.externals.loky.process_executor"


def keep_this_worker() -> None:
    """Turns off loky's leak guard in this process (only a loky worker's loop reads it). After each job, a loky
    worker compares its resident memory with its size after its first job and exits if it grew by more than
    300 MB (loky's `_MAX_MEMORY_LEAK_SIZE`); the executor then starts a new worker. A sweep's worker grows that
    much by design: CUDA libraries load lazily, Triton compiles kernels, the model cache changes dtype. On 2 H100s
    the 36-job sweep thus ran in 6 workers instead of 2, each new one paying ~20 s of imports, CUDA start-up and
    a model load. loky has no public switch; its worker loop reads `_USE_PSUTIL` after every job, and without
    psutil it only collects garbage, which is what this sets."""
    loop = sys.modules.get(LOKY_WORKER_LOOP)
    if loop is not None:
        loop._USE_PSUTIL = False
