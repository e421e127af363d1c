"""Model families: each checkpoint layout's config fields and weight names, mapped onto the one model.

picaso_rag.config.ModelConfig and picaso_rag.model.PicasoLM know one description and one set of
names (transformers' ``GraniteMoeHybridForCausalLM`` names). A family adapter only maps:
- ``mamba2``: pure Mamba-2, in state-spaces / mamba_ssm's layout (``MambaLMHeadModel``: ``d_model``,
  ``n_layer``, ``ssm_cfg``; ``backbone.layers.{i}.mixer``) or transformers' (``Mamba2ForCausalLM``:
  ``hidden_size``, ``state_size``...; ``backbone.embeddings``);
- ``mamba_ssm``: mamba_ssm's own hybrid, ``attn_layer_idx``/``attn_cfg`` (MHA's fused ``in_proj``);
- ``granitemoehybrid``: IBM Granite 4.0-H (dense and MoE; ``position_embedding_type`` "nope" or "rope");
- ``bamba``: IBM Bamba (RoPE on half of each head);
- ``nemotron_h``: NVIDIA Nemotron-H (one mixer a layer: Mamba-2 ``M``, attention ``*``, MLP ``-``, MoE ``E``);
- ``picaso_hybrid``: this project's own layout (what :func:`picaso_rag.loading.save_checkpoint`
  writes for any model with attention layers).

Usage: ``fields = config_fields(json.load(open("config.json"))); names = internal_names(weights, cfg)``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from .errors import CheckpointError

FAMILIES = ("mamba2", "mamba_ssm", "granitemoehybrid", "bamba", "nemotron_h", "picaso_hybrid")
HYBRID_MODEL_TYPES = ("granitemoehybrid", "bamba", "nemotron_h", "picaso_hybrid")
OTHER_HYBRIDS = ("jamba", "zamba", "zamba2", "falcon_h1", "plamo2")  # hybrids this project does not load
FFN_KINDS = ("none", "granite", "llama")
# a layer's one mixer: the two with a state, and (Nemotron-H) the two feed-forward layers without one
LAYER_KINDS = ("mamba", "attention", "mlp", "moe")
_MAMBA_NAMES = {"mamba", "linear_attention"}
_ATTENTION_NAMES = {"attention", "full_attention"}


# ------------------------------------------------------------------------------- config fields
def family_of(raw: Any) -> str:
    """The family of a config.json (one of :data:`FAMILIES`); a CheckpointError naming what loads."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"config.json is a JSON {type(raw).__name__}, not an object; restore the checkpoint's config.json.")
    kind = raw.get("model_type")
    if kind in HYBRID_MODEL_TYPES:
        return kind
    if "d_model" in raw and "n_layer" in raw:
        return "mamba_ssm" if raw.get("attn_layer_idx") else "mamba2"
    if "hidden_size" in raw and "num_hidden_layers" in raw and kind in (None, "mamba2"):
        return "mamba2"
    if kind in OTHER_HYBRIDS:
        raise CheckpointError(
            f"this is a {kind} hybrid, which picaso-rag does not load yet; supported: pure Mamba-2 checkpoints and the "
            "hybrids Granite 4.0-H (granitemoehybrid), Bamba and Nemotron-H (nemotron_h) (see docs/hybrids.md).")
    raise CheckpointError(
        "config.json is neither a mamba_ssm Mamba-2 config (d_model, n_layer, ssm_cfg) nor a transformers Mamba2Config "
        f"(model_type 'mamba2') nor a hybrid picaso-rag loads ({', '.join(HYBRID_MODEL_TYPES)}); got model_type "
        f"{kind!r}, keys {sorted(raw)[:12]}. Point to a supported checkpoint directory.")


def is_hybrid_config(raw: Any) -> bool:
    """True for config.json of a model with attention layers that this project loads."""
    try:
        return family_of(raw) != "mamba2"
    except CheckpointError:
        return False


