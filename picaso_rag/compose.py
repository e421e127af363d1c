"""Composing document states: CASO, PICASO-S, PICASO-R and soup (docs/method.md is the spec).

Each document k contributes its SSM state x_k with a per-layer, per-head scalar weight W_k:
    composed = sum_k W_k * x_k   (+ prod_j a_j * x(prefix) with a fixed prefix)
where a_j = exp(log_decay_j). The weights are computed in log space in fp64, so log-decays
of -10,000 give finite, correct weights; they are applied with fp32 accumulation.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from torch import Tensor

from .errors import PicasoError
from .state import State, check_same_model

Method = Literal["caso", "picaso-s", "picaso-r", "soup"]
METHODS: tuple[str, ...] = ("caso", "picaso-s", "picaso-r", "soup")
ConvPolicy = Literal["mean", "last", "zero"]
CONV_POLICIES: tuple[str, ...] = ("mean", "last", "zero")
ORDER_INVARIANT = frozenset({"picaso-s", "picaso-r", "soup"})


def log_weights(log_decay: Tensor, method: str) -> Tensor:
    """log W for documents along the last dim. log_decay [..., n] (any float dtype) -> [..., n] fp64.

    Usage: ``w = log_weights(torch.tensor([-1.0, -2.0, -3.0]), "picaso-s").exp()``.
    """
    la = log_decay.double()
    n = la.shape[-1]
    if n == 0:
        return la
    if method == "soup":
        return torch.full_like(la, -math.log(n))
    if method == "caso":
        # W_k = prod_{j>k} a_j: reverse exclusive cumulative sum of log-decays
        after = la.flip(-1).cumsum(-1).flip(-1) - la
        return after
    if method == "picaso-s":
        return _picaso_s_log_weights(la)
    if method == "picaso-r":
        return _picaso_r_log_weights(la)
    raise PicasoError(f"unknown composition method {method!r}; choose one of {', '.join(METHODS)}.")


def _picaso_s_log_weights(la: Tensor) -> Tensor:
    """W_k = (1/n) sum_m e_m(a without a_k) / C(n-1, m), e_m by a log-space DP, all k at once.

    Setting a_k = 0 (log -inf) in row k makes e_m of all n decays equal e_m of the others.
    """
    n = la.shape[-1]
    others = la[..., None, :].expand(*la.shape, n).clone()  # [..., k, j]
    others.diagonal(dim1=-2, dim2=-1).fill_(-math.inf)
    e = torch.full((*la.shape, n), -math.inf, dtype=la.dtype, device=la.device)  # [..., k, m], m = 0..n-1
    e[..., 0] = 0.0
    for j in range(n):  # e_m <- e_m + a_j e_{m-1}, for all m at once (right side uses the old e)
        e = torch.cat([e[..., :1], torch.logaddexp(e[..., 1:], others[..., j, None] + e[..., :-1])], dim=-1)
    m = torch.arange(n, dtype=la.dtype, device=la.device)
    log_binom = math.lgamma(n) - torch.lgamma(m + 1) - torch.lgamma(n - m)  # log C(n-1, m)
    return torch.logsumexp(e - log_binom, dim=-1) - math.log(n)


def _picaso_r_log_weights(la: Tensor) -> Tensor:
    """W_k = (1/n) sum_{m=0}^{n-1} a_{k+1} ... a_{k+m} (indices mod n)."""
    n = la.shape[-1]
    k = torch.arange(n, device=la.device)
    idx = (k[:, None] + 1 + torch.arange(n - 1, device=la.device)[None, :]) % n  # [k, m-1]
    following = la[..., idx]  # [..., k, n-1]
    start = torch.zeros((*following.shape[:-1], 1), dtype=la.dtype, device=la.device)
    prods = torch.cat([start, following.cumsum(-1)], dim=-1)  # m = 0..n-1
    return torch.logsumexp(prods, dim=-1) - math.log(n)


def compose(
    states: Sequence[State],
    method: str = "picaso-s",
    prefix: State | None = None,
    conv: str = "mean",
) -> State:
    """Compose document states into one state, as if the documents had been read.

    ``prefix``: the state of fixed text read before the documents (composed exactly).
    ``conv``: the conv state after the documents: "mean" of theirs (order-invariant, default),
    "last" document's (exact for CASO, order-dependent), or "zero".
    With no documents, the result is the prefix state; with neither, an error (read with no
    state instead: that is "no context").

    Usage: ``ctx = compose(engine.encode(docs), "picaso-r")``.
    """
    if method not in METHODS:
        raise PicasoError(f"unknown composition method {method!r}; choose one of {', '.join(METHODS)}.")
    if conv not in CONV_POLICIES:
        raise PicasoError(f"unknown conv-state policy {conv!r}; choose one of {', '.join(CONV_POLICIES)}.")
    if conv == "last" and method in ORDER_INVARIANT:
        raise PicasoError(f"conv='last' depends on document order, which {method} must not; use conv='mean' or 'zero'.")
    states = list(states)
    everything = states + ([prefix] if prefix is not None else [])
    if not everything:
        raise PicasoError("nothing to compose: pass at least one document state or a prefix state.")
    fingerprint = check_same_model(everything)
    ref = everything[0]
    for s in everything[1:]:
        if s.ssm.shape != ref.ssm.shape or s.conv.shape != ref.conv.shape:
            raise PicasoError(f"state shapes differ ({tuple(s.ssm.shape)} vs {tuple(ref.ssm.shape)}); re-encode with one model.")
        if s.device != ref.device:
            raise PicasoError(f"states on different devices ({s.device} and {ref.device}); move them with state.to(device) first.")
    if not states:
        return prefix  # type: ignore[return-value]
    if method in ORDER_INVARIANT:
        states = canonical_order(states)

    log_decay = torch.stack([s.log_decay for s in states], dim=-1)  # [L, H, n] fp32
    if not (torch.isfinite(log_decay).all() and (log_decay <= 0).all()):
        raise PicasoError("a state has a NaN, infinite or positive log_decay; it is corrupt: re-encode that document.")
    weights = log_weights(log_decay, method).exp().float()  # [L, H, n]
    ssm = torch.zeros(ref.ssm.shape, dtype=torch.float32, device=ref.device)
    for k, s in enumerate(states):  # one pass per state, fp32 accumulation
        ssm.add_(s.ssm.float() * weights[..., k, None, None])
    total_log_decay = log_decay.sum(-1)
    n_tokens = sum(s.n_tokens for s in states)
    if prefix is not None:
        ssm.add_(prefix.ssm.float() * total_log_decay.exp()[..., None, None])
        total_log_decay = total_log_decay + prefix.log_decay
        n_tokens += prefix.n_tokens

    if conv == "mean":
        conv_state = torch.stack([s.conv.float() for s in states]).mean(0).to(ref.conv.dtype)
    elif conv == "last":
        conv_state = states[-1].conv.clone()
    else:
        conv_state = torch.zeros_like(ref.conv)
    if not torch.isfinite(ssm).all():
        raise PicasoError("a state holds NaN or inf values; it is corrupt: re-encode the documents.")
    return State(ssm=ssm.to(ref.ssm.dtype), conv=conv_state, log_decay=total_log_decay.float(),
                 n_tokens=n_tokens, fingerprint=fingerprint)


def canonical_order(states: list[State]) -> list[State]:
    """Sort states by content, so that order-invariant methods do not see the retrieval order.

    PICASO-R averages over the rotations of *one* cyclic order: without this, it would depend on
    the order up to rotation. For PICASO-S and soup it makes the result bitwise identical for every
    input order (floating-point sums depend on the order of their terms). The key is the log-decay
    vector (L x H values): distinct texts do not share it; equal texts have equal states."""
    keys = torch.stack([s.log_decay.flatten() for s in states]).cpu().tolist()
    order = sorted(range(len(states)), key=lambda i: (keys[i], states[i].n_tokens))
    return [states[i] for i in order]
