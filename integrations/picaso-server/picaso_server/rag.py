"""From a request to (prompt tokens, composed state): retrieval, states, composition, the prompt.

The prompt the model reads is LlamaIndex's QA template with the documents replaced by their
composed states::

    [prefix: "Context information is below.\\n-----\\n"]  (a cached state)
    [the retrieved documents]                               (their stored states, composed)
    "\\n-----\\n" + system + history + "Given the context ... answer the query.\\nQuery: <q>\\nAnswer:"   (read)

Only the last part is read at request time. The conversation history is the client's (the OpenAI
protocol sends it with every request); the server keeps none, and bounds what it reads with
``history_tokens``: the oldest turns are dropped first.

Retrieval for a conversation: the last user message, condensed with the history when there is
one, i.e. the previous user message is prepended to it (a follow-up such as "When did she write
it?" carries its subject in the question before it). No LLM call rewrites the question: with a
small model that costs a generation and adds noise.

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
from typing import Any, Sequence

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
        question = messages[-1].text.strip()
        earlier_users = [m.text.strip() for m in messages[:-1] if m.role == "user" and m.text.strip()]
        query = f"{earlier_users[-1]}\n{question}" if earlier_users else question
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

    def _prepare(self, request: ChatCompletionRequest | CompletionRequest, query: str, tail_ids: list[int], chat: bool) -> Prepared:
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
                                   "tokens_read": len(tail_ids), "retrieval_query": query if request.documents is None and top_k > 0 else None}
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

    def _retrieve(self, query: str, top_k: int) -> tuple[list[DocumentRef], list[dict]]:
        nodes = self.index.as_retriever(similarity_top_k=top_k).retrieve(query)
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
