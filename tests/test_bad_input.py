"""Item 5 of the reliability issue: bad input, kept together. Each case gets a clear error whose
message names the fix (matched on a phrase), or a correct answer; and no case loses or changes data:
the Chroma collection and every state file of the shared world are byte-identical afterwards.

Real components throughout: a Chroma PersistentClient with MiniLM embeddings, the tiny sensitive
Mamba-2, stock LlamaIndex query engines (tests/llamaindex_world.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, TextNode
from llama_index.core.vector_stores import SimpleVectorStore
from llama_index.llms.picaso import (PicasoLLM, PicasoLLMError, PicasoNodePostprocessor, PicasoStateEncoder, add_nodes, ingest,
                                     node_llm_text)
from llama_index.llms.picaso.handoff import DocumentRef, Ticket

from picaso_rag import (CheckpointError, PicasoEngine, PicasoError, State, StateCache, StateMismatchError, StateStore,
                        StoreNotWritableError, StoreStatus, save_checkpoint)
from picaso_rag.errors import DocumentTooLongError

from .filesystem import read_only
from .llamaindex_world import build_world, corpus_documents, embed_model, sensitive_engine
from .test_corruption import KINDS
from .test_llamaindex import QUESTION, fresh_llm, retrieval_stats, run_query

MIXED = "Zero\x00width\u200b bell\x07 tab\t中文 العربية עברית Ελληνικά кириллица 🙂 e\u0301\r\nend"


@dataclass
class Ctx:
    world: Any
    engine: PicasoEngine
    other: PicasoEngine  # another model (same shapes, other weights)
    clean: Any  # the answer of QUESTION with every state intact
    tmp: Path

    def store_copy(self, name: str) -> StateStore:
        """A copy of the world's state store, for cases that write."""
        target = self.tmp / name
        shutil.copytree(self.world.store.directory, target)
        return StateStore(target)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tokenizer) -> Ctx:
    engine = sensitive_engine(tokenizer)
    world = build_world(tmp_path_factory.mktemp("bad_input"), engine)
    clean = run_query(world, QUESTION, llm=fresh_llm(world))
    return Ctx(world, engine, sensitive_engine(tokenizer, seed=3), clean, tmp_path_factory.mktemp("bad_input_scratch"))


def snapshot(world) -> tuple:
    """Everything the world holds: Chroma records and each state file's bytes."""
    records = world.collection.get(include=["documents", "metadatas", "embeddings"])
    chroma = sorted(zip(records["ids"], records["documents"], (json.dumps(m, sort_keys=True) for m in records["metadatas"]),
                        (hashlib.sha256(e.tobytes()).hexdigest() for e in records["embeddings"])))
    files = {p.relative_to(world.store.directory): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(world.store.directory.rglob("*")) if p.is_file() and p.suffix != ".lock"}
    return chroma, files


class Duplicate(BaseNodePostprocessor):
    """Retrieval that returns every node twice."""

    def _postprocess_nodes(self, nodes, query_bundle=None):
        return nodes + [NodeWithScore(node=n.node, score=n.score) for n in nodes]


class AddEmptyNode(BaseNodePostprocessor):
    """Retrieval that also returns a node without text."""

    def _postprocess_nodes(self, nodes, query_bundle=None):
        return nodes + [NodeWithScore(node=TextNode(text="", id_="node-without-text"), score=0.1)]


# ------------------------------------------------------------------------------ correct answers
def long_document(c: Ctx) -> None:
    text = " ".join(p.text for p in corpus_documents()) * 12  # thousands of tokens, far beyond any chunk
    n_tokens = len(c.engine.tokenize(text))
    state = c.engine.encode([text])[0]
    _, read_state = c.engine.read(text)  # the same text read token by token in one prefill
    assert n_tokens > 3000 and state.n_tokens == n_tokens
    assert torch.allclose(state.ssm, read_state.ssm, rtol=1e-3, atol=1e-5)
    store = StateStore(c.tmp / "long")
    store.put("long", state, text=text)
    assert torch.equal(store.get("long", c.engine.fingerprint, text=text).state.ssm, state.ssm)


