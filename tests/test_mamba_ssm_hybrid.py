"""mamba_ssm's own hybrid layout: ``MambaLMHeadModel`` with ``attn_layer_idx`` (Mamba-2 blocks and MHA
blocks in one model) loads from its checkpoint directory and matches an independent reference.

The reference is transformers' ``NemotronHForCausalLM`` (one mixer a layer: Mamba-2 or NoPE attention),
whose weights are the same numbers under other names: a tiny random Nemotron-H is written out in
mamba_ssm's layout (config.json with ``ssm_cfg``, ``attn_layer_idx``, ``attn_cfg``; ``backbone.layers.{i}.mixer``
names; MHA's fused ``in_proj`` of q, k and v), loaded with :func:`load_checkpoint`, and compared; fp32 on the CPU.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from picaso_rag import CheckpointError, PicasoEngine, load_checkpoint, save_checkpoint

from .conftest import TOKENIZER_JSON
from .hybrid_checks import (QUERY, assert_bitwise_identical_for_every_order,
                            assert_one_document_composed_equals_reading_it_then_the_query, greedy_against_transformers,
                            store_round_trip)

transformers = pytest.importorskip("transformers")

VOCAB = 50288
LAYERS = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
ATTN_CFG = {"num_heads": 4, "num_heads_kv": 2, "head_dim": 8, "causal": True, "qkv_proj_bias": False, "out_proj_bias": False}


def _mamba_ssm_config() -> dict:
    return {"d_model": 32, "d_intermediate": 0, "n_layer": 4, "vocab_size": VOCAB,
            "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "d_conv": 4, "expand": 2, "headdim": 8, "ngroups": 2,
                        "chunk_size": 8},
            "attn_layer_idx": [1, 3], "attn_cfg": dict(ATTN_CFG), "rms_norm": True, "residual_in_fp32": True,
            "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": False, "norm_epsilon": 1e-5}


@pytest.fixture(scope="module")
def hf_reference_and_mamba_ssm_dir(tmp_path_factory):
    """(transformers Nemotron-H, a directory holding the same weights in mamba_ssm's layout)."""
    torch.manual_seed(0)
    config = transformers.NemotronHConfig(
        vocab_size=VOCAB, hidden_size=32, layers_block_type=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=8, n_groups=2, chunk_size=8, conv_kernel=4,
        layer_norm_epsilon=1e-5, use_conv_bias=True, use_bias=False,
        time_step_min=1e-9)  # transformers floors dt at time_step_min; mamba_ssm's dt_limit is (0, inf)
    hf_model = transformers.NemotronHForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    weights = {}
    for name, tensor in hf_model.state_dict().items():
        name = name.replace("model.", "backbone.", 1) if name.startswith("model.") else name
        name = name.replace("backbone.embeddings.", "backbone.embedding.")
        weights[name] = tensor.detach().clone().contiguous()
    for i in (1, 3):  # MHA: one in_proj of [q | k | v], out_proj
        prefix = f"backbone.layers.{i}.mixer."
        weights[prefix + "in_proj.weight"] = torch.cat([weights.pop(prefix + f"{p}_proj.weight") for p in "qkv"])
        weights[prefix + "out_proj.weight"] = weights.pop(prefix + "o_proj.weight")
    directory = tmp_path_factory.mktemp("mamba_ssm_hybrid")
    save_file(weights, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(_mamba_ssm_config()))
    shutil.copy(TOKENIZER_JSON, directory / "tokenizer.json")
    return hf_model, directory


@pytest.fixture(scope="module")
def engine(hf_reference_and_mamba_ssm_dir):
    return PicasoEngine.from_pretrained(hf_reference_and_mamba_ssm_dir[1])


def test_names_are_those_of_mamba_ssm(hf_reference_and_mamba_ssm_dir):
    """The fixture really is mamba_ssm's layout (what MambaLMHeadModel.save_pretrained writes)."""
    from safetensors.torch import load_file

    names = set(load_file(hf_reference_and_mamba_ssm_dir[1] / "model.safetensors"))
    assert "backbone.embedding.weight" in names and "backbone.layers.1.mixer.in_proj.weight" in names
    assert "backbone.layers.0.mixer.A_log" in names and not any("q_proj" in n or "self_attn" in n for n in names)


def test_logits_equal_the_reference(hf_reference_and_mamba_ssm_dir):
    hf_model, directory = hf_reference_and_mamba_ssm_dir
    model, _ = load_checkpoint(directory)
    assert model.cfg.family == "mamba_ssm" and model.cfg.attn_layers == (1, 3) and model.cfg.residual_in_fp32
    ids = torch.randint(0, 50000, (2, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(ids).logits
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_greedy_generation_equals_the_reference(hf_reference_and_mamba_ssm_dir, engine):
    got, expected = greedy_against_transformers(hf_reference_and_mamba_ssm_dir[0], engine)
    assert len(got) == 8 and got == expected


def test_one_document_composed_equals_reading_it_then_the_query(engine):
    assert_one_document_composed_equals_reading_it_then_the_query(engine)


def test_composed_state_and_answer_bitwise_identical_for_every_order(engine):
    assert_bitwise_identical_for_every_order(engine)


def test_states_round_trip_the_store_and_the_model_saves(engine, tmp_path):
    store_round_trip(engine, tmp_path / "states")
    save_checkpoint(engine.model, engine.tokenizer, tmp_path / "saved")  # saved as picaso_hybrid, fp32 residual kept
    reloaded, _ = load_checkpoint(tmp_path / "saved")
    assert reloaded.cfg.residual_in_fp32 and reloaded.cfg.layer_types == engine.model.cfg.layer_types
    ids = torch.tensor([engine.tokenize(QUERY)])
    assert torch.equal(reloaded(ids).logits, engine.model(ids).logits)


@pytest.mark.parametrize("change, match", [
    ({"d_intermediate": 64}, "d_intermediate"),
    ({"attn_cfg": {**ATTN_CFG, "d_conv": 4}}, "d_conv"),
    ({"attn_cfg": {**ATTN_CFG, "mlp_dim": 64}}, "mlp_dim"),
    ({"attn_cfg": {**ATTN_CFG, "causal": False}}, "causal"),
    ({"attn_cfg": {**ATTN_CFG, "qkv_proj_bias": True}}, "bias"),
    ({"attn_layer_idx": [1, 7]}, "outside"),
    ({"attn_cfg": {**ATTN_CFG, "num_heads_kv": 1}}, "rows"),
])
def test_unsupported_or_inconsistent_layouts_name_the_fix(hf_reference_and_mamba_ssm_dir, tmp_path, change, match):
    directory = tmp_path / "ckpt"
    shutil.copytree(hf_reference_and_mamba_ssm_dir[1], directory)
    (directory / "config.json").write_text(json.dumps({**_mamba_ssm_config(), **change}))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(directory)
