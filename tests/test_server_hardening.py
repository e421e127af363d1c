"""The server's own surfaces, attacked on 127.0.0.1 with the official `openai` client and raw sockets:
auth before anything, nothing revealed without the key, strict types, bounded connections, a client
that goes away freeing its row (streamed or not), bounded per-request costs, and a victim whose
answer is untouched while an attacker sends what once failed everyone's rows."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from picaso_rag.scheduler import Scheduler
from picaso_server import ServerSettings, create_app
from picaso_server.testing import ServerThread
from picaso_server import connections

from .test_server import MODEL, ask, world  # noqa: F401  (the module's server world: picaso-mini over Chroma)

pytestmark = pytest.mark.slow  # attacks a real server under load: not in `pytest -m "not slow"`

KEY = "hardening-key-456"


def client_without_keepalive(url: str, api_key: str, timeout: float) -> openai.OpenAI:
    """An openai client that opens a connection per request: with no retries, a pooled connection the
    server closed while it idled (keep-alive 5 s, between two tests) would fail the next request."""
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=timeout,
                         http_client=httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=timeout))


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
               "client": client_without_keepalive(url, KEY, 60)}
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
    authed = {"authorization": f"Bearer {KEY}"}
    for field, value in (("max_tokens", True), ("stream", "yes"), ("temperature", "0.5"), ("seed", 1.5), ("n", True),
                         ("max_tokens", "8"), ("stream", 1), ("top_p", True), ("max_completion_tokens", True),
                         ("stream_options", {"include_usage": "yes"})):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], field: value}
        reply = httpx.post(keyed["url"] + "/v1/chat/completions", json=body, headers=authed)
        assert reply.status_code == 400 and field in reply.json()["error"]["message"], (field, reply.text)
    for field, value in (("max_tokens", True), ("stream", "yes")):  # the completions route too
        reply = httpx.post(keyed["url"] + "/v1/completions", json={"model": MODEL, "prompt": "hi", field: value}, headers=authed)
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
            client = client_without_keepalive(url, "x", 60)
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


# ------------------------------------------------------------------------------------------------
# A victim's longest gap between tokens while an attacker sends each of the requests that once
# stalled everyone (issue 24, item 2), within today's bounds: the bound stated in docs/serving.md,
# one read of at most prefill_chunk_tokens (512) tokens plus one decode step, checked against the
# costs measured in this run (times SLACK: two cores shared with the test's own clients).

SLACK = 3.0
VICTIM = "Tell me everything about rivers"
VICTIM_TOKENS = 1024  # the server's max_tokens_limit: the victim hangs up once the attack is over, so this
# only has to outlast the slowest attack on a loaded 2-core machine, not be decoded in full


@pytest.fixture(scope="module")
def gapped(world):  # noqa: F811
    """The server as `picaso-rag serve` builds it (its own scheduler: chunked prefill, joins of at most
    512 padded tokens, ad hoc texts prepared in their own pool), the victim's answer alone, and the
    measured cost of one 512-token read from a state of 8,704 keys (the longest an attack below holds)."""
    # PICASO_TEST_PREFILL_CHUNK=1000000 disables chunking: test_a_victims_longest_gap... must then fail (concat)
    settings = ServerSettings(model_name=MODEL, max_batch=8, max_queue=16, default_max_tokens=8, max_tokens_limit=1024,
                              prefill_chunk_tokens=int(os.environ.get("PICASO_TEST_PREFILL_CHUNK", 512)),
                              max_read_tokens=512, max_adhoc_tokens=8192)
    world["rag"].settings = settings
    app = create_app(world["rag"], settings)
    engine = world["engine"]
    try:
        with ServerThread(app) as url:
            client = client_without_keepalive(url, "x", 120)
            alone = ask(client, VICTIM, max_tokens=VICTIM_TOKENS)
            assert alone.choices[0].finish_reason == "length"  # long enough to outlast every attack
            base = engine.encode([" ".join(["The river carries sediment to the sea."] * 30)])[0]
            reps = -(-8704 // base.n_tokens)
            keys = base.keys.repeat(1, 1, reps, 1)[:, :, :8704].contiguous()
            values = base.values.repeat(1, 1, reps, 1)[:, :, :8704].contiguous()
            long_state = dataclasses.replace(base, keys=keys, values=values, n_tokens=8704, position=8704)
            chunk = (engine.tokenize("The river carries sediment to the sea. " * 80))[:512]
            costs = []
            for _ in range(3):
                start = time.perf_counter()
                engine.read_state(chunk, long_state)
                costs.append(time.perf_counter() - start)
            yield {"url": url, "client": client, "app": app, "alone": alone.choices[0].message.content,
                   "chunk_s": max(costs), "scheduler": app.state.server.scheduler}
    finally:
        world["rag"].settings = world["settings"]


def _victim_under(gapped, attack) -> dict:
    """Stream the victim; once it decodes, run ``attack()`` (blocking until every attacker is answered);
    the victim hangs up after its first token past the attack. Returns the victim's token times, its
    text and the attack's span."""
    client, times, text, finish = gapped["client"], [], [], []
    attack_over, ended_at = threading.Event(), [float("inf")]

    def victim():
        stream = ask(client, VICTIM, max_tokens=VICTIM_TOKENS, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                times.append(time.perf_counter())
                text.append(chunk.choices[0].delta.content)
            if chunk.choices and chunk.choices[0].finish_reason:
                finish.append(chunk.choices[0].finish_reason)
            if attack_over.is_set() and times and times[-1] > ended_at[0]:
                stream.close()  # the gap past the attack is measured: no need to decode the rest
                break

    thread = threading.Thread(target=victim)
    thread.start()
    deadline = time.monotonic() + 60
    while len(times) < 20 and time.monotonic() < deadline:  # decoding steadily
        time.sleep(0.01)
    step_s = float(np.median(np.diff(times[:20])))
    began = time.perf_counter()
    outcome = attack()
    ended = ended_at[0] = time.perf_counter()
    attack_over.set()
    thread.join(120)
    during = [t for t in times if t >= began]
    gaps = np.diff([max(t for t in times if t < began)] + [t for t in during if t <= ended] + [min(t for t in during if t > ended)]) \
        if any(t > ended for t in during) else None
    return {"times": times, "text": "".join(text), "finish": finish, "began": began, "ended": ended, "step_s": step_s,
            "gaps": gaps, "outcome": outcome}


def _check_victim(gapped, run: dict, what: str) -> None:
    assert run["gaps"] is not None, f"the victim finished before the attack ({what}) did: raise VICTIM_TOKENS"
    bound = SLACK * (gapped["chunk_s"] + run["step_s"])
    longest = float(run["gaps"].max())
    print(f"{what}: longest gap {longest:.3f} s over {len(run['gaps'])} gaps; bound {bound:.3f} s (chunk "
          f"{gapped['chunk_s']:.3f} s, step {run['step_s']:.3f} s); attack {run['ended'] - run['began']:.2f} s")
    assert longest <= bound, (f"{what}: the victim waited {longest:.2f} s between two tokens; bound {bound:.2f} s = "
                              f"{SLACK} x (one 512-token read {gapped['chunk_s']:.3f} s + one decode step {run['step_s']:.3f} s)")
    # untouched: what the victim read is its answer alone, up to where it hung up
    assert run["finish"] in ([], ["length"]) and len(run["text"]) > 0 and gapped["alone"].startswith(run["text"])


def _in_threads(*calls) -> list:
    results: list = [None] * len(calls)

    def one(i, call):
        try:
            results[i] = call()
        except Exception as exc:  # the attackers' own errors are results too
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return results


def test_a_victims_longest_gap_is_bounded_under_a_long_concat_prompt(gapped):
    client = gapped["client"]
    chunks_before = gapped["scheduler"].prefill_chunks
    documents = [{"text": f"{i} " + "\U0001F600" * 1000} for i in range(2)]  # 2 x 4,000 tokens, read as tokens

    def attack():
        return ask(client, "what?", max_tokens=2, extra_body={"documents": documents, "picaso": {"method": "concat"}})

    run = _victim_under(gapped, attack)
    reply = run["outcome"]
    assert reply.model_extra["picaso"]["tokens_read"] > 8000  # the whole prompt was read: 15 chunks and a join
    assert gapped["scheduler"].prefill_chunks - chunks_before >= 15 or gapped["scheduler"].prefill_chunk_tokens > 8192
    _check_victim(gapped, run, "a concatenation of 8,000 document tokens")


def test_a_victims_longest_gap_is_bounded_under_two_huge_adhoc_texts(gapped):
    """Two texts of 2,000 tokens each (encoded in the ad hoc pool while the victim decodes), and the
    issue's 32,000 emoji (128,000 tokens: refused before any work); a second victim arriving during
    the encodings, without ad hoc texts, is answered before either attacker: it never queues behind them."""
    client = gapped["client"]
    huge = "\U0001F600" * 32_000
    late: dict = {}

    def attacker(i):
        reply = ask(client, "what?", max_tokens=1, extra_body={"documents": [{"text": f"{i} " + "\U0001F600" * 500}]})
        return reply, time.perf_counter()

    def late_victim():
        time.sleep(0.3)  # the encodings have begun
        reply = ask(client, "Who was Ada Lovelace?", max_tokens=2)
        late["done"] = time.perf_counter()
        return reply

    def attack():
        return _in_threads(lambda: attacker(0), lambda: attacker(1), late_victim,
                           lambda: ask(client, "what?", extra_body={"documents": [{"text": huge}]}))

    run = _victim_under(gapped, attack)
    (a0, t0), (a1, t1), late_reply, refused = run["outcome"]
    assert isinstance(refused, openai.BadRequestError) and "ad hoc document texts reach" in str(refused)
    assert a0.model_extra["picaso"]["document_tokens"] > 1900 and a1.model_extra["picaso"]["document_tokens"] > 1900
    assert late_reply.choices[0].message.content is not None and late["done"] < min(t0, t1), \
        (late["done"] - run["began"], t0 - run["began"], t1 - run["began"])
    _check_victim(gapped, run, "two ad hoc texts of 2,000 tokens")


def test_a_victims_longest_gap_is_bounded_under_long_stop_strings(gapped):
    """Four attackers with four 256-character stop strings each (the bound: each is checked every
    token), and one with the issue's 130,000-character stop string (400 before any work)."""
    client = gapped["client"]
    stops = [c * 256 for c in "wxyz"]

    def attack():
        return _in_threads(*[lambda: ask(client, "Tell me about honey bees", max_tokens=60, stop=stops)] * 4,
                           lambda: ask(client, "what?", stop=["x" * 130_000]))

    run = _victim_under(gapped, attack)
    *answers, refused = run["outcome"]
    assert all(a.choices[0].finish_reason in ("length", "stop") for a in answers), answers
    assert isinstance(refused, openai.BadRequestError) and "256 characters" in str(refused)
    _check_victim(gapped, run, "four attackers with 4 x 256-character stop strings")


def test_cors_for_the_allowed_origins_only_and_the_key_still_required(world):  # noqa: F811
    """--allowed-origins: a browser front end's preflight (no key) is answered; the API call itself
    still needs the key; an origin not listed gets no CORS headers."""
    settings = ServerSettings(model_name=MODEL, api_key=KEY, allowed_origins=("http://localhost:3000",))
    scheduler = Scheduler(world["engine"], max_batch=2)
    with ServerThread(create_app(world["rag"], settings, scheduler=scheduler)) as url:
        preflight = {"origin": "http://localhost:3000", "access-control-request-method": "POST",
                     "access-control-request-headers": "authorization, content-type"}
        ok = httpx.options(url + "/v1/chat/completions", headers=preflight)
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://localhost:3000"
        other = httpx.options(url + "/v1/chat/completions", headers={**preflight, "origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Who was Ada Lovelace?"}], "max_tokens": 2}
        denied = httpx.post(url + "/v1/chat/completions", json=body, headers={"origin": "http://localhost:3000"})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "http://localhost:3000"
        answered = httpx.post(url + "/v1/chat/completions", json=body, timeout=60,
                              headers={"origin": "http://localhost:3000", "authorization": f"Bearer {KEY}"})
        assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == "http://localhost:3000"
    scheduler.close()
