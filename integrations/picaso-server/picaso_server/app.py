"""The OpenAI-compatible FastAPI app: /v1/models, /v1/chat/completions, /v1/completions, /health
(liveness), /health/details (the figures; the key when the server has one).

Every request: bounded body (refused before it is read), validated fields, RAG prepared in a
bounded thread pool (retrieve, load states, compose; requests with ad hoc texts in a pool of their
own, so that encoding them never delays the others' preparation), then one row of the continuous-batching
:class:`picaso_rag.scheduler.Scheduler`. Streams are SSE ``chat.completion.chunk`` events ending
with ``data: [DONE]``; a client that goes away cancels its row. Responses carry the extension
field ``picaso`` (sources, figures). docs/serving.md documents all of it.

Usage::

    rag = RagPipeline(engine, index, vector_store, settings, state_stores=[StateStore("./picaso_db/states")])
    app = create_app(rag, settings)     # settings = ServerSettings(model_name="picaso-mini")
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from openai.types import Completion, CompletionChoice, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from starlette.exceptions import HTTPException as StarletteHTTPException

from picaso_rag import PicasoError
from picaso_rag.scheduler import QueueFullError, Request as GenRequest, Scheduler

from .protocol import APIError, ChatCompletionRequest, CompletionRequest, validation_message
from .rag import Prepared, RagPipeline, ServerSettings

DISCONNECT_CHECK_S = 0.25  # a non-streamed request's client is checked this often (streams see it at their next write)
access_log = logging.getLogger("picaso_server.access")  # one line per answered request (serve --log-level info)
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop", "error": "stop"}


class BodyTooLarge(HTTPException):
    """Raised while a body is being read past the limit (FastAPI lets HTTPExceptions through its body parsing)."""


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes is answered 413 before it is read (by its
    Content-Length), or as soon as the bytes received pass the limit (chunked bodies)."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = APIError(413, f"the request body is larger than {self.limit} bytes; send less (long documents belong "
                              "in the index, ingested once).", code="body_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            too_long = length is not None and int(length) > self.limit
        except ValueError:
            too_long = True
        if too_long:
            return await JSONResponse(error.body(), status_code=413, headers={"connection": "close"})(scope, receive, send)
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(413, error.message)
            return message

        started = False

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracked_send)
        except BodyTooLarge:
            if not started:
                await JSONResponse(error.body(), status_code=413, headers={"connection": "close"})(scope, receive, send)


def key_matches(headers: dict[bytes, bytes], api_key: str) -> bool:
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class KeyCheck:
    """ASGI middleware: with an API key, every route but the liveness probe ``/health`` answers 401
    to a request without the key before its body is read or parsed (no validation details, no
    docs, no openapi.json for a client without the key)."""

    OPEN = ("/health",)

    def __init__(self, app: Any, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (scope["type"] == "http" and self.api_key is not None and scope.get("path") not in self.OPEN
                and not key_matches(dict(scope.get("headers") or []), self.api_key)):
            error = APIError(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>' with the key "
                                  "the server was started with.", code="invalid_api_key")
            return await JSONResponse(error.body(), status_code=401)(scope, receive, send)
        return await self.app(scope, receive, send)


class Server:
    """What the routes share: the pipeline, the scheduler, the bounded pool and the admission count."""

    def __init__(self, rag: RagPipeline, scheduler: Scheduler, settings: ServerSettings):
        self.rag, self.scheduler, self.settings = rag, scheduler, settings
        self.pool = ThreadPoolExecutor(max_workers=settings.prepare_threads, thread_name_prefix="picaso-prepare")
        # requests with ad hoc texts (encoded on first use: seconds each on a CPU) queue here, among themselves
        self.adhoc_pool = ThreadPoolExecutor(max_workers=settings.adhoc_threads, thread_name_prefix="picaso-adhoc")
        self.in_flight = 0
        self.max_in_flight = settings.max_queue + settings.max_batch
        self._lock = threading.Lock()
        self.served = 0

    def admit(self) -> None:
        with self._lock:
            if self.in_flight >= self.max_in_flight:
                raise APIError(503, f"the server is at capacity ({self.in_flight} requests in flight); retry in a "
                                    "moment.", code="queue_full", headers={"retry-after": "1"})
            self.in_flight += 1

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1
            self.served += 1


def create_app(rag: RagPipeline, settings: ServerSettings, scheduler: Scheduler | None = None) -> FastAPI:
    """The app over a prepared :class:`RagPipeline` (see :mod:`picaso_server.cli` for building one)."""
    own_scheduler = scheduler is None
    scheduler = scheduler or Scheduler(rag.engine, max_batch=settings.max_batch, max_queue=settings.max_queue,
                                       max_slot_tokens=settings.max_slot_tokens, max_kv_bytes=settings.max_kv_bytes,
                                       prefill_chunk_tokens=settings.prefill_chunk_tokens,
                                       max_read_tokens=settings.max_read_tokens)
    server = Server(rag, scheduler, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.pool.shutdown(wait=False, cancel_futures=True)
        server.adhoc_pool.shutdown(wait=False, cancel_futures=True)
        if own_scheduler:
            scheduler.close()

    # with a key, no interactive docs or schema: they would describe the server to anyone
    docs = {} if settings.api_key is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="picaso-rag", lifespan=lifespan, **docs)
    app.state.server = server
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(KeyCheck, api_key=settings.api_key)  # runs before the body limit and parsing
    if settings.allowed_origins:  # outermost: a browser's preflight carries no key, and a 401 needs the CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"], allow_credentials=False, max_age=600)

    # ---------------------------------------------------------------------------- errors
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc.errors())
        return JSONResponse(APIError(400, message, param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, BodyTooLarge):
            return JSONResponse(APIError(413, exc.detail, code="body_too_large").body(), status_code=413,
                                headers={"connection": "close"})
        hint = {404: "see GET /v1/models and docs/serving.md for the routes", 405: "check the HTTP method"}.get(exc.status_code, "")
        body = APIError(exc.status_code, f"{exc.detail}; {hint}".rstrip("; ")).body()
        return JSONResponse(body, status_code=exc.status_code)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        if not key_matches({k.encode("latin-1"): v.encode("latin-1") for k, v in request.headers.items()}, settings.api_key):
            raise APIError(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>' with the key "
                                "the server was started with (--api-key-file or $PICASO_API_KEY).", code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != settings.model_name:
            raise APIError(404, f"model {name!r} does not exist here; use {settings.model_name!r} (GET /v1/models).",
                           "model", code="model_not_found")

    # ---------------------------------------------------------------------------- routes
    # async: sync routes would run in anyio's thread pool (up to 40 threads)
    @app.get("/health")
    async def health() -> dict:
        """Liveness only: open to all, it says nothing about the model or other requests."""
        return {"status": "ok"}

    @app.get("/health/details")
    async def health_details(request: Request) -> dict:
        """For operators (the key, when the server has one): the model and the scheduler's figures."""
        authorize(request)
        cache = rag.resolver.cache.stats()
        return {"status": "ok", "model": settings.model_name, "fingerprint": rag.engine.fingerprint[:16],
                "method": settings.method, "scheduler": scheduler.stats(), "in_flight": server.in_flight,
                "state_cache": {"bytes": cache.device_bytes + cache.host_bytes, "entries": cache.device_entries +
                                cache.host_entries, "budget": cache.device_budget + cache.host_budget}}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        model = Model(id=settings.model_name, created=0, object="model", owned_by="picaso-rag")
        return {"object": "list", "data": [model.model_dump()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        authorize(request)
        check_model(body.model)
        return await respond(body, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        authorize(request)
        check_model(body.model)
        return await respond(body, request, chat=False)

    # ---------------------------------------------------------------------------- the work
    async def respond(body: ChatCompletionRequest | CompletionRequest, request: Request, chat: bool):
        max_tokens = (getattr(body, "max_completion_tokens", None) or body.max_tokens
                      or (settings.task_max_tokens if body.is_task else settings.default_max_tokens))
        if max_tokens > settings.max_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens}; this server generates at most {settings.max_tokens_limit}: "
                                "lower it.", "max_tokens")
        started = time.perf_counter()
        server.admit()
        loop = asyncio.get_running_loop()
        try:
            prepare = rag.prepare_chat if chat else rag.prepare_completion
            adhoc = any(d.text is not None for d in body.documents or ())
            prepared: Prepared = await loop.run_in_executor(server.adhoc_pool if adhoc else server.pool, prepare, body)
            events: asyncio.Queue = asyncio.Queue()

            def on_event(_: GenRequest, piece: str | None) -> None:  # worker thread -> event loop
                if piece is None:
                    server.release()
                loop.call_soon_threadsafe(events.put_nowait, piece)

            job = scheduler.submit(prepared.prompt_ids, prepared.state, on_event=on_event, max_new_tokens=max_tokens,
                                   temperature=body.temperature or 0.0, top_p=body.top_p or 1.0,
                                   stop=body.stops or list(settings.default_stop), seed=body.seed)
        except QueueFullError as exc:
            server.release()
            raise APIError(503, f"{exc}", code="queue_full", headers={"retry-after": "1"}) from exc
        except APIError:
            server.release()
            raise
        except (PicasoError, UnicodeError) as exc:
            server.release()
            raise APIError(400, f"{exc}" if isinstance(exc, PicasoError) else
                           "the text has characters that cannot be encoded (a lone surrogate?); send valid UTF-8.") from exc
        except BaseException:
            server.release()
            raise
        prepared.state = None  # the scheduler holds it until the prompt is read
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(job, events, prepared, ident, created, chat, include_usage, started),
                                     media_type="text/event-stream",
                                     headers={"cache-control": "no-cache", SOURCES_HEADER: sources_header(prepared)})
        try:
            checked = time.monotonic()
            while True:
                try:
                    piece = await asyncio.wait_for(events.get(), timeout=DISCONNECT_CHECK_S)
                except asyncio.TimeoutError:
                    piece = ""
                if piece is None:
                    break
                # every DISCONNECT_CHECK_S, whether tokens flow or not: a client that went away frees its row
                if time.monotonic() - checked >= DISCONNECT_CHECK_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        job.cancel()
                        return JSONResponse({}, status_code=499)
        except asyncio.CancelledError:
            job.cancel()
            raise
        if job.error is not None:
            raise APIError(500, f"generation failed: {job.error}")
        result = job.result
        figures = extension(prepared, job)
        log_request(chat, False, prepared, job, started)
        usage = CompletionUsage(prompt_tokens=len(prepared.prompt_ids), completion_tokens=len(result.token_ids),
                                total_tokens=len(prepared.prompt_ids) + len(result.token_ids))
        if chat:
            response = ChatCompletion(id=ident, created=created, model=settings.model_name, object="chat.completion",
                                      choices=[Choice(index=0, finish_reason=FINISH[result.finish_reason],
                                                      message=ChatCompletionMessage(role="assistant", content=reply(result.text)))],
                                      usage=usage)
        else:
            response = Completion(id=ident, created=created, model=settings.model_name, object="text_completion",
                                  choices=[CompletionChoice(index=0, text=result.text, finish_reason=FINISH[result.finish_reason])],
                                  usage=usage)
        return JSONResponse({**response.model_dump(exclude_none=True), "picaso": figures},
                            headers={SOURCES_HEADER: sources_header(prepared)})

    async def stream(job: GenRequest, events: asyncio.Queue, prepared: Prepared, ident: str, created: int, chat: bool,
                     include_usage: bool, started: float) -> AsyncIterator[str]:
        def chunk(delta: dict | None = None, finish: str | None = None, text: str | None = None, **extra) -> str:
            if chat:
                payload = ChatCompletionChunk(id=ident, created=created, model=settings.model_name, object="chat.completion.chunk",
                                              choices=[ChunkChoice(index=0, delta=ChoiceDelta(**(delta or {})), finish_reason=finish)]
                                              if delta is not None else []).model_dump(exclude_none=True)
                if delta is not None:
                    payload["choices"][0]["finish_reason"] = finish
            else:
                payload = Completion(id=ident, created=created, model=settings.model_name, object="text_completion",
                                     choices=[CompletionChoice(index=0, text=text or "", finish_reason=finish or "stop")]
                                     if text is not None else []).model_dump(exclude_none=True)
                if text is not None and finish is None:
                    payload["choices"][0]["finish_reason"] = None
            payload.update(extra)
            return f"data: {json.dumps(payload)}\n\n"

        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            started = not chat  # a chat reply starts at its first visible character, as reply() cuts it
            while True:
                piece = await events.get()
                if piece is None:
                    break
                if not started:
                    piece = reply(piece)
                    if not piece:
                        continue
                    started = True
                yield chunk({"content": piece}) if chat else chunk(text=piece)
            result = job.result
            if job.error is not None:
                yield f"data: {json.dumps(APIError(500, f'generation failed: {job.error}').body())}\n\n"
                return
            finish = FINISH[result.finish_reason]
            log_request(chat, True, prepared, job, started)
            yield (chunk({}, finish=finish, picaso=extension(prepared, job)) if chat
                   else chunk(text="", finish=finish, picaso=extension(prepared, job)))
            if include_usage:
                usage = CompletionUsage(prompt_tokens=len(prepared.prompt_ids), completion_tokens=len(result.token_ids),
                                        total_tokens=len(prepared.prompt_ids) + len(result.token_ids))
                yield chunk(None, usage=usage.model_dump())
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # a no-op once finished; frees the row when the client went away

    return app


