"""The OpenAI-compatible server (integrations/picaso-server) on 127.0.0.1, driven by the official
`openai` client: picaso-mini (or the tiny random model when it is not shipped), a real Chroma
index of the example corpus, stored states, the continuous-batching scheduler."""

from __future__ import annotations

import json
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from .llamaindex_world import REPO

sys.path.insert(0, str(REPO / "examples"))

from rag_demo import load_engine, open_index, open_state_store  # noqa: E402

from llama_index.llms.picaso import PicasoLLM  # noqa: E402
from picaso_rag.scheduler import Scheduler  # noqa: E402
from picaso_server import RagPipeline, ServerSettings, create_app, load_embed_model  # noqa: E402
from picaso_server.testing import ServerThread  # noqa: E402
from picaso_server.rag import AFTER_CONTEXT, INSTRUCTION, PREFIX  # noqa: E402

MODEL = "picaso-mini"
KEY = "test-key-123"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    engine, _ = load_engine(None)
    db = tmp_path_factory.mktemp("server") / "picaso_db"
    llm = PicasoLLM(engine=engine, state_store=open_state_store(db))
    embed = load_embed_model()
    index, _ = open_index(db, llm, embed, show_progress=False)
    settings = ServerSettings(model_name=MODEL, default_max_tokens=12, max_tokens_limit=256, history_tokens=200,
                              max_body_bytes=64 * 1024, max_batch=8, max_queue=32)
    rag = RagPipeline(engine, index, index.vector_store, settings, state_stores=[llm.state_store])
    scheduler = Scheduler(engine, max_batch=8, max_queue=32)
    app = create_app(rag, settings, scheduler=scheduler)
    with ServerThread(app) as url:
        yield {"url": url, "rag": rag, "engine": engine, "settings": settings, "scheduler": scheduler}
    scheduler.close()


