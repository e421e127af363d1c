"""The evaluation harness (benchmarks/quality.py) on a tiny model and tiny data."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from .conftest import TEST_DATA, make_engine

spec = importlib.util.spec_from_file_location("quality", Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py")
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)


@pytest.fixture(scope="module")
def setup(tokenizer):
    engine = make_engine(tokenizer, seed=5)
    g = torch.Generator().manual_seed(0)
    segments = torch.randint(0, 50000, (2 * 6, 10), generator=g)  # 6 passages of 2 x 10 tokens
    retrieved = torch.stack([torch.randperm(12, generator=g)[:3] for _ in range(6)])
    return engine, segments, retrieved


def test_every_method_runs_and_the_identities_hold(setup):
    engine, segments, retrieved = setup
    results = quality.evaluate(engine, segments, retrieved, [0, 1, 3], list(quality.METHODS), batch_size=4)
    assert set(results["0"]) == {"none"}  # k = 0 is no context, whatever the method
    assert set(results["3"]) == set(quality.METHODS) - {"none"}
    one = results["1"]  # one document: every method is exact
    for method in ("concat", "caso", "picaso-s", "picaso-r", "soup"):
        assert one[method]["nll"] == pytest.approx(one["concat"]["nll"], abs=1e-5), method
    assert results["3"]["concat-shuffled"]["nll_std_over_orders"] is not None
    table = quality.markdown_table(results, list(quality.METHODS))
    assert table.count("\n") == 4


def test_k0_equals_plain_reading(setup):
    engine, segments, retrieved = setup
    results = quality.evaluate(engine, segments, retrieved, [0], ["none"], batch_size=4)
    targets = segments[1::2]
    logits = engine.model(targets[:, :-1]).logits
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[:, 1:].flatten()).item()
    assert results["0"]["none"]["nll"] == pytest.approx(nll, rel=1e-5)


def test_picaso_scores_do_not_change_with_retrieval_order(setup):
    engine, segments, retrieved = setup
    methods = ["picaso-s", "picaso-r", "soup", "caso"]
    forward = quality.evaluate(engine, segments, retrieved, [3], methods, batch_size=4)["3"]
    backward = quality.evaluate(engine, segments, retrieved.flip(1), [3], methods, batch_size=4)["3"]
    for method in ("picaso-s", "picaso-r", "soup"):
        assert forward[method]["nll"] == backward[method]["nll"], method
    print(f"\nCASO forward {forward['caso']['nll']:.5f} vs reversed {backward['caso']['nll']:.5f} (order-dependent)")


def test_wikitext_articles_and_segments(tokenizer):
    """On a committed excerpt of WikiText-2 test (the benchmark reads the whole split from ../shared):
    one article per top-level heading, each starting at its heading; every passage of two 64-token
    halves that fits an article, and nothing across articles."""
    path = TEST_DATA / "wikitext-2-raw-test-excerpt.txt"
    headings = [line for line in path.read_text(encoding="utf-8").splitlines() if re.fullmatch(r" = [^=].* = ", line)]
    articles = quality.wikitext_articles(path)
    assert len(articles) == len(headings) >= 2
    assert [a.splitlines()[0].strip() for a in articles] == [h.strip() for h in headings]
    engine = make_engine(tokenizer)
    segments = quality.make_segments(engine, 64, path)
    expected_rows = sum(2 * (len(engine.tokenize(a)) // 128) for a in articles)
    assert segments.shape == (expected_rows, 64) and expected_rows >= 20
    first = engine.tokenize(articles[0])
    assert segments[0].tolist() == first[:64] and segments[1].tolist() == first[64:128]


def test_hybrid_models_are_scored_in_batches_with_the_identities(tokenizer):
    """A hybrid's composed rows are read as one batch (keys of equal length): the scores equal reading
    row by row, and with one document every method equals the concatenation."""
    from picaso_rag import PicasoEngine
    from picaso_rag.hybrid import HybridLM, init_weights
    from picaso_rag.hybrid_config import HybridConfig

    cfg = HybridConfig(family="picaso_hybrid", vocab_size=50288, d_model=32, layer_types=("mamba", "attention"),
                       d_state=8, headdim=16, chunk_size=8, n_heads=2, n_kv_heads=2, head_dim=16)
    engine = PicasoEngine(init_weights(HybridLM(cfg), seed=1, std=0.1), tokenizer)
    g = torch.Generator().manual_seed(0)
    segments = torch.randint(0, 50000, (2 * 5, 8), generator=g)
    retrieved = torch.stack([torch.randperm(10, generator=g)[:3] for _ in range(5)])
    methods = ["concat", "caso", "picaso-s", "picaso-r", "soup"]
    batched = quality.evaluate(engine, segments, retrieved, [1, 3], methods, batch_size=5)
    for method in methods:
        assert batched["1"][method]["nll"] == pytest.approx(batched["1"]["concat"]["nll"], abs=1e-5), method
    one_by_one = quality.evaluate(engine, segments, retrieved, [3], methods, batch_size=1)
    for method in methods:
        assert batched["3"][method]["nll"] == pytest.approx(one_by_one["3"][method]["nll"], rel=1e-5), method
