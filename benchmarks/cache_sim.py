"""Simulated hit rates and time to first token of the state tiers, with the costs measured on the H200.

    python benchmarks/cache_sim.py --costs docs/benchmarks/miss_latency_h200.json --out docs/benchmarks/cache_sim

A corpus of --docs documents (default one million) whose retrievals follow a Zipf law (the r-th
most popular document is retrieved with probability proportional to r^-s, s in --exponents); each
query retrieves k = 10 distinct documents. The tiers (GPU, host, local disk) form one LRU chain,
as :class:`picaso_rag.StateCache` and :class:`picaso_rag.cache.BudgetedStore` do: a new or used
state enters the GPU tier, the least recently used move down a tier, out of the last tier they are
dropped. Such a chain holds exactly the most recently used states: a state is in the first tier
whose cumulative capacity exceeds its LRU stack distance. Two ways to get the tiers of each access:

- ``--method che`` (default): the steady state of a long-running service, by Che's approximation
  of an LRU cache under independent Zipf references (Che, Tung and Wang 2002; Fricker, Robert and
  Roberts 2012): an LRU of C items holds document i with probability ``1 - exp(-p_i T_C)``, where
  ``sum_i (1 - exp(-p_i T_C)) = C``. Queries are then sampled, each document's tier drawn from
  those probabilities. tests/test_cache_sim.py checks it against the trace below.
- ``--method trace``: a trace of --warmup + --queries queries, one pass computing every access's
  LRU stack distance (a Fenwick tree over time); documents never retrieved before are misses
  (a cold start: far from the steady state for the larger caches unless the trace is very long).

Time to first token of a query with m misses, h host hits and d disk hits:
``TTFT_gpu(m) + h * fetch_pinned + ceil(d / 8) * fetch_store`` where TTFT_gpu(m) is the measured
TTFT at k = 10 with the other states on the GPU (interpolated in m), fetch_pinned the measured
copy of one state from pinned memory, fetch_store the measured load of one state from the local
store (8 loaded in parallel, as ``StateStore.get_many``). Capacities are tier bytes / bytes per
state, for bf16 and fp8 states (picaso_rag.precision). Mean and p99 over the measured queries,
after a warm-up.

Bytes per state: the costs file's ``state_bytes`` when it has them (benchmarks/miss_latency.py
writes them for any model, a hybrid's at the run's document length: its keys and values grow with
the document), else from the official Mamba-2 shape it names (``d_model``, ``n_layer``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from picaso_rag import Mamba2Config  # noqa: E402
from picaso_rag.precision import state_nbytes  # noqa: E402

GiB, TiB = 2**30, 2**40
# (name, GPU tier bytes, host tier bytes, local disk bytes): an H200 (141 GB, 5.4 GB of 2.7b weights)
# giving 64 GiB to states, a host of 0.5-2 TiB RAM, local NVMe of 0-64 TiB
TIERS = [
    ("GPU 64 GiB", 64 * GiB, 0, 0),
    ("+ host 512 GiB", 64 * GiB, 512 * GiB, 0),
    ("+ host 2 TiB", 64 * GiB, 2 * TiB, 0),
    ("+ host 2 TiB + disk 8 TiB", 64 * GiB, 2 * TiB, 8 * TiB),
    ("+ host 2 TiB + disk 32 TiB", 64 * GiB, 2 * TiB, 32 * TiB),
]


def zipf_queries(n_docs: int, exponent: float, n_queries: int, k: int, seed: int) -> np.ndarray:
    """[n_queries, k] document ids, distinct within a query, popularity ~ rank^-exponent (ids are ranks)."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(np.arange(1, n_docs + 1, dtype=np.float64) ** -exponent)
    cdf /= cdf[-1]
    out = np.empty((n_queries, k), dtype=np.int64)
    for q in range(n_queries):
        chosen: list[int] = []
        while len(chosen) < k:
            for d in np.searchsorted(cdf, rng.random(2 * k)).tolist():
                if d not in chosen:
                    chosen.append(d)
                    if len(chosen) == k:
                        break
        out[q] = chosen
    return out


def stack_distances(accesses: np.ndarray) -> np.ndarray:
    """LRU stack distance of each access (distinct items used since this item's last use; -1: first use)."""
    n = len(accesses)
    tree = [0] * (n + 1)  # Fenwick tree over access times: 1 where an item was last used
    last: dict[int, int] = {}
    out = np.empty(n, dtype=np.int64)
    live = 0
    for t, item in enumerate(accesses.tolist()):
        prev = last.get(item)
        if prev is None:
            out[t] = -1
        else:
            i, before = prev + 1, 0  # marks at times <= prev
            while i > 0:
                before += tree[i]
                i -= i & -i
            out[t] = live - before  # marks after prev: distinct items used since
            i = prev + 1
            while i <= n:
                tree[i] -= 1
                i += i & -i
            live -= 1
        i = t + 1
        while i <= n:
            tree[i] += 1
            i += i & -i
        live += 1
        last[item] = t
    return out


