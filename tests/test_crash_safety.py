"""Item 1 of the reliability issue: an ingesting process SIGKILLed mid-way leaves Chroma and the state
store consistent, and running ingestion again completes the rest: every node ends with exactly one
valid state (equal to a fresh encoding of its text), no orphan state, no temporary file.

Three real processes are killed at once (one module fixture, to share their start-up time): from
outside once some states are written (progress read from the store directory), by themselves
inside a state write (temporary file fsynced, not yet renamed), and during a Chroma add.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from llama_index.llms.picaso import node_llm_text

from picaso_rag import StateStore, StoreStatus

from .ingest_worker import expected_nodes, open_world, run_ingest
from .llamaindex_world import REPO, sensitive_engine

pytestmark = pytest.mark.slow  # kills writer processes: not in `pytest -m "not slow"`

COPIES = 4
KILLS = {
    "from outside after some states": [],
    "inside a state write": ["--kill-in-state-write", "20"],
    "during a chroma add": ["--kill-in-chroma-add", "4"],
}


@pytest.fixture(scope="module")
def engine(tokenizer):
    return sensitive_engine(tokenizer)  # the worker's model: same weights, same fingerprint


def start_worker(directory: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "tests.ingest_worker", str(directory), "--copies", str(COPIES), *args],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def state_files(directory: Path) -> list[Path]:
    return list((directory / "states").rglob("*.safetensors"))


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> dict[str, Path]:
    """Each scenario's directory, as its SIGKILLed ingestion left it."""
    dirs = {name: tmp_path_factory.mktemp("killed") for name in KILLS}
    procs = {name: start_worker(dirs[name], *args) for name, args in KILLS.items()}
    outside = "from outside after some states"
    total = len(expected_nodes(COPIES))
    deadline = time.monotonic() + 120
    while len(state_files(dirs[outside])) < total // 3:  # progress, read from the store directory
        assert procs[outside].poll() is None, f"the worker ended before it was killed: {procs[outside].stderr.read()}"
        assert time.monotonic() < deadline, "the worker wrote no states in 120 s"
        time.sleep(0.005)
    procs[outside].send_signal(signal.SIGKILL)
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == -signal.SIGKILL, f"{name}: the worker was not killed (rc {proc.returncode}): {err[-2000:]}"
        assert not (dirs[name] / "done-docs").exists()
    return dirs


@pytest.mark.parametrize("scenario", list(KILLS))
def test_sigkill_mid_ingestion_then_rerun_completes(killed, scenario, engine):
    directory = killed[scenario]
    fingerprint = engine.fingerprint
    expected = {n.node_id: node_llm_text(n) for n in expected_nodes(COPIES)}
    vector_store, llm = open_world(directory, engine)
    store: StateStore = llm.state_store

    # --- as the kill left it: consistent, and incomplete
    in_chroma = vector_store.get_nodes(None)
    assert len(in_chroma) < len(expected) and {n.node_id for n in in_chroma} <= set(expected)
    for node in in_chroma:  # states are written before their nodes reach Chroma
        assert store.get(node.node_id, fingerprint, text=node_llm_text(node)).ok, node.node_id
    written = sorted(store.node_ids(fingerprint))
    assert written and set(written) <= set(expected)
    assert all(store.get(i, fingerprint, text=expected[i]).ok for i in written)  # never a half-written state
    temp_files = list((directory / "states").rglob("*.tmp"))
    if scenario == "inside a state write":
        assert len(temp_files) == 1 and len(written) == 19  # the 20th state was cut before its rename
    mtimes = {i: store.path(i, fingerprint).stat().st_mtime_ns for i in written}

    # --- ingestion again: completes the rest, reuses what was written
    run_ingest(directory, engine, COPIES)
    nodes = vector_store.get_nodes(None)
    assert vector_store.client.count() == len(nodes) == len(expected)
    assert {n.node_id: node_llm_text(n) for n in nodes} == expected
    assert sorted(store.node_ids(fingerprint)) == sorted(expected)  # exactly one state each, no orphan
    assert not list((directory / "states").rglob("*.tmp"))
    fresh = dict(zip(expected, engine.encode(list(expected.values()))))
    for node_id, text in expected.items():
        found = store.get(node_id, fingerprint, text=text)
        assert found.ok, (node_id, found.status, found.detail)
        assert torch.allclose(found.state.ssm, fresh[node_id].ssm, rtol=1e-4, atol=1e-6), node_id
    assert {i: store.path(i, fingerprint).stat().st_mtime_ns for i in written} == mtimes  # not encoded twice
    assert not run_ingest(directory, engine, COPIES)  # a third run finds nothing left to do


def test_interrupted_add_is_redone(tmp_path, engine):
    """A document only partly in Chroma (an add cut between two batches) is removed and ingested again."""
    vector_store, llm = open_world(tmp_path, engine)
    run_ingest(tmp_path, engine, 1)
    doc_ids = vector_store._collection.get(where={"document_id": "doc-0-copy0"}, include=[])["ids"]
    assert len(doc_ids) > 1
    vector_store.delete_nodes(doc_ids[:1])
    assert vector_store.client.count() == len(expected_nodes(1)) - 1
    added = run_ingest(tmp_path, engine, 1)
    assert sorted(n.node_id for n in added) == sorted(doc_ids)
    assert vector_store.client.count() == len(expected_nodes(1))
    assert llm.state_store.get(doc_ids[0], engine.fingerprint).status is StoreStatus.OK
