"""The ways a job ends without a measurement."""


class SkipJob(Exception):
    """The combination cannot run here (e.g. a CUDA-only kernel on a CPU machine): logged as `skipped`."""


class JobConfigError(ValueError):
    """The combination is invalid (bad path, unknown layer, too long a prompt): logged as `failed`."""


class KernelOutputError(RuntimeError):
    """The kernelized forward produced NaN or Inf where the baseline did not: the kernel is broken (`failed`)."""
