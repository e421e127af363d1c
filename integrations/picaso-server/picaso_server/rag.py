"""From a request to (prompt tokens, composed state): retrieval, states, composition, the prompt.

The prompt the model reads is LlamaIndex's QA template with the documents replaced by their
composed states::

    [prefix: "Context information is below.\\n-----\\n"]  (a cached state)
    [the retrieved documents]                               (their stored states, composed)
    "\\n-----\\n" + system + history + "Given the context ... answer the query.\\nQuery: <q>\\nAnswer:"   (read)

Only the last part is read at request time. The conversation history is the client's (the OpenAI
protocol sends it with every request); the server keeps none, and bounds what it reads with
``history_tokens``: the oldest turns are dropped first.

Retrieval for a conversation: two retrievals, merged by score (the k best of both): the last user
message alone, and :func:`retrieval_query`, the user's turns (newest kept first within
``retrieval_history_tokens``, in the order asked). A follow-up such as "When did she write it?"
scores low on its own and keeps the subject its conversation started with, however many turns back;
a new question scores high on its own and is not drowned by the old subject. Measured on HotpotQA
conversations (benchmarks/multiturn_retrieval.py): recall@3 at the 4th turn 0.93 (the rule before,
the previous user message prepended, 0.01), and 0.86 for a question that changes the subject (0.94
before; the history alone: 0.37). No LLM call rewrites the question: with a small model that costs a
generation and adds noise.

The pipeline stands on picaso_rag alone (the engine, and a :class:`picaso_rag.StateResolver` over
the state store: memory, then the store, then encoded, written back off the answer path) and on a
retriever (a LlamaIndex index over the vector store the integration ingested into). The template
is the one LlamaIndex's query engines use (``DEFAULT_TEXT_QA_PROMPT``), so a question asked here and
through a LlamaIndex query engine reads the same prompt.

Usage::

    rag = RagPipeline(engine, index, vector_store, ServerSettings(), state_stores=[StateStore("./states")])
    prepared = rag.prepare_chat(request)    # -> Prepared(prompt_ids, state, sources, figures)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from llama_index.core.schema import MetadataMode

from picaso_rag import DocumentRef, PicasoEngine, PicasoError, State, StateCache, StateResolver, StateWriter
from picaso_rag.store_api import StateBackend

from .protocol import APIError, ChatCompletionRequest, CompletionRequest, DocumentSpec, Message

PREFIX = "Context information is below.\n---------------------\n"
AFTER_CONTEXT = "\n---------------------\n"
INSTRUCTION = "Given the context information and not prior knowledge, answer the query.\n"


logger = logging.getLogger("picaso_server")


@dataclass
class ServerSettings:
    """Every bound the server enforces (docs/serving.md lists them)."""

    model_name: str = "picaso"
    method: str = "picaso-s"
    top_k: int = 3
    max_top_k: int = 32
    default_max_tokens: int = 128
    task_max_tokens: int = 32  # default budget of a front end's background task (a title, tags)
    default_stop: tuple[str, ...] = ()  # stop strings of a request that sends none
    max_tokens_limit: int = 1024
    history_tokens: int = 1024  # tokens of system + history + question read per request, oldest turns dropped
    retrieval_history_tokens: int = 192  # tokens of the user's turns a conversation retrieves with (newest kept first)
    max_documents: int = 32  # documents per request (extra_body documents)
    max_document_chars: int = 32_000  # per ad hoc text
    max_adhoc_tokens: int = 8192  # of all ad hoc texts of one request (a character may be 4 tokens: emoji)
    allow_adhoc_documents: bool = True  # False: only documents of the index (no encoding per request; no timing oracle)
    max_concat_tokens: int = 16_384  # documents' tokens one concatenation request reads
    max_body_bytes: int = 1 << 20  # request body, refused before it is read
    max_batch: int = 64
    max_queue: int = 256  # requests waiting for the GPU; more in flight: 503
    # hybrid models only (attention layers): keys per row (documents + prompt + max_tokens; more: 400) and
    # bytes of all rows' keys and values (more: the request waits for rows to leave); see picaso_rag.scheduler
    max_slot_tokens: int = 32_768
    max_kv_bytes: int = 2 << 30
    prepare_threads: int = 2  # retrieval, state loading and composition (bounded: no thread per request)
    # requests with ad hoc texts are prepared in their own pool: encoding them (up to max_adhoc_tokens, seconds
    # on a CPU) never holds up the preparation of requests without them
    adhoc_threads: int = 1
    # the scheduler's reads per loop turn (chunked prefill): a long prompt is read prefill_chunk_tokens at a
    # time, and one join reads at most max_read_tokens padded prompt tokens; a decoding row waits between two
    # tokens at most one such read plus one decode step (docs/serving.md, "A victim's longest gap")
    prefill_chunk_tokens: int = 512
    max_read_tokens: int = 512
    state_cache_bytes: int = 1 << 30  # recently used document states (ad hoc texts' included) on the engine's device
    # write-backs of states encoded for answers wait here (in the background; more: not written, encoded again)
    write_back_max_pending: int = 64
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()  # browser front ends allowed to call the API (CORS); none: no CORS headers
    conv: str = "mean"
    extra: dict = field(default_factory=dict)


@dataclass
class Prepared:
    prompt_ids: list[int]
    state: State | None
    sources: list[dict]
    figures: dict


def retrieval_query(user_turns: Sequence[str], tokenize: Callable[[str], list[int]], budget: int) -> str:
    """What a conversation retrieves with: its user turns, newest first while they fit in ``budget``
    tokens (the last one always), joined in the order they were asked.

    ``retrieval_query(["Who was Ada Lovelace?", "What did she write?", "When?"], tokenize, 192)`` keeps
    all three: the subject of the first turn reaches the retriever at the third.
    """
    turns = [t.strip() for t in user_turns if t.strip()]
    kept = turns[-1:]
    used = len(tokenize(kept[0])) if kept else 0
    for turn in reversed(turns[:-1]):
        cost = len(tokenize(turn))
        if used + cost > budget:
            break
        kept.insert(0, turn)
        used += cost
    return "\n".join(kept)


def retrieval_queries(user_turns: Sequence[str], tokenize: Callable[[str], list[int]], budget: int) -> list[str]:
    """What a conversation retrieves with: its last user message, and (when there are earlier turns)
    :func:`retrieval_query` of them all; :func:`best_of` merges the two retrievals."""
    history = retrieval_query(user_turns, tokenize, budget)
    last = [t.strip() for t in user_turns if t.strip()][-1:]
    return last + ([history] if last and history != last[0] else [])


def best_of(retrievals: Sequence[Sequence[Any]], k: int) -> list[Any]:
    """The ``k`` best-scored nodes (LlamaIndex ``NodeWithScore``) over several retrievals, each node once."""
    best: dict[str, Any] = {}
    for found in retrievals:
        for scored in found:
            held = best.get(scored.node.node_id)
            if held is None or (scored.score or 0.0) > (held.score or 0.0):
                best[scored.node.node_id] = scored
    return sorted(best.values(), key=lambda s: -(s.score or 0.0))[:k]  # stable: ties keep the retriever's order


class RagPipeline:
    """Retrieval, states and the prompt of one request (see the module docstring).

    ``state_stores``: where the index's document states are, nearest first (e.g. a budgeted local
    directory, then the shared S3 store); none: every state is encoded on its first use and kept in
    memory only.
    """

    def __init__(self, engine: PicasoEngine, index: Any, vector_store: Any, settings: ServerSettings,
                 state_stores: Sequence[StateBackend] = ()):
        if not isinstance(engine, PicasoEngine):
            raise PicasoError(f"RagPipeline takes a picaso_rag.PicasoEngine, got {type(engine).__name__}.")
        self.engine, self.index, self.vector_store, self.settings = engine, index, vector_store, settings
        self.resolver = StateResolver(engine, StateCache(settings.state_cache_bytes, device=engine.device),
                                      list(state_stores), StateWriter(max_pending=settings.write_back_max_pending))
        self.prefix_state = self.engine.encode([PREFIX])[0]  # the template before the documents: encoded once

    # ------------------------------------------------------------------------------- requests
    def prepare_chat(self, request: ChatCompletionRequest) -> Prepared:
        messages = request.messages
        query = retrieval_queries([m.text for m in messages if m.role == "user"], self.engine.tokenize,
                                  self.settings.retrieval_history_tokens)
        tail_ids = self._chat_tail(messages)
        return self._prepare(request, query, tail_ids, chat=True)

    def prepare_completion(self, request: CompletionRequest) -> Prepared:
        ids = self.engine.tokenize(request.prompt)
        if not ids:
            raise APIError(400, "prompt has no tokens; send a non-empty prompt.", "prompt")
        if len(ids) > self.settings.history_tokens:
            raise APIError(400, f"prompt is {len(ids)} tokens; the server reads at most {self.settings.history_tokens} "
                                "per request: shorten it (documents go in extra_body documents, not in the prompt).",
                           "prompt")
        return self._prepare(request, request.prompt, ids, chat=False)

    # -------------------------------------------------------------------------------- helpers
    def _chat_tail(self, messages: Sequence[Message]) -> list[int]:
        """Tokens of system + history + question, within the budget (oldest turns dropped first)."""
        tokenize, budget = self.engine.tokenize, self.settings.history_tokens
        system = "".join(f"{m.text.strip()}\n" for m in messages if m.role in ("system", "developer") and m.text.strip())
        turns = [f"{m.role}: {m.text.strip()}\n" for m in messages[:-1] if m.role in ("user", "assistant") and m.text.strip()]
        end = f"{INSTRUCTION}Query: {messages[-1].text.strip()}\nAnswer:"
        fixed = tokenize(AFTER_CONTEXT + system + end)
        if len(fixed) > budget:
            raise APIError(400, f"the system prompt and last user message are {len(fixed)} tokens; the server reads at "
                                f"most {budget} per request: shorten them.", "messages")
        kept: list[str] = []
        used = len(fixed)
        for turn in reversed(turns):  # newest first; stop at the first turn that does not fit
            cost = len(tokenize(turn))
            if used + cost > budget:
                break
            kept.insert(0, turn)
            used += cost
        return tokenize(AFTER_CONTEXT + system + "".join(kept) + end)

    def _prepare(self, request: ChatCompletionRequest | CompletionRequest, query: str | list[str], tail_ids: list[int],
                 chat: bool) -> Prepared:
        """``query``: what to retrieve with; a list: one retrieval each, merged by score."""
        settings = self.settings
        options = request.picaso
        method = (options.method if options and options.method else settings.method)
        top_k = options.top_k if options and options.top_k is not None else settings.top_k
        if request.is_task:  # a title or tags of the conversation: nothing to retrieve for it
            top_k = 0
        if top_k > settings.max_top_k:
            raise APIError(400, f"picaso.top_k is {top_k}; the server retrieves at most {settings.max_top_k}: lower it.",
                           "picaso.top_k")
        timings: dict[str, float] = {}
        start = time.perf_counter()
        if request.documents is not None:
            docs, sources = self._given(request.documents)
        elif top_k > 0:
            docs, sources = self._retrieve(query, top_k)
        else:
            docs, sources = [], []
        timings["retrieve_ms"] = (time.perf_counter() - start) * 1000
        figures: dict[str, Any] = {"method": method if docs else "none", "k": len(docs), "document_tokens": 0,
                                   "tokens_read": len(tail_ids),
                                   "retrieval_query": (query if isinstance(query, str) else query[-1])
                                   if request.documents is None and top_k > 0 else None}
        state: State | None = None
        if docs and method == "concat":  # the baseline: every document token is read
            text = PREFIX + "\n\n".join(d.text for d in docs)
            doc_ids = self.engine.tokenize(text)
            figures["document_tokens"] = len(doc_ids) - len(self.engine.tokenize(PREFIX))
            if figures["document_tokens"] > settings.max_concat_tokens:
                raise APIError(400, f"the documents are {figures['document_tokens']:,} tokens; concatenation reads at most "
                                    f"{settings.max_concat_tokens:,} per request: send fewer, or use a composition method.",
                               "picaso.method")
            tail_ids = doc_ids + tail_ids
            figures["tokens_read"] = len(tail_ids)
        elif docs:
            start = time.perf_counter()
            resolved = self.resolver.resolve(docs)
            states_ms = (time.perf_counter() - start) * 1000  # not returned: a cache hit is visibly faster
            logger.debug("states loaded or encoded in %.1f ms", states_ms)
            start = time.perf_counter()
            try:
                state = self.engine.compose(resolved.states, method=method, prefix=self.prefix_state, conv=settings.conv)
            except PicasoError as exc:
                raise APIError(400, str(exc), "picaso.method") from exc
            timings["compose_ms"] = (time.perf_counter() - start) * 1000
            figures["document_tokens"] = sum(s.n_tokens for s in resolved.states)
            # where the states came from (memory, store, encoded now) says whether *another* request used the
            # same text recently: an oracle on other users' documents. Logged for operators, never returned.
            logger.debug("states: %s", {k: resolved.stats[k] for k in ("states_cached", "states_loaded", "states_encoded")})
        elif not chat:
            pass
        else:  # no document: the question alone, without the context block
            tail_ids = tail_ids[len(self.engine.tokenize(AFTER_CONTEXT)):]
            figures["tokens_read"] = len(tail_ids)
        figures["timings_ms"] = {k: round(v, 3) for k, v in timings.items()}
        return Prepared(tail_ids, state, sources, figures)

    def _retrieve(self, query: str | list[str], top_k: int) -> tuple[list[DocumentRef], list[dict]]:
        retriever = self.index.as_retriever(similarity_top_k=top_k)
        nodes = best_of([retriever.retrieve(q) for q in ([query] if isinstance(query, str) else query)], top_k)
        docs, sources = [], []
        for scored in nodes:
            text = scored.node.get_content(metadata_mode=MetadataMode.LLM).strip()
            if not text:
                continue
            docs.append(DocumentRef.of(text, scored.node.node_id))
            sources.append({"id": scored.node.node_id, "score": None if scored.score is None else round(float(scored.score), 6),
                            "text": text})
        return docs, sources

    def _given(self, specs: list[DocumentSpec]) -> tuple[list[DocumentRef], list[dict]]:
        settings = self.settings
        if len(specs) > settings.max_documents:
            raise APIError(400, f"{len(specs)} documents given; at most {settings.max_documents} per request: send fewer.",
                           "documents")
        ids = [s.id for s in specs if s.id is not None]
        found: dict[str, Any] = {}
        if ids:
            found = {node.node_id: node for node in self.vector_store.get_nodes(node_ids=list(dict.fromkeys(ids)))}
        missing = [i for i in ids if i not in found]
        if missing:
            raise APIError(404, f"no document with id {missing[0]!r} in the collection; use the ids of the response's "
                                "picaso.sources or of your index.", "documents", code="document_not_found")
        if not settings.allow_adhoc_documents and any(s.text is not None for s in specs):
            raise APIError(400, "this server takes no ad hoc document texts (started with --no-adhoc-documents); send "
                                'documents of the index as {"id": ...}, or none.', "documents", code="adhoc_documents_disabled")
        adhoc_tokens = 0
        docs, sources = [], []
        for i, spec in enumerate(specs):
            if spec.id is not None:
                text = found[spec.id].get_content(metadata_mode=MetadataMode.LLM).strip()
                docs.append(DocumentRef.of(text, spec.id))
                sources.append({"id": spec.id, "score": None, "text": text})
            else:
                if len(spec.text) > settings.max_document_chars:
                    raise APIError(400, f"documents[{i}].text has {len(spec.text)} characters; at most "
                                        f"{settings.max_document_chars} per ad hoc text: split it or ingest it into the index.",
                                   f"documents.{i}.text")
                text = spec.text.strip()
                adhoc_tokens += len(self.engine.tokenizer.encode(text))  # counted before any is encoded
                if adhoc_tokens > settings.max_adhoc_tokens:
                    raise APIError(400, f"the ad hoc document texts reach {adhoc_tokens:,} tokens at documents[{i}]; at most "
                                        f"{settings.max_adhoc_tokens:,} per request: send less, or ingest them into the index.",
                                   f"documents.{i}.text")
                ref = DocumentRef.of(text, None)  # not stored: encoded once, then served from the bounded memory tier
                docs.append(ref)
                sources.append({"id": f"text:{ref.key}", "score": None, "text": text})
        return docs, sources
