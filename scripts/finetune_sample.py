"""Draw the fine-tuning data for the GPU run from the whole tokenized corpus, small enough to travel.

The device machine receives at most 64 MiB a call with the working tree (about 40 MB of it tracked), so
instead of the 115 MB corpus this sends a uniform sample of it: passages (2 x 128 tokens, cut by
``split_passages`` from every document of all nine shards, as the pre-training tokenised them, HotpotQA
pages excluded) and contiguous 1,025-token windows for the plain language-model batches.

    python scripts/finetune_sample.py --shards /tmp/ft/shard-*.bin --passages 90000 --lm-windows 6000 --out .ft_gpu/data

Writes passages.bin (each passage then EOS: ``split_passages`` recovers them exactly), lm.bin (the
windows back to back) and sample.json (counts, seed, sources).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from picaso_rag.loading import Tokenizer
from picaso_rag.training import split_passages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", nargs="+", required=True, help="uint16 token files (python -m picaso_rag.training tokenize)")
    parser.add_argument("--tokenizer", default="models/picaso-mini/tokenizer.json")
    parser.add_argument("--segment-len", type=int, default=128)
    parser.add_argument("--passages", type=int, default=90000)
    parser.add_argument("--lm-windows", type=int, default=6000)
    parser.add_argument("--lm-len", type=int, default=1025)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    eos = Tokenizer.from_file(args.tokenizer).eos_token_id
    tokens = np.concatenate([np.fromfile(s, dtype=np.uint16) for s in sorted(args.shards)])
    passages = split_passages(tokens, eos, args.segment_len)  # [n, 2, S]
    rng = np.random.default_rng(args.seed)
    chosen = passages[np.sort(rng.choice(len(passages), size=min(args.passages, len(passages)), replace=False))]
    flat = chosen.reshape(len(chosen), -1)
    with_eos = np.concatenate([flat, np.full((len(flat), 1), eos)], axis=1).astype(np.uint16)
    args.out.mkdir(parents=True, exist_ok=True)
    with_eos.tofile(args.out / "passages.bin")

    starts = np.sort(rng.choice(len(tokens) - args.lm_len, size=args.lm_windows, replace=False))
    np.stack([tokens[s:s + args.lm_len] for s in starts]).astype(np.uint16).tofile(args.out / "lm.bin")
    info = {"corpus_tokens": int(len(tokens)), "corpus_passages": int(len(passages)), "passages": int(len(chosen)),
            "segment_len": args.segment_len, "lm_windows": args.lm_windows, "lm_len": args.lm_len, "seed": args.seed,
            "shards": [Path(s).name for s in sorted(args.shards)]}
    (args.out / "sample.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
