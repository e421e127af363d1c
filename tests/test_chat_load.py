"""Item 7 of the reliability issue, at CI size: the chat backend (examples/chat_server.py served by
uvicorn on 127.0.0.1) answers 40 requests, 8 at a time, with 0 errors, within a bounded time.
The full-size run (200 requests, 16 concurrent, picaso-mini) is benchmarks/chat_load.py's default;
its figures are in docs/benchmarks/chat_load_cpu.json and docs/guarantees.md."""

from __future__ import annotations

import importlib.util

from .llamaindex_world import REPO


def test_chat_backend_under_load(tmp_path):
    spec = importlib.util.spec_from_file_location("chat_load", REPO / "benchmarks" / "chat_load.py")
    chat_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chat_load)
    figures = chat_load.main(["--model", "random", "--requests", "40", "--concurrency", "8", "--max-new-tokens", "8",
                              "--time-limit", "240", "--db", str(tmp_path / "db"), "--json", str(tmp_path / "load.json")])
    assert figures["errors"] == 0, figures["error_samples"]
    assert figures["ok"] == 40 and figures["documents"] > 0
    assert 0 < figures["latency_ms"]["p50"] <= figures["latency_ms"]["p99"]
    assert (tmp_path / "load.json").is_file()
