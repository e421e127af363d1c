"""The store as a cache with a fallback (picaso_rag.resolver, picaso_rag.cache): StateResolver, StateWriter, BudgetedStore.

A query's missing states are encoded together in one batch, written back in the background (the
answer never waits for a write, the queue is bounded), store tiers keep byte budgets.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from picaso_rag import StateCache, StateStore
from picaso_rag.cache import BudgetedStore
from picaso_rag.resolver import DocumentRef, StateResolver, StateWriter
from picaso_rag.store import StoreStatus

from .conftest import TEXTS

DOCS = [DocumentRef.of(text, f"n{i}") for i, text in enumerate(TEXTS)]


class CountingEngine:
    """The real engine, counting encode calls (to see that misses are encoded in one batch)."""

    def __init__(self, engine):
        self._engine, self.calls = engine, []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def encode(self, texts, batch_size=16):
        self.calls.append(len(texts))
        return self._engine.encode(texts, batch_size=batch_size)


class BlockingStore:
    """A store whose writes wait for ``release`` (a slow disk or network)."""

    def __init__(self, inner, fail: bool = False):
        self.inner, self.release, self.fail, self.puts = inner, threading.Event(), fail, 0

    def get_many(self, node_ids, fingerprint, texts=None, spec=None):
        return self.inner.get_many(node_ids, fingerprint, texts, spec=spec)

    def put(self, node_id, state, text=None, write_back=False, spec=None):
        self.release.wait(30)
        if self.fail:
            raise OSError("the store is down")
        self.puts += 1
        return self.inner.put(node_id, state, text=text, write_back=write_back)

    def delete(self, node_id, fingerprint=None, node_deleted=False):
        return self.inner.delete(node_id, fingerprint, node_deleted=node_deleted)


def assert_same(a, b):
    assert torch.equal(a.ssm, b.ssm) and torch.equal(a.conv, b.conv) and torch.equal(a.log_decay, b.log_decay)


def test_memory_then_store_then_one_batch_and_write_back(engine, tmp_path):
    reference = engine.encode([d.text for d in DOCS])
    cache = StateCache(1 << 30)
    store = StateStore(tmp_path / "states")
    cache.put(DOCS[0].digest, reference[0])
    store.put("n1", reference[1], text=TEXTS[1])
    counting, writer = CountingEngine(engine), StateWriter()
    resolver = StateResolver(counting, cache, [store], writer)
    result = resolver.resolve(DOCS)
    assert counting.calls == [3]  # the three missing states: one encode call
    assert result.stats["states_cached"] == 1 and result.stats["loaded_per_store"] == [1] and result.stats["states_encoded"] == 3
    for got, want in zip(result.states, reference):
        assert_same(got, want)
    assert writer.flush(30) and writer.stats().written == 3
    for i in (2, 3, 4):  # written back, readable by the next query (or another replica)
        assert store.get(f"n{i}", engine.fingerprint, text=TEXTS[i]).ok
    again = StateResolver(counting, StateCache(1 << 30), [store], writer).resolve(DOCS)
    # n0 was only ever in memory: the one miss of a fresh replica
    assert again.stats["loaded_per_store"] == [4] and again.stats["states_encoded"] == 1 and counting.calls == [3, 1]
    writer.close()


def test_the_answer_does_not_wait_for_the_write_and_the_queue_is_bounded(engine, tmp_path):
    slow = BlockingStore(StateStore(tmp_path / "states"))
    writer = StateWriter(max_pending=2)
    resolver = StateResolver(engine, None, [slow], writer)
    started = time.perf_counter()
    result = resolver.resolve(DOCS)  # 5 misses, the store blocks every write
    assert time.perf_counter() - started < 20 and len(result.states) == 5
    # two held by the writer (one being written, blocked), the other three dropped: never more than the bound
    assert result.stats["write_back_queued"] == 2 and result.stats["write_back_not_queued"] == 3
    assert writer.stats().pending == 2 and writer.stats().dropped == 3
    assert not writer.flush(0.2)  # still blocked
    slow.release.set()
    assert writer.flush(30) and slow.puts == 2
    writer.close()


def test_a_failed_write_back_is_counted_never_raised(engine, tmp_path):
    down = BlockingStore(StateStore(tmp_path / "states"), fail=True)
    down.release.set()
    writer = StateWriter()
    result = StateResolver(engine, None, [down], writer).resolve(DOCS[:2])
    assert len(result.states) == 2
    assert writer.flush(30) and writer.stats().failed == 2 and writer.stats().written == 0
    writer.close()


def test_far_store_hit_is_copied_to_the_near_store(engine, tmp_path):
    near, far = StateStore(tmp_path / "near"), StateStore(tmp_path / "far")
    state = engine.encode([TEXTS[0]])[0]
    far.put("n0", state, text=TEXTS[0])
    writer = StateWriter()
    result = StateResolver(engine, None, [near, far], writer).resolve(DOCS[:1])
    assert result.stats["loaded_per_store"] == [0, 1] and result.stats["states_encoded"] == 0
    writer.flush(30)
    assert_same(near.get("n0", engine.fingerprint, text=TEXTS[0]).state, state)
    writer.close()


def test_stale_and_corrupt_states_are_reencoded_and_reported(engine, tmp_path):
    store = StateStore(tmp_path / "states")
    state = engine.encode([TEXTS[0]])[0]
    store.put("n0", state, text="another text")  # stale: the node's text changed since
    store.put("n1", state, text=TEXTS[1])
    path = store.path("n1", engine.fingerprint)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a bit flip in the tensors
    path.write_bytes(bytes(data))
    result = StateResolver(engine, None, [store], StateWriter()).resolve(DOCS[:2])
    assert result.stats["states_encoded"] == 2
    assert sorted(r["status"] for r in result.stats["states_rejected"]) == [StoreStatus.CORRUPT.value, StoreStatus.STALE.value]
    # both were re-encoded in one batch: compare with that batch (batched GEMMs may round differently from one text alone)
    assert_same(result.states[1], engine.encode(TEXTS[:2])[1])


def test_budgeted_store_evicts_least_recently_used(engine, tmp_path):
    states = engine.encode(TEXTS[:3])
    store = StateStore(tmp_path / "states")
    store.put("probe", states[0])
    one = store.path("probe", engine.fingerprint).stat().st_size
    store.delete("probe")
    disk = BudgetedStore(store, max_bytes=2 * one + one // 2)  # room for two states
    disk.put("a", states[0])
    disk.put("b", states[1])
    assert disk.get_many(["a"], engine.fingerprint)[0].ok  # "a" is now the most recent
    disk.put("c", states[2])
    assert disk.bytes <= disk.max_bytes and disk.evictions == 1
    assert store.get("b", engine.fingerprint).status is StoreStatus.MISSING  # the least recently used
    assert store.get("a", engine.fingerprint).ok and store.get("c", engine.fingerprint).ok
    reopened = BudgetedStore(store, max_bytes=disk.max_bytes)  # a new process counts the files there
    assert reopened.bytes == disk.bytes
    reopened.put("a", states[0])  # a state it found on disk, written again: counted once
    assert reopened.bytes == disk.bytes


def test_bad_writer_bounds_name_the_fix():
    from picaso_rag import PicasoError

    with pytest.raises(PicasoError, match=">= 1"):
        StateWriter(max_pending=0)


def test_a_document_ref_cannot_carry_another_texts_digest(engine):
    """The memory tier is keyed by the digest: a ref whose digest is not its text's would be served
    another text's state, so it cannot be made."""
    from picaso_rag import PicasoError

    other = DocumentRef.of(TEXTS[1], "n1")
    with pytest.raises(PicasoError, match="DocumentRef.of"):
        DocumentRef(TEXTS[0], other.digest, "n0")
