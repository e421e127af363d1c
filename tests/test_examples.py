"""The quickstart and the chat server, run as a new user would (the server through its test client)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from .llamaindex_world import REPO

QUICKSTART = REPO / "examples" / "quickstart.py"
TRAINED = (REPO / "models" / "picaso-mini" / "config.json").is_file()


def run_quickstart(cwd, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(QUICKSTART), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_quickstart_from_a_fresh_directory_then_again(tmp_path):
    out = run_quickstart(tmp_path)
    print(out)
    assert (tmp_path / "picaso_db" / "chroma").is_dir() and (tmp_path / "picaso_db" / "states" / "v1").is_dir()
    assert out.startswith("model: ") and (("RANDOMLY INITIALISED" in out) != TRAINED)
    assert "ingested picaso_db/chroma" in out
    for question in ("When was the Eiffel Tower completed?", "Where in plants does photosynthesis take place?",
                     "Who deciphered Egyptian hieroglyphs?"):
        assert f"Q: {question}" in out
    assert out.count("A (picaso-s):") == 3 and out.count("A (concatenation):") == 3 and out.count("sources:") == 3
    assert "The Eiffel Tower is a wrought-iron" in out.split("Q: When was")[1].split("Q: ")[0]  # retrieval is real
    reads = [(int(p), int(c)) for p, c in re.findall(r"tokens read at query time: picaso-s (\d+) .*concatenation (\d+)", out)]
    assert len(reads) == 3 and all(p < c for p, c in reads)
    assert len(re.findall(r"answer time \(median of 3, cpu\): picaso-s \d+ ms, concatenation \d+ ms", out)) == 3

    again = run_quickstart(tmp_path, "--repeats", "1", "--method", "picaso-r")
    assert "reusing picaso_db/chroma" in again and "A (picaso-r):" in again
    assert re.findall(r"tokens read at query time: picaso-r (\d+)", again)


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("chat_server", REPO / "examples" / "chat_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from fastapi.testclient import TestClient

    app = module.create_app(db=tmp_path_factory.mktemp("server") / "picaso_db", max_new_tokens=16)
    with TestClient(app) as client:
        yield client


def test_chat_server_health(chat_server):
    health = chat_server.get("/health").json()
    assert health["status"] == "ok" and health["method"] == "picaso-s"
    assert health["documents"] == health["states"] > 0 and len(health["fingerprint"]) == 16


def test_chat_server_chat_keeps_a_conversation(chat_server):
    first = chat_server.post("/chat", json={"message": "Who was Ada Lovelace?", "session_id": "s1"})
    assert first.status_code == 200
    body = first.json()
    assert body["answer"].strip() and len(body["sources"]) == 3
    assert any("Ada Lovelace" in s["text"] for s in body["sources"])
    assert body["picaso"]["method"] == "picaso-s" and body["picaso"]["k"] == 3 and body["picaso"]["llm_calls"] == 1
    follow = chat_server.post("/chat", json={"message": "When did she write it?", "session_id": "s1"}).json()
    assert follow["picaso"]["llm_calls"] == 2  # condense the question with the history, then answer
    assert chat_server.delete("/sessions/s1").status_code == 200
    assert chat_server.delete("/sessions/s1").status_code == 404
    assert chat_server.post("/chat", json={"message": ""}).status_code == 422


def test_chat_server_streams(chat_server):
    with chat_server.stream("POST", "/chat/stream", json={"message": "Tell me about honey bees", "session_id": "s2"}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = "".join(response.iter_text()).strip().split("\n\n")
    deltas = [json.loads(e[len("data: "):])["delta"] for e in events if e.startswith("data: ")]
    done = [e for e in events if e.startswith("event: done")]
    assert len(deltas) >= 1 and len(done) == 1
    final = json.loads(done[0].split("data: ", 1)[1])
    assert "".join(deltas) == final["answer"] and final["answer"].strip()
    assert any("honey bee" in s["text"] for s in final["sources"])
    assert final["picaso"]["k"] == 3 and final["picaso"]["tokens_read"] > 0
