"""The state of a text under one model: what gets stored, composed and read from (fixed-size for
a Mamba-2 model; a hybrid's adds its attention layers' keys and values, which grow with the text)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch
from torch import Tensor

from .errors import StateMismatchError


@dataclass(frozen=True)
class State:
    """State of one document (or of a composition of documents) under one model.

    ssm        [n_ssm, nheads, headdim, d_state]  SSM memory of each Mamba-2 layer, model dtype
    conv       [n_ssm, conv_dim, d_conv - 1]      last conv1d inputs, model dtype
    log_decay  [n_ssm, nheads], fp32               A * sum(dt): log of the segment's total decay
    n_tokens   tokens the state summarises
    fingerprint  hash of the model (weights, tokenizer, dtype) that produced it
    keys, values [n_attn, kv_heads, n_keys, head_dim], model dtype, or None for a model without
               attention layers (pure Mamba-2): every token's key and value in each attention layer
               (keys after RoPE); the part that grows with the text
    position   the position of the next token (RoPE; with parallel documents, after the longest one)

    Usage: ``state = engine.encode(["some text"])[0]; state.to("cuda")``.
    """

    ssm: Tensor
    conv: Tensor
    log_decay: Tensor
    n_tokens: int
    fingerprint: str
    keys: Tensor | None = None
    values: Tensor | None = None
    position: int = 0

    def __post_init__(self) -> None:
        n_layer, nheads = self.ssm.shape[0], self.ssm.shape[1]
        if self.ssm.dim() != 4 or self.conv.dim() != 3 or self.log_decay.shape != (n_layer, nheads) or self.conv.shape[0] != n_layer:
            raise StateMismatchError(
                f"inconsistent state shapes ssm {tuple(self.ssm.shape)}, conv {tuple(self.conv.shape)}, "
                f"log_decay {tuple(self.log_decay.shape)}; expected [L,H,P,N], [L,C,W-1], [L,H]. Re-encode the document."
            )
        if self.log_decay.dtype != torch.float32:
            object.__setattr__(self, "log_decay", self.log_decay.float())
        if (self.keys is None) != (self.values is None) or (self.keys is not None and (
                self.keys.dim() != 4 or self.keys.shape != self.values.shape)):  # type: ignore[union-attr]
            raise StateMismatchError(
                f"inconsistent hybrid state: keys {None if self.keys is None else tuple(self.keys.shape)}, values "
                f"{None if self.values is None else tuple(self.values.shape)}; expected two [n_attn, kv_heads, T, head_dim]. Re-encode the document."
            )
        if self.keys is not None and self.keys.shape[0] == 0:  # a model without attention layers holds no keys
            object.__setattr__(self, "keys", None)
            object.__setattr__(self, "values", None)

    @property
    def has_keys(self) -> bool:
        """True for the state of a model with attention layers (it holds keys and values)."""
        return self.keys is not None

    @property
    def device(self) -> torch.device:
        return self.ssm.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def n_keys(self) -> int:
        """Keys each attention layer holds (0 without attention layers)."""
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes the attention layers' keys and values take per token (the part that grows with length)."""
        if self.keys is None:
            return 0
        n_attn, kv_heads, _, head_dim = self.keys.shape
        return 2 * n_attn * kv_heads * head_dim * self.keys.element_size()

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None, non_blocking: bool = False) -> "State":
        """Move (and optionally cast ssm/conv/keys/values; log_decay stays fp32)."""
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype, non_blocking=non_blocking)

        return replace(self, ssm=move(self.ssm), conv=move(self.conv), keys=move(self.keys), values=move(self.values),
                       log_decay=self.log_decay.to(device=device, non_blocking=non_blocking))

    def check_finite(self) -> None:
        """Raise if any value is NaN/inf, or a log-decay is positive (a decay above 1 is impossible)."""
        for name, t in self.tensors().items():
            if not all_finite(t):
                raise StateMismatchError(f"state {name} contains NaN or inf; the state is corrupt: re-encode the document.")
        if (self.log_decay > 0).any():
            raise StateMismatchError("state log_decay > 0 (a decay above 1); the state is corrupt: re-encode the document.")

    def tensors(self) -> dict[str, Tensor]:
        """The tensors to serialise (safetensors), by name (a store keeps ``position`` in its metadata)."""
        out = {"ssm": self.ssm.contiguous(), "conv": self.conv.contiguous(), "log_decay": self.log_decay.contiguous()}
        if self.keys is not None:
            out.update(keys=self.keys.contiguous(), values=self.values.contiguous())  # type: ignore[union-attr]
        return out


# Deprecated alias (one release): a hybrid model's state is a State that holds keys and values.
HybridState = State


_EXPONENT_BITS = {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00),
                  torch.float32: (torch.int32, 0x7F800000)}


_FINITE_CHUNK = 1 << 20  # values checked at a time on the CPU: the check's own memory stays under 6 MiB


def all_finite(t: Tensor) -> bool:
    """No NaN or inf in ``t``. On the CPU, by the exponent bits (all ones for NaN and inf): twice
    as fast as ``isfinite`` on bf16, which matters for the 80 MiB states of a 2.7B model; a chunk
    at a time, so checking a state costs a bounded few MiB, never a copy of it."""
    if t.device.type == "cpu" and t.dtype in _EXPONENT_BITS and t.is_contiguous():
        int_dtype, mask = _EXPONENT_BITS[t.dtype]
        bits = t.view(-1).view(int_dtype)
        return not any(bool(((bits[i:i + _FINITE_CHUNK] & mask) == mask).any()) for i in range(0, bits.numel(), _FINITE_CHUNK))
    if t.device.type == "cpu" and t.is_contiguous():
        flat = t.view(-1)
        return all(bool(torch.isfinite(flat[i:i + _FINITE_CHUNK]).all()) for i in range(0, flat.numel(), _FINITE_CHUNK))
    return bool(torch.isfinite(t).all())


