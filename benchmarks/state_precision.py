"""Storage precision of states: bytes per state at every official shape, and the quality cost measured.

    python benchmarks/state_precision.py --out docs/results/state-precision
    python benchmarks/state_precision.py --configs path/to/checkpoint/config.json ...   # more rows, hybrids too

Hybrid models (Mamba-2 and attention layers): a state is a fixed SSM part plus keys and values that
grow with the document; ``hybrid_bytes`` reports both (bytes per document token at fp32 / bf16 /
fp8, and a state's bytes for a 128-token passage and a 131,072-token document), for our 12-layer
hybrid (picaso_rag.training --attn-layers 5 11) and Granite-4.0-H-like shapes.

Bytes come from the official mamba2-* configurations (d_state 128, headdim 64, expand 2, ngroups 1,
d_conv 4; picaso_rag.precision.state_nbytes). The quality cost is read off the runs of
benchmarks/quality.py and benchmarks/qa_quality.py with ``--state-precision fp32 bf16 fp8``
(the composed method on the same encoded states, stored at each precision and read back):

    python benchmarks/quality.py --model models/picaso-mini --k 5 10 --methods picaso-s \\
        --state-precision fp32 bf16 fp8 --max-passages 100 --retrieval-cache docs/results/wikitext-retrieval.json \\
        --no-perplexity --out docs/results/precision-wikitext-picaso-mini-cpu100
    python benchmarks/qa_quality.py --model models/picaso-mini --dataset hotpotqa --k 0 10 --methods none picaso-s \\
        --state-precision fp32 bf16 fp8 --no-generate --limit 30 --out docs/results/precision-hotpotqa-picaso-mini-cpu30

The committed precision-*-picaso-mini-* results (this script's defaults) were measured on picaso-mini
v1 (all Mamba-2, git f59fcf9). Since commit a2722c6 models/picaso-mini is the hybrid v2, whose shape
is the ``picaso-hybrid-12`` row; run now, the two commands above measure v2 (give another --out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from picaso_rag import Mamba2Config  # noqa: E402
from picaso_rag.hybrid_config import HybridConfig, is_hybrid_config  # noqa: E402
from picaso_rag.precision import PRECISIONS, kv_nbytes_per_token, state_nbytes  # noqa: E402

SHAPES = {"130m": (768, 24), "370m": (1024, 48), "780m": (1536, 48), "1.3b": (2048, 48), "2.7b": (2560, 64)}
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def _granite_like(d_model: int, n_heads: int, kv_heads: int, mamba_heads: int) -> HybridConfig:
    # the layer pattern of the public 40-layer GraniteMoeHybrid configs (attention at 5, 15, 25, 35: 9 Mamba-2
    # layers to 1 attention layer), Mamba-2 heads of 64 with d_state 128 and one group; MLPs hold no state
    return HybridConfig(family="granitemoehybrid", vocab_size=100352, d_model=d_model,
                        layer_types=tuple("attention" if i % 10 == 5 else "mamba" for i in range(40)),
                        d_state=128, headdim=2 * d_model // mamba_heads, n_heads=n_heads, n_kv_heads=kv_heads, head_dim=128)


# name -> (config, where its shapes come from)
HYBRIDS = {
    "picaso-hybrid-12": (HybridConfig(family="picaso_hybrid", vocab_size=16384, d_model=384,
                                      layer_types=tuple("attention" if i in (5, 11) else "mamba" for i in range(12)),
                                      d_state=128, headdim=64, n_heads=6, n_kv_heads=6, head_dim=64),
                         "our hybrid, the shipped picaso-mini (v2): the picaso-mini recipe with layers 5 and 11 NoPE attention, "
                         "6 heads x 64 (picaso_rag.training --attn-layers 5 11)"),
    "granite-4.0-h-tiny-like": (_granite_like(1536, 12, 4, 48),
                                "assumed Granite-4.0-H-Tiny-like shapes: d_model 1536, 40 layers (attention at 5, 15, 25, 35), "
                                "4 KV heads x 128, Mamba-2 48 heads x 64, d_state 128; check a checkpoint's config.json with --configs"),
    "granite-4.0-h-small-like": (_granite_like(4096, 32, 8, 128),
                                 "assumed Granite-4.0-H-Small-like shapes: d_model 4096, 40 layers (attention at 5, 15, 25, 35), "
                                 "8 KV heads x 128, Mamba-2 128 heads x 64, d_state 128; check a checkpoint's config.json with --configs"),
}
PASSAGE, LONG = 128, 1 << 17  # a retrieval chunk, and engine.max_document_tokens (the longest document a store keeps)


def hybrid_row(cfg: HybridConfig, source: str) -> dict:
    """Bytes of a hybrid's stored state: the fixed SSM part and the keys and values per document token."""
    return {"source": source, "ssm_layers": len(cfg.ssm_layers), "attention_layers": len(cfg.attn_layers),
            "kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "fixed_bytes": {p: state_nbytes(cfg, p, 0) for p in PRECISIONS},
            "bytes_per_token": {p: kv_nbytes_per_token(cfg, p) for p in PRECISIONS},
            f"state_bytes_{PASSAGE}_tokens": {p: state_nbytes(cfg, p, PASSAGE) for p in PRECISIONS},
            f"state_bytes_{LONG}_tokens": {p: state_nbytes(cfg, p, LONG) for p in PRECISIONS},
            "tokens_where_kv_equals_fixed_bf16": round(state_nbytes(cfg, "bf16", 0) / kv_nbytes_per_token(cfg, "bf16"))
            if cfg.attn_layers else None}