def zipf_popularity(n_docs: int, exponent: float) -> np.ndarray:
    p = np.arange(1, n_docs + 1, dtype=np.float64) ** -exponent
    return p / p.sum()


def che_hit_probability(p: np.ndarray, capacity: int) -> np.ndarray:
    """Probability that an LRU of ``capacity`` items holds each item (Che's approximation, steady state)."""
    if capacity <= 0:
        return np.zeros_like(p)
    if capacity >= len(p):
        return np.ones_like(p)
    low, high = 0.0, 1.0
    while np.sum(-np.expm1(-p * high)) < capacity:
        high *= 2
    for _ in range(100):  # bisection on the characteristic time T_C
        mid = (low + high) / 2
        low, high = (mid, high) if np.sum(-np.expm1(-p * mid)) < capacity else (low, mid)
    return -np.expm1(-p * (low + high) / 2)


def che_distances(p: np.ndarray, queries: np.ndarray, capacities: tuple[int, int, int], seed: int) -> np.ndarray:
    """A stand-in for stack distances under Che's approximation: for each access, a distance that
    falls in the tier drawn from the steady-state probabilities (0: GPU, C1: host, C1+C2: disk, -1: miss)."""
    bounds = np.cumsum(capacities)
    held = np.stack([che_hit_probability(p, int(b)) for b in bounds])  # [3, n_docs], nondecreasing
    u = np.random.default_rng(seed + 1).random(queries.shape)
    probs = held[:, queries]  # [3, n_queries, k]
    tier = (u[None] >= probs).sum(0)  # 0 GPU, 1 host, 2 disk, 3 miss
    starts = np.array([0, bounds[0], bounds[1], -1])
    return starts[tier]