@pytest.fixture(scope="module")
def client(world):
    return openai.OpenAI(base_url=world["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client, text, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], **kw)


def test_the_server_stands_on_picaso_rag_not_on_the_llamaindex_adapter():
    """The server's modules import picaso_rag and a retriever, never the LlamaIndex LLM package."""
    import subprocess
    import sys

    code = ("import sys, picaso_server, picaso_server.app, picaso_server.cli, picaso_server.ray_serve, picaso_server.rag; "
            "print(sorted(m for m in sys.modules if m.startswith('llama_index.llms.picaso')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_prompt_is_llamaindexs_qa_template():
    """What the server reads around the composed documents is LlamaIndex's default QA prompt, so a
    question asked here and through a LlamaIndex query engine reads the same text."""
    from llama_index.core.prompts.default_prompts import DEFAULT_TEXT_QA_PROMPT_TMPL

    ours = PREFIX + "{context_str}" + AFTER_CONTEXT + INSTRUCTION + "Query: {query_str}\nAnswer: "
    assert ours == DEFAULT_TEXT_QA_PROMPT_TMPL


def test_a_chat_reply_starts_with_its_text_not_the_blank_lines_after_the_template(world, client):
    """After the template's "Answer:" the shipped model writes whitespace first; a chat front end would
    show blank lines. The reply (plain and streamed) starts at the first visible character."""
    engine, rag = world["engine"], world["rag"]
    question = "Who was Ada Lovelace?"
    from picaso_server.protocol import ChatCompletionRequest

    prepared = rag.prepare_chat(ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": question}]))
    raw = engine.generate(prepared.prompt_ids, state=prepared.state, max_new_tokens=10).text
    assert raw != raw.lstrip()  # what the model writes (the case this test is about)
    plain = ask(client, question, max_tokens=10).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(client, question, max_tokens=10, stream=True) if c.choices)
    assert plain == streamed == raw.lstrip() and plain


def test_models_and_health(world, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(world["url"] + "/health/details").json()
    assert health["status"] == "ok" and health["scheduler"]["max_batch"] == 8


def test_chat_plain_and_streamed_agree(client):
    plain = ask(client, "Who was Ada Lovelace?", max_tokens=10)
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.usage.completion_tokens <= 10
    picaso = plain.model_extra["picaso"]
    assert picaso["method"] == "picaso-s" and picaso["k"] == 3 and picaso["document_tokens"] > 0
    assert any("Lovelace" in s["text"] for s in picaso["sources"]) and all(s["id"] and s["score"] is not None for s in picaso["sources"])
    assert 0 < picaso["tokens_read"] == plain.usage.prompt_tokens < picaso["document_tokens"]  # documents are not read

    chunks = list(ask(client, "Who was Ada Lovelace?", max_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content  # greedy: the same answer
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].model_extra["picaso"]["sources"] == picaso["sources"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_stream_ends_with_done(world):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about honey bees"}], "stream": True, "max_tokens": 4}
    with httpx.stream("POST", world["url"] + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [e for e in response.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_a_conversation_keeps_its_subject_over_follow_ups_and_can_change_it(client):
    """Three follow-ups without a subject still retrieve the first turn's (the rule before kept only the
    previous user message: the subject was gone at the third turn); a new question changes it."""
    turns = ["Who was Ada Lovelace?", "Why is that?", "Can you tell me more?", "Where was it?"]
    messages = []
    for turn in turns:
        messages += [{"role": "user", "content": turn}]
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        assert "Ada Lovelace" in reply.model_extra["picaso"]["sources"][0]["text"], turn
        messages += [{"role": "assistant", "content": reply.choices[0].message.content}]
    messages += [{"role": "user", "content": "Where is the Great Barrier Reef?"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert "Great Barrier Reef" in reply.model_extra["picaso"]["sources"][0]["text"]


def test_completions_endpoint(client):
    done = client.completions.create(model=MODEL, prompt="The Eiffel Tower", max_tokens=6)
    assert done.object == "text_completion" and done.usage.completion_tokens <= 6
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=MODEL, prompt="The Eiffel Tower",
                                                                            max_tokens=6, stream=True) if c.choices)
    assert streamed == done.choices[0].text


def test_multi_turn_condenses_and_bounds_history(client, world):
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Who was Ada Lovelace?"}, {"role": "assistant", "content": "A mathematician."},
                {"role": "user", "content": "When did she write it?"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
    picaso = reply.model_extra["picaso"]
    assert picaso["retrieval_query"] == "Who was Ada Lovelace?\nWhen did she write it?"
    assert any("Lovelace" in s["text"] for s in picaso["sources"])
    # 60 turns of history: the tokens read stay within the budget (oldest turns dropped)
    long = [m for i in range(30) for m in ({"role": "user", "content": f"Question {i} about rivers and deltas?"},
                                           {"role": "assistant", "content": f"Answer {i}: sediment builds deltas."})]
    reply = client.chat.completions.create(model=MODEL, messages=long + [{"role": "user", "content": "And bees?"}], max_tokens=4)
    assert reply.usage.prompt_tokens <= world["settings"].history_tokens


def test_documents_by_id_and_by_text(client, world):
    first = ask(client, "Where does photosynthesis take place?", max_tokens=4).model_extra["picaso"]["sources"]
    chosen = [first[1]["id"], first[0]["id"]]
    by_id = ask(client, "Where does photosynthesis take place?", max_tokens=8, extra_body={"documents": [{"id": i} for i in chosen]})
    assert [s["id"] for s in by_id.model_extra["picaso"]["sources"]] == chosen

    secret = "The vault code of Zorblat station is 4471, kept by the archivist Mira Quell."
    by_text = ask(client, "What is the vault code?", max_tokens=8, extra_body={"documents": [{"text": secret}]})
    picaso = by_text.model_extra["picaso"]
    assert [s["text"] for s in picaso["sources"]] == [secret] and picaso["k"] == 1
    # the answer is the engine's, read from exactly that composed state
    engine, rag = world["engine"], world["rag"]
    state = engine.compose(engine.encode([secret]), prefix=rag.prefix_state)
    tail = rag._chat_tail(_messages("What is the vault code?"))
    raw = engine.generate(tail, state=state, max_new_tokens=8).text
    assert by_text.choices[0].message.content == raw.lstrip()  # the chat reply starts at its first visible character
    hits = rag.resolver.cache.stats().device_hits
    again = ask(client, "What is the vault code?", max_tokens=8, extra_body={"documents": [{"text": secret}]})
    assert rag.resolver.cache.stats().device_hits > hits  # encoded once, then cached
    # ...but nothing in a response says so: another client cannot confirm a guess of someone's text
    assert "states" not in again.model_extra["picaso"] and "states_ms" not in again.model_extra["picaso"]["timings_ms"]
    assert {k: v for k, v in again.model_extra["picaso"].items() if k != "timings_ms"} == \
        {k: v for k, v in picaso.items() if k != "timings_ms"}


def _messages(text):
    from picaso_server.protocol import Message

    return [Message(role="user", content=text)]


def test_concurrent_requests_each_from_their_own_documents(client):
    """8 clients at once, each with its own private document: each answer's sources are its own,
    and each answer equals the one the same request gets alone."""
    secrets = [f"Account {1000 + i} belongs to client number {i}; its balance is {i * 37} crowns." for i in range(8)]

    def one(i):
        r = ask(client, f"What is the balance of account {1000 + i}?", max_tokens=6, extra_body={"documents": [{"text": secrets[i]}]})
        return r.model_extra["picaso"]["sources"], r.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, range(8)))
    for i, (sources, _) in enumerate(together):
        assert [s["text"] for s in sources] == [secrets[i]]
    alone = [one(i)[1] for i in (0, 7)]
    assert alone == [together[i][1] for i in (0, 7)]


def test_errors_in_openai_format(client, world):
    url = world["url"]
    bad = [dict(temperature=5), dict(top_p=0), dict(n=2), dict(max_tokens=100_000), dict(stop=[""]),
           dict(seed=2**70), dict(extra_body={"documents": [{"id": "x", "text": "y"}]}),
           dict(extra_body={"picaso": {"method": "magic"}}), dict(extra_body={"picaso": {"top_k": 10_000}})]
    for kwargs in bad:
        with pytest.raises(openai.BadRequestError) as caught:
            ask(client, "hi", **kwargs)
        error = caught.value.body
        assert caught.value.status_code == 400 and error["type"] == "invalid_request_error" and error["message"], kwargs
    with pytest.raises(openai.BadRequestError, match="last message must be a non-empty user message"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "assistant", "content": "hello"}])
    with pytest.raises(openai.NotFoundError, match="GET /v1/models"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError, match="no document with id"):
        ask(client, "hi", extra_body={"documents": [{"id": "no-such-node"}]})
    surrogate = b'{"model": "picaso-mini", "messages": [{"role": "user", "content": "a \\ud800 b"}]}'
    raw = httpx.post(url + "/v1/chat/completions", content=surrogate, headers={"content-type": "application/json"})
    assert raw.status_code == 400 and "lone surrogate" in raw.json()["error"]["message"]
    raw = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    big = httpx.post(url + "/v1/chat/completions", content=b"x" * (world["settings"].max_body_bytes + 1))
    assert big.status_code == 413 and "larger than" in big.json()["error"]["message"]
    chunked = httpx.post(url + "/v1/chat/completions", content=(b"x" * 8192 for _ in range(64)))  # no Content-Length
    assert chunked.status_code == 413 and "larger than" in chunked.json()["error"]["message"]


def test_huge_body_refused_before_it_is_read(world):
    """A client announcing 300 MB gets 413 at once, without sending (or the server reading) the body."""
    host, port = world["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: 314572800\r\n\r\n{\"model\":")
        start = time.monotonic()
        reply = s.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 413") and time.monotonic() - start < 5


def test_api_key_and_queue_full_and_cancellation(world):
    """401 without the key; 503 when every slot and the queue are taken; a client that goes away
    mid-stream frees its slot."""
    settings = ServerSettings(model_name=MODEL, api_key=KEY, max_batch=1, max_queue=0, default_max_tokens=4)
    scheduler = Scheduler(world["engine"], max_batch=1, max_queue=0)
    app = create_app(world["rag"], settings, scheduler=scheduler)
    try:
        with ServerThread(app) as url:
            with pytest.raises(openai.AuthenticationError, match="Bearer"):
                ask(openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0), "hi")
            authed = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
            stream = ask(authed, "Tell me everything about rivers", max_tokens=256, stream=True)
            pieces = iter(stream)
            while not next(pieces).choices[0].delta.content:  # decoding: the long generation holds the only slot
                pass
            with pytest.raises(openai.InternalServerError) as caught:
                ask(authed, "hi")
            assert caught.value.status_code == 503 and "retry" in caught.value.body["message"]
            assert scheduler.stats()["active"] == 1
            stream.close()  # the client goes away
            deadline = time.monotonic() + 20
            while app.state.server.in_flight and time.monotonic() < deadline:
                time.sleep(0.05)
            assert app.state.server.in_flight == 0 and scheduler.stats()["active"] == 0
            assert scheduler.finished["cancelled"] == 1 and scheduler.steps < 200  # cancelled long before its 256 tokens
            assert ask(authed, "hi", max_tokens=2).choices[0].message.content is not None
    finally:
        scheduler.close()


def test_picaso_options_method_and_top_k(client):
    concat = ask(client, "Who deciphered Egyptian hieroglyphs?", max_tokens=4, extra_body={"picaso": {"method": "concat", "top_k": 2}})
    figures = concat.model_extra["picaso"]
    assert figures["method"] == "concat" and figures["k"] == 2 and len(figures["sources"]) == 2
    assert figures["tokens_read"] == concat.usage.prompt_tokens > figures["document_tokens"] > 0  # the documents are read
    none = ask(client, "Who deciphered Egyptian hieroglyphs?", max_tokens=4, extra_body={"picaso": {"top_k": 0}})
    assert none.model_extra["picaso"]["k"] == 0 and none.model_extra["picaso"]["sources"] == []


@pytest.mark.parametrize("fields, named", [
    ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format 'json_object'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}, "json_schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], "tool_choice": "required"},
     "tool_choice 'required'"),
])
def test_fields_the_server_cannot_honour_are_refused_by_name(client, fields, named):
    """Refused with a 400 that names the field, not answered as if it had been met (LangChain's structured
    output would otherwise fail later, on a reply that was never JSON)."""
    with pytest.raises(openai.BadRequestError, match=named):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Who was Ada Lovelace?"}],
                                       max_tokens=4, **fields)


def test_an_image_part_is_refused_by_name_and_ignorable_fields_are_ignored(client):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with pytest.raises(openai.BadRequestError, match="'image_url' part: this server reads text only"):
        client.chat.completions.create(model=MODEL, max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}])
    answered = client.chat.completions.create(  # optional tools, penalties, text format: answered in text
        model=MODEL, max_tokens=4, presence_penalty=0.5, response_format={"type": "text"}, tool_choice="auto",
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Who was Ada Lovelace?"}]}])
    assert answered.choices[0].message.content is not None


def test_a_front_ends_background_task_skips_retrieval_and_is_short(world, client):
    """Open WebUI's title and tag requests carry metadata.task; any client can send picaso.task: no
    retrieval for them, and 32 tokens unless the request says otherwise."""
    title = "### Task:\nGenerate a concise, 3-5 word title for the chat.\n### Chat History:\nuser: Who was Ada Lovelace?"
    for extra in ({"metadata": {"task": "title_generation"}}, {"picaso": {"task": True}}):
        done = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": title}], extra_body=extra)
        picaso = done.model_extra["picaso"]
        assert picaso["k"] == 0 and picaso["sources"] == [] and picaso["retrieval_query"] is None
        assert done.usage.completion_tokens <= world["rag"].settings.task_max_tokens == 32
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": title}], max_tokens=4)
    assert plain.model_extra["picaso"]["k"] == 3  # the same text without the mark is a question: retrieved for


def test_the_sources_are_also_a_response_header(client):
    """For clients that surface response headers but not extra body fields (LangChain's
    include_response_headers): ids and scores, the same as the body's picaso.sources, streamed or not."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "Who was Ada Lovelace?"}])
    body = raw.parse()
    listed = json.loads(raw.headers["x-picaso-sources"])
    assert listed == [{"id": s["id"], "score": s["score"]} for s in body.model_extra["picaso"]["sources"]] and listed
    streamed = client.chat.completions.with_raw_response.create(
        model=MODEL, max_tokens=2, stream=True, messages=[{"role": "user", "content": "Who was Ada Lovelace?"}])
    assert json.loads(streamed.headers["x-picaso-sources"]) == listed
    for _ in streamed.parse():
        pass
