"""Peak memory and time of encoding one long document into a state, on this machine.

Each size runs in a fresh process (peak RSS = ``ru_maxrss`` of that process, so sizes do not mix);
any checkpoint directory (``--model``), hybrids included, whose state adds keys and values per
token (``state_kv_bytes_per_token``; ``state_mib`` is the whole state in the model's dtype);
the baseline is the same process after loading the model and tokenizing, before encoding.
The text is WikiText-2 test (../shared/data), repeated to the length asked for.

Usage::

    python benchmarks/long_document_memory.py            # 62.5K, 250K and 1M characters, models/picaso-mini

(docs/benchmarks/long_document_memory_cpu.json was measured on picaso-mini v1, all Mamba-2, git
f59fcf9; models/picaso-mini is now the hybrid v2, whose state also grows with the document.)
    python benchmarks/long_document_memory.py --chars 250000 --segment 8192 --out result.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one(chars: int, model: str, segment: int) -> dict:
    import torch

    from picaso_rag import PicasoEngine, PicasoError

    torch.set_num_threads(max(1, torch.get_num_threads()))
    engine = PicasoEngine.from_pretrained(model)
    engine.encode_segment_tokens = segment
    source = TEXT.read_text()
    text = (source * (chars // len(source) + 1))[:chars]
    cap = engine.max_document_tokens
    start = time.perf_counter()
    try:
        n_tokens = len(engine.tokenize(text))
    except PicasoError as exc:  # above the engine's cap: refused up front, before any encoding
        return {"chars": chars, "refused": True, "max_document_tokens": cap, "error": str(exc),
                "seconds_to_refuse": round(time.perf_counter() - start, 2), "peak_rss_mib": round(rss_mib(), 1)}
    baseline = rss_mib()
    start = time.perf_counter()
    state = engine.encode([text])[0]
    seconds = time.perf_counter() - start
    assert state.n_tokens == n_tokens and bool(torch.isfinite(state.ssm).all())
    # a hybrid model's state grows with the document (keys and values of its attention layers)
    kv_per_token = getattr(state, "kv_bytes_per_token", 0)
    return {"chars": chars, "tokens": n_tokens, "max_document_tokens": cap, "segment_tokens": segment, "baseline_rss_mib": round(baseline, 1),
            "peak_rss_mib": round(rss_mib(), 1), "encode_peak_over_baseline_mib": round(rss_mib() - baseline, 1),
            "encode_s": round(seconds, 2), "tokens_per_s": round(n_tokens / seconds),
            "state_mib": round(state.nbytes / 2**20, 3), "state_kv_bytes_per_token": kv_per_token,
            "state_fixed_mib": round((state.nbytes - kv_per_token * n_tokens) / 2**20, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, nargs="+", default=[62_500, 250_000, 1_000_000])
    parser.add_argument("--model", default=str(ROOT / "models" / "picaso-mini"))
    parser.add_argument("--segment", type=int, default=8192, help="engine.encode_segment_tokens")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "long_document_memory_cpu.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args.chars[0], args.model, args.segment)))
        return
    runs = []
    for chars in args.chars:
        done = subprocess.run([sys.executable, __file__, "--child", "--chars", str(chars), "--model", args.model,
                               "--segment", str(args.segment)], capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(runs[-1], flush=True)
    import torch

    record = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {_cores()} cores, no GPU",
              "torch": torch.__version__, "model": Path(args.model).name, "command": "python benchmarks/long_document_memory.py "
              + " ".join(sys.argv[1:]), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    main()
