"""Serving under load: the continuous-batching scheduler with composed states, against the same
scheduler in concatenation mode and one-request-at-a-time serving (GPU, in-process).

    scripts/gpu_setup.sh build     # on the GPU machine (the fast set-up)
    PYTHONPATH=. python benchmarks/serving.py --tokenizer TOKENIZER.json --out docs/benchmarks/serving_h200.json
    python benchmarks/serving.py --plot docs/benchmarks/serving_h200.json   # the PNG, anywhere
    python benchmarks/serving.py --http --out docs/benchmarks/serving_http_cpu.json   # HTTP overhead, CPU
    python benchmarks/serving.py --model DIR ...   # a checkpoint directory instead of --shape: Mamba-2 or hybrid
    python benchmarks/serving.py --model DIR --device cpu --clients 1,4 --modes picaso,serial --k 3 --doc-tokens 32 \
        --pool 6 --question-tokens 8 --answer-tokens 8 --ramp 0.5 --window 2 --out /tmp/serving.json   # a CPU smoke run

Workload (issue 13): mamba2-2.7b shape with random bf16 weights; a pool of stored document states
(512 tokens each); each request draws k = 10 of them, has a 64-token question and a 128-token
answer (EOS disabled); N closed-loop clients (each sends its next request when the last one
finished), N in {1, 4, 16, 64, 256}. Each request is prepared as the server does it, in a bounded
pool of threads, then decoded:
- ``picaso``: compose the k states (PICASO-S), read the question from the composed state;
- ``concat``: the k documents' tokens and the question read as one prompt (5,184 tokens), batched
  by the same scheduler;
- ``serial``: today's serving, one request at a time (compose, then ``engine.stream``, CUDA graphs).
Reported per mode and N: requests/s and output tokens/s over a measurement window, time to first
token (from the client's request, preparation included) and inter-token latency p50/p99. Also the
decode step at each bucket against its memory-bandwidth floor (weights + the batch's states read
and written, at the measured copy bandwidth).

The GPU machine has no FastAPI: ``--http`` measures what the HTTP layer adds (picaso-server on
127.0.0.1, CPU, tiny model or ``--model``) against the same requests submitted to the scheduler in-process.

A hybrid checkpoint (``--model``; Granite 4.0-H, Bamba) runs the same workload through the same
``Scheduler`` call (a HybridScheduler: eager batched decoding, no graphs, so no decode-floor table);
benchmarks/hybrid_serving.py is the short GPU check of batched against one-at-a-time hybrid decoding.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from picaso_rag import Mamba2Config, Mamba2LM, PicasoEngine, Tokenizer, init_weights
from picaso_rag.scheduler import Scheduler

SHAPES = {"130m": (768, 24), "370m": (1024, 48), "780m": (1536, 48), "1.3b": (2048, 48), "2.7b": (2560, 64)}
VOCAB = 50288


class SerialServer:
    """Today's serving: one worker, one request at a time, ``engine.stream`` (batch-1 CUDA graphs)."""

    def __init__(self, engine: PicasoEngine):
        self.engine = engine
        self.jobs: "list" = []
        self.cv = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def submit(self, prompt_ids, state, on_done, max_new_tokens):
        with self.cv:
            self.jobs.append((prompt_ids, state, on_done, max_new_tokens))
            self.cv.notify()

    def loop(self):
        while True:
            with self.cv:
                while not self.jobs and not self.closed:
                    self.cv.wait()
                if self.closed:
                    return
                prompt_ids, state, on_done, n = self.jobs.pop(0)
            times = []
            stream = self.engine.stream(prompt_ids, state, max_new_tokens=n)
            for _ in stream:
                times.append(time.perf_counter())
            on_done(times, len(stream.result["token_ids"]))

    def close(self):
        with self.cv:
            self.closed = True
            self.jobs.clear()
            self.cv.notify()


