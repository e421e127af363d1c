"""The chat backend under hostile load, at CI size (issue 12's last item, issue 13's server):
`picaso-rag serve` in its own process on 127.0.0.1, 40 requests from 8 concurrent clients mixing
valid, streamed, disconnecting, malformed, oversized and 300 MB-announcing clients. Every valid
request is answered, no bad one gets a 5xx, cancelled streams free their rows, and the server's
thread count stays flat. The full size (300 requests, 32 clients) is benchmarks/chat_load.py's
default; its figures are in docs/benchmarks/chat_load_cpu.json and docs/serving.md."""

from __future__ import annotations

import importlib.util

import pytest

from .llamaindex_world import REPO

pytestmark = pytest.mark.slow  # many clients against a real server: not in `pytest -m "not slow"`


def test_chat_backend_under_hostile_load(tmp_path):
    spec = importlib.util.spec_from_file_location("chat_load", REPO / "benchmarks" / "chat_load.py")
    chat_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chat_load)
    figures = chat_load.main(["--requests", "40", "--concurrency", "8", "--max-tokens", "4", "--db", str(tmp_path / "db"),
                              "--json", str(tmp_path / "load.json")])
    assert figures["errors"] == 0, figures["error_samples"]
    assert figures["ok"] == 40 and figures["by_kind"]["valid"] == 20
    assert figures["in_flight_after"] == 0 and figures["scheduler_after"]["active"] == 0
    assert figures["scheduler_after"]["finished"].get("cancelled", 0) >= 1  # disconnected streams were cancelled
    plateau = figures["plateau"]
    assert plateau["threads_max"] <= figures["samples"][1]["threads"] + 4  # no thread per request
    assert (tmp_path / "load.json").is_file()
