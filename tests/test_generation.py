"""Generation from a state: greedy, sampling, EOS, stop strings, streaming."""

from __future__ import annotations

import pytest
import torch

from picaso_rag import PicasoError
from picaso_rag.generation import TextStream

from .conftest import TEXTS


@pytest.fixture(scope="module")
def context(engine):
    return engine.compose(engine.encode(TEXTS[:3]), "picaso-s")


def test_greedy_equals_argmax_of_reading_the_generated_text(engine, context):
    prompt = engine.tokenize(" Question: what is Mamba? Answer:")
    gen = engine.generate(prompt, state=context, max_new_tokens=8)
    assert gen.n_prompt_tokens == len(prompt) and gen.finish_reason == "length"
    # the decoding loop (recurrent steps) against one chunked prefill of prompt + output
    logits, _ = engine.read(prompt + gen.token_ids[:-1], state=context)
    assert logits[len(prompt) - 1:].argmax(-1).tolist() == gen.token_ids


def test_stream_pieces_join_to_generate_text(engine, context):
    prompt = " The answer is"
    pieces = list(engine.stream(prompt, state=context, max_new_tokens=10))
    assert "".join(pieces) == engine.generate(prompt, state=context, max_new_tokens=10).text
    assert len(pieces) >= 2  # it streams, not one blob at the end


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(engine, context):
    a = engine.generate(" Hello", state=context, max_new_tokens=8, temperature=1.0, seed=3)
    b = engine.generate(" Hello", state=context, max_new_tokens=8, temperature=1.0, seed=3)
    assert a.token_ids == b.token_ids
    greedy = engine.generate(" Hello", state=context, max_new_tokens=8)
    nucleus = engine.generate(" Hello", state=context, max_new_tokens=8, temperature=1.0, top_p=1e-9, seed=1)
    assert nucleus.token_ids == greedy.token_ids


def test_generation_does_not_change_the_context_state(engine, context):
    before = context.ssm.clone()
    engine.generate(" x", state=context, max_new_tokens=4)
    assert torch.equal(context.ssm, before)


def test_eos_ends_generation(engine, context):
    greedy = engine.generate(" Hi", state=context, max_new_tokens=6)
    first = greedy.token_ids[0]
    original = engine.tokenizer.eos_token_id
    engine.tokenizer.eos_token_id = first  # make the first greedy token the EOS
    try:
        gen = engine.generate(" Hi", state=context, max_new_tokens=6)
    finally:
        engine.tokenizer.eos_token_id = original
    assert gen.finish_reason == "eos" and gen.text == "" and gen.token_ids == []


def test_stop_strings_cut_text_in_stream_and_generate(engine, context):
    full = engine.generate(" Hi", state=context, max_new_tokens=12).text
    assert len(full) > 4
    stop = full[3:5]
    gen = engine.generate(" Hi", state=context, max_new_tokens=12, stop=[stop])
    assert gen.finish_reason == "stop" and gen.text == full[: full.index(stop)]
    assert "".join(engine.stream(" Hi", state=context, max_new_tokens=12, stop=[stop])) == gen.text


def test_text_stream_holds_back_partial_stop_and_utf8():
    pieces = {1: "Hel", 2: "lo ", 3: "EN", 4: "D!"}
    stream = TextStream(lambda ids: "".join(pieces[i] for i in ids), stop=["END"])
    assert stream.push(1) == "Hel"
    assert stream.push(2) == "lo "
    assert stream.push(3) == ""  # "EN" may start "END": held back
    assert stream.push(4) == "" and stream.stopped and stream.text == "Hello "
    newline_first = TextStream(lambda ids: "".join({1: "\n", 2: " Paris", 3: "\nmore"}[i] for i in ids), stop=["\n"])
    assert newline_first.push(1) == "\n" and not newline_first.stopped  # a leading newline does not end the answer
    assert newline_first.push(2) == " Paris"
    assert newline_first.push(3) == "" and newline_first.stopped and newline_first.text == "\n Paris"
    utf8 = TextStream(lambda ids: "é\ufffd" if len(ids) == 1 else "éà")
    assert utf8.push(1) == "" and utf8.push(2) == "éà"


@pytest.mark.parametrize("kwargs,match", [
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"stop": [""]}, "stop strings"),
])
def test_bad_sampling_arguments(engine, kwargs, match):
    with pytest.raises(PicasoError, match=match):
        engine.generate(" x", **kwargs)


def test_empty_prompt_is_an_error(engine):
    with pytest.raises(PicasoError, match="non-empty"):
        engine.generate("")
    with pytest.raises(PicasoError, match="non-empty"):
        engine.read("")


def test_the_earliest_stop_string_ends_the_text_whatever_their_order():
    from picaso_rag.generation import TextStream

    stream = TextStream(decode=lambda ids: "Paris. Then London", stop=["London", "."])
    stream.push(1)
    assert stream.stopped and stream.text == "Paris"
