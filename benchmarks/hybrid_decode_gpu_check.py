"""GPU check of the graphed hybrid decode (picaso_rag.graphs.StepGraphs) on the shipped picaso-mini.

    bash scripts/gpu_setup.sh build      # on the GPU machine: mamba-ssm's Triton kernels
    PYTHONPATH=. python benchmarks/hybrid_decode_gpu_check.py --out docs/benchmarks/hybrid_decode_h200.json

1. Graphs against eager, fp32: greedy tokens of ``engine.generate`` with CUDA graphs against the same
   engine without them, for prompts of 1, 2 and many tokens read from a composed state (k documents),
   each answer long enough to cross key-span buckets; then the scheduler (graphed) against
   engine.generate alone (eager) for more requests than rows, so rows leave and others join them.
2. Decode time per token, bf16, one request: eager against graphed in this run (the median over
   requests of the time per token after the first), beside the floor of one step (the weights read
   once at the measured copy bandwidth).
3. bf16 on the trained model: 16 requests batched by the scheduler against each decoded alone;
   every difference explained by the logit margin where the answers first part.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from picaso_rag import PicasoEngine
from picaso_rag.kernels.ssd import triton_kernels_available
from picaso_rag.scheduler import Scheduler

REPO = Path(__file__).resolve().parents[1]
DOCS = ["The Eiffel Tower was completed in 1889 for the World's Fair in Paris, and it was the tallest structure "
        "in the world for four decades.", "Mamba is a state space model whose state has a fixed size; it reads text "
        "one token at a time and keeps a summary.", "Rivers carry sediment to the sea; over millions of years the "
        "deltas grow outward and the coastline moves."]


def sync() -> None:
    torch.cuda.synchronize()


def decode_ms_per_token(engine: PicasoEngine, prompt: list[int], state, n: int) -> float:
    stream = engine.stream(prompt, state=state, max_new_tokens=n)
    first = None
    for _ in stream:
        if first is None:
            sync()
            first = time.perf_counter()
    sync()
    return (time.perf_counter() - first) / (len(stream.result["token_ids"]) - 1) * 1000


QUESTIONS = [" Question: when was the Eiffel Tower completed?\nAnswer:", " Question: what is Mamba?\nAnswer:",
             " Question: what do rivers carry to the sea?\nAnswer:", " The", " Summary:", " In short,",
             " Question: why does the coastline move?\nAnswer:", " Question: how does Mamba read text?\nAnswer:"]


def batched_vs_alone_bf16(engine: PicasoEngine, eager: PicasoEngine, n_tokens: int) -> dict:
    """Greedy answers of 16 requests (8 questions x 2 composed contexts) batched by the scheduler
    (graphed, 16 rows) against each decoded alone by the eager engine, bf16. Where they differ, the
    first differing token is explained by the alone run's margin between its top two logits there
    (a near tie that bf16 rounding of another reduction order can flip)."""
    states = engine.encode(DOCS * 2)
    contexts = [engine.compose(states[:3], method="picaso-s"), engine.compose(states[1:5], method="picaso-s")]
    requests = [(engine.tokenize(q), c) for q in QUESTIONS for c in contexts]
    alone = [eager.generate(p, state=c, max_new_tokens=n_tokens).token_ids for p, c in requests]
    with Scheduler(engine, max_batch=16) as scheduler:
        batched = [r.wait(300).token_ids for r in [scheduler.submit(p, state=c, max_new_tokens=n_tokens) for p, c in requests]]
    differing = []
    for (prompt, context), a, b in zip(requests, alone, batched):
        if a == b:
            continue
        first = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y) if any(x != y for x, y in zip(a, b)) else min(len(a), len(b))
        logits, _ = eager.read(prompt + a[:first], state=context)
        top = logits[-1].float().topk(2)
        differing.append({"first_differing_token": first, "alone_top2_logit_margin": round(float(top.values[0] - top.values[1]), 4),
                          "tokens": [a[first] if first < len(a) else None, b[first] if first < len(b) else None]})
    return {"requests": len(requests), "rows": 16, "new_tokens": n_tokens,
            "identical_answers": f"{len(requests) - len(differing)}/{len(requests)}",
            "tokens_equal": f"{sum(sum(x == y for x, y in zip(a, b)) for a, b in zip(alone, batched))}/{sum(len(a) for a in alone)}",
            "differing": differing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "picaso-mini"))
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per answer")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "hybrid_decode_h200.json")
    args = parser.parse_args()
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
                 "date": time.strftime("%Y-%m-%d"), "model": Path(args.model).name,
                 "ssm_kernels": "triton (mamba-ssm)" if triton_kernels_available() else "pure-torch reference",
                 "command": "python benchmarks/hybrid_decode_gpu_check.py"}

    # 1. graphs against eager, fp32 --------------------------------------------------------------
    graphed = PicasoEngine.from_pretrained(args.model, device="cuda", dtype=torch.float32)
    eager = PicasoEngine(graphed.model, graphed.tokenizer, fingerprint=graphed.fingerprint, cuda_graphs=False)
    for e in (graphed, eager):
        e.tokenizer.eos_token_id = None  # answers run to --tokens: every step is compared
    state = graphed.compose(graphed.encode(DOCS), method="picaso-s")
    prompts = {"1 token": graphed.tokenize(" The"), "2 tokens": graphed.tokenize(" The tower"),
               "many tokens": graphed.tokenize(" Question: when was the Eiffel Tower completed, and why?\nAnswer:")}
    checks = {}
    for name, prompt in prompts.items():
        for label, s in (("composed", state), ("no state", None)):
            want = eager.generate(prompt, state=s, max_new_tokens=args.tokens).token_ids
            have = graphed.generate(prompt, state=s, max_new_tokens=args.tokens).token_ids
            again = graphed.generate(prompt, state=s, max_new_tokens=args.tokens).token_ids  # the slot reused
            equal = sum(a == b for a, b in zip(have, want))
            checks[f"{name}, {label}"] = {"graphed_vs_eager": f"{equal}/{len(want)}", "replayed_again_equal": again == have}
            print(name, label, checks[f"{name}, {label}"], flush=True)
    out["engine_graphed_vs_eager_fp32"] = checks
    requests = [(p, s, n) for p in prompts.values() for s in (state, None) for n in (args.tokens // 4, args.tokens)]
    alone = [eager.generate(p, state=s, max_new_tokens=n).token_ids for p, s, n in requests]
    with Scheduler(graphed, max_batch=4) as scheduler:
        got = [r.wait(300).token_ids for r in [scheduler.submit(p, state=s, max_new_tokens=n) for p, s, n in requests]]
        stats = scheduler.stats()
    out["scheduler_graphed_vs_alone_eager_fp32"] = {"requests": len(requests), "rows": 4,
                                                    "equal": f"{sum(a == b for a, b in zip(got, alone))}/{len(requests)}",
                                                    "decode_graphs": stats["decode_graphs"]}
    print(out["scheduler_graphed_vs_alone_eager_fp32"], flush=True)
    del graphed, eager, state

    # 2. decode time, bf16 ------------------------------------------------------------------------
    graphed = PicasoEngine.from_pretrained(args.model, device="cuda", dtype=torch.bfloat16)
    eager = PicasoEngine(graphed.model, graphed.tokenizer, fingerprint=graphed.fingerprint, cuda_graphs=False)
    graphed.tokenizer.eos_token_id = None
    state = graphed.compose(graphed.encode(DOCS * 4), method="picaso-s")
    prompt = prompts["many tokens"]
    times: dict[str, list[float]] = {"eager": [], "graphed": []}
    for _ in range(2):  # warm-up (Triton compiles; the graphs are captured)
        for e in (eager, graphed):
            decode_ms_per_token(e, prompt, state, args.tokens)
    for _ in range(args.repeats):
        for name, e in (("eager", eager), ("graphed", graphed)):
            times[name].append(decode_ms_per_token(e, prompt, state, args.tokens))
    weights = sum(p.numel() * p.element_size() for p in graphed.model.parameters())
    big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    big.clone()
    sync()
    t0 = time.perf_counter()
    for _ in range(5):
        big.clone()
    sync()
    bandwidth = 2 * 5 * big.numel() / (time.perf_counter() - t0)
    out["decode_bf16_one_request"] = {
        "tokens": args.tokens, "repeats": args.repeats, "state_keys": state.n_keys,
        "eager_ms_per_token_p50": round(statistics.median(times["eager"]), 3),
        "graphed_ms_per_token_p50": round(statistics.median(times["graphed"]), 3),
        "graphed_ms_per_token_p90": round(sorted(times["graphed"])[int(0.9 * (len(times["graphed"]) - 1))], 3),
        "speedup": round(statistics.median(times["eager"]) / statistics.median(times["graphed"]), 1),
        "floor_ms": round(weights / bandwidth * 1000, 4), "copy_bandwidth_GBps": round(bandwidth / 1e9, 1)}
    print(out["decode_bf16_one_request"], flush=True)

    # 3. batched against alone, bf16, on the trained model ------------------------------------------
    out["scheduler_batched_vs_alone_bf16"] = batched_vs_alone_bf16(graphed, eager, args.tokens)
    print(out["scheduler_batched_vs_alone_bf16"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
