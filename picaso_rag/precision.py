"""Storage precision of a state: fp32, bf16, or fp8 (e4m3) with a per-head scale.

Usage::

    from picaso_rag.precision import quantize, dequantize
    tensors = quantize(state, "fp8")            # what a store writes: {"ssm", "ssm_scale", "conv", "log_decay"}
    state = dequantize(tensors, state.n_tokens, state.fingerprint)   # what a store reads back
    state_nbytes(engine.model.cfg, "bf16")      # bytes one stored state takes, from the model's config
    state_nbytes(hybrid_cfg, "fp8", n_tokens=128)   # a hybrid's: the fixed SSM part + its keys and values

What each precision stores (pure functions: a state in, tensors out, and back):

=========  ==========================  =================  =========  ====================================
precision  ssm [L, H, P, N]            conv [L, C, W-1]   log_decay  keys, values [A, KV, T, D] (hybrids)
=========  ==========================  =================  =========  ====================================
fp32       float32                     float32            float32    float32
bf16       bfloat16                    bfloat16           float32    bfloat16
fp8        float8_e4m3fn, and one      bfloat16           float32    float8_e4m3fn, and one fp32 scale
           fp32 scale per (layer, head)                              per (layer, kv head, channel)
=========  ==========================  =================  =========  ====================================

Why these choices: the SSM memory is 97-98% of a state's bytes at every official shape, so it is
the only tensor worth 8 bits; its magnitude differs by orders of magnitude between heads (each
head has its own decay), so one scale per (layer, head) keeps every head in e4m3's range (its
largest value maps to 448, the largest finite e4m3 value). The conv state is the last W-1 inputs
of the convolution, read as they are by the next token: it stays bf16 under fp8 (2-3% of the
bytes). Log-decays are always fp32: composition weights are exponentials of their sums, where an
8- or 16-bit rounding would be multiplied, not added.

A hybrid model's state (a :class:`~picaso_rag.state.State` with keys) adds its attention layers' ``keys``
and ``values`` [n_attn, kv_heads, T, head_dim], the part that grows with the document (for a long
document nearly all of its bytes). fp32/bf16 store them in that dtype; fp8 stores them in e4m3
with one fp32 scale per (layer, kv head, channel): ``keys_scale`` and ``values_scale``
[n_attn, kv_heads, head_dim]. Why per channel, over the tokens: e4m3 rounds every normal number
to within 2^-4 of itself, over a window of 2^14.8 (2^-6 .. 448); a scale's job is to place a group
of values inside that window. Keys have a few outlier channels, tens to hundreds of times larger
than the rest and the same at every token (KIVI, Liu et al. 2024; KVQuant, Hooper et al. 2024:
quantise keys per channel), and a RoPE rotation mixes only the two channels of a pair, so a
channel is the natural group: its largest magnitude maps to 448, and every value down to 2^-14.8
of it keeps 4 significant bits, however far apart the channels are (tests/test_hybrid_states.py
spreads them over 10^6, where one scale per tensor flushes the small channels to zero). Values
use the same grouping: attention reads them as a convex combination (weights summing to 1), which
averages their independent roundings, and a per-token scale (KIVI's choice for values in integer
formats) would add bytes with every token where e4m3's exponent already covers the spread between
tokens. The scales are a fixed 8 bytes per (layer, head, channel), whatever the length, so a
stored token costs exactly one byte per value: 2 x n_attn x kv_heads x head_dim bytes (:func:`kv_nbytes_per_token`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .config import Mamba2Config
from .errors import PicasoError
from .state import State

PRECISIONS = ("fp32", "bf16", "fp8")
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448.0
_STORAGE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}
_KV = ("keys", "values")
_KV_SCALES = ("keys_scale", "values_scale")


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else an error naming them."""
    if precision not in PRECISIONS:
        raise PicasoError(f"unknown state precision {precision!r}; use one of {', '.join(PRECISIONS)}.")
    return precision