def mixed_scripts_document(c: Ctx) -> None:
    """Control characters and mixed scripts: stored, found in the prompt (also escaped), composed."""
    store = StateStore(c.tmp / "mixed")
    llm = PicasoLLM(engine=c.engine, state_store=store, max_new_tokens=8)
    doc = DocumentRef.of(MIXED, "mixed-node")
    ticket = llm.handoff.open(Ticket("picaso-s", "mean", [doc], llm.resolve_states([doc]).stats))
    assert llm.state_writer.flush(30)  # written back off the answer path
    assert store.get("mixed-node", c.engine.fingerprint, text=MIXED).ok
    open_marker, close_marker = ticket.markers(0)
    prompt = f"Context: {open_marker}{MIXED}{close_marker}\nQuestion: what scripts are there?\nAnswer:"
    figures = llm.complete(prompt, formatted=True).additional_kwargs["picaso"]
    assert figures["k"] == 1 and figures["document_tokens"] == len(c.engine.tokenize(MIXED))
    assert figures["tokens_read"] < len(c.engine.tokenize(prompt)) - len(c.engine.tokenize(MIXED)) + 4


def mixed_scripts_query(c: Ctx) -> None:
    result = run_query(c.world, f"Eiffel {MIXED}?", llm=fresh_llm(c.world))
    assert result.text and retrieval_stats(result.response)["states_loaded"] == 3


def top_k_larger_than_collection(c: Ctx) -> None:
    count = c.world.collection.count()
    result = run_query(c.world, QUESTION, k=count + 50, llm=fresh_llm(c.world))
    assert len(result.response.source_nodes) == count
    assert retrieval_stats(result.response)["states_loaded"] == count and result.response.metadata["picaso"]["k"] == count


def duplicate_nodes(c: Ctx) -> None:
    result = run_query(c.world, QUESTION, llm=fresh_llm(c.world), before=(Duplicate(),))
    stats = retrieval_stats(result.response)
    assert len(result.response.source_nodes) == 6 and stats["states_encoded"] == 0
    assert stats["states_loaded"] == 3 and stats["states_cached"] == 3  # each duplicate is its node's own state
    assert result.text


def node_without_text(c: Ctx) -> None:
    result = run_query(c.world, QUESTION, llm=fresh_llm(c.world), before=(AddEmptyNode(),))
    stats = retrieval_stats(result.response)
    assert stats["states_loaded"] == 3 and stats["states_encoded"] == 0 and result.response.metadata["picaso"]["k"] == 3
    assert not c.world.store.get("node-without-text", c.engine.fingerprint).ok


def encoder_on_node_without_text(c: Ctx) -> None:
    llm = PicasoLLM(engine=c.engine, state_store=StateStore(c.tmp / "empty-node"))
    out = PicasoStateEncoder(llm, show_progress=False)([TextNode(text="", id_="empty")])
    assert [n.node_id for n in out] == ["empty"] and not list(llm.state_store.node_ids())


def missing_state_directory(c: Ctx) -> None:
    directory = c.tmp / "not" / "created" / "yet"
    store = StateStore(directory)
    assert store.get("x", c.engine.fingerprint).status is StoreStatus.MISSING and not list(store.node_ids())
    llm = PicasoLLM(engine=c.engine, state_store=store, max_new_tokens=c.world.llm.max_new_tokens)
    result = run_query(c.world, QUESTION, llm=llm)
    assert result.text == c.clean.text and retrieval_stats(result.response)["encode_reasons"] == {"missing": 3}
    assert directory.is_dir() and len(list(store.node_ids())) == 3


