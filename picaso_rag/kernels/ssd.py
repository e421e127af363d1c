"""The Mamba-2 SSD scan: a chunked prefill from an initial state, and the single-token step.

Each op has a pure-torch reference (``*_ref``, runs everywhere, used by CPU tests) and a
dispatching function that uses mamba_ssm's Triton kernels on CUDA when mamba-ssm is installed.

Conventions (all ops): ``dt`` is the *final* step size (softplus, bias, clamp and padding mask
already applied), so a padded position has dt = 0: it neither decays the state nor adds to it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


@functools.lru_cache(maxsize=1)
def triton_kernels_available() -> bool:
    """True when mamba-ssm's Triton kernels can be imported (they need CUDA and the compiled package)."""
    if not torch.cuda.is_available():
        return False
    try:
        import mamba_ssm.ops.triton.selective_state_update  # noqa: F401
        import mamba_ssm.ops.triton.ssd_combined  # noqa: F401
    except Exception:  # ImportError, or a broken build raising something else at import
        return False
    return True


_use_triton = True


def set_kernel_backend(backend: str) -> None:
    """Choose ``"triton"`` (default; used only on CUDA when available) or ``"reference"`` (pure torch)."""
    global _use_triton
    if backend not in ("triton", "reference"):
        raise ValueError(f"unknown kernel backend {backend!r}; use 'triton' or 'reference'.")
    _use_triton = backend == "triton"


def _triton_for(t: Tensor) -> bool:
    return _use_triton and t.is_cuda and triton_kernels_available()


def _heads_from_groups(t: Tensor, nheads: int, dim: int) -> Tensor:
    """B and C are shared by nheads // ngroups heads: repeat them along the head axis."""
    return t.repeat_interleave(nheads // t.shape[dim], dim=dim)


def _segsum(x: Tensor) -> Tensor:
    """out[..., i, j] = sum(x[..., j+1 : i+1]) for j <= i, else -inf (stable: no subtraction)."""
    T = x.size(-1)
    x = x[..., None].expand(*x.shape, T)
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~below, 0)
    out = torch.cumsum(x, dim=-2)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=0)
    return out.masked_fill(~causal, -torch.inf)


REF_SCAN_BLOCK_TOKENS = 8192  # the reference scan reads at most this many tokens at once


def chunk_scan_ref(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, chunk_size: int,
    initial_state: Tensor | None = None, block_tokens: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan in fp32 (the "minimal SSD" algorithm of the Mamba-2 paper).

    x [b, l, h, p], dt [b, l, h], A [h], B/C [b, l, g, n], D [h], initial_state [b, h, p, n].
    Returns y [b, l, h, p] (dtype of x) and the final state [b, h, p, n] (fp32).

    Long inputs are scanned in blocks of ``block_tokens`` (default :data:`REF_SCAN_BLOCK_TOKENS`,
    rounded to whole chunks), each starting from the state the previous one left: the inter-chunk
    segment-sum matrix is quadratic in the chunks of one block only, so memory grows linearly with l.
    """
    block = max(chunk_size, (block_tokens or REF_SCAN_BLOCK_TOKENS) // chunk_size * chunk_size)
    l = x.shape[1]
    if l <= block:
        return _chunk_scan_block(x, dt, A, B, C, D, chunk_size, initial_state)
    ys, state = [], initial_state
    for start in range(0, l, block):
        end = start + block
        y, state = _chunk_scan_block(x[:, start:end], dt[:, start:end], A, B[:, start:end], C[:, start:end], D,
                                     chunk_size, state)
        ys.append(y)
    return torch.cat(ys, dim=1), state


def _chunk_scan_block(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, chunk_size: int,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`chunk_scan_ref` on one block (all of its chunks at once)."""
    b, l, h, p = x.shape
    out_dtype = x.dtype
    pad = (-l) % chunk_size  # dt = 0 on the padding: the state passes through unchanged
    xs, dts = F.pad(x.float(), (0, 0, 0, 0, 0, pad)), F.pad(dt.float(), (0, 0, 0, pad))
    Bs = F.pad(_heads_from_groups(B, h, 2).float(), (0, 0, 0, 0, 0, pad))
    Cs = F.pad(_heads_from_groups(C, h, 2).float(), (0, 0, 0, 0, 0, pad))
    c = (l + pad) // chunk_size

    def chunks(t: Tensor) -> Tensor:
        return t.reshape(b, c, chunk_size, *t.shape[2:])

    X, Bc, Cc = chunks(xs * dts[..., None]), chunks(Bs), chunks(Cs)
    dA = chunks(dts * A.float()).permute(0, 3, 1, 2)  # [b, h, c, l]
    dA_cumsum = torch.cumsum(dA, dim=-1)

    # 1. within each chunk (the quadratic, attention-like form)
    decay_in_chunk = torch.exp(_segsum(dA))  # [b, h, c, l, s]
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cc, Bc, decay_in_chunk, X)
    # 2. each chunk's own final state, from zero
    decay_to_end = torch.exp(dA_cumsum[..., -1:] - dA_cumsum)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_to_end, X)
    # 3. pass states across chunks, starting from the initial state
    if initial_state is None:
        initial_state = torch.zeros_like(chunk_states[:, 0])
    chunk_states = torch.cat([initial_state.float()[:, None], chunk_states], dim=1)
    decay_chunk = torch.exp(_segsum(F.pad(dA_cumsum[..., -1], (1, 0))))  # [b, h, c+1, c+1]
    passed = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, chunk_states)
    states_before, final_state = passed[:, :-1], passed[:, -1]
    # 4. each chunk's output from the state entering it
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, states_before, torch.exp(dA_cumsum))
    y = (y_diag + y_off).reshape(b, c * chunk_size, h, p)[:, :l]
    y = y + x.float() * D.float()[:, None]
    return y.to(out_dtype), final_state


