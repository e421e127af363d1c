"""NVIDIA Nemotron-H (one mixer a layer: Mamba-2 M, NoPE attention *, squared-ReLU MLP -, MoE E)
against transformers' NemotronHForCausalLM, and composed order-invariantly.

Tiny random transformers models saved with save_pretrained (the hub layout: ``backbone.``, one tensor
per expert), loaded from their directories; fp32 on the CPU. The Mamba-2 layers are 6 heads x 8 = 48
channels beside a 32-wide model (Nemotron-H sizes them by heads, not by ``expand``), in 2 groups.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from picaso_rag import CheckpointError, PicasoEngine, load_checkpoint
from picaso_rag.hybrid import SigmoidRouter
from picaso_rag.hybrid_config import HybridConfig
from picaso_rag.hybrid_engine import HybridEngine

from .conftest import TOKENIZER_JSON
from .hybrid_checks import (DOCS, assert_bitwise_identical_for_every_order,
                            assert_one_document_composed_equals_reading_it_then_the_query, greedy_against_transformers,
                            store_round_trip)

transformers = pytest.importorskip("transformers")

VOCAB = 50288  # the GPT-NeoX tokenizer's 50,277 tokens, padded
# Nemotron-H layer names (transformers 5): M = linear_attention, * = full_attention, - = mlp, E = moe
LAYERS = {"nemotron-dense": ["linear_attention", "full_attention", "mlp", "linear_attention", "mlp"],
          "nemotron-moe": ["linear_attention", "full_attention", "mlp", "moe", "linear_attention"]}


def _config(family: str):
    return transformers.NemotronHConfig(
        vocab_size=VOCAB, hidden_size=32, layers_block_type=LAYERS[family], num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=48, mamba_num_heads=6, mamba_head_dim=8, ssm_state_size=8,
        n_groups=2, chunk_size=8, layer_norm_epsilon=1e-5,
        # MoE: 8 experts in 2 groups, the best group kept, 3 experts a token, in a 16-wide latent space
        n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=3, moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=24, moe_latent_size=16, routed_scaling_factor=2.5,
        # transformers' pure-torch mixer floors dt at time_step_min (we apply time_step_limit, (0, inf) here,
        # as NVIDIA's CUDA path and vLLM do): a floor far below any dt of these weights makes the two agree
        time_step_min=1e-9)


@pytest.fixture(scope="module", params=list(LAYERS))
def hf_nemotron(request, tmp_path_factory):
    """(transformers model, its save_pretrained directory) with every weight and buffer perturbed off its init."""
    torch.manual_seed(0)
    model = transformers.NemotronHForCausalLM(_config(request.param)).eval()
    with torch.no_grad():
        for p in itertools.chain(model.parameters(), model.buffers()):  # buffers: the router's correction bias
            p.add_(torch.randn_like(p) * 0.1)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    shutil.copy(TOKENIZER_JSON, directory / "tokenizer.json")
    return model, directory


@pytest.fixture(scope="module")
def nemotron_engine(hf_nemotron) -> HybridEngine:
    return PicasoEngine.from_pretrained(hf_nemotron[1])


def test_logits_equal_transformers(hf_nemotron):
    hf_model, directory = hf_nemotron
    model, _ = load_checkpoint(directory)
    assert bool(model.cfg.attn_layers) and model.cfg.family == "nemotron_h"
    ids = torch.randint(0, 50000, (2, 29), generator=torch.Generator().manual_seed(0))  # 29: four chunks of 8
    with torch.no_grad():
        expected = hf_model(ids).logits
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_greedy_generation_equals_transformers_generate(hf_nemotron, nemotron_engine):
    got, expected = greedy_against_transformers(hf_nemotron[0], nemotron_engine)
    assert len(got) == 8 and got == expected


def test_state_holds_the_ssm_and_attention_layers_only(nemotron_engine):
    """MLP and MoE layers read each token alone: they add nothing to a document's state."""
    cfg = nemotron_engine.model.cfg
    state = nemotron_engine.encode([DOCS[0]])[0]
    n = len(nemotron_engine.tokenize(DOCS[0]))
    assert state.has_keys
    assert state.ssm.shape == (2, 6, 8, 8) and state.conv.shape == (2, 48 + 2 * 2 * 8, 3)
    assert state.keys.shape == (1, 2, n, 8) and state.position == n
    assert state.kv_bytes_per_token == 2 * 1 * 2 * 8 * 4 == cfg.kv_bytes_per_token(bytes_per_value=4)


def test_one_document_composed_equals_reading_document_then_query(nemotron_engine):
    assert_one_document_composed_equals_reading_it_then_the_query(nemotron_engine)


