"""Composition fine-tuning (BP2C, BPTC) of hybrid models: the composed context of a HybridLM is its
SSM states composed as for Mamba-2 models plus the union of the documents' keys and values.

Tiny random picaso_hybrid models (2 Mamba-2 and 2 attention layers, NoPE or RoPE; one all-attention
model) on the CPU, fp32. References: reading document + target at once (k = 1), and
:func:`picaso_rag.compose.compose_hybrid` on each row's per-document HybridStates (k = 2, 3).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from picaso_rag import PicasoEngine
from picaso_rag.compose import METHODS, compose_hybrid
from picaso_rag.hybrid import HybridLM, init_weights
from picaso_rag.hybrid_config import HybridConfig
from picaso_rag.loading import load_checkpoint, save_hybrid_checkpoint
from picaso_rag.state import HybridState
from picaso_rag.training import composition_loss
from picaso_rag.training.__main__ import main as cli
from picaso_rag.training.train import compose_hybrid_batch

from .conftest import TEXTS

VOCAB = 512
SEP = torch.tensor([7, 7])  # two separator tokens (as "\n\n" may be); ids the test batches never draw
B, S, T = 2, 6, 7  # rows, tokens per document (+ separator), target tokens


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tensors of a few hundred values: a second thread only adds hand-off waits (10x slower on a busy machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_hybrid(seed: int = 0, **overrides) -> HybridLM:
    base = dict(family="picaso_hybrid", vocab_size=VOCAB, d_model=32, layer_types=("mamba", "attention", "mamba", "attention"),
                n_heads=2, n_kv_heads=1, head_dim=16, d_state=8, headdim=16, ngroups=1, chunk_size=8,
                tie_embeddings=False)  # untied: a token read only in the documents has an embedding row only they reach
    base.update(overrides)
    # std 0.1: logits far from uniform, so a wrong state shows in the loss
    return init_weights(HybridLM(HybridConfig(**base)), seed=seed, std=0.1).train()


MODELS = {
    "nope": lambda: tiny_hybrid(),
    "rope": lambda: tiny_hybrid(rotary_dim=8),
    "attention-only": lambda: tiny_hybrid(layer_types=("attention", "attention")),
}


def batch(k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """contexts [B, k, S] with ids in 300..511, targets [B, T] with ids in 10..299: disjoint, so the
    embedding rows 300..511 are reached through the documents only."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(300, VOCAB, (B, k, S), generator=g), torch.randint(10, 300, (B, T), generator=g)


def target_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets[:, 1:].flatten())


# ----------------------------------------------------------------------------- what is computed
@pytest.mark.parametrize("name", ["nope", "rope"])
def test_one_document_loss_is_the_nll_of_reading_document_and_target(name):
    model = MODELS[name]()
    contexts, targets = batch(k=1)
    # the plain reading: document, separator, target in one sequence from position 0
    whole = torch.cat([contexts[:, 0], SEP.expand(B, -1), targets], dim=1)
    doc_len = S + len(SEP)
    expected = target_nll(model(whole[:, :-1]).logits[:, doc_len:], targets)
    for method in METHODS:
        for mode in ("bp2c", "bptc"):
            got = composition_loss(model, contexts, targets, SEP, method, mode)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"{method} {mode}")
    with torch.no_grad():  # and it is not the loss without the document
        assert (composition_loss(model, contexts[:, :0], targets, SEP) - expected).abs() > 1e-3


def per_row_reference(model: HybridLM, contexts, targets, method: str, grad: bool) -> torch.Tensor:
    """The engine's way, one row at a time: each document read alone into a HybridState,
    compose_hybrid (canonical order, shift_keys as engine.compose passes it), the target read after."""
    losses = []
    for row in range(contexts.shape[0]):
        docs = torch.cat([contexts[row], SEP.expand(contexts.shape[1], -1)], dim=1)
        with torch.set_grad_enabled(grad):
            states = []
            for doc in docs:
                out = model(doc[None], logits="none")
                states.append(HybridState(ssm=out.ssm_state[0], conv=out.conv_state[0], log_decay=out.log_decay[0],
                                          n_tokens=doc.numel(), fingerprint="f" * 64, keys=out.keys[0],
                                          values=out.values[0], position=doc.numel()))
            ctx = compose_hybrid(states, method, shift_keys=model.shift_keys)
        logits = model(targets[row:row + 1, :-1], ssm_state=ctx.ssm[None], conv_state=ctx.conv[None],
                       keys=ctx.keys[None], values=ctx.values[None], position=ctx.position).logits
        losses.append(target_nll(logits, targets[row:row + 1]))
    return torch.stack(losses).mean()  # rows score equally many tokens: the batch's mean


