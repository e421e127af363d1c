"""PicasoLLM: a LlamaIndex CustomLLM that reads the query from the composed states of the documents.

Usage::

    llm = PicasoLLM(model="./models/picaso-mini", state_store=StateStore("./picaso_db/states"))
    composer = PicasoNodePostprocessor(llm=llm, method="picaso-s")
    engine = index.as_query_engine(llm=llm, node_postprocessors=[composer])

Given a prompt, the LLM finds the documents its postprocessor handed off for this request (marked
spans of the prompt with an unforgeable per-retrieval token, see ``handoff.py``), replaces each
block of documents by the composition of their stored states, and reads only the text around them
(the template and the query) before generating. Without a postprocessor, or for prompts that hold
no handed-off document, it is a plain completion model that reads the whole prompt. The model is
a Mamba-2 or a hybrid checkpoint (the shipped models/picaso-mini is a hybrid; docs/hybrids.md).
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import time
from collections import OrderedDict
from threading import Lock
from typing import Any, AsyncIterator, Iterator, Sequence

import torch
from llama_index.core.base.llms.generic_utils import (
    completion_response_to_chat_response,
    stream_completion_response_to_chat_response,
)
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from picaso_rag import METHODS, PicasoEngine, PicasoError, Resolution, State, StateCache, StateResolver, StateStore, StateWriter

from .handoff import DocumentRef, Handoff
from .metadata import condense_fallback, record_call
from .metadata import install as _install_metadata

logger = logging.getLogger("llama_index.llms.picaso")

CONCAT = "concat"
COMPOSE_METHODS: tuple[str, ...] = METHODS + (CONCAT,)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
_SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "stop", "seed")
_ALIASES = {"max_tokens": "max_new_tokens", "model_name": "model", "model_path": "model", "tokenizer_name": "tokenizer"}


class PicasoLLMError(RuntimeError):
    """An error inside a PicasoLLM call (its message names the fix; ``__cause__`` is the original).

    Not a ValueError on purpose: LlamaIndex's refine and compact synthesizers catch ValueError and
    TypeError and answer "Empty Response", which would hide a misconfiguration or a bad state.
    """


class PicasoLLM(CustomLLM):
    """Mamba-2 or hybrid LLM over composed document states (PICASO). See the module docstring.

    Pass ``model`` (checkpoint directory or hub id) or an existing ``engine`` (a
    :class:`picaso_rag.PicasoEngine`, e.g. shared between several LLMs). ``state_store``: where
    document states are kept (optional: without it states are encoded when first retrieved and
    kept in memory only).
    """

    model: str | None = Field(default=None, description="Mamba-2 or hybrid checkpoint directory, or hub id.")
    tokenizer: str | None = Field(default=None, description="tokenizer.json path or tokenizer directory "
                                                            "(default: the one in the checkpoint).")
    device: str = Field(default="cpu", description="Torch device, e.g. 'cuda'.")
    dtype: str | None = Field(default=None, description="float32, bfloat16 or float16 (default: fp32 on CPU, bf16 on CUDA).")
    max_new_tokens: int = Field(default=128, gt=0, description="Tokens generated at most per call.")
    temperature: float = Field(default=0.0, ge=0.0, description="0 = greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, description="Strings that end the generated text (excluded).")
    seed: int | None = Field(default=None, description="Seed for sampling (temperature > 0).")
    context_window: int = Field(
        default=131072, gt=0,
        description="Text LlamaIndex may put in one prompt. Composed documents cost no context, so it is large: "
                    "compact mode then keeps every node whole, and whole nodes are what states exist for.")
    encode_batch_size: int = Field(default=16, gt=0, description="Documents per batch when encoding states.")
    state_cache_bytes: int = Field(default=1 << 30, ge=0,
                                   description="Memory on the engine's device for recently used document states.")
    state_host_cache_bytes: int = Field(default=0, ge=0,
                                        description="Host (CPU) memory for states evicted from the device tier "
                                                    "(useful on CUDA; pinned there).")

    _engine: PicasoEngine = PrivateAttr()
    _store: StateStore | None = PrivateAttr(default=None)
    _handoff: Handoff = PrivateAttr()
    _cache: StateCache = PrivateAttr()
    _writer: StateWriter = PrivateAttr()
    _resolver: StateResolver = PrivateAttr()
    _prefixes: "OrderedDict[str, State]" = PrivateAttr()
    _prefix_lock: Lock = PrivateAttr()

    def __init__(self, model: str | None = None, *, engine: PicasoEngine | None = None,
                 state_store: StateStore | str | None = None, **kwargs: Any) -> None:
        _check_keywords(type(self), kwargs)
        if kwargs.get("tokenizer") is not None:
            kwargs["tokenizer"] = str(kwargs["tokenizer"])
        super().__init__(model=str(model) if model is not None else None, **kwargs)
        if engine is None:
            if model is None:
                raise PicasoError("PicasoLLM needs a model: pass model='<checkpoint dir or hub id>' or engine=PicasoEngine(...).")
            if self.dtype is not None and self.dtype not in _DTYPES:
                raise PicasoError(f"unknown dtype {self.dtype!r}; use one of {', '.join(_DTYPES)}.")
            engine = PicasoEngine.from_pretrained(model, device=self.device, dtype=_DTYPES.get(self.dtype or ""),
                                                  tokenizer=self.tokenizer)
        elif not isinstance(engine, PicasoEngine):
            raise PicasoError(f"engine must be a picaso_rag.PicasoEngine, got {type(engine).__name__}.")
        elif self.tokenizer is not None:
            raise PicasoError("tokenizer= applies when PicasoLLM loads the model; an engine already has its tokenizer "
                              "(pass it to PicasoEngine.from_pretrained(..., tokenizer=...)).")
        self._engine = engine
        self._store = StateStore(state_store) if isinstance(state_store, str) else state_store
        self._handoff = Handoff()
        self._cache = StateCache(self.state_cache_bytes, self.state_host_cache_bytes, device=engine.device)
        self._writer = StateWriter()  # write-backs off the answer path: at most 64 states, 1 GiB waiting
        self._resolver = StateResolver(engine, self._cache, [self._store] if self._store is not None else [],
                                       self._writer, encode_batch_size=self.encode_batch_size)
        self._prefixes = OrderedDict()
        self._prefix_lock = Lock()
        _install_metadata()

    @classmethod
    def class_name(cls) -> str:
        return "PicasoLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.context_window, num_output=self.max_new_tokens,
                           model_name=self.model or "picaso-mamba2", is_chat_model=False)

    @property
    def engine(self) -> PicasoEngine:
        return self._engine

    @property
    def state_store(self) -> StateStore | None:
        return self._store

    @property
    def state_cache(self) -> StateCache:
        """The in-memory state cache (device and host tiers); ``state_cache.stats()`` for its counters."""
        return self._cache

    @property
    def state_writer(self) -> StateWriter:
        """Writes the states encoded for answers back to the store, in the background.

        ``state_writer.flush()`` waits for them; ``state_writer.stats()`` counts writes done,
        failed (a full or read-only store: logged, the answer had its state) and not queued.
        """
        return self._writer

    @property
    def handoff(self) -> Handoff:
        """The open tickets of this LLM's postprocessors (see ``handoff.py``)."""
        return self._handoff

    # ------------------------------------------------------------------------- document states
    def resolve_states(self, docs: Sequence[DocumentRef]) -> Resolution:
        """States of ``docs``: from memory, else the store, else encoded now (written back in the background).

        Through :class:`picaso_rag.StateResolver`, as the server and the Ray replicas: a stored
        state that is another model's, corrupt or stale is re-encoded from the text and logged; a
        store that is down is skipped. Used by the postprocessor, and by the LLM if a state was
        evicted from memory between retrieval and generation.
        """
        return self._resolver.resolve(docs)

    def _prefix_state(self, text: str) -> State:
        """State of the template text before the documents; cached, since templates repeat."""
        with self._prefix_lock:
            state = self._prefixes.get(text)
            if state is not None:
                self._prefixes.move_to_end(text)
                return state
        state = self._engine.encode([text])[0]
        with self._prefix_lock:
            self._prefixes[text] = state
            while len(self._prefixes) > 64:
                self._prefixes.popitem(last=False)
        return state

    # --------------------------------------------------------------------------------- running
    def _sampling(self, kwargs: dict) -> dict:
        params = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                  "stop": list(self.stop), "seed": self.seed}
        for key, value in kwargs.items():
            key = _ALIASES.get(key, key) if key == "max_tokens" else key
            if key in _SAMPLING_KEYS and value is not None:
                params[key] = value
        return params

    def _start(self, prompt: str, formatted: bool, kwargs: dict) -> "_Run":
        """Plan the prompt, compose the documents' states and prepare generation (done eagerly,
        so that streaming responses already carry their figures)."""
        try:
            return self._prepare(prompt, formatted, kwargs)
        except PicasoError as exc:
            raise PicasoLLMError(str(exc)) from exc

    def _prepare(self, prompt: str, formatted: bool, kwargs: dict) -> "_Run":
        if isinstance(prompt, (bytes, bytearray)):
            raise PicasoError("PicasoLLM got bytes; decode them first (prompt.decode('utf-8')) and pass the text.")
        if not isinstance(prompt, str) or not prompt:
            raise PicasoError(f"PicasoLLM got an empty prompt ({type(prompt).__name__}); pass the text to complete.")
        if not formatted:
            prompt = self.completion_to_prompt(prompt)
        started = time.perf_counter()
        plan = self._handoff.plan(prompt)
        method = plan.method or ("mixed" if plan.tickets else "none")
        engine = self._engine
        stats: dict[str, Any] = {
            "method": method, "k": 0, "documents": [], "document_tokens": 0, "tokens_read": 0,
            "texts_read": [], "compose_ms": 0.0,
            "retrieval": plan.tickets[0].stats if len(plan.tickets) == 1 else {},
            "late_states": {"loaded": 0, "encoded": 0, "queued_for_store": 0, "not_queued": 0}, "read_as_text": dict(plan.read_as_text),
        }
        state: State | None = None
        if plan.method is None or plan.method == CONCAT:
            tail = plan.prompt  # the ordinary way: every token of the prompt (markers removed) is read
            if plan.method == CONCAT:
                stats["k"] = len(plan.documents)
                stats["documents"] = [d.key for d in plan.documents]
                stats["document_tokens"] = sum(len(engine.tokenize(d.text)) for d in plan.documents)
        else:
            for segment in plan.segments[:-1]:
                if segment.is_text:
                    text = segment.text
                    if state is None and text.strip():
                        # counted as read even when cached: a request's figures must not depend on others'
                        state = self._prefix_state(text)
                        stats["tokens_read"] += state.n_tokens
                    else:
                        _, state = engine.read(text, state)
                        stats["tokens_read"] += len(engine.tokenize(text))
                    stats["texts_read"].append(text)
                else:
                    resolved = self.resolve_states(segment.documents)
                    late = stats["late_states"]
                    late["loaded"] += resolved.stats["states_loaded"]
                    late["encoded"] += resolved.stats["states_encoded"]
                    late["queued_for_store"] += resolved.stats["write_back_queued"]
                    late["not_queued"] += resolved.stats["write_back_not_queued"]
                    late.setdefault("rejected", []).extend(resolved.stats["states_rejected"])
                    compose_start = time.perf_counter()
                    state = engine.compose(resolved.states, method=plan.method, prefix=state, conv=plan.conv)
                    stats["compose_ms"] += (time.perf_counter() - compose_start) * 1000
                    stats["k"] += len(segment.documents)
                    stats["documents"] += [d.key for d in segment.documents]
                    stats["document_tokens"] += sum(s.n_tokens for s in resolved.states)
            tail = plan.segments[-1].text
        # A prompt ending in "Answer: " would make a BPE model start with a space token (the space
        # belongs to the next word): generate after the colon instead, as the model was trained.
        tail = tail.rstrip(" ") or tail
        tail_ids = engine.tokenize(tail)
        if not tail_ids:
            raise PicasoError("nothing to generate from: the prompt ends in text with no tokens.")
        stats["tokens_read"] += len(tail_ids)
        stats["texts_read"].append(tail)
        stats["compose_ms"] = round(stats["compose_ms"], 3)
        stats["prepare_ms"] = round((time.perf_counter() - started) * 1000, 3)
        record_call(stats)
        return _Run(engine.stream(tail_ids, state=state, **self._sampling(kwargs)), stats)

    def _finish(self, run: "_Run", text: str, condense_message: str | None) -> CompletionResponse:
        if condense_message is not None and not text.strip():
            # the condense step of a chat turn produced no question: retrieve for the user's own message
            run.stats["condense_fallback"] = True
            text = condense_message
        return CompletionResponse(text=text, additional_kwargs={"picaso": run.stats}, raw={"usage": run.usage()})

    # --------------------------------------------------------------------------- LlamaIndex API
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        run = self._start(prompt, formatted, kwargs)
        return self._finish(run, "".join(run), condense_fallback(prompt))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        run = self._start(prompt, formatted, kwargs)

        def gen() -> CompletionResponseGen:
            text = ""
            for piece in run:
                text += piece
                yield CompletionResponse(text=text, delta=piece, additional_kwargs={"picaso": run.stats},
                                         raw={"usage": run.usage()})

        return gen()

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        condense_message = condense_fallback(prompt)

        # model work off the event loop, so that concurrent aquery calls run side by side
        def work() -> CompletionResponse:
            run = self._start(prompt, formatted, kwargs)
            return self._finish(run, "".join(run), condense_message)

        return await asyncio.to_thread(work)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        run = await asyncio.to_thread(self._start, prompt, formatted, kwargs)

        async def gen() -> CompletionResponseAsyncGen:
            text = ""
            async for piece in _aiter_in_thread(iter(run)):
                text += piece
                yield CompletionResponse(text=text, delta=piece, additional_kwargs={"picaso": run.stats},
                                         raw={"usage": run.usage()})

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return completion_response_to_chat_response(await self.acomplete(self.messages_to_prompt(messages), formatted=True, **kwargs))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        completions = await self.astream_complete(self.messages_to_prompt(messages), formatted=True, **kwargs)

        async def gen() -> ChatResponseAsyncGen:
            async for completion in completions:
                for chat in stream_completion_response_to_chat_response(iter([completion])):
                    yield chat

        return gen()


