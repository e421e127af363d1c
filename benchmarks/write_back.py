"""The answer path of a query whose states must be encoded: the write-back on it, and off it.

    python benchmarks/write_back.py --model models/picaso-mini --out docs/benchmarks/write_back_cpu.json

Each repeat asks for k documents that no tier holds (new texts of the quickstart corpus, new node
ids), so every state is encoded, then composed, and the question read up to its first token. The
two ways of writing the encoded states to a local :class:`~picaso_rag.StateStore` (fsynced files):

- ``on_path``: each state written (``put(write_back=True)``) before the answer goes on, as
  ``PicasoLLM.resolve_states`` did before the one :class:`~picaso_rag.StateResolver`;
- ``off_path``: the resolver hands them to its :class:`~picaso_rag.StateWriter`, which writes them in
  the background (flushed between repeats, outside the timing).

Prints and saves medians and percentiles (ms) of both, in the same run, with a plot beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))
from picaso_rag import DocumentRef, PicasoEngine, StateResolver, StateStore, StateWriter  # noqa: E402
from rag_demo import corpus_paragraphs  # noqa: E402

QUESTION = "\nQuestion: When was the Eiffel Tower completed?\nAnswer:"


def percentiles(times: list[float]) -> dict:
    ordered = sorted(times)
    at = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return {"median_ms": round(statistics.median(times), 2), "p10_ms": round(at(0.1), 2), "p90_ms": round(at(0.9), 2),
            "min_ms": round(ordered[0], 2), "max_ms": round(ordered[-1], 2), "n": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "picaso-mini"))
    parser.add_argument("--k", type=int, default=3, help="documents per query, all of them encoded")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    engine = PicasoEngine.from_pretrained(args.model)
    paragraphs = corpus_paragraphs()
    query_ids = engine.tokenize(QUESTION)
    rounds = iter(range(1 << 30))

    def fresh_docs() -> list[DocumentRef]:
        r = next(rounds)  # a new text each time: no tier (memory or store) has its state
        return [DocumentRef.of(f"{paragraphs[(r * args.k + i) % len(paragraphs)]} (note {r}.{i})", f"node-{r}-{i}")
                for i in range(args.k)]

    def answer(states) -> None:
        context = engine.compose(states, method="picaso-s")
        engine.generate(query_ids, state=context, max_new_tokens=1)

    times: dict[str, list[float]] = {"on_path": [], "off_path": []}
    with tempfile.TemporaryDirectory() as tmp:
        store = StateStore(Path(tmp) / "states")
        writer = StateWriter()
        on_path = StateResolver(engine, None, [store], None)  # finds nothing stored; the caller writes
        off_path = StateResolver(engine, None, [store], writer)
        for rep in range(args.repeats + 1):  # the first of each: a warm-up
            for mode in ("on_path", "off_path"):  # interleaved: both see the same machine state
                docs = fresh_docs()
                start = time.perf_counter()
                if mode == "on_path":
                    resolution = on_path.resolve(docs)
                    for doc, state in zip(docs, resolution.states):
                        store.put(doc.node_id, state, text=doc.text, write_back=True)
                else:
                    resolution = off_path.resolve(docs)
                answer(resolution.states)
                elapsed = (time.perf_counter() - start) * 1000
                assert resolution.stats["states_encoded"] == args.k, resolution.stats
                writer.flush(60)  # outside the timing: the next repeat starts with nothing being written
                if rep:
                    times[mode].append(elapsed)
        written = writer.stats()
        writer.close()
    result = {
        "benchmark": "write_back", "model": Path(args.model).name, "k": args.k, "repeats": args.repeats,
        "document_tokens": "quickstart corpus paragraphs", "store": "StateStore on the local disk (fsync)",
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads", "torch": torch.__version__,
        "on_path": percentiles(times["on_path"]), "off_path": percentiles(times["off_path"]),
        "background_writes": {"written": written.written, "failed": written.failed, "dropped": written.dropped},
        "command": f"python benchmarks/write_back.py --model {Path(args.model).relative_to(REPO) if Path(args.model).resolve().is_relative_to(REPO) else Path(args.model).name} --k {args.k} --repeats {args.repeats}",
    }
    result["saved_ms"] = round(result["on_path"]["median_ms"] - result["off_path"]["median_ms"], 2)
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.boxplot([times["on_path"], times["off_path"]], tick_labels=["write on the answer path", "write-back off it"])
    ax.set_ylabel("ms: encode k, compose, first token")
    ax.set_title(f"{result['model']}, k={args.k} states encoded, {result['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