def grads(model: HybridLM, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["nope", "rope"])
def test_batched_composition_equals_compose_hybrid_row_by_row(name):
    """k = 2 for every method (two documents have one cyclic order: PICASO-R is order-free too),
    k = 3 for the order-free methods and CASO; values, and BPTC's and BP2C's gradients."""
    model = MODELS[name]()
    for k, methods in ((2, METHODS), (3, ("caso", "picaso-s", "soup"))):
        contexts, targets = batch(k, seed=k)
        for method in methods:
            with torch.no_grad():
                torch.testing.assert_close(composition_loss(model, contexts, targets, SEP, method),
                                           per_row_reference(model, contexts, targets, method, grad=False),
                                           rtol=1e-5, atol=1e-5, msg=f"k={k} {method}")
    # gradients: CASO (compose_hybrid sorts the order-free methods' states by their values' bytes,
    # which it reads off the graph; CASO keeps the given order, and moves RoPE keys)
    contexts, targets = batch(3, seed=5)
    for mode in ("bptc", "bp2c"):
        got = grads(model, composition_loss(model, contexts, targets, SEP, "caso", mode))
        expected = grads(model, per_row_reference(model, contexts, targets, "caso", grad=mode == "bptc"))
        for n in got:
            torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-6, msg=f"{mode} {n}")


# ---------------------------------------------------------------------------- where gradients go
DOC_ROWS = slice(300, VOCAB)  # embedding rows of tokens that only the documents hold


@pytest.mark.parametrize("name", ["nope", "attention-only"])
def test_gradients_bp2c_to_the_composition_bptc_through_the_documents(name):
    """BP2C trains the reading of the target only: the documents' pass (SSM states *and* keys/values)
    runs without gradient, so embedding rows of document-only tokens get exactly none. BPTC reaches
    them, and (all-attention model; mixed model with the SSM route kept and keys/values detached)
    it does through the keys and values."""
    model = MODELS[name]()
    contexts, targets = batch(k=3, seed=1)
    passes = []
    hook = model.register_forward_hook(lambda m, inp, out: passes.append(out))
    bp2c = grads(model, composition_loss(model, contexts, targets, SEP, "picaso-s", "bp2c"))
    docs_bp2c = passes[0]
    passes.clear()
    bptc = grads(model, composition_loss(model, contexts, targets, SEP, "picaso-s", "bptc"))
    docs_bptc = passes[0]
    hook.remove()
    assert not docs_bp2c.keys.requires_grad and not docs_bp2c.values.requires_grad and not docs_bp2c.ssm_state.requires_grad
    assert docs_bptc.keys.requires_grad and docs_bptc.values.requires_grad
    # both modes train the weights that read the target: every attention projection, every Mamba-2 input projection
    for g in (bp2c, bptc):
        trained = [n for n in g if ("self_attn" in n or "in_proj" in n) and "weight" in n]
        assert trained and all(g[n].abs().sum() > 0 for n in trained), [n for n in trained if g[n].abs().sum() == 0]
    emb = "model.embed_tokens.weight"
    assert bp2c[emb][DOC_ROWS].abs().max() == 0  # no gradient into the documents' encoding
    assert bptc[emb][DOC_ROWS].abs().max() > 1e-6  # BPTC: through the composition into it
    shared = "model.layers.1.self_attn.k_proj.weight"  # read by both passes: BPTC adds the documents' part
    assert (bp2c[shared] - bptc[shared]).abs().max() > 1e-6

    # the route through the keys and values: the same loss with only them detached loses that part
    docs = torch.cat([contexts, SEP.expand(B, 3, -1)], dim=-1).flatten(0, 1)
    state, position = compose_hybrid_batch(model, model(docs, logits="none"), B, 3, "picaso-s")
    kv_detached = {**state, "keys": state["keys"].detach(), "values": state["values"].detach()}
    no_kv = grads(model, target_nll(model(targets[:, :-1], position=position, **kv_detached).logits, targets))
    assert (no_kv[emb][DOC_ROWS] - bptc[emb][DOC_ROWS]).abs().max() > 1e-6
    if name == "attention-only":  # nothing else carries the documents: detached keys/values = BP2C
        torch.testing.assert_close(no_kv[emb], bp2c[emb])


