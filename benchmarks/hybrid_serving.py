"""GPU check: a hybrid model (Mamba-2 + attention layers) served by the continuous-batching
scheduler, batched decoding against one request at a time. 78 s on the H200, of which 39 s set-up
(the model, encoding the document pool, the Triton warm-up; docs/benchmarks/hybrid_serving_h200.json).

    bash scripts/gpu_setup.sh build        # the fast set-up (mamba-ssm's Triton kernels), on the GPU machine
    PYTHONPATH=. python benchmarks/hybrid_serving.py --out docs/benchmarks/hybrid_serving_h200.json
    python benchmarks/hybrid_serving.py --device cpu --tiny --out /tmp/hybrid_serving_cpu.json   # the CPU path (a test runs it)

Model: a random Granite-4.0-H-like hybrid in bf16: 12 layers, layers 5 and 11 NoPE attention
(12 query heads, 4 key/value heads x 64), the others Mamba-2 (d_model 768, d_state 128, head 64),
a shared gated MLP after every mixer. Workload: a pool of stored document states (256 random tokens
each); a request composes k = 4 of them (PICASO-S: SSM states composed; keys and values united,
1,024 keys per attention layer), reads a 32-token question and generates 64 tokens (EOS off).
Compositions are made before the clock starts: what is timed is serving.

- ``serial``: ``engine.generate`` one request after another (what serving a hybrid meant before:
  one at a time);
- ``batched``: B requests submitted at once to ``Scheduler(engine, max_batch=B)`` (a
  HybridScheduler: joining prompts read in one forward, decoding batched over all rows with a key mask), for
  each B of ``--batches``; output tokens/s from the first submission to the last token, the
  inter-token latency, the mean decode batch.
- ``greedy_agreement``: the batched answers against the same requests generated alone (exact in
  fp32 on the CPU, tests/test_hybrid_serving.py; in bf16 a batched GEMM may round differently, so
  it is reported, not asserted).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from picaso_rag import PicasoEngine, Tokenizer
from picaso_rag.hybrid import HybridLM, init_weights
from picaso_rag.hybrid_config import HybridConfig
from picaso_rag.kernels.ssd import triton_kernels_available
from picaso_rag.scheduler import Scheduler

REPO = Path(__file__).resolve().parents[1]


def granite_like(args) -> HybridConfig:
    if args.tiny:  # the CPU path's shape (seconds on 2 cores)
        return HybridConfig(family="granitemoehybrid", vocab_size=50288, d_model=64, layer_types=("mamba", "attention", "mamba", "attention"),
                            d_state=16, headdim=16, ngroups=1, chunk_size=16, n_heads=4, n_kv_heads=2, head_dim=16,
                            ffn="granite", ffn_dim=96)
    attention = {int(i) for i in args.attention.split(",")}
    return HybridConfig(family="granitemoehybrid", vocab_size=50288, d_model=args.d_model,
                        layer_types=tuple("attention" if i in attention else "mamba" for i in range(args.layers)),
                        d_state=128, headdim=64, ngroups=1, chunk_size=256, n_heads=args.d_model // 64, n_kv_heads=4,
                        head_dim=64, ffn="granite", ffn_dim=2 * args.d_model)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(args) -> dict:
    began = time.perf_counter()
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = granite_like(args)
    with torch.device(device):
        model = init_weights(HybridLM(cfg), seed=0).to(dtype)
    tokenizer = Tokenizer.from_file(args.tokenizer)
    tokenizer.eos_token_id = None  # random weights: answers run to their --answer-tokens
    engine = PicasoEngine(model, tokenizer, fingerprint=hashlib.sha256(f"hybrid-serving-{cfg}".encode()).hexdigest())
    gen = torch.Generator().manual_seed(0)
    pool_tokens = torch.randint(1000, 50000, (args.pool, args.doc_tokens), generator=gen).tolist()
    start = time.perf_counter()
    pool = engine.encode(pool_tokens, batch_size=16)
    sync(device)
    encode_s = time.perf_counter() - start
    n_requests = max(max(args.batches), args.serial)
    requests = []
    for i in range(n_requests):
        docs = torch.randperm(args.pool, generator=gen)[:args.k].tolist()
        question = torch.randint(1000, 50000, (args.question_tokens,), generator=gen).tolist()
        requests.append((question, engine.compose([pool[d] for d in docs], method="picaso-s")))
    sync(device)
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
           "ssm_kernels": "triton (mamba-ssm)" if device == "cuda" and triton_kernels_available() else "pure-torch reference",
           "model": {"layers": cfg.n_layer, "attention_layers": list(cfg.attn_layers), "d_model": cfg.d_model,
                     "kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "dtype": str(dtype).removeprefix("torch."),
                     "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)},
           "workload": {"k": args.k, "doc_tokens": args.doc_tokens, "question_tokens": args.question_tokens,
                        "answer_tokens": args.answer_tokens, "kv_tokens_per_request": requests[0][1].n_keys,
                        "kv_bytes_per_token": requests[0][1].kv_bytes_per_token},
           "encode_s": round(encode_s, 3), "args": {k: str(v) for k, v in vars(args).items()}}
    print(json.dumps({k: out[k] for k in ("device", "ssm_kernels", "model", "workload")}), flush=True)

    out["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    if device == "cuda":  # the floor of one decode step: reading the weights once at the measured copy bandwidth
        big = torch.empty(1 << 30, dtype=torch.uint8, device=device)
        big.clone()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(5):
            big.clone()
        sync(device)
        out["copy_bandwidth_GBps"] = round(2 * 5 * big.numel() / (time.perf_counter() - t0) / 1e9, 1)
        out["step_floor_ms"] = round(out["weights_bytes"] / (out["copy_bandwidth_GBps"] * 1e9) * 1000, 3)
        del big
    out["modes"] = {}
    for mode in args.graphs:
        engine = PicasoEngine(model, tokenizer, fingerprint=engine.fingerprint, cuda_graphs=mode == "graphed")
        out["modes"][mode] = serve(args, engine, requests, mode == "graphed", device)
    out["total_s"] = round(time.perf_counter() - began, 2)
    return out


def serve(args, engine: PicasoEngine, requests: list, graphed: bool, device: str) -> dict:
    """Serial and batched serving of ``requests`` by ``engine`` (decode graphed or eager)."""
    out: dict = {}
    began = time.perf_counter()
    # warm-up: the kernels at the shapes they will see (Triton compiles on first use)
    engine.generate(requests[0][0], state=requests[0][1], max_new_tokens=4)
    with Scheduler(engine, max_batch=2, cuda_graphs=graphed) as scheduler:
        for r in [scheduler.submit(q, state=s, max_new_tokens=4) for q, s in requests[:2]]:
            r.wait(300)
    sync(device)
    out["setup_s"] = round(time.perf_counter() - began, 2)
    print(json.dumps({"graphed": graphed, "setup_s": out["setup_s"]}), flush=True)

    alone: dict[int, list[int]] = {}

    def one_at_a_time() -> None:  # in a worker thread, as a server runs it (and as the scheduler's loop runs)
        for i in range(args.serial):
            q, s = requests[i]
            alone[i] = engine.generate(q, state=s, max_new_tokens=args.answer_tokens).token_ids
        sync(device)

    start = time.perf_counter()
    worker = threading.Thread(target=one_at_a_time)
    worker.start()
    worker.join()
    serial_s = time.perf_counter() - start
    tokens = sum(len(t) for t in alone.values())
    out["serial"] = {"requests": args.serial, "seconds": round(serial_s, 3), "output_tokens_per_s": round(tokens / serial_s, 1),
                     "ms_per_request": round(serial_s / args.serial * 1000, 2)}
    # one request's decode alone: the time per token after the first (TTFT excluded), median of the serial requests
    per_token = []
    for q, s in requests[:args.serial]:
        stream = engine.stream(q, state=s, max_new_tokens=args.answer_tokens)
        first = None
        for _ in stream:
            if first is None:
                sync(device)
                first = time.perf_counter()
        sync(device)
        n = len(stream.result["token_ids"])
        if first is not None and n > 1:
            per_token.append((time.perf_counter() - first) / (n - 1) * 1000)
    out["serial"]["decode_ms_per_token_p50"] = round(statistics.median(per_token), 3) if per_token else None
    print(json.dumps({"serial": out["serial"]}), flush=True)

    out["batched"] = []
    for batch in args.batches:
        with Scheduler(engine, max_batch=batch, max_queue=batch, cuda_graphs=graphed) as scheduler:
            start = time.perf_counter()
            submitted = [scheduler.submit(q, state=s, max_new_tokens=args.answer_tokens) for q, s in requests[:batch]]
            results = [r.wait(600) for r in submitted]
            seconds = time.perf_counter() - start
            stats = scheduler.stats()
        itl = [b - a for r in submitted for a, b in zip(r.timings.token_times, r.timings.token_times[1:])]
        reads = max(r.timings.read for r in submitted) - min(r.timings.submitted for r in submitted)
        tokens = sum(len(g.token_ids) for g in results)
        same = [results[i].token_ids == alone[i] for i in range(min(batch, args.serial))]
        row = {"batch": batch, "seconds": round(seconds, 3), "output_tokens_per_s": round(tokens / seconds, 1),
               "vs_serial": round(tokens / seconds / out["serial"]["output_tokens_per_s"], 2),
               "itl_ms_p50": round(statistics.median(itl) * 1000, 3) if itl else None,
               "all_prompts_read_ms": round(reads * 1000, 1), "mean_decode_batch": stats["mean_batch"],
               "greedy_agreement": f"{sum(same)}/{len(same)}", "decode_graphs": stats.get("decode_graphs")}
        out["batched"].append(row)
        print(json.dumps({"graphed": graphed, **row}), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (the CPU path's test)")
    parser.add_argument("--tokenizer", default=str(REPO / "models" / "picaso-mini" / "tokenizer.json"))
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--attention", default="5,11", help="indices of the attention layers")
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--pool", type=int, default=16)
    parser.add_argument("--doc-tokens", type=int, default=256)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--serial", type=int, default=8, help="requests generated one at a time")
    parser.add_argument("--graphs", default="eager,graphed",
                        help="decode modes to run, in this order: eager (the baseline) and/or graphed (CUDA graphs)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "hybrid_serving_h200.json")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.graphs = args.graphs.split(",")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on the GPU machine, or pass --device cpu --tiny")
    out = run(args)
    out["command"] = " ".join(["python benchmarks/hybrid_serving.py", *(argv if argv is not None else sys.argv[1:])])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)
    return out


if __name__ == "__main__":
    main()
