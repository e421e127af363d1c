"""PicasoEngine: encode texts to states, compose states, read and generate from a state.

Usage::

    engine = PicasoEngine.from_pretrained("./picaso-mini")
    docs = engine.encode(["Paris is the capital of France.", "Berlin is in Germany."])
    context = engine.compose(docs, method="picaso-s")
    print(engine.generate("Question: what is the capital of France?\\nAnswer:", state=context).text)
"""

from __future__ import annotations

import logging
import operator
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from .compose import compose as compose_states
from .config import Mamba2Config
from .errors import DocumentTooLongError, PicasoError, StateMismatchError
from .generation import Sampler, SamplingParams, TextStream
from .graphs import GraphedModel
from .loading import Tokenizer, fingerprint_of, load_checkpoint
from .model import Mamba2LM
from .state import State, StateSpec, register_state_spec

Tokens = str | Sequence[int]
logger = logging.getLogger("picaso_rag")

# Defaults of the engine's limits (each an attribute of PicasoEngine, settable per engine).
MAX_DOCUMENT_TOKENS = 1 << 17  # 131,072 tokens (~500K characters of English); memory stays flat (segments), time grows linearly
CHARS_PER_TOKEN_BOUND = 16  # a text of more than 16 characters per allowed token is refused before tokenizing
ENCODE_SEGMENT_TOKENS = 8192  # encode reads long documents in segments this long, carrying the state
MAX_NEW_TOKENS_LIMIT = 16384


