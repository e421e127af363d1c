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
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from .compose import compose as compose_states
from .errors import DocumentTooLongError, PicasoError, StateMismatchError
from .generation import Sampler, SamplingParams, TextStream
from .graphs import GraphedModel, StepGraphs
from .loading import Tokenizer, fingerprint_of, load_checkpoint
from .model import PicasoLM
from .state import State, StateSpec

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


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device this machine has, or a PicasoError naming the fix (not torch's AssertionError)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise PicasoError(f"device={device!r} is not a torch device ({exc}); use 'cpu', 'cuda' or 'cuda:0'.") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise PicasoError(f"device={device!r} but this machine has no usable CUDA GPU (torch "
                              f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use device='cpu'.")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise PicasoError(f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                              f"use cuda:0..cuda:{torch.cuda.device_count() - 1}.")
    elif parsed.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise PicasoError(f"device={device!r} but MPS is not available here; use device='cpu'.")
    return parsed


class PicasoEngine:
    """A model (any family: pure Mamba-2 or hybrid) with its tokenizer and fingerprint, working in states.

    States hold the SSM layers' fixed part, plus the attention layers' keys and values when the model
    has attention layers (:class:`~picaso_rag.state.State`)."""

    def __init__(self, model: PicasoLM, tokenizer: Tokenizer, fingerprint: str | None = None, cuda_graphs: bool = True,
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
        on_cuda = cuda_graphs and model.device.type == "cuda"
        # On CUDA, decoding replays CUDA graphs (picaso_rag.graphs). A model without attention layers
        # also replays its short prompt reads (GraphedModel); a hybrid decodes in a kept, graphed
        # slot whose key buffer grows (StepGraphs) and reads its prompt eagerly.
        self.graphs = GraphedModel(model) if on_cuda and not model.cfg.attn_layers else None
        self.cuda_graphs = on_cuda
        self._slot: StepGraphs | None = None  # the graphed decode slot, kept between requests (grows)
        self._slot_lock = threading.Lock()  # one stream at a time replays it; a concurrent one decodes eagerly

    @property
    def max_document_tokens(self) -> int:
        """Tokens of the longest text :meth:`encode` takes."""
        return self._max_document_tokens

    @max_document_tokens.setter
    def max_document_tokens(self, value: int) -> None:
        self._max_document_tokens = value

    @property
    def state_spec(self) -> StateSpec:
        """The shapes of this model's document states, what a store validates (and bounds) them
        against: pass it to the store's reads, e.g. ``store.get(node_id, engine.fingerprint,
        spec=engine.state_spec)``. A hybrid's follows ``max_document_tokens`` (its keys grow with
        the document)."""
        return StateSpec.of_config(self.model.cfg, self._max_document_tokens)

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
        check_device(device)
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
        Each text is read from position 0: documents are encoded independently, in parallel positions.

        Usage: ``states = engine.encode(["doc one", "doc two"])``.
        """
        token_lists = self._token_lists(texts, batch_size)
        order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
        states: list[State | None] = [None] * len(token_lists)
        has_keys = bool(self.model.cfg.attn_layers)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            ids, lengths = self._pad([token_lists[i] for i in batch])
            ssm, conv, log_decay, keys, values = self._read_in_segments(ids, lengths)
            for row, i in enumerate(batch):  # clone: a row view would keep the whole batch alive
                n = len(token_lists[i])
                kv = dict(keys=keys[row, :, :, :n].clone(), values=values[row, :, :, :n].clone(), position=n) if has_keys else {}
                states[i] = State(ssm[row].clone(), conv[row].clone(), log_decay[row].clone(), n, self.fingerprint, **kv)
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

    def _read_in_segments(self, ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(ssm, conv, log_decay, keys, values) after reading right-padded rows ``ids`` [b, l],
        ``encode_segment_tokens`` at a time, each segment from the state the previous one left (the
        concatenation identity: reading a+b equals reading b from the state of a). Memory is that of
        one segment, whatever l: attention covers a segment's queries against the keys so far, not the
        whole document's square. Padding never reaches a row's state: dt = 0 in the SSM layers, and
        the keys of padding lie after the row's length, where they are cut."""
        chunk = self.model.cfg.chunk_size
        segment = max(chunk, self.encode_segment_tokens // chunk * chunk)
        ssm = conv = keys = values = log_decay = None
        for start in range(0, ids.shape[1], segment):
            piece = ids[:, start:start + segment]
            # rows that ended before this segment read only padding: dt = 0, their state passes unchanged
            out = self.model(piece, ssm_state=ssm, conv_state=conv, keys=keys, values=values, position=start,
                             lengths=(lengths - start).clamp(0, piece.shape[1]), logits="none")
            ssm, conv = out.ssm_state, out.conv_state
            keys = out.keys if keys is None else torch.cat([keys, out.keys], dim=3)
            values = out.values if values is None else torch.cat([values, out.values], dim=3)
            log_decay = out.log_decay if log_decay is None else log_decay + out.log_decay
        return ssm, conv, log_decay, keys, values  # type: ignore[return-value]

    def _pad(self, token_lists: list[list[int]]) -> tuple[Tensor, Tensor]:
        lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
        ids = torch.zeros(len(token_lists), int(lengths.max()), dtype=torch.long)
        for row, t in enumerate(token_lists):
            ids[row, :len(t)] = torch.tensor(t, dtype=torch.long)
        return ids.to(self.device), lengths.to(self.device)

    # ---------------------------------------------------------------------------- composing
    def compose(self, states: Sequence[State], method: str = "picaso-s", prefix: State | None = None, conv: str = "mean") -> State:
        """Compose document states of this model (see :func:`picaso_rag.compose.compose`): SSM layers
        by ``method``, attention layers as the union of the documents' keys, moved to their positions."""
        for s in list(states) + ([prefix] if prefix is not None else []):
            self._check(s)
        return compose_states([s.to(self.device) for s in states], method=method,
                              prefix=prefix.to(self.device) if prefix is not None else None, conv=conv,
                              shift_keys=self.model.shift_keys)

    def _check(self, state: State) -> None:
        if state.fingerprint != self.fingerprint:
            raise StateMismatchError(
                f"state was made by another model (fingerprint {state.fingerprint[:12]}, this model {self.fingerprint[:12]}); "
                "re-encode the document with this model."
            )
        try:
            StateSpec.of_config(self.model.cfg, max_tokens=1 << 62).check(state)
        except StateMismatchError as exc:
            raise StateMismatchError(f"this state does not fit this model's layers ({exc})") from None

    # ------------------------------------------------------------------------------ reading
    @torch.inference_mode()
    def read(self, text: Tokens, state: State | None = None) -> tuple[Tensor, State]:
        """Read ``text`` starting from ``state`` (None: from nothing) in one chunked prefill; attention
        layers see every key of the state (the union of the documents), then the text causally.

        Returns fp32 logits [n_tokens, vocab] at every position and the state after the text.
        Usage: ``logits, after = engine.read(" the query", state=context)``.
        """
        logits, after = self._read(text, state, "all")
        return logits, after  # type: ignore[return-value]

    @torch.inference_mode()
    def read_state(self, text: Tokens, state: State | None = None) -> State:
        """The state after reading ``text`` from ``state`` (as :meth:`read`, without logits).

        Usage: ``context = engine.read_state(" a long prompt, part one", state=context)``.
        """
        return self._read(text, state, "none")[1]

    def _read(self, text: Tokens, state: State | None, logits: str) -> tuple[Tensor | None, State]:
        ids = self.tokenize(text, what="the text to read")
        if not ids:
            raise PicasoError("nothing to read: the text has no tokens. Pass a non-empty query.")
        ssm, conv, keys, values, position, log_decay, n_tokens = self._start(state)
        out = self.model(torch.tensor([ids], device=self.device), ssm_state=ssm, conv_state=conv, keys=keys,
                         values=values, position=position, logits=logits)
        kv = {}
        if self.model.cfg.attn_layers:
            kv = dict(keys=torch.cat([keys[0], out.keys[0]], dim=2), values=torch.cat([values[0], out.values[0]], dim=2),
                      position=position + len(ids))
        after = State(out.ssm_state[0], out.conv_state[0], log_decay + out.log_decay[0], n_tokens + len(ids),
                      self.fingerprint, **kv)
        return (out.logits[0].float() if out.logits is not None else None), after

    def _start(self, state: State | None) -> tuple[Tensor, Tensor, Tensor, Tensor, int, Tensor, int]:
        """(ssm, conv, keys, values, position, log_decay, n_tokens) with a batch dim of 1, on this device."""
        ssm, conv, keys, values = self.model.empty_state(1)
        if state is None:
            return ssm, conv, keys, values, 0, torch.zeros(ssm.shape[1], ssm.shape[2], device=self.device), 0
        self._check(state)
        s = state.to(self.device, dtype=self.model.dtype)
        if s.keys is not None:
            keys, values = s.keys[None], s.values[None]
        return s.ssm[None], s.conv[None], keys, values, s.position, s.log_decay, s.n_tokens

    # --------------------------------------------------------------------------- generating
    def _decode_slot(self, n_keys: int, graphed: bool) -> StepGraphs:
        """Buffers for one request's decoding of up to ``n_keys`` keys: the engine's graphed slot
        (grown to a power of two when too small) when ``graphed``, else fresh eager ones."""
        if graphed and self._slot is not None and self._slot.keys.shape[3] >= n_keys:
            return self._slot
        cfg, kw = self.model.cfg, dict(device=self.device, dtype=self.model.dtype)
        capacity = max(256, 1 << (n_keys - 1).bit_length()) if graphed else n_keys
        ssm, conv, _, _ = self.model.empty_state(1)
        keys = torch.zeros(1, len(cfg.attn_layers), cfg.n_kv_heads, capacity, cfg.head_dim, **kw)
        index = dict(dtype=torch.long, device=self.device)
        slot = StepGraphs(self.model, torch.zeros(1, **index), ssm, conv, keys, torch.zeros_like(keys),
                                torch.zeros(1, **index), torch.zeros(1, **index), graphed=graphed)
        if graphed:
            self._slot = slot
        return slot

    def _read_into_slot(self, prompt_ids: list[int], ssm: Tensor, conv: Tensor, keys: Tensor, values: Tensor,
                        position: int, max_new_tokens: int, graphed: bool) -> tuple[StepGraphs, Tensor, int]:
        """Read the prompt eagerly from the state, then put the state after it into a decode slot
        sized for every key the request will hold (a step writes its key in place: no copy a token).
        Returns (the slot, the last position's logits, the keys the slot holds)."""
        out = self.model(torch.tensor([prompt_ids], device=self.device), ssm_state=ssm, conv_state=conv,
                         keys=keys, values=values, position=position, logits="last")
        n_keys = keys.shape[3] + len(prompt_ids)
        slot = self._decode_slot(n_keys + max_new_tokens, graphed)
        slot.ssm_state.copy_(out.ssm_state)
        slot.conv_state.copy_(out.conv_state)
        if self.model.cfg.attn_layers:
            slot.keys[:, :, :, :n_keys].copy_(torch.cat([keys, out.keys.to(keys.dtype)], dim=3))
            slot.values[:, :, :, :n_keys].copy_(torch.cat([values, out.values.to(values.dtype)], dim=3))
        slot.lengths.fill_(n_keys)
        slot.positions.fill_(position + len(prompt_ids))
        return slot, out.logits[0, -1], n_keys

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
        ssm, conv, keys, values, position, _, _ = engine._start(state)
        # one stream at a time replays the graphs; a concurrent one decodes eagerly
        graphs = engine.graphs if engine.graphs is not None and engine.graphs.lock.acquire(blocking=False) else None
        graphed_slot = graphs is None and engine.cuda_graphs and engine._slot_lock.acquire(blocking=False)
        try:
            with torch.inference_mode():
                if graphs is not None:  # a model without attention layers: the read replayed too
                    logits = graphs.read(prompt_ids, ssm, conv)
                else:
                    slot, logits, n_keys = engine._read_into_slot(prompt_ids, ssm, conv, keys, values, position,
                                                          params.max_new_tokens, graphed_slot)
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
                        slot.token_ids.fill_(token)
                        logits = slot.step(1, n_keys)[0]
                        slot.lengths += 1
                        slot.positions += 1
                        n_keys += 1
        finally:
            if graphs is not None:
                graphs.lock.release()
            if graphed_slot:
                engine._slot_lock.release()
        tail = stream.flush()
        if tail:
            yield tail
        self.result = {"token_ids": list(stream.ids), "n_prompt_tokens": len(prompt_ids), "finish_reason": finish}


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."
