"""PicasoEngine: encode texts to states, compose states, read and generate from a state.

Usage::

    engine = PicasoEngine.from_pretrained("./picaso-mini")
    docs = engine.encode(["Paris is the capital of France.", "Berlin is in Germany."])
    context = engine.compose(docs, method="picaso-s")
    print(engine.generate("Question: what is the capital of France?\\nAnswer:", state=context).text)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from .compose import compose as compose_states
from .errors import PicasoError, StateMismatchError
from .generation import Sampler, SamplingParams, TextStream
from .graphs import GraphedModel
from .loading import Tokenizer, fingerprint_of, load_checkpoint
from .model import Mamba2LM
from .state import State

Tokens = str | Sequence[int]


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    n_prompt_tokens: int  # tokens read at query time (the documents are not among them)
    finish_reason: str  # "stop", "eos" or "length"


class PicasoEngine:
    """A Mamba-2 model with its tokenizer and fingerprint, working in states."""

    def __init__(self, model: Mamba2LM, tokenizer: Tokenizer, fingerprint: str | None = None, cuda_graphs: bool = True):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint or fingerprint_of(model, tokenizer)
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

    def tokenize(self, text: Tokens) -> list[int]:
        """Token ids of a text (no special tokens); a list of ids passes through."""
        if isinstance(text, str):
            return self.tokenizer.encode(text)
        return [int(t) for t in text]

    # ----------------------------------------------------------------------------- encoding
    @torch.inference_mode()
    def encode(self, texts: Sequence[Tokens], batch_size: int = 16) -> list[State]:
        """One state per text, in order. Texts are grouped by length so padding stays small;
        padding never changes a state (see :func:`picaso_rag.kernels.causal_conv` and dt masking).

        Usage: ``states = engine.encode(["doc one", "doc two"])``.
        """
        if isinstance(texts, str):
            raise PicasoError("encode takes a list of texts; wrap a single text as [text].")
        token_lists = []
        for i, text in enumerate(texts):
            if isinstance(text, str) and not text.strip():
                raise PicasoError(f"text {i} is empty or whitespace; drop it before encoding (an empty document has no state).")
            ids = self.tokenize(text)
            if not ids:
                raise PicasoError(f"text {i} has no tokens; drop it before encoding.")
            token_lists.append(ids)
        if batch_size < 1:
            raise PicasoError(f"batch_size must be >= 1, got {batch_size}.")

        order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
        states: list[State | None] = [None] * len(token_lists)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            ids, lengths = self._pad([token_lists[i] for i in batch])
            out = self.model(ids, lengths=lengths, logits="none")
            for row, i in enumerate(batch):  # clone: a row view would keep the whole batch alive
                states[i] = State(out.ssm_state[row].clone(), out.conv_state[row].clone(), out.log_decay[row].clone(),
                                  len(token_lists[i]), self.fingerprint)
        return states  # type: ignore[return-value]

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
        ids = self.tokenize(text)
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
        return _Stream(self, prompt, state, SamplingParams(**sampling))


class _Stream:
    """Iterator of text pieces; ``.result`` holds token ids and counts once exhausted."""

    def __init__(self, engine: PicasoEngine, prompt: Tokens, state: State | None, params: SamplingParams):
        self.result: dict = {}
        self._it = self._run(engine, engine.tokenize(prompt), state, params)

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