def log_request(chat: bool, streamed: bool, prepared: Prepared, job: GenRequest, started: float) -> None:
    """One access-log line per answered request: route, sizes and time, never its text or sources."""
    result = job.result
    access_log.info("%s%s k=%d prompt_tokens=%d completion_tokens=%d finish=%s ms=%.0f",
                    "chat" if chat else "completion", " stream" if streamed else "", prepared.figures.get("k", 0),
                    len(prepared.prompt_ids), len(result.token_ids), FINISH[result.finish_reason],
                    (time.perf_counter() - started) * 1000)


SOURCES_HEADER = "x-picaso-sources"
MAX_SOURCES_HEADER = 4096


def sources_header(prepared: Prepared) -> str:
    """The request's sources (ids and scores, no texts) as JSON for a response header: clients that show
    headers but not extra body fields (LangChain's ChatOpenAI(include_response_headers=True) puts them
    in response_metadata["headers"]) still see what the answer was read from. ASCII; at most
    MAX_SOURCES_HEADER bytes (clients bound a response's headers), the first sources first."""
    listed: list[dict] = []
    for source in prepared.sources:
        entry = {"id": source["id"], "score": source["score"]}
        if len(json.dumps(listed + [entry], ensure_ascii=True)) > MAX_SOURCES_HEADER:
            break  # the body's picaso.sources has them all
        listed.append(entry)
    return json.dumps(listed, ensure_ascii=True)


def reply(text: str) -> str:
    """A chat reply without the whitespace the model writes after the template's "Answer:" (a chat
    front end would show it as blank lines). Completions keep their text as generated."""
    return text.lstrip()


def extension(prepared: Prepared, job: GenRequest) -> dict:
    """The ``picaso`` field: sources (ids, scores, texts) and figures (tokens read, documents, timings)."""
    t = job.timings
    figures = dict(prepared.figures)
    timings = dict(figures.pop("timings_ms", {}))
    if t.read is not None:
        timings["queue_and_read_ms"] = round((t.read - t.submitted) * 1000, 3)
    if t.finished is not None:
        timings["generate_ms"] = round((t.finished - t.submitted) * 1000, 3)
    return {"sources": prepared.sources, **figures, "new_tokens": len(job.result.token_ids) if job.result else 0,
            "finish_reason": job.result.finish_reason if job.result else None, "timings_ms": timings}
