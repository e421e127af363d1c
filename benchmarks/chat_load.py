"""Load test of the chat backend (picaso-server, `picaso-rag serve`) over loopback, with hostile clients.

    python benchmarks/chat_load.py                                   # 300 requests, 32 concurrent clients
    python benchmarks/chat_load.py --requests 60 --concurrency 8     # the CI size (tests/test_chat_load.py)

Ingests the example corpus with models/picaso-mini into a fresh database, starts ``picaso-rag serve``
as its own process on 127.0.0.1 (a free port), and sends ``--requests`` requests, ``--concurrency``
at a time, mixing per ten requests: 5 valid chats, 1 valid streamed chat, 1 client that reads the
first event of a stream and disconnects, 1 malformed request (bad JSON or a bad field), 1 body over
the server's limit (2 MiB), 1 client announcing a 300 MB body (raw socket). A valid request must be
answered (200, an answer and its sources); a bad one must get a 4xx, never a 5xx. The server's RSS
and thread count are read from /proc after every tenth of the requests: they must reach a
plateau (``plateau``: the second half's maximum against the value at half-time). ``--json`` writes
the figures (default docs/benchmarks/chat_load_cpu.json; the committed one was measured on
picaso-mini v1, all Mamba-2, git f59fcf9, before models/picaso-mini became the hybrid v2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["Who was Ada Lovelace?", "When was the Eiffel Tower completed?", "Where does photosynthesis take place?",
             "How do honey bees find flowers?", "Who deciphered Egyptian hieroglyphs?", "What is the Great Barrier Reef?",
             "What did Charles Babbage design?", "Why do rivers build deltas?"]
KINDS = ["valid", "valid", "valid", "valid", "valid", "stream", "disconnect", "malformed", "huge", "announced"]
MALFORMED = [b"{not json", json.dumps({"model": "picaso", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode(),
             json.dumps({"model": "picaso", "messages": []}).encode(), json.dumps({"model": "picaso", "messages": "hi", "n": 3}).encode(),
             json.dumps({"model": "picaso", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}).encode(),
             json.dumps([1, 2, 3]).encode()]


def ingest(db: Path, model: str) -> None:
    """The quickstart's ingestion (states stored with the model the server loads)."""
    sys.path.insert(0, str(REPO / "examples"))
    from rag_demo import load_embed_model, open_index, open_state_store

    from llama_index.llms.picaso import PicasoLLM
    from picaso_rag import PicasoEngine

    llm = PicasoLLM(engine=PicasoEngine.from_pretrained(model), state_store=open_state_store(db))
    open_index(db, llm, load_embed_model(), show_progress=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_figures(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_mb": round(int(fields["VmRSS"].split()[0]) / 1024, 1), "threads": int(fields["Threads"])}


async def one(client, base: str, i: int, kind: str, max_tokens: int, limit: int) -> tuple[str, str | None, float]:
    """Send request ``i`` of ``kind``; returns (kind, error or None, seconds)."""
    import httpx

    start = time.perf_counter()
    body = {"model": "picaso", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
    try:
        if kind == "valid":
            r = await client.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                return kind, f"HTTP {r.status_code}: {r.text[:200]}", 0
            answer = r.json()
            if not answer["picaso"]["sources"] or answer["choices"][0]["message"]["content"] is None:
                return kind, "no sources or no answer", 0
        elif kind in ("stream", "disconnect"):
            if kind == "disconnect":  # long enough that the server is still generating when the client leaves
                body["max_tokens"] = 256
            async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    return kind, f"HTTP {r.status_code}", 0
                events = []
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if kind == "disconnect":
                            break  # leave mid-stream: the server must cancel the generation
                if kind == "stream" and (events[-1] != "[DONE]" or "sources" not in "".join(events)):
                    return kind, "stream did not end with its sources and [DONE]", 0
        elif kind == "malformed":
            r = await client.post("/v1/chat/completions", content=MALFORMED[i % len(MALFORMED)],
                                  headers={"content-type": "application/json"})
            if not 400 <= r.status_code < 500:
                return kind, f"HTTP {r.status_code} for a malformed request", 0
        elif kind == "huge":
            try:
                r = await client.post("/v1/chat/completions", content=b"x" * (limit * 2), headers={"content-type": "application/json"})
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                # the server answered 413 and closed the connection before reading the body, while this
                # client was still sending it: the client sees the closed connection instead
                return "huge (closed)", None, time.perf_counter() - start
            if r.status_code != 413:
                return kind, f"HTTP {r.status_code} for a body over the limit", 0
        elif kind == "announced":
            host, port = base.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: 314572800\r\n\r\n{\"model\":")
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            if b" 413 " not in status:
                return kind, f"{status!r} for an announced 300 MB body", 0
    except (httpx.HTTPError, asyncio.TimeoutError, OSError) as exc:
        return kind, f"{type(exc).__name__}: {exc}", 0
    return kind, None, time.perf_counter() - start


async def fire(base: str, pid: int, requests: int, concurrency: int, max_tokens: int, limit: int, timeout: float):
    import httpx

    gate = asyncio.Semaphore(concurrency)
    results: list[tuple[str, str | None, float]] = []
    samples = [{"after": 0, **proc_figures(pid)}]
    step = max(1, requests // 10)
    async with httpx.AsyncClient(base_url=base, timeout=timeout,
                                 limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)) as client:
        async def task(i: int) -> None:
            async with gate:
                results.append(await one(client, base, i, KINDS[i % len(KINDS)], max_tokens, limit))
                if len(results) % step == 0:
                    samples.append({"after": len(results), **proc_figures(pid)})

        await asyncio.gather(*(task(i) for i in range(requests)))
    await asyncio.sleep(1.0)  # cancelled generations finish
    samples.append({"after": len(results), "idle": True, **proc_figures(pid)})
    return results, samples


def run(requests: int, concurrency: int, max_tokens: int, db: Path, model: str, timeout: float = 120.0) -> dict:
    started = time.perf_counter()
    ingest(db, model)
    port = free_port()
    limit = 1 << 20
    command = [sys.executable, "-m", "picaso_server.cli", "serve", "--chroma-path", str(db / "chroma"), "--collection",
               "picaso_quickstart", "--states", str(db / "states"), "--model", model, "--served-model-name", "picaso",
               "--port", str(port), "--max-body-bytes", str(limit)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                raise RuntimeError("the server exited: " + server.stdout.read()[-2000:])
            try:
                health = httpx.get(base + "/health/details", timeout=2).json()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not answer /health within 180 s")
                time.sleep(0.2)
        setup_s = time.perf_counter() - started
        begin = time.perf_counter()
        results, samples = asyncio.run(fire(base, server.pid, requests, concurrency, max_tokens, limit, timeout))
        wall = time.perf_counter() - begin
        health_after = httpx.get(base + "/health/details", timeout=10).json()
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    errors = [f"{kind}: {error}" for kind, error, _ in results if error]
    valid_ms = np.array([s * 1000 for kind, error, s in results if kind == "valid" and not error]) if results else np.array([])
    half = [s for s in samples if s["after"] >= requests // 2]
    at_half = half[0] if half else samples[-1]
    by_kind = {k: sum(1 for kind, _, _ in results if kind == k) for k in list(dict.fromkeys(KINDS)) + ["huge (closed)"]}
    import torch

    return {
        "requests": requests, "concurrency": concurrency, "max_tokens": max_tokens, "by_kind": by_kind,
        "model": model, "method": health["method"], "server": " ".join(shlex.quote(c) for c in command[1:]),
        "ok": len(results) - len(errors), "errors": len(errors), "error_samples": errors[:5],
        "valid_latency_ms": {"p50": round(float(np.percentile(valid_ms, 50)), 1), "p99": round(float(np.percentile(valid_ms, 99)), 1)}
        if len(valid_ms) else None,
        "samples": samples,
        "plateau": {"rss_mb_at_half": at_half["rss_mb"], "rss_mb_max_after_half": max(s["rss_mb"] for s in half or samples),
                    "threads_at_half": at_half["threads"], "threads_max_after_half": max(s["threads"] for s in half or samples),
                    "threads_max": max(s["threads"] for s in samples)},
        "scheduler_after": health_after["scheduler"], "in_flight_after": health_after["in_flight"],
        "wall_s": round(wall, 2), "setup_s": round(setup_s, 2),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "device": "cpu (this CPU machine)"},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "picaso-mini"), help="checkpoint directory")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--db", type=Path, help="database directory (default: a fresh temporary one)")
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "benchmarks" / "chat_load_cpu.json")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be >= 1")
    with tempfile.TemporaryDirectory() as scratch:
        figures = run(args.requests, args.concurrency, args.max_tokens, args.db or Path(scratch) / "db", args.model)
    figures["command"] = " ".join(["python benchmarks/chat_load.py", shlex.join(argv if argv is not None else sys.argv[1:])]).strip()
    figures["date"] = time.strftime("%Y-%m-%d")
    p = figures["plateau"]
    print(f"{figures['ok']}/{figures['requests']} as expected, {figures['errors']} errors, {figures['concurrency']} concurrent; "
          f"valid p50 {figures['valid_latency_ms']}; RSS {p['rss_mb_at_half']} -> {p['rss_mb_max_after_half']} MB, "
          f"threads {p['threads_at_half']} -> {p['threads_max_after_half']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
