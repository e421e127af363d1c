"""The hand-off between the node postprocessor and the LLM: request-scoped, unforgeable markers.

LlamaIndex gives the LLM a prompt string, never the nodes: the synthesizer pastes each node's LLM
text (``node.get_content(metadata_mode=MetadataMode.LLM)``) into a template (``compact`` repacks
and strips them, ``refine`` calls once per chunk, the chat engines put them in a system message).
So each postprocessor call opens a :class:`Ticket` (its method, conv policy and the retrieved
documents' exact LLM texts) under a fresh random 128-bit token, and returns copies of the nodes
whose *LLM text only* is wrapped in markers naming that token and the document's index::

    <picaso:5f0c...e1:0>The Eiffel Tower was completed in 1889.</picaso:5f0c...e1:0>

``node.text``, ``node.metadata``, ``node.get_content()`` and the node id are unchanged, and the
markers never reach a serialized node (they live in a pydantic private attribute). The LLM scans
its prompt once for markers (O(prompt length)), looks each token up in a dict, and checks that the
text between a pair of markers is exactly the document registered under it. Only then is that
text replaced by the document's state; everything else (the template, the query, anything a user
typed, a marker whose token is unknown or expired, a span whose text changed) is read as text,
with the markers removed. Why this holds by construction:

- a prompt can only name documents through tokens, and a token is only ever in the LLM text of
  the nodes that one postprocessor call returned: another request's retrieval, a document text
  typed into a query, or a guess cannot produce a live token (2**128 possibilities, never shown);
- the method and conv policy travel with the token, so two postprocessors on one LLM cannot swap,
  and a prompt without markers (an engine without the postprocessor) is never composed;
- a prompt whose documents come from tickets with different methods is read as text.

Limits: a ticket lives until ``ttl_s`` after its last use or until ``max_tickets`` newer ones
push it out; after that its documents are read as text (never guessed). A node parser or
synthesizer that cuts a document in the middle (a chunk larger than the context window) leaves
unpaired markers: that document is read as text.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from picaso_rag import DocumentRef  # noqa: F401 - re-exported: handoff tickets carry them

_TOKEN_HEX = 32  # 128 random bits
_MARKER = re.compile(r"<(/?)picaso:([0-9a-f]{%d}):(\d{1,6})>" % _TOKEN_HEX)


@dataclass
class Ticket:
    """What one postprocessor call hands to the LLM: how to compose, and which documents."""

    method: str
    conv: str
    documents: list[DocumentRef]
    stats: dict = field(default_factory=dict)  # states loaded / encoded at retrieval time
    token: str = field(default_factory=lambda: secrets.token_hex(_TOKEN_HEX // 2))

    def markers(self, index: int) -> tuple[str, str]:
        """The opening and closing marker around document ``index``'s LLM text."""
        return f"<picaso:{self.token}:{index}>", f"</picaso:{self.token}:{index}>"


@dataclass
class Segment:
    """A piece of the prompt: plain text (read by the model) or a block of adjacent documents."""

    text: str = ""  # a block: its documents and separators as they stood in the prompt (read if it ends it)
    documents: list[DocumentRef] = field(default_factory=list)  # empty: text

    @property
    def is_text(self) -> bool:
        return not self.documents


@dataclass
class PromptPlan:
    """How to run a prompt: its segments (ending with the text to generate from), the composition
    method and conv policy (None: nothing is composed), and why documents were read as text."""

    prompt: str  # the prompt with every marker removed: what concatenation reads
    segments: list[Segment]
    method: str | None = None
    conv: str = "mean"
    tickets: list[Ticket] = field(default_factory=list)  # the tickets whose documents were verified
    documents: list[DocumentRef] = field(default_factory=list)  # every verified document, in prompt order
    read_as_text: dict = field(default_factory=dict)  # reason -> number of marked spans read as text

    @property
    def composed(self) -> list[DocumentRef]:
        return [d for s in self.segments for d in s.documents]