def run_load(mode: str, n_clients: int, engine: PicasoEngine, scheduler: Scheduler | None, serial: SerialServer | None,
             pool_states, pool_tokens, args, seed: int) -> dict:
    """N closed-loop clients for ``args.window`` seconds after ``args.ramp`` seconds; the figures."""
    rng = random.Random(seed)
    prepare_pool = ThreadPoolExecutor(args.prepare_threads)
    lock = threading.Lock()
    records: list[dict] = []
    inflight: list = []
    t0 = time.perf_counter()
    t_start, t_end = t0 + args.ramp, t0 + args.ramp + args.window
    stop = threading.Event()

    def question() -> list[int]:
        return [rng.randrange(1000, min(50000, engine.model.cfg.vocab_size)) for _ in range(args.question_tokens)]

    def start_request() -> None:
        if stop.is_set():
            return
        with lock:
            docs = rng.sample(range(len(pool_states)), args.k)
            q = question()
        prepare_pool.submit(prepare_and_submit, time.perf_counter(), docs, q)

    def finished(begin: float, token_times: list[float], n_tokens: int, reason: str) -> None:
        with lock:
            records.append({"begin": begin, "times": token_times, "n": n_tokens, "reason": reason,
                            "end": token_times[-1] if token_times else time.perf_counter()})
        if time.perf_counter() < t_end:
            start_request()

    def prepare_and_submit(begin: float, docs: list[int], q: list[int]) -> None:
        try:
            if mode == "concat":
                prompt, state = sum((pool_tokens[d] for d in docs), []) + q, None
            else:
                prompt, state = q, engine.compose([pool_states[d] for d in docs], method="picaso-s")
            if mode == "serial":
                serial.submit(prompt, state, lambda times, n: finished(begin, times, n, "length"), args.answer_tokens)
                return

            def on_event(request, piece):
                if piece is None:
                    finished(begin, request.timings.token_times, len(request.result.token_ids), request.result.finish_reason)

            request = scheduler.submit(prompt, state, on_event=on_event, max_new_tokens=args.answer_tokens)
            with lock:
                inflight.append(request)
        except Exception as exc:  # recorded, not raised: a benchmark must say what failed
            with lock:
                records.append({"begin": begin, "times": [], "n": 0, "reason": f"error: {exc!r}", "end": time.perf_counter()})

    for _ in range(n_clients):
        start_request()
    while time.perf_counter() < t_end:
        time.sleep(0.05)
    stop.set()
    prepare_pool.shutdown(wait=True)
    with lock:
        for request in inflight:
            request.cancel()
    if serial is not None:
        with serial.cv:
            serial.jobs.clear()
    deadline = time.perf_counter() + 120
    while time.perf_counter() < deadline:  # drain
        busy = (scheduler.stats()["active"] + scheduler.stats()["waiting"]) if scheduler else (len(serial.jobs) or 0)
        if not busy:
            break
        time.sleep(0.05)
    time.sleep(0.5 if serial is not None else 0.0)

    done = [r for r in records if r["reason"] in ("length", "eos", "stop") and t_start <= r["end"] <= t_end]
    started_in = [r for r in records if r["begin"] >= t_start and r["times"] and r["reason"] in ("length", "eos", "stop")]
    ttft = [(r["times"][0] - r["begin"]) * 1000 for r in started_in]
    itl = [d * 1000 for r in started_in for d in np.diff(r["times"])]
    tokens_in_window = sum(sum(1 for t in r["times"] if t_start <= t <= t_end) for r in records)
    errors = [r["reason"] for r in records if r["reason"].startswith("error")]

    def pct(values, q):
        return round(float(np.percentile(values, q)), 2) if values else None

    return {"mode": mode, "clients": n_clients, "requests_completed": len(done),
            "requests_per_s": round(len(done) / args.window, 3),
            "output_tokens_per_s": round(tokens_in_window / args.window, 1),
            "ttft_ms": {"p50": pct(ttft, 50), "p99": pct(ttft, 99), "n": len(ttft)},
            "itl_ms": {"p50": pct(itl, 50), "p99": pct(itl, 99)},
            "mean_batch": scheduler.stats()["mean_batch"] if scheduler else 1.0, "errors": errors[:3]}


