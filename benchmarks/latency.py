"""Time to first token and answer time, PICASO against concatenation, at the official Mamba-2 shapes.

Run on the GPU machine (after ``scripts/gpu_setup.sh build``)::

    PYTHONPATH=. python benchmarks/latency.py --tokenizer path/to/gpt-neox-20b-tokenizer.json \
        --out docs/benchmarks/latency_h100.json
    python benchmarks/latency.py --plot docs/benchmarks/latency_h100.json   # the PNGs, anywhere

For each shape (random bf16 weights: speed does not depend on them), k documents of n tokens and a
64-token query, in one process:
- concatenation: the k documents and the query read as one prompt, then greedy decoding; with our
  engine and with mamba_ssm's MambaLMHeadModel (forward, and ``generate(cg=True)``). The faster
  of the two is the baseline every speed-up is taken against;
- PICASO-S / PICASO-R with the document states (a) resident on the GPU, (b) in pinned host memory,
  (c) in the on-disk StateStore: move, compose, read the query, decode;
- composition alone against its bandwidth floor (k + 1) x state bytes / measured copy bandwidth;
- document encoding tokens/s against a plain batched prefill; decode tokens/s against mamba_ssm's
  ``generate`` with CUDA graphs.
Times are medians of ``--repeats`` runs after a warm-up, taken with CUDA events; peak GPU memory is
what a call allocates beyond what was already allocated (model weights, resident states).

``--model DIR`` benches a checkpoint at its own shape instead (any model ``PicasoEngine.from_pretrained``
loads, hybrids included; without mamba_ssm's baseline, which is built for the official shapes, so
its speed-ups are against our own concatenation); a hybrid's composition floor adds reading and writing the union
of the documents' keys and values. ``--device cpu`` runs the same script on the CPU with wall-clock
timing (a check of the script, e.g. with a tiny checkpoint; not a measurement to publish).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from picaso_rag import Mamba2Config, Mamba2LM, PicasoEngine, State, StateStore, Tokenizer, init_weights
from picaso_rag.adapters import checkpoint_names
from picaso_rag.compose import log_weights
from picaso_rag.kernels import conv_step, conv_step_ref, triton_kernels_available, weighted_sum, weighted_sum_ref

# official mamba2-* configurations: (d_model, n_layer); all have d_state 128, headdim 64, expand 2
SHAPES = {"130m": (768, 24), "370m": (1024, 48), "780m": (1536, 48), "1.3b": (2048, 48), "2.7b": (2560, 64)}
VOCAB = 50288  # 50277 padded to a multiple of 16, as the released checkpoints


DEVICE = "cuda"  # --device


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(median ms, peak MiB allocated beyond what was allocated before) over ``repeats`` CUDA-event-timed calls
    (on the CPU: wall clock, and no peak)."""
    for _ in range(warmup):
        fn()
    if DEVICE == "cpu":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times), 0.0
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    return statistics.median(times), peak


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    src = torch.empty(1 << 30 if DEVICE == "cuda" else 1 << 26, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms, _ = median_ms(lambda: dst.copy_(src), 10, warmup=2)
    return 2 * src.numel() / (ms / 1000)


def on_gpu(cfg: Mamba2Config) -> Mamba2LM:
    """A bf16 model built on the GPU directly (a 2.7B model built on the CPU takes a minute); fp32 on the CPU."""
    with torch.device(DEVICE):
        return Mamba2LM(cfg).to(torch.bfloat16 if DEVICE == "cuda" else torch.float32)


def host_copy(state: State) -> State:
    """``state`` in host memory, every tensor pinned on CUDA (a hybrid's keys and values too)."""
    host = state.to("cpu")
    if DEVICE != "cuda":
        return host
    return dataclasses.replace(host, **{f.name: getattr(host, f.name).pin_memory() for f in dataclasses.fields(host)
                                        if isinstance(getattr(host, f.name), torch.Tensor)})


def load_engine(name: str, args, tokenizer) -> tuple[PicasoEngine, object]:
    """(engine, mamba_ssm's model of the same weights or None): a random Mamba-2 at an official shape,
    or the checkpoint of ``--model`` (mamba_ssm's baseline only for the official shapes, on CUDA: its
    model is built with their configuration, which a checkpoint's need not share)."""
    if args.model:
        engine = PicasoEngine.from_pretrained(args.model, device=DEVICE, dtype=torch.bfloat16 if DEVICE == "cuda" else None,
                                              tokenizer=tokenizer)
        engine.tokenizer.eos_token_id = None  # never stop early, as mamba_ssm's generate without eos
        return engine, None
    d_model, n_layer = SHAPES[name]
    cfg = Mamba2Config(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB)
    model = init_weights(on_gpu(cfg), seed=0)
    engine = PicasoEngine(model, tokenizer, fingerprint=hashlib.sha256(f"latency-{name}".encode()).hexdigest())
    return engine, mamba_ssm_model(d_model, n_layer, checkpoint_names(model.state_dict(), model.cfg)) if DEVICE == "cuda" else None


def mamba_ssm_model(d_model: int, n_layer: int, state_dict: dict):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    from benchmarks.gpu_check import _mamba_ssm_cfg

    model = MambaLMHeadModel(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB, ssm_cfg=_mamba_ssm_cfg(),
                                         rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                                         pad_vocab_size_multiple=16, tie_embeddings=True),
                             device="cuda", dtype=torch.bfloat16).eval()
    model.load_state_dict(state_dict)  # strict: every weight by its mamba_ssm name
    return model


