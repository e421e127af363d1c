"""Soak test of the HTTP server's memory: RSS, threads and open fds every second under sustained load.

    python benchmarks/soak.py                                  # 32 clients for 7 minutes, cut at 2.5 minutes
    python benchmarks/soak.py --clients 8 --duration 90 --warmup 30 --json /tmp/soak.json --png /tmp/soak.png

Ingests the example corpus with models/picaso-mini into a fresh database (as benchmarks/chat_load.py
does), starts ``picaso-rag serve`` as its own process on 127.0.0.1 (a free port), and runs
``--clients`` concurrent clients of the official ``openai`` client (AsyncOpenAI) for ``--duration``
seconds. Each client cycles through ten requests: 3 plain chats, 2 streamed chats (usage included),
1 stream it leaves after its first two pieces (asking for 256 tokens: the server must cancel it),
1 chat with an ad hoc document text of its own (a new text every time: each is encoded and enters
the LLM's state cache), 1 multi-turn chat, 1 completion, 1 concatenation request (``picaso.method:
concat``). Every answer is checked (content, sources); errors are counted by kind.

A sampler thread reads the server's ``/proc/<pid>/status`` (VmRSS, RssAnon, Threads; psutil where it
is installed) and counts ``/proc/<pid>/fd`` every ``--sample-s``; every 10 s it also reads
``/health/details`` (the scheduler's figures, the state cache's bytes). After ``--warmup`` seconds
(the state cache filling, allocator pools growing), RSS must be flat: the least-squares slope of RSS
over the rest of the load is at most ``--max-slope`` MB/min (the verdict, ``pass``). The record
(``--json``) holds every sample, the figures and the verdict; the plot (``--png``) shows RSS over
time, the warm-up cut, the fitted slope, threads and fds.

``--server-env KEY=VALUE`` (repeatable) sets the server's environment (e.g. ``MALLOC_ARENA_MAX=2``);
``--state-cache-bytes`` the server's state cache budget (its largest bounded consumer of memory).
Only loopback traffic; every loop is bounded by ``--duration`` and the requests' timeouts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from chat_load import QUESTIONS, free_port, ingest  # noqa: E402

KINDS = ["chat", "stream", "adhoc", "chat", "disconnect", "multiturn", "stream", "completion", "chat", "concat"]
CITIES = ["Lisbon", "Kyoto", "Quito", "Tromso", "Accra", "Hobart", "Tbilisi", "Oaxaca"]


def proc_sample(pid: int) -> dict:
    """RSS (MB), anonymous RSS (MB), threads and open fds of ``pid`` (psutil if installed, else /proc)."""
    try:
        import psutil

        p = psutil.Process(pid)
        with p.oneshot():
            mem = p.memory_full_info() if hasattr(p, "memory_full_info") else p.memory_info()
            return {"rss_mb": round(mem.rss / 2**20, 1), "anon_mb": round(getattr(mem, "uss", mem.rss) / 2**20, 1),
                    "threads": p.num_threads(), "fds": p.num_fds()}
    except ImportError:
        pass
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    kb = lambda name: int(fields[name].split()[0]) if name in fields else 0  # noqa: E731
    return {"rss_mb": round(kb("VmRSS") / 1024, 1), "anon_mb": round(kb("RssAnon") / 1024, 1),
            "threads": int(fields["Threads"]), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def thread_names(pid: int) -> dict:
    names = Counter()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            names[Path(f"/proc/{pid}/task/{task}/comm").read_text().strip()] += 1
        except OSError:
            pass
    return dict(sorted(names.items()))


class Sampler(threading.Thread):
    """Samples the server process every ``every`` seconds (and /health/details every 10 s) until stopped."""

    def __init__(self, pid: int, base: str, every: float, done: Counter, t0: float):
        super().__init__(daemon=True, name="soak-sampler")
        self.pid, self.base, self.every, self.done, self.t0 = pid, base, every, done, t0
        self.samples: list[dict] = []
        self.health: list[dict] = []
        self.thread_changes: list[dict] = []  # the server's threads by name, whenever their number changes
        self.stop = threading.Event()

    def run(self) -> None:
        import httpx

        next_health = 0.0
        while not self.stop.is_set():
            t = time.monotonic() - self.t0
            try:
                self.samples.append({"t": round(t, 2), "requests_done": sum(self.done.values()), **proc_sample(self.pid)})
                if len(self.samples) == 1 or self.samples[-1]["threads"] != self.samples[-2]["threads"]:
                    self.thread_changes.append({"t": round(t, 2), "rss_mb": self.samples[-1]["rss_mb"],
                                                "threads": thread_names(self.pid)})
            except (FileNotFoundError, ProcessLookupError):
                return  # the server is gone
            if t >= next_health:
                next_health = t + 10
                try:
                    h = httpx.get(self.base + "/health/details", timeout=5).json()
                    self.health.append({"t": round(t, 2), "in_flight": h["in_flight"], "state_cache": h.get("state_cache"),
                                        "active": h["scheduler"]["active"], "waiting": h["scheduler"]["waiting"],
                                        "steps": h["scheduler"]["steps"], "finished": h["scheduler"]["finished"]})
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
            self.stop.wait(self.every)


async def client_loop(c: int, client, deadline: float, max_tokens: int, done: Counter, errors: Counter,
                      error_samples: list, latencies: dict) -> None:
    """One client: requests of KINDS in turn (starting at its own offset) until ``deadline``."""
    i = c
    while time.monotonic() < deadline:
        kind = KINDS[i % len(KINDS)]
        question = QUESTIONS[i % len(QUESTIONS)]
        start = time.perf_counter()
        try:
            await one(client, kind, question, c, i, max_tokens)
            done[kind] += 1
            latencies.setdefault(kind, []).append(time.perf_counter() - start)
        except Exception as exc:  # counted, never fatal: the soak goes on
            errors[kind] += 1
            if len(error_samples) < 10:
                error_samples.append(f"{kind}: {type(exc).__name__}: {str(exc)[:200]}")
            await asyncio.sleep(0.5)
        i += 1


async def one(client, kind: str, question: str, c: int, i: int, max_tokens: int) -> None:
    model = "picaso"
    user = [{"role": "user", "content": question}]
    if kind == "chat":
        r = await client.chat.completions.create(model=model, messages=user, max_tokens=max_tokens)
        assert r.choices[0].message.content is not None and r.model_extra["picaso"]["sources"], "no answer or sources"
    elif kind == "stream":
        stream = await client.chat.completions.create(model=model, messages=user, max_tokens=max_tokens, stream=True,
                                                      stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        assert chunks and chunks[-1].usage is not None, "the stream did not end with its usage"
    elif kind == "disconnect":
        stream = await client.chat.completions.create(model=model, messages=user, max_tokens=256, stream=True)
        pieces = 0
        async for chunk in stream:
            pieces += bool(chunk.choices and chunk.choices[0].delta.content)
            if pieces >= 2:
                break
        await stream.close()  # the client goes away mid-stream: the server cancels the row
    elif kind == "adhoc":  # a text no one sent before: encoded, then kept in the state cache (LRU, byte-bounded)
        text = (f"Soak note {c}-{i}: the courier {i % 97} left {CITIES[i % len(CITIES)]} at {i % 24}:00 with parcel "
                f"{c * 100_003 + i}, bound for {CITIES[(i + 3) % len(CITIES)]}; it weighed {(i * 7) % 50 + 1} kg.")
        r = await client.chat.completions.create(model=model, max_tokens=max_tokens,
                                                 messages=[{"role": "user", "content": "Where was the parcel bound?"}],
                                                 extra_body={"documents": [{"text": text}]})
        assert r.model_extra["picaso"]["sources"][0]["text"] == text, "the ad hoc text is not the source"
    elif kind == "multiturn":
        messages = [{"role": "system", "content": "Answer briefly."}, *user,
                    {"role": "assistant", "content": "Here is what the documents say."},
                    {"role": "user", "content": "Tell me more about it."}]
        r = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)
        assert r.choices[0].message.content is not None, "no answer"
    elif kind == "completion":
        r = await client.completions.create(model=model, prompt=question, max_tokens=max_tokens)
        assert r.choices[0].text is not None, "no text"
    elif kind == "concat":
        r = await client.chat.completions.create(model=model, messages=user, max_tokens=max_tokens,
                                                 extra_body={"picaso": {"method": "concat", "top_k": 3}})
        assert r.model_extra["picaso"]["method"] == "concat", "not concatenated"


async def drive(base: str, clients: int, duration: float, max_tokens: int, timeout: float):
    from openai import AsyncOpenAI

    done, errors, error_samples, latencies = Counter(), Counter(), [], {}
    client = AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=timeout)
    deadline = time.monotonic() + duration
    try:
        await asyncio.gather(*(client_loop(c, client, deadline, max_tokens, done, errors, error_samples, latencies)
                               for c in range(clients)))
    finally:
        await client.close()
    return done, errors, error_samples, latencies


def slope_mb_per_min(samples: list[dict], key: str = "rss_mb") -> float:
    t = np.array([s["t"] for s in samples]) / 60
    y = np.array([s[key] for s in samples])
    return float(np.polyfit(t, y, 1)[0]) if len(t) > 2 else float("nan")


def analyse(samples: list[dict], load_start: float, load_end: float, warmup: float, max_slope: float) -> dict:
    load = [s for s in samples if load_start <= s["t"] <= load_end]
    after = [s for s in load if s["t"] >= load_start + warmup]
    if len(after) < 10:
        raise SystemExit(f"only {len(after)} samples after the warm-up: run longer (--duration) or cut earlier (--warmup)")
    head = [s["rss_mb"] for s in after if s["t"] <= after[0]["t"] + 10]
    tail = [s["rss_mb"] for s in after if s["t"] >= after[-1]["t"] - 10]
    slope = slope_mb_per_min(after)
    return {
        "rss_mb_before_load": samples[0]["rss_mb"],
        "rss_mb_at_cut": round(float(np.median(head)), 1), "rss_mb_at_end": round(float(np.median(tail)), 1),
        "rss_mb_max_after_cut": max(s["rss_mb"] for s in after), "rss_mb_min_after_cut": min(s["rss_mb"] for s in after),
        "rss_mb_max": max(s["rss_mb"] for s in samples),
        "slope_mb_per_min_after_cut": round(slope, 3),
        "anon_slope_mb_per_min_after_cut": round(slope_mb_per_min(after, "anon_mb"), 3),
        "slope_mb_per_min_warmup": round(slope_mb_per_min([s for s in load if s["t"] < load_start + warmup]), 3),
        "threads_after_cut": [min(s["threads"] for s in after), max(s["threads"] for s in after)],
        "fds_after_cut": [min(s["fds"] for s in after), max(s["fds"] for s in after)],
        "minutes_after_cut": round((after[-1]["t"] - after[0]["t"]) / 60, 2),
        "bound_mb_per_min": max_slope,
        "pass": bool(slope <= max_slope),
    }


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, v = record["samples"], record["verdict"]
    t = np.array([s["t"] for s in samples]) / 60
    cut, start, end = (record["load_start_s"] + record["warmup_s"]) / 60, record["load_start_s"] / 60, record["load_end_s"] / 60
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})
    ax.plot(t, [s["rss_mb"] for s in samples], lw=1.2, label="RSS")
    ax.plot(t, [s["anon_mb"] for s in samples], lw=0.8, alpha=0.7, label="anonymous RSS")
    cache = [(h["t"] / 60, h["state_cache"]["bytes"] / 2**20) for h in record["health"] if h.get("state_cache")]
    if cache:
        ax.plot(*zip(*cache), lw=0.8, ls=":", label="state cache (MB)")
    ax.axvspan(start, cut, color="0.9", label=f"warm-up ({record['warmup_s']:.0f} s)")
    ax.axvline(cut, color="0.4", ls="--", lw=0.8)
    after = [s for s in samples if cut * 60 <= s["t"] <= end * 60]
    ta, ya = np.array([s["t"] for s in after]) / 60, np.array([s["rss_mb"] for s in after])
    fit = np.polyfit(ta, ya, 1)
    ax.plot(ta, np.polyval(fit, ta), color="C3", lw=1.5,
            label=f"slope after the cut: {v['slope_mb_per_min_after_cut']:+.2f} MB/min (bound {v['bound_mb_per_min']})")
    ax.axvline(end, color="0.4", ls=":", lw=0.8)
    ax.set_ylabel("MB")
    verdict = "PASS" if v["pass"] else "FAIL"
    ax.set_title(f"picaso-rag serve, {record['clients']} clients, {record['duration_s'] / 60:.0f} min, "
                 f"{record['machine']['cores']}-core CPU: {verdict} (RSS {v['rss_mb_at_cut']:.0f} -> "
                 f"{v['rss_mb_at_end']:.0f} MB after the cut)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    ax2.plot(t, [s["threads"] for s in samples], label="threads")
    ax2.plot(t, [s["fds"] for s in samples], label="open fds")
    ax2.axvline(cut, color="0.4", ls="--", lw=0.8)
    ax2.axvline(end, color="0.4", ls=":", lw=0.8)
    ax2.set_xlabel("minutes since the server answered /health")
    ax2.legend(fontsize=8, loc="lower right")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args: argparse.Namespace, db: Path) -> dict:
    import httpx

    started = time.perf_counter()
    ingest(db, args.model)
    port = free_port()
    command = [sys.executable, "-m", "picaso_server.cli", "serve", "--chroma-path", str(db / "chroma"), "--collection",
               "picaso_quickstart", "--states", str(db / "states"), "--model", args.model, "--served-model-name",
               "picaso", "--port", str(port)]
    if args.state_cache_bytes is not None:
        command += ["--state-cache-bytes", str(args.state_cache_bytes)]
    server_env = dict(kv.split("=", 1) for kv in args.server_env)
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", **server_env})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                raise RuntimeError("the server exited: " + server.stdout.read()[-2000:])
            try:
                httpx.get(base + "/health", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not answer /health within 180 s")
                time.sleep(0.2)
        setup_s = time.perf_counter() - started
        done = Counter()
        t0 = time.monotonic()
        sampler = Sampler(server.pid, base, args.sample_s, done, t0)
        sampler.start()
        time.sleep(args.idle_s)  # the idle server before the load
        load_start = time.monotonic() - t0
        counts, errors, error_samples, latencies = asyncio.run(drive(base, args.clients, args.duration, args.max_tokens,
                                                                     args.timeout))
        done.update(counts)
        load_end = time.monotonic() - t0
        time.sleep(args.idle_s)  # cancelled rows leave, the server idles again
        health_after = httpx.get(base + "/health/details", timeout=10).json()
        sampler.stop.set()
        sampler.join(10)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    import torch

    record = {
        "clients": args.clients, "duration_s": args.duration, "warmup_s": args.warmup, "max_tokens": args.max_tokens,
        "kinds_per_ten": dict(Counter(KINDS)), "model": os.path.relpath(args.model, REPO),
        # repository-relative, without the temporary database: the record names no path of this machine
        "server": " ".join(shlex.quote(c.replace(str(REPO) + os.sep, "")) for c in command[1:] if not c.startswith(str(db))),
        "server_env": server_env, "state_cache_bytes": args.state_cache_bytes,
        "load_start_s": round(load_start, 2), "load_end_s": round(load_end, 2), "setup_s": round(setup_s, 1),
        "requests_done": dict(counts), "requests_total": sum(counts.values()),
        "requests_per_s": round(sum(counts.values()) / max(load_end - load_start, 1e-9), 2),
        "errors": dict(errors), "error_samples": error_samples,
        "latency_s_p50": {k: round(float(np.median(v)), 2) for k, v in sorted(latencies.items())},
        "scheduler_after": health_after["scheduler"], "in_flight_after": health_after["in_flight"],
        "state_cache_after": health_after.get("state_cache"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "thread_changes": sampler.thread_changes, "health": sampler.health, "samples": sampler.samples,
    }
    record["verdict"] = analyse(sampler.samples, load_start, load_end, args.warmup, args.max_slope)
    return record


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "picaso-mini"), help="checkpoint directory")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=420, help="seconds of load")
    parser.add_argument("--warmup", type=float, default=150, help="seconds of load before the cut")
    parser.add_argument("--max-slope", type=float, default=2.0, help="MB/min: the flatness bound after the cut")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--sample-s", type=float, default=1.0)
    parser.add_argument("--idle-s", type=float, default=5.0, help="seconds sampled idle before and after the load")
    parser.add_argument("--timeout", type=float, default=120.0, help="per request")
    parser.add_argument("--state-cache-bytes", type=int, default=256 << 20,
                        help="the server's --state-cache-bytes (default 256 MiB, filled within the warm-up by the ad hoc "
                             "texts; the server's own default, 1 GiB, takes about 250 of them, 6 minutes here)")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--db", type=Path, help="database directory (default: a fresh temporary one)")
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "benchmarks" / "soak_cpu.json")
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "benchmarks" / "soak_cpu.png")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.duration <= args.warmup or args.warmup < 0:
        parser.error("--clients must be >= 1 and --duration longer than --warmup")
    if any("=" not in kv for kv in args.server_env):
        parser.error("--server-env takes KEY=VALUE")
    try:  # the code the server starts with (read now: the checkout may move on during a long soak)
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        git += " (with uncommitted changes)" if dirty else ""
    except OSError:
        git = None
    with tempfile.TemporaryDirectory() as scratch:
        record = run(args, args.db or Path(scratch) / "db")
    record["command"] = " ".join(["python benchmarks/soak.py", shlex.join(argv if argv is not None else sys.argv[1:])]).strip()
    record["date"] = time.strftime("%Y-%m-%d")
    if git:
        record["git"] = git
    v = record["verdict"]
    print(f"{record['requests_total']} requests ({record['requests_per_s']}/s), errors {record['errors']}; RSS "
          f"{v['rss_mb_before_load']} MB idle, {v['rss_mb_at_cut']} at the cut -> {v['rss_mb_at_end']} at the end "
          f"(max {v['rss_mb_max']}); slope after the cut {v['slope_mb_per_min_after_cut']:+.2f} MB/min (bound "
          f"{v['bound_mb_per_min']}): {'PASS' if v['pass'] else 'FAIL'}; threads {v['threads_after_cut']}, "
          f"fds {v['fds_after_cut']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    if args.png:
        plot(record, args.png)
    return record


if __name__ == "__main__":
    main()
