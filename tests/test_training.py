"""Training: BP2C / BPTC steps, where gradients flow, checkpoints, data preparation and the CLI; and that
the composed context training scores is the one inference (engine, evaluation harness) composes."""

from __future__ import annotations

import copy
import itertools
import importlib.util
import json
import lzma

import numpy as np
import pytest
import torch

from picaso_rag import Mamba2Config, PicasoEngine, init_weights, log_weights
from picaso_rag.compose import canonical_order
from picaso_rag.config import ModelConfig
from picaso_rag.model import PicasoLM
from picaso_rag.training import (PassagePairs, TrainConfig, TokenWindows, composition_loss, iter_corpus_documents,
                                 split_passages, tokenize_to_file, train, train_tokenizer)
from picaso_rag.training.__main__ import main as cli
from picaso_rag.training.data import tfidf_retrieve
from picaso_rag.training.train import finetune_batches

from .conftest import REPO, TEXTS, make_engine

_spec = importlib.util.spec_from_file_location("quality", REPO / "benchmarks" / "quality.py")
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


@pytest.fixture()
def tiny(tokenizer):
    engine = make_engine(tokenizer, seed=3)
    return copy.deepcopy(engine.model).train(), tokenizer


def fixed_batch(k: int = 3, B: int = 2, S: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50000, (B, k, S), generator=g), torch.randint(0, 50000, (B, S), generator=g)


@pytest.mark.parametrize("mode", ["bp2c", "bptc"])
def test_one_step_lowers_the_loss_on_a_fixed_batch(tiny, mode):
    model, _ = tiny
    contexts, targets = fixed_batch()
    sep = torch.tensor([187])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = composition_loss(model, contexts, targets, sep, "picaso-s", mode)
    before.backward()
    optimizer.step()
    after = composition_loss(model, contexts, targets, sep, "picaso-s", mode)
    assert after.item() < before.item()


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_bp2c_has_no_gradient_in_the_documents_pass_and_bptc_does(tiny):
    model, _ = tiny
    contexts, targets = fixed_batch(k=4)
    sep = torch.tensor([187])
    passes = []
    hook = model.register_forward_hook(lambda m, inp, out: passes.append(out))
    bp2c = _grads(model, composition_loss(model, contexts, targets, sep, "picaso-s", "bp2c"))
    doc_pass_bp2c = passes[0]
    passes.clear()
    bptc = _grads(model, composition_loss(model, contexts, targets, sep, "picaso-s", "bptc"))
    doc_pass_bptc = passes[0]
    hook.remove()
    assert not doc_pass_bp2c.ssm_state.requires_grad  # states served as from a store
    assert doc_pass_bptc.ssm_state.requires_grad and doc_pass_bptc.log_decay.requires_grad
    assert not torch.allclose(bp2c, bptc)  # BPTC adds the documents' pass gradient
    # BP2C equals the loss with the states explicitly detached: no gradient reaches the documents
    from picaso_rag.compose import compose_tensors

    docs = torch.cat([contexts, sep.expand(2, 4, -1)], -1).flatten(0, 1)
    with torch.no_grad():
        out = model(docs, logits="none")
    ssm, conv, _ = compose_tensors(*(t.unflatten(0, (2, 4)) for t in (out.ssm_state, out.conv_state, out.log_decay)), "picaso-s")
    logits = model(targets[:, :-1], ssm_state=ssm, conv_state=conv).logits
    manual = _grads(model, torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[:, 1:].flatten()))
    torch.testing.assert_close(bp2c, manual)


