"""The one description of a model: typed layers (Mamba-2 mixer, attention, MLP, MoE) and their sizes.

A pure Mamba-2 model is the case with no attention layers; a hybrid (Granite 4.0-H, Bamba,
Nemotron-H, mamba_ssm with ``attn_layer_idx``, picaso_hybrid) mixes them. Every checkpoint layout
becomes one :class:`ModelConfig` through :mod:`picaso_rag.adapters`, which maps the layouts' field
names; the model code only knows this one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .adapters import FFN_KINDS, LAYER_KINDS, config_fields, mamba2_fields
from .errors import CheckpointError


@dataclass(frozen=True)
class ModelConfig:
    family: str  # the checkpoint layout it came from (picaso_rag.adapters.FAMILIES): its weight names, how it saves
    vocab_size: int
    d_model: int
    layer_types: tuple[str, ...]  # one of LAYER_KINDS per layer ("mlp"/"moe": Nemotron-H's feed-forward layers)
    # Mamba-2 layers
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    conv_bias: bool = True
    bias: bool = False  # in_proj / out_proj bias
    dt_limit: tuple[float, float] = (0.0, math.inf)
    d_ssm: int = 0  # SSM channels (heads x headdim) where they are not expand * d_model (Nemotron-H); 0: expand * d_model
    # attention layers
    n_heads: int = 8
    n_kv_heads: int = 8
    head_dim: int = 64
    attention_bias: bool = False
    attention_scale: float | None = None  # None: head_dim ** -0.5
    rotary_dim: int = 0  # 0: no positional encoding (NoPE); else RoPE on the first rotary_dim channels of a head
    rope_theta: float = 10000.0
    # feed-forward after each mixer: "none", "granite" (shared MLP, plus MoE if n_experts), "llama" (gated MLP);
    # with "none", ffn_dim/ffn_bias size Nemotron-H's "mlp" layers and the expert fields its "moe" layers
    ffn: str = "none"
    ffn_dim: int = 0
    ffn_bias: bool = False
    n_experts: int = 0
    experts_per_tok: int = 0
    expert_dim: int = 0
    # Nemotron-H's MoE layers: a shared squared-ReLU expert beside the routed ones; the router scores
    # experts by sigmoid (plus a correction bias for the choice only), picks topk_groups of n_expert_groups
    # groups then experts_per_tok experts in them, and scales their normalised weights by routed_scaling
    shared_expert_dim: int = 0
    expert_latent_dim: int = 0  # 0: experts read d_model; else through fc1_latent_proj / fc2_latent_proj
    n_expert_groups: int = 1
    topk_groups: int = 1
    norm_topk_prob: bool = True
    routed_scaling: float = 1.0
    # the rest
    norm_eps: float = 1e-5
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0  # logits are divided by it (Granite)
    residual_in_fp32: bool = False  # the residual stream in fp32 whatever the weights' dtype (mamba_ssm's layout)
    tie_embeddings: bool = False
    eos_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "dt_limit", tuple(self.dt_limit))
        bad = sorted(set(self.layer_types) - set(LAYER_KINDS))
        if bad or not self.layer_types:
            raise CheckpointError(f"layer types must be one of {LAYER_KINDS}, got {bad or 'no layers'}; fix config.json.")
        if "mlp" in self.layer_types and self.ffn_dim < 1:
            raise CheckpointError(f"MLP layers need intermediate_size >= 1, got {self.ffn_dim}; fix config.json.")
        if "moe" in self.layer_types:
            per_group = self.n_experts // max(self.n_expert_groups, 1)
            if (self.n_expert_groups < 1 or self.n_experts % self.n_expert_groups or per_group < 2
                    or not 1 <= self.topk_groups <= self.n_expert_groups
                    or not 1 <= self.experts_per_tok <= self.topk_groups * per_group):
                raise CheckpointError(
                    f"MoE routing does not fit: {self.n_experts} experts in {self.n_expert_groups} groups (at least 2 "
                    f"experts a group), {self.topk_groups} groups kept, {self.experts_per_tok} experts a token; fix config.json.")
        if self.ffn not in FFN_KINDS:
            raise CheckpointError(f"unknown feed-forward kind {self.ffn!r}; one of {FFN_KINDS}.")
        if self.attn_layers and self.n_heads % self.n_kv_heads:
            raise CheckpointError(f"num_attention_heads = {self.n_heads} is not a multiple of num_key_value_heads = {self.n_kv_heads}; fix config.json.")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise CheckpointError(f"rotary dimension {self.rotary_dim} must be even and at most head_dim = {self.head_dim}.")
        if self.ssm_layers:
            if self.d_inner % self.headdim:
                raise CheckpointError(
                    f"the SSM width {self.d_inner} (expand * d_model) is not a multiple of headdim = {self.headdim}; "
                    "fix config.json (Mamba-2 needs d_inner divisible by headdim).")
            if self.nheads % self.ngroups:
                raise CheckpointError(f"nheads = {self.nheads} is not a multiple of ngroups = {self.ngroups}; fix config.json.")
            if self.d_conv < 1:
                raise CheckpointError(f"d_conv must be >= 1, got {self.d_conv}; fix config.json.")

    @property
    def n_layer(self) -> int:
        return len(self.layer_types)

    @property
    def ssm_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "mamba")

    @property
    def attn_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "attention")

    @property
    def d_inner(self) -> int:
        """Channels of the Mamba-2 layers (x, z and the gated norm)."""
        return self.d_ssm or self.expand * self.d_model

    @property
    def nheads(self) -> int:
        """Heads of the Mamba-2 layers."""
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Bytes of keys and values one document token adds to its state (all attention layers)."""
        return 2 * len(self.attn_layers) * self.n_kv_heads * self.head_dim * bytes_per_value

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        for name in _FIELDS_SINCE_NEMOTRON:  # at their defaults, absent: older models keep their fingerprints
            if d[name] == self.__dataclass_fields__[name].default:
                d.pop(name)
        d["layer_types"] = list(self.layer_types)
        d["dt_limit"] = [self.dt_limit[0], self.dt_limit[1] if math.isfinite(self.dt_limit[1]) else "inf"]
        return d

    def to_config_json(self) -> dict[str, Any]:
        """config.json of a ``picaso_hybrid`` checkpoint (this project's layout for any model)."""
        return {"model_type": "picaso_hybrid", "architectures": ["PicasoHybridLM"], **{**self.to_dict(), "family": "picaso_hybrid"}}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Parse config.json of any layout picaso-rag loads (see :mod:`picaso_rag.adapters`).

        Usage: ``ModelConfig.from_dict(json.load(open("granite-4.0-h-tiny/config.json")))``.
        """
        return cls(**config_fields(raw))


# fields added after the first hybrids: left out of to_dict() at their defaults (older models keep their fingerprints)
_FIELDS_SINCE_NEMOTRON = ("d_ssm", "shared_expert_dim", "expert_latent_dim", "n_expert_groups", "topk_groups",
                          "norm_topk_prob", "routed_scaling", "residual_in_fp32")


class Mamba2Config:
    """A pure Mamba-2 model's :class:`ModelConfig` (every layer a Mamba-2 mixer; as mamba_ssm builds
    it: residual stream in fp32, tied embeddings). Kept for one release: it returns a ModelConfig.

    Usage: ``cfg = Mamba2Config(d_model=768, n_layer=24, vocab_size=50288)``.
    """

    def __new__(cls, d_model: int, n_layer: int, vocab_size: int, **fields: Any) -> ModelConfig:  # type: ignore[misc]
        fields.setdefault("residual_in_fp32", True)
        fields.setdefault("tie_embeddings", True)
        fields.pop("extra", None)
        return ModelConfig(family="mamba2", vocab_size=vocab_size, d_model=d_model, layer_types=("mamba",) * n_layer, **fields)

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> ModelConfig:
        """Parse a pure Mamba-2 config.json (mamba_ssm or transformers layout); a hybrid is refused."""
        return ModelConfig(**mamba2_fields(raw))
