"""Composing document states: CASO, PICASO-S, PICASO-R and soup, as defined by the PICASO paper
(Liu et al., "PICASO: Permutation-Invariant Context Composition with State Space Models", ICLR 2025);
docs/state-engine.md records the decisions this implementation makes (weights, order, prefix, conv).

Each document k contributes its SSM state x_k with a per-layer, per-head scalar weight W_k:
    composed = sum_k W_k * x_k   (+ prod_j a_j * x(prefix) with a fixed prefix)
where a_j = exp(log_decay_j). The weights are computed in log space in fp64, so log-decays
of -10,000 give finite, correct weights; they are applied with fp32 accumulation.
"""

from __future__ import annotations

import functools
import hashlib
import math
from typing import Callable, Literal, Sequence

import numpy.polynomial.legendre
import torch
from torch import Tensor

from .errors import PicasoError
from .kernels import weighted_sum
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
    """W_k = integral_0^1 prod_{j != k} (1 - t + t a_j) dt, the mean over all n! orders.

    The integrand is a polynomial of degree n-1 in t, so (n//2 + 1)-point Gauss-Legendre
    quadrature is exact. Each factor is evaluated in log space as log1p(t * expm1(la_j)), which is
    accurate for decays near 1 and finite for decays that underflow to 0 (la = -10,000): factors
    lie in [1 - t, 1], so nothing underflows and the gradient is finite everywhere (BPTC needs it).
    """
    n = la.shape[-1]
    nodes, node_weights = _gauss_legendre_01(n // 2 + 1, la.dtype, la.device)
    log_factor = torch.log1p(nodes[:, None] * torch.expm1(la)[..., None, :])  # [..., q, j]
    log_all = log_factor.sum(-1, keepdim=True)  # [..., q, 1]
    log_others = log_all - log_factor  # leave factor k out: [..., q, k]
    return torch.logsumexp(log_others + node_weights.log()[:, None], dim=-2)


@functools.lru_cache(maxsize=64)
def _gauss_legendre_nodes(points: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x, w = numpy.polynomial.legendre.leggauss(points)
    return tuple((x + 1) / 2), tuple(w / 2)  # mapped from [-1, 1] to [0, 1]


def _gauss_legendre_01(points: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    x, w = _gauss_legendre_nodes(points)
    return torch.tensor(x, dtype=dtype, device=device), torch.tensor(w, dtype=dtype, device=device)


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
    shift_keys: Callable[[Tensor, int], Tensor] | None = None,
) -> State:
    """Compose document states into one state, as if the documents had been read.

    SSM layers: each document's state weighted by ``method`` (module docstring). ``prefix``: the
    state of fixed text read before the documents (composed exactly). ``conv``: the conv state after
    the documents: "mean" of theirs (order-invariant, default), "last" document's (exact for CASO,
    order-dependent), or "zero". With no documents, the result is the prefix state; with neither,
    an error (read with no state instead: that is "no context").

    Attention layers (states that hold keys): the documents' keys and values, each encoded on its
    own, form a set; the composed state holds their union, which attention reads in no particular
    order. For PICASO-S/R and soup the union is laid out in the canonical order of the documents,
    so the composed state is bitwise identical for every input order; for CASO, in the given order.
    Positions (RoPE): the documents sit in parallel, each from the position after the prefix (0
    without one), and reading continues after the longest; with CASO they follow one another, as
    in a concatenation. ``shift_keys(keys, delta)`` moves stored keys by ``delta`` positions
    (``model.shift_keys``, which ``engine.compose`` passes); without it keys stay where they were
    encoded, which is exact only for NoPE attention.

    Usage: ``ctx = compose(engine.encode(docs), "picaso-r")`` (or ``engine.compose``).
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
    has_keys = everything[0].has_keys
    if any(s.has_keys != has_keys for s in everything):
        raise PicasoError("hybrid and Mamba-2 states were mixed; encode every document with the one model you query with.")
    fingerprint = check_same_model(everything)
    ref = everything[0]
    for s in everything[1:]:
        if s.ssm.shape != ref.ssm.shape or s.conv.shape != ref.conv.shape:
            raise PicasoError(f"state shapes differ ({tuple(s.ssm.shape)} vs {tuple(ref.ssm.shape)}); re-encode with one model.")
        if has_keys and s.keys.shape[:2] + s.keys.shape[3:] != ref.keys.shape[:2] + ref.keys.shape[3:]:
            raise PicasoError("state shapes differ between documents; re-encode them with one model.")
        if s.device != ref.device:
            raise PicasoError(f"states on different devices ({s.device} and {ref.device}); move them with state.to(device) first.")
    if not states:
        return prefix  # type: ignore[return-value]
    log_decay = torch.stack([s.log_decay for s in states])  # [n, L_ssm, H]
    log_decay_host = log_decay.cpu()  # one copy, one sync: validation and ordering run on the host
    if not (torch.isfinite(log_decay_host).all() and (log_decay_host <= 0).all()):
        raise PicasoError("a state has a NaN, infinite or positive log_decay; it is corrupt: re-encode that document.")
    if method in ORDER_INVARIANT:
        order = _canonical_order_of(states, log_decay_host)
        states = [states[i] for i in order]
        log_decay = log_decay[torch.tensor(order, device=log_decay.device)]

    if log_decay.shape[1]:  # the SSM layers
        ssm, conv_state, total_log_decay = compose_tensors(
            [s.ssm for s in states], [s.conv for s in states], log_decay, method, conv,
            prefix_ssm=prefix.ssm if prefix is not None else None,
            prefix_log_decay=prefix.log_decay if prefix is not None else None,
        )
        if not torch.isfinite(ssm).all():
            raise PicasoError("a state holds NaN or inf values; it is corrupt: re-encode the documents.")
    else:  # attention only: nothing to weigh
        ssm, conv_state, total_log_decay = ref.ssm, ref.conv, ref.log_decay
    n_tokens = sum(s.n_tokens for s in states) + (prefix.n_tokens if prefix is not None else 0)
    if not has_keys:
        return State(ssm=ssm, conv=conv_state, log_decay=total_log_decay, n_tokens=n_tokens, fingerprint=fingerprint)

    # the attention layers: a union of the documents' keys and values, placed after the prefix
    start = prefix.position if prefix is not None else 0
    keys, values = ([prefix.keys], [prefix.values]) if prefix is not None else ([], [])
    offset = start
    for s in states:
        keys.append(shift_keys(s.keys, offset) if shift_keys is not None else s.keys)
        values.append(s.values)
        if method == "caso":  # one after the other, as in a concatenation
            offset += s.position
    position = offset if method == "caso" else start + max(s.position for s in states)
    return State(ssm=ssm, conv=conv_state, log_decay=total_log_decay, n_tokens=n_tokens, fingerprint=fingerprint,
                 keys=torch.cat(keys, dim=2), values=torch.cat(values, dim=2), position=position)


def compose_hybrid(states: Sequence[State], method: str = "picaso-s", prefix: State | None = None, conv: str = "mean",
                   shift_keys: Callable[[Tensor, int], Tensor] | None = None) -> State:
    """Deprecated alias of :func:`compose`, which composes every model's states (kept for one release)."""
    return compose(states, method, prefix, conv, shift_keys)


def compose_tensors(
    ssm: Tensor | Sequence[Tensor], conv: Tensor | Sequence[Tensor], log_decay: Tensor, method: str = "picaso-s",
    conv_policy: str = "mean", prefix_ssm: Tensor | None = None, prefix_log_decay: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Compose states; differentiable (BPTC trains through it). No validation here.

    ssm [..., n, L, H, P, N] or a list of n [..., L, H, P, N]; conv likewise with [L, C, W-1];
    log_decay [..., n, L, H]. Leading dims are a batch. Returns (ssm [..., L, H, P, N] in ssm's
    dtype, conv [..., L, C, W-1], total log_decay [..., L, H] fp32). Lists are never stacked: on
    CUDA one fused pass reads each state once (:func:`picaso_rag.kernels.weighted_sum`).
    Usage: ``ssm, conv, log_decay = compose_tensors(ssm_stack, conv_stack, decay_stack, "picaso-s")``.
    """
    ssm_list = list(ssm.unbind(-5)) if isinstance(ssm, Tensor) else list(ssm)
    conv_list = list(conv.unbind(-4)) if isinstance(conv, Tensor) else list(conv)
    n = len(ssm_list)
    weights = log_weights(log_decay.movedim(-3, -1), method).exp().float().movedim(-1, 0)  # [n, ..., L, H]
    total_log_decay = log_decay.float().sum(-3)
    if prefix_ssm is not None:  # the prefix was read first: every document decays it
        ssm_list.append(prefix_ssm)
        weights = torch.cat([weights, total_log_decay.exp()[None]])
        total_log_decay = total_log_decay + prefix_log_decay.float()
    composed = weighted_sum(ssm_list, weights, out_dtype=ssm_list[0].dtype)
    if conv_policy == "mean":
        conv_weights = torch.full((n, *weights.shape[1:-1]), 1.0 / n, device=weights.device)  # [n, ..., L]
        conv_state = weighted_sum(conv_list, conv_weights, out_dtype=conv_list[0].dtype)
    elif conv_policy == "last":
        conv_state = conv_list[-1]
    else:
        conv_state = torch.zeros_like(conv_list[0])
    return composed, conv_state, total_log_decay


def canonical_order(log_decay: Tensor, n_tokens: Sequence[int]) -> list[int]:
    """The order of states sorted by content, so that order-invariant methods do not see the
    retrieval order. log_decay [n, L, H] (CPU) of the n states. Returns indices.

    PICASO-R averages over the rotations of *one* cyclic order: without this, it would depend on
    the order up to rotation. For PICASO-S and soup it makes the result bitwise identical for every
    input order (floating-point sums depend on the order of their terms). The key is the raw bytes
    of the log-decay vector (L x H values; distinct texts do not share it, equal texts have equal
    states): comparing bytes is exact and costs microseconds, where Python floats cost milliseconds.
    """
    rows = log_decay.float().reshape(len(n_tokens), -1).contiguous().numpy()
    keys = [(rows[i].tobytes(), n_tokens[i]) for i in range(len(n_tokens))]
    return sorted(range(len(keys)), key=keys.__getitem__)


def _canonical_order_of(states: Sequence[State], log_decay: Tensor) -> list[int]:
    """:func:`canonical_order` by the SSM layers' log-decays; a model without SSM layers sorts by
    the bytes of the documents' keys (a digest: distinct texts have distinct keys)."""
    if log_decay.shape[1]:
        return canonical_order(log_decay, [s.n_tokens for s in states])
    digests = [hashlib.sha256(s.keys.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).digest() for s in states]
    return sorted(range(len(states)), key=lambda i: (states[i].n_tokens, digests[i]))
