"""Quickstart: encode a small corpus into states once, then answer questions from composed states.

    python examples/quickstart.py [--model DIR] [--k 3] [--method picaso-s]

For each question it retrieves k paragraphs, composes their stored states (PICASO: the
paragraphs' tokens are not read again), generates an answer, and times the same answer
produced the ordinary way (concatenating the paragraphs into the prompt).

Without --model it uses a tiny *randomly initialised* Mamba-2 and a tokenizer trained on the
corpus in a second: the answers are then meaningless text, but every step (encoding,
composition, reading, generation, timing) is the real one.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

import torch

from picaso_rag import Mamba2Config, Mamba2LM, PicasoEngine, Tokenizer, init_weights

CORPUS = Path(__file__).parent / "data" / "corpus.md"
QUESTIONS = [
    "When was the Eiffel Tower completed?",
    "Where in plants does photosynthesis take place?",
    "Who deciphered Egyptian hieroglyphs?",
]
PROMPT = "Question: {question}\nAnswer:"


def random_engine(paragraphs: list[str]) -> PicasoEngine:
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    hf_tok = HFTokenizer(models.BPE())
    hf_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tok.decoder = decoders.ByteLevel()
    hf_tok.train_from_iterator(paragraphs, trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>"],
                                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    cfg = Mamba2Config(d_model=256, n_layer=4, vocab_size=1024, d_state=64, headdim=32, chunk_size=64)
    return PicasoEngine(init_weights(Mamba2LM(cfg), seed=0), Tokenizer(hf_tok))


def retrieve(question: str, paragraphs: list[str], k: int) -> list[int]:
    """Word-overlap retrieval: enough for a self-contained demo (the LlamaIndex integration uses embeddings)."""
    words = lambda s: set(re.findall(r"[a-z]+", s.lower())) - {"the", "a", "in", "of", "is", "was", "when", "where", "who", "does", "take", "place"}
    q = words(question)
    return sorted(range(len(paragraphs)), key=lambda i: -len(q & words(paragraphs[i])))[:k]


def median_seconds(fn, repeats: int = 3) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Mamba-2 checkpoint directory or hub id (default: tiny random model)")
    parser.add_argument("--k", type=int, default=3, help="paragraphs retrieved per question")
    parser.add_argument("--method", default="picaso-s", choices=["picaso-s", "picaso-r", "caso", "soup"])
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    paragraphs = [p.strip() for p in CORPUS.read_text().split("\n\n") if p.strip()]
    if args.model:
        engine = PicasoEngine.from_pretrained(args.model)
        print(f"model: {args.model}")
    else:
        engine = random_engine(paragraphs)
        print("model: tiny RANDOMLY INITIALISED Mamba-2 (4 layers, d_model 256): answers are noise, timings and mechanics are real")

    start = time.perf_counter()
    states = engine.encode(paragraphs)  # once, offline: this is what a state store keeps
    print(f"encoded {len(paragraphs)} paragraphs ({sum(s.n_tokens for s in states)} tokens) into states "
          f"of {states[0].nbytes / 1024:.0f} KiB each in {time.perf_counter() - start:.2f} s\n")

    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, stop=["\n"])
    for question in QUESTIONS:
        hits = retrieve(question, paragraphs, args.k)
        prompt = engine.tokenize(" " + PROMPT.format(question=question))

        def picaso():
            context = engine.compose([states[i] for i in hits], method=args.method)
            return engine.generate(prompt, state=context, **gen_kwargs)

        def concatenation():
            doc_ids = [t for i in hits for t in engine.tokenize(paragraphs[i] + "\n\n")]
            return engine.generate(doc_ids + prompt, **gen_kwargs)

        t_picaso, answer = median_seconds(picaso)
        t_concat, concat_answer = median_seconds(concatenation)
        print(f"Q: {question}")
        print(f"A ({args.method}): {answer.text.strip()!r}")
        print(f"A (concatenation): {concat_answer.text.strip()!r}")
        print("sources:")
        for i in hits:
            print(f"  [{i}] {paragraphs[i][:72]}...")
        print(f"tokens read at query time: {args.method} {answer.n_prompt_tokens}, concatenation {concat_answer.n_prompt_tokens}")
        print(f"answer time (median of 3, CPU): {args.method} {t_picaso * 1000:.0f} ms, concatenation {t_concat * 1000:.0f} ms\n")


if __name__ == "__main__":
    main()
