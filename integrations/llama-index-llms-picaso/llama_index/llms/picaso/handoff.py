"""The hand-off between the node postprocessor and the LLM, keyed by the documents' exact text.

LlamaIndex gives the LLM a prompt string, never the nodes: the synthesizer pastes each node's
LLM text into a template (``compact`` repacks and strips them, ``refine`` calls once per chunk,
the chat engines put them in a system message). So the postprocessor registers a *ticket*
(method + the retrieved documents' texts) and the LLM looks for those texts in its prompt.

Why text and not a context variable or "the last retrieval":
- the async postprocessor runs in another thread (its context variables never reach the LLM);
- condense_plus_context calls the LLM for the condense step, whose prompt holds no document:
  nothing matches, so nothing is composed (the previous turn's states cannot leak in);
- concurrent queries: a state is looked up by the text found in *this* prompt, and a text's
  state is the same whichever query registered it, so states cannot mix.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from picaso_rag import State, text_sha256


@dataclass(frozen=True)
class DocumentRef:
    """One retrieved document: the exact text the LLM sees for it, its digest and node id."""

    text: str
    digest: str  # sha256 hex of text
    node_id: str | None = None

    @classmethod
    def of(cls, text: str, node_id: str | None = None) -> "DocumentRef":
        return cls(text, text_sha256(text), node_id)

    @property
    def key(self) -> str:
        """The short key stored in node metadata and reported in responses."""
        return self.digest[:16]


_ticket_ids = itertools.count(1)


@dataclass
class Ticket:
    """What one postprocessor call hands to the LLM: how to compose, and which documents."""

    method: str
    conv: str
    documents: list[DocumentRef]
    stats: dict = field(default_factory=dict)  # states loaded / encoded at retrieval time
    id: int = field(default_factory=lambda: next(_ticket_ids))
    created: float = field(default_factory=time.time)
    used: bool = False  # an LLM call composed with it (refine makes several calls per ticket)

    @property
    def digests(self) -> frozenset[str]:
        return frozenset(d.digest for d in self.documents)


@dataclass
class Segment:
    """A piece of the prompt: plain text (read by the model) or a block of adjacent documents."""

    start: int
    end: int
    documents: list[DocumentRef] = field(default_factory=list)  # empty: text

    @property
    def is_text(self) -> bool:
        return not self.documents


@dataclass
class PromptPlan:
    """How to run a prompt: its segments (ending with the text to generate from) and the ticket."""

    prompt: str
    segments: list[Segment]
    ticket: Ticket | None
    ambiguous: bool = False  # tickets with different methods covered these documents

    @property
    def documents(self) -> list[DocumentRef]:
        return [d for s in self.segments for d in s.documents]

    def text(self, segment: Segment) -> str:
        return self.prompt[segment.start:segment.end]


class Handoff:
    """The live tickets of one LLM (the most recent ``max_tickets``); thread-safe."""

    def __init__(self, max_tickets: int = 256):
        self._tickets: deque[Ticket] = deque(maxlen=max_tickets)
        self._lock = threading.Lock()

    def register(self, ticket: Ticket) -> Ticket:
        with self._lock:
            self._tickets.append(ticket)
        return ticket

    def tickets(self) -> list[Ticket]:
        with self._lock:
            return list(self._tickets)

    def plan(self, prompt: str) -> PromptPlan:
        """Find the registered documents in ``prompt`` and cut it into segments.

        Adjacent documents separated only by whitespace form one block (the separators are not
        read: the block is replaced by the composition of its documents' states). A prompt that
        would end in a block keeps that block as text, since generation needs text to start from.
        """
        tickets = self.tickets()
        candidates: dict[str, DocumentRef] = {}
        for ticket in reversed(tickets):  # newest first: its node ids win for a shared text
            for doc in ticket.documents:
                candidates.setdefault(doc.digest, doc)
        hits = _find(prompt, candidates.values())
        segments = _segments(prompt, hits)
        found = {d.digest for s in segments for d in s.documents}
        if not found:
            return PromptPlan(prompt, [Segment(0, len(prompt))], None)
        with self._lock:
            ticket, ambiguous = _choose_ticket(tickets, found)
            ticket.used = True
        return PromptPlan(prompt, segments, ticket, ambiguous)


def _find(prompt: str, docs: Iterable[DocumentRef]) -> list[tuple[int, int, DocumentRef]]:
    """Non-overlapping occurrences of the documents' texts, left to right, longer first on ties.

    Each text is also looked for as Python would print it inside a quoted string: llama-index-core
    0.14's simple_summarize formats the *list* of chunks into the prompt (``['...\\n...']``,
    upstream PR run-llama/llama_index#22392), so there the documents stand escaped.
    """
    hits = []
    for doc in docs:
        if not doc.text:
            continue
        for form in dict.fromkeys((doc.text, _py_escaped(doc.text, "'"), _py_escaped(doc.text, '"'))):
            start = prompt.find(form)
            while start != -1:
                hits.append((start, start + len(form), doc))
                start = prompt.find(form, start + 1)
    hits.sort(key=lambda h: (h[0], h[0] - h[1]))
    chosen, end = [], 0
    for hit in hits:
        if hit[0] >= end:
            chosen.append(hit)
            end = hit[1]
    return chosen


def _py_escaped(text: str, quote: str) -> str:
    """The body of ``repr(text)`` when Python delimits it with ``quote`` (CPython's escaping rules)."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch == quote or ch == "\\":
            out.append("\\" + ch)
        elif ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif code < 0x7F or ch.isprintable():
            out.append(ch)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


_SHORT_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _is_separator(gap: str) -> bool:
    """Whitespace, or whitespace as printed escaped (the simple_summarize form): joins documents."""
    for escaped in ("\\n", "\\t", "\\r"):
        gap = gap.replace(escaped, " ")
    return not gap.strip()


def _segments(prompt: str, hits: list[tuple[int, int, DocumentRef]]) -> list[Segment]:
    segments: list[Segment] = []
    pos = 0
    for start, end, doc in hits:
        gap = prompt[pos:start]
        if segments and not segments[-1].is_text and _is_separator(gap):
            segments[-1].documents.append(doc)  # whitespace between two documents: same block
            segments[-1].end = end
        else:
            if gap:
                segments.append(Segment(pos, start))
            segments.append(Segment(start, end, [doc]))
        pos = end
    if pos < len(prompt):
        segments.append(Segment(pos, len(prompt)))
    if segments and not segments[-1].is_text:  # nothing after the last block: read it as text
        last = segments.pop()
        if segments and segments[-1].is_text:
            segments[-1].end = last.end
        else:
            segments.append(Segment(last.start, last.end))
    return segments


def _choose_ticket(tickets: list[Ticket], found: set[str]) -> tuple[Ticket, bool]:
    """The newest ticket holding every document found, preferring one no call has used yet (each
    retrieval is answered by the call that follows it). Ambiguous: several unused tickets hold the
    documents with different methods (two queries with different methods on the same documents
    at the same moment); the newest is taken."""
    covering: list[Ticket] = []
    best, best_cover = tickets[-1], -1
    for ticket in reversed(tickets):  # newest first
        cover = len(found & ticket.digests)
        if cover == len(found):
            covering.append(ticket)
        if cover > best_cover:
            best, best_cover = ticket, cover
    if not covering:
        return best, False
    unused = [t for t in covering if not t.used]
    ambiguous = len({(t.method, t.conv) for t in unused}) > 1
    return (unused or covering)[0], ambiguous
