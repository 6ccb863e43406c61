"""Liger's Triton RMSNorm from the installed `liger-kernel` package: the kernel kernels-community/liger-kernels ships."""

import torch
from liger_kernel.ops.rms_norm import LigerRMSNormFunction


class LigerRMSNorm(torch.nn.Module):
    """Replaces transformers' `RMSNorm` forward; reads the replaced module's `weight` and `variance_epsilon`."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return LigerRMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


class layers:
    LigerRMSNorm = LigerRMSNorm
