"""The ways a job ends without a measurement."""


class SkipJob(Exception):
    """The combination cannot run here (e.g. a CUDA-only kernel on a CPU machine): logged as `skipped`."""


class JobConfigError(ValueError):
    """The combination is invalid (bad path, unknown layer, too long a prompt): logged as `failed`."""


class KernelOutputError(RuntimeError):
    """The kernelized forward produced NaN or Inf where the baseline did not: the kernel is broken (`failed`)."""


class KernelImportError(RuntimeError):
    """Importing the kernel failed on an import it does not declare as a dependency: the kernel is broken
    (`failed`). A declared dependency that is missing is `SkipJob`."""


class GraphCheckError(RuntimeError):
    """A side's CUDA-graph replay was non-finite or did not compute its input: the side computes something else
    when captured, so it is broken (`failed`), not timed eagerly instead as a capture that raises is."""