def quantize(state: State, precision: str) -> dict[str, Tensor]:
    """The tensors that store ``state`` at ``precision`` (on the state's device, contiguous).

    fp32/bf16: ``ssm``, ``conv``, ``log_decay``; fp8 adds ``ssm_scale`` [n_layer, nheads] (fp32).
    A state with ``keys`` adds ``keys`` and ``values`` (fp8: and ``keys_scale``, ``values_scale``
    [n_attn, kv_heads, head_dim]). Usage: ``tensors = quantize(state, "bf16")``.
    """
    check_precision(precision)
    hybrid = state.has_keys
    log_decay = state.log_decay.float().contiguous()
    if precision != "fp8":
        dtype = _STORAGE_DTYPE[precision]
        out = {"ssm": state.ssm.to(dtype).contiguous(), "conv": state.conv.to(dtype).contiguous(), "log_decay": log_decay}
        if hybrid:
            out.update(keys=state.keys.to(dtype).contiguous(), values=state.values.to(dtype).contiguous())
        return out
    q, scale = _to_fp8(state.ssm, reduce=(2, 3))  # one scale per (layer, head)
    out = {"ssm": q, "ssm_scale": scale, "conv": state.conv.to(torch.bfloat16).contiguous(), "log_decay": log_decay}
    if hybrid:  # one scale per (layer, kv head, channel), over the tokens (see the module docstring)
        for name in _KV:
            out[name], out[f"{name}_scale"] = _to_fp8(getattr(state, name), reduce=(2,))
    return out


