"""Configuration of hybrid models: Mamba-2 layers with a few attention layers (and MLPs).

Three checkpoint layouts become one :class:`HybridConfig`; the model code only knows this one:
- transformers ``GraniteMoeHybridForCausalLM`` (IBM Granite 4.0-H, dense and MoE): ``layer_types``,
  ``position_embedding_type`` (``"nope"``/None: attention without positions; ``"rope"``), multipliers;
- transformers ``BambaForCausalLM`` (IBM Bamba): ``attn_layer_indices``, RoPE on half of each head;
- ``picaso_hybrid``: this project's own small hybrid (no MLP, like picaso-mini).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import Mamba2Config, _dt_limit
from .errors import CheckpointError

HYBRID_MODEL_TYPES = ("granitemoehybrid", "bamba", "picaso_hybrid")
FFN_KINDS = ("none", "granite", "llama")
_MAMBA_NAMES = {"mamba", "linear_attention"}
_ATTENTION_NAMES = {"attention", "full_attention"}


def is_hybrid_config(raw: dict[str, Any]) -> bool:
    """True for config.json of a hybrid this project loads (see :data:`HYBRID_MODEL_TYPES`)."""
    return raw.get("model_type") in HYBRID_MODEL_TYPES


@dataclass(frozen=True)
class HybridConfig:
    family: str  # one of HYBRID_MODEL_TYPES: the checkpoint layout (weight names) it came from
    vocab_size: int
    d_model: int
    layer_types: tuple[str, ...]  # "mamba" or "attention", one per layer
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
    # attention layers
    n_heads: int = 8
    n_kv_heads: int = 8
    head_dim: int = 64
    attention_bias: bool = False
    attention_scale: float | None = None  # None: head_dim ** -0.5
    rotary_dim: int = 0  # 0: no positional encoding (NoPE); else RoPE on the first rotary_dim channels of a head
    rope_theta: float = 10000.0
    # feed-forward after each mixer: "none", "granite" (shared MLP, plus MoE if n_experts), "llama" (gated MLP)
    ffn: str = "none"
    ffn_dim: int = 0
    ffn_bias: bool = False
    n_experts: int = 0
    experts_per_tok: int = 0
    expert_dim: int = 0
    # the rest
    norm_eps: float = 1e-5
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0  # logits are divided by it (Granite)
    tie_embeddings: bool = False
    eos_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "dt_limit", tuple(self.dt_limit))
        bad = sorted(set(self.layer_types) - {"mamba", "attention"})
        if bad or not self.layer_types:
            raise CheckpointError(f"layer types must be 'mamba' or 'attention', got {bad or 'no layers'}; fix config.json.")
        if self.ffn not in FFN_KINDS:
            raise CheckpointError(f"unknown feed-forward kind {self.ffn!r}; one of {FFN_KINDS}.")
        if self.attn_layers and self.n_heads % self.n_kv_heads:
            raise CheckpointError(f"num_attention_heads = {self.n_heads} is not a multiple of num_key_value_heads = {self.n_kv_heads}; fix config.json.")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise CheckpointError(f"rotary dimension {self.rotary_dim} must be even and at most head_dim = {self.head_dim}.")
        if self.ssm_layers:
            self.mamba_config()  # validates the Mamba-2 shapes with Mamba2Config's messages

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
    def nheads(self) -> int:
        """Heads of the Mamba-2 layers."""
        return self.expand * self.d_model // self.headdim

    @property
    def conv_dim(self) -> int:
        return self.expand * self.d_model + 2 * self.ngroups * self.d_state

    def mamba_config(self) -> Mamba2Config:
        """The Mamba2Config of one SSM layer: the hybrid reuses picaso_rag.model.Mamba2Mixer as is."""
        return Mamba2Config(d_model=self.d_model, n_layer=len(self.ssm_layers), vocab_size=self.vocab_size,
                            d_state=self.d_state, d_conv=self.d_conv, expand=self.expand, headdim=self.headdim,
                            ngroups=self.ngroups, chunk_size=self.chunk_size, norm_eps=self.norm_eps,
                            conv_bias=self.conv_bias, bias=self.bias, dt_limit=self.dt_limit)

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Bytes of keys and values one document token adds to its state (all attention layers)."""
        return 2 * len(self.attn_layers) * self.n_kv_heads * self.head_dim * bytes_per_value

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d["layer_types"] = list(self.layer_types)
        d["dt_limit"] = [self.dt_limit[0], self.dt_limit[1] if math.isfinite(self.dt_limit[1]) else "inf"]
        return d

    def to_config_json(self) -> dict[str, Any]:
        """config.json of a ``picaso_hybrid`` checkpoint (what :func:`save_hybrid_checkpoint` writes)."""
        return {"model_type": "picaso_hybrid", "architectures": ["PicasoHybridLM"], **{**self.to_dict(), "family": "picaso_hybrid"}}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "HybridConfig":
        """Parse config.json of a Granite 4.0-H, Bamba or picaso_hybrid checkpoint.

        Usage: ``HybridConfig.from_dict(json.load(open("granite-4.0-h-tiny/config.json")))``.
        """
        kind = raw.get("model_type")
        if kind == "granitemoehybrid":
            return cls._from_granite(raw)
        if kind == "bamba":
            return cls._from_bamba(raw)
        if kind == "picaso_hybrid":
            fields = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__ and k != "extra"}
            fields["dt_limit"] = tuple(math.inf if v == "inf" else float(v) for v in fields.get("dt_limit", (0.0, "inf")))
            return cls(**fields)
        raise CheckpointError(f"model_type {kind!r} is not a hybrid picaso-rag loads; supported: {', '.join(HYBRID_MODEL_TYPES)}.")

    @staticmethod
    def _mamba_fields(raw: dict[str, Any]) -> dict[str, Any]:
        d_model, expand = int(raw["hidden_size"]), int(raw.get("mamba_expand", 2))
        n_heads = int(raw.get("mamba_n_heads", 128))
        head = raw.get("mamba_d_head", "auto")
        headdim = expand * d_model // n_heads if head in (None, "auto") else int(head)
        if n_heads * headdim != expand * d_model:
            raise CheckpointError(f"mamba_n_heads * mamba_d_head = {n_heads * headdim} != mamba_expand * hidden_size = {expand * d_model}; fix config.json.")
        if raw.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"hidden_act {raw['hidden_act']!r} is not supported (only 'silu', as in every released checkpoint).")
        eos = raw.get("eos_token_id")
        return dict(vocab_size=int(raw["vocab_size"]), d_model=d_model, d_state=int(raw.get("mamba_d_state", 256)),
                    d_conv=int(raw.get("mamba_d_conv", 4)), expand=expand, headdim=headdim,
                    ngroups=int(raw.get("mamba_n_groups", 1)), chunk_size=int(raw.get("mamba_chunk_size", 256)),
                    conv_bias=bool(raw.get("mamba_conv_bias", True)), bias=bool(raw.get("mamba_proj_bias", False)),
                    dt_limit=_dt_limit(raw.get("time_step_limit")), norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
                    n_heads=int(raw["num_attention_heads"]),
                    n_kv_heads=int(raw.get("num_key_value_heads") or raw["num_attention_heads"]),
                    head_dim=int(raw.get("head_dim") or d_model // int(raw["num_attention_heads"])),
                    attention_bias=bool(raw.get("attention_bias", False)),
                    tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
                    eos_token_id=eos[0] if isinstance(eos, list) else eos)

    @staticmethod
    def _rope_theta(raw: dict[str, Any]) -> float:
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise CheckpointError(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported; only the default RoPE.")
        return float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))

    @classmethod
    def _from_granite(cls, raw: dict[str, Any]) -> "HybridConfig":
        fields = cls._mamba_fields(raw)
        names = raw.get("layer_types") or raw.get("layers_block_type")
        if not names:
            raise CheckpointError("Granite hybrid config.json has no layer_types; restore the checkpoint's config.json.")
        unknown = sorted(set(names) - _MAMBA_NAMES - _ATTENTION_NAMES)
        if unknown:
            raise CheckpointError(f"unknown Granite layer types {unknown}; expected 'mamba' or 'attention'.")
        if len(names) != int(raw.get("num_hidden_layers", len(names))):
            raise CheckpointError(f"layer_types lists {len(names)} layers but num_hidden_layers is {raw['num_hidden_layers']}; fix config.json.")
        # Granite 4.0-H ships position_embedding_type "nope": its attention layers see no positions
        rope = raw.get("position_embedding_type") == "rope"
        n_experts = int(raw.get("num_local_experts") or 0)
        return cls(family="granitemoehybrid", layer_types=tuple("mamba" if n in _MAMBA_NAMES else "attention" for n in names),
                   attention_scale=float(raw.get("attention_multiplier", 1.0)),
                   rotary_dim=fields["head_dim"] if rope else 0, rope_theta=cls._rope_theta(raw) if rope else 10000.0,
                   ffn="granite", ffn_dim=int(raw.get("shared_intermediate_size", 1024)), n_experts=n_experts,
                   experts_per_tok=int(raw.get("num_experts_per_tok") or 0) if n_experts else 0,
                   expert_dim=int(raw.get("intermediate_size", 0)) if n_experts else 0,
                   embedding_multiplier=float(raw.get("embedding_multiplier", 1.0)),
                   residual_multiplier=float(raw.get("residual_multiplier", 1.0)),
                   logits_scaling=float(raw.get("logits_scaling", 1.0)), **fields)

    @classmethod
    def _from_bamba(cls, raw: dict[str, Any]) -> "HybridConfig":
        fields = cls._mamba_fields(raw)
        n_layer = int(raw["num_hidden_layers"])
        attn = set(raw.get("attn_layer_indices") or [])
        if any(not 0 <= i < n_layer for i in attn):
            raise CheckpointError(f"attn_layer_indices {sorted(attn)} are outside 0..{n_layer - 1}; fix config.json.")
        # transformers' BambaConfig fixes partial_rotary_factor at 0.5: RoPE on half of each head
        factor = float((raw.get("rope_parameters") or {}).get("partial_rotary_factor", 0.5))
        return cls(family="bamba", layer_types=tuple("attention" if i in attn else "mamba" for i in range(n_layer)),
                   rotary_dim=int(fields["head_dim"] * factor), rope_theta=cls._rope_theta(raw),
                   ffn="llama", ffn_dim=int(raw["intermediate_size"]), ffn_bias=bool(raw.get("mlp_bias", False)), **fields)
