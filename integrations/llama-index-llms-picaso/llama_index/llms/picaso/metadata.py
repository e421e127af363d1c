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
from llama_index.core.chat_engine.types import BaseChatEngine
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler
from llama_index.core.response_synthesizers.base import BaseSynthesizer

METADATA_KEY = "picaso"

_SPANS = (
    (BaseSynthesizer, {"synthesize", "asynthesize"}),
    (BaseQueryEngine, {"query", "aquery"}),
    (BaseChatEngine, {"chat", "achat", "stream_chat", "astream_chat"}),
)


class _Collector:
    """The LLM calls made under one span; passes them up to the enclosing span's collector and
    keeps the metadata of the span's result up to date (streaming calls arrive after the span)."""

    def __init__(self, parent: Optional["_Collector"]):
        self.parent = parent
        self.calls: list[dict] = []
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
    tickets: dict[int, dict] = {}
    for call in calls:
        if call.get("ticket") is not None:
            tickets[call["ticket"]] = call.get("retrieval", {})
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
            collector = _Collector(_current.get())
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