def _to_fp8(t: Tensor, reduce: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """(e4m3 tensor, fp32 scale) with the largest magnitude over the ``reduce`` dims mapped to 448."""
    t = t.float()
    # over no element (a state with no keys) or all zeros: scale 1 (any scale is exact for zeros; 0 would divide by zero)
    if all(t.shape[d] for d in reduce):
        amax = t.abs().amax(dim=reduce)
    else:
        amax = t.new_zeros([n for d, n in enumerate(t.shape) if d not in reduce])
    # a tensor divisor, not the Python number: CUDA divides by a CPU scalar as a * (1/b), one bit off
    # the CPU's a / b at times, and a state quantised on a GPU would then differ from the same on a CPU
    scale = torch.where(amax > 0, amax / torch.full_like(amax, FP8_MAX), torch.ones_like(amax))
    q = (t / _expand(scale, reduce)).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q.contiguous(), scale.contiguous()


def _expand(scale: Tensor, reduce: tuple[int, ...]) -> Tensor:
    for d in reduce:
        scale = scale.unsqueeze(d)
    return scale


def precision_of(tensors: dict[str, Tensor]) -> str:
    """Which precision stored ``tensors`` (read off the ssm dtype); an error for any other layout."""
    names = set(tensors)
    ssm = tensors.get("ssm")
    base = {"ssm", "conv", "log_decay"}
    if "keys" in names:  # a hybrid model's state
        base |= set(_KV)
    if ssm is not None and ssm.dtype == FP8 and names == base | {"ssm_scale"} | (set(_KV_SCALES) if "keys" in names else set()):
        if all(tensors[n].dtype == FP8 for n in _KV if n in names):
            return "fp8"
    if ssm is not None and names == base:
        for name, dtype in _STORAGE_DTYPE.items():
            if ssm.dtype == dtype:
                return name
    found = {n: str(t.dtype) for n, t in tensors.items()}
    raise PicasoError(f"not a stored state's tensors ({found}); expected ssm/conv/log_decay (and keys/values for a "
                      "hybrid model) in fp32 or bf16, or ssm (and keys/values) in float8_e4m3fn with their scales. "
                      "Re-encode the document.")


def dequantize(tensors: dict[str, Tensor], n_tokens: int, fingerprint: str, dtype: torch.dtype | None = None,
               position: int | None = None) -> State:
    """The :class:`State` stored as ``tensors`` (see :func:`quantize`); with keys and values when
    they hold them (``position``: its next position, default ``n_tokens``).

    ``dtype``: of the returned ssm/conv (and keys/values) (default: the stored dtype; float32 for
    fp8, rescaled in fp32). Works on any device: move the (small) fp8 tensors to the GPU first,
    then dequantize there. Usage: ``state = dequantize(tensors, n_tokens, fingerprint)``.
    """
    precision = precision_of(tensors)
    ssm, conv = tensors["ssm"], tensors["conv"]
    kv = {name: tensors[name] for name in _KV if name in tensors}
    if precision == "fp8":
        ssm = _from_fp8(ssm, tensors["ssm_scale"], "ssm", reduce=(2, 3))
        kv = {name: _from_fp8(t, tensors[f"{name}_scale"], name, reduce=(2,)) for name, t in kv.items()}
        dtype = dtype or torch.float32
    if dtype is not None:
        ssm, conv = ssm.to(dtype), conv.to(dtype)
        kv = {name: t.to(dtype) for name, t in kv.items()}
    if kv:
        return State(ssm, conv, tensors["log_decay"].float(), int(n_tokens), fingerprint, keys=kv["keys"],
                           values=kv["values"], position=int(n_tokens if position is None else position))
    return State(ssm, conv, tensors["log_decay"].float(), int(n_tokens), fingerprint)


def _from_fp8(q: Tensor, scale: Tensor, name: str, reduce: tuple[int, ...]) -> Tensor:
    expected = tuple(n for d, n in enumerate(q.shape) if d not in reduce)
    if tuple(scale.shape) != expected or scale.dtype != torch.float32:
        raise PicasoError(f"{name}_scale {tuple(scale.shape)} {scale.dtype} does not fit {name} {tuple(q.shape)}; "
                          "the state is corrupt: re-encode the document.")
    return q.float().mul_(_expand(scale, reduce))  # one fp32 buffer: the result (a read allocates it once)


def roundtrip(state: State, precision: str, dtype: torch.dtype | None = None) -> State:
    """``state`` as it reads back after storage at ``precision``, in ``dtype`` (default: the state's).

    Usage: ``stored = roundtrip(state, "fp8")`` (what the quality benchmarks compose).
    """
    return dequantize(quantize(state, precision), state.n_tokens, state.fingerprint, dtype=dtype or state.ssm.dtype,
                      position=getattr(state, "position", None))


def state_nbytes(cfg: Mamba2Config | Any, precision: str, n_tokens: int = 0) -> int:
    """Bytes of the tensors of one stored state of a model with config ``cfg`` (file headers aside).

    ``cfg``: a :class:`~picaso_rag.Mamba2Config`, or a :class:`~picaso_rag.hybrid_config.HybridConfig`,
    whose state of an ``n_tokens``-token document adds ``n_tokens * kv_nbytes_per_token(cfg, precision)``
    (and, in fp8, the keys' and values' fixed scales) to its SSM layers' fixed part.
    Usage: ``state_nbytes(Mamba2Config(d_model=2560, n_layer=64, vocab_size=50288), "fp8")``.
    """
    check_precision(precision)
    hybrid = bool(cfg.attn_layers)
    n_layer = len(cfg.ssm_layers)  # a hybrid: its SSM layers
    ssm = n_layer * cfg.nheads * cfg.headdim * cfg.d_state
    conv = n_layer * cfg.conv_dim * (cfg.d_conv - 1)
    log_decay = n_layer * cfg.nheads * 4
    if precision == "fp32":
        fixed = 4 * (ssm + conv) + log_decay
    elif precision == "bf16":
        fixed = 2 * (ssm + conv) + log_decay
    else:
        fixed = ssm + n_layer * cfg.nheads * 4 + 2 * conv + log_decay
    if not hybrid:
        return fixed
    if precision == "fp8":  # keys_scale and values_scale: fp32, one per (layer, kv head, channel)
        fixed += 2 * len(cfg.attn_layers) * cfg.n_kv_heads * cfg.head_dim * 4
    return fixed + int(n_tokens) * kv_nbytes_per_token(cfg, precision)


def kv_nbytes_per_token(cfg: Any, precision: str) -> int:
    """Bytes one document token adds to a hybrid model's stored state: its key and value in every
    attention layer, at ``precision`` (fp32 4, bf16 2, fp8 1 byte a value; fp8's scales are fixed).

    Usage: ``kv_nbytes_per_token(engine.model.cfg, "fp8")`` (0 for a Mamba-2 config).
    """
    check_precision(precision)
    if not cfg.attn_layers:
        return 0
    return 2 * len(cfg.attn_layers) * cfg.n_kv_heads * cfg.head_dim * {"fp32": 4, "bf16": 2, "fp8": 1}[precision]