def test_weights_have_finite_gradients_at_extreme_decays():
    la = torch.tensor([-1e4, -1e-6, -3.0, 0.0, -200.0], dtype=torch.float64, requires_grad=True)
    for method in ("picaso-s", "picaso-r", "caso"):
        (g,) = torch.autograd.grad(log_weights(la, method).exp().sum(), la)
        assert torch.isfinite(g).all(), method
    small = (-torch.rand(4, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: log_weights(x, "picaso-s"), (small,))


def test_train_saves_a_checkpoint_that_loads_with_identical_logits(tiny, tmp_path):
    model, tokenizer = tiny
    contexts, targets = fixed_batch()
    sep = torch.tensor([187])
    batches = iter(lambda: (lambda m: composition_loss(m, contexts, targets, sep)), None)
    history = train(model, tokenizer, batches, TrainConfig(out_dir=str(tmp_path), max_steps=4, log_every=1, warmup_steps=1))
    assert history["steps"] == 4 and len(history["loss"]) == 4
    assert (tmp_path / "loss.png").stat().st_size > 1000
    loaded = PicasoEngine.from_pretrained(tmp_path / "checkpoint", dtype=torch.bfloat16)
    ids = torch.tensor([loaded.tokenize(TEXTS[0])])
    expected = copy.deepcopy(model).to(torch.bfloat16).eval()(ids).logits
    torch.testing.assert_close(loaded.model(ids).logits, expected, rtol=0, atol=0)


def test_passages_and_retrieval():
    eos = 0
    doc_a = np.arange(1, 41)  # 40 tokens: one passage of 2 x 16, 8 left over
    doc_b = np.arange(100, 170)  # 70 tokens: two passages
    tokens = np.concatenate([doc_a, [eos], doc_b, [eos]]).astype(np.uint16)
    passages = split_passages(tokens, eos, 16)
    assert passages.shape == (3, 2, 16)
    assert passages[0, 1, 0] == 17 and passages[2, 0, 0] == 132
    # retrieval: the query's own first half ranks first, the target never appears
    pairs = PassagePairs.build(passages, vocab_size=200, max_k=3)
    for i in range(3):
        assert pairs.retrieved[i, 0].item() == 2 * i
        assert 2 * i + 1 not in pairs.retrieved[i].tolist()
    contexts, targets = pairs.batch(torch.tensor([0, 2]), k=2)
    assert contexts.shape == (2, 2, 16) and torch.equal(targets[1], torch.from_numpy(passages[2, 1]))


def test_tfidf_prefers_shared_rare_words():
    db = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [1, 1, 9, 9]])
    assert tfidf_retrieve(torch.tensor([[9, 9, 2, 2]]), db, 10, k=1).item() == 2


def _corpus(tmp_path, docs):
    shard = tmp_path / "corpus-000.txt.xz"
    with lzma.open(shard, "wt", encoding="utf-8") as f:
        f.write("".join(d + "\n\n<|doc|>\n" for d in docs))
    return shard


def test_cli_tokenizer_tokenize_pretrain_finetune(tmp_path):
    docs = [" ".join(TEXTS[(i + j) % len(TEXTS)] for j in range(6)) for i in range(30)]
    shard = _corpus(tmp_path, docs)
    assert list(iter_corpus_documents([shard])) == docs
    tok, data = tmp_path / "tok.json", tmp_path / "train.bin"
    cli(["tokenizer", "--shards", str(shard), "--vocab-size", "300", "--out", str(tok)])
    cli(["tokenize", "--shards", str(shard), "--tokenizer", str(tok), "--out", str(data)])
    assert len(np.memmap(data, dtype=np.uint16)) > 30 * 50
    small = ["--d-model", "32", "--n-layer", "2", "--d-state", "16", "--headdim", "16", "--seq-len", "32", "--batch-size", "2"]
    cli(["pretrain", "--data", str(data), "--tokenizer", str(tok), *small, "--max-steps", "3", "--device", "cpu", "--out", str(tmp_path / "pre")])
    cli(["finetune", "--model", str(tmp_path / "pre" / "checkpoint"), "--data", str(data), "--mode", "bptc",
         "--segment-len", "16", "--n-passages", "20", "--batch-size", "2", "--max-steps", "2", "--device", "cpu",
         "--out", str(tmp_path / "ft")])
    history = json.loads((tmp_path / "ft" / "history.json").read_text())
    assert history["steps"] == 2 and history["config"]["extra"]["mode"] == "bptc"
    PicasoEngine.from_pretrained(tmp_path / "ft" / "checkpoint")


