"""The two ways a job ends without a measurement."""


class SkipJob(Exception):
    """The combination cannot run here (e.g. a CUDA-only kernel on a CPU machine): logged as `skipped`."""


class JobConfigError(ValueError):
    """The combination is invalid (bad path, unknown layer, too long a prompt): logged as `failed`."""