def config_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The :class:`~picaso_rag.config.ModelConfig` fields of config.json ``raw``, whatever its layout."""
    family = family_of(raw)
    if family == "mamba2":
        return mamba2_fields(raw)
    if family == "picaso_hybrid":
        fields = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "extra")}
        fields["dt_limit"] = tuple(math.inf if v == "inf" else float(v) for v in fields.get("dt_limit", (0.0, "inf")))
        return fields
    return {"mamba_ssm": _mamba_ssm_fields, "granitemoehybrid": _granite_fields, "bamba": _bamba_fields,
            "nemotron_h": _nemotron_h_fields}[family](raw)


def mamba2_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """A pure Mamba-2 config.json (either layout) as ModelConfig fields; a hybrid is refused."""
    if "d_model" in raw and "n_layer" in raw:
        legacy = _mamba2_mamba_ssm_fields(raw)
    elif "hidden_size" in raw and "num_hidden_layers" in raw and raw.get("model_type", "mamba2") == "mamba2":
        legacy = _mamba2_transformers_fields(raw)
    else:
        raise CheckpointError(
            "config.json is neither a mamba_ssm Mamba-2 config (d_model, n_layer, ssm_cfg) nor a transformers "
            f"Mamba2Config (model_type 'mamba2'); got keys {sorted(raw)[:12]}. Point to a Mamba-2 checkpoint directory.")
    n_layer = legacy.pop("n_layer")
    return dict(family="mamba2", layer_types=("mamba",) * n_layer, **legacy)


def _hybrid_mamba_fields(raw: dict[str, Any]) -> dict[str, Any]:
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


def _rope_theta(raw: dict[str, Any]) -> float:
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported; only the default RoPE.")
    return float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))


def _granite_fields(raw: dict[str, Any]) -> dict[str, Any]:
    fields = _hybrid_mamba_fields(raw)
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
    return dict(family="granitemoehybrid", layer_types=tuple("mamba" if n in _MAMBA_NAMES else "attention" for n in names),
               attention_scale=float(raw.get("attention_multiplier", 1.0)),
               rotary_dim=fields["head_dim"] if rope else 0, rope_theta=_rope_theta(raw) if rope else 10000.0,
               ffn="granite", ffn_dim=int(raw.get("shared_intermediate_size", 1024)), n_experts=n_experts,
               experts_per_tok=int(raw.get("num_experts_per_tok") or 0) if n_experts else 0,
               expert_dim=int(raw.get("intermediate_size", 0)) if n_experts else 0,
               embedding_multiplier=float(raw.get("embedding_multiplier", 1.0)),
               residual_multiplier=float(raw.get("residual_multiplier", 1.0)),
               logits_scaling=float(raw.get("logits_scaling", 1.0)), **fields)


def _bamba_fields(raw: dict[str, Any]) -> dict[str, Any]:
    fields = _hybrid_mamba_fields(raw)
    n_layer = int(raw["num_hidden_layers"])
    attn = set(raw.get("attn_layer_indices") or [])
    if any(not 0 <= i < n_layer for i in attn):
        raise CheckpointError(f"attn_layer_indices {sorted(attn)} are outside 0..{n_layer - 1}; fix config.json.")
    # transformers' BambaConfig fixes partial_rotary_factor at 0.5: RoPE on half of each head
    factor = float((raw.get("rope_parameters") or {}).get("partial_rotary_factor", 0.5))
    return dict(family="bamba", layer_types=tuple("attention" if i in attn else "mamba" for i in range(n_layer)),
               rotary_dim=int(fields["head_dim"] * factor), rope_theta=_rope_theta(raw),
               ffn="llama", ffn_dim=int(raw["intermediate_size"]), ffn_bias=bool(raw.get("mlp_bias", False)), **fields)


def _nemotron_h_fields(raw: dict[str, Any]) -> dict[str, Any]:
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
    return dict(
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



def _mamba_ssm_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """mamba_ssm's config.json with ``attn_layer_idx``: its Mamba-2 fields as a pure Mamba-2 config.json,
    its ``attn_cfg`` (MHA's arguments) for the attention layers."""
    n_layer = int(raw["n_layer"])
    attn = {int(i) for i in raw["attn_layer_idx"]}
    if any(not 0 <= i < n_layer for i in attn):
        raise CheckpointError(f"attn_layer_idx {sorted(attn)} are outside 0..{n_layer - 1}; fix config.json.")
    if raw.get("d_intermediate", 0):
        raise CheckpointError("mamba_ssm checkpoints with MLP blocks (d_intermediate > 0) are not supported yet; "
                              "use one without (d_intermediate 0), or a Granite 4.0-H / Bamba / Nemotron-H checkpoint.")
    mamba = _mamba2_mamba_ssm_fields({**raw, "attn_layer_idx": []})  # validates and reads the Mamba-2 fields
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
    head_dim = int(a.get("head_dim") or mamba["d_model"] // n_heads)
    return dict(family="mamba_ssm", vocab_size=mamba["vocab_size"], d_model=mamba["d_model"],
               layer_types=tuple("attention" if i in attn else "mamba" for i in range(n_layer)),
               d_state=mamba["d_state"], d_conv=mamba["d_conv"], expand=mamba["expand"], headdim=mamba["headdim"],
               ngroups=mamba["ngroups"], chunk_size=mamba["chunk_size"], conv_bias=mamba["conv_bias"], bias=mamba["bias"],
               dt_limit=mamba["dt_limit"], n_heads=n_heads, n_kv_heads=int(a.get("num_heads_kv") or n_heads),
               head_dim=head_dim, attention_bias=bool(a.get("qkv_proj_bias", True)),
               attention_scale=float(a["softmax_scale"]) if a.get("softmax_scale") else None,
               rotary_dim=int(a.get("rotary_emb_dim", 0)), rope_theta=float(a.get("rotary_emb_base", 10000.0)),
               norm_eps=mamba["norm_eps"], tie_embeddings=mamba["tie_embeddings"], eos_token_id=mamba["eos_token_id"],
               residual_in_fp32=mamba["residual_in_fp32"])


def _mamba2_mamba_ssm_fields(raw: dict[str, Any]) -> dict[str, Any]:
    ssm = dict(raw.get("ssm_cfg") or {})
    if ssm.get("layer", "Mamba1") != "Mamba2":
        raise CheckpointError(
            f"ssm_cfg.layer is {ssm.get('layer', 'Mamba1 (default)')!r}; picaso-rag needs a Mamba-2 checkpoint "
            "(its per-head scalar decay is what makes states composable)."
        )
    if raw.get("attn_layer_idx"):
        raise CheckpointError("this mamba_ssm checkpoint has attention layers (attn_layer_idx): it is a hybrid, not a "
                              "pure Mamba-2 config; load it with picaso_rag.load_checkpoint (or ModelConfig.from_dict).")
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
    return dict(
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


def _mamba2_transformers_fields(raw: dict[str, Any]) -> dict[str, Any]:
    d_model = int(raw["hidden_size"])
    expand = int(raw.get("expand", 2))
    headdim = int(raw.get("head_dim", 64))
    if raw.get("num_heads") is not None and int(raw["num_heads"]) * headdim != expand * d_model:
        raise CheckpointError(
            f"num_heads * head_dim = {int(raw['num_heads']) * headdim} != expand * hidden_size = {expand * d_model}; fix config.json."
        )
    eos = raw.get("eos_token_id")
    return dict(
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


def _dt_limit(raw: object) -> tuple[float, float]:
    """(low, high); transformers writes infinity as {"__float__": "Infinity"}."""
    values = [v["__float__"] if isinstance(v, dict) else v for v in (raw or (0.0, math.inf))]  # type: ignore[union-attr]
    low, high = (float(v) for v in values)
    return low, high


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


# --------------------------------------------------------------------------------- weight names
# transformers 5 renames Granite's MoE weights on load; checkpoints on the hub keep the original names
_RENAMES = {
    "mamba2": (("backbone.embeddings.", "backbone.embedding."),),  # transformers' name; then as mamba_ssm
    "granitemoehybrid": (("block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.input_linear.weight"),
                         ("block_sparse_moe.experts.down_proj", "block_sparse_moe.output_linear.weight"),
                         ("block_sparse_moe.router.weight", "block_sparse_moe.router.layer.weight")),
    "bamba": ((".pre_ff_layernorm.", ".post_attention_layernorm."), ("model.final_layernorm.", "model.norm.")),
    "nemotron_h": (),  # per layer: _nemotron_h_names
    "mamba_ssm": (),  # per layer: _mamba_ssm_names
    "picaso_hybrid": (),
}
_NEMOTRON_MIXER = {"mamba": "mamba", "attention": "self_attn", "mlp": "mlp", "moe": "mlp"}


def _nemotron_h_names(weights: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """Nemotron-H's names as the model's: ``backbone.`` (the hub's) or ``model.`` (transformers'),
    ``embeddings``/``norm_f``, each layer's ``norm`` and ``mixer`` (named here by its kind); the hub's
    one tensor per expert (``experts.{e}.up_proj.weight``) stacked into transformers' [n_experts, out, in].
    Multi-token-prediction weights (``mtp.*``) are dropped, as transformers drops them."""
    renamed: dict[str, torch.Tensor] = {}
    per_expert: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in weights.items():
        if name.startswith("mtp."):
            continue
        name = re.sub(r"^backbone\.", "model.", name)
        name = name.replace("model.embeddings.", "model.embed_tokens.").replace("model.norm_f.", "model.norm.")
        match = re.match(r"model\.layers\.(\d+)\.(norm|mixer)\.(.*)", name)
        if match and int(match[1]) < cfg.n_layer:
            i, part, rest = int(match[1]), match[2], match[3]
            if part == "norm":
                name = f"model.layers.{i}.input_layernorm.{rest}"
            else:
                name = f"model.layers.{i}.{_NEMOTRON_MIXER[cfg.layer_types[i]]}.{rest}"
        expert = re.match(r"(.*\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$", name)
        if expert:
            per_expert.setdefault(f"{expert[1]}.{expert[3]}", {})[int(expert[2])] = tensor
        else:
            renamed[name] = tensor
    for name, experts in per_expert.items():
        if sorted(experts) != list(range(cfg.n_experts)):
            raise CheckpointError(f"{name}: the checkpoint has experts {sorted(experts)[:8]}... but config.json says "
                                  f"n_routed_experts = {cfg.n_experts}; restore the checkpoint's config.json and weights.")
        renamed[name] = torch.stack([experts[e] for e in range(cfg.n_experts)])
    return renamed


def _mamba_ssm_names(weights: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """mamba_ssm's names (``backbone.layers.{i}.norm`` / ``.mixer``, MHA's fused ``in_proj`` of q, k
    and v, ``out_proj``) as the model's; the fused projection is split into q_proj, k_proj, v_proj."""
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    renamed: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        name = name.replace("backbone.embedding.", "model.embed_tokens.").replace("backbone.norm_f.", "model.norm.")
        match = re.match(r"backbone\.layers\.(\d+)\.(norm|mixer)\.(.*)", name)
        if not match or int(match[1]) >= cfg.n_layer:
            renamed[name] = tensor
            continue
        i, part, rest = int(match[1]), match[2], match[3]
        prefix = f"model.layers.{i}."
        if part == "norm":
            renamed[prefix + "input_layernorm." + rest] = tensor
        elif cfg.layer_types[i] == "mamba":
            renamed[prefix + "mamba." + rest] = tensor
        elif rest.startswith("in_proj."):  # [q | k | v] rows, as MHA splits them
            if tensor.shape[0] != q_rows + 2 * kv_rows:
                raise CheckpointError(f"{name} has {tensor.shape[0]} rows, attn_cfg says {q_rows + 2 * kv_rows} "
                                      "(heads x head_dim for q, k and v); restore the checkpoint's config.json.")
            kind = rest[len("in_proj."):]
            for proj, part_tensor in zip(("q_proj", "k_proj", "v_proj"), tensor.split([q_rows, kv_rows, kv_rows])):
                renamed[f"{prefix}self_attn.{proj}.{kind}"] = part_tensor.clone()
        else:
            renamed[prefix + "self_attn." + rest.replace("out_proj.", "o_proj.")] = tensor
    return renamed

def internal_names(weights: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """A checkpoint's weights of family ``cfg.family`` under the model's own names."""
    for old, new in _RENAMES[cfg.family]:
        weights = {k.replace(old, new): v for k, v in weights.items()}
    if cfg.family == "nemotron_h":
        return _nemotron_h_names(weights, cfg)
    if cfg.family in ("mamba_ssm", "mamba2"):
        return _mamba_ssm_names(weights, cfg)
    return weights


# -------------------------------------------------------------------- what a checkpoint writes
def is_pure_mamba2(cfg: Any) -> bool:
    return cfg.family == "mamba2" and not cfg.attn_layers and set(cfg.layer_types) == {"mamba"}


def mamba2_legacy_dict(cfg: Any) -> dict[str, Any]:
    """A pure Mamba-2 model's config as the Mamba-2-only code described it (its fingerprint hashes
    this, so that states stored before the one-model refactor stay valid)."""
    return {"d_model": cfg.d_model, "n_layer": cfg.n_layer, "vocab_size": cfg.vocab_size, "d_state": cfg.d_state,
            "d_conv": cfg.d_conv, "expand": cfg.expand, "headdim": cfg.headdim, "ngroups": cfg.ngroups,
            "chunk_size": cfg.chunk_size, "norm_eps": cfg.norm_eps, "residual_in_fp32": cfg.residual_in_fp32,
            "tie_embeddings": cfg.tie_embeddings, "conv_bias": cfg.conv_bias, "bias": cfg.bias,
            "dt_limit": list(cfg.dt_limit), "eos_token_id": cfg.eos_token_id}


def config_json(cfg: Any) -> dict[str, Any]:
    """The config.json a checkpoint of ``cfg`` is saved with: mamba_ssm's layout for a pure Mamba-2
    model (mamba_ssm loads it), ``picaso_hybrid`` for every other."""
    if not is_pure_mamba2(cfg):
        return cfg.to_config_json()
    return {
        "d_model": cfg.d_model, "d_intermediate": 0, "n_layer": cfg.n_layer, "vocab_size": cfg.vocab_size,
        "ssm_cfg": {"layer": "Mamba2", "d_state": cfg.d_state, "d_conv": cfg.d_conv, "expand": cfg.expand,
                    "headdim": cfg.headdim, "ngroups": cfg.ngroups, "chunk_size": cfg.chunk_size, "bias": cfg.bias,
                    "conv_bias": cfg.conv_bias, "dt_limit": list(cfg.dt_limit)},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": cfg.residual_in_fp32,
        "fused_add_norm": True, "pad_vocab_size_multiple": 1, "tie_embeddings": cfg.tie_embeddings,
        "norm_epsilon": cfg.norm_eps, "eos_token_id": cfg.eos_token_id,
    }


def checkpoint_names(weights: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """The model's weights under the names its checkpoint is saved with (and its fingerprint
    hashes): mamba_ssm's for a pure Mamba-2 model, the model's own for every other."""
    if not is_pure_mamba2(cfg):
        return dict(weights)
    out = {}
    for name, tensor in weights.items():
        name = name.replace("model.embed_tokens.", "backbone.embedding.").replace("model.norm.", "backbone.norm_f.")
        name = re.sub(r"^model\.layers\.(\d+)\.input_layernorm\.", r"backbone.layers.\1.norm.", name)
        name = re.sub(r"^model\.layers\.(\d+)\.mamba\.", r"backbone.layers.\1.mixer.", name)
        out[name] = tensor
    return out