def simulate(distances: np.ndarray, k: int, capacities: tuple[int, int, int], costs: dict) -> dict:
    """Hit rates per tier and TTFT statistics for one cache configuration (capacities in states)."""
    gpu, host, disk = capacities
    d = distances.reshape(-1, k)
    miss = (d < 0) | (d >= gpu + host + disk)
    in_gpu = (d >= 0) & (d < gpu)
    in_host = (d >= gpu) & (d < gpu + host)
    in_disk = (d >= gpu + host) & (d < gpu + host + disk)
    m, h, dk = miss.sum(1), in_host.sum(1), in_disk.sum(1)
    ms, ttft_by_m = costs["missing"], costs["ttft_gpu_ms"]
    ttft = np.interp(m, ms, ttft_by_m) + h * costs["fetch_pinned_ms"] + np.ceil(dk / 8) * costs["fetch_store_ms"]
    return {"capacity_states": list(capacities), "hit_rate": float(1 - miss.mean()), "gpu_hit_rate": float(in_gpu.mean()),
            "host_hit_rate": float(in_host.mean()), "disk_hit_rate": float(in_disk.mean()),
            "queries_without_miss": float((m == 0).mean()), "ttft_mean_ms": float(ttft.mean()),
            "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p99_ms": float(np.percentile(ttft, 99))}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = [t[0] for t in TIERS]
    x = np.arange(len(names))
    for s_index, (exponent, by_precision) in enumerate(report["results"].items()):
        for precision, style in (("bf16", "-o"), ("fp8", "--s")):
            rows = by_precision[precision]
            color = f"C{s_index}"
            axes[0].plot(x, [r["hit_rate"] for r in rows], style, color=color, label=f"s={exponent}, {precision}")
            axes[1].plot(x, [r["ttft_mean_ms"] for r in rows], style, color=color, label=f"s={exponent}, {precision}")
            axes[2].plot(x, [r["ttft_p99_ms"] for r in rows], style, color=color, label=f"s={exponent}, {precision}")
    costs = report["costs"]
    for ax, title in zip(axes, ("hit rate (state found in a tier)", "mean TTFT (ms)", "p99 TTFT (ms)")):
        ax.set_xticks(x, names, rotation=20, ha="right", fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax is not axes[0]:
            ax.axhline(costs["concat_ttft_ms"], color="k", ls=":", label="concatenation (no states)")
            ax.axhline(costs["ttft_gpu_ms"][0], color="gray", ls="--", label="every state on the GPU")
            ax.set_yscale("log")
    axes[1].legend(fontsize=6)
    fig.suptitle(f"{report['n_docs']:,} documents, Zipf retrievals, k={report['k']}, {report.get('model', 'mamba2-' + report['shape'])} "
                 f"costs measured on the {costs['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--costs", type=Path, default=Path("docs/benchmarks/miss_latency_h200.json"))
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--exponents", type=float, nargs="+", default=[0.8, 1.0, 1.2])
    parser.add_argument("--method", choices=["che", "trace"], default="che", help="steady state, or a cold-start trace")
    parser.add_argument("--queries", type=int, default=100_000, help="measured queries")
    parser.add_argument("--warmup", type=int, default=100_000, help="trace: queries before the measured ones")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/cache_sim"), help="writes .json, .md, .png")
    parser.add_argument("--plot", action="store_true", help="only redraw the PNG from --out.json")
    args = parser.parse_args()
    if args.plot:
        plot(json.loads(args.out.with_suffix(".json").read_text()), args.out.with_suffix(".png"))
        return
    measured = json.loads(args.costs.read_text())
    runs = sorted((r for r in measured["runs"] if r["tier"] == "gpu"), key=lambda r: r["missing"])
    costs = {"device": measured["device"], "source": str(args.costs), "missing": [r["missing"] for r in runs],
             "ttft_gpu_ms": [r["ttft_ms"] for r in runs], "fetch_pinned_ms": measured["fetch_pinned_ms"],
             "fetch_pinned_fp8_ms": measured["fetch_pinned_fp8_dequantize_ms"],
             "fetch_store_ms": measured["fetch_store_ms"], "concat_ttft_ms": measured["concat_ttft_ms"]}
    k = measured["k"]
    if "state_bytes" in measured:  # any model (a hybrid's at the measured document length)
        state_bytes = {p: int(measured["state_bytes"][p]) for p in ("bf16", "fp8")}
    else:  # result files of a random Mamba-2 at an official shape
        cfg = Mamba2Config(d_model=measured["d_model"], n_layer=measured["n_layer"], vocab_size=50288)
        state_bytes = {p: state_nbytes(cfg, p) for p in ("bf16", "fp8")}
    model = measured.get("model", f"mamba2-{measured['shape']}")
    if model.startswith("random "):
        model = model[len("random "):]
    report = {"method": args.method, "n_docs": args.docs, "k": k, "shape": measured["shape"], "model": model,
              "queries": args.queries, "warmup": args.warmup,
              "seed": args.seed, "state_bytes": state_bytes, "tiers": TIERS, "costs": costs,
              "command": " ".join(["python", "benchmarks/cache_sim.py", *sys.argv[1:]]), "results": {}}
    for exponent in args.exponents:
        start = time.perf_counter()
        if args.method == "trace":
            queries = zipf_queries(args.docs, exponent, args.warmup + args.queries, k, args.seed)
            distances = stack_distances(queries.reshape(-1))[args.warmup * k:]
        else:
            queries = zipf_queries(args.docs, exponent, args.queries, k, args.seed)
            popularity = zipf_popularity(args.docs, exponent)
        report["results"][str(exponent)] = {}
        for precision in ("bf16", "fp8"):
            c = dict(costs, fetch_pinned_ms=costs["fetch_pinned_ms" if precision == "bf16" else "fetch_pinned_fp8_ms"])
            rows = []
            for name, gpu, host, disk in TIERS:
                capacities = tuple(b // state_bytes[precision] for b in (gpu, host, disk))
                if args.method == "che":
                    distances = che_distances(popularity, queries, capacities, args.seed).reshape(-1)
                rows.append(dict(simulate(distances, k, capacities, c), tiers=name))
            report["results"][str(exponent)][precision] = rows
        print(f"s={exponent}: {time.perf_counter() - start:.0f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    setting = ("steady state (Che's approximation)" if args.method == "che"
               else f"a trace of {args.queries:,} queries after {args.warmup:,} of warm-up")
    lines = [f"{args.docs:,} documents, Zipf exponent s, k = {k}, {setting}, {args.queries:,} queries sampled; "
             f"{model} costs measured on the {measured['device']} ({args.costs}); concatenation "
             f"{costs['concat_ttft_ms']:.0f} ms, every state on the GPU {costs['ttft_gpu_ms'][0]:.1f} ms", "",
             "| s | states | tiers | states held (GPU / host / disk) | hit rate | queries without a miss | mean TTFT | p99 TTFT |",
             "|---|---|---|---|---|---|---|---|"]
    for exponent, by_precision in report["results"].items():
        for precision, rows in by_precision.items():
            for r in rows:
                held = " / ".join(f"{c:,}" for c in r["capacity_states"])
                lines.append(f"| {exponent} | {precision} | {r['tiers']} | {held} | {r['hit_rate']:.1%} | "
                             f"{r['queries_without_miss']:.1%} | {r['ttft_mean_ms']:.0f} ms | {r['ttft_p99_ms']:.0f} ms |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(report, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
