"""The server's own surfaces, attacked on 127.0.0.1 with the official `openai` client and raw sockets:
auth before anything, nothing revealed without the key, strict types, bounded connections, a client
that goes away freeing its row (streamed or not), bounded per-request costs, and a victim whose
answer is untouched while an attacker sends what once failed everyone's rows."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest

from picaso_rag.scheduler import Scheduler
from picaso_server import ServerSettings, ServerThread, create_app
from picaso_server import connections

from .test_server import MODEL, ask, world  # noqa: F401  (the module's server world: picaso-mini over Chroma)

KEY = "hardening-key-456"


@pytest.fixture(scope="module")
def keyed(world):  # noqa: F811
    """A second app over the same pipeline, with an API key and small per-request bounds."""
    settings = ServerSettings(model_name=MODEL, api_key=KEY, max_batch=4, max_queue=8, default_max_tokens=8,
                              max_adhoc_tokens=64, max_concat_tokens=20)
    scheduler = Scheduler(world["engine"], max_batch=4, max_queue=8)
    world["rag"].settings = settings  # the pipeline reads its bounds from here (restored below)
    app = create_app(world["rag"], settings, scheduler=scheduler)
    with ServerThread(app) as url:
        yield {"url": url, "app": app, "scheduler": scheduler,
               "client": openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)}
    scheduler.close()
    world["rag"].settings = world["settings"]


def raw(url: str, request: bytes, timeout: float = 10) -> str:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        return s.recv(65536).decode(errors="replace")


def test_with_a_key_every_route_but_liveness_needs_it_and_is_checked_before_the_body(keyed):
    url = keyed["url"]
    for method, path in (("GET", "/v1/models"), ("GET", "/health/details"), ("GET", "/docs"), ("GET", "/openapi.json"),
                         ("GET", "/redoc"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")):
        reply = httpx.request(method, url + path, content=b"{not json", headers={"content-type": "application/json"})
        assert reply.status_code == 401, (path, reply.status_code)  # not 400: the body is never parsed
        assert "Bearer" in reply.json()["error"]["message"]
    assert httpx.get(url + "/health").json() == {"status": "ok"}  # liveness reveals nothing
    authed = {"authorization": f"Bearer {KEY}"}
    assert httpx.get(url + "/health/details", headers=authed).json()["scheduler"]["max_batch"] == 4
    assert httpx.get(url + "/openapi.json", headers=authed).status_code == 404  # no schema served with a key


def test_strict_types_are_400s(keyed):
    for field, value in (("max_tokens", True), ("stream", "yes"), ("temperature", "0.5"), ("seed", 1.5), ("n", True)):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], field: value}
        reply = httpx.post(keyed["url"] + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"})
        assert reply.status_code == 400 and field in reply.json()["error"]["message"], (field, reply.text)


def test_per_request_costs_are_bounded_before_work_starts(keyed):
    client = keyed["client"]
    emoji = "\U0001F600" * 40  # 40 characters, far more tokens than the 64 allowed
    with pytest.raises(openai.BadRequestError, match="ad hoc document texts reach"):
        ask(client, "what?", extra_body={"documents": [{"text": emoji}]})
    with pytest.raises(openai.BadRequestError, match="concatenation reads at most 20 "):
        ask(client, "Who was Ada Lovelace?", extra_body={"picaso": {"method": "concat", "top_k": 3}})
    with pytest.raises(openai.BadRequestError, match="256 characters"):
        ask(client, "what?", stop=["x" * 257])


def test_adhoc_documents_can_be_refused(world):  # noqa: F811
    settings = ServerSettings(model_name=MODEL, allow_adhoc_documents=False, default_max_tokens=4)
    world["rag"].settings = settings
    scheduler = Scheduler(world["engine"], max_batch=2)
    try:
        with ServerThread(create_app(world["rag"], settings, scheduler=scheduler)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
            with pytest.raises(openai.BadRequestError, match="no ad hoc document texts"):
                ask(client, "what?", extra_body={"documents": [{"text": "a text of my own"}]})
            assert ask(client, "Who was Ada Lovelace?", max_tokens=2).choices[0].message.content is not None
    finally:
        scheduler.close()
        world["rag"].settings = world["settings"]


def test_extreme_sampling_values_leave_another_client_whole(keyed):
    client = keyed["client"]
    question = "Who deciphered Egyptian hieroglyphs?"
    expected = ask(client, question, max_tokens=12).choices[0].message.content
    streams = [ask(client, "Tell me about rivers", max_tokens=24, stream=True, temperature=t, top_p=p)
               for t, p in ((1e-300, 1.0), (0.7, 1e-300))]
    victim = ask(client, question, max_tokens=12)
    for stream in streams:
        assert [c for c in stream]  # the attackers' own streams complete too
    assert victim.choices[0].message.content == expected


def test_half_open_connections_are_closed_and_headers_are_bounded(keyed, monkeypatch):
    monkeypatch.setattr(connections.BoundedH11Protocol, "header_timeout_s", 1.0)
    host, port = keyed["url"].removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(3)]
    idle[1].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    time.sleep(1.5)
    for s in idle:  # closed by the server: a read returns EOF
        assert s.recv(1024) == b""
        s.close()
    big = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (connections.MAX_HEADER_BYTES + 10) + b"\r\n\r\n"
    assert raw(keyed["url"], big).split(" ")[1] in ("400", "431")
    assert httpx.get(keyed["url"] + "/health").json() == {"status": "ok"}


def test_a_non_streamed_request_whose_client_leaves_is_cancelled(keyed):
    scheduler = keyed["scheduler"]
    before = scheduler.finished["cancelled"]
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Tell me everything about rivers"}],
                       "max_tokens": 1000}).encode()
    host, port = keyed["url"].removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.monotonic() + 30
    while scheduler.stats()["active"] == 0 and time.monotonic() < deadline:  # decoding
        time.sleep(0.02)
    s.close()
    left = time.monotonic()
    while scheduler.finished["cancelled"] == before and time.monotonic() < left + 10:
        time.sleep(0.02)
    assert scheduler.finished["cancelled"] == before + 1 and time.monotonic() - left < 3
    assert scheduler.stats()["active"] == 0