def hybrid_bytes_table(extra: list[Path]) -> dict:
    table = {name: hybrid_row(cfg, source) for name, (cfg, source) in HYBRIDS.items()}
    for path in extra:
        raw = json.loads(path.read_text())
        if is_hybrid_config(raw):
            table[path.parent.name] = hybrid_row(HybridConfig.from_dict(raw), str(path))
    return table


def bytes_table(extra: list[Path] = ()) -> dict:
    table = {}
    for name, (d_model, n_layer) in SHAPES.items():
        cfg = Mamba2Config(d_model=d_model, n_layer=n_layer, vocab_size=50288)
        table[name] = {p: state_nbytes(cfg, p) for p in PRECISIONS}
    # picaso-mini v1 (all Mamba-2, shipped until a2722c6; `git show f59fcf9:models/picaso-mini/config.json`):
    # the shipped models/picaso-mini is now the hybrid row picaso-hybrid-12
    v1 = Mamba2Config(d_model=384, n_layer=12, vocab_size=16384)
    table["picaso-mini v1"] = {p: state_nbytes(v1, p) for p in PRECISIONS}
    for path in extra:  # Mamba-2 checkpoints given with --configs
        raw = json.loads(path.read_text())
        if not is_hybrid_config(raw):
            table[path.parent.name] = {p: state_nbytes(Mamba2Config.from_dict(raw), p) for p in PRECISIONS}
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
    parser.add_argument("--configs", type=Path, nargs="*", default=[],
                        help="config.json of more checkpoints (Mamba-2 or hybrid) to add rows for")
    args = parser.parse_args()
    report = {"bytes_per_state": bytes_table(args.configs), "hybrid_bytes": hybrid_bytes_table(args.configs),
              "quality": quality(args.wikitext, args.hotpotqa),
              "sources": [str(args.wikitext), str(args.hotpotqa)], "machine": "this CPU machine (fp32 model; the default sources: picaso-mini v1, all Mamba-2, git f59fcf9)",
              "command": " ".join(["python", "benchmarks/state_precision.py", *sys.argv[1:]])}
    lines = ["Bytes per stored state (tensors; a file adds a header under 1 KiB), from the official configs", "",
             "| shape | fp32 | bf16 | fp8 (e4m3, per-head scale) | one million states, bf16 | one million states, fp8 |",
             "|---|---|---|---|---|---|"]
    for name, row in report["bytes_per_state"].items():
        lines.append(f"| {name} | {row['fp32'] / 2**20:.1f} MiB | {row['bf16'] / 2**20:.1f} MiB | {row['fp8'] / 2**20:.1f} MiB | "
                     f"{row['bf16'] * 1e6 / 1e12:.1f} TB | {row['fp8'] * 1e6 / 1e12:.1f} TB |")
    lines += ["", "Hybrid models: bytes of a stored state = the SSM layers' fixed part + bytes per document token x tokens "
              "(keys and values of the attention layers; fp8: e4m3 with per-channel scales, whose fixed bytes are in the fixed part)", "",
              "| model | SSM / attention layers | KV heads x head dim | fixed part fp32 / bf16 / fp8 | bytes per token fp32 / bf16 / fp8 | "
              f"{PASSAGE}-token passage, bf16 / fp8 | {LONG:,}-token document, bf16 / fp8 | tokens where keys and values = the fixed part (bf16) |",
              "|---|---|---|---|---|---|---|---|"]
    for name, row in report["hybrid_bytes"].items():
        fixed, per, short, long_ = (row["fixed_bytes"], row["bytes_per_token"], row[f"state_bytes_{PASSAGE}_tokens"],
                                    row[f"state_bytes_{LONG}_tokens"])
        lines.append(f"| {name} | {row['ssm_layers']} / {row['attention_layers']} | {row['kv_heads']} x {row['head_dim']} | "
                     f"{fixed['fp32'] / 2**20:.2f} / {fixed['bf16'] / 2**20:.2f} / {fixed['fp8'] / 2**20:.2f} MiB | "
                     f"{per['fp32']:,} / {per['bf16']:,} / {per['fp8']:,} | "
                     f"{short['bf16'] / 2**20:.2f} / {short['fp8'] / 2**20:.2f} MiB | "
                     f"{long_['bf16'] / 2**30:.2f} / {long_['fp8'] / 2**30:.2f} GiB | {row['tokens_where_kv_equals_fixed_bf16']:,} |")
    lines += ["", "Quality cost on this CPU machine, the sources' model (by default picaso-mini v1, all Mamba-2, git f59fcf9), "
              "PICASO-S, states stored at each precision and read back (NLL in nats/token; delta against fp32 states)", "",
              "| protocol | items | fp32 | bf16 (delta) | fp8 (delta) |", "|---|---|---|---|---|"]
    for name, row in report["quality"].items():
        lines.append(f"| {name} | {row['n']} | {row['fp32']['nll']:.4f} | {row['bf16']['nll']:.4f} ({row['bf16']['delta']:+.5f}) | "
                     f"{row['fp8']['nll']:.4f} ({row['fp8']['delta']:+.5f}) |")
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