def decode_floor(engine: PicasoEngine, scheduler: Scheduler, buckets: list[int]) -> list[dict]:
    """Each bucket's graphed decode step against weights + 2 x the batch's states at copy bandwidth."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); dst.copy_(src); b.record(); b.synchronize()
        times.append(a.elapsed_time(b))
    bandwidth = 2 * (1 << 30) / (statistics.median(times) / 1000)
    del src, dst
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    state = scheduler.ssm[0].numel() * scheduler.ssm.element_size() + scheduler.conv[0].numel() * scheduler.conv.element_size()
    rows = []
    for n in buckets:
        graph_ms = []
        for _ in range(20):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); scheduler.step_graphs.step(n, 0); b.record(); b.synchronize()
            graph_ms.append(a.elapsed_time(b))
        floor = (weights + 2 * n * state) / bandwidth * 1000
        step = statistics.median(graph_ms[5:])
        rows.append({"batch": n, "step_ms": round(step, 3), "floor_ms": round(floor, 3), "of_floor": round(floor / step, 3),
                     "tokens_per_s": round(n / step * 1000, 1)})
    return [{"copy_bandwidth_GBps": round(bandwidth / 1e9, 1), "weights_GB": round(weights / 1e9, 3),
             "state_MB": round(state / 1e6, 2)}] + rows


def gpu_main(args) -> None:
    cuda = args.device == "cuda"
    if args.model:  # a checkpoint directory: Mamba-2 or hybrid (PicasoEngine returns a HybridEngine for a hybrid)
        engine = PicasoEngine.from_pretrained(args.model, device=args.device, dtype=torch.bfloat16 if cuda else None,
                                              tokenizer=args.tokenizer)
        engine.tokenizer.eos_token_id = None  # answers run to their --answer-tokens
    else:
        tokenizer = Tokenizer.from_file(args.tokenizer)
        tokenizer.eos_token_id = None  # random weights: answers run to their 128 tokens
        d_model, n_layer = SHAPES[args.shape]
        cfg = Mamba2Config(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB)
        with torch.device(args.device):
            model = init_weights(Mamba2LM(cfg).to(torch.bfloat16 if cuda else torch.float32), seed=0)
        engine = PicasoEngine(model, tokenizer, fingerprint=hashlib.sha256(f"serving-{args.shape}".encode()).hexdigest())
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "python": platform.python_version(), "model": args.model or f"random mamba2-{args.shape} shape",
           "engine": type(engine).__name__, "date": time.strftime("%Y-%m-%d"),
           "args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        args.out.write_text(json.dumps(out, indent=1) + "\n")

    gen = torch.Generator().manual_seed(0)
    vocab = min(50000, engine.model.cfg.vocab_size)
    pool_tokens = torch.randint(1000, vocab, (args.pool, args.doc_tokens), generator=gen).tolist()
    start = time.perf_counter()
    pool_states = engine.encode(pool_tokens, batch_size=8)
    out["pool"] = {"states": args.pool, "doc_tokens": args.doc_tokens, "state_MB": round(pool_states[0].nbytes / 1e6, 2),
                   "encode_s": round(time.perf_counter() - start, 2)}
    clients = [int(c) for c in args.clients.split(",")]
    start = time.perf_counter()
    scheduler = Scheduler(engine, max_batch=max(clients), max_queue=4 * max(clients), max_read_tokens=args.max_read_tokens,
                          max_read_batch=args.max_read_batch)
    out["graph_capture_s"] = round(time.perf_counter() - start, 2)
    out["scheduler"] = scheduler.stats()
    print("pool", out["pool"], "capture", out["graph_capture_s"], flush=True)
    graphs = scheduler.step_graphs
    if graphs is not None and graphs.graphed and not scheduler.has_keys:  # (a hybrid's step graphs: benchmarks/hybrid_serving.py)
        out["decode_floor"] = decode_floor(engine, scheduler, [b for b in graphs.row_buckets if b in clients or b == 1])
        print(json.dumps(out["decode_floor"]), flush=True)
    save()
    # warm-up: the read kernels at the shapes they will see
    run_load("picaso", 4, engine, scheduler, None, pool_states, pool_tokens, argparse.Namespace(**{**vars(args), "ramp": 0.0, "window": 2.0}), 99)
    run_load("concat", 2, engine, scheduler, None, pool_states, pool_tokens, argparse.Namespace(**{**vars(args), "ramp": 0.0, "window": 2.0}), 98)
    with torch.inference_mode():  # capture the batch-1 graphs now: a capture must not overlap other threads' kernels
        engine.generate(pool_tokens[0][:args.question_tokens], state=pool_states[0], max_new_tokens=4)
    for mode in args.modes.split(","):
        for n in clients:
            if (mode == "serial" and n not in args.serial_clients) or (mode == "concat" and n > args.concat_max_clients):
                continue
            # the first wave of N requests must be in before the window: concatenation reads 5,184 tokens each
            ramp = args.ramp + n * (0.15 if mode == "concat" else 0.04)
            run_args = argparse.Namespace(**{**vars(args), "ramp": ramp})
            serial = SerialServer(engine) if mode == "serial" else None
            steps_before = scheduler.steps
            rows_before = scheduler.rows_decoded
            try:
                result = run_load(mode, n, engine, None if serial else scheduler, serial, pool_states, pool_tokens, run_args, seed=n)
                result["ramp_s"] = round(ramp, 2)
            except Exception as exc:  # keep what was measured; say what failed
                result = {"mode": mode, "clients": n, "error": repr(exc)}
                out["runs"].append(result)
                print(json.dumps(result), flush=True)
                save()
                break
            if serial is None:
                steps = scheduler.steps - steps_before
                result["mean_batch"] = round((scheduler.rows_decoded - rows_before) / steps, 2) if steps else 0.0
            else:
                serial.close()
            out["runs"].append(result)
            print(json.dumps(result), flush=True)
            save()
    scheduler.close()
    out["summary"] = summarize(out)
    save()
    print(json.dumps(out["summary"], indent=1))


def summarize(out: dict) -> dict:
    by = {(r["mode"], r["clients"]): r for r in out["runs"] if "error" not in r}
    summary = {}
    for n in sorted({r["clients"] for r in out["runs"]}):
        p, c, s = by.get(("picaso", n)), by.get(("concat", n)), by.get(("serial", n)) or by.get(("serial", 1))
        row = {}
        if p and c and c["requests_per_s"]:
            row["picaso_vs_concat_rps"] = round(p["requests_per_s"] / c["requests_per_s"], 2)
        if p and s and s["requests_per_s"]:
            row["picaso_vs_serial_rps"] = round(p["requests_per_s"] / s["requests_per_s"], 2)
        summary[str(n)] = row
    return summary


def plot(path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = json.loads(path.read_text())
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for mode, style in (("picaso", "o-"), ("concat", "s--"), ("serial", "^:")):
        runs = sorted((r for r in out["runs"] if r["mode"] == mode and "error" not in r), key=lambda r: r["clients"])
        if not runs:
            continue
        xs = [r["clients"] for r in runs]
        axes[0].plot(xs, [r["requests_per_s"] for r in runs], style, label=mode)
        axes[1].plot(xs, [r["ttft_ms"]["p99"] or np.nan for r in runs], style, label=f"{mode} p99")
        axes[1].plot(xs, [r["ttft_ms"]["p50"] or np.nan for r in runs], style, alpha=0.4, label=f"{mode} p50")
        axes[2].plot(xs, [r["itl_ms"]["p50"] or np.nan for r in runs], style, label=f"{mode} p50")
    for ax, title in zip(axes, ("requests/s", "time to first token (ms)", "inter-token latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    a = out["args"]
    fig.suptitle(f"Serving, {out.get('model', 'random mamba2-2.7b shape')}, k={a['k']} x {a['doc_tokens']}-token documents, "
                 f"{a['question_tokens']}-token questions, {a['answer_tokens']}-token answers ({out['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    print("wrote", path.with_suffix(".png"))


def http_main(args) -> None:
    """What HTTP adds: the same requests through picaso-server on 127.0.0.1 and in-process (CPU, tiny model)."""
    import sys

    import openai

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "examples"))
    from llama_index.llms.picaso import PicasoLLM
    from rag_demo import open_index, open_state_store, random_engine, corpus_paragraphs
    from picaso_server import RagPipeline, ServerSettings, create_app, load_embed_model
    from picaso_server.testing import ServerThread
    import tempfile

    engine = PicasoEngine.from_pretrained(args.model) if args.model else random_engine(corpus_paragraphs())
    with tempfile.TemporaryDirectory() as db:
        llm = PicasoLLM(engine=engine, state_store=open_state_store(db))
        index, _ = open_index(db, llm, load_embed_model(), show_progress=False)
        settings = ServerSettings(model_name="m", max_batch=8)
        rag = RagPipeline(engine, index, index.vector_store, settings, state_stores=[llm.state_store])
        scheduler = Scheduler(engine, max_batch=8)
        app = create_app(rag, settings, scheduler=scheduler)
        body = {"messages": [{"role": "user", "content": "Who was Ada Lovelace?"}]}
        from picaso_server.protocol import ChatCompletionRequest

        request = ChatCompletionRequest(model="m", **body)
        n_tokens = 16
        inproc, http, stream_gaps = [], [], []
        with ServerThread(app) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            for i in range(args.http_requests + 2):
                start = time.perf_counter()
                prepared = rag.prepare_chat(request)
                scheduler.generate(prepared.prompt_ids, prepared.state, max_new_tokens=n_tokens)
                t_in = time.perf_counter() - start
                start = time.perf_counter()
                client.chat.completions.create(model="m", max_tokens=n_tokens, **body)
                t_http = time.perf_counter() - start
                if i >= 2:  # warm-up
                    inproc.append(t_in * 1000)
                    http.append(t_http * 1000)
        scheduler.close()
    result = {"device": "cpu (this CPU machine)", "model": args.model or "tiny random Mamba-2", "engine": type(engine).__name__,
              "date": time.strftime("%Y-%m-%d"), "requests": len(http),
              "max_tokens": n_tokens, "in_process_ms_p50": round(statistics.median(inproc), 2),
              "http_ms_p50": round(statistics.median(http), 2),
              "http_overhead_ms_p50": round(statistics.median(np.array(http) - np.array(inproc)), 2),
              "command": "python benchmarks/serving.py --http"}
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", help="tokenizer.json (detokenisation only), e.g. the GPT-NeoX one")
    parser.add_argument("--shape", default="2.7b", choices=list(SHAPES))
    parser.add_argument("--model", help="a checkpoint directory (Mamba-2 or hybrid) instead of a random --shape")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run (figures from it are not the GPU's)")
    parser.add_argument("--clients", default="1,4,16,64,256")
    parser.add_argument("--modes", default="picaso,concat,serial")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--doc-tokens", type=int, default=512)
    parser.add_argument("--pool", type=int, default=32, help="stored document states requests draw from")
    parser.add_argument("--question-tokens", type=int, default=64)
    parser.add_argument("--answer-tokens", type=int, default=128)
    parser.add_argument("--ramp", type=float, default=3.0, help="seconds before the window (not measured)")
    parser.add_argument("--window", type=float, default=8.0, help="seconds measured per mode and N")
    parser.add_argument("--prepare-threads", type=int, default=4)
    parser.add_argument("--max-read-tokens", type=int, default=8192)
    parser.add_argument("--max-read-batch", type=int, default=64)
    parser.add_argument("--serial-clients", default="1,16,64", help="serial serving is flat in N: these N only")
    parser.add_argument("--concat-max-clients", type=int, default=64,
                        help="beyond, concatenation's queue only grows (its first wave alone takes N x 130 ms)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/serving_h200.json"))
    parser.add_argument("--plot", type=Path, help="only draw the PNG of an existing result file")
    parser.add_argument("--http", action="store_true", help="measure the HTTP layer's overhead on the CPU")
    parser.add_argument("--http-requests", type=int, default=20)
    args = parser.parse_args()
    args.serial_clients = [int(c) for c in args.serial_clients.split(",")]
    if args.plot:
        plot(args.plot)
    elif args.http:
        http_main(args)
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("needs CUDA (and mamba-ssm: scripts/gpu_setup.sh build), or --device cpu for a smoke run; "
                             "--http runs on the CPU")
        gpu_main(args)
        try:
            plot(args.out)
        except ImportError:  # no matplotlib on the GPU machine: draw it later with --plot
            pass


if __name__ == "__main__":
    main()
