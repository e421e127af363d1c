"""GPU check of hybrid states in storage and of the benchmarks that take hybrid checkpoints (< 60 s).

Run on the GPU machine after ``bash scripts/gpu_setup.sh build``::

    PYTHONPATH=. python benchmarks/hybrid_states_gpu_check.py --out $OUT/hybrid_states_gpu_check.json

1. States of our 12-layer hybrid's shape (random bf16 weights, layers 5 and 11 attention) encoded on
   the GPU: fp8 quantisation on the GPU gives the very bytes it gives on the CPU; a store round trip
   at fp32 / bf16 / fp8 reads back on the GPU. Reported, not asserted (a random 12-layer model at
   init std 0.1 amplifies perturbations more than a trained one): how far the query's logits move,
   relative to what the documents move them, and the KL divergence (nats/token), for states stored
   in bf16 / fp8, and for fp8 split into its parts (SSM tensors only, keys and values only).
2. benchmarks/latency.py (a random Mamba-2 130m against mamba_ssm, then a tiny hybrid checkpoint)
   and benchmarks/miss_latency.py (the tiny hybrid) at small settings: they run on CUDA, no error.
``--device cpu`` runs part 1 on the CPU (docs/results/hybrid-states-cpu.json; tests/test_hybrid_benchmarks.py
runs it on a tiny shape).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from picaso_rag import PicasoEngine, StateStore, Tokenizer  # noqa: E402
from picaso_rag.hybrid import HybridLM, init_weights  # noqa: E402
from picaso_rag.hybrid_config import HybridConfig  # noqa: E402
from picaso_rag.loading import save_hybrid_checkpoint  # noqa: E402
from picaso_rag.precision import quantize, roundtrip  # noqa: E402

TOKENIZER = ROOT.parent / "shared" / "data" / "gpt-neox-20b-tokenizer.json"


def ours(d_model: int = 384, vocab: int = 50288) -> HybridConfig:
    """Our 12-layer hybrid's shape (picaso_rag.training --attn-layers 5 11)."""
    return HybridConfig(family="picaso_hybrid", vocab_size=vocab, d_model=d_model,
                        layer_types=tuple("attention" if i in (5, 11) else "mamba" for i in range(12)),
                        d_state=128, headdim=64, n_heads=d_model // 64, n_kv_heads=d_model // 64, head_dim=64)


def check_states(device: str, tokenizer: Tokenizer, cfg: HybridConfig | None = None, doc_tokens: int = 512) -> dict:
    """Part 1 (see the module docstring); returns the figures, raises AssertionError on a failed check."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = init_weights(HybridLM(cfg or ours()), seed=0, std=0.1).to(device=device, dtype=dtype)
    engine = PicasoEngine(model, tokenizer)
    g = torch.Generator().manual_seed(0)
    docs = torch.randint(0, 50000, (4, doc_tokens), generator=g).tolist()
    query = torch.randint(0, 50000, (16,), generator=g).tolist()
    states = engine.encode(docs)
    machine = f"this CPU machine ({platform.machine()}, {torch.get_num_threads()} threads)"
    out: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else machine, "doc_tokens": doc_tokens,
                 "state_MiB": states[0].nbytes / 2**20}
    here, there = quantize(states[0], "fp8"), quantize(states[0].to("cpu"), "fp8")
    out["fp8_same_bytes_as_cpu"] = all(torch.equal(here[n].cpu().view(torch.uint8) if here[n].dtype != torch.float32
                                                   else here[n].cpu(), there[n].view(torch.uint8) if there[n].dtype != torch.float32
                                                   else there[n]) for n in here)
    assert out["fp8_same_bytes_as_cpu"], "fp8 quantisation differs between the GPU and the CPU"
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16", "fp8"):
            store = StateStore(Path(tmp) / precision, precision=precision)
            start = time.perf_counter()
            store.put("n", states[0])
            found = store.get("n", engine.fingerprint)
            assert found.ok, (precision, found.detail)
            back = found.state.to(device, dtype=dtype)
            want = roundtrip(states[0], precision, dtype=dtype)
            assert all(torch.equal(t, want.tensors()[name]) for name, t in back.tensors().items()), precision
            out[f"store_{precision}_roundtrip_ms"] = (time.perf_counter() - start) * 1000
            out[f"store_{precision}_file_MiB"] = store.path("n", engine.fingerprint).stat().st_size / 2**20
    reference, _ = engine.read(query, state=engine.compose(states))
    alone, _ = engine.read(query)
    signal = float((reference - alone).abs().max())
    fp8 = [roundtrip(s, "fp8") for s in states]
    variants = {"bf16": [roundtrip(s, "bf16") for s in states], "fp8": fp8,
                "fp8_ssm_only": [replace(q, keys=s.keys, values=s.values) for q, s in zip(fp8, states)],
                "fp8_keys_values_only": [replace(s, keys=q.keys, values=q.values) for q, s in zip(fp8, states)]}
    for name, stored_states in variants.items():
        stored, _ = engine.read(query, state=engine.compose(stored_states))
        log_p, log_q = reference.float().log_softmax(-1), stored.float().log_softmax(-1)
        out[f"{name}_logit_change_over_documents_effect"] = float((stored - reference).abs().max()) / signal
        out[f"{name}_kl_max"] = float((log_p.exp() * (log_p - log_q)).sum(-1).max())
        out[f"{name}_kl_mean"] = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, default=Path("hybrid_states_gpu_check.json"))
    args = parser.parse_args()
    tokenizer = Tokenizer.from_file(TOKENIZER)
    result = {"command": " ".join(["python", "benchmarks/hybrid_states_gpu_check.py", *sys.argv[1:]]),
              "model": "random weights (init std 0.1), our 12-layer hybrid's shape (layers 5 and 11 attention, 6 heads x 64), "
                       "4 documents of 512 random tokens, a 16-token query",
              "states": check_states(args.device, tokenizer), "benchmarks": {}}
    print(json.dumps(result["states"], indent=1), flush=True)
    if args.device == "cuda":
        with tempfile.TemporaryDirectory() as tmp:
            tiny = HybridConfig(family="picaso_hybrid", vocab_size=50288, d_model=64, layer_types=("mamba", "attention") * 2,
                                n_heads=4, n_kv_heads=2, head_dim=16, d_state=16, headdim=16, ngroups=1, chunk_size=16)
            checkpoint = save_hybrid_checkpoint(init_weights(HybridLM(tiny), seed=0), tokenizer, Path(tmp) / "tiny-hybrid")
            small = ["--ks", "1,2", "--doc-tokens", "512", "--encode-batch", "4", "--answer-tokens", "8", "--repeats", "2"]
            runs = {"latency_mamba2_130m": ["benchmarks/latency.py", "--tokenizer", str(TOKENIZER), "--shapes", "130m", *small],
                    "latency_tiny_hybrid": ["benchmarks/latency.py", "--model", str(checkpoint), *small],
                    "miss_latency_tiny_hybrid": ["benchmarks/miss_latency.py", "--model", str(checkpoint), "--k", "4",
                                                 "--doc-tokens", "256", "--missing", "0,2", "--repeats", "2"]}
            for name, command in runs.items():
                out = Path(tmp) / f"{name}.json"
                start = time.perf_counter()
                done = subprocess.run([sys.executable, *command, "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
                record = {"returncode": done.returncode, "seconds": round(time.perf_counter() - start, 1),
                          "tail": (done.stdout + done.stderr)[-1500:]}
                if out.exists():
                    record["result"] = json.loads(out.read_text())
                result["benchmarks"][name] = record
                print(name, record["returncode"], record["seconds"], "s", flush=True)
    args.out.write_text(json.dumps(result, indent=1))
    failed = [n for n, r in result["benchmarks"].items() if r["returncode"] != 0
              or any("error" in s for s in r.get("result", {}).get("shapes", []))]
    print("failed:", failed or "none")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
