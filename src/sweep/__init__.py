"""sweep: how much faster do `kernels` make a model, and how much do they change its outputs."""

__version__ = "0.1.0"