@pytest.mark.parametrize("hf_nemotron", ["nemotron-moe"], indirect=True)  # every layer kind: M, *, -, E
def test_composed_state_and_answer_bitwise_identical_for_every_order(hf_nemotron, nemotron_engine):
    assert_bitwise_identical_for_every_order(nemotron_engine)


@pytest.mark.parametrize("hf_nemotron", ["nemotron-moe"], indirect=True)
def test_store_round_trips_nemotron_states(hf_nemotron, nemotron_engine, tmp_path):
    store_round_trip(nemotron_engine, tmp_path / "states")


@pytest.mark.parametrize("hf_nemotron", ["nemotron-moe"], indirect=True)
def test_legacy_config_and_transformers_weight_names_load_the_same(hf_nemotron, tmp_path):
    """Older hub configs give the layers as hybrid_override_pattern letters and some fields under
    mamba_* names; weights may also come under transformers' own names (model., experts fused)."""
    _, directory = hf_nemotron
    raw = json.loads((directory / "config.json").read_text())
    letters = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}
    raw["hybrid_override_pattern"] = "".join(letters[t] for t in raw.pop("layers_block_type"))
    raw["num_hidden_layers"] = len(raw["hybrid_override_pattern"])
    for new, old in (("n_groups", "mamba_n_groups"), ("conv_kernel", "mamba_d_conv"), ("chunk_size", "mamba_chunk_size")):
        raw[old] = raw.pop(new)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    shutil.copy(directory / "tokenizer.json", tmp_path / "tokenizer.json")
    weights = load_file(directory / "model.safetensors")
    assert any(".experts.0.up_proj.weight" in name for name in weights)  # save_pretrained writes the hub layout
    fused: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        name = name.replace("backbone.", "model.")
        if ".experts." in name:
            prefix, expert, rest = name.split(".experts.")[0], int(name.split(".experts.")[1].split(".")[0]), name.split(".")[-2]
            fused.setdefault(f"{prefix}.experts.{rest}", [None] * 8)[expert] = tensor
        else:
            fused[name] = tensor
    save_file({k: torch.stack(v) if isinstance(v, list) else v for k, v in fused.items()}, tmp_path / "model.safetensors")
    original, renamed = load_checkpoint(directory)[0], load_checkpoint(tmp_path)[0]
    assert original.cfg == renamed.cfg
    for (name, a), (_, b) in zip(original.state_dict().items(), renamed.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("hf_nemotron", ["nemotron-moe"], indirect=True)
def test_routers_stay_fp32_in_a_bf16_model(hf_nemotron):
    """As transformers keeps them: a bf16 correction bias would lose the small gaps that pick the experts."""
    model, _ = load_checkpoint(hf_nemotron[1], dtype=torch.bfloat16)
    routers = [m for m in model.modules() if isinstance(m, SigmoidRouter)]
    assert model.dtype == torch.bfloat16 and len(routers) == 1
    weights = load_file(hf_nemotron[1] / "model.safetensors")
    assert torch.equal(routers[0].e_score_correction_bias, weights["backbone.layers.3.mixer.gate.e_score_correction_bias"])
    assert torch.equal(routers[0].weight, weights["backbone.layers.3.mixer.gate.weight"])
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


# -------------------------------------------------------------------------------------- config
def _raw(**fields) -> dict:
    return {"model_type": "nemotron_h", "hidden_size": 32, "vocab_size": VOCAB, "hybrid_override_pattern": "M*-",
            "mamba_num_heads": 4, "mamba_head_dim": 16, "n_groups": 2, "ssm_state_size": 8, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 48, **fields}


def test_dt_follows_time_step_limit_not_the_initialisation_bound():
    """time_step_min/max are the range dt_bias is initialised in; the dt limit is time_step_limit."""
    assert HybridConfig.from_dict(_raw(time_step_min=1e-3)).dt_limit == (0.0, math.inf)
    assert HybridConfig.from_dict(_raw(time_step_limit=[0.0, 0.5])).dt_limit == (0.0, 0.5)


@pytest.mark.parametrize("fields, message", [
    (dict(mlp_hidden_act="gelu"), "mlp_hidden_act 'gelu' is not supported"),
    (dict(mamba_hidden_act="relu"), "mamba_hidden_act 'relu' is not supported"),
    (dict(hybrid_override_pattern="M*X"), r"unknown layer letters \['X'\]"),
    (dict(hybrid_override_pattern=None), "neither layers_block_type nor hybrid_override_pattern"),
    (dict(hybrid_override_pattern="ME", n_routed_experts=6, n_group=4), "MoE routing does not fit"),
])
def test_unsupported_configs_are_refused_by_name(fields, message):
    with pytest.raises(CheckpointError, match=message):
        HybridConfig.from_dict(_raw(**fields))