def test_token_windows(tmp_path, tokenizer):
    path = tmp_path / "t.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    inputs, targets = next(iter(TokenWindows(path, 16, 3, seed=0)))
    assert inputs.shape == (3, 16) and torch.equal(inputs[:, 1:], targets[:, :-1])
    assert (targets - inputs == 1).all()


def test_finetune_batches_draw_k_from_zero_to_max(tokenizer):
    passages = np.arange(40 * 2 * 8).reshape(40, 2, 8) % 500
    pairs = PassagePairs.build(passages, vocab_size=500, max_k=10)
    batches = finetune_batches(pairs, 4, [187], torch.device("cpu"), "picaso-s", "bp2c", max_k=10, seed=0)
    ks = set()
    for fn in [next(batches) for _ in range(60)]:
        ks.add(fn.__defaults__[0].shape[1])
    assert ks == set(range(11))


# ------------------------------------------------------------ training composes what inference composes
# The fine-tuning loss must score the target after the very context inference builds for the same
# documents: engine.encode of each ``document + separator``, engine.compose, the target read after it
# (engine.read, and benchmarks/quality.py's evaluate, which scores the paper's protocol). A training
# composition that differs (conv state, weights, positions, a document lost) trains the model for a
# context it is never served.
SEP_IDS = [199, 199]  # quality.SEPARATOR ("\n\n") in the repository's tokenizer (checked in the fixture)
SEP = torch.tensor(SEP_IDS)
VOCAB, ROWS, SEG, MAX_K = 512, 4, 8, 3  # vocabulary; rows, tokens per document and per target, documents per row


def tiny_hybrid() -> PicasoLM:
    """Mamba-2 and RoPE attention layers (RoPE: CASO moves the documents' keys)."""
    return PicasoLM(ModelConfig(family="picaso_hybrid", vocab_size=VOCAB, d_model=32,
                                layer_types=("mamba", "attention", "mamba", "attention"), n_heads=2, n_kv_heads=1,
                                head_dim=16, rotary_dim=8, d_state=8, headdim=16, ngroups=1, chunk_size=8))


def tiny_mamba2() -> PicasoLM:
    return PicasoLM(Mamba2Config(d_model=32, n_layer=2, vocab_size=VOCAB, d_state=8, headdim=16, ngroups=1, chunk_size=8))


