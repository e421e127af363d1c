"""HybridEngine: PicasoEngine's API (encode, compose, read, generate, stream) for hybrid models.

``PicasoEngine.from_pretrained`` (and ``PicasoEngine(model, tokenizer)``) return a HybridEngine when
the checkpoint is a hybrid (picaso_rag.hybrid), so callers never name this class; the Mamba-2 code
path of PicasoEngine is untouched. States are :class:`~picaso_rag.state.HybridState`.

Usage::

    engine = PicasoEngine.from_pretrained("./granite-4.0-h-tiny")     # a HybridEngine
    context = engine.compose(engine.encode(docs), method="picaso-s")   # SSM: PICASO; attention: union
    print(engine.generate("Question: ...\\nAnswer:", state=context).text)
"""

from __future__ import annotations

import threading
from typing import Iterator, Sequence

import torch
from torch import Tensor

from .compose import compose_hybrid
from .engine import PicasoEngine, Tokens, _Stream
from .errors import PicasoError, StateMismatchError
from .generation import Sampler, SamplingParams, TextStream
from .graphs import HybridStepGraphs
from .hybrid import HybridLM
from .loading import Tokenizer, fingerprint_of
from .state import HybridState, HybridStateSpec, register_state_spec


class HybridEngine(PicasoEngine):
    """A hybrid model (Mamba-2 and attention layers) with its tokenizer and fingerprint, working in states."""

    def __init__(self, model: HybridLM, tokenizer: Tokenizer, fingerprint: str | None = None, cuda_graphs: bool = True,
                 **limits):
        if not isinstance(model, HybridLM):
            raise PicasoError(f"HybridEngine needs a HybridLM, got {type(model).__name__}; use PicasoEngine for Mamba-2 models.")
        # not PicasoEngine's graphs (they replay Mamba2LM.step): decoding replays HybridStepGraphs of one slot
        super().__init__(model, tokenizer, fingerprint or fingerprint_of(model, tokenizer), cuda_graphs=False, **limits)
        self.cuda_graphs = cuda_graphs and model.device.type == "cuda"
        self._slot: HybridStepGraphs | None = None  # the graphed decode slot, kept between requests (grows)
        self._slot_lock = threading.Lock()  # one stream at a time replays it; a concurrent one decodes eagerly

    @property
    def max_document_tokens(self) -> int:
        """Tokens of the longest text :meth:`encode` takes (see :class:`PicasoEngine`)."""
        return self._max_document_tokens

    @max_document_tokens.setter
    def max_document_tokens(self, value: int) -> None:
        # a hybrid's state grows with its document: the stores of this process validate (and bound)
        # a stored state of this model by its shapes and this longest document, whenever it changes
        self._max_document_tokens = value
        register_state_spec(self.fingerprint, HybridStateSpec.of_config(self.model.cfg, value))

    # ----------------------------------------------------------------------------- encoding
    @torch.inference_mode()
    def encode(self, texts: Sequence[Tokens], batch_size: int = 16) -> list[HybridState]:
        """One state per text, in order (see :meth:`PicasoEngine.encode`). Each text is read from
        position 0: documents are encoded independently, in parallel positions."""
        token_lists = self._token_lists(texts, batch_size)
        order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
        states: list[HybridState | None] = [None] * len(token_lists)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            ids, lengths = self._pad([token_lists[i] for i in batch])
            ssm, conv, log_decay, keys, values = self._read_hybrid_in_segments(ids, lengths)
            for row, i in enumerate(batch):  # clone: a row view would keep the whole batch alive
                n = len(token_lists[i])
                states[i] = HybridState(ssm[row].clone(), conv[row].clone(), log_decay[row].clone(), n, self.fingerprint,
                                        keys=keys[row, :, :, :n].clone(), values=values[row, :, :, :n].clone(), position=n)
        return states  # type: ignore[return-value]

    def _read_hybrid_in_segments(self, ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(ssm, conv, log_decay, keys, values) after reading right-padded rows ``ids`` [b, l],
        ``encode_segment_tokens`` at a time (as :meth:`PicasoEngine.encode` does), each segment from
        the state the previous one left: the attention of a segment covers its queries against the
        keys so far, not the whole document's square. Padding never reaches a row's state: dt = 0
        in the SSM layers, and the keys of padding lie after the row's length, where they are cut."""
        chunk = self.model.cfg.chunk_size
        segment = max(chunk, self.encode_segment_tokens // chunk * chunk)
        ssm = conv = keys = values = log_decay = None
        for start in range(0, ids.shape[1], segment):
            piece = ids[:, start:start + segment]
            out = self.model(piece, ssm_state=ssm, conv_state=conv, keys=keys, values=values, position=start,
                             lengths=(lengths - start).clamp(0, piece.shape[1]), logits="none")
            ssm, conv = out.ssm_state, out.conv_state
            keys = out.keys if keys is None else torch.cat([keys, out.keys], dim=3)
            values = out.values if values is None else torch.cat([values, out.values], dim=3)
            log_decay = out.log_decay if log_decay is None else log_decay + out.log_decay
        return ssm, conv, log_decay, keys, values  # type: ignore[return-value]

    # ---------------------------------------------------------------------------- composing
    def compose(self, states: Sequence[HybridState], method: str = "picaso-s", prefix: HybridState | None = None,
                conv: str = "mean") -> HybridState:
        """Compose document states of this model (see :func:`picaso_rag.compose.compose_hybrid`)."""
        for s in list(states) + ([prefix] if prefix is not None else []):
            self._check(s)
        return compose_hybrid([s.to(self.device) for s in states], method=method,
                              prefix=prefix.to(self.device) if prefix is not None else None, conv=conv,
                              shift_keys=self.model.shift_keys)

    def _check(self, state: HybridState) -> None:
        if state.fingerprint != self.fingerprint:
            raise StateMismatchError(
                f"state was made by another model (fingerprint {state.fingerprint[:12]}, this model {self.fingerprint[:12]}); "
                "re-encode the document with this model."
            )
        cfg = self.model.cfg
        if (not isinstance(state, HybridState)
                or tuple(state.ssm.shape) != (len(cfg.ssm_layers), cfg.nheads, cfg.headdim, cfg.d_state)
                or tuple(state.keys.shape[:2]) + tuple(state.keys.shape[3:]) != (len(cfg.attn_layers), cfg.n_kv_heads, cfg.head_dim)):
            raise StateMismatchError(f"this {type(state).__name__} does not fit this hybrid model's layers; re-encode the document.")

    # ------------------------------------------------------------------------------ reading
    def _start(self, state: HybridState | None) -> tuple[Tensor, Tensor, Tensor, Tensor, int, Tensor, int]:
        """(ssm, conv, keys, values, position, log_decay, n_tokens) with a batch dim of 1, on this device."""
        if state is None:
            ssm, conv, keys, values = self.model.empty_state(1)
            return ssm, conv, keys, values, 0, torch.zeros(ssm.shape[1], ssm.shape[2], device=self.device), 0
        self._check(state)
        s = state.to(self.device, dtype=self.model.dtype)
        return s.ssm[None], s.conv[None], s.keys[None], s.values[None], s.position, s.log_decay, s.n_tokens

    @torch.inference_mode()
    def read(self, text: Tokens, state: HybridState | None = None) -> tuple[Tensor, HybridState]:
        """Read ``text`` after ``state`` (None: from nothing); its attention layers see every key of
        the state (the union of the documents), then the text causally. Returns fp32 logits
        [n_tokens, vocab] and the state after the text.

        Usage: ``logits, after = engine.read(" the query", state=context)``.
        """
        ids = self.tokenize(text, what="the text to read")
        if not ids:
            raise PicasoError("nothing to read: the text has no tokens. Pass a non-empty query.")
        ssm, conv, keys, values, position, log_decay, n_tokens = self._start(state)
        out = self.model(torch.tensor([ids], device=self.device), ssm_state=ssm, conv_state=conv, keys=keys,
                         values=values, position=position)
        after = HybridState(out.ssm_state[0], out.conv_state[0], log_decay + out.log_decay[0], n_tokens + len(ids),
                            self.fingerprint, keys=torch.cat([keys[0], out.keys[0]], dim=2),
                            values=torch.cat([values[0], out.values[0]], dim=2), position=position + len(ids))
        return out.logits[0].float(), after

    # --------------------------------------------------------------------------- generating
    def _decode_slot(self, n_keys: int, graphed: bool) -> HybridStepGraphs:
        """Buffers for one request's decoding of up to ``n_keys`` keys: the engine's graphed slot
        (grown to a power of two when too small) when ``graphed``, else fresh eager ones."""
        if graphed and self._slot is not None and self._slot.keys.shape[3] >= n_keys:
            return self._slot
        cfg, kw = self.model.cfg, dict(device=self.device, dtype=self.model.dtype)
        capacity = max(256, 1 << (n_keys - 1).bit_length()) if graphed else n_keys
        ssm, conv, _, _ = self.model.empty_state(1)
        keys = torch.zeros(1, len(cfg.attn_layers), cfg.n_kv_heads, capacity, cfg.head_dim, **kw)
        index = dict(dtype=torch.long, device=self.device)
        slot = HybridStepGraphs(self.model, torch.zeros(1, **index), ssm, conv, keys, torch.zeros_like(keys),
                                torch.zeros(1, **index), torch.zeros(1, **index), graphed=graphed)
        if graphed:
            self._slot = slot
        return slot

    def stream(self, prompt: Tokens, state: HybridState | None = None, **sampling) -> "_HybridStream":
        """Like :meth:`generate`, but an iterator of text pieces as they are produced."""
        super().stream(prompt, state, **sampling)  # PicasoEngine's checks of the prompt and sampling options (runs nothing)
        return _HybridStream(self, prompt, state, SamplingParams(**sampling))


class _HybridStream(_Stream):
    """_Stream's iterator for a hybrid model: each decoded token's key and value go into a buffer sized for the request."""

    def _run(self, engine: HybridEngine, prompt_ids: list[int], state: HybridState | None,  # type: ignore[override]
             params: SamplingParams) -> Iterator[str]:
        if not prompt_ids:
            raise PicasoError("the prompt has no tokens; pass a non-empty query.")
        sampler, stream = Sampler(params), TextStream(engine.tokenizer.decode, params.stop)
        ssm, conv, keys, values, position, _, _ = engine._start(state)
        model, device = engine.model, engine.device
        with torch.inference_mode():
            out = model(torch.tensor([prompt_ids], device=device), ssm_state=ssm, conv_state=conv,
                        keys=keys, values=values, position=position, logits="last")
            logits = out.logits[0, -1]
        n_keys = keys.shape[3] + len(prompt_ids)
        graphed = engine.cuda_graphs and engine._slot_lock.acquire(blocking=False)
        try:
            with torch.inference_mode():
                # every key this request will hold fits the slot: a step writes its key in place (no copy a token)
                slot = engine._decode_slot(n_keys + params.max_new_tokens, graphed)
                slot.ssm_state.copy_(out.ssm_state)
                slot.conv_state.copy_(out.conv_state)
                slot.keys[:, :, :, :n_keys].copy_(torch.cat([keys, out.keys.to(keys.dtype)], dim=3))
                slot.values[:, :, :, :n_keys].copy_(torch.cat([values, out.values.to(values.dtype)], dim=3))
                slot.lengths.fill_(n_keys)
                slot.positions.fill_(position + len(prompt_ids))
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
                    slot.token_ids.fill_(token)
                    logits = slot.step(1, n_keys)[0]
                    slot.lengths += 1
                    slot.positions += 1
                n_keys += 1
        finally:
            if graphed:
                engine._slot_lock.release()
        tail = stream.flush()
        if tail:
            yield tail
        self.result = {"token_ids": list(stream.ids), "n_prompt_tokens": len(prompt_ids), "finish_reason": finish}
