"""The LLM's hand-off cost per call against the number of live requests (issue 11, point 2).

    python benchmarks/handoff_cost.py [--live 1 10 100 1000] [--repeats 200] [--json docs/benchmarks/handoff_cost_cpu.json]

Opens N tickets (each k=5 documents of ~600 characters, as N concurrent retrievals would), then
times ``Handoff.plan`` on one request's prompt (a stock compact prompt with its 5 marked
documents): medians and p99 over ``--repeats`` calls. In the same run it times the text-keyed
hand-off that this replaced (``handoff.py`` at commit d7e859f, read from git), which searched every
prompt for the texts of every live ticket. Writes JSON and a PNG plot beside it. No model needed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "integrations" / "llama-index-llms-picaso"))
from llama_index.llms.picaso.handoff import DocumentRef, Handoff, Ticket  # noqa: E402

OLD_COMMIT = "d7e859f"
HANDOFF_PATH = "integrations/llama-index-llms-picaso/llama_index/llms/picaso/handoff.py"
PREFIX = "Context information is below.\n---------------------\n"
SUFFIX = "\n---------------------\nGiven the context information and not prior knowledge, answer the query.\nQuery: {q}\nAnswer: "


def documents(rng: random.Random, n: int) -> list[DocumentRef]:
    words = "the tower reef bees river delta glacier engine script stone light water sugar leaf iron fair".split()
    return [DocumentRef.of(f"title: doc {rng.random():.12f}\n\n" + " ".join(rng.choice(words) for _ in range(100)), f"n{i}")
            for i in range(n)]


def old_handoff_module():
    """The text-keyed hand-off as it was before this change (for the baseline in the same run)."""
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:{HANDOFF_PATH}"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_handoff.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_handoff", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_handoff"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def timed(fn, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    return {"median_us": float(np.median(times)), "p99_us": float(np.percentile(times, 99))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--live", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--old-repeats", type=int, default=20, help="repeats for the old hand-off (slow at 1000)")
    parser.add_argument("--json", default=str(REPO / "docs" / "benchmarks" / "handoff_cost_cpu.json"))
    args = parser.parse_args(argv)
    rng = random.Random(0)
    old = old_handoff_module()
    rows = []
    for live in args.live:
        handoff, old_handoff = Handoff(max_tickets=max(args.live)), old.Handoff(max_tickets=max(args.live))
        tickets = []
        for _ in range(live):
            docs = documents(rng, 5)
            tickets.append(handoff.open(Ticket("picaso-s", "mean", docs)))
            old_handoff.register(old.Ticket("picaso-s", "mean", [old.DocumentRef.of(d.text, d.node_id) for d in docs]))
        mine = tickets[-1]
        marked = PREFIX + "\n\n".join(o + d.text + c for i, d in enumerate(mine.documents) for o, c in [mine.markers(i)])
        prompt = marked + SUFFIX.format(q="When was the tower built?")
        plain = PREFIX + "\n\n".join(d.text for d in mine.documents) + SUFFIX.format(q="When was the tower built?")
        assert [d.node_id for d in handoff.plan(prompt).composed] == [d.node_id for d in mine.documents]
        row = {"live_requests": live, "prompt_chars": len(prompt), "marked": timed(lambda: handoff.plan(prompt), args.repeats),
               "text_keyed_before": timed(lambda: old_handoff.plan(plain), args.old_repeats)}
        rows.append(row)
        print(f"{live:5d} live requests: marked hand-off {row['marked']['median_us']:8.1f} us (p99 {row['marked']['p99_us']:.1f}); "
              f"text-keyed before {row['text_keyed_before']['median_us'] / 1000:8.2f} ms (p99 {row['text_keyed_before']['p99_us'] / 1000:.2f})")
    result = {"command": "python benchmarks/handoff_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{platform.processor() or platform.machine()}, {platform.system()} (this project's 2-core CPU machine)",
              "python": platform.python_version(), "documents_per_request": 5, "rows": rows}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    live = [r["live_requests"] for r in result["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(live, [r["marked"]["median_us"] / 1000 for r in result["rows"]], "o-", label="marked hand-off (median)")
    ax.plot(live, [r["text_keyed_before"]["median_us"] / 1000 for r in result["rows"]], "s--", label="text-keyed, before (median)")
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("live requests (open tickets)"), ax.set_ylabel("hand-off time per LLM call (ms)")
    ax.set_title("Hand-off cost per LLM call, CPU"), ax.legend(), ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
