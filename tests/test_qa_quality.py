"""The QA harness (benchmarks/qa_quality.py) on a tiny model and tiny data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from .conftest import TEST_DATA, TEXTS, make_engine

spec = importlib.util.spec_from_file_location("qa_quality", Path(__file__).resolve().parents[1] / "benchmarks" / "qa_quality.py")
qa = importlib.util.module_from_spec(spec)
spec.loader.exec_module(qa)

QUESTIONS = [
    {"question": "When was the tower completed?", "answers": ["1889"], "contexts": [0, 2, 1]},
    {"question": "Where does photosynthesis happen?", "answers": ["in chloroplasts"], "contexts": [2, 4, 0]},
]


@pytest.fixture(scope="module")
def engine(tokenizer):
    return make_engine(tokenizer, seed=6)


def test_every_method_and_the_one_document_identity(engine):
    results = qa.evaluate(engine, TEXTS, QUESTIONS, [0, 1, 3], list(qa.METHODS), max_new_tokens=2)
    assert set(results["0"]) == {"none"} and set(results["3"]) == set(qa.METHODS) - {"none"}
    one = results["1"]
    for method in ("caso", "picaso-s", "picaso-r", "soup", "concat-shuffled"):
        assert one[method]["answer_nll"] == pytest.approx(one["concat"]["answer_nll"], abs=1e-5), method
    for row in results.values():
        for r in row.values():
            assert 0 <= r["exact_match"] <= 1 and 0 <= r["f1"] <= 1


def test_picaso_does_not_depend_on_retrieval_order(engine):
    reversed_questions = [dict(q, contexts=q["contexts"][::-1]) for q in QUESTIONS]
    methods = ["picaso-s", "picaso-r", "soup"]
    forward = qa.evaluate(engine, TEXTS, QUESTIONS, [3], methods, max_new_tokens=2)["3"]
    backward = qa.evaluate(engine, TEXTS, reversed_questions, [3], methods, max_new_tokens=2)["3"]
    for method in methods:
        for score in ("answer_nll", "exact_match", "f1"):
            assert forward[method][score] == backward[method][score], (method, score)


def test_answer_normalisation_and_f1():
    assert qa.normalize("The  Eiffel-Tower!") == "eiffeltower"
    assert qa.f1("in the chloroplasts", "chloroplasts") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert qa.f1("nothing", "chloroplasts") == 0.0


def test_datasets_load():
    """The loaders on committed samples of the datasets (the benchmark reads them whole from ../shared)."""
    paragraphs, questions = qa.hotpotqa(limit=3, path=TEST_DATA / "hotpotqa-dev-distractor-3.json")
    assert len(questions) == 3 and len(paragraphs) == 30 and all(len(q["contexts"]) == 10 for q in questions)
    assert all(paragraphs[i].startswith(t + ": ") for q, raw in zip(questions, json.loads(
        (TEST_DATA / "hotpotqa-dev-distractor-3.json").read_text())) for i, t in zip(q["contexts"], raw["context"]["title"]))
    paragraphs, questions = qa.squad(limit=5, path=TEST_DATA / "squad-v2-dev-cs224n-3-paragraphs.json")
    assert len(paragraphs) == 3 and len(questions) == 5
    assert all(q["answers"] and all(a in paragraphs[q["gold"]] for a in q["answers"]) for q in questions)
