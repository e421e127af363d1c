"""Composition: weights against brute force over orders, and states against real concatenation."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch

from picaso_rag import PicasoError, StateMismatchError, compose, log_weights
from picaso_rag.compose import canonical_order

from .conftest import TEXTS, make_engine


def brute_force_log_weights(log_decay: list[float], orders) -> list[float]:
    """log of the mean over `orders` of CASO weights, W_k(order) = prod of decays read after k."""
    n = len(log_decay)
    per_order = []
    for order in orders:
        w = [0.0] * n
        for pos, k in enumerate(order):
            w[k] = math.fsum(log_decay[j] for j in order[pos + 1:])
        per_order.append(w)
    t = torch.tensor(per_order, dtype=torch.float64)
    return (torch.logsumexp(t, dim=0) - math.log(len(per_order))).tolist()


def rotations(n: int):
    return [[(start + i) % n for i in range(n)] for start in range(n)]


DECAY_SETS = {
    "moderate": lambda n, g: (-torch.rand(n, generator=g, dtype=torch.float64) * 3).tolist(),
    "near_one": lambda n, g: (-torch.rand(n, generator=g, dtype=torch.float64) * 1e-4).tolist(),
    "extreme": lambda n, g: [-10_000.0 * (i % 2) - 1e-3 * i - torch.rand(1, generator=g).item() * 50 * ((i + 1) % 2) for i in range(n)],
    "all_extreme": lambda n, g: [-10_000.0 - i for i in range(n)],
}


@pytest.mark.parametrize("n", range(1, 8))
@pytest.mark.parametrize("kind", DECAY_SETS)
def test_picaso_weights_equal_brute_force(n, kind):
    g = torch.Generator().manual_seed(n)
    la = DECAY_SETS[kind](n, g)
    got_s = log_weights(torch.tensor(la, dtype=torch.float64), "picaso-s")
    got_r = log_weights(torch.tensor(la, dtype=torch.float64), "picaso-r")
    assert torch.isfinite(got_s).all() and torch.isfinite(got_r).all()
    want_s = torch.tensor(brute_force_log_weights(la, itertools.permutations(range(n))), dtype=torch.float64)
    want_r = torch.tensor(brute_force_log_weights(la, rotations(n)), dtype=torch.float64)
    # compare the weights themselves (relative error), not only their logs
    torch.testing.assert_close(got_s.exp(), want_s.exp(), rtol=1e-9, atol=0)
    torch.testing.assert_close(got_r.exp(), want_r.exp(), rtol=1e-9, atol=0)
    # caso: one order, the identity
    torch.testing.assert_close(log_weights(torch.tensor(la, dtype=torch.float64), "caso").exp(),
                               torch.tensor(brute_force_log_weights(la, [list(range(n))]), dtype=torch.float64).exp(), rtol=1e-9, atol=0)


def test_weight_limits_and_vectorisation():
    n = 5
    assert torch.allclose(log_weights(torch.full((n,), -1e4), "picaso-s").exp(), torch.full((n,), 1 / n, dtype=torch.float64))
    assert torch.allclose(log_weights(torch.zeros(n), "picaso-s").exp(), torch.ones(n, dtype=torch.float64))
    assert torch.allclose(log_weights(torch.zeros(n), "picaso-r").exp(), torch.ones(n, dtype=torch.float64))
    # batched over layers and heads: each row equals its own computation
    la = -torch.rand(3, 4, n) * 5
    batched = log_weights(la, "picaso-s")
    for i, j in itertools.product(range(3), range(4)):
        torch.testing.assert_close(batched[i, j], log_weights(la[i, j], "picaso-s"))


def test_soup_is_the_mean(engine):
    states = engine.encode(TEXTS[:4])
    soup = compose(states, "soup")
    torch.testing.assert_close(soup.ssm, torch.stack([s.ssm for s in states]).mean(0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["picaso-s", "picaso-r", "soup"])
def test_composed_state_identical_for_every_order(engine, method):
    states = engine.encode(TEXTS[:4])
    first = compose(states, method)
    for order in itertools.permutations(range(4)):
        other = compose([states[i] for i in order], method)
        assert torch.equal(other.ssm, first.ssm) and torch.equal(other.conv, first.conv)
        assert torch.equal(other.log_decay, first.log_decay)


def test_caso_depends_on_order(engine):
    states = engine.encode(TEXTS[:3])
    assert not torch.allclose(compose(states, "caso").ssm, compose(states[::-1], "caso").ssm)


def _concat_state(engine, texts, order):
    ids = [t for i in order for t in engine.tokenize(texts[i])]
    return engine.encode([ids])[0]


def test_caso_equals_concatenation_on_exact_model(exact_engine):
    """One layer, d_conv=1: composition is exact (docs/method.md)."""
    texts = TEXTS[:4]
    caso = compose(exact_engine.encode(texts), "caso")
    concat = _concat_state(exact_engine, texts, range(4))
    torch.testing.assert_close(caso.ssm, concat.ssm, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(caso.log_decay, concat.log_decay, rtol=1e-5, atol=1e-5)
    assert caso.n_tokens == concat.n_tokens


@pytest.mark.parametrize("method,orders", [("picaso-s", lambda n: itertools.permutations(range(n))), ("picaso-r", rotations)])
def test_picaso_equals_mean_of_concatenations_on_exact_model(exact_engine, method, orders):
    states = exact_engine.encode(TEXTS[:4])
    # PICASO-R averages the rotations of one cyclic order: the canonical (content-sorted) one
    order = canonical_order(torch.stack([s.log_decay for s in states]), [s.n_tokens for s in states])
    texts = [TEXTS[i] for i in order]
    prefix = exact_engine.encode(["Context information is below."])[0]
    got = compose(states, method, prefix=prefix)
    prefix_ids = exact_engine.tokenize("Context information is below.")
    concat_states = []
    for order in orders(len(texts)):
        ids = prefix_ids + [t for i in order for t in exact_engine.tokenize(texts[i])]
        concat_states.append(exact_engine.encode([ids])[0].ssm)
    torch.testing.assert_close(got.ssm, torch.stack(concat_states).mean(0), rtol=1e-4, atol=1e-5)


def test_composition_gap_on_general_model_is_reported(engine, record_property):
    """Above one layer (and with the conv window) composition is approximate: measure, don't hide, and
    bound it. CASO of TEXTS[:4] against their concatenation on the session's seeded model (2 layers,
    d_conv 4): relative SSM-state gap 0.560 (layers 0.494, 0.677; each document's first three tokens
    see the previous one's last through the conv window, and "Ok." is all window). Broken compositions
    of the same states land far above the bound: the last document dropped 0.73, the own decay in each
    weight 0.81, PICASO-S's weights 0.80, soup's 0.84, documents 2 and 3 swapped 0.94, the order
    reversed 1.22, a plain sum 1.46. (Dropping the first or a middle document, weights 0.11 and 0.25,
    moves it by 0.01 to 0.02 only, within this model's error: the exact model's tests catch that.)"""
    texts = TEXTS[:4]
    caso = compose(engine.encode(texts), "caso", conv="last")
    concat = _concat_state(engine, texts, range(4))
    gap = ((caso.ssm - concat.ssm).norm() / concat.ssm.norm()).item()
    per_layer = [((caso.ssm[i] - concat.ssm[i]).norm() / concat.ssm[i].norm()).item() for i in range(caso.ssm.shape[0])]
    record_property("caso_vs_concat_relative_gap", gap)
    print(f"\nCASO vs concatenation, 2-layer d_conv=4 model: relative state gap {gap:.3e}, per layer {per_layer}")
    # above: the comparison is not degenerate (composition is not exact here); below: no broken composition
    assert 0.1 < gap < 0.64, f"relative gap {gap:.4f}: expected about 0.560 (per layer {per_layer})"


@pytest.mark.parametrize("method", ["caso", "picaso-s", "picaso-r", "soup"])
def test_one_document_equals_concatenation(engine, method):
    doc, query = TEXTS[2], " Question: where does it happen? Answer:"
    context = engine.compose(engine.encode([doc]), method)
    got, _ = engine.read(query, state=context)
    whole, _ = engine.read(engine.tokenize(doc) + engine.tokenize(query))
    torch.testing.assert_close(got, whole[-len(engine.tokenize(query)):], rtol=1e-4, atol=1e-5)


def test_prefix_with_no_documents_is_the_prefix(engine):
    prefix = engine.encode(["Context:"])[0]
    assert compose([], "picaso-s", prefix=prefix) is prefix
    with pytest.raises(PicasoError, match="nothing to compose"):
        compose([], "picaso-s")


def test_bad_composition_input(engine, tokenizer):
    states = engine.encode(TEXTS[:2])
    with pytest.raises(PicasoError, match="unknown composition method 'picaso'"):
        compose(states, "picaso")
    with pytest.raises(PicasoError, match="conv='last' depends on document order"):
        compose(states, "picaso-s", conv="last")
    with pytest.raises(PicasoError, match="unknown conv-state policy"):
        compose(states, "caso", conv="first")
    other = make_engine(tokenizer, seed=7)
    with pytest.raises(StateMismatchError, match="different models"):
        compose(states + other.encode(TEXTS[:1]), "picaso-s")
    with pytest.raises(StateMismatchError, match="another model"):
        engine.read("hello", state=other.encode(["x y"])[0])
    with pytest.raises(StateMismatchError, match="another model"):
        engine.compose(other.encode(TEXTS[:1]))
    nan_state = replace(states[0], ssm=torch.full_like(states[0].ssm, float("nan")))
    with pytest.raises(PicasoError, match="NaN"):
        compose([nan_state, states[1]], "picaso-s")
    bad_decay = replace(states[0], log_decay=states[0].log_decay.abs() + 1)
    with pytest.raises(PicasoError, match="positive log_decay"):
        compose([bad_decay, states[1]], "picaso-r")
