"""Item 3 of the reliability issue: threads querying while another thread ingests (one process, one

Chroma collection, one state store), and two processes ingesting into one state store while a third
reads it and clears temporary files; no errors, and no mixed state: every state verifies and equals a
fresh encoding of the text it records."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from llama_index.llms.picaso import node_llm_text
from safetensors import safe_open

from picaso_rag import StateStore, StoreStatus, text_sha256

from .ingest_worker import expected_nodes, open_world, run_ingest
from .llamaindex_world import build_world, sensitive_engine
from .test_crash_safety import start_worker
from .test_llamaindex import fresh_llm, run_query

pytestmark = pytest.mark.slow  # many threads and processes against one store: not in `pytest -m "not slow"`

QUESTIONS = ["When was the Eiffel Tower completed?", "Who wrote the first algorithm for a machine?",
             "How do honey bees tell where flowers are?"]


@pytest.fixture(scope="module")
def engine(tokenizer):
    return sensitive_engine(tokenizer)


def assert_every_state_is_a_fresh_encoding(store: StateStore, engine, texts_by_sha: dict[str, str]) -> int:
    """Each state file verifies, records one of the known texts, and equals that text's encoding."""
    node_ids = sorted(store.node_ids(engine.fingerprint))
    recorded = {}
    for node_id in node_ids:
        with safe_open(str(store.path(node_id, engine.fingerprint)), framework="pt") as f:
            recorded[node_id] = texts_by_sha[f.metadata()["text_sha256"]]
    fresh = dict(zip(node_ids, engine.encode([recorded[i] for i in node_ids])))
    for node_id in node_ids:
        found = store.get(node_id, engine.fingerprint, text=recorded[node_id])
        assert found.ok, (node_id, found.status, found.detail)
        assert torch.allclose(found.state.ssm, fresh[node_id].ssm, rtol=1e-4, atol=1e-6), node_id
        assert torch.allclose(found.state.conv, fresh[node_id].conv, rtol=1e-4, atol=1e-6), node_id
    return len(node_ids)


def test_threads_query_while_another_thread_ingests(tmp_path, engine):
    world = build_world(tmp_path, engine)
    baseline = {q: run_query(world, q, llm=fresh_llm(world)) for q in QUESTIONS}
    llm = fresh_llm(world)  # one LLM (one cache, one hand-off) shared by every querying thread
    errors: list[BaseException] = []
    answers: list[tuple[str, str, list[str]]] = []
    ingesting = threading.Event()
    ingesting.set()

    def ingest_more() -> None:
        try:  # into the same Chroma collection and state store the queries read
            run_ingest(world.directory, engine, copies=2, collection="corpus")
        except BaseException as exc:
            errors.append(exc)
        finally:
            ingesting.clear()

    def query(offset: int) -> None:
        try:
            n = 0
            while ingesting.is_set() or n < 3:
                question = QUESTIONS[(offset + n) % len(QUESTIONS)]
                result = run_query(world, question, llm=llm)
                answers.append((question, result.text, [s.node.node_id for s in result.response.source_nodes]))
                n += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ingest_more)] + [threading.Thread(target=query, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, repr(errors[0])
    assert len(answers) >= 9
    same_sources = 0
    for question, text, sources in answers:  # same documents retrieved: the same answer as alone
        base = baseline[question]
        if sources == [s.node.node_id for s in base.response.source_nodes]:
            same_sources += 1
            assert text == base.text, question
    assert same_sources >= 3
    nodes = world.vector_store.get_nodes(None)
    assert len(nodes) == len({n.node_id for n in nodes}) == len(expected_nodes(2)) + len(baseline_nodes(world))
    texts = {text_sha256(node_llm_text(n)): node_llm_text(n) for n in nodes}
    assert assert_every_state_is_a_fresh_encoding(world.store, engine, texts) == len(nodes)


def baseline_nodes(world) -> list[str]:
    return [i for i in world.collection.get(include=[])["ids"] if "#" not in i]  # from_documents' uuid ids


def test_two_processes_ingest_into_one_store(tmp_path, engine):
    """Two processes write states for the same node ids (different texts: each its own Chroma) into
    one store, while this process reads every state and clears temporary files, as a third
    ingestion starting would. Neither fails, no state is ever seen half-written, each file is one
    writer's whole state."""
    states = tmp_path / "states"
    variants = {"a": "", "b": " (second writer)"}
    procs = {name: start_worker(tmp_path / name, "--states", str(states), "--variant", variant, "--copies", "3")
             for name, variant in variants.items()}
    store = StateStore(states)
    seen: set[StoreStatus] = set()
    cleared = 0
    while any(p.poll() is None for p in procs.values()):
        for node_id in list(store.node_ids(engine.fingerprint)):
            seen.add(store.get(node_id, engine.fingerprint).status)
        cleared += store.remove_temp_files()
        time.sleep(0.001)
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"writer {name} failed: {err[-3000:]}"
    assert seen <= {StoreStatus.OK}, seen  # never corrupt, never half-written
    assert cleared == 0  # a live writer's temporary file is never taken from it

    texts = {}
    for name, variant in variants.items():
        vector_store, _ = open_world(tmp_path / name, engine)
        nodes = vector_store.get_nodes(None)
        assert sorted(n.node_id for n in nodes) == sorted(n.node_id for n in expected_nodes(3, variant))
        texts.update({text_sha256(node_llm_text(n)): node_llm_text(n) for n in nodes})
    count = assert_every_state_is_a_fresh_encoding(store, engine, texts)
    all_ids = {n.node_id for variant in variants.values() for n in expected_nodes(3, variant)}
    assert count == len(all_ids)  # one state per node id: the last writer's, whole
    assert not list(states.rglob("*.tmp"))