def replace_lone_surrogates(text: str, what: str = "text") -> str:
    """``text`` with each lone UTF-16 surrogate (a broken decode: not a character, not encodable as
    UTF-8) replaced by U+FFFD, and each surrogate pair joined into its character; logs a warning.
    The text is kept, not refused: one bad character never costs a whole document or ingestion."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    fixed = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    logger.warning("%s holds %d lone surrogate code point(s) (a broken decode upstream); each was replaced by U+FFFD. "
                   "Decode your source with errors='replace' (or fix its encoding) to silence this.", what,
                   sum(1 for c in fixed if c == "\ufffd") - text.count("\ufffd"))
    return fixed


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    n_prompt_tokens: int  # tokens read at query time (the documents are not among them)
    finish_reason: str  # "stop", "eos" or "length"


class PicasoEngine:
    """A Mamba-2 model with its tokenizer and fingerprint, working in states."""

    def __new__(cls, model: Mamba2LM | None = None, *args, **kwargs):  # None: copy and pickle call __new__ bare
        # a hybrid model (Mamba-2 and attention layers) gets the same API from HybridEngine
        if cls is PicasoEngine and not isinstance(model, Mamba2LM):
            from .hybrid import HybridLM

            if isinstance(model, HybridLM):
                from .hybrid_engine import HybridEngine

                cls = HybridEngine
        return super().__new__(cls)

    def __init__(self, model: Mamba2LM, tokenizer: Tokenizer, fingerprint: str | None = None, cuda_graphs: bool = True,
                 max_document_tokens: int = MAX_DOCUMENT_TOKENS, max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT,
                 encode_segment_tokens: int = ENCODE_SEGMENT_TOKENS):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint or fingerprint_of(model, tokenizer)
        # limits (attributes: set them per engine): tokens of one text; new tokens of one answer;
        # tokens encode() reads per forward (its memory is that of one segment, whatever the length)
        self.max_document_tokens = max_document_tokens
        self.max_new_tokens_limit = max_new_tokens_limit
        self.encode_segment_tokens = encode_segment_tokens
        if isinstance(model.cfg, Mamba2Config):  # lets a StateStore of this process check (and bound) stored states
            register_state_spec(self.fingerprint, StateSpec.of_config(model.cfg))
        # on CUDA, short prompts and decoding replay CUDA graphs (see picaso_rag.graphs)
        self.graphs = GraphedModel(model) if cuda_graphs and model.device.type == "cuda" else None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        tokenizer: str | os.PathLike | Tokenizer | None = None,
        cuda_graphs: bool = True,
    ) -> "PicasoEngine":
        """Load from a local checkpoint directory or a hub id (see :func:`load_checkpoint`)."""
        model, tok = load_checkpoint(name_or_path, device=device, dtype=dtype, tokenizer=tokenizer)
        return cls(model, tok, cuda_graphs=cuda_graphs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def eos_token_id(self) -> int | None:
        # the tokenizer knows its own vocabulary; config defaults (transformers writes 2) may not
        return self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.model.cfg.eos_token_id

    def tokenize(self, text: Tokens, what: str = "the text") -> list[int]:
        """Token ids of a text (no special tokens); a list of ids passes through (checked).

        Raises :class:`PicasoError` for bytes, non-text values, out-of-vocabulary ids, and
        :class:`DocumentTooLongError` above ``max_document_tokens``.
        """
        limit = self.max_document_tokens
        if isinstance(text, str):
            if len(text) > CHARS_PER_TOKEN_BOUND * limit:  # refused before tokenizing (its memory grows with the text)
                raise DocumentTooLongError(
                    f"{what} has {len(text):,} characters, more than {CHARS_PER_TOKEN_BOUND} per token of the cap of "
                    f"{limit:,} tokens; split it into smaller documents, or raise engine.max_document_tokens.")
            ids = self.tokenizer.encode(replace_lone_surrogates(text, what))
        elif isinstance(text, (bytes, bytearray, memoryview)):
            raise PicasoError(f"{what} is bytes, not text; decode it first, e.g. text.decode('utf-8', errors='replace').")
        else:
            try:
                ids = [operator.index(t) for t in text]
            except TypeError:
                raise PicasoError(f"{what} must be a str or a list of int token ids, got {type(text).__name__} "
                                  f"{_short(text)}.") from None
            vocab = self.model.cfg.vocab_size
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise PicasoError(f"token id {bad} in {what} is outside the vocabulary [0, {vocab}); pass ids of this model's tokenizer.")
        if len(ids) > limit:
            raise DocumentTooLongError(
                f"{what} has {len(ids):,} tokens, above the cap of {limit:,} (engine.max_document_tokens); split it into "
                "smaller documents, or raise the cap (encoding memory stays flat, time grows linearly).")
        return ids

    # ----------------------------------------------------------------------------- encoding
    @torch.inference_mode()
    def encode(self, texts: Sequence[Tokens], batch_size: int = 16) -> list[State]:
        """One state per text, in order. Texts are grouped by length so padding stays small;
        padding never changes a state (see :func:`picaso_rag.kernels.causal_conv` and dt masking).

        Usage: ``states = engine.encode(["doc one", "doc two"])``.
        """
        token_lists = self._token_lists(texts, batch_size)
        order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
        states: list[State | None] = [None] * len(token_lists)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            ids, lengths = self._pad([token_lists[i] for i in batch])
            ssm, conv, log_decay = self._read_in_segments(ids, lengths)
            for row, i in enumerate(batch):  # clone: a row view would keep the whole batch alive
                states[i] = State(ssm[row].clone(), conv[row].clone(), log_decay[row].clone(),
                                  len(token_lists[i]), self.fingerprint)
        return states  # type: ignore[return-value]

    def _token_lists(self, texts: Sequence[Tokens], batch_size: int) -> list[list[int]]:
        """Token ids of each text to encode; errors name the failing text by its index."""
        if isinstance(texts, str):
            raise PicasoError("encode takes a list of texts; wrap a single text as [text].")
        token_lists = []
        for i, text in enumerate(texts):
            if isinstance(text, str) and not text.strip():
                raise PicasoError(f"text {i} is empty or whitespace; drop it before encoding (an empty document has no state).")
            ids = self.tokenize(text, what=f"text {i}")
            if not ids:
                raise PicasoError(f"text {i} has no tokens; drop it before encoding.")
            token_lists.append(ids)
        if batch_size < 1:
            raise PicasoError(f"batch_size must be >= 1, got {batch_size}.")
        return token_lists

    def _read_in_segments(self, ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The states after reading right-padded rows ``ids`` [b, l], ``encode_segment_tokens`` at a
        time, each segment starting from the state the previous one left (the concatenation identity:
        reading a+b equals reading b from the state of a). Memory is that of one segment, whatever l."""
        segment = max(self.model.cfg.chunk_size, self.encode_segment_tokens // self.model.cfg.chunk_size * self.model.cfg.chunk_size)
        if ids.shape[1] <= segment:
            out = self.model(ids, lengths=lengths, logits="none")
            return out.ssm_state, out.conv_state, out.log_decay
        ssm = conv = log_decay = None
        for start in range(0, ids.shape[1], segment):
            piece = ids[:, start:start + segment]
            # rows that ended before this segment read only padding: dt = 0, their state passes unchanged
            out = self.model(piece, ssm_state=ssm, conv_state=conv, lengths=(lengths - start).clamp(0, piece.shape[1]),
                             logits="none")
            ssm, conv = out.ssm_state, out.conv_state
            log_decay = out.log_decay if log_decay is None else log_decay + out.log_decay
        return ssm, conv, log_decay  # type: ignore[return-value]

    def _pad(self, token_lists: list[list[int]]) -> tuple[Tensor, Tensor]:
        lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
        ids = torch.zeros(len(token_lists), int(lengths.max()), dtype=torch.long)
        for row, t in enumerate(token_lists):
            ids[row, :len(t)] = torch.tensor(t, dtype=torch.long)
        return ids.to(self.device), lengths.to(self.device)

    # ---------------------------------------------------------------------------- composing
    def compose(self, states: Sequence[State], method: str = "picaso-s", prefix: State | None = None, conv: str = "mean") -> State:
        """Compose document states of this model (see :func:`picaso_rag.compose.compose`)."""
        for s in list(states) + ([prefix] if prefix is not None else []):
            self._check(s)
        return compose_states([s.to(self.device) for s in states], method=method,
                              prefix=prefix.to(self.device) if prefix is not None else None, conv=conv)

    def _check(self, state: State) -> None:
        if state.fingerprint != self.fingerprint:
            raise StateMismatchError(
                f"state was made by another model (fingerprint {state.fingerprint[:12]}, this model {self.fingerprint[:12]}); "
                "re-encode the document with this model."
            )
        cfg = self.model.cfg
        if state.ssm.shape != (cfg.n_layer, cfg.nheads, cfg.headdim, cfg.d_state):
            raise StateMismatchError(f"state shape {tuple(state.ssm.shape)} does not fit this model; re-encode the document.")

    # ------------------------------------------------------------------------------ reading
    @torch.inference_mode()
    def read(self, text: Tokens, state: State | None = None) -> tuple[Tensor, State]:
        """Read ``text`` starting from ``state`` (None: from nothing) in one chunked prefill.

        Returns fp32 logits [n_tokens, vocab] at every position and the state after the text.
        Usage: ``logits, after = engine.read(" the query", state=context)``.
        """
        ids = self.tokenize(text, what="the text to read")
        if not ids:
            raise PicasoError("nothing to read: the text has no tokens. Pass a non-empty query.")
        ssm, conv, log_decay, n_tokens = self._start(state)
        out = self.model(torch.tensor([ids], device=self.device), ssm_state=ssm, conv_state=conv)
        after = State(out.ssm_state[0], out.conv_state[0], log_decay + out.log_decay[0], n_tokens + len(ids), self.fingerprint)
        return out.logits[0].float(), after

    def _start(self, state: State | None) -> tuple[Tensor | None, Tensor | None, Tensor, int]:
        if state is None:
            cfg = self.model.cfg
            return None, None, torch.zeros(cfg.n_layer, cfg.nheads, device=self.device), 0
        self._check(state)
        s = state.to(self.device, dtype=self.model.dtype)
        return s.ssm[None], s.conv[None], s.log_decay, s.n_tokens

    # --------------------------------------------------------------------------- generating
    def generate(self, prompt: Tokens, state: State | None = None, **sampling) -> Generation:
        """Generate a continuation of ``prompt`` read from ``state``.

        Keyword arguments are :class:`SamplingParams` (max_new_tokens, temperature, top_p, stop, seed).
        Usage: ``engine.generate("Q: ...\\nA:", state=context, max_new_tokens=32, stop=["\\n"]).text``.
        """
        pieces = self.stream(prompt, state, **sampling)
        text = "".join(pieces)
        return Generation(text=text, **pieces.result)  # type: ignore[attr-defined]

    def stream(self, prompt: Tokens, state: State | None = None, **sampling) -> "_Stream":
        """Like :meth:`generate`, but an iterator of text pieces as they are produced."""
        try:
            params = SamplingParams(**sampling)
        except TypeError as exc:  # an unknown keyword
            raise PicasoError(f"{exc}; sampling options are max_new_tokens, temperature, top_p, stop and seed.") from None
        if params.max_new_tokens > self.max_new_tokens_limit:
            raise PicasoError(f"max_new_tokens={params.max_new_tokens:,} is above this engine's limit of "
                              f"{self.max_new_tokens_limit:,}; ask for fewer, or raise engine.max_new_tokens_limit.")
        return _Stream(self, prompt, state, params)


class _Stream:
    """Iterator of text pieces; ``.result`` holds token ids and counts once exhausted."""

    def __init__(self, engine: PicasoEngine, prompt: Tokens, state: State | None, params: SamplingParams):
        self.result: dict = {}
        self._it = self._run(engine, engine.tokenize(prompt, what="the prompt"), state, params)

    def __iter__(self) -> Iterator[str]:
        return self._it

    def __next__(self) -> str:
        return next(self._it)

    def _run(self, engine: PicasoEngine, prompt_ids: list[int], state: State | None, params: SamplingParams) -> Iterator[str]:
        if not prompt_ids:
            raise PicasoError("the prompt has no tokens; pass a non-empty query.")
        sampler, stream = Sampler(params), TextStream(engine.tokenizer.decode, params.stop)
        ssm, conv, _, _ = engine._start(state)
        graphs = engine.graphs
        # one stream at a time replays the graphs; a concurrent one decodes eagerly
        if graphs is None or not graphs.lock.acquire(blocking=False):
            graphs = None
        try:
            with torch.inference_mode():
                if graphs is not None:
                    logits = graphs.read(prompt_ids, ssm, conv)
                else:
                    out = engine.model(torch.tensor([prompt_ids], device=engine.device), ssm_state=ssm, conv_state=conv, logits="last")
                    logits, ssm, conv = out.logits[0, -1], out.ssm_state, out.conv_state  # fresh: decoding updates them in place
            finish = "length"
            for _ in range(params.max_new_tokens):
                token = sampler(logits)
                if token == engine.eos_token_id:
                    finish = "eos"
                    break
                piece = stream.push(token)
                if piece:
                    yield piece
                if stream.stopped:
                    finish = "stop"
                    break
                with torch.inference_mode():
                    if graphs is not None:
                        logits = graphs.step(token)
                    else:
                        logits = engine.model.step(torch.tensor([token], device=engine.device), ssm, conv)[0]
        finally:
            if graphs is not None:
                graphs.lock.release()
        tail = stream.flush()
        if tail:
            yield tail
        self.result = {"token_ids": list(stream.ids), "n_prompt_tokens": len(prompt_ids), "finish_reason": finish}


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."