def tuned_setup(kind: str, tokenizer):
    """A tiny model fine-tuned a few AdamW steps with composition_loss (every method, k in 0..3, BPTC), its
    engine, one evaluation batch (contexts [ROWS, MAX_K, SEG], targets [ROWS, SEG]) and the harness's
    scores of it. std 0.5: logits far from uniform, so a wrong context shows in the loss (std 0.3 left
    soup's and PICASO-S's weights within 1e-5 of each other's loss on the Mamba-2 model)."""
    model = init_weights({"hybrid": tiny_hybrid, "mamba2": tiny_mamba2}[kind](), seed=0, std=0.5).train()
    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(8):
        contexts = torch.randint(200, VOCAB, (2, step % 4, SEG), generator=g)
        targets = torch.randint(200, VOCAB, (2, SEG), generator=g)
        loss = composition_loss(model, contexts, targets, SEP, quality.COMPOSED[step % 4], "bptc")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    engine = PicasoEngine(model, tokenizer)  # eval(); the fp32 model as it is, on the CPU
    assert engine.tokenize(quality.SEPARATOR) == SEP_IDS
    # quality.evaluate's layout: segments 2i, 2i+1 are passage i's halves (the second is the target);
    # the contexts are further segments (passages the harness does not score), retrieved best first
    segments = torch.randint(200, VOCAB, (2 * ROWS + ROWS * MAX_K, SEG), generator=g)  # ids never the separator's
    retrieved = torch.zeros(len(segments) // 2, MAX_K, dtype=torch.long)
    for row in range(ROWS):
        ids = torch.arange(2 * ROWS + row * MAX_K, 2 * ROWS + (row + 1) * MAX_K)
        states = engine.encode([segments[i].tolist() + SEP_IDS for i in ids])
        canonical = canonical_order(torch.stack([s.log_decay for s in states]), [s.n_tokens for s in states])
        # retrieved in the reverse of compose's canonical order: for 3 documents the other cyclic order
        # (PICASO-R's weights differ), and CASO's order is not the canonical one either
        retrieved[row] = ids[canonical[::-1]]
    harness = quality.evaluate(engine, segments, retrieved, [0, 1, MAX_K], ["none", *quality.COMPOSED],
                               batch_size=16, max_passages=ROWS)
    return model, engine, segments[retrieved[:ROWS]], segments[1:2 * ROWS:2], harness


@pytest.fixture(scope="module", params=["hybrid", "mamba2"])
def tuned(request, tokenizer):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors of a few thousand values: a second thread only adds hand-off waits
    yield tuned_setup(request.param, tokenizer)
    torch.set_num_threads(threads)


def served_nll(engine: PicasoEngine, contexts: torch.Tensor, targets: torch.Tensor, method: str) -> float:
    """Mean NLL of targets[:, 1:] read by the engine, row by row, after its composition of the row's
    documents (each ``context + separator``); with no documents, from no state."""
    total = 0.0
    for docs, target in zip(contexts, targets):
        state = engine.compose(engine.encode([d.tolist() + SEP_IDS for d in docs]), method) if len(docs) else None
        logits, _ = engine.read(target[:-1].tolist(), state=state)
        total += torch.nn.functional.cross_entropy(logits, target[1:], reduction="sum").item()
    return total / targets[:, 1:].numel()


CASES = [(m, k) for m in ("picaso-s", "picaso-r", "caso", "soup") for k in (0, 1, MAX_K)]


@pytest.mark.parametrize("method,k", CASES)
def test_training_loss_is_the_loss_inference_scores(tuned, method, k):
    """composition_loss of one batch equals the NLL inference gives the same targets after the same
    documents: the engine's (encode, compose, read) and the evaluation harness's. Agreement is <= 1e-7
    relative (fp32 sums in other orders). Checked by breaking the training composition (each moves the
    loss by 1e-4 to 3e-2 relative where it applies): conv state "last" or "zero" for "mean"; reading on
    one position late; another method's weights (soup, PICASO-S, CASO) or a plain sum; a document's SSM
    state or keys and values dropped; CASO's RoPE keys left unmoved."""
    model, engine, contexts, targets, harness = tuned
    contexts = contexts[:, :k]
    served = served_nll(engine, contexts, targets, method)
    scored = harness[str(k)]["none" if k == 0 else method]["nll"]
    assert served == pytest.approx(scored, rel=1e-5)  # the harness scores what the engine serves
    with torch.no_grad():
        for mode in ("bp2c", "bptc"):
            loss = composition_loss(model, contexts, targets, SEP, method, mode).item()
            assert loss == pytest.approx(served, rel=1e-5), f"{mode}: training {loss:.7f}, inference {served:.7f}"


def test_picaso_r_training_does_not_see_the_batch_order(tuned):
    """PICASO-R averages the rotations of one cyclic order; training takes compose's canonical one, so
    every order of a row's documents (here: each of the 3! = 6) trains on the loss inference scores.
    Fails when compose_batch composes in the batch's order (a different cyclic order for k >= 3)."""
    model, engine, contexts, targets, harness = tuned
    with torch.no_grad():
        for perm in itertools.permutations(range(MAX_K)):
            loss = composition_loss(model, contexts[:, list(perm)], targets, SEP, "picaso-r").item()
            assert loss == pytest.approx(harness[str(MAX_K)]["picaso-r"]["nll"], rel=1e-5), perm
