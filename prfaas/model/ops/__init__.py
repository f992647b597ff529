"""Numerical kernels: attention backends, the gated delta rule, the short conv, in plain torch; and
our C kernel for the delta rule on the CPU (`cpu_kernel`, source in `csrc/`)."""

from prfaas.model.ops.conv import causal_conv1d_prefill, causal_conv1d_step
from prfaas.model.ops.delta_rule import chunk_delta_rule, naive_delta_rule, recurrent_delta_step

__all__ = [
    "causal_conv1d_prefill",
    "causal_conv1d_step",
    "chunk_delta_rule",
    "naive_delta_rule",
    "recurrent_delta_step",
]