class Handoff:
    """The open tickets of one LLM, by token; thread-safe, bounded in number and age.

    Usage::

        ticket = handoff.open(Ticket("picaso-s", "mean", docs))   # the postprocessor
        plan = handoff.plan(prompt)                                # the LLM
    """

    def __init__(self, max_tickets: int = 4096, ttl_s: float = 3600.0):
        if max_tickets < 1 or ttl_s <= 0:
            raise ValueError("Handoff needs max_tickets >= 1 and ttl_s > 0.")
        self.max_tickets, self.ttl_s = max_tickets, ttl_s
        self._tickets: OrderedDict[str, tuple[Ticket, float]] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, ticket: Ticket) -> Ticket:
        now = time.monotonic()
        with self._lock:
            self._tickets[ticket.token] = (ticket, now)
            self._evict(now)
        return ticket

    def __len__(self) -> int:
        with self._lock:
            return len(self._tickets)

    def _evict(self, now: float) -> None:
        while len(self._tickets) > self.max_tickets:
            self._tickets.popitem(last=False)
        while self._tickets:
            _, (_, last_used) = next(iter(self._tickets.items()))
            if now - last_used <= self.ttl_s:
                break
            self._tickets.popitem(last=False)

    def _lookup(self, token: str) -> Ticket | None:
        now = time.monotonic()
        with self._lock:
            self._evict(now)
            entry = self._tickets.get(token)
            if entry is None:
                return None
            self._tickets[token] = (entry[0], now)  # refine calls once per chunk: keep it while in use
            self._tickets.move_to_end(token)
            return entry[0]

    def plan(self, prompt: str) -> PromptPlan:
        """Cut ``prompt`` into text and blocks of verified documents (see the module docstring).

        Adjacent documents separated only by whitespace form one block (the separators are not
        read: the block is replaced by the composition of its documents' states). A prompt that
        would end in a block keeps that block as text, since generation needs text to start from.
        """
        pieces: list[str | tuple[DocumentRef, str]] = []  # text, or (verified document, its text), in order
        used: dict[str, Ticket] = {}
        read_as_text: dict[str, int] = {}
        pos = text_start = 0  # scan position; start of the text not yet emitted
        while (match := _MARKER.search(prompt, pos)) is not None:
            pos = match.end()
            if match.group(1) == "/":  # a closing marker outside a verified document: removed from the text
                continue
            token, index = match.group(2), int(match.group(3))
            ticket = used.get(token) or self._lookup(token)
            if ticket is None:
                _count(read_as_text, "expired or unknown ticket")
                continue
            form = _verified_form(prompt, match.end(), ticket, index)
            if form is None:  # the text between the markers is not what was retrieved (or was cut)
                _count(read_as_text, "text changed or cut after retrieval")
                continue
            pieces.append(strip_markers(prompt[text_start:match.start()]))
            pieces.append((ticket.documents[index], form))  # kept verbatim: a document may contain anything
            used[token] = ticket
            pos = text_start = match.end() + len(form) + len(ticket.markers(index)[1])
        pieces.append(strip_markers(prompt[text_start:]))
        plain = "".join(p if isinstance(p, str) else p[1] for p in pieces)
        documents = [p[0] for p in pieces if not isinstance(p, str)]
        policies = {(t.method, t.conv) for t in used.values()}
        if len(policies) > 1:  # two postprocessors' documents in one prompt: no single method applies
            read_as_text["tickets with different methods"] = len(documents)
            return PromptPlan(plain, [Segment(plain)], tickets=list(used.values()), documents=documents,
                              read_as_text=read_as_text)
        if not documents:
            return PromptPlan(plain, [Segment(plain)], read_as_text=read_as_text)
        method, conv = policies.pop()
        return PromptPlan(plain, _segments(pieces), method, conv, list(used.values()), documents, read_as_text)


def _count(reasons: dict[str, int], reason: str) -> None:
    reasons[reason] = reasons.get(reason, 0) + 1


def _verified_form(prompt: str, start: int, ticket: Ticket, index: int) -> str | None:
    """The registered text of document ``index`` as it stands in ``prompt`` from ``start`` up to its
    closing marker, or None. It may stand as Python prints it inside a quoted string:
    llama-index-core 0.14's simple_summarize formats the *list* of chunks into the prompt
    (``['...\\n...']``, upstream PR run-llama/llama_index#22392), so there documents stand escaped."""
    if index >= len(ticket.documents):
        return None
    text, close = ticket.documents[index].text, ticket.markers(index)[1]
    for quote in ("", "'", '"'):
        form = text if not quote else _py_escaped(text, quote)
        if prompt.startswith(form, start) and prompt.startswith(close, start + len(form)):
            return form
    return None


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


def strip_markers(text: str) -> str:
    """``text`` without any picaso marker (what the model reads of a prompt, in every mode)."""
    return _MARKER.sub("", text)


def _is_separator(gap: str) -> bool:
    """Whitespace, or whitespace as printed escaped (the simple_summarize form): joins documents."""
    for escaped in ("\\n", "\\t", "\\r"):
        gap = gap.replace(escaped, " ")
    return not gap.strip()


def _segments(pieces: list[str | tuple[DocumentRef, str]]) -> list[Segment]:
    segments: list[Segment] = []
    for piece in pieces:
        if isinstance(piece, str):
            if not piece:
                continue
            if segments and segments[-1].is_text:
                segments[-1].text += piece
            else:
                segments.append(Segment(piece))
            continue
        doc, raw = piece
        if segments and not segments[-1].is_text:
            segments[-1].documents.append(doc)
            segments[-1].text += raw
        elif len(segments) >= 2 and _is_separator(segments[-1].text) and not segments[-2].is_text:
            separator = segments.pop().text  # whitespace between two documents: same block, not read
            segments[-1].documents.append(doc)
            segments[-1].text += separator + raw
        else:
            segments.append(Segment(raw, [doc]))
    if segments and not segments[-1].is_text:  # nothing after the last block: read it as text
        last = segments.pop()
        if segments and segments[-1].is_text:
            segments[-1].text += last.text
        else:
            segments.append(Segment(last.text))
    return segments
