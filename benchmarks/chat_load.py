"""Load test of the chat backend (examples/chat_server.py) over loopback: N requests, C at a time.

    python benchmarks/chat_load.py                                  # 200 requests, 16 concurrent, picaso-mini
    python benchmarks/chat_load.py --model random --requests 40 --concurrency 8   # the CI size (tests/test_chat_load.py)

Starts the server's app with uvicorn on 127.0.0.1 (a free port, in a thread of this process; nothing
leaves the machine), ingests the example corpus into a fresh database on first use, then POSTs
/chat with one new session per request (so every request is one retrieval + one answer), at most
``--concurrency`` in flight, and reports errors (non-200, an empty answer, a timeout or a transport
error), latency percentiles and throughput. ``--json`` writes the figures (default
docs/benchmarks/chat_load_cpu.json). The whole run is bounded by ``--time-limit``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["Who was Ada Lovelace?", "When was the Eiffel Tower completed?", "Where does photosynthesis take place?",
             "How do honey bees find flowers?", "Who deciphered Egyptian hieroglyphs?", "What is the Great Barrier Reef?",
             "What did Charles Babbage design?", "Why do rivers build deltas?"]


def load_chat_server():
    spec = importlib.util.spec_from_file_location("chat_server", REPO / "examples" / "chat_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Server:
    """The chat app served by uvicorn on 127.0.0.1 in a background thread (a context manager)."""

    def __init__(self, app):
        import uvicorn

        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the chat server did not start")
            time.sleep(0.05)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


async def fire(base_url: str, requests: int, concurrency: int, timeout: float, deadline: float) -> tuple[list[float], list[str]]:
    """POST /chat ``requests`` times, ``concurrency`` in flight; returns latencies (s) of successes and errors."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
        async def one(i: int) -> None:
            async with gate:
                if time.monotonic() > deadline:
                    errors.append(f"request {i}: not sent, the time limit was reached")
                    return
                body = {"message": QUESTIONS[i % len(QUESTIONS)], "session_id": f"load-{i}"}
                start = time.perf_counter()
                try:
                    response = await client.post("/chat", json=body)
                except httpx.HTTPError as exc:
                    errors.append(f"request {i}: {type(exc).__name__}: {exc}")
                    return
                elapsed = time.perf_counter() - start
                if response.status_code != 200:
                    errors.append(f"request {i}: HTTP {response.status_code}: {response.text[:200]}")
                elif not response.json().get("sources"):
                    errors.append(f"request {i}: no sources retrieved")
                else:
                    latencies.append(elapsed)

        await asyncio.gather(*(one(i) for i in range(requests)))
    return latencies, errors


def run(model: str | None, requests: int, concurrency: int, max_new_tokens: int, db: Path, time_limit: float,
        timeout: float = 120.0) -> dict:
    """Start the server, fire the requests, return the figures."""
    chat_server = load_chat_server()
    started = time.perf_counter()
    app = chat_server.create_app(model, db=db, max_new_tokens=max_new_tokens)
    setup_s = time.perf_counter() - started
    with Server(app) as base_url:
        import httpx

        health = httpx.get(f"{base_url}/health", timeout=30).json()
        begin = time.perf_counter()
        latencies, errors = asyncio.run(fire(base_url, requests, concurrency, timeout, time.monotonic() + time_limit))
        wall = time.perf_counter() - begin
    ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    import torch

    return {
        "requests": requests, "concurrency": concurrency, "max_new_tokens": max_new_tokens, "endpoint": "POST /chat",
        "model": health["model"], "documents": health["documents"], "method": health["method"],
        "ok": len(latencies), "errors": len(errors), "error_samples": errors[:5],
        "latency_ms": {"p50": round(float(np.percentile(ms, 50)), 1), "p90": round(float(np.percentile(ms, 90)), 1),
                       "p99": round(float(np.percentile(ms, 99)), 1), "mean": round(float(ms.mean()), 1),
                       "max": round(float(ms.max()), 1)},
        "throughput_rps": round(len(latencies) / wall, 2), "wall_s": round(wall, 2), "setup_s": round(setup_s, 2),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "device": "cpu"},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory; default models/picaso-mini; 'random' for the tiny random model")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--db", type=Path, help="database directory (default: a fresh temporary one)")
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds for all requests; later ones count as errors")
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "benchmarks" / "chat_load_cpu.json")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be >= 1")

    with tempfile.TemporaryDirectory() as scratch:
        figures = run(args.model, args.requests, args.concurrency, args.max_new_tokens, args.db or Path(scratch) / "db",
                      args.time_limit)
    figures["command"] = " ".join(["python benchmarks/chat_load.py", shlex.join(argv if argv is not None else sys.argv[1:])]).strip()
    figures["date"] = time.strftime("%Y-%m-%d")
    lat = figures["latency_ms"]
    print(f"{figures['ok']}/{figures['requests']} ok, {figures['errors']} errors, {figures['concurrency']} concurrent; "
          f"latency p50 {lat['p50']} ms, p99 {lat['p99']} ms; {figures['throughput_rps']} req/s ({figures['model']})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
