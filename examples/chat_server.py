"""A chatbot backend (FastAPI + uvicorn) over the quickstart's index, answering from composed states.

    python examples/chat_server.py [--model DIR] [--db ./picaso_db] [--host 127.0.0.1] [--port 8000]

Endpoints, all on one engine (one model in memory, one state store, one Chroma collection):
    GET  /health                     model, fingerprint, documents, states stored
    POST /chat         {"message", "session_id"?}   -> {"answer", "sources", "picaso"}
    POST /chat/stream  {"message", "session_id"?}   -> text/event-stream: "data: {"delta": ...}" events,
                                                       then "event: done" with sources and figures
    DELETE /sessions/{session_id}    forget a conversation

Each session is a LlamaIndex condense_plus_context chat engine (its own memory) sharing the LLM:
follow-up questions are rewritten with the history, documents are retrieved from Chroma and their
states composed, so no document token is read at answer time.

    curl -s localhost:8000/health
    curl -N localhost:8000/chat/stream -H 'content-type: application/json' -d '{"message": "Who was Ada Lovelace?"}'
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, AsyncIterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rag_demo import load_embed_model, load_engine, open_index, open_state_store  # noqa: E402

from fastapi import FastAPI, HTTPException  # noqa: E402
from fastapi.responses import StreamingResponse  # noqa: E402
from llama_index.core.base.llms.generic_utils import messages_to_prompt as generic_messages_to_prompt
from llama_index.llms.picaso import PicasoLLM, PicasoNodePostprocessor  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

MAX_SESSIONS = 256


class ChatRequest(BaseModel):
    message: str = Field(min_length=1, max_length=8000)
    session_id: str = Field(default="default", min_length=1, max_length=128)


def _sources(response: Any) -> list[dict]:
    return [{"node_id": s.node.node_id, "score": s.score, "text": s.node.get_content()} for s in response.source_nodes]


def _figures(response: Any) -> dict:
    """The response's PICASO figures without the per-call details (texts read)."""
    meta = dict((response.metadata or {}).get("picaso", {}))
    meta.pop("calls", None)
    return meta


def chat_prompt(messages) -> str:
    """LlamaIndex's generic chat format without its trailing space ("assistant: "): byte-level BPE
    attaches that space to the next word, so a trained model reads a lone space as "more spaces
    follow" and answers with spaces only (measured with picaso-mini)."""
    return generic_messages_to_prompt(messages).rstrip(" ")


def create_app(model: str | None = None, db: str | Path = "picaso_db", method: str = "picaso-s", k: int = 3,
               max_new_tokens: int = 64, device: str = "cpu") -> FastAPI:
    """Build the engine, the index (ingesting the corpus on first use) and the app.

    Usage: ``uvicorn.run(create_app(db="./picaso_db"))``; in tests, ``TestClient(create_app(db=tmp))``.
    """
    engine, description = load_engine(model, device=device)
    llm = PicasoLLM(engine=engine, state_store=open_state_store(db), max_new_tokens=max_new_tokens, stop=["\n"],
                    messages_to_prompt=chat_prompt)
    index, _ = open_index(db, llm, load_embed_model(), show_progress=False)
    composer = PicasoNodePostprocessor(llm, method=method)
    sessions: OrderedDict[str, Any] = OrderedDict()
    lock = threading.Lock()

    def session(session_id: str):
        with lock:
            chat = sessions.get(session_id)
            if chat is None:
                chat = index.as_chat_engine(chat_mode="condense_plus_context", llm=llm, similarity_top_k=k,
                                            node_postprocessors=[composer])
                sessions[session_id] = chat
                while len(sessions) > MAX_SESSIONS:  # forget the least recently used conversation
                    sessions.popitem(last=False)
            sessions.move_to_end(session_id)
            return chat

    app = FastAPI(title="picaso-rag chat", description=description)
    app.state.llm, app.state.index = llm, index

    @app.get("/health")
    def health() -> dict:
        store = llm.state_store
        return {"status": "ok", "model": description, "fingerprint": engine.fingerprint[:16], "method": method,
                "documents": index.vector_store.client.count(),
                "states": sum(1 for _ in store.node_ids(engine.fingerprint)), "sessions": len(sessions)}

    @app.post("/chat")
    async def chat(request: ChatRequest) -> dict:
        response = await session(request.session_id).achat(request.message)
        return {"answer": response.response, "sources": _sources(response), "picaso": _figures(response)}

    @app.post("/chat/stream")
    async def chat_stream(request: ChatRequest) -> StreamingResponse:
        response = await session(request.session_id).astream_chat(request.message)

        async def events() -> AsyncIterator[str]:
            streamed = ""
            async for delta in response.async_response_gen():
                if not streamed:  # the final answer is stripped: do not stream its leading whitespace
                    delta = delta.lstrip()
                streamed += delta
                if delta:
                    yield f"data: {json.dumps({'delta': delta})}\n\n"
            done = {"answer": response.response, "sources": _sources(response), "picaso": _figures(response)}
            yield f"event: done\ndata: {json.dumps(done)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.delete("/sessions/{session_id}")
    def forget(session_id: str) -> dict:
        with lock:
            if sessions.pop(session_id, None) is None:
                raise HTTPException(status_code=404, detail=f"no session {session_id!r}")
        return {"forgotten": session_id}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory or hub id; 'random' for the tiny random model")
    parser.add_argument("--db", default="picaso_db")
    parser.add_argument("--method", default="picaso-s", choices=["picaso-s", "picaso-r", "caso", "soup", "concat"])
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)

    import uvicorn

    app = create_app(args.model, db=args.db, method=args.method, k=args.k, device=args.device)
    print(app.description)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
