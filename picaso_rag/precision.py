"""Storage precision of a state: fp32, bf16, or fp8 (e4m3) with a per-head scale.

Usage::

    from picaso_rag.precision import quantize, dequantize
    tensors = quantize(state, "fp8")            # what a store writes: {"ssm", "ssm_scale", "conv", "log_decay"}
    state = dequantize(tensors, state.n_tokens, state.fingerprint)   # what a store reads back
    state_nbytes(engine.model.cfg, "bf16")      # bytes one stored state takes, from the model's config

What each precision stores (pure functions: a state in, tensors out, and back):

=========  ==========================  =================  =========
precision  ssm [L, H, P, N]            conv [L, C, W-1]   log_decay
=========  ==========================  =================  =========
fp32       float32                     float32            float32
bf16       bfloat16                    bfloat16           float32
fp8        float8_e4m3fn, and one      bfloat16           float32
           fp32 scale per (layer, head)
=========  ==========================  =================  =========

Why these choices: the SSM memory is 97-98% of a state's bytes at every official shape, so it is
the only tensor worth 8 bits; its magnitude differs by orders of magnitude between heads (each
head has its own decay), so one scale per (layer, head) keeps every head in e4m3's range (its
largest value maps to 448, the largest finite e4m3 value). The conv state is the last W-1 inputs
of the convolution, read as they are by the next token: it stays bf16 under fp8 (2-3% of the
bytes). Log-decays are always fp32: composition weights are exponentials of their sums, where an
8- or 16-bit rounding would be multiplied, not added.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import Mamba2Config
from .errors import PicasoError
from .state import State

PRECISIONS = ("fp32", "bf16", "fp8")
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448.0
_STORAGE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else an error naming them."""
    if precision not in PRECISIONS:
        raise PicasoError(f"unknown state precision {precision!r}; use one of {', '.join(PRECISIONS)}.")
    return precision


def quantize(state: State, precision: str) -> dict[str, Tensor]:
    """The tensors that store ``state`` at ``precision`` (on the state's device, contiguous).

    fp32/bf16: ``ssm``, ``conv``, ``log_decay``; fp8 adds ``ssm_scale`` [n_layer, nheads] (fp32).
    Usage: ``tensors = quantize(state, "bf16")``.
    """
    check_precision(precision)
    log_decay = state.log_decay.float().contiguous()
    if precision != "fp8":
        dtype = _STORAGE_DTYPE[precision]
        return {"ssm": state.ssm.to(dtype).contiguous(), "conv": state.conv.to(dtype).contiguous(), "log_decay": log_decay}
    ssm = state.ssm.float()
    amax = ssm.abs().amax(dim=(2, 3))  # [L, H]
    # an all-zero head keeps scale 1 (any scale is exact for zeros; 0 would divide by zero)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (ssm / scale[:, :, None, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return {"ssm": q.contiguous(), "ssm_scale": scale.contiguous(), "conv": state.conv.to(torch.bfloat16).contiguous(),
            "log_decay": log_decay}


def precision_of(tensors: dict[str, Tensor]) -> str:
    """Which precision stored ``tensors`` (read off the ssm dtype); an error for any other layout."""
    names = set(tensors)
    ssm = tensors.get("ssm")
    if ssm is not None and ssm.dtype == FP8 and names == {"ssm", "ssm_scale", "conv", "log_decay"}:
        return "fp8"
    if ssm is not None and names == {"ssm", "conv", "log_decay"}:
        for name, dtype in _STORAGE_DTYPE.items():
            if ssm.dtype == dtype:
                return name
    found = {n: str(t.dtype) for n, t in tensors.items()}
    raise PicasoError(f"not a stored state's tensors ({found}); expected ssm/conv/log_decay in fp32 or bf16, "
                      "or ssm (float8_e4m3fn) with ssm_scale. Re-encode the document.")


def dequantize(tensors: dict[str, Tensor], n_tokens: int, fingerprint: str, dtype: torch.dtype | None = None) -> State:
    """The :class:`State` stored as ``tensors`` (see :func:`quantize`).

    ``dtype``: of the returned ssm/conv (default: the stored dtype; float32 for fp8, whose ssm is
    rescaled in fp32). Works on any device: move the (small) fp8 tensors to the GPU first, then
    dequantize there. Usage: ``state = dequantize(tensors, n_tokens, fingerprint)``.
    """
    precision = precision_of(tensors)
    ssm, conv = tensors["ssm"], tensors["conv"]
    if precision == "fp8":
        scale = tensors["ssm_scale"]
        if scale.shape != ssm.shape[:2] or scale.dtype != torch.float32:
            raise PicasoError(f"ssm_scale {tuple(scale.shape)} {scale.dtype} does not fit ssm {tuple(ssm.shape)}; "
                              "the state is corrupt: re-encode the document.")
        ssm = ssm.float() * scale[:, :, None, None]
        dtype = dtype or torch.float32
    if dtype is not None:
        ssm, conv = ssm.to(dtype), conv.to(dtype)
    return State(ssm, conv, tensors["log_decay"].float(), int(n_tokens), fingerprint)


def roundtrip(state: State, precision: str, dtype: torch.dtype | None = None) -> State:
    """``state`` as it reads back after storage at ``precision``, in ``dtype`` (default: the state's).

    Usage: ``stored = roundtrip(state, "fp8")`` (what the quality benchmarks compose).
    """
    return dequantize(quantize(state, precision), state.n_tokens, state.fingerprint, dtype=dtype or state.ssm.dtype)


def state_nbytes(cfg: Mamba2Config, precision: str) -> int:
    """Bytes of the tensors of one stored state of a model with config ``cfg`` (file headers aside).

    Usage: ``state_nbytes(Mamba2Config(d_model=2560, n_layer=64, vocab_size=50288), "fp8")``.
    """
    check_precision(precision)
    ssm = cfg.n_layer * cfg.nheads * cfg.headdim * cfg.d_state
    conv = cfg.n_layer * cfg.conv_dim * (cfg.d_conv - 1)
    log_decay = cfg.n_layer * cfg.nheads * 4
    if precision == "fp32":
        return 4 * (ssm + conv) + log_decay
    if precision == "bf16":
        return 2 * (ssm + conv) + log_decay
    return ssm + cfg.n_layer * cfg.nheads * 4 + 2 * conv + log_decay
