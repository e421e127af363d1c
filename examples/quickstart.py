"""Quickstart: a LlamaIndex RAG pipeline over Chroma that answers from composed Mamba-2 states.

    python examples/quickstart.py [--model DIR] [--db ./picaso_db] [--k 3] [--method picaso-s]

1. Ingests the bundled corpus (examples/data/corpus.md) into an embedded Chroma under ./picaso_db
   (MiniLM embeddings), encoding each chunk's Mamba-2 state once into ./picaso_db/states.
2. Answers three questions with a stock LlamaIndex query engine whose LLM reads only the question
   and the prompt template: the retrieved chunks' states are composed with PICASO instead.
3. Answers them again the ordinary way (the chunks' tokens concatenated into the prompt, same
   model) and prints answers, sources, tokens read and time for both.

The model is models/picaso-mini when the repository ships it (or --model DIR). Until then it is a
tiny randomly initialised Mamba-2: its answers are noise, but every other step is the real one.
Run it twice: the second run reuses ./picaso_db (no ingestion, no encoding).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rag_demo import load_embed_model, load_engine, open_index, open_state_store  # noqa: E402

from llama_index.llms.picaso import PicasoLLM, PicasoNodePostprocessor  # noqa: E402

QUESTIONS = [
    "When was the Eiffel Tower completed?",
    "Where in plants does photosynthesis take place?",
    "Who deciphered Egyptian hieroglyphs?",
]


def timed_query(engine, question: str, repeats: int):
    """Median wall time of ``repeats`` identical queries (greedy: identical answers)."""
    times, response = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        response = engine.query(question)
        times.append(time.perf_counter() - start)
    return statistics.median(times), response


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Mamba-2 checkpoint directory or hub id; 'random' for the tiny random model "
                                        "(default: models/picaso-mini if present, else random)")
    parser.add_argument("--db", default="picaso_db", help="directory for Chroma and the state store (default ./picaso_db)")
    parser.add_argument("--k", type=int, default=3, help="chunks retrieved per question")
    parser.add_argument("--method", default="picaso-s", choices=["picaso-s", "picaso-r", "caso", "soup"])
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3, help="queries timed per answer (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write questions, answers, tokens read and times to this file")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    engine, description = load_engine(args.model, device=args.device)
    print(description)
    embed_model = load_embed_model()
    llm = PicasoLLM(engine=engine, state_store=open_state_store(args.db), max_new_tokens=args.max_new_tokens, stop=["\n"])
    index, created = open_index(args.db, llm, embed_model)
    store = llm.state_store
    print(f"{'ingested' if created else 'reusing'} {Path(args.db) / 'chroma'} (Chroma) and {store.directory} "
          f"({sum(1 for _ in store.node_ids(engine.fingerprint))} states of this model) "
          f"in {time.perf_counter() - start:.1f} s\n")

    picaso = index.as_query_engine(llm=llm, similarity_top_k=args.k,
                                   node_postprocessors=[PicasoNodePostprocessor(llm, method=args.method)])
    concat = index.as_query_engine(llm=llm, similarity_top_k=args.k,
                                   node_postprocessors=[PicasoNodePostprocessor(llm, method="concat")])
    totals = {"picaso_tokens": 0, "concat_tokens": 0, "picaso_s": 0.0, "concat_s": 0.0}
    answers = []
    for question in QUESTIONS:
        t_picaso, answer = timed_query(picaso, question, args.repeats)
        t_concat, baseline = timed_query(concat, question, args.repeats)
        stats, base_stats = answer.metadata["picaso"], baseline.metadata["picaso"]
        print(f"Q: {question}")
        print(f"A ({args.method}):     {str(answer).strip()!r}")
        print(f"A (concatenation): {str(baseline).strip()!r}")
        print("sources:")
        for scored in answer.source_nodes:
            print(f"  {scored.score:.3f}  {scored.node.get_content().strip()[:72]}...")
        print(f"tokens read at query time: {args.method} {stats['tokens_read']} (+ {stats['document_tokens']} document "
              f"tokens from {stats['k']} composed states), concatenation {base_stats['tokens_read']}")
        print(f"answer time (median of {args.repeats}, {args.device}): {args.method} {t_picaso * 1000:.0f} ms, "
              f"concatenation {t_concat * 1000:.0f} ms\n")
        answers.append({"question": question, args.method: str(answer).strip(), "concatenation": str(baseline).strip(),
                        "sources": [scored.node.get_content().strip()[:72] for scored in answer.source_nodes],
                        "tokens_read": {args.method: stats["tokens_read"], "concatenation": base_stats["tokens_read"]},
                        "document_tokens": stats["document_tokens"],
                        "median_ms": {args.method: t_picaso * 1000, "concatenation": t_concat * 1000}})
        totals["picaso_tokens"] += stats["tokens_read"]
        totals["concat_tokens"] += base_stats["tokens_read"]
        totals["picaso_s"] += t_picaso
        totals["concat_s"] += t_concat
    print(f"total over {len(QUESTIONS)} questions: tokens read {totals['picaso_tokens']} ({args.method}) vs "
          f"{totals['concat_tokens']} (concatenation); time {totals['picaso_s'] * 1000:.0f} ms vs "
          f"{totals['concat_s'] * 1000:.0f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": "python examples/quickstart.py " + " ".join(argv or sys.argv[1:]),
                                               "model": str(args.model or "default"), "method": args.method, "k": args.k,
                                               "device": args.device, "answers": answers, "totals": totals}, indent=1) + "\n")


if __name__ == "__main__":
    main()
