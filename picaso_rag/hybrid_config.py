"""Configuration of hybrid models: Mamba-2 layers with a few attention layers (and MLPs).

Four checkpoint layouts become one :class:`HybridConfig`; the model code only knows this one:
- transformers ``GraniteMoeHybridForCausalLM`` (IBM Granite 4.0-H, dense and MoE): ``layer_types``,
  ``position_embedding_type`` (``"nope"``/None: attention without positions; ``"rope"``), multipliers;
- transformers ``BambaForCausalLM`` (IBM Bamba): ``attn_layer_indices``, RoPE on half of each head;
- transformers ``NemotronHForCausalLM`` (NVIDIA Nemotron-H, Nemotron Nano 2 / 3): one mixer a layer,
  by ``layers_block_type`` or ``hybrid_override_pattern`` (Mamba-2 ``M``, NoPE attention ``*``,
  squared-ReLU MLP ``-``, MoE ``E``); its MLP and MoE layers carry no state;
- ``picaso_hybrid``: this project's own small hybrid (no MLP, like picaso-mini);
- mamba_ssm's ``MambaLMHeadModel`` with ``attn_layer_idx`` (state-spaces' own hybrid layout: Mamba-2
  blocks and ``MHA`` blocks in one model, the residual stream in fp32).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import Mamba2Config, _dt_limit
from .errors import CheckpointError

HYBRID_MODEL_TYPES = ("granitemoehybrid", "bamba", "nemotron_h", "picaso_hybrid")
FFN_KINDS = ("none", "granite", "llama")
# a layer's one mixer: the two with a state, and (Nemotron-H) the two feed-forward layers without one
LAYER_KINDS = ("mamba", "attention", "mlp", "moe")
_MAMBA_NAMES = {"mamba", "linear_attention"}
_ATTENTION_NAMES = {"attention", "full_attention"}


def is_hybrid_config(raw: dict[str, Any]) -> bool:
    """True for config.json of a hybrid this project loads (see :data:`HYBRID_MODEL_TYPES`), or of a
    mamba_ssm model with attention layers (``attn_layer_idx``)."""
    return isinstance(raw, dict) and (raw.get("model_type") in HYBRID_MODEL_TYPES or _is_mamba_ssm_hybrid(raw))


def _is_mamba_ssm_hybrid(raw: dict[str, Any]) -> bool:
    return isinstance(raw, dict) and "d_model" in raw and "n_layer" in raw and bool(raw.get("attn_layer_idx"))


@dataclass(frozen=True)
class HybridConfig:
    family: str  # one of HYBRID_MODEL_TYPES: the checkpoint layout (weight names) it came from
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

    def mamba_config(self) -> Mamba2Config:
        """The Mamba2Config of one SSM layer: the hybrid reuses picaso_rag.model.Mamba2Mixer as is."""
        fields = dict(d_model=self.d_model, n_layer=len(self.ssm_layers), vocab_size=self.vocab_size,
                      d_state=self.d_state, d_conv=self.d_conv, expand=self.expand, headdim=self.headdim,
                      ngroups=self.ngroups, chunk_size=self.chunk_size, norm_eps=self.norm_eps,
                      conv_bias=self.conv_bias, bias=self.bias, dt_limit=self.dt_limit)
        if self.d_inner != self.expand * self.d_model:
            return _WideMamba2Config(**fields, d_ssm=self.d_ssm)
        return Mamba2Config(**fields)

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
        """config.json of a ``picaso_hybrid`` checkpoint (what :func:`save_hybrid_checkpoint` writes)."""
        return {"model_type": "picaso_hybrid", "architectures": ["PicasoHybridLM"], **{**self.to_dict(), "family": "picaso_hybrid"}}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "HybridConfig":
        """Parse config.json of a Granite 4.0-H, Bamba, Nemotron-H or picaso_hybrid checkpoint.

        Usage: ``HybridConfig.from_dict(json.load(open("granite-4.0-h-tiny/config.json")))``.
        """
        kind = raw.get("model_type")
        if _is_mamba_ssm_hybrid(raw):
            return cls._from_mamba_ssm(raw)
        if kind == "granitemoehybrid":
            return cls._from_granite(raw)
        if kind == "bamba":
            return cls._from_bamba(raw)
        if kind == "nemotron_h":
            return cls._from_nemotron_h(raw)
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
    def _from_mamba_ssm(cls, raw: dict[str, Any]) -> "HybridConfig":
        """mamba_ssm's config.json with ``attn_layer_idx``: its Mamba-2 fields as Mamba2Config reads them,
        its ``attn_cfg`` (MHA's arguments) for the attention layers."""
        n_layer = int(raw["n_layer"])
        attn = {int(i) for i in raw["attn_layer_idx"]}
        if any(not 0 <= i < n_layer for i in attn):
            raise CheckpointError(f"attn_layer_idx {sorted(attn)} are outside 0..{n_layer - 1}; fix config.json.")
        if raw.get("d_intermediate", 0):
            raise CheckpointError("mamba_ssm checkpoints with MLP blocks (d_intermediate > 0) are not supported yet; "
                                  "use one without (d_intermediate 0), or a Granite 4.0-H / Bamba / Nemotron-H checkpoint.")
        mamba = Mamba2Config._from_mamba_ssm({**raw, "attn_layer_idx": []})  # validates and reads the Mamba-2 fields
        a = dict(raw.get("attn_cfg") or {})
        for name, why in (("d_conv", "a causal conv1d before attention"), ("mlp_dim", "an MLP fused into attention")):
            if a.get(name, 0):
                raise CheckpointError(f"attn_cfg.{name} > 0 ({why}) is not supported; use attention layers without it.")
        if not a.get("causal", False):
            raise CheckpointError("attn_cfg.causal is not true: a language model's attention must be causal; fix config.json.")
        if a.get("rotary_emb_interleaved", False):
            raise CheckpointError("attn_cfg.rotary_emb_interleaved is not supported (only the rotate-half RoPE).")
        if bool(a.get("qkv_proj_bias", True)) != bool(a.get("out_proj_bias", True)):
            raise CheckpointError("attn_cfg.qkv_proj_bias and out_proj_bias differ, which picaso-rag does not support; "
                                  "use attention layers with both or neither.")
        n_heads = int(a["num_heads"])
        head_dim = int(a.get("head_dim") or mamba.d_model // n_heads)
        return cls(family="mamba_ssm", vocab_size=mamba.vocab_size, d_model=mamba.d_model,
                   layer_types=tuple("attention" if i in attn else "mamba" for i in range(n_layer)),
                   d_state=mamba.d_state, d_conv=mamba.d_conv, expand=mamba.expand, headdim=mamba.headdim,
                   ngroups=mamba.ngroups, chunk_size=mamba.chunk_size, conv_bias=mamba.conv_bias, bias=mamba.bias,
                   dt_limit=mamba.dt_limit, n_heads=n_heads, n_kv_heads=int(a.get("num_heads_kv") or n_heads),
                   head_dim=head_dim, attention_bias=bool(a.get("qkv_proj_bias", True)),
                   attention_scale=float(a["softmax_scale"]) if a.get("softmax_scale") else None,
                   rotary_dim=int(a.get("rotary_emb_dim", 0)), rope_theta=float(a.get("rotary_emb_base", 10000.0)),
                   norm_eps=mamba.norm_eps, tie_embeddings=mamba.tie_embeddings, eos_token_id=mamba.eos_token_id,
                   residual_in_fp32=mamba.residual_in_fp32)

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

    @classmethod
    def _from_nemotron_h(cls, raw: dict[str, Any]) -> "HybridConfig":
        """transformers' NemotronHConfig: its field names, its defaults (save_pretrained may leave defaults
        out), and the legacy ``mamba_*`` names it still accepts (they win, as in its __post_init__)."""
        defaults = dict(ssm_state_size=128, mamba_num_heads=128, mamba_head_dim=64, n_groups=8, conv_kernel=4,
                        chunk_size=128, use_conv_bias=True, num_attention_heads=32, num_key_value_heads=8,
                        intermediate_size=21504, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=7688,
                        moe_shared_expert_intermediate_size=7688, n_group=1, topk_group=1)
        legacy = dict(n_groups="mamba_n_groups", conv_kernel="mamba_d_conv", use_conv_bias="mamba_conv_bias",
                      chunk_size="mamba_chunk_size", time_step_limit="mamba_dt_limit")

        def get(name: str) -> Any:
            if name in legacy and raw.get(legacy[name]) is not None:
                return raw[legacy[name]]
            value = raw.get(name)
            return defaults.get(name) if value is None else value

        kinds = _nemotron_layer_kinds(raw)
        for field_name, wanted in (("mamba_hidden_act", "silu"), ("mlp_hidden_act", "relu2")):
            if raw.get(field_name, wanted) != wanted:
                raise CheckpointError(f"{field_name} {raw[field_name]!r} is not supported (only {wanted!r}, as in every "
                                      "released Nemotron-H); fix config.json.")
        d_model, n_heads = int(raw["hidden_size"]), int(get("num_attention_heads"))
        mamba_heads, mamba_head_dim = int(get("mamba_num_heads")), int(get("mamba_head_dim"))
        moe = "moe" in kinds
        latent = raw.get("moe_latent_size")
        eos = raw.get("eos_token_id", 2)
        return cls(
            family="nemotron_h", vocab_size=int(raw.get("vocab_size", 131072)), d_model=d_model, layer_types=kinds,
            d_state=int(get("ssm_state_size")), d_conv=int(get("conv_kernel")), expand=int(raw.get("expand", 2)),
            headdim=mamba_head_dim, d_ssm=mamba_heads * mamba_head_dim, ngroups=int(get("n_groups")),
            chunk_size=int(get("chunk_size")), conv_bias=bool(get("use_conv_bias")), bias=bool(raw.get("use_bias", False)),
            # the checkpoint's time_step_limit, as NVIDIA's CUDA path and vLLM apply it; transformers' mixer
            # instead floors dt at time_step_min, an initialisation bound (see docs/hybrids.md)
            dt_limit=_dt_limit(get("time_step_limit")),
            n_heads=n_heads, n_kv_heads=int(get("num_key_value_heads") or n_heads),
            head_dim=int(raw.get("head_dim") or raw.get("attention_head_dim") or 128),
            attention_bias=False,  # transformers builds Nemotron-H's attention without biases whatever the config says
            ffn="none", ffn_dim=int(get("intermediate_size")) if "mlp" in kinds else 0,
            ffn_bias=bool(raw.get("mlp_bias", False)),
            n_experts=int(get("n_routed_experts")) if moe else 0,
            experts_per_tok=int(get("num_experts_per_tok")) if moe else 0,
            expert_dim=int(get("moe_intermediate_size")) if moe else 0,
            shared_expert_dim=int(get("moe_shared_expert_intermediate_size")) if moe else 0,
            expert_latent_dim=int(latent) if moe and latent else 0,
            n_expert_groups=int(get("n_group")) if moe else 1, topk_groups=int(get("topk_group")) if moe else 1,
            norm_topk_prob=bool(raw.get("norm_topk_prob", True)), routed_scaling=float(raw.get("routed_scaling_factor", 1.0)),
            norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
            tie_embeddings=False,  # NemotronHForCausalLM never ties its lm_head to the embedding
            eos_token_id=eos[0] if isinstance(eos, list) else eos)


# Nemotron-H names its layers by letter (hybrid_override_pattern) or by name (layers_block_type; transformers 5
# renamed "mamba"/"attention" to "linear_attention"/"full_attention")
_NEMOTRON_LETTERS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
_NEMOTRON_NAMES = {"mamba": "mamba", "linear_attention": "mamba", "attention": "attention", "full_attention": "attention",
                   "mlp": "mlp", "moe": "moe"}


def _nemotron_layer_kinds(raw: dict[str, Any]) -> tuple[str, ...]:
    names = raw.get("layers_block_type") or raw.get("layer_types")
    if names:
        unknown = sorted({n for n in names if n not in _NEMOTRON_NAMES})
        if unknown:
            raise CheckpointError(f"unknown Nemotron-H layer types {unknown}; expected {sorted(_NEMOTRON_NAMES)}.")
        return tuple(_NEMOTRON_NAMES[n] for n in names)
    pattern = raw.get("hybrid_override_pattern")
    if not pattern:
        raise CheckpointError("Nemotron-H config.json has neither layers_block_type nor hybrid_override_pattern; "
                              "restore the checkpoint's config.json.")
    unknown = sorted(set(pattern) - set(_NEMOTRON_LETTERS))
    if unknown:
        raise CheckpointError(f"hybrid_override_pattern has unknown layer letters {unknown}; expected M (Mamba-2), "
                              "* (attention), - (MLP) or E (MoE).")
    if len(pattern) != int(raw.get("num_hidden_layers") or len(pattern)):
        raise CheckpointError(f"hybrid_override_pattern has {len(pattern)} layers but num_hidden_layers is "
                              f"{raw['num_hidden_layers']}; fix config.json.")
    return tuple(_NEMOTRON_LETTERS[c] for c in pattern)


# fields added with Nemotron-H: left out of to_dict() at their defaults
_FIELDS_SINCE_NEMOTRON = ("d_ssm", "shared_expert_dim", "expert_latent_dim", "n_expert_groups", "topk_groups",
                          "norm_topk_prob", "routed_scaling", "residual_in_fp32")


@dataclass(frozen=True)
class _WideMamba2Config(Mamba2Config):
    """A Mamba-2 layer whose SSM width is not expand * d_model (Nemotron-H: mamba_num_heads * mamba_head_dim,
    e.g. 128 x 80 = 10,240 channels beside a 4,480-wide Nemotron Nano 9B v2); Mamba2Mixer reads cfg.d_inner."""

    d_ssm: int = 0

    @property
    def d_inner(self) -> int:
        return self.d_ssm
