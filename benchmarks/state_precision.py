"""Storage precision of states: bytes per state at every official shape, and the quality cost measured.

    python benchmarks/state_precision.py --out docs/results/state-precision

Bytes come from the official mamba2-* configurations (d_state 128, headdim 64, expand 2, ngroups 1,
d_conv 4; picaso_rag.precision.state_nbytes). The quality cost is read off the runs of
benchmarks/quality.py and benchmarks/qa_quality.py with ``--state-precision fp32 bf16 fp8``
(the composed method on the same encoded states, stored at each precision and read back):

    python benchmarks/quality.py --model models/picaso-mini --k 5 10 --methods picaso-s \\
        --state-precision fp32 bf16 fp8 --max-passages 100 --retrieval-cache docs/results/wikitext-retrieval.json \\
        --no-perplexity --out docs/results/precision-wikitext-picaso-mini-cpu100
    python benchmarks/qa_quality.py --model models/picaso-mini --dataset hotpotqa --k 0 10 --methods none picaso-s \\
        --state-precision fp32 bf16 fp8 --no-generate --limit 30 --out docs/results/precision-hotpotqa-picaso-mini-cpu30
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from picaso_rag import Mamba2Config  # noqa: E402
from picaso_rag.precision import PRECISIONS, state_nbytes  # noqa: E402

SHAPES = {"130m": (768, 24), "370m": (1024, 48), "780m": (1536, 48), "1.3b": (2048, 48), "2.7b": (2560, 64)}
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def bytes_table() -> dict:
    table = {}
    for name, (d_model, n_layer) in SHAPES.items():
        cfg = Mamba2Config(d_model=d_model, n_layer=n_layer, vocab_size=50288)
        table[name] = {p: state_nbytes(cfg, p) for p in PRECISIONS}
    mini = Mamba2Config.from_dict(json.loads((RESULTS.parents[1] / "models" / "picaso-mini" / "config.json").read_text()))
    table["picaso-mini"] = {p: state_nbytes(mini, p) for p in PRECISIONS}
    return table


def quality(wikitext: Path, hotpotqa: Path) -> dict:
    out = {}
    wt = json.loads(wikitext.read_text())
    for k, row in wt["results"].items():
        base = row["picaso-s"]["nll"]
        out[f"wikitext k={k}"] = {p: {"nll": row[name]["nll"], "delta": row[name]["nll"] - base}
                                  for p, name in (("fp32", "picaso-s"), ("bf16", "picaso-s@bf16"), ("fp8", "picaso-s@fp8"))}
        out[f"wikitext k={k}"]["n"] = wt["n_passages"]
    qa = json.loads(hotpotqa.read_text())
    row = qa["results"]["10"]
    base = row["picaso-s"]["answer_nll"]
    out["hotpotqa k=10"] = {p: {"nll": row[name]["answer_nll"], "delta": row[name]["answer_nll"] - base}
                            for p, name in (("fp32", "picaso-s"), ("bf16", "picaso-s@bf16"), ("fp8", "picaso-s@fp8"))}
    out["hotpotqa k=10"]["n"] = qa["n_questions"]
    out["hotpotqa k=10"]["context_gain"] = qa["results"]["0"]["none"]["answer_nll"] - base  # what the documents bring
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wikitext", type=Path, default=RESULTS / "precision-wikitext-picaso-mini-cpu100.json")
    parser.add_argument("--hotpotqa", type=Path, default=RESULTS / "precision-hotpotqa-picaso-mini-cpu30.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "state-precision")
    args = parser.parse_args()
    report = {"bytes_per_state": bytes_table(), "quality": quality(args.wikitext, args.hotpotqa),
              "sources": [str(args.wikitext), str(args.hotpotqa)], "machine": "this CPU machine (picaso-mini, fp32 model)",
              "command": " ".join(["python", "benchmarks/state_precision.py", *sys.argv[1:]])}
    lines = ["Bytes per stored state (tensors; a file adds a header under 1 KiB), from the official configs", "",
             "| shape | fp32 | bf16 | fp8 (e4m3, per-head scale) | one million states, bf16 | one million states, fp8 |",
             "|---|---|---|---|---|---|"]
    for name, row in report["bytes_per_state"].items():
        lines.append(f"| {name} | {row['fp32'] / 2**20:.1f} MiB | {row['bf16'] / 2**20:.1f} MiB | {row['fp8'] / 2**20:.1f} MiB | "
                     f"{row['bf16'] * 1e6 / 1e12:.1f} TB | {row['fp8'] * 1e6 / 1e12:.1f} TB |")
    lines += ["", "Quality cost on this CPU machine, models/picaso-mini, PICASO-S, states stored at each precision and read back "
              "(NLL in nats/token; delta against fp32 states)", "",
              "| protocol | items | fp32 | bf16 (delta) | fp8 (delta) |", "|---|---|---|---|---|"]
    for name, row in report["quality"].items():
        lines.append(f"| {name} | {row['n']} | {row['fp32']['nll']:.4f} | {row['bf16']['nll']:.4f} ({row['bf16']['delta']:+.5f}) | "
                     f"{row['fp8']['nll']:.4f} ({row['fp8']['delta']:+.5f}) |")
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
