"""Command line for training. Steps, in order (picaso-mini: see docs/model-card.md for the exact commands):

    python -m picaso_rag.training tokenizer --shards CORPUS/corpus-00*.txt.xz --vocab-size 16384 --out tok.json
    python -m picaso_rag.training tokenize  --shards ... --tokenizer tok.json --exclude-hotpotqa DATA/hotpotqa.json --out train.bin
    python -m picaso_rag.training pretrain  --data train.bin --tokenizer tok.json --time-budget 480 --out runs/pretrain
    python -m picaso_rag.training pretrain  ... --attn-layers 3 9 --out runs/hybrid   # a hybrid: 2 of 12 layers attention
    python -m picaso_rag.training finetune  --model runs/pretrain/checkpoint --data train.bin --mode bp2c --out runs/bp2c
    python -m picaso_rag.training finetune  --model runs/hybrid/checkpoint ... # a hybrid: its attention layers compose too
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from ..config import Mamba2Config, ModelConfig
from ..loading import Tokenizer, load_checkpoint
from ..model import PicasoLM, init_weights
from .data import (PassagePairs, TokenWindows, hotpotqa_titles, iter_corpus_documents, split_passages,
                   tokenize_to_file, train_tokenizer)
from .train import MODES, TrainConfig, finetune_batches, plot_history, pretrain_batches, train

SEPARATOR = "\n\n"  # ends every context document, in fine-tuning and in evaluation


def device_default() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m picaso_rag.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on corpus shards")
    p.add_argument("--shards", nargs="+", required=True)
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--max-docs", type=int, default=None, help="train on the first N documents only")
    p.add_argument("--out", required=True)

    p = sub.add_parser("tokenize", help="tokenize corpus shards into a flat uint16 file")
    p.add_argument("--shards", nargs="+", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--exclude-hotpotqa", help="HotpotQA json: drop corpus pages with its paragraph titles")
    p.add_argument("--out", required=True)

    p = sub.add_parser("plot", help="loss curves of one or more runs (history.json files) into one PNG")
    p.add_argument("histories", nargs="+")
    p.add_argument("--out", default="loss.png")

    p = sub.add_parser("pretrain", help="language-model pre-training from scratch")
    p.add_argument("--data", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--d-state", type=int, default=128)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--attn-layers", type=int, nargs="*", default=[],
                   help="a hybrid: these layers (0-based) are attention without positions (NoPE), the rest Mamba-2")

    p2 = sub.add_parser("finetune", help="composition fine-tuning (BP2C or BPTC) of a Mamba-2 or hybrid checkpoint")
    p2.add_argument("--model", required=True)
    p2.add_argument("--data", required=True, help="uint16 token file (documents separated by EOS)")
    p2.add_argument("--mode", choices=MODES, default="bp2c")
    p2.add_argument("--method", default="picaso-s",
                    help="a composition method, or several separated by commas (each batch draws one)")
    p2.add_argument("--segment-len", type=int, default=128)
    p2.add_argument("--n-passages", type=int, default=30000)
    p2.add_argument("--max-k", type=int, default=10)
    p2.add_argument("--batch-size", type=int, default=32)
    p2.add_argument("--epochs", type=float, default=1.0)
    p2.add_argument("--concat-fraction", type=float, default=0.0,
                    help="this fraction of batches reads its contexts concatenated (keeps concatenation good)")
    p2.add_argument("--lm-fraction", type=float, default=0.0,
                    help="this fraction of batches is plain language modelling on --lm-data (keeps perplexity)")
    p2.add_argument("--lm-data", help="uint16 token file for the language-model batches (default: --data)")
    p2.add_argument("--lm-seq-len", type=int, default=1024)
    p2.add_argument("--lm-batch-size", type=int, default=16)

    for q in (p, p2):
        q.add_argument("--lr", type=float, default=None)
        q.add_argument("--max-steps", type=int, default=None)
        q.add_argument("--time-budget", type=float, default=None, help="seconds of training")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--device", default=device_default())
        q.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    if args.command == "tokenizer":
        docs = iter_corpus_documents(args.shards)
        train_tokenizer(itertools.islice(docs, args.max_docs) if args.max_docs else docs, args.vocab_size, args.out)
    elif args.command == "tokenize":
        excluded = hotpotqa_titles(args.exclude_hotpotqa) if args.exclude_hotpotqa else None
        n = tokenize_to_file(iter_corpus_documents(args.shards, excluded), args.tokenizer, args.out)
        print(json.dumps({"tokens": n, "out": args.out}))
    elif args.command == "plot":
        plot_history([json.loads(Path(h).read_text()) for h in args.histories], Path(args.out))
    elif args.command == "pretrain":
        tok = Tokenizer.from_file(args.tokenizer)
        cfg = Mamba2Config(d_model=args.d_model, n_layer=args.n_layer, vocab_size=_round_up(tok.vocab_size, 16),
                           d_state=args.d_state, headdim=args.headdim, eos_token_id=tok.eos_token_id)
        if args.attn_layers:  # the same recipe with some layers NoPE attention (heads of 64, no MLP)
            cfg = ModelConfig(family="picaso_hybrid", vocab_size=cfg.vocab_size, d_model=cfg.d_model,
                              layer_types=tuple("attention" if i in args.attn_layers else "mamba" for i in range(args.n_layer)),
                              d_state=cfg.d_state, headdim=cfg.headdim, n_heads=cfg.d_model // 64,
                              n_kv_heads=cfg.d_model // 64, head_dim=64, tie_embeddings=True, eos_token_id=cfg.eos_token_id)
        model = init_weights(PicasoLM(cfg), seed=args.seed).to(args.device)
        n_params = sum(p.numel() for p in model.parameters())
        data = TokenWindows(args.data, args.seq_len, args.batch_size, seed=args.seed)
        train_cfg = TrainConfig(out_dir=args.out, lr=args.lr or 3e-3, max_steps=args.max_steps,
                                time_budget_s=args.time_budget, seed=args.seed,
                                extra={"data": args.data, "data_tokens": len(data.tokens), "params": n_params,
                                       "seq_len": args.seq_len, "batch_size": args.batch_size})
        history = train(model, tok, pretrain_batches(data, model.device), train_cfg, name="pretrain")
        print(json.dumps({"steps": history["steps"], "tokens_seen": history["steps"] * args.seq_len * args.batch_size,
                          "final_loss": history["loss"][-1], "params": n_params, "train_time_s": history["train_time_s"]}))
    elif args.command == "finetune":
        model, tok = load_checkpoint(args.model, device=args.device, dtype=torch.float32)
        tokens = np.memmap(args.data, dtype=np.uint16, mode="r")
        passages = split_passages(tokens, tok.eos_token_id, args.segment_len)
        rng = np.random.default_rng(args.seed)
        passages = passages[rng.permutation(len(passages))[: args.n_passages]]
        pairs = PassagePairs.build(passages, model.cfg.vocab_size, args.max_k, device=args.device)
        steps = args.max_steps or int(args.epochs * len(pairs) / args.batch_size)
        train_cfg = TrainConfig(out_dir=args.out, lr=args.lr or 3e-4, warmup_steps=min(100, steps // 10 + 1),
                                max_steps=steps, time_budget_s=args.time_budget, seed=args.seed,
                                extra={"mode": args.mode, "method": args.method, "passages": len(pairs),
                                       "segment_len": args.segment_len, "base_model": args.model,
                                       "concat_fraction": args.concat_fraction, "lm_fraction": args.lm_fraction,
                                       "lm_data": args.lm_data, "data": args.data})
        lm_windows = (TokenWindows(args.lm_data or args.data, args.lm_seq_len, args.lm_batch_size, seed=args.seed)
                      if args.lm_fraction else None)
        batches = finetune_batches(pairs, args.batch_size, tok.encode(SEPARATOR), model.device, args.method.split(","),
                                   args.mode, args.max_k, args.seed, lm_windows, args.lm_fraction, args.concat_fraction)
        history = train(model, tok, batches, train_cfg, name=args.mode)
        print(json.dumps({"steps": history["steps"], "final_loss": history["loss"][-1], "train_time_s": history["train_time_s"]}))


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


if __name__ == "__main__":
    main()
