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

pytestmark = pytest.mark.slow  # runs the quickstart and examples end to end: not in `pytest -m "not slow"`

QUICKSTART = REPO / "examples" / "quickstart.py"
TRAINED = (REPO / "models" / "picaso-mini" / "config.json").is_file()


def run_quickstart(cwd, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(QUICKSTART), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_quickstart_from_a_fresh_directory_then_again(tmp_path):
    out = run_quickstart(tmp_path, "--json", str(tmp_path / "quickstart.json"))
    print(out)
    assert (tmp_path / "picaso_db" / "chroma").is_dir() and (tmp_path / "picaso_db" / "states" / "v1").is_dir()
    assert out.startswith("model: ") and (("RANDOMLY INITIALISED" in out) != TRAINED)
    assert "ingested picaso_db/chroma" in out
    for question in ("When was the Eiffel Tower completed?", "Where in plants does photosynthesis take place?",
                     "Who deciphered Egyptian hieroglyphs?"):
        assert f"Q: {question}" in out
    assert "The Eiffel Tower is a wrought-iron" in out.split("Q: When was")[1].split("Q: ")[0]  # retrieval is real
    assert out.count("what the tiny base model says (picaso-s):") == 3  # free-form answers, labelled
    report = json.loads((tmp_path / "quickstart.json").read_text())
    for row in report["questions"]:
        assert row["tokens_read"]["picaso-s"] < row["tokens_read"]["concatenation"]
        assert len(set(row["answer_logprob_by_order"]["picaso-s"])) == 1  # the same in all 6 orders, bitwise
        assert row["distinct_answers_over_orders"]["picaso-s"] == 1
        assert len(row["answer_logprob_by_order"]["concat"]) == 6 and len(set(row["answer_logprob_by_order"]["concat"])) > 1
    if TRAINED:  # the shipped model finds the true answer likelier with the composed documents than without
        mean = report["mean_answer_logprob"]
        assert mean["picaso-s"] > mean["none"]

    again = run_quickstart(tmp_path, "--method", "picaso-r", "--max-new-tokens", "4", "--orders", "2")
    assert "reusing picaso_db/chroma" in again and "what the tiny base model says (picaso-r):" in again
    assert re.findall(r"tokens read at query time: picaso-r (\d+)", again)


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("chat_server", REPO / "examples" / "chat_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from fastapi.testclient import TestClient

    app = module.create_app(db=tmp_path_factory.mktemp("server") / "picaso_db", default_max_tokens=16)
    with TestClient(app) as client:
        yield client


def test_chat_server_health(chat_server):
    health = chat_server.get("/health/details").json()
    assert health["status"] == "ok" and health["method"] == "picaso-s" and len(health["fingerprint"]) == 16
    assert chat_server.get("/v1/models").json()["data"][0]["id"] == "picaso-mini"  # as serve names models/picaso-mini


def test_chat_server_answers_over_the_openai_api(chat_server):
    """The example is the OpenAI-compatible server over the corpus (tests/test_server.py tests the server)."""
    body = {"model": "picaso-mini", "messages": [{"role": "user", "content": "Who was Ada Lovelace?"}]}
    reply = chat_server.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200
    answer = reply.json()
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["picaso"]["k"] == 3 and any("Ada Lovelace" in s["text"] for s in answer["picaso"]["sources"])
    assert chat_server.post("/v1/chat/completions", json={**body, "messages": []}).status_code == 400
