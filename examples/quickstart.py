"""Quickstart: a LlamaIndex RAG pipeline over Chroma that answers from composed document states.

    python examples/quickstart.py [--model DIR] [--db ./picaso_db] [--k 3] [--method picaso-s]

1. Ingests the bundled corpus (examples/data/corpus.md) into an embedded Chroma under ./picaso_db
   (MiniLM embeddings), encoding each chunk's state once into ./picaso_db/states (the shipped
   picaso-mini is a hybrid: the state of its 10 Mamba-2 layers plus its 2 attention layers' keys
   and values).
2. For three questions with a known answer, retrieves k chunks with a stock LlamaIndex query engine
   and shows what PICASO does with them, against the same model reading them (concatenation):
   - how likely the model finds the true answer (its mean log-probability per token) with the
     composed states, with no documents at all, and with the documents' text concatenated;
   - the same in every order of the k documents: PICASO's figure and answer are identical in all
     of them, concatenation's change with the order;
   - the tokens read at query time (PICASO reads the template and the question, not the documents).
3. Prints what the model says, labelled for what it is: models/picaso-mini is a 17.4M-parameter base
   model trained on a small corpus; it cannot answer questions in free form, so the likelihood of
   the true answer is the figure to look at.

Run it twice: the second run reuses ./picaso_db (no ingestion, no encoding).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from llama_index.core.postprocessor.types import BaseNodePostprocessor  # noqa: E402
from llama_index.core.prompts.default_prompts import DEFAULT_TEXT_QA_PROMPT  # noqa: E402
from llama_index.core.schema import NodeWithScore, QueryBundle  # noqa: E402
from rag_demo import COLLECTION, load_embed_model, load_engine, open_index, open_state_store  # noqa: E402

from llama_index.llms.picaso import DocumentRef, PicasoLLM, PicasoNodePostprocessor, node_llm_text  # noqa: E402

QUESTIONS = [  # (question, the answer the corpus gives)
    ("When was the Eiffel Tower completed?", "1889"),
    ("Where in plants does photosynthesis take place?", "in the chloroplasts"),
    ("Who deciphered Egyptian hieroglyphs?", "Jean-François Champollion"),
]


class FixedOrder(BaseNodePostprocessor):
    """Hands the retrieved nodes on in a given order (as another retriever or a re-ranker would)."""

    order: tuple = ()

    def _postprocess_nodes(self, nodes: List[NodeWithScore], query_bundle: Optional[QueryBundle] = None) -> List[NodeWithScore]:
        return [nodes[i] for i in self.order] if len(self.order) == len(nodes) else nodes


def answer_logprob(llm: PicasoLLM, nodes: list, question: str, answer: str, how: str) -> float:
    """Mean log-probability per token of ``answer`` after the stock QA prompt, with the documents
    composed (``how`` a PICASO method), concatenated ("concat") or absent ("none")."""
    engine = llm.engine
    head, tail = DEFAULT_TEXT_QA_PROMPT.get_template().split("{context_str}")
    tail = tail.replace("{query_str}", question).rstrip(" ")
    texts = [node_llm_text(n.node) for n in nodes]
    if how == "none":
        state, read = None, head + tail
    elif how == "concat":
        state, read = None, head + "\n\n".join(texts) + tail
    else:
        _, prefix = engine.read(head)
        states = llm.resolve_states([DocumentRef.of(t, n.node.node_id) for t, n in zip(texts, nodes)]).states
        state, read = engine.compose(states, method=how, prefix=prefix), tail
    prompt_ids, answer_ids = engine.tokenize(read), engine.tokenize(" " + answer)
    logits, _ = engine.read(prompt_ids + answer_ids, state)
    logprobs = torch.log_softmax(logits[len(prompt_ids) - 1:-1].float(), dim=-1)
    return logprobs.gather(-1, torch.tensor(answer_ids, device=logprobs.device)[:, None]).mean().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Mamba-2 or hybrid checkpoint directory, or hub id; 'random' for the tiny random model "
                                        "(default: models/picaso-mini if present, else random)")
    parser.add_argument("--db", default="picaso_db", help="directory for Chroma and the state store (default ./picaso_db)")
    parser.add_argument("--k", type=int, default=3, help="chunks retrieved per question")
    parser.add_argument("--method", default="picaso-s", choices=["picaso-s", "picaso-r", "caso", "soup"])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--orders", type=int, default=0, help="orders of the documents to try (default 0: all k!)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write every figure to this file")
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

    def query(method: str, order: tuple = ()):
        engine_ = index.as_query_engine(llm=llm, similarity_top_k=args.k, node_postprocessors=[
            FixedOrder(order=order), PicasoNodePostprocessor(llm, method=method)])
        started = time.perf_counter()
        response = engine_.query(question)
        return response, time.perf_counter() - started

    report = []
    for question, truth in QUESTIONS:
        picaso, t_picaso = query(args.method)
        concat, t_concat = query("concat")
        nodes = picaso.source_nodes
        print(f"Q: {question}   (the corpus says: {truth})")
        print("retrieved:")
        for scored in nodes:
            print(f"  {scored.score:.3f}  {scored.node.get_content().strip()[:72]}...")
        orders = list(itertools.permutations(range(len(nodes))))[:args.orders or None]
        logprob = {how: answer_logprob(llm, nodes, question, truth, how) for how in ("none", args.method, "concat")}
        by_order = {how: [answer_logprob(llm, [nodes[i] for i in order], question, truth, how) for order in orders]
                    for how in (args.method, "concat")}
        answers = {how: [str(query(how, order)[0]).strip() for order in orders] for how in (args.method, "concat")}
        meta, base = picaso.metadata["picaso"], concat.metadata["picaso"]
        print(f"log-probability of the true answer per token (higher is better): "
              f"{args.method} {logprob[args.method]:.3f} | no documents {logprob['none']:.3f} | "
              f"concatenation {logprob['concat']:.3f}")
        for how in (args.method, "concat"):
            spread = max(by_order[how]) - min(by_order[how])
            print(f"  over the {len(orders)} orders of the documents, {how:13s}: {len(set(by_order[how]))} distinct "
                  f"value(s) (spread {spread:.4f}), {len(set(answers[how]))} distinct answer(s)")
        print(f"tokens read at query time: {args.method} {meta['tokens_read']} (+ {meta['document_tokens']} document "
              f"tokens from {meta['k']} states encoded at ingestion), concatenation {base['tokens_read']}")
        print(f"time to answer ({args.device}): {args.method} {t_picaso * 1000:.0f} ms, concatenation {t_concat * 1000:.0f} ms"
              + ("  (one user, three short chunks, a 17M model on a CPU: at this size there is little to save; "
                 "the saving grows with the documents' length and the number of users, docs/serving.md)"
                 if t_picaso >= t_concat else ""))
        print(f"what the tiny base model says ({args.method}):     {str(picaso).strip()!r}")
        print(f"what the tiny base model says (concatenation): {str(concat).strip()!r}\n")
        report.append({"question": question, "true_answer": truth, "sources": [n.node.node_id for n in nodes],
                       "answer_logprob": logprob, "answer_logprob_by_order": by_order,
                       "distinct_answers_over_orders": {h: len(set(a)) for h, a in answers.items()},
                       "tokens_read": {args.method: meta["tokens_read"], "concatenation": base["tokens_read"]},
                       "document_tokens": meta["document_tokens"], "seconds": {args.method: t_picaso, "concatenation": t_concat},
                       "free_form": {args.method: str(picaso).strip(), "concatenation": str(concat).strip()}})
    mean = {how: statistics.mean(r["answer_logprob"][how] for r in report) for how in ("none", args.method, "concat")}
    print(f"mean over {len(report)} questions, log-probability of the true answer per token: {args.method} "
          f"{mean[args.method]:.3f}, no documents {mean['none']:.3f}, concatenation {mean['concat']:.3f}; tokens read "
          f"{sum(r['tokens_read'][args.method] for r in report)} ({args.method}) vs "
          f"{sum(r['tokens_read']['concatenation'] for r in report)} (concatenation)")
    print(f"\nserve this index to OpenAI clients and chat front-ends (docs/serving.md):\n  .venv/bin/picaso-rag serve "
          f"--chroma-path {Path(args.db) / 'chroma'} --collection {COLLECTION} --states {Path(args.db) / 'states'} "
          f"--model {args.model or 'models/picaso-mini'}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": "python examples/quickstart.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "model": description, "method": args.method, "k": args.k, "device": args.device,
            "questions": report, "mean_answer_logprob": mean}, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
