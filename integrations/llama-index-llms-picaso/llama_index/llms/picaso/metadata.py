"""Put PICASO's figures into responses: ``response.metadata["picaso"]``.

The stock synthesizers build the Response themselves and drop whatever the LLM returns beyond
text, so the figures travel through LlamaIndex's instrumentation instead: a span handler opens a
collector (a context variable) when a synthesizer, query engine or chat engine starts, the LLM
adds one record per call to the innermost open collector (each collector passes it up to the
enclosing one), and the summary is written into the span's returned object's ``metadata``.
Context variables follow the sync path (same thread) and the async path (same task;
``asyncio.to_thread`` copies them into the worker). A streaming response gets its figures as its
stream is consumed: compact and refine call the LLM only then, after the span has ended, so the
response's token generator is wrapped to report to the span's collector.

Usage::

    resp = query_engine.query("...")
    resp.metadata["picaso"]["tokens_read"], resp.metadata["picaso"]["calls"]
"""

from __future__ import annotations

import inspect
import threading
import weakref
from contextvars import ContextVar
from typing import Any, AsyncIterator, Iterator, Optional

import llama_index.core.instrumentation as instrument
from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.response.schema import AsyncStreamingResponse, StreamingResponse
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.chat_engine import CondensePlusContextChatEngine, CondenseQuestionChatEngine
from llama_index.core.chat_engine.types import BaseChatEngine
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler
from llama_index.core.response_synthesizers.base import BaseSynthesizer

from .nodes import original_node

METADATA_KEY = "picaso"

_SPANS = (
    (BaseSynthesizer, {"synthesize", "asynthesize"}),
    (BaseQueryEngine, {"query", "aquery"}),
    (BaseChatEngine, {"chat", "achat", "stream_chat", "astream_chat"}),
)


class _Collector:
    """The LLM calls made under one span; passes them up to the enclosing span's collector and
    keeps the metadata of the span's result up to date (streaming calls arrive after the span).

    A chat span also remembers the user's message and whether its engine condenses the history
    into a question (so that an empty condensed question can fall back to the message), and
    whether anything was retrieved under it yet (the condense call comes before retrieval)."""

    def __init__(self, parent: Optional["_Collector"], chat_message: str | None = None, condense_prefix: str = ""):
        self.parent = parent
        self.calls: list[dict] = []
        self.chat_message, self.condense_prefix, self.retrieved = chat_message, condense_prefix, False
        self._targets: list[Any] = []
        self._lock = threading.Lock()

    def add(self, calls: list[dict]) -> None:
        with self._lock:
            self.calls.extend(calls)
            snapshot, targets = list(self.calls), list(self._targets)
        for target in targets:
            _attach(target, summarize(snapshot))
        if self.parent is not None:
            self.parent.add(calls)

    def attach_to(self, result: Any) -> None:
        with self._lock:
            self._targets.append(result)
            snapshot = list(self.calls)
        if snapshot:
            _attach(result, summarize(snapshot))


_current: ContextVar[Optional[_Collector]] = ContextVar("picaso_collector", default=None)
_wrapped: "weakref.WeakSet[Any]" = weakref.WeakSet()


def record_call(stats: dict) -> None:
    """Called by the LLM for each completion: adds its figures to the innermost open span."""
    collector = _current.get()
    if collector is not None:
        collector.add([stats])


def note_retrieval() -> None:
    """Called by the postprocessor: documents were retrieved under the open spans."""
    collector = _current.get()
    while collector is not None:
        collector.retrieved = True
        collector = collector.parent


def condense_fallback(prompt: str) -> str | None:
    """The user's message, when ``prompt`` is the condense step of a chat turn: a condensing chat
    engine's span is open, nothing was retrieved under it yet, and the prompt is its condense
    template; else None."""
    collector = _current.get()
    while collector is not None:
        if collector.chat_message is not None:
            prefix = collector.condense_prefix
            if prefix and not collector.retrieved and prompt.startswith(prefix):
                return collector.chat_message
            return None
        collector = collector.parent
    return None


def _condense_prefix(engine: Any) -> str:
    """The literal text a condensing chat engine's condense prompt starts with ('' if none)."""
    if not isinstance(engine, (CondensePlusContextChatEngine, CondenseQuestionChatEngine)):
        return ""
    template = getattr(engine, "_condense_prompt_template", None) or getattr(engine, "_condense_question_prompt", None)
    try:
        text = template.get_template() if template is not None else ""
    except Exception:  # noqa: BLE001 - a custom prompt type: no fallback rather than a failed chat
        return ""
    return text.split("{", 1)[0]


def _unwrap_sources(result: Any) -> None:
    """``source_nodes`` are the real nodes, not the postprocessor's marked copies."""
    for scored in getattr(result, "source_nodes", None) or []:
        node = getattr(scored, "node", None)
        if node is not None:
            original = original_node(node)
            if original is not node:
                scored.node = original


def _wrap_stream(gen: Iterator[str], collector: _Collector) -> Iterator[str]:
    """compact/refine call the LLM lazily, while the caller consumes the stream, after the span
    ended: make those calls report to the span's collector."""
    while True:
        token = _current.set(collector)
        try:
            item = next(gen)
        except StopIteration:
            return
        finally:
            _current.reset(token)
        yield item


async def _wrap_astream(gen: AsyncIterator[str], collector: _Collector) -> AsyncIterator[str]:
    while True:
        token = _current.set(collector)
        try:
            item = await gen.__anext__()
        except StopAsyncIteration:
            return
        finally:
            _current.reset(token)
        yield item


