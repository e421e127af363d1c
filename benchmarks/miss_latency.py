"""Time to first token when some of the k retrieved states are missing (the store as a cache).

Run on the GPU machine (mamba-ssm's Triton kernels installed, ../shared/docs/gpu.md "Fast set-up")::

    PYTHONPATH=. python benchmarks/miss_latency.py --tokenizer path/to/tokenizer.json --out docs/benchmarks/miss_latency_h200.json

At one official shape (default mamba2-2.7b, random bf16 weights: speed does not depend on them),
k = 10 documents of 512 tokens and a 64-token query. For m missing states (m in --missing), the
10 - m others are hits of one tier (GPU-resident, or pinned host memory) and the m misses are
encoded together in one batch by :class:`picaso_rag.resolver.StateResolver`, which queues them for a
background write-back to a local StateStore (bf16 files) through a :class:`StateWriter`; the time
to first token (TTFT) covers resolve + compose + reading the query + the first token, wall clock
until the token is on the host. The writer is flushed between repeats, outside the timing, and
once more with the write-back running during the next answer (``*_writing_ttft_ms``). Beside it,
concatenation (the 10 documents and the query read as one prompt, our engine), and the per-state
costs the simulation (benchmarks/cache_sim.py) takes: fetching one state from pinned memory, from
the local store (page cache), fp8 vs bf16 transfers, and encoding 1..k documents in one batch.
Medians of --repeats after a warm-up.

``--model DIR``: a checkpoint directory instead of a random model at --shape (any model
``PicasoEngine.from_pretrained`` loads, hybrids included; its own tokenizer unless --tokenizer).
A hybrid's state grows with its document, so ``state_bytes`` (what cache_sim.py sizes its tiers
by) is measured at this run's document length.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import fields, replace
import hashlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from picaso_rag import Mamba2Config, Mamba2LM, PicasoEngine, State, StateCache, StateStore, Tokenizer, init_weights  # noqa: E402
from picaso_rag.resolver import DocumentRef, StateResolver, StateWriter  # noqa: E402
from picaso_rag.precision import dequantize, quantize, state_nbytes  # noqa: E402

SHAPES = {"130m": (768, 24), "370m": (1024, 48), "780m": (1536, 48), "1.3b": (2048, 48), "2.7b": (2560, 64),
          "tiny": (64, 2)}  # tiny: a CPU check of this script
VOCAB = 50288


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], repeats: int, setup: Callable[[], object] | None = None,
              teardown: Callable[[], object] | None = None) -> float:
    """Median wall-clock ms of ``fn`` (synchronised), after one warm-up; setup/teardown run untimed."""
    times = []
    for rep in range(repeats + 1):
        if setup:
            setup()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        if rep:
            times.append((time.perf_counter() - start) * 1000)
        if teardown:
            teardown()
    return statistics.median(times)


def host_copy(state: State, pin: bool) -> State:
    """``state`` in host memory, every tensor (a hybrid's keys and values too) pinned if ``pin``."""
    host = state.to("cpu")
    if not pin:
        return host
    return replace(host, **{f.name: getattr(host, f.name).pin_memory() for f in fields(host)
                            if isinstance(getattr(host, f.name), torch.Tensor)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", help="tokenizer.json (needed without --model)")
    parser.add_argument("--model", help="a checkpoint directory (Mamba-2 or hybrid) instead of a random model at --shape")
    parser.add_argument("--shape", default="2.7b", choices=list(SHAPES))
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--doc-tokens", type=int, default=512)
    parser.add_argument("--query-tokens", type=int, default=64)
    parser.add_argument("--missing", default="0,1,3,5,10")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if torch.cuda.is_available():
        from picaso_rag.kernels import triton_kernels_available

        if not triton_kernels_available():
            raise SystemExit("needs mamba-ssm's Triton kernels on the GPU (../shared/docs/gpu.md, Fast set-up)")
    missing = [int(m) for m in args.missing.split(",")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.model:
        engine = PicasoEngine.from_pretrained(args.model, device=device, dtype=dtype, tokenizer=args.tokenizer)
        tokenizer, cfg = engine.tokenizer, engine.model.cfg
        args.shape = Path(args.model).name
        d_model, n_layer = cfg.d_model, cfg.n_layer
    else:
        if not args.tokenizer:
            raise SystemExit("give --tokenizer (or --model, a checkpoint directory with its tokenizer)")
        tokenizer = Tokenizer.from_file(args.tokenizer)
        d_model, n_layer = SHAPES[args.shape]
        cfg = Mamba2Config(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB)
        with torch.device(device):
            model = init_weights(Mamba2LM(cfg).to(dtype), seed=0)
        engine = PicasoEngine(model, tokenizer, fingerprint=hashlib.sha256(f"miss-{args.shape}".encode()).hexdigest())
    tokenizer.eos_token_id = None  # random weights: never stop early
    rng = torch.Generator().manual_seed(0)
    k, n = args.k, args.doc_tokens
    docs = torch.randint(0, min(50000, cfg.vocab_size), (k, n), generator=rng).tolist()
    texts = [tokenizer.decode(d) for d in docs]  # the resolver encodes texts (as it does for retrieved nodes)
    query = torch.randint(0, min(50000, cfg.vocab_size), (args.query_tokens,), generator=rng).tolist()
    states = engine.encode(texts, batch_size=k)
    keys = [f"doc-{i}" for i in range(k)]
    result: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                    "torch": torch.__version__, "shape": args.shape, "d_model": d_model, "n_layer": n_layer, "k": k,
                    "doc_tokens": n, "doc_tokens_actual": [s.n_tokens for s in states], "query_tokens": len(query),
                    "state_MiB": states[0].nbytes / 2**20, "repeats": args.repeats, "command": " ".join(sys.argv),
                    "model": args.model or f"random mamba2-{args.shape}", "hybrid": hasattr(cfg, "attn_layers"),
                    # bytes of one stored state (a hybrid's at this run's mean document length)
                    "state_bytes": {p: state_nbytes(cfg, p, round(statistics.mean(s.n_tokens for s in states)))
                                    for p in ("bf16", "fp8")}}
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(result, indent=1))

    with torch.inference_mode():
        # ---- concatenation: the k documents and the query as one prompt
        prompt = sum((engine.tokenize(t) for t in texts), []) + query  # the very tokens the states summarise
        result["concat_ttft_ms"] = median_ms(lambda: engine.generate(prompt, max_new_tokens=1), args.repeats)
        # ---- encoding m documents in one batch (what a miss costs)
        result["encode_ms"] = {str(m): median_ms(lambda m=m: engine.encode(texts[:m], batch_size=k), args.repeats)
                               for m in sorted({max(1, m) for m in missing} | {1, 2})}
        print("concat", result["concat_ttft_ms"], "encode", result["encode_ms"], flush=True)
        save()

        # ---- per-state fetch costs: pinned host -> GPU (bf16, fp8 + dequantize), local store -> GPU
        pinned = [host_copy(s, pin=device == "cuda") for s in states]
        fp8 = {name: t.cpu() for name, t in quantize(states[0], "fp8").items()}
        if device == "cuda":
            fp8 = {name: t.pin_memory() for name, t in fp8.items()}
        result["fetch_pinned_ms"] = median_ms(lambda: pinned[0].to(device, non_blocking=True), args.repeats)
        result["fetch_pinned_fp8_dequantize_ms"] = median_ms(
            lambda: dequantize({nm: t.to(device, non_blocking=True) for nm, t in fp8.items()}, n, engine.fingerprint,
                               dtype=dtype, position=getattr(states[0], "position", None)), args.repeats)
        store_dir = tempfile.TemporaryDirectory()
        store = StateStore(store_dir.name)
        store.put("probe", states[0])
        result["store_file_MiB"] = store.path("probe", engine.fingerprint).stat().st_size / 2**20
        result["fetch_store_ms"] = median_ms(
            lambda: store.get("probe", engine.fingerprint).state.to(device, non_blocking=True), args.repeats)
        result["store_put_ms"] = median_ms(lambda: store.put("probe", states[0]), args.repeats)
        print("fetch", {k_: v for k_, v in result.items() if k_.startswith(("fetch", "store"))}, flush=True)
        save()

        # ---- TTFT with m of the k states missing, hits in one tier, misses encoded in one batch
        result["runs"] = []
        refs = [DocumentRef.of(text, key) for text, key in zip(texts, keys)]
        writer = StateWriter(max_pending=2 * k, max_pending_bytes=(2 * k + 1) * states[0].nbytes)
        for tier in ("gpu", "pinned"):
            for m in missing:
                cache = StateCache(device_bytes=(k + 1) * states[0].nbytes if tier == "gpu" else 0,
                                   host_bytes=(k + 1) * states[0].nbytes if tier == "pinned" else 0, device=device)
                resolver = StateResolver(engine, cache, [store], writer, encode_batch_size=k)
                order = list(range(k))
                hits = set(order[m:])  # the first m documents are missing everywhere

                def setup() -> None:
                    cache.clear()
                    for i in hits:
                        cache.put(refs[i].digest, states[i] if tier == "gpu" else pinned[i])
                    store.delete_many(keys)

                def answer() -> None:
                    resolved = resolver.resolve([refs[i] for i in order])
                    ctx = engine.compose(resolved.states, "picaso-s")
                    engine.generate(query, state=ctx, max_new_tokens=1)

                run = {"tier": tier, "missing": m}
                run["ttft_ms"] = median_ms(answer, args.repeats, setup=setup, teardown=lambda: writer.flush())
                # the same with the previous answer's write-back still running in the background

                def setup_writing() -> None:
                    setup()
                    if m:  # queue the write-back of m states, as the previous query's misses would
                        for i in range(m):
                            writer.submit([store], f"prev-{i}", states[i], texts[i])

                run["writing_ttft_ms"] = median_ms(answer, args.repeats, setup=setup_writing, teardown=lambda: writer.flush())
                run["speedup_vs_concat"] = result["concat_ttft_ms"] / run["ttft_ms"]
                result["runs"].append(run)
                print(json.dumps(run), flush=True)
                save()
        writer.close()
        result["writer"] = dataclasses.asdict(writer.stats())
        store_dir.cleanup()
    save()
    print(json.dumps({k_: v for k_, v in result.items() if k_ != "runs"}, indent=1))


if __name__ == "__main__":
    main()
