"""No request can make another fail, or hold up its tokens unboundedly (the scheduler, CPU).

Victims are greedy requests whose answers must equal engine.generate's alone, token for token,
while an attacker in the same batch sends what once failed or stalled every row: temperatures and
top_p values that overflow in float32, a sampler that raises, a prompt far longer than one read.
"""

from __future__ import annotations

import time

import pytest

from picaso_rag import Mamba2LM, PicasoEngine, PicasoError, SamplingParams, init_weights
from picaso_rag.scheduler import Scheduler

from .conftest import TEXTS, tiny_config

VICTIMS = [" Question: when was it built?\nAnswer:", " What is a state?", " Rivers"]


@pytest.fixture(scope="module")
def engine(tokenizer):
    return PicasoEngine(init_weights(Mamba2LM(tiny_config()), seed=0, std=0.2), tokenizer)


@pytest.fixture(scope="module")
def alone(engine):
    state = engine.compose(engine.encode(TEXTS[:3]))
    return state, [engine.generate(q, state=state, max_new_tokens=16).token_ids for q in VICTIMS]


@pytest.mark.parametrize("hostile", [dict(temperature=1e-300), dict(temperature=1e-38, top_p=1e-46),
                                     dict(temperature=0.7, top_p=1e-300), dict(temperature=2.0, top_p=5e-324)])
def test_extreme_sampling_values_neither_fail_nor_touch_the_others(engine, alone, hostile):
    state, expected = alone
    with Scheduler(engine, max_batch=4) as scheduler:
        attacker = scheduler.submit(" Rivers", state=state, max_new_tokens=16, seed=1, **hostile)
        victims = [scheduler.submit(q, state=state, max_new_tokens=16) for q in VICTIMS]
        results = [r.wait(60) for r in victims]
        attacker.wait(60)
    assert [r.token_ids for r in results] == expected
    assert attacker.error is None and attacker.result.finish_reason in ("length", "eos", "stop")


def test_a_request_whose_sampling_raises_fails_alone(engine, alone):
    state, expected = alone
    scheduler = Scheduler(engine, max_batch=4, start=False)
    attacker = scheduler.submit(" Rivers", state=state, max_new_tokens=16, temperature=0.8, seed=3)

    def broken(_logits):
        raise RuntimeError("a sampler that fails")

    attacker.sampler = broken
    victims = [scheduler.submit(q, state=state, max_new_tokens=16) for q in VICTIMS]
    with scheduler.start():
        results = [r.wait(60) for r in victims]
        with pytest.raises(RuntimeError, match="a sampler that fails"):
            attacker.wait(60)
    assert [r.token_ids for r in results] == expected
    assert isinstance(attacker.error, RuntimeError) and attacker.result.finish_reason == "error"
    assert scheduler.stats()["finished"]["error"] == 1


def test_stop_strings_are_bounded_in_length():
    SamplingParams(stop=["x" * 256] * 4)
    with pytest.raises(PicasoError, match="at most 256 characters"):
        SamplingParams(stop=["x" * 257])


def test_a_long_prompt_is_read_in_chunks_between_the_others_decode_steps(engine, alone, tokenizer):
    """A prompt of ten chunks (as concatenated documents make) never holds up a decoding row for
    more than one chunk: the victim gets a token after every chunk read."""
    state, expected = alone
    long_prompt = (tokenizer.encode(" ".join(TEXTS)) * 40)[:10 * 64]
    with Scheduler(engine, max_batch=4, prefill_chunk_tokens=64) as scheduler:
        victim = scheduler.submit(VICTIMS[0], state=state, max_new_tokens=200)
        while not victim.timings.token_times:  # the victim is decoding
            time.sleep(0.001)
        attacker = scheduler.submit(long_prompt, state=None, max_new_tokens=4)
        attacker.wait(120)
        victim.wait(120)
        stats = scheduler.stats()
    assert stats["prefill_chunks"] == 9  # the last 64 tokens join as a prompt
    during = [t for t in victim.timings.token_times if attacker.timings.submitted <= t <= attacker.timings.read]
    assert len(during) >= 9, len(during)  # a decode step after every chunk
    # the chunked read is the same reading: the attacker's answer is the one it gets alone
    assert attacker.result.token_ids == engine.generate(long_prompt, max_new_tokens=4).token_ids
    assert attacker.result.n_prompt_tokens == len(long_prompt)
    assert victim.result.token_ids[:16] == expected[0]
