"""Checks every hybrid family's tests run (Granite, Bamba in test_hybrid.py; Nemotron-H in
test_hybrid_nemotron.py): one implementation, so the families are held to the same property."""

from __future__ import annotations

import itertools

import torch

from picaso_rag.state import HybridState
from picaso_rag.store import StateStore

from .conftest import TEXTS

DOCS = TEXTS[:3]
QUERY = " Which of these happens in chloroplasts? The answer is"


def greedy_against_transformers(hf_model, engine, new_tokens: int = 8) -> tuple[list[int], list[int]]:
    """(our greedy tokens, transformers' greedy tokens) for one prompt; transformers decodes with its
    own cache (recurrent step and a growing KV cache)."""
    prompt = engine.tokenize("The capital of France is")
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    return engine.generate(prompt, max_new_tokens=new_tokens).token_ids, expected


def assert_one_document_composed_equals_reading_it_then_the_query(engine) -> None:
    """k=1: the query read from one document's composed state (PICASO-S, CASO) gives the logits of
    reading the document and the query in one pass."""
    expected, _ = engine.read(engine.tokenize(DOCS[2]) + engine.tokenize(QUERY))
    state = engine.encode([DOCS[2]])
    for method in ("picaso-s", "caso"):  # PICASO-R and soup weigh one document as PICASO-S does
        got, _ = engine.read(QUERY, state=engine.compose(state, method=method))
        torch.testing.assert_close(got, expected[-got.shape[0]:], rtol=1e-4, atol=1e-5)


def assert_bitwise_identical_for_every_order(engine) -> None:
    """The composed state (every tensor, and the position), the logits and the greedy answer are
    bitwise identical for all orders of the documents (PICASO-S and PICASO-R)."""
    states = engine.encode(DOCS)
    for method in ("picaso-s", "picaso-r"):
        reference = None
        for order in itertools.permutations(range(len(states))):
            composed = engine.compose([states[i] for i in order], method=method)
            logits, _ = engine.read(QUERY, state=composed)
            answer = engine.generate(QUERY, state=composed, max_new_tokens=3).token_ids
            result = (composed.tensors(), logits, answer)
            if reference is None:
                reference = result
                continue
            for name, tensor in result[0].items():
                assert torch.equal(tensor, reference[0][name]), (method, order, name)
            assert torch.equal(logits, reference[1]) and answer == reference[2], (method, order)
            assert composed.position == max(s.position for s in states)


def store_round_trip(engine, directory) -> tuple[StateStore, list[HybridState]]:
    """Put the documents' states, read them back: bit for bit, position included, and their
    composition equals composing the states as encoded. Returns (store, states)."""
    store = StateStore(directory)
    states = engine.encode(DOCS)
    for i, (text, state) in enumerate(zip(DOCS, states)):
        store.put(f"node-{i}", state, text=text)
    found = store.get_many([f"node-{i}" for i in range(len(DOCS))], engine.fingerprint, texts=DOCS)
    assert all(f.ok and f.state.has_keys for f in found)
    for f, state in zip(found, states):
        assert f.state.position == state.position
        assert all(torch.equal(f.state.tensors()[name], t) for name, t in state.tensors().items())
    composed, direct = engine.compose([f.state for f in found]), engine.compose(states)
    assert all(torch.equal(t, direct.tensors()[name]) for name, t in composed.tensors().items())
    return store, states
