"""RMSNorm kernels: plain, gated (Mamba-2's norm(y * silu(z)) per group) and fused residual-add.

Pure-torch references (``*_ref``) beside functions that use mamba_ssm's Triton kernels on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .ssd import _triton_for


def rmsnorm_ref(x: Tensor, weight: Tensor, eps: float, gate: Tensor | None = None, group_size: int | None = None) -> Tensor:
    """RMSNorm in fp32; with ``gate``: norm(x * silu(gate)) over groups of ``group_size`` channels."""
    dtype = x.dtype
    x = x.float()
    if gate is not None:
        x = x * F.silu(gate.float())
    groups = x.unflatten(-1, (-1, group_size or x.shape[-1]))
    groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)
    return (groups.flatten(-2) * weight.float()).to(dtype)


def rmsnorm(x: Tensor, weight: Tensor, eps: float, gate: Tensor | None = None, group_size: int | None = None) -> Tensor:
    if not _triton_for(x):
        return rmsnorm_ref(x, weight, eps, gate, group_size)
    if gate is None:
        from mamba_ssm.ops.triton.layer_norm import rms_norm_fn

        return rms_norm_fn(x, weight, None, eps=eps)
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn

    return rmsnorm_fn(x, weight, None, z=gate, eps=eps, group_size=group_size, norm_before_gate=False)


def add_rmsnorm_ref(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, residual_in_fp32: bool) -> tuple[Tensor, Tensor]:
    """residual <- x + residual (fp32 if asked); return (rmsnorm(residual) in x's dtype, residual)."""
    residual = x if residual is None else x + residual
    if residual_in_fp32:
        residual = residual.float()
    return rmsnorm_ref(residual, weight, eps).to(x.dtype), residual


def add_rmsnorm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, residual_in_fp32: bool) -> tuple[Tensor, Tensor]:
    if not _triton_for(x):
        return add_rmsnorm_ref(x, residual, weight, eps, residual_in_fp32)
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn

    return rms_norm_fn(x, weight, None, residual=residual, eps=eps, prenorm=True, residual_in_fp32=residual_in_fp32)