def read_only_store_answers(c: Ctx) -> None:
    """Read-only: stored states are read, a re-encoded state is used without being stored, a put names the fix."""
    store = c.store_copy("read-only")
    victim = c.clean.response.source_nodes[0].node.node_id
    store.delete(victim)
    before = sorted(p.name for p in store.directory.rglob("*.safetensors"))
    llm = PicasoLLM(engine=c.engine, state_store=store, max_new_tokens=c.world.llm.max_new_tokens)
    with read_only(store.directory):
        result = run_query(c.world, QUESTION, llm=llm)
        assert llm.state_writer.flush(30)  # the write-back (off the answer path) meets the read-only store
        with pytest.raises(StoreNotWritableError, match="make it writable"):
            store.put("new", c.engine.encode(["new"])[0])
        with pytest.raises(StoreNotWritableError, match="make it writable"):
            store.delete(c.clean.response.source_nodes[1].node.node_id)
    assert result.text == c.clean.text
    assert retrieval_stats(result.response)["states_loaded"] == 2 and retrieval_stats(result.response)["states_encoded"] == 1
    assert result.response.metadata["picaso"]["states_queued_for_store"] == 1
    assert llm.state_writer.stats().failed == 1 and llm.state_writer.stats().written == 0  # counted, logged, not raised
    assert sorted(p.name for p in store.directory.rglob("*.safetensors")) == before


def two_models_in_one_query(c: Ctx) -> None:
    """One retrieved node's stored state is another model's: it alone is re-encoded; same answer."""
    store = c.store_copy("two-models")
    victim = c.clean.response.source_nodes[2].node
    text = node_llm_text(victim)
    foreign = StateStore(c.tmp / "foreign").put(victim.node_id, c.other.encode([text])[0], text=text)
    shutil.copy(foreign, store.path(victim.node_id, c.engine.fingerprint))
    llm = PicasoLLM(engine=c.engine, state_store=store, max_new_tokens=c.world.llm.max_new_tokens)
    result = run_query(c.world, QUESTION, llm=llm)
    assert result.text == c.clean.text and retrieval_stats(result.response)["encode_reasons"] == {"other-model": 1}


def damaged_state_file(kind: str) -> Callable[[Ctx], None]:
    def case(c: Ctx) -> None:
        damage, status, phrase = KINDS[kind]
        store = c.store_copy(f"damaged-{kind}")
        node = c.clean.response.source_nodes[0].node
        path = store.path(node.node_id, c.engine.fingerprint)
        path.write_bytes(damage(path.read_bytes(), path=path, marker=c.tmp / "ran", node_id=node.node_id,
                                text=node_llm_text(node), other={"dir": c.tmp / f"other-{kind}", "engine": c.other}))
        found = store.get(node.node_id, c.engine.fingerprint, text=node_llm_text(node), spec=c.engine.state_spec)
        assert found.status is status and phrase in found.detail  # (the spec, as PicasoLLM passes it)
        llm = PicasoLLM(engine=c.engine, state_store=store, max_new_tokens=c.world.llm.max_new_tokens)
        assert run_query(c.world, QUESTION, llm=llm).text == c.clean.text
        assert store.get(node.node_id, c.engine.fingerprint, text=node_llm_text(node)).ok
        assert not (c.tmp / "ran").exists()
    return case


# ---------------------------------------------------------------------------------- errors
def nan_state(c: Ctx) -> State:
    state = c.engine.encode(["a document"])[0]
    ssm = state.ssm.clone()
    ssm.view(-1)[0] = float("nan")
    return State(ssm, state.conv.clone(), state.log_decay.clone(), state.n_tokens, state.fingerprint)


def checkpoint(c: Ctx, name: str) -> Path:
    directory = c.tmp / name
    save_checkpoint(c.engine.model, c.engine.tokenizer, directory)
    return directory


def edit_config(c: Ctx, text: str) -> Path:
    directory = checkpoint(c, f"config-{hashlib.sha256(text.encode()).hexdigest()[:8]}")
    (directory / "config.json").write_text(text)
    return directory