def chunk_scan(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, chunk_size: int,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan (see :func:`chunk_scan_ref`); mamba_ssm's Triton kernel on CUDA.

    Elsewhere the reference, in chunks no longer than the read (a power of two from 16): a short
    read (a question, a joining prompt) would otherwise pad to a whole chunk and pay the chunk's
    quadratic part (256 x 256 per head for 32 tokens). Any chunk size computes the same scan."""
    if not _triton_for(x):
        short = max(16, 1 << max(x.shape[1] - 1, 0).bit_length())
        return chunk_scan_ref(x, dt, A, B, C, D, min(chunk_size, short), initial_state)
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    if initial_state is not None:
        initial_state = initial_state.contiguous()
    y, final_state = mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, D=D,
        initial_states=initial_state, return_final_states=True,
    )
    return y, final_state


def _step_size(dt: Tensor, dt_bias: Tensor | None, dt_limit: tuple[float, float]) -> Tensor:
    """Final step size: softplus(dt + dt_bias) clamped to dt_limit; ``dt`` as is without a bias."""
    if dt_bias is None:
        return dt.float()
    return F.softplus(dt.float() + dt_bias.float()).clamp(*dt_limit)


def ssm_step_ref(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
    dt_bias: Tensor | None = None, dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> Tensor:
    """One recurrent step, updating ``state`` in place.

    state [b, h, p, n], x [b, h, p], dt [b, h], A [h], B/C [b, g, n], D [h]. With ``dt_bias``,
    ``dt`` is the raw projection and the step size is softplus(dt + dt_bias) clamped to
    ``dt_limit``; without, ``dt`` is the final step size. Returns y [b, h, p].
    """
    h = state.shape[1]
    Bh, Ch = _heads_from_groups(B, h, 1).float(), _heads_from_groups(C, h, 1).float()
    dt = _step_size(dt, dt_bias, dt_limit)
    decay = torch.exp(dt * A.float())[..., None, None]
    new_state = state.float() * decay + (dt[..., None] * x.float())[..., None] * Bh[:, :, None, :]
    state.copy_(new_state)
    y = torch.einsum("bhpn,bhn->bhp", new_state, Ch) + D.float()[:, None] * x.float()
    return y.to(x.dtype)


def _ssm_step_in_place(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
    dt_bias: Tensor | None = None, dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> Tensor:
    """:func:`ssm_step_ref` for an fp32 state on the CPU, in three passes over the state (decay,
    rank-1 update, read-out as a batched matmul) instead of the reference's temporaries: decoding
    on the CPU is bound by these passes (a batch of 16 rows of a 12-head layer is 6 MB each)."""
    h = state.shape[1]
    Bh, Ch = _heads_from_groups(B, h, 1).float(), _heads_from_groups(C, h, 1).float()
    dt = _step_size(dt, dt_bias, dt_limit)
    xf = x.float()
    state.mul_(torch.exp(dt * A.float())[..., None, None])
    state.addcmul_((dt[..., None] * xf)[..., None], Bh[:, :, None, :])  # += (dt x) B^T, no outer-product temporary
    y = torch.matmul(state, Ch[..., None])[..., 0] + D.float()[:, None] * xf
    return y.to(x.dtype)


def ssm_step(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
    dt_bias: Tensor | None = None, dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> Tensor:
    """One recurrent step (see :func:`ssm_step_ref`); mamba_ssm's Triton kernel on CUDA, which
    also applies the bias and softplus (one launch per layer: decoding is launch-bound)."""
    if not _triton_for(x):
        if state.dtype == torch.float32 and state.device.type == "cpu":
            return _ssm_step_in_place(state, x, dt, A, B, C, D, dt_bias, dt_limit)
        return ssm_step_ref(state, x, dt, A, B, C, D, dt_bias, dt_limit)
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    p, n = state.shape[2], state.shape[3]
    fused_softplus = dt_bias is not None and dt_limit == (0.0, float("inf"))
    if not fused_softplus:
        dt, dt_bias = _step_size(dt, dt_bias, dt_limit), None
    if dt_bias is None:  # the kernel reads the bias's stride to detect tied headdim: give it a zero one
        dt_bias = torch.zeros((), device=x.device, dtype=torch.float32)
    # the kernel takes per-(head, headdim) parameters; Mamba-2 ties them across headdim (stride 0)
    return selective_state_update(
        state, x, dt[..., None].expand(-1, -1, p), A[:, None, None].expand(-1, p, n), B, C,
        D=D[:, None].expand(-1, p), dt_bias=dt_bias.expand(dt.shape[1], p) if dt_bias.dim() == 0 else dt_bias[:, None].expand(-1, p),
        dt_softplus=fused_softplus,
    )


def conv_step_ref(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Causal conv1d for one new token, then SiLU; shifts ``x`` into ``conv_state`` in place.

    x [b, c], conv_state [b, c, w-1], weight [c, w]. Returns [b, c].
    """
    window = torch.cat([conv_state, x[..., None].to(conv_state.dtype)], dim=-1)  # [b, c, w]
    out = (window.float() * weight.float()).sum(-1) + (bias.float() if bias is not None else 0)
    conv_state.copy_(window[..., 1:])
    return F.silu(out).to(x.dtype)


def conv_step(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """One-token causal conv (see :func:`conv_step_ref`); one Triton launch on CUDA."""
    if not (_triton_for(x) and conv_state.stride(-1) == 1 and x.stride(-1) == 1 and weight.is_contiguous()):
        return conv_step_ref(x, conv_state, weight, bias)
    import triton

    b, c = x.shape
    width = weight.shape[1]
    out = torch.empty(b, c, dtype=x.dtype, device=x.device)
    block = 256
    _conv_step_kernel()[(b, triton.cdiv(c, block))](
        x, conv_state, weight, bias if bias is not None else weight, out, c,
        x.stride(0), conv_state.stride(0), conv_state.stride(1),
        HAS_BIAS=bias is not None, WIDTH=width, BLOCK=block,
    )
    return out


_conv_step_compiled = None


def _conv_step_kernel():
    global _conv_step_compiled
    if _conv_step_compiled is not None:
        return _conv_step_compiled
    import triton
    import triton.language as tl

    @triton.jit
    def conv_step_kernel(x, state, weight, bias, out, n_channels, stride_x, stride_sb, stride_sc,
                         HAS_BIAS: tl.constexpr, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        ch = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = ch < n_channels
        state_row = state + row * stride_sb + ch * stride_sc
        new = tl.load(x + row * stride_x + ch, mask=inside, other=0.0).to(tl.float32)
        acc = new * tl.load(weight + ch * WIDTH + WIDTH - 1, mask=inside, other=0.0).to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(bias + ch, mask=inside, other=0.0).to(tl.float32)
        previous = tl.load(state_row, mask=inside, other=0.0)
        for j in tl.static_range(WIDTH - 1):  # window = state[0..w-2], new
            acc += previous.to(tl.float32) * tl.load(weight + ch * WIDTH + j, mask=inside, other=0.0).to(tl.float32)
            if j < WIDTH - 2:
                following = tl.load(state_row + j + 1, mask=inside, other=0.0)
                tl.store(state_row + j, following, mask=inside)
                previous = following
        tl.store(state_row + WIDTH - 2, new.to(state.dtype.element_ty), mask=inside)
        tl.store(out + row * n_channels + ch, (acc * tl.sigmoid(acc)).to(out.dtype.element_ty), mask=inside)

    _conv_step_compiled = conv_step_kernel
    return _conv_step_compiled


def causal_conv(xBC: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
    """Depthwise causal conv1d continuing from ``conv_state``, then SiLU.

    xBC [b, l, c]; conv_state [b, c, w-1] (the last w-1 inputs before this segment);
    weight [c, w]; lengths [b] (real tokens per row; rows are right-padded), None if no row is.
    Returns the activated output [b, l, c] and the new conv state [b, c, w-1]: the last
    w-1 inputs up to each row's own length (so padding never enters a state).
    """
    width = weight.shape[1]
    window = torch.cat([conv_state.to(xBC.dtype), xBC.transpose(1, 2)], dim=-1)  # [b, c, w-1+l]
    if xBC.shape[1] == 1:  # decoding: one dot product per channel (conv1d's set-up costs more than the math)
        out = (window * weight).sum(-1, keepdim=True) + (bias[:, None] if bias is not None else 0)
    else:
        out = F.conv1d(window, weight[:, None, :], bias, groups=weight.shape[0])  # valid conv: length l
    if lengths is None:
        new_conv_state = window[..., window.shape[-1] - (width - 1):].clone()  # a view would keep the whole window alive
    else:
        idx = lengths.to(window.device)[:, None] + torch.arange(width - 1, device=window.device)  # [b, w-1]
        new_conv_state = torch.gather(window, 2, idx[:, None, :].expand(-1, window.shape[1], -1))
    return F.silu(out.transpose(1, 2)), new_conv_state
