"""Kernels behind plain Python functions; each has a pure-torch reference beside it (``*_ref``)."""

from .compose import weighted_sum, weighted_sum_ref
from .norm import add_rmsnorm, add_rmsnorm_ref, rmsnorm, rmsnorm_ref
from .ssd import (
    causal_conv,
    chunk_scan,
    conv_step,
    conv_step_ref,
    chunk_scan_ref,
    set_kernel_backend,
    ssm_step,
    ssm_step_ref,
    triton_kernels_available,
)

__all__ = [
    "add_rmsnorm",
    "add_rmsnorm_ref",
    "rmsnorm",
    "rmsnorm_ref",
    "causal_conv",
    "chunk_scan",
    "chunk_scan_ref",
    "conv_step",
    "conv_step_ref",
    "set_kernel_backend",
    "ssm_step",
    "ssm_step_ref",
    "triton_kernels_available",
    "weighted_sum",
    "weighted_sum_ref",
]