def without_tokenizer(c: Ctx) -> Path:
    directory = checkpoint(c, "no-tokenizer")
    (directory / "tokenizer.json").unlink()
    return directory


def query(c: Ctx, question: str, **kwargs):
    return run_query(c.world, question, llm=fresh_llm(c.world), **kwargs)


def lone_surrogate_document(c: Ctx, caplog=None) -> None:
    """A lone surrogate (a broken decode upstream): replaced by U+FFFD with a warning; the rest of the
    group is encoded as it would be alone (never a whole ingestion group lost), and stored with its text."""
    broken = "Caf\udce9 au lait, written in Paris."
    group = c.engine.encode([TEXTS_OK[0], broken, TEXTS_OK[1]])
    alone = c.engine.encode([TEXTS_OK[0], "Caf\ufffd au lait, written in Paris.", TEXTS_OK[1]])
    for a, b in zip(group, alone):
        assert torch.allclose(a.ssm, b.ssm, atol=1e-6) and a.n_tokens == b.n_tokens
    store = StateStore(c.tmp / "surrogate")
    store.put("broken", group[1], text=broken)
    assert store.get("broken", c.engine.fingerprint, text=broken).ok
    assert store.get("broken", c.engine.fingerprint, text=broken.replace("\udce9", "\ufffd")).status is StoreStatus.STALE


def lone_surrogate_query(c: Ctx) -> None:
    answer = c.engine.generate("Where is the \ud800 Eiffel Tower?", max_new_tokens=4)
    same = c.engine.generate("Where is the \ufffd Eiffel Tower?", max_new_tokens=4)
    assert answer.token_ids == same.token_ids


def surrogate_pair_query(c: Ctx) -> None:
    """A surrogate pair left split in a str (e.g. from JSON "\\ud83d\\ude00") is the character it encodes."""
    assert c.engine.tokenize("smile \ud83d\ude00") == c.engine.tokenize("smile \U0001F600")


TEXTS_OK = ["The Eiffel Tower was completed in 1889.", "Mamba is a state space model."]

ANSWERS: dict[str, Callable[[Ctx], None]] = {
    "lone surrogate in a document (one of a group)": lone_surrogate_document,
    "lone surrogate in a query": lone_surrogate_query,
    "split surrogate pair in a query": surrogate_pair_query,
    "document far longer than any chunk": long_document,
    "control characters and mixed scripts in a document": mixed_scripts_document,
    "control characters and mixed scripts in a query": mixed_scripts_query,
    "similarity_top_k larger than the collection": top_k_larger_than_collection,
    "duplicate nodes retrieved twice": duplicate_nodes,
    "a retrieved node without text": node_without_text,
    "a node without text given to the encoder": encoder_on_node_without_text,
    "missing state directory": missing_state_directory,
    "read-only store": read_only_store_answers,
    "states of two models in one query": two_models_in_one_query,
    **{f"{kind} state file": damaged_state_file(kind) for kind in KINDS},
}

