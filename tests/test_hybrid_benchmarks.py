"""The benchmarks take a hybrid checkpoint unchanged: the cheapest ones run on a tiny random hybrid (CPU).

latency.py (--device cpu), miss_latency.py, cache_sim.py on miss_latency's result, state_precision.py
(--configs); llamaindex_query_time.py and long_document_memory.py take the same --model but cost a
minute each (a LlamaIndex ingest, a long document), so they are left to a manual run.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from picaso_rag.hybrid import HybridLM, init_weights
from picaso_rag.hybrid_config import HybridConfig
from picaso_rag.loading import save_hybrid_checkpoint
from picaso_rag.precision import kv_nbytes_per_token

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name: str, monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{name}.py", *argv])
    benchmark(name).main()


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory) -> Path:
    cfg = HybridConfig(family="picaso_hybrid", vocab_size=50288, d_model=32, layer_types=("mamba", "attention"),
                       n_heads=2, n_kv_heads=2, head_dim=16, d_state=8, headdim=16, ngroups=1, chunk_size=16)
    return save_hybrid_checkpoint(init_weights(HybridLM(cfg), seed=0), tokenizer, tmp_path_factory.mktemp("ckpt") / "tiny-hybrid")


def test_miss_latency_then_cache_sim_with_a_hybrid(checkpoint, tmp_path, monkeypatch):
    costs = tmp_path / "miss.json"
    run("miss_latency", monkeypatch, "--model", str(checkpoint), "--k", "2", "--doc-tokens", "24", "--query-tokens", "4",
        "--missing", "0,2", "--repeats", "1", "--out", str(costs))
    measured = json.loads(costs.read_text())
    assert measured["hybrid"] and [r["missing"] for r in measured["runs"]] == [0, 2, 0, 2]
    assert measured["writer"]["failed"] == 0 and measured["writer"]["written"] > 0  # hybrid states written back
    assert measured["state_bytes"]["fp8"] < measured["state_bytes"]["bf16"]
    run("cache_sim", monkeypatch, "--costs", str(costs), "--docs", "300", "--queries", "50", "--exponents", "1.0",
        "--out", str(tmp_path / "sim"))
    report = json.loads((tmp_path / "sim.json").read_text())
    assert report["state_bytes"] == measured["state_bytes"] and report["model"] == str(checkpoint)


def test_latency_on_the_cpu_with_a_hybrid(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "latency.json"
    run("latency", monkeypatch, "--device", "cpu", "--model", str(checkpoint), "--ks", "2", "--doc-tokens", "16",
        "--encode-batch", "1", "--answer-tokens", "2", "--query-tokens", "4", "--repeats", "1", "--methods", "picaso-s",
        "--out", str(out))
    shape = json.loads(out.read_text())["shapes"][0]
    assert "error" not in shape, shape.get("error")
    assert shape["hybrid"] and shape["runs"][0]["picaso-s_disk_ttft_ms"] > 0 and "decode_vs_mamba_ssm" not in shape["decode"]


def test_state_precision_reports_bytes_per_token_of_a_hybrid(checkpoint, tmp_path, monkeypatch):
    run("state_precision", monkeypatch, "--configs", str(checkpoint / "config.json"), "--out", str(tmp_path / "sp"))
    report = json.loads((tmp_path / "sp.json").read_text())
    row = report["hybrid_bytes"]["tiny-hybrid"]
    cfg = HybridConfig.from_dict(json.loads((checkpoint / "config.json").read_text()))
    assert row["bytes_per_token"] == {p: kv_nbytes_per_token(cfg, p) for p in ("fp32", "bf16", "fp8")} == \
        {"fp32": 256, "bf16": 128, "fp8": 64}
    ours = report["hybrid_bytes"]["picaso-hybrid-12"]  # the figure docs/hybrids.md cites
    assert ours["bytes_per_token"]["bf16"] == 3072 and ours["ssm_layers"] == 10


def test_the_gpu_check_of_hybrid_states_runs_its_cpu_path(tokenizer):
    check = benchmark("hybrid_states_gpu_check")
    cfg = HybridConfig(family="picaso_hybrid", vocab_size=50288, d_model=64, layer_types=("mamba", "attention"),
                       n_heads=4, n_kv_heads=2, head_dim=16, d_state=16, headdim=16, ngroups=1, chunk_size=16)
    out = check.check_states("cpu", tokenizer, cfg, doc_tokens=32)
    assert out["fp8_same_bytes_as_cpu"] and out["store_fp8_file_MiB"] < out["store_bf16_file_MiB"] < out["store_fp32_file_MiB"]
    assert 0 < out["fp8_keys_values_only_kl_max"] and 0 < out["bf16_logit_change_over_documents_effect"] < 1
