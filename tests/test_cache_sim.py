"""benchmarks/cache_sim.py: LRU stack distances against a brute-force LRU chain of tiers."""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from pathlib import Path

import numpy as np

spec = importlib.util.spec_from_file_location("cache_sim", Path(__file__).resolve().parents[1] / "benchmarks" / "cache_sim.py")
cache_sim = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cache_sim)


def brute_force_tiers(accesses, capacities):
    """Exclusive LRU chain (GPU -> host -> disk -> dropped), promotion to the top: tier index or -1 per access."""
    tiers = [OrderedDict() for _ in capacities]
    out = []
    for item in accesses:
        found = next((i for i, t in enumerate(tiers) if item in t), -1)
        out.append(found)
        if found >= 0:
            del tiers[found][item]
        carry = [item]
        for tier, cap in zip(tiers, capacities):
            for c in carry:
                tier[c] = None
            carry = []
            while len(tier) > cap:
                carry.append(tier.popitem(last=False)[0])
    return out


def test_stack_distances_give_the_tiers_of_an_lru_chain():
    queries = cache_sim.zipf_queries(200, 0.9, 300, 5, seed=1)
    assert all(len(set(q)) == 5 for q in queries.tolist())
    accesses = queries.reshape(-1)
    distances = cache_sim.stack_distances(accesses)
    for capacities in [(3, 10, 20), (10, 0, 50), (1, 1, 1)]:
        want = brute_force_tiers(accesses.tolist(), capacities)
        bounds = np.cumsum(capacities)
        got = [-1 if d < 0 or d >= bounds[-1] else int(np.searchsorted(bounds, d, side="right")) for d in distances.tolist()]
        assert got == want, capacities


def test_che_steady_state_matches_a_long_trace():
    n_docs, k, exponent = 400, 5, 0.9
    queries = cache_sim.zipf_queries(n_docs, exponent, 12000, k, seed=2)
    distances = cache_sim.stack_distances(queries.reshape(-1))[4000 * k:]  # after a warm-up
    popularity = cache_sim.zipf_popularity(n_docs, exponent)
    costs = {"missing": [0, 5], "ttft_gpu_ms": [10.0, 100.0], "fetch_pinned_ms": 1.0, "fetch_store_ms": 50.0}
    for capacities in [(10, 30, 60), (40, 0, 0)]:
        trace = cache_sim.simulate(distances, k, capacities, costs)
        che = cache_sim.simulate(cache_sim.che_distances(popularity, queries[4000:], capacities, 0).reshape(-1), k, capacities, costs)
        for key in ("hit_rate", "gpu_hit_rate", "host_hit_rate"):
            # k distinct documents per query is not quite independent references: a few points apart at most
            assert abs(trace[key] - che[key]) < 0.04, (capacities, key, trace[key], che[key])