def checks(tokenizer) -> dict:
    """GPU checks of this issue's kernels and graphs against the reference paths (small model)."""
    out = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    states = [torch.randn(24, 24, 64, 128, device="cuda", generator=g).bfloat16() for _ in range(7)]
    weights = torch.rand(7, 24, 24, device="cuda", generator=g)
    with torch.inference_mode():
        fused, ref = weighted_sum(states, weights, torch.float32), weighted_sum_ref(states, weights, torch.float32)
    out["weighted_sum_rel_err"] = ((fused - ref).norm() / ref.norm()).item()
    x = torch.randn(3, 1792, device="cuda", generator=g).bfloat16()
    conv_state = torch.randn(3, 1792, 3, device="cuda", generator=g).bfloat16()
    weight, bias = torch.randn(1792, 4, device="cuda", generator=g), torch.randn(1792, device="cuda", generator=g)
    ref_state = conv_state.clone()
    got, want = conv_step(x, conv_state, weight, bias), conv_step_ref(x, ref_state, weight, bias)
    out["conv_step_rel_err"] = ((got.float() - want.float()).norm() / want.float().norm()).item()
    out["conv_step_state_equal"] = bool(torch.equal(conv_state, ref_state))

    cfg = Mamba2Config(d_model=768, n_layer=24, vocab_size=VOCAB)
    model = init_weights(on_gpu(cfg), seed=0)
    graphed, eager = PicasoEngine(model, tokenizer, "check"), PicasoEngine(model, tokenizer, "check", cuda_graphs=False)
    docs = torch.randint(0, 50000, (5, 300), generator=torch.Generator().manual_seed(1)).tolist()
    query = docs[0][:64]
    ctx = graphed.compose(graphed.encode(docs), "picaso-s")
    a = graphed.generate(query, state=ctx, max_new_tokens=64).token_ids
    b = eager.generate(query, state=ctx, max_new_tokens=64).token_ids
    long_prompt = sum(docs, [])  # longer than a read graph: eager read, graphed decoding
    c = graphed.generate(long_prompt, max_new_tokens=32).token_ids
    d = eager.generate(long_prompt, max_new_tokens=32).token_ids
    out["graphs_vs_eager_greedy_tokens_equal"] = f"{sum(x == y for x, y in zip(a, b))}/{len(b)}"
    out["graphs_vs_eager_long_prompt_tokens_equal"] = f"{sum(x == y for x, y in zip(c, d))}/{len(d)}"
    return out