ERRORS: dict[str, tuple[Callable[[Ctx], Any], type, str]] = {  # case -> (call, error, phrase naming the fix)
    "empty document": (lambda c: c.engine.encode([""]), PicasoError, "drop it before encoding"),
    "whitespace document": (lambda c: c.engine.encode([" \n\t "]), PicasoError, "empty or whitespace; drop it"),
    "one text instead of a list": (lambda c: c.engine.encode("a text"), PicasoError, r"wrap a single text as \[text\]"),
    "empty query": (lambda c: query(c, ""), PicasoError, "pass a question"),
    "whitespace query": (lambda c: query(c, "  \n\t"), PicasoError, "pass a question"),
    "empty prompt to the LLM": (lambda c: c.world.llm.complete(""), PicasoLLMError, "pass the text to complete"),
    "empty query to the engine": (lambda c: c.engine.generate(""), PicasoError, "pass a non-empty query"),
    "similarity_top_k=0": (lambda c: query(c, QUESTION, k=0), Exception, "cannot be negative, or zero"),
    "k=0 states to compose": (lambda c: c.engine.compose([]), PicasoError, "pass at least one document state"),
    "unknown composition method (postprocessor)": (lambda c: PicasoNodePostprocessor(c.world.llm, method="fancy"),
                                                   PicasoError, "choose one of .*picaso-s"),
    "unknown composition method (engine)": (lambda c: c.engine.compose(c.engine.encode(["x"]), method="fancy"),
                                            PicasoError, "choose one of .*picaso-s"),
    "order-dependent conv policy": (lambda c: PicasoNodePostprocessor(c.world.llm, conv="last"), PicasoError,
                                    "use 'mean'"),
    "states of two models composed": (lambda c: c.engine.compose(c.engine.encode(["x"]) + c.other.encode(["y"])),
                                      StateMismatchError, "re-encode the document with this model"),
    "NaN in a state": (lambda c: c.engine.compose([nan_state(c)]), PicasoError, "corrupt: re-encode"),
    "NaN state stored": (lambda c: StateStore(c.tmp / "nan").put("n", nan_state(c)), PicasoError, "re-encode"),
    "store path is a file": (lambda c: StateStore(c.world.directory / "chroma" / "chroma.sqlite3"), PicasoError,
                             "pass a directory"),
    "empty node id": (lambda c: c.world.store.get("", c.engine.fingerprint), PicasoError, "non-empty string"),
    "not a fingerprint": (lambda c: c.world.store.get("n", "abc"), PicasoError, "engine.fingerprint"),
    "one node id to delete_many": (lambda c: c.world.store.delete_many("n"), PicasoError, "delete\\(node_id\\)"),
    "integer storage dtype": (lambda c: StateStore(c.tmp / "int", dtype=torch.int8), PicasoError, "torch.bfloat16"),
    "non-checkpoint model directory": (lambda c: PicasoEngine.from_pretrained(c.tmp), CheckpointError,
                                       "holds config.json and the weights"),
    "model directory that does not exist": (lambda c: PicasoEngine.from_pretrained(c.tmp / "no" / "such"),
                                            CheckpointError, "path of a Mamba-2 checkpoint directory"),
    "config.json that is not JSON": (lambda c: PicasoEngine.from_pretrained(edit_config(c, "{not json")),
                                     CheckpointError, "restore the checkpoint's config.json"),
    "config of another architecture": (lambda c: PicasoEngine.from_pretrained(edit_config(c, '{"model_type": "llama"}')),
                                       CheckpointError, "neither a mamba_ssm"),
    "checkpoint without its tokenizer": (lambda c: PicasoEngine.from_pretrained(without_tokenizer(c)), CheckpointError,
                                         "tokenizer="),
    "LLM without a model": (lambda c: PicasoLLM(), PicasoError, "pass model="),
    "LLM with an unknown dtype": (lambda c: PicasoLLM(model=str(checkpoint(c, "dtype")), dtype="float8"), PicasoError,
                                  "use one of float32"),
    "encoder without a state store": (lambda c: PicasoStateEncoder(PicasoLLM(engine=c.engine)), PicasoError,
                                      "state_store=StateStore"),
    "nodes without embeddings": (lambda c: add_nodes(c.world.vector_store, [TextNode(text="x", id_="x")]), PicasoError,
                                 "put an embedding model"),
    "documents_per_run=0": (lambda c: ingest([], [], c.world.vector_store, documents_per_run=0), PicasoError, ">= 1"),
    "resumable ingest into a store that is not Chroma": (
        lambda c: ingest(corpus_documents()[:1], [embed_model()], SimpleVectorStore()), PicasoError, "resume=False"),
    "negative cache budget": (lambda c: StateCache(-1), PicasoError, "0 disables a tier"),
    # core inputs of issue 12 (hardening, round 2)
    "bytes query": (lambda c: c.engine.generate(b"Where is the Eiffel Tower?"), PicasoError, r"decode it first"),
    "bytes document": (lambda c: c.engine.encode([b"a document"]), PicasoError, r"decode it first"),
    "token ids outside the vocabulary": (lambda c: c.engine.generate([1, 10**9]), PicasoError, "outside the vocabulary"),
    "a float as a prompt": (lambda c: c.engine.generate(3.5), PicasoError, "a str or a list of int token ids"),
    "temperature NaN": (lambda c: c.engine.generate("Q?", temperature=float("nan")), PicasoError, "finite number.*greedy"),
    "temperature inf": (lambda c: c.engine.generate("Q?", temperature=float("inf")), PicasoError, "finite number"),
    "temperature a string": (lambda c: c.engine.generate("Q?", temperature="hot"), PicasoError, "must be a number"),
    "top_p NaN": (lambda c: c.engine.generate("Q?", top_p=float("nan")), PicasoError, "finite number"),
    "seed 2**70": (lambda c: c.engine.generate("Q?", temperature=1.0, seed=2**70), PicasoError, r"seed % 2\*\*64"),
    "seed a float": (lambda c: c.engine.generate("Q?", seed=1.5), PicasoError, "seed must be an int"),
    "max_new_tokens 10**12": (lambda c: c.engine.generate("Q?", max_new_tokens=10**12), PicasoError,
                              "raise engine.max_new_tokens_limit"),
    "max_new_tokens a float": (lambda c: c.engine.generate("Q?", max_new_tokens=8.0), PicasoError, "must be an int"),
    'stop=[""]': (lambda c: c.engine.generate("Q?", stop=[""]), PicasoError, 'drop "" from stop'),
    "stop=[None]": (lambda c: c.engine.generate("Q?", stop=[None]), PicasoError, "list of strings"),
    "unknown sampling option": (lambda c: c.engine.generate("Q?", temprature=0.5), PicasoError, "sampling options are"),
    "truncated model.safetensors": (lambda c: PicasoEngine.from_pretrained(truncated_weights(c)), CheckpointError,
                                    "truncated or damaged.*download or copy the checkpoint again"),
    "config.json field of the wrong type": (lambda c: PicasoEngine.from_pretrained(edit_config(c, '{"d_model": "wide", "n_layer": 2, "vocab_size": 50288, "ssm_cfg": {"layer": "Mamba2"}}')),
                                            CheckpointError, "restore the checkpoint's config.json"),
    "document above the token cap": (lambda c: capped(c).encode(["word " * 200]), DocumentTooLongError,
                                     "split it into smaller documents, or raise"),
    "text passed to the store as bytes": (lambda c: c.world.store.get("n", c.engine.fingerprint, text=b"x"),
                                          PicasoError, "the node's text"),
}


def truncated_weights(c: Ctx) -> Path:
    directory = checkpoint(c, "truncated")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return directory


def capped(c: Ctx) -> PicasoEngine:
    engine = PicasoEngine(c.engine.model, c.engine.tokenizer, fingerprint=c.engine.fingerprint, max_document_tokens=50)
    return engine


def test_there_are_at_least_30_cases():
    assert len(ANSWERS) + len(ERRORS) >= 30


@pytest.mark.parametrize("case", list(ANSWERS))
def test_bad_input_gets_a_correct_answer(ctx, case):
    before = snapshot(ctx.world)
    ANSWERS[case](ctx)
    assert snapshot(ctx.world) == before  # nothing lost, nothing changed


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_gets_an_error_naming_the_fix(ctx, case):
    call, error, phrase = ERRORS[case]
    before = snapshot(ctx.world)
    with pytest.raises(error, match=phrase):
        call(ctx)
    assert snapshot(ctx.world) == before  # nothing lost, nothing changed