class _Run:
    """Text pieces of one generation; fills its stats when done. Errors surface as PicasoLLMError."""

    def __init__(self, stream: Any, stats: dict):
        self._stream, self.stats = stream, stats
        self._started = time.perf_counter()
        self._new_tokens = 0

    def usage(self) -> dict:
        """LlamaIndex's usage fields (TokenCountingHandler reads them): what the model actually read
        (the template and query; composed documents are not read) and generated."""
        return {"prompt_tokens": self.stats["tokens_read"], "completion_tokens": self._new_tokens,
                "total_tokens": self.stats["tokens_read"] + self._new_tokens}

    def __iter__(self) -> Iterator[str]:
        try:
            for piece in self._stream:
                self._new_tokens += 1
                yield piece
        except PicasoError as exc:
            raise PicasoLLMError(str(exc)) from exc
        result = self._stream.result
        self._new_tokens = len(result["token_ids"])
        self.stats.update(new_tokens=self._new_tokens, finish_reason=result["finish_reason"],
                          generate_ms=round((time.perf_counter() - self._started) * 1000, 3))


def _check_keywords(cls: type, kwargs: dict) -> None:
    """Unknown keyword arguments raise (pydantic would drop them silently: a typo such as
    ``tokenizr=`` would then be ignored)."""
    known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
    for key in kwargs:
        if key in known:
            continue
        hint = _ALIASES.get(key) or next(iter(difflib.get_close_matches(key, sorted(known), n=1)), None)
        raise PicasoError(f"PicasoLLM got an unknown argument {key!r}" + (f"; did you mean {hint!r}?" if hint else
                          f"; known arguments: model, engine, state_store, {', '.join(sorted(cls.model_fields))}."))


async def _aiter_in_thread(it: Iterator[str]) -> AsyncIterator[str]:
    """Pull each item of a blocking iterator in a worker thread."""
    done = object()
    while True:
        item = await asyncio.to_thread(next, it, done)
        if item is done:
            return
        yield item  # type: ignore[misc]