# ------------------------------------------------------------------------------- the command line
def test_cli_finetunes_a_hybrid_checkpoint_end_to_end(tmp_path, tokenizer):
    vocab = tokenizer.vocab_size + (-tokenizer.vocab_size) % 16
    model = init_weights(HybridLM(HybridConfig(
        family="picaso_hybrid", vocab_size=vocab, d_model=32, layer_types=("mamba", "attention", "mamba", "attention"),
        n_heads=2, n_kv_heads=2, head_dim=16, d_state=8, headdim=16, ngroups=1, chunk_size=8, tie_embeddings=True,
        eos_token_id=tokenizer.eos_token_id)), seed=0)
    base = save_hybrid_checkpoint(model, tokenizer, tmp_path / "base")
    # a token file: documents of ~50 tokens, each followed by EOS
    docs = [" ".join(TEXTS[(i + j) % len(TEXTS)] for j in range(3)) for i in range(12)]
    np.array([t for d in docs for t in (*tokenizer.encode(d), tokenizer.eos_token_id)], dtype=np.uint16).tofile(tmp_path / "t.bin")
    for mode, method in (("bptc", "picaso-r"), ("bp2c", "caso")):
        out = tmp_path / mode
        cli(["finetune", "--model", str(base), "--data", str(tmp_path / "t.bin"), "--mode", mode, "--method", method,
             "--segment-len", "8", "--n-passages", "20", "--max-k", "3", "--batch-size", "2", "--max-steps", "3",
             "--lr", "1e-2", "--device", "cpu", "--out", str(out)])
        history = json.loads((out / "history.json").read_text())
        assert history["steps"] == 3 and all(np.isfinite(history["loss"]))
        assert history["config"]["extra"]["mode"] == mode and history["config"]["extra"]["method"] == method
        assert json.loads((out / "checkpoint" / "config.json").read_text())["model_type"] == "picaso_hybrid"
        tuned, _ = load_checkpoint(out / "checkpoint")
        assert bool(tuned.cfg.attn_layers) and tuned.cfg.layer_types == model.cfg.layer_types
        base_weights = {n: p.to(torch.bfloat16).float() for n, p in model.named_parameters()}
        moved = [n for n, p in tuned.named_parameters() if not torch.equal(p, base_weights[n])]
        assert moved, "fine-tuning changed no weight"
        # and it saved the fine-tuned model, not another one: 3 AdamW steps of 1e-2 move a weight by a few hundredths
        assert all((p - base_weights[n]).abs().max() < 0.1 for n, p in tuned.named_parameters())
        engine = PicasoEngine.from_pretrained(out / "checkpoint")  # the engine serves it: encode, compose, read
        ctx = engine.compose(engine.encode(TEXTS[:2]), "picaso-s")
        logits, _ = engine.read(" Paris", state=ctx)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", ["granitemoehybrid", "nemotron_h"])
def test_fine_tuned_transformers_hybrids_save_as_loadable_checkpoints(tmp_path, tokenizer, family):
    """finetune saves any HybridLM (Granite 4.0-H with MoE and RoPE, Nemotron-H with MLP/MoE layers) as
    a picaso_hybrid checkpoint that loads as the same model (bf16 weights, identical logits)."""
    from picaso_rag.training.train import save

    shape = dict(vocab_size=50304, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, d_state=8, chunk_size=8)
    cfg = (HybridConfig(family=family, layer_types=("mamba", "attention"), headdim=16, ffn="granite", ffn_dim=48, n_experts=4,
                        experts_per_tok=2, expert_dim=16, rotary_dim=8, embedding_multiplier=2.0, residual_multiplier=0.5,
                        logits_scaling=3.0, **shape)
           if family == "granitemoehybrid" else
           HybridConfig(family=family, layer_types=("mamba", "attention", "mlp", "moe"), headdim=8, d_ssm=48, ngroups=2, ffn_dim=40,
                        n_experts=8, experts_per_tok=2, expert_dim=16, shared_expert_dim=24, n_expert_groups=2, routed_scaling=2.0, **shape))
    model = init_weights(HybridLM(cfg), seed=0, std=0.1)
    save(model, tokenizer, tmp_path / "ck")
    loaded, _ = load_checkpoint(tmp_path / "ck", dtype=torch.float32)
    expected = HybridLM(cfg)
    expected.load_state_dict(model.state_dict())
    ids = torch.randint(0, 50000, (1, 9), generator=torch.Generator().manual_seed(0))
    assert loaded.cfg.family == "picaso_hybrid" and loaded.cfg.layer_types == cfg.layer_types
    torch.testing.assert_close(loaded(ids).logits, expected.to(torch.bfloat16).float()(ids).logits, rtol=0, atol=0)