def bench_shape(name: str, args, tokenizer, deadline: float, result: dict, save: Callable[[], None]) -> None:
    """Fill ``result`` run by run, calling ``save`` after each (a killed run keeps what it measured)."""
    engine, theirs = load_engine(name, args, tokenizer)
    model = engine.model
    d_model, n_layer = model.cfg.d_model, model.cfg.n_layer
    result.update({"d_model": d_model, "n_layer": n_layer, "model": args.model or f"random mamba2-{name}",
                   "hybrid": bool(model.cfg.attn_layers), "runs": []})
    rng = torch.Generator().manual_seed(0)
    top = min(50000, model.cfg.vocab_size)
    query = torch.randint(0, top, (args.query_tokens,), generator=rng).tolist()
    reps = args.repeats

    # ---- encoding against a plain batched prefill, decoding against mamba_ssm's generate
    batch = torch.randint(0, top, (args.encode_batch, 512), generator=rng)
    batch_list, batch_ids = batch.tolist(), batch.to(DEVICE)
    with torch.inference_mode():
        t_encode, _ = median_ms(lambda: engine.encode(batch_list, batch_size=args.encode_batch), reps)
        t_forward, _ = median_ms(lambda: model(batch_ids, logits="none"), reps)
        # without mamba_ssm's model (a hybrid, or the CPU), our plain forward is the prefill baseline
        t_prefill = median_ms(lambda: theirs(batch_ids, num_last_tokens=1), reps)[0] if theirs is not None else t_forward
    n_batch = args.encode_batch * 512
    result["encode"] = {"batch": args.encode_batch, "doc_tokens": 512, "encode_tokens_per_s": n_batch / t_encode * 1000,
                        "mamba_ssm_prefill_tokens_per_s": n_batch / t_prefill * 1000 if theirs is not None else None,
                        "our_forward_tokens_per_s": n_batch / t_forward * 1000, "encode_vs_prefill": t_prefill / t_encode}
    query_ids = torch.tensor([query], device=DEVICE)
    new = args.answer_tokens
    with torch.inference_mode():
        ours_1, _ = median_ms(lambda: engine.generate(query, max_new_tokens=1), reps)
        ours_n, _ = median_ms(lambda: engine.generate(query, max_new_tokens=new), reps)
        if theirs is not None:
            theirs_1, _ = median_ms(lambda: theirs.generate(query_ids, max_length=len(query) + 1, cg=True), reps)
            theirs_n, _ = median_ms(lambda: theirs.generate(query_ids, max_length=len(query) + new, cg=True), reps)
    result["decode"] = {"ours_ms_per_token": (ours_n - ours_1) / (new - 1)}
    result["decode"]["ours_tokens_per_s"] = 1000 / result["decode"]["ours_ms_per_token"]
    if theirs is not None:
        result["decode"]["mamba_ssm_ms_per_token"] = (theirs_n - theirs_1) / (new - 1)
        result["decode"]["mamba_ssm_tokens_per_s"] = 1000 / result["decode"]["mamba_ssm_ms_per_token"]
    print(name, "encode", result["encode"], "decode", result["decode"], flush=True)
    save()

    # ---- document states, once: on the GPU, in pinned host memory, on disk
    bandwidth = copy_bandwidth()
    result["copy_bandwidth_GBps"] = bandwidth / 1e9
    k_max = max(args.ks)
    store_dir = tempfile.TemporaryDirectory()
    store = StateStore(store_dir.name)
    for n_doc in args.doc_tokens:
        docs = torch.randint(0, top, (k_max, n_doc), generator=rng).tolist()
        gpu_states = engine.encode(docs, batch_size=4)
        pinned = [host_copy(s) for s in gpu_states]
        for i, s in enumerate(gpu_states):
            store.put(f"doc-{n_doc}-{i}", s)
        state_bytes = gpu_states[0].ssm.numel() * gpu_states[0].ssm.element_size()
        # a hybrid's composition also copies the documents' keys and values into their union (read + write)
        kv_bytes = sum(t.numel() * t.element_size() for t in (gpu_states[0].keys, gpu_states[0].values)) \
            if gpu_states[0].has_keys else 0
        result["state_MiB"] = gpu_states[0].nbytes / 2**20

        for k in args.ks:
            if time.monotonic() > deadline:
                result["stopped_early"] = f"time budget reached before k={k}, n={n_doc}"
                return
            run = {"k": k, "doc_tokens": n_doc}
            prompt = sum(docs[:k], []) + query
            prompt_ids = torch.tensor([prompt], device=DEVICE)
            r = max(3, reps // 2) if len(prompt) > 8000 else reps
            with torch.inference_mode():
                run["concat_ours_ttft_ms"], run["concat_ours_ttft_peak_MiB"] = median_ms(
                    lambda: engine.generate(prompt, max_new_tokens=1), r)
                run["concat_ours_answer_ms"], _ = median_ms(lambda: engine.generate(prompt, max_new_tokens=new), r)
                if theirs is not None:
                    run["concat_mamba_ssm_ttft_ms"], run["concat_mamba_ssm_ttft_peak_MiB"] = median_ms(
                        lambda: int(theirs(prompt_ids, num_last_tokens=1).logits[0, -1].argmax()), r)
                    run["concat_mamba_ssm_answer_ms"], _ = median_ms(
                        lambda: theirs.generate(prompt_ids, max_length=len(prompt) + new, cg=True), r)

            def fetch(where: str) -> list:
                if where == "gpu":
                    return gpu_states[:k]
                if where == "pinned":
                    return [s.to(DEVICE, non_blocking=True) for s in pinned[:k]]
                found = store.get_many([f"doc-{n_doc}-{i}" for i in range(k)], engine.fingerprint)
                return [f.state.to(DEVICE, non_blocking=True) for f in found]

            for method in args.methods:
                for where in ("gpu", "pinned", "disk"):
                    key = f"{method}_{where}"

                    def answer(n_new: int) -> None:
                        ctx = engine.compose(fetch(where), method)
                        engine.generate(query, state=ctx, max_new_tokens=n_new)

                    run[f"{key}_ttft_ms"], run[f"{key}_ttft_peak_MiB"] = median_ms(lambda: answer(1), reps)
                    if method == args.methods[0] or where == "gpu":
                        run[f"{key}_answer_ms"], _ = median_ms(lambda: answer(new), reps)
                ssm_list = [s.ssm for s in gpu_states[:k]]
                weights = log_weights(torch.stack([s.log_decay for s in gpu_states[:k]], -1), method).exp().float().movedim(-1, 0)
                run[f"{method}_compose_ms"], _ = median_ms(lambda: engine.compose(gpu_states[:k], method), reps)
                run[f"{method}_compose_kernel_ms"], _ = median_ms(lambda: weighted_sum(ssm_list, weights), reps)
            run["compose_floor_ms"] = ((k + 1) * state_bytes + 2 * k * kv_bytes) / bandwidth * 1000
            baseline_ttft = min(run["concat_ours_ttft_ms"], run.get("concat_mamba_ssm_ttft_ms", float("inf")))
            baseline_answer = min(run["concat_ours_answer_ms"], run.get("concat_mamba_ssm_answer_ms", float("inf")))
            for method in args.methods:
                for where in ("gpu", "pinned", "disk"):
                    run[f"{method}_{where}_ttft_speedup"] = baseline_ttft / run[f"{method}_{where}_ttft_ms"]
                    if f"{method}_{where}_answer_ms" in run:
                        run[f"{method}_{where}_answer_speedup"] = baseline_answer / run[f"{method}_{where}_answer_ms"]
                run[f"{method}_compose_kernel_vs_floor"] = run["compose_floor_ms"] / run[f"{method}_compose_kernel_ms"]
            result["runs"].append(run)
            save()
            print(name, json.dumps({k_: round(v, 3) if isinstance(v, float) else v for k_, v in run.items()}), flush=True)
    store_dir.cleanup()


def summarize(results: dict) -> dict:
    """The issue's targets, read off the runs."""
    out = {}
    for shape in results["shapes"]:
        if "encode" not in shape or "decode" not in shape:
            continue
        runs = shape.get("runs", [])
        name = shape["shape"]
        row = {"encode_vs_prefill": shape["encode"]["encode_vs_prefill"]}
        if "mamba_ssm_ms_per_token" in shape["decode"]:  # not for a hybrid (no mamba_ssm model) nor on the CPU
            row["decode_vs_mamba_ssm"] = shape["decode"]["mamba_ssm_ms_per_token"] / shape["decode"]["ours_ms_per_token"]
        for r in runs:
            if r["k"] == 10 and r["doc_tokens"] == 512:
                row["ttft_speedup_k10_512_gpu"] = r["picaso-s_gpu_ttft_speedup"]
                row["ttft_speedup_k10_512_pinned"] = r["picaso-s_pinned_ttft_speedup"]
        long_runs = [r for r in runs if r["doc_tokens"] == 2048 and r["k"] in (2, 5, 10, 20)]
        if len(long_runs) == 4:
            for where in ("gpu", "pinned", "disk"):
                row[f"answer_speedup_2048_mean_{where}"] = statistics.mean(r[f"picaso-s_{where}_answer_speedup"] for r in long_runs)
        composed = [r["picaso-s_compose_kernel_vs_floor"] for r in runs if r["k"] >= 5]
        if composed:
            row["compose_kernel_vs_floor_min_k5plus"] = min(composed)
        out[name] = row
    return out


def merge(paths: list[Path], out: Path) -> None:
    """One result file from runs of several shapes (the per-call time limit splits a full sweep)."""
    runs = [json.loads(p.read_text()) for p in paths]
    if len({r["device"] for r in runs}) != 1:
        raise SystemExit("results from different devices do not merge")
    merged = {k: v for k, v in runs[0].items() if k not in ("shapes", "summary", "args")}
    merged["merged_from"] = [{"file": p.name, "args": r["args"]} for p, r in zip(paths, runs)]
    shapes = {}
    for r in runs:
        for shape in r["shapes"]:
            shapes[shape["shape"]] = dict(shape, repeats=r["args"]["repeats"])
    merged["shapes"] = [shapes[name] for name in SHAPES if name in shapes]
    merged["summary"] = summarize(merged)
    out.write_text(json.dumps(merged, indent=1))
    print(json.dumps(merged["summary"], indent=1))


def table(path: Path) -> str:
    """The summary table of docs/performance.md and the README, from a result file."""
    results = json.loads(path.read_text())
    lines = ["| shape | state (MiB) | TTFT k=10 x 512: concat | PICASO-S, states on GPU | pinned | disk | "
             "64-token answer, 2048-token docs, mean k=2..20 (GPU) | compose kernel / floor, k>=5 | encode / prefill | decode / mamba_ssm |",
             "|" + " --- |" * 10]
    for shape in results["shapes"]:
        run = next((r for r in shape["runs"] if r["k"] == 10 and r["doc_tokens"] == 512), None)
        summary = results["summary"][shape["shape"]]
        if run is None:
            continue
        concat = min(run["concat_ours_ttft_ms"], run["concat_mamba_ssm_ttft_ms"])
        answer = summary.get("answer_speedup_2048_mean_gpu")
        decode = summary.get("decode_vs_mamba_ssm")  # none for a hybrid (no mamba_ssm model of it)
        lines.append(
            f"| mamba2-{shape['shape']} | {shape['state_MiB']:.0f} | {concat:.1f} ms | "
            f"{run['picaso-s_gpu_ttft_ms']:.1f} ms ({run['picaso-s_gpu_ttft_speedup']:.1f}x) | "
            f"{run['picaso-s_pinned_ttft_ms']:.1f} ms ({run['picaso-s_pinned_ttft_speedup']:.1f}x) | "
            f"{run['picaso-s_disk_ttft_ms']:.0f} ms ({run['picaso-s_disk_ttft_speedup']:.2f}x) | "
            f"{f'{answer:.2f}x' if answer else 'not measured (time budget)'} | "
            f"{summary['compose_kernel_vs_floor_min_k5plus']:.0%} | {summary['encode_vs_prefill']:.0%} | "
            f"{f'{decode:.2f}x' if decode else 'no mamba_ssm model'} |")
    return "\n".join(lines)


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(path.read_text())
    shapes = results["shapes"]
    for metric in ("ttft", "answer"):
        fig, axes = plt.subplots(2, len(shapes), figsize=(4 * len(shapes), 7), squeeze=False)
        for col, shape in enumerate(shapes):
            for row, n_doc in enumerate(sorted({r["doc_tokens"] for r in shape["runs"]})):
                ax = axes[row][col]
                runs = [r for r in shape["runs"] if r["doc_tokens"] == n_doc]
                ks = [r["k"] for r in runs]
                ax.plot(ks, [r[f"concat_mamba_ssm_{metric}_ms"] for r in runs], "k-o", label="concat (mamba_ssm)")
                ax.plot(ks, [r[f"concat_ours_{metric}_ms"] for r in runs], "k--", label="concat (ours)")
                for where, style in (("gpu", "C0-o"), ("pinned", "C1-s"), ("disk", "C2-^")):
                    values = [r.get(f"picaso-s_{where}_{metric}_ms") for r in runs]
                    if all(v is not None for v in values):
                        ax.plot(ks, values, style, label=f"PICASO-S, states {where}")
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_title(f"mamba2-{shape['shape']}, {n_doc}-token docs", fontsize=9)
                ax.set_xlabel("k documents")
                ax.set_ylabel(f"{'time to first token' if metric == 'ttft' else '64-token answer'} (ms)")
                ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{metric.upper() if metric == 'ttft' else 'Answer time'}: PICASO-S vs concatenation, {results['device']}")
        fig.tight_layout()
        fig.savefig(path.with_name(path.stem + f"_{metric}.png"), dpi=110)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", help="tokenizer.json (any; only detokenisation uses it; default with --model: its own)")
    parser.add_argument("--model", help="a checkpoint directory (Mamba-2 or hybrid) benched at its own shape instead of --shapes")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a check of this script (wall clock)")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--ks", default="1,2,5,10,20")
    parser.add_argument("--doc-tokens", default="512,2048")
    parser.add_argument("--query-tokens", type=int, default=64)
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--methods", default="picaso-s,picaso-r")
    parser.add_argument("--encode-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no new run after this many seconds")
    parser.add_argument("--checks", action="store_true", help="also run the GPU checks of kernels and graphs")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/latency_h100.json"))
    parser.add_argument("--plot", type=Path, help="only draw the PNGs of an existing result file")
    parser.add_argument("--table", type=Path, help="only print the summary table of an existing result file")
    parser.add_argument("--merge", type=Path, nargs="+", help="only merge result files of one machine into --out")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot)
        return
    if args.table:
        print(table(args.table))
        return
    if args.merge:
        merge(args.merge, args.out)
        return
    args.ks = [int(k) for k in args.ks.split(",")]
    args.doc_tokens = [int(n) for n in args.doc_tokens.split(",")]
    args.methods = args.methods.split(",")

    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not triton_kernels_available():
        raise SystemExit("needs CUDA and mamba-ssm (scripts/gpu_setup.sh build); --device cpu checks the script")
    if not args.tokenizer and not args.model:
        raise SystemExit("give --tokenizer (or --model, a checkpoint directory with its tokenizer)")
    tokenizer = Tokenizer.from_file(args.tokenizer) if args.tokenizer else None
    if tokenizer is not None:
        tokenizer.eos_token_id = None  # random weights: never stop early, as mamba_ssm's generate without eos
    if args.model:
        args.shapes = Path(args.model).name  # one run, at the checkpoint's own shape
    deadline = time.monotonic() + args.budget_s
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    results = {"device": device_name, "torch": torch.__version__, "python": platform.python_version(),
               "args": {k: v for k, v in vars(args).items() if k not in ("out", "plot")}, "shapes": []}
    try:
        import mamba_ssm

        results["mamba_ssm"] = mamba_ssm.__version__
    except ImportError:
        pass
    if args.checks:
        results["checks"] = checks(tokenizer)
        print("checks", results["checks"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.shapes.split(","):
        if time.monotonic() > deadline:
            break
        result = {"shape": name}
        results["shapes"].append(result)

        def save() -> None:
            results["summary"] = summarize(results)
            args.out.write_text(json.dumps(results, indent=1))

        try:
            bench_shape(name, args, tokenizer, deadline, result, save)
        except Exception:  # keep what was measured, report the failure, go on with the next shape
            result["error"] = traceback.format_exc()
            print(result["error"], flush=True)
        save()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(results.get("summary"), indent=1))


if __name__ == "__main__":
    main()
