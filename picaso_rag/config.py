"""Mamba-2 model configuration, read from either checkpoint layout.

Two layouts exist in the wild:
- state-spaces / mamba_ssm (``MambaLMHeadModel``): ``d_model``, ``n_layer``, ``ssm_cfg``...
- transformers (``Mamba2ForCausalLM``): ``hidden_size``, ``num_hidden_layers``, ``state_size``...
Both become one :class:`Mamba2Config`; the model code only knows this one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import CheckpointError


def _dt_limit(raw: object) -> tuple[float, float]:
    """(low, high); transformers writes infinity as {"__float__": "Infinity"}."""
    values = [v["__float__"] if isinstance(v, dict) else v for v in (raw or (0.0, math.inf))]  # type: ignore[union-attr]
    low, high = (float(v) for v in values)
    return low, high


@dataclass(frozen=True)
class Mamba2Config:
    d_model: int
    n_layer: int
    vocab_size: int  # rows of the embedding (already padded)
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    conv_bias: bool = True
    bias: bool = False  # in_proj / out_proj bias
    dt_limit: tuple[float, float] = (0.0, math.inf)
    eos_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv1d: x, B and C."""
        return self.d_inner + 2 * self.ngroups * self.d_state

    def __post_init__(self) -> None:
        if self.d_inner % self.headdim:
            raise CheckpointError(
                f"expand * d_model = {self.d_inner} is not a multiple of headdim = {self.headdim}; "
                "fix config.json (Mamba-2 needs d_inner divisible by headdim)."
            )
        if self.nheads % self.ngroups:
            raise CheckpointError(f"nheads = {self.nheads} is not a multiple of ngroups = {self.ngroups}; fix config.json.")
        if self.d_conv < 1:
            raise CheckpointError(f"d_conv must be >= 1, got {self.d_conv}; fix config.json.")

    def to_mamba_ssm_dict(self) -> dict[str, Any]:
        """config.json in the mamba_ssm layout (what :func:`save_checkpoint` writes)."""
        return {
            "d_model": self.d_model,
            "d_intermediate": 0,
            "n_layer": self.n_layer,
            "vocab_size": self.vocab_size,
            "ssm_cfg": {
                "layer": "Mamba2",
                "d_state": self.d_state,
                "d_conv": self.d_conv,
                "expand": self.expand,
                "headdim": self.headdim,
                "ngroups": self.ngroups,
                "chunk_size": self.chunk_size,
                "bias": self.bias,
                "conv_bias": self.conv_bias,
                "dt_limit": list(self.dt_limit),
            },
            "attn_layer_idx": [],
            "attn_cfg": {},
            "rms_norm": True,
            "residual_in_fp32": self.residual_in_fp32,
            "fused_add_norm": True,
            "pad_vocab_size_multiple": 1,
            "tie_embeddings": self.tie_embeddings,
            "norm_epsilon": self.norm_eps,
            "eos_token_id": self.eos_token_id,
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d["dt_limit"] = list(self.dt_limit)
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Mamba2Config":
        """Parse config.json of either layout. Usage: ``Mamba2Config.from_dict(json.load(f))``."""
        if "d_model" in raw and "n_layer" in raw:
            return cls._from_mamba_ssm(raw)
        if "hidden_size" in raw and "num_hidden_layers" in raw and raw.get("model_type", "mamba2") == "mamba2":
            return cls._from_transformers(raw)
        raise CheckpointError(
            "config.json is neither a mamba_ssm Mamba-2 config (d_model, n_layer, ssm_cfg) nor a transformers "
            f"Mamba2Config (model_type 'mamba2'); got keys {sorted(raw)[:12]}. Point to a Mamba-2 checkpoint directory."
        )

    @classmethod
    def _from_mamba_ssm(cls, raw: dict[str, Any]) -> "Mamba2Config":
        ssm = dict(raw.get("ssm_cfg") or {})
        if ssm.get("layer", "Mamba1") != "Mamba2":
            raise CheckpointError(
                f"ssm_cfg.layer is {ssm.get('layer', 'Mamba1 (default)')!r}; picaso-rag needs a Mamba-2 checkpoint "
                "(its per-head scalar decay is what makes states composable)."
            )
        if raw.get("attn_layer_idx"):
            raise CheckpointError("this mamba_ssm checkpoint has attention layers (attn_layer_idx): it is a hybrid, not a "
                                  "Mamba2Config; load it with picaso_rag.load_checkpoint (or HybridConfig.from_dict).")
        if raw.get("d_intermediate", 0):
            raise CheckpointError("checkpoints with MLP blocks (d_intermediate > 0) are not supported; use a pure Mamba-2 model.")
        for unsupported in ("d_ssm", "D_has_hdim"):
            if ssm.get(unsupported):
                raise CheckpointError(f"ssm_cfg.{unsupported} is not supported by picaso-rag; use a standard Mamba-2 config.")
        if ssm.get("norm_before_gate", False) or not ssm.get("rmsnorm", True) or not raw.get("rms_norm", True):
            raise CheckpointError("only Mamba-2 with rmsnorm=True, norm_before_gate=False (the official setting) is supported.")
        vocab = int(raw["vocab_size"])
        multiple = int(raw.get("pad_vocab_size_multiple", 8))
        if vocab % multiple:
            vocab += multiple - vocab % multiple  # mamba_ssm pads the embedding rows the same way
        return cls(
            d_model=int(raw["d_model"]),
            n_layer=int(raw["n_layer"]),
            vocab_size=vocab,
            d_state=int(ssm.get("d_state", 128)),
            d_conv=int(ssm.get("d_conv", 4)),
            expand=int(ssm.get("expand", 2)),
            headdim=int(ssm.get("headdim", 64)),
            ngroups=int(ssm.get("ngroups", 1)),
            chunk_size=int(ssm.get("chunk_size", 256)),
            norm_eps=float(raw.get("norm_epsilon", 1e-5)),
            residual_in_fp32=bool(raw.get("residual_in_fp32", True)),
            tie_embeddings=bool(raw.get("tie_embeddings", True)),
            conv_bias=bool(ssm.get("conv_bias", True)),
            bias=bool(ssm.get("bias", False)),
            dt_limit=_dt_limit(ssm.get("dt_limit")),
            eos_token_id=raw.get("eos_token_id"),
        )

    @classmethod
    def _from_transformers(cls, raw: dict[str, Any]) -> "Mamba2Config":
        d_model = int(raw["hidden_size"])
        expand = int(raw.get("expand", 2))
        headdim = int(raw.get("head_dim", 64))
        if raw.get("num_heads") is not None and int(raw["num_heads"]) * headdim != expand * d_model:
            raise CheckpointError(
                f"num_heads * head_dim = {int(raw['num_heads']) * headdim} != expand * hidden_size = {expand * d_model}; fix config.json."
            )
        eos = raw.get("eos_token_id")
        return cls(
            d_model=d_model,
            n_layer=int(raw["num_hidden_layers"]),
            vocab_size=int(raw["vocab_size"]),
            d_state=int(raw.get("state_size", 128)),
            d_conv=int(raw.get("conv_kernel", 4)),
            expand=expand,
            headdim=headdim,
            ngroups=int(raw.get("n_groups", 1)),
            chunk_size=int(raw.get("chunk_size", 256)),
            norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
            residual_in_fp32=bool(raw.get("residual_in_fp32", True)),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            conv_bias=bool(raw.get("use_conv_bias", True)),
            bias=bool(raw.get("use_bias", False)),
            dt_limit=_dt_limit(raw.get("time_step_limit")),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )
