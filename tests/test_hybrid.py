"""Hybrid models (Mamba-2 + attention layers): against transformers, and composed order-invariantly.

Granite 4.0-H (dense and MoE, NoPE attention) and Bamba (RoPE) as tiny random transformers models
saved with save_pretrained, loaded from their directories; fp32 on the CPU.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from picaso_rag import CheckpointError, PicasoEngine, load_checkpoint
from picaso_rag.compose import compose
from picaso_rag.errors import PicasoError, StateMismatchError
from picaso_rag.hybrid import HybridLM, init_weights
from picaso_rag.hybrid_config import HybridConfig
from picaso_rag.hybrid_engine import HybridEngine
from picaso_rag.store import StoreStatus

from .conftest import TOKENIZER_JSON
from .hybrid_checks import DOCS, QUERY, assert_bitwise_identical_for_every_order, greedy_against_transformers, store_round_trip

transformers = pytest.importorskip("transformers")

VOCAB = 50288  # the GPT-NeoX tokenizer's 50,277 tokens, padded
MAMBA = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=2, mamba_chunk_size=8)


def _granite(n_experts: int, rope: bool = False):
    return transformers.GraniteMoeHybridConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=16, shared_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=n_experts, num_experts_per_tok=2,
        layer_types=["mamba", "attention", "mamba"], embedding_multiplier=2.0, residual_multiplier=0.5,
        attention_multiplier=0.3, logits_scaling=3.0, position_embedding_type="rope" if rope else "nope",
        tie_word_embeddings=n_experts == 0, **MAMBA), transformers.GraniteMoeHybridForCausalLM


def _bamba():
    return transformers.BambaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_indices=[1], **MAMBA), transformers.BambaForCausalLM


FAMILIES = {"granite-dense": lambda: _granite(0), "granite-moe": lambda: _granite(4), "bamba": _bamba}


@pytest.fixture(scope="module", params=list(FAMILIES))
def hf_hybrid(request, tmp_path_factory):
    """(transformers model, its save_pretrained directory) with every weight perturbed off its init."""
    config, cls = FAMILIES[request.param]()
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    shutil.copy(TOKENIZER_JSON, directory / "tokenizer.json")
    return model, directory


@pytest.fixture(scope="module")
def hybrid_engines(hf_hybrid) -> HybridEngine:
    return PicasoEngine.from_pretrained(hf_hybrid[1])


def test_logits_equal_transformers(hf_hybrid):
    hf_model, directory = hf_hybrid
    model, _ = load_checkpoint(directory)
    assert bool(model.cfg.attn_layers)
    ids = torch.randint(0, 50000, (2, 29), generator=torch.Generator().manual_seed(0))  # 29: four chunks of 8
    with torch.no_grad():
        expected = hf_model(ids).logits
    got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hf_hybrid", ["granite-moe"], indirect=True)  # the family with experts
def test_granite_moe_weights_under_their_transformers5_names_load_the_same(hf_hybrid, tmp_path):
    _, directory = hf_hybrid
    weights = load_file(directory / "model.safetensors")
    assert any("block_sparse_moe" in name for name in weights)
    renames = {"block_sparse_moe.input_linear.weight": "block_sparse_moe.experts.gate_up_proj",
               "block_sparse_moe.output_linear.weight": "block_sparse_moe.experts.down_proj",
               "block_sparse_moe.router.layer.weight": "block_sparse_moe.router.weight"}
    renamed = {}
    for name, tensor in weights.items():
        for old, new in renames.items():
            name = name.replace(old, new)
        renamed[name] = tensor
    for file in ("config.json", "tokenizer.json"):
        shutil.copy(directory / file, tmp_path / file)
    save_file(renamed, tmp_path / "model.safetensors")
    original, renamed_model = load_checkpoint(directory)[0], load_checkpoint(tmp_path)[0]
    for (name, a), (_, b) in zip(original.state_dict().items(), renamed_model.state_dict().items()):
        assert torch.equal(a, b), name


def test_unsupported_hybrids_are_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "jamba", "hidden_size": 64}))
    with pytest.raises(CheckpointError, match="jamba hybrid.*Granite 4.0-H"):
        load_checkpoint(tmp_path)


def test_greedy_generation_equals_transformers_generate(hf_hybrid, hybrid_engines):
    """transformers decodes with its own cache (recurrent step + growing KV cache, RoPE positions)."""
    got, expected = greedy_against_transformers(hf_hybrid[0], hybrid_engines)
    assert got[: len(expected)] == expected[: len(got)]


def test_one_document_composed_equals_reading_document_then_query(hybrid_engines):
    engine = hybrid_engines
    expected, _ = engine.read(engine.tokenize(DOCS[2]) + engine.tokenize(QUERY))
    state = engine.encode([DOCS[2]])
    for method in ("picaso-s", "caso"):  # PICASO-R and soup weigh one document as PICASO-S does
        got, _ = engine.read(QUERY, state=engine.compose(state, method=method))
        torch.testing.assert_close(got, expected[-got.shape[0]:], rtol=1e-4, atol=1e-5)


# Granite dense runs the MoE model's code less its experts: the MoE case covers it
@pytest.mark.parametrize("hf_hybrid", ["granite-moe", "bamba"], indirect=True)
def test_composed_state_and_answer_bitwise_identical_for_every_order(hf_hybrid, hybrid_engines):
    assert_bitwise_identical_for_every_order(hybrid_engines)


def test_state_holds_every_layer_and_reports_bytes_per_token(hybrid_engines):
    cfg = hybrid_engines.model.cfg
    state = hybrid_engines.encode([DOCS[0]])[0]
    assert state.has_keys
    n = len(hybrid_engines.tokenize(DOCS[0]))
    assert state.ssm.shape[0] == 2 and state.keys.shape == (1, cfg.n_kv_heads, n, cfg.head_dim) and state.position == n
    assert state.kv_bytes_per_token == 2 * 1 * 2 * 8 * 4 == cfg.kv_bytes_per_token(bytes_per_value=4)
    longer = hybrid_engines.encode([DOCS[0] + DOCS[1]])[0]
    assert longer.nbytes - state.nbytes == (longer.n_keys - state.n_keys) * state.kv_bytes_per_token


def test_batched_encoding_equals_one_at_a_time(hybrid_engines):
    together = hybrid_engines.encode(DOCS, batch_size=3)  # padded to the longest
    for text, state in zip(DOCS, together):
        alone = hybrid_engines.encode([text])[0]
        for name, tensor in alone.tensors().items():
            torch.testing.assert_close(state.tensors()[name], tensor, rtol=1e-5, atol=1e-6)


def test_prompts_read_together_from_states_of_different_lengths_equal_one_at_a_time(hybrid_engines):
    """What the batched scheduler's join runs: rows with pasts of different lengths (padded after
    their own keys, ``key_lengths``), prompts right-padded, each row at its own RoPE position, read
    in one forward; each row's logits and new keys equal reading it alone."""
    engine = hybrid_engines
    states = engine.encode(DOCS)
    contexts = [engine.compose(states[:2], "picaso-s"), engine.compose(states[2:], "picaso-s"), None]
    prompts = [engine.tokenize(t) for t in (QUERY, " Cells", " Where does the Rhine rise? It rises in")]
    begun = [engine._start(c) for c in contexts]
    n_docs, lengths = [b[2].shape[3] for b in begun], [len(p) for p in prompts]
    assert len(set(n_docs)) == 3 and len(set(lengths)) == 3 and len({b[4] for b in begun}) == 3
    model, cfg = engine.model, engine.model.cfg
    # padding of large garbage: were it seen, it would dominate the attention (NaN cannot be used: 0 x NaN)
    past = torch.randn(3, len(cfg.attn_layers), cfg.n_kv_heads, max(n_docs), cfg.head_dim) * 100
    past_values = torch.randn_like(past) * 100
    ids = torch.zeros(3, max(lengths), dtype=torch.long)
    for row, (b, p) in enumerate(zip(begun, prompts)):
        past[row, :, :, :n_docs[row]], past_values[row, :, :, :n_docs[row]] = b[2][0], b[3][0]
        ids[row, :len(p)] = torch.tensor(p)
    out = model(ids, ssm_state=torch.cat([b[0] for b in begun]), conv_state=torch.cat([b[1] for b in begun]), keys=past,
                values=past_values, position=torch.tensor([b[4] for b in begun]), lengths=torch.tensor(lengths),
                key_lengths=torch.tensor(n_docs), logits="last")
    for row, (b, p) in enumerate(zip(begun, prompts)):
        alone = model(torch.tensor([p]), ssm_state=b[0], conv_state=b[1], keys=b[2], values=b[3], position=b[4], logits="last")
        torch.testing.assert_close(out.logits[row], alone.logits[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.keys[row, :, :, :len(p)], alone.keys[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.ssm_state[row], alone.ssm_state[0], rtol=1e-4, atol=1e-5)


def test_store_keeps_hybrid_states_with_their_guarantees(hybrid_engines, tmp_path):
    engine = hybrid_engines
    store, _ = store_round_trip(engine, tmp_path / "states")
    path = store.path("node-0", engine.fingerprint)  # a flipped bit in the keys is caught
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start = json.loads(data[8:8 + header_len])["keys"]["data_offsets"][0]
    data[8 + header_len + start] ^= 0x01
    path.write_bytes(bytes(data))
    assert store.get("node-0", engine.fingerprint, text=DOCS[0]).status is StoreStatus.CORRUPT


def test_long_documents_are_encoded_in_segments_with_the_same_state(hybrid_engines):
    engine = hybrid_engines
    whole = engine.encode(DOCS)
    default, engine.encode_segment_tokens = engine.encode_segment_tokens, 8  # one chunk: several segments a document
    try:
        pieces = engine.encode(DOCS, batch_size=3)
    finally:
        engine.encode_segment_tokens = default
    for a, b in zip(whole, pieces):
        assert a.position == b.position
        for name, tensor in a.tensors().items():
            torch.testing.assert_close(b.tensors()[name], tensor, rtol=1e-4, atol=1e-5)


def test_states_of_another_model_or_kind_are_refused(hybrid_engines, tokenizer):
    other = PicasoEngine(init_weights(HybridLM(_attention_only(rotary_dim=0)), seed=3), tokenizer)
    with pytest.raises(StateMismatchError):
        hybrid_engines.compose(other.encode([DOCS[0]]))
    with pytest.raises(PicasoError):
        compose(hybrid_engines.encode([DOCS[0]]), method="unknown")


# ------------------------------------------------------------- one attention layer: exact identities
def _attention_only(rotary_dim: int) -> HybridConfig:
    return HybridConfig(family="picaso_hybrid", vocab_size=VOCAB, d_model=32, layer_types=("attention",), n_heads=4,
                        n_kv_heads=2, head_dim=8, rotary_dim=rotary_dim)


@pytest.mark.parametrize("method", ["picaso-s", "picaso-r", "soup", "caso"])
def test_nope_attention_union_of_documents_equals_concatenation(tokenizer, method):
    """One NoPE attention layer: a token's key and value depend on the token alone, so the union of
    the documents' keys and values is exactly what the query sees after their concatenation."""
    engine = PicasoEngine(init_weights(HybridLM(_attention_only(rotary_dim=0)), seed=1), tokenizer)
    composed = engine.compose(engine.encode(DOCS), method=method)
    got, _ = engine.read(QUERY, state=composed)
    expected, _ = engine.read(sum((engine.tokenize(d) for d in DOCS), []) + engine.tokenize(QUERY))
    torch.testing.assert_close(got, expected[-got.shape[0]:], rtol=1e-4, atol=1e-5)


def test_rope_attention_caso_moves_documents_after_each_other(tokenizer):
    """One RoPE layer: CASO re-rotates each stored document's keys to where a concatenation puts
    them (and a prefix's), which is then exact; PICASO reads the query after the longest document."""
    engine = PicasoEngine(init_weights(HybridLM(_attention_only(rotary_dim=8)), seed=1), tokenizer)
    _, prefix = engine.read("Context:")
    composed = engine.compose(engine.encode(DOCS), method="caso", prefix=prefix)
    got, _ = engine.read(QUERY, state=composed)
    ids = engine.tokenize("Context:") + sum((engine.tokenize(d) for d in DOCS), []) + engine.tokenize(QUERY)
    expected, _ = engine.read(ids)
    torch.testing.assert_close(got, expected[-got.shape[0]:], rtol=1e-4, atol=1e-5)
    parallel = engine.compose(engine.encode(DOCS), method="picaso-s", prefix=prefix)
    assert parallel.position == prefix.position + max(len(engine.tokenize(d)) for d in DOCS)


def test_encoding_errors_name_the_failing_text(hybrid_engines):
    engine = hybrid_engines
    with pytest.raises(PicasoError, match="text 1 "):
        engine.encode(["fine", [engine.model.cfg.vocab_size + 5]])  # an id outside the vocabulary
    with pytest.raises(PicasoError, match="text 2 "):
        engine.encode(["fine", "also fine", "x" * (16 * engine.max_document_tokens + 1)])
