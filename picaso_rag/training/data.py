"""Training data: the pre-training corpus, a BPE tokenizer, token windows, and passage pairs with
retrieved contexts for composition fine-tuning (the paper's WikiText recipe, on our corpus)."""

from __future__ import annotations

import lzma
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

DOC_SEPARATOR = "\n\n<|doc|>\n"
EOS = "<|endoftext|>"


def iter_corpus_documents(shards: Sequence[str | os.PathLike], excluded_titles: set[str] | None = None) -> Iterator[str]:
    """Documents of the xz shards in ../shared/corpus (see its SOURCES.md), in shard order,
    skipping documents whose MANIFEST title is in ``excluded_titles`` (evaluation overlap)."""
    titles: dict[tuple[str, int], str] = {}
    if excluded_titles:
        import csv
        import gzip

        manifest = Path(shards[0]).parent / "MANIFEST.tsv.gz"
        with gzip.open(manifest, "rt", encoding="utf-8") as f:
            for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                titles[(row["shard"], int(row["doc_index"]))] = row["title"]
    for shard in shards:
        with lzma.open(shard, "rt", encoding="utf-8") as f:
            docs = f.read().split(DOC_SEPARATOR)
        for index, doc in enumerate(docs):
            if doc.strip() and not (excluded_titles and titles.get((Path(shard).name, index)) in excluded_titles):
                yield doc


def hotpotqa_titles(path: str | os.PathLike) -> set[str]:
    """Paragraph titles of the HotpotQA questions we evaluate on: their Wikipedia pages stay out of training."""
    import json

    return {t for q in json.loads(Path(path).read_text()) for t in q["context"]["title"]}


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str | os.PathLike) -> None:
    """Byte-level BPE (GPT-2 style), with <|endoftext|> as token 0. Usage: ``train_tokenizer(docs, 16384, "tok.json")``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))


def tokenize_to_file(texts: Iterable[str], tokenizer_path: str | os.PathLike, out_path: str | os.PathLike,
                     batch: int = 512) -> int:
    """Concatenate the texts' tokens, each followed by <|endoftext|>, into a flat uint16 file. Returns the count."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    eos = tok.token_to_id(EOS)
    if tok.get_vocab_size() > 65535:
        raise ValueError("uint16 token files need a vocabulary below 65,536 tokens.")
    total, pending = 0, []
    with open(out_path, "wb") as f, tqdm(desc="tokenizing", unit="doc") as bar:
        def flush() -> int:
            encoded = tok.encode_batch(pending, add_special_tokens=False)
            arr = np.fromiter((t for e in encoded for t in (*e.ids, eos)), dtype=np.uint16)
            arr.tofile(f)
            bar.update(len(pending))
            pending.clear()
            return len(arr)

        for text in texts:
            pending.append(text)
            if len(pending) == batch:
                total += flush()
        if pending:
            total += flush()
    return total


class TokenWindows:
    """Random windows of ``seq_len + 1`` tokens from a uint16 token file: (inputs, targets) batches.

    Usage: ``for inputs, targets in TokenWindows("train.bin", 1024, 64, seed=0): ...``.
    """

    def __init__(self, path: str | os.PathLike, seq_len: int, batch_size: int, seed: int = 0):
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")
        if len(self.tokens) <= seq_len + 1:
            raise ValueError(f"{path} has {len(self.tokens)} tokens, fewer than one window of {seq_len + 1}.")
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rng = np.random.default_rng(seed)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            starts = self.rng.integers(0, len(self.tokens) - self.seq_len - 1, self.batch_size)
            window = torch.from_numpy(np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64))
            yield window[:, :-1], window[:, 1:]


def split_passages(tokens: np.ndarray, eos_id: int, segment_len: int) -> np.ndarray:
    """Cut every document (tokens between EOS) into passages of 2 * segment_len tokens and split each
    passage into two equal segments. Returns [n_passages, 2, segment_len]."""
    ends = np.flatnonzero(tokens == eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    passages = []
    for s, e in zip(starts, ends):
        n = (e - s) // (2 * segment_len)
        if n:
            passages.append(np.asarray(tokens[s:s + n * 2 * segment_len]).reshape(n, 2, segment_len))
    if not passages:
        raise ValueError(f"no document is longer than one passage of {2 * segment_len} tokens.")
    return np.concatenate(passages).astype(np.int64)


def tfidf_retrieve(queries: Tensor, database: Tensor, vocab_size: int, k: int, exclude: Tensor | None = None,
                   chunk: int = 2048) -> Tensor:
    """Top-k database rows by TF-IDF cosine similarity to each query (rows of token ids).

    queries [Q, S], database [D, S] int64; exclude [Q]: one database row per query never returned
    (the target itself). Returns [Q, k] database indices, best first. Runs on the tensors' device.
    """
    def tf(rows: Tensor) -> Tensor:
        counts = torch.zeros(rows.shape[0], vocab_size, device=rows.device)
        return counts.scatter_add_(1, rows, torch.ones_like(rows, dtype=counts.dtype))

    df = torch.zeros(vocab_size, device=database.device)
    for i in range(0, len(database), chunk):
        df += (tf(database[i:i + chunk]) > 0).float().sum(0)
    idf = torch.log((1 + len(database)) / (1 + df)) + 1

    def vectors(rows: Tensor) -> Tensor:
        v = tf(rows) * idf
        return (v / v.norm(dim=1, keepdim=True).clamp_min(1e-9)).to(torch.bfloat16 if rows.is_cuda else torch.float32)

    db = torch.cat([vectors(database[i:i + chunk]) for i in range(0, len(database), chunk)])  # [D, V]
    out = []
    for i in range(0, len(queries), chunk):
        scores = vectors(queries[i:i + chunk]).float() @ db.float().T if not db.is_cuda else (vectors(queries[i:i + chunk]) @ db.T).float()
        if exclude is not None:
            scores.scatter_(1, exclude[i:i + chunk, None].to(scores.device), -math.inf)
        out.append(scores.topk(k, dim=1).indices)
    return torch.cat(out)


@dataclass
class PassagePairs:
    """Fine-tuning examples: for passage i, the second segment is the target and the top retrieved
    segments (queried with the first segment) are the contexts.

    segments [2 * n_passages, S]: segment 2i is passage i's first half, 2i+1 its second half.
    retrieved [n_passages, max_k]: indices into ``segments``, best first, never the target itself.
    """

    segments: Tensor
    retrieved: Tensor

    @classmethod
    def build(cls, passages: np.ndarray, vocab_size: int, max_k: int = 10, device: str = "cpu") -> "PassagePairs":
        segments = torch.from_numpy(passages.reshape(-1, passages.shape[-1])).to(device)
        n = passages.shape[0]
        targets = torch.arange(n, device=device) * 2 + 1
        retrieved = tfidf_retrieve(segments[targets - 1], segments, vocab_size, max_k, exclude=targets)
        return cls(segments.cpu(), retrieved.cpu())

    def __len__(self) -> int:
        return len(self.retrieved)

    def batch(self, index: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """contexts [B, k, S] (retrieval order, best first) and targets [B, S]."""
        contexts = self.segments[self.retrieved[index, :k]]
        return contexts, self.segments[index * 2 + 1]