def check_same_model(states: list[State], fingerprint: str | None = None) -> str:
    """Return the common fingerprint, raising a clear error if states come from different models."""
    prints = {s.fingerprint for s in states}
    if fingerprint is not None:
        prints.add(fingerprint)
    if len(prints) > 1:
        raise StateMismatchError(
            f"states from {len(prints)} different models were mixed (fingerprints {sorted(p[:12] for p in prints)}); "
            "re-encode every document with the model you query with."
        )
    return prints.pop() if prints else (fingerprint or "")


@dataclass(frozen=True)
class StateSpec:
    """The shapes every state of one model has: what a stored state is validated against (and what
    bounds how many bytes the store reads for it). The SSM layers' ``ssm``/``conv``/``log_decay`` are
    fixed; a model with attention layers adds ``keys``/``values`` [n_attn, kv_heads, T, head_dim]
    (``kv`` = (n_attn, kv_heads, head_dim); None without attention layers) with T at most
    ``max_tokens`` (the engine's ``max_document_tokens``: a store keeps documents' states, never
    compositions). ``max_nbytes`` follows: the largest file this model can write.

    Usage: ``spec = StateSpec.of_config(engine.model.cfg, engine.max_document_tokens); spec.check(state)``.
    """

    ssm: tuple[int, int, int, int]  # [n_ssm, nheads, headdim, d_state]
    conv: tuple[int, int, int]  # [n_ssm, conv_dim, d_conv - 1]
    kv: tuple[int, int, int] | None = None  # [n_attn, kv_heads, head_dim]; None: no attention layers
    max_tokens: int = 0

    @property
    def log_decay(self) -> tuple[int, int]:
        return self.ssm[0], self.ssm[1]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The fixed tensors' shapes, by name (keys and values grow with the text)."""
        return {"ssm": self.ssm, "conv": self.conv, "log_decay": self.log_decay}

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of keys and values per token, in fp32 (the largest a store writes); 0 without attention."""
        return 0 if self.kv is None else 4 * 2 * _numel(self.kv)

    @property
    def max_nbytes(self) -> int:
        """Bytes of the largest file payload of this model's state: fp32 everywhere, ``max_tokens``
        of keys and values (and fp8's fixed scales, which a file of very few tokens may hold)."""
        fixed = 4 * sum(_numel(shape) for shape in self.shapes().values())
        if self.kv is None:
            return fixed
        return fixed + self.max_tokens * self.kv_bytes_per_token + 2 * 4 * _numel(self.kv)

    @classmethod
    def of_config(cls, cfg: Any, max_tokens: int = 1 << 17) -> "StateSpec":
        """From a model's config and the longest document (tokens) its states hold (which bounds
        only the keys and values of a model with attention layers)."""
        n_ssm, n_attn = len(cfg.ssm_layers), len(cfg.attn_layers)
        kv = (n_attn, cfg.n_kv_heads, cfg.head_dim) if n_attn else None
        return cls((n_ssm, cfg.nheads, cfg.headdim, cfg.d_state), (n_ssm, cfg.conv_dim, cfg.d_conv - 1),
                   kv=kv, max_tokens=int(max_tokens) if kv else 0)

    def check(self, state: "State") -> None:
        """Raise :class:`StateMismatchError` if ``state``'s shapes are not this model's."""
        self.check_shapes({name: tuple(t.shape) for name, t in state.tensors().items()})

    def check_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Raise :class:`StateMismatchError` if tensors of these shapes (by name, as in a state file)
        are not a state of this model."""
        for name, shape in self.shapes().items():
            found = shapes.get(name)
            if found != shape:
                raise StateMismatchError(f"state {name} has shape {found}, this model's states have {shape}; "
                                         "re-encode the document with this model.")
        keys, values = shapes.get("keys"), shapes.get("values")
        if self.kv is None:
            if keys is not None or values is not None:
                raise StateMismatchError("a hybrid model's state (it holds keys and values), but this model is a Mamba-2 "
                                         "model; re-encode the document with this model.")
            return
        if keys is None or values is None:
            raise StateMismatchError("a Mamba-2 model's state (no keys and values), but this model is a hybrid; "
                                     "re-encode the document with this model.")
        if len(keys) != 4 or (keys[0], keys[1], keys[3]) != self.kv or values != keys:
            expected = f"[{self.kv[0]}, {self.kv[1]}, n_tokens, {self.kv[2]}]"
            raise StateMismatchError(f"state keys {tuple(keys)} / values {tuple(values)}, this model's are {expected}; "
                                     "re-encode the document with this model.")
        if keys[2] > self.max_tokens:
            raise StateMismatchError(
                f"state holds keys of {keys[2]:,} tokens, more than the {self.max_tokens:,} this model's document states "
                "may hold (engine.max_document_tokens); raise engine.max_document_tokens in the process that reads it, "
                "or split the document.")
        for name in ("keys_scale", "values_scale"):  # fp8 files
            if name in shapes and tuple(shapes[name]) != self.kv:
                raise StateMismatchError(f"state {name} has shape {tuple(shapes[name])}, this model's are {self.kv}; "
                                         "re-encode the document with this model.")


# Deprecated alias (one release): StateSpec describes every model's states.
HybridStateSpec = StateSpec


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
