"""StateCache (picaso_rag.cache): byte budgets per tier hold, LRU order, oversized states, threads.

The device tier runs on "cpu" here (CI has no GPU); the code path is the same as for "cuda".
"""

from __future__ import annotations

import random
import threading

import pytest
import torch

from picaso_rag import PicasoError, State, StateCache, StateStore
from llama_index.llms.picaso import PicasoLLM
from llama_index.llms.picaso.handoff import DocumentRef

from .conftest import TEXTS


def state(fill: float = 0.0, heads: int = 1) -> State:
    return State(torch.full((1, heads, 4, 4), fill), torch.zeros(1, 2, 3), torch.zeros(1, heads), 1, "f" * 64)


ONE = state().nbytes


def assert_within_budgets(cache: StateCache) -> None:
    stats = cache.stats()
    assert stats.device_bytes <= stats.device_budget and stats.host_bytes <= stats.host_budget, stats
    # the accounted bytes are the bytes really held
    assert stats.device_bytes == sum(cache._device.states[k].nbytes for k in cache.keys("device"))
    assert stats.host_bytes == sum(cache._host.states[k].nbytes for k in cache.keys("host"))


def test_lru_order_device_to_host_to_dropped():
    cache = StateCache(device_bytes=2 * ONE, host_bytes=2 * ONE)
    for key in "abc":
        cache.put(key, state())
    assert cache.keys("device") == ["b", "c"] and cache.keys("host") == ["a"]
    assert cache.get("b") is not None  # b becomes the most recent on the device
    cache.put("d", state())  # c, the least recently used, moves down
    assert cache.keys("device") == ["b", "d"] and cache.keys("host") == ["a", "c"]
    cache.put("e", state())  # b moves down; the host is full, so a (its oldest) is dropped
    assert cache.keys("device") == ["d", "e"] and cache.keys("host") == ["c", "b"] and "a" not in cache
    assert cache.get("c") is not None  # a host hit moves c back up, pushing d down
    assert cache.keys("device") == ["e", "c"] and cache.keys("host") == ["b", "d"]
    assert cache.get("a") is None
    stats = cache.stats()
    assert (stats.device_hits, stats.host_hits, stats.misses) == (1, 1, 1)
    assert (stats.device_evictions, stats.host_evictions) == (4, 1)
    assert (stats.device_entries, stats.host_entries, stats.device_bytes, stats.host_bytes) == (2, 2, 2 * ONE, 2 * ONE)


def test_state_larger_than_a_budget():
    big = state(heads=4)  # four times a small state's ssm
    cache = StateCache(device_bytes=2 * ONE, host_bytes=8 * ONE)
    cache.put("big", big)  # too big for the device tier: kept on the host only
    assert cache.keys("device") == [] and cache.keys("host") == ["big"]
    assert torch.equal(cache.get("big").ssm, big.ssm)
    assert cache.keys("host") == ["big"]  # a host hit that cannot move up stays on the host
    tiny = StateCache(device_bytes=ONE - 1, host_bytes=ONE - 1)
    tiny.put("too big", state())
    assert len(tiny) == 0 and tiny.stats().not_cached == 1 and tiny.get("too big") is None
    assert_within_budgets(cache)
    assert_within_budgets(tiny)


def test_replacing_a_key_and_the_requested_device():
    cache = StateCache(device_bytes=4 * ONE)
    cache.put("a", state(1.0))
    cache.put("a", state(2.0))
    assert len(cache) == 1 and cache.stats().device_bytes == ONE and cache.get("a").ssm[0, 0, 0, 0] == 2.0
    on_meta = cache.get("a", device="meta")  # any other device than the tier's: a copy there
    assert on_meta.ssm.device.type == "meta" and on_meta.log_decay.device.type == "meta"
    with pytest.raises(PicasoError, match="strings"):
        cache.put(3, state())  # type: ignore[arg-type]
    with pytest.raises(PicasoError, match=">= 0"):
        StateCache(-1)
    cache.clear()
    assert len(cache) == 0 and cache.stats().device_hits == 0


def test_budgets_hold_under_a_stream_of_queries_from_threads():
    """More states than fit, 4 threads querying (get, else put) while a checker samples the budgets."""
    cache = StateCache(device_bytes=3 * ONE, host_bytes=5 * ONE)
    states = {f"doc-{i}": state(float(i)) for i in range(40)}
    errors: list[BaseException] = []
    stop = threading.Event()

    def query(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(400):
                for key in rng.sample(sorted(states), 3):  # k = 3 documents per query
                    found = cache.get(key)
                    if found is None:
                        cache.put(key, states[key])
                    else:  # never another key's state
                        assert torch.equal(found.ssm, states[key].ssm), key
        except BaseException as exc:
            errors.append(exc)

    def check() -> None:
        while not stop.is_set():
            stats = cache.stats()
            if stats.device_bytes > stats.device_budget or stats.host_bytes > stats.host_budget:
                errors.append(AssertionError(f"over budget: {stats}"))

    checker = threading.Thread(target=check)
    threads = [threading.Thread(target=query, args=(seed,)) for seed in range(4)]
    checker.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    checker.join()
    assert not errors, errors[0]
    stats = cache.stats()
    assert stats.device_evictions > 0 and stats.host_evictions > 0 and stats.hits > 0 and stats.misses > 0
    assert stats.device_entries == 3 and stats.host_entries == 5
    assert_within_budgets(cache)


def test_picaso_llm_cache_stays_within_budget(tmp_path, engine):
    """The LLM's own cache over a stream of retrievals of more states than fit: budgets hold and the
    states it serves are still the right ones (equal to a fresh encoding)."""
    texts = [f"{t} (variant {i})" for i in range(3) for t in TEXTS]  # 15 documents
    size = engine.encode([texts[0]])[0].nbytes
    llm = PicasoLLM(engine=engine, state_store=StateStore(tmp_path), state_cache_bytes=3 * size,
                    state_host_cache_bytes=4 * size)
    fresh = dict(zip(texts, engine.encode(texts)))
    docs = [DocumentRef.of(t, f"node-{i}") for i, t in enumerate(texts)]
    rng = random.Random(0)
    for _ in range(30):
        chosen = rng.sample(docs, 3)
        resolved = llm.resolve_states(chosen)
        for doc, got in zip(chosen, resolved.states):
            assert torch.allclose(got.ssm, fresh[doc.text].ssm, atol=1e-6)
        assert_within_budgets(llm.state_cache)
    stats = llm.state_cache.stats()
    assert stats.device_evictions > 0 and stats.host_hits > 0 and stats.device_entries == 3
