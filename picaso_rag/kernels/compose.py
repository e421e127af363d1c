"""Weighted sum of k states: the one memory-bound operation of composition.

    out[r, :] = sum_k weights[k, r] * states[k][r, :]      (fp32 accumulation)

Each state is viewed as rows (for SSM states: one row per layer and head, holding P x N values).
The Triton kernel makes one pass: it reads each of the k states once, from wherever they lie
(a table of pointers, so the states are never stacked into a new tensor), and writes the result
once. Its cost is therefore (k + 1) x state bytes over memory bandwidth: the floor.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .ssd import _triton_for


def weighted_sum_ref(states: Sequence[Tensor], weights: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """Reference: states k x [*rows, *row_shape] (same shape), weights [k, *rows] -> [*rows, *row_shape].

    ``weights`` may carry leading batch dims shared with the states' (it broadcasts); the result is
    accumulated in fp32 (or wider) and cast to ``out_dtype`` (default: the states' dtype). Differentiable.
    Usage: ``composed = weighted_sum_ref([s1, s2], torch.tensor([[0.5], [0.5]]))``.
    """
    if len(states) != weights.shape[0]:
        raise ValueError(f"{len(states)} states but {weights.shape[0]} weights")
    extra = states[0].dim() - (weights.dim() - 1)
    acc = None
    acc_dtype = torch.promote_types(states[0].dtype, torch.float32)
    for state, w in zip(states, weights.to(acc_dtype).unbind(0)):  # one state at a time: no fp32 copy of the stack
        term = state.to(acc_dtype) * w.reshape(*w.shape, *([1] * extra))
        acc = term if acc is None else acc + term
    return acc.to(out_dtype or states[0].dtype)


def weighted_sum(states: Sequence[Tensor], weights: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """Weighted sum of states (see :func:`weighted_sum_ref`); one fused Triton pass on CUDA.

    The fused path needs contiguous states of one dtype and ``weights`` of shape [k, *rows] with
    rows = the states' leading dims up to ``weights.dim() - 1``; otherwise the reference runs.
    """
    first = states[0]
    rows = tuple(weights.shape[1:])
    fused = (
        _triton_for(first) and len(states) == weights.shape[0]
        and not (torch.is_grad_enabled() and (weights.requires_grad or any(s.requires_grad for s in states)))
        and all(s.is_contiguous() and s.dtype == first.dtype and s.shape == first.shape and s.device == first.device for s in states)
        and tuple(first.shape[:len(rows)]) == rows
    )
    if not fused:
        return weighted_sum_ref(states, weights, out_dtype)
    return _weighted_sum_triton(states, weights, out_dtype or first.dtype)


def _weighted_sum_triton(states: Sequence[Tensor], weights: Tensor, out_dtype: torch.dtype) -> Tensor:
    import triton

    first = states[0]
    n_rows = weights[0].numel()
    row_len = first.numel() // n_rows
    out = torch.empty(first.shape, dtype=out_dtype, device=first.device)
    pointers = torch.tensor([s.data_ptr() for s in states], dtype=torch.int64).to(first.device, non_blocking=True)
    w = weights.reshape(len(states), n_rows).to(device=first.device, dtype=torch.float32).contiguous()
    block = min(4096, triton.next_power_of_2(row_len))
    grid = (n_rows, triton.cdiv(row_len, block))
    _kernel()[grid](pointers, first, w, out, len(states), n_rows, row_len, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return out


_compiled = None


def _kernel():
    """The Triton kernel, defined on first use (triton is imported only where it exists)."""
    global _compiled
    if _compiled is not None:
        return _compiled
    import triton
    import triton.language as tl

    @triton.jit
    def weighted_sum_kernel(pointers, like, weights, out, n_states, n_rows, row_len, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < row_len
        offset = row.to(tl.int64) * row_len + cols
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(n_states):
            base = tl.load(pointers + k).to(tl.pointer_type(like.dtype.element_ty))  # like: any one state
            w = tl.load(weights + k * n_rows + row)
            acc += w * tl.load(base + offset, mask=inside, other=0.0).to(tl.float32)
        tl.store(out + offset, acc.to(out.dtype.element_ty), mask=inside)

    _compiled = weighted_sum_kernel
    return _compiled