def summarize(calls: list[dict]) -> dict:
    """One summary over the LLM calls of a response (refine makes several; chat adds condense)."""
    tickets: dict[int, dict] = {}  # retrieval figures, once per ticket (refine calls several times per ticket)
    for call in calls:
        if call.get("retrieval"):
            tickets[id(call["retrieval"])] = call["retrieval"]
    if not calls:
        return {"method": "none", "k": 0, "tokens_read": 0, "document_tokens": 0, "states_loaded": 0,
                "states_encoded": 0, "states_cached": 0, "states_rejected": [], "compose_ms": 0.0, "llm_calls": 0,
                "calls": []}
    composed = [c for c in calls if c["k"]] or calls
    methods = sorted({c["method"] for c in composed})
    late = [c.get("late_states", {}) for c in calls]
    return {
        "method": methods[0] if len(methods) == 1 else methods,
        "k": max(c["k"] for c in calls),
        "tokens_read": sum(c["tokens_read"] for c in calls),
        "document_tokens": sum(c["document_tokens"] for c in calls),
        "states_loaded": sum(t.get("states_loaded", 0) for t in tickets.values()) + sum(x.get("loaded", 0) for x in late),
        "states_encoded": sum(t.get("states_encoded", 0) for t in tickets.values()) + sum(x.get("encoded", 0) for x in late),
        "states_cached": sum(t.get("states_cached", 0) for t in tickets.values()),
        # stored states that were not used (corrupt, another model's, stale): node id, status, detail
        "states_rejected": [r for t in tickets.values() for r in t.get("states_rejected", [])]
                           + [r for x in late for r in x.get("rejected", [])],
        "compose_ms": round(sum(c["compose_ms"] for c in calls), 3),
        # states encoded for this answer: queued to be written to the store in the background (a failed
        # write is logged and counted by llm.state_writer), or not queued (its bounded queue was full)
        "states_queued_for_store": sum(t.get("write_back_queued", 0) for t in tickets.values())
                                   + sum(x.get("queued_for_store", 0) for x in late),
        "states_not_queued": sum(t.get("write_back_not_queued", 0) for t in tickets.values())
                             + sum(x.get("not_queued", 0) for x in late),
        "documents_read_as_text": sum(sum(c.get("read_as_text", {}).values()) for c in calls),
        "llm_calls": len(calls),
        "calls": calls,
    }


def _attach(result: Any, summary: dict) -> None:
    if result is None or isinstance(result, (str, bytes)):
        return
    metadata = getattr(result, "metadata", None)
    if metadata is None:
        try:
            result.metadata = metadata = {}  # AgentChatResponse defaults to None
        except (AttributeError, TypeError, ValueError):
            return
    if isinstance(metadata, dict):
        metadata[METADATA_KEY] = summary


def _is_target(id_: str, instance: Any) -> bool:
    if instance is None:
        return False
    method = id_.split("-", 1)[0].rsplit(".", 1)[-1]
    return any(isinstance(instance, cls) and method in names for cls, names in _SPANS)


class PicasoSpanHandler(BaseSpanHandler[Any]):
    """Opens a collector per synthesize/query/chat span; writes the summary into its result."""

    _open: dict = PrivateAttr(default_factory=dict)

    @classmethod
    def class_name(cls) -> str:
        return "PicasoSpanHandler"

    def span_enter(self, id_: str, bound_args: inspect.BoundArguments, instance: Any = None,
                   parent_id: Optional[str] = None, tags: Optional[dict] = None, **kwargs: Any) -> None:
        if _is_target(id_, instance):
            chat_message = None
            if isinstance(instance, BaseChatEngine):
                message = bound_args.arguments.get("message")
                chat_message = message if isinstance(message, str) else str(getattr(message, "content", "") or "")
            collector = _Collector(_current.get(), chat_message, _condense_prefix(instance) if chat_message else "")
            with self.lock:
                self._open[id_] = collector
            _current.set(collector)

    def span_exit(self, id_: str, bound_args: inspect.BoundArguments, instance: Any = None,
                  result: Any = None, **kwargs: Any) -> None:
        collector = self._close(id_)
        if collector is None:
            return
        if isinstance(result, StreamingResponse) and result.response_gen is not None and result.response_gen not in _wrapped:
            result.response_gen = _wrap_stream(result.response_gen, collector)
            _wrapped.add(result.response_gen)
        elif isinstance(result, AsyncStreamingResponse) and result.response_gen is not None and result.response_gen not in _wrapped:
            result.response_gen = _wrap_astream(result.response_gen, collector)
            _wrapped.add(result.response_gen)
        _unwrap_sources(result)
        collector.attach_to(result)

    def span_drop(self, id_: str, bound_args: inspect.BoundArguments, instance: Any = None,
                  err: Optional[BaseException] = None, **kwargs: Any) -> None:
        self._close(id_)

    def _close(self, id_: str) -> Optional[_Collector]:
        with self.lock:
            collector = self._open.pop(id_, None)
        if collector is None:
            return None
        if _current.get() is collector:
            _current.set(collector.parent)
        return collector

    # required by BaseSpanHandler; the overrides above do the work
    def new_span(self, *args: Any, **kwargs: Any) -> None:
        return None

    def prepare_to_exit_span(self, *args: Any, **kwargs: Any) -> None:
        return None

    def prepare_to_drop_span(self, *args: Any, **kwargs: Any) -> None:
        return None


def install() -> None:
    """Register the span handler on LlamaIndex's root dispatcher (once)."""
    root = instrument.get_dispatcher()
    if not any(isinstance(h, PicasoSpanHandler) for h in root.span_handlers):
        root.add_span_handler(PicasoSpanHandler())
