"""The shipped model, where quality matters: it loads within budget and uses what it reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from picaso_rag import PicasoEngine

from .conftest import TEST_DATA

MODEL = Path(__file__).resolve().parents[1] / "models" / "picaso-mini"


@pytest.fixture(scope="module")
def mini() -> PicasoEngine:
    return PicasoEngine.from_pretrained(MODEL)


def test_shipped_files_fit_the_40_mb_budget():
    assert sum(f.stat().st_size for f in MODEL.iterdir()) <= 40e6


def _nll(engine: PicasoEngine, target: list[int], state=None) -> float:
    logits, _ = engine.read(target[:-1], state=state)
    return F.cross_entropy(logits, torch.tensor(target[1:])).item()


def test_context_lowers_the_loss_and_picaso_is_order_free(mini):
    """WikiText-2 test passages (never trained on): the first half, composed with an unrelated
    passage, makes the second half more likely; PICASO-S gives the same loss in either order."""
    ids = mini.tokenize((TEST_DATA / "wikitext-2-raw-test-excerpt.txt").read_text(encoding="utf-8"))
    S = 96
    passages = [ids[i:i + 2 * S] for i in range(0, 6 * 2 * S, 2 * S)]
    sep = mini.tokenize("\n\n")
    gains = []
    for j, passage in enumerate(passages[:4]):
        first, second = passage[:S], passage[S:]
        distractor = passages[5 - j][:S]
        states = mini.encode([first + sep, distractor + sep])
        none = _nll(mini, second)
        forward = _nll(mini, second, mini.compose(states, "picaso-s"))
        backward = _nll(mini, second, mini.compose(states[::-1], "picaso-s"))
        assert forward == backward
        gains.append(none - forward)
    assert sum(gains) / len(gains) > 0.1, gains  # nats/token; 0.38 on the full protocol at k=2


def _answer_nll(engine: PicasoEngine, prompt: str, answer: str, state) -> float:
    prompt_ids, answer_ids = engine.tokenize(prompt), engine.tokenize(answer)
    logits, _ = engine.read(prompt_ids + answer_ids[:-1], state=state)
    return F.cross_entropy(logits[len(prompt_ids) - 1:], torch.tensor(answer_ids)).item()


def test_answers_use_the_retrieved_document(mini):
    """Facts stated only in the document become far more likely once its state is composed in."""
    docs = ["The Rosetta Stone, found in 1799, carries the same decree in hieroglyphic, Demotic and ancient Greek "
            "script. It allowed Jean-Francois Champollion to decipher Egyptian hieroglyphs in 1822.\n\n",
            "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris. It was completed in 1889 "
            "as the entrance arch of the World's Fair. It is 330 metres tall.\n\n"]
    states = mini.encode(docs)
    cases = [(0, "The Rosetta Stone was found in", " 1799"),
             (0, "Egyptian hieroglyphs were deciphered by Jean-Francois", " Champollion"),
             (1, "The Eiffel Tower is", " 330 metres tall")]
    for i, prompt, answer in cases:
        with_doc = _answer_nll(mini, prompt, answer, mini.compose([states[i], states[1 - i]], "picaso-s"))
        without = _answer_nll(mini, prompt, answer, mini.compose([states[1 - i]], "picaso-s"))
        print(f"{prompt!r} -> {answer!r}: {with_doc:.2f} vs {without:.2f} nats/token")
        assert with_doc < without - 0.5, (prompt, with_doc, without)  # nats per answer token
