"""Issue 12 (hardening, round 2), long documents: encoding reads a long document in segments that
carry the state (memory of one segment, whatever the length), the reference scan works in blocks of
chunks (its segment-sum matrix never spans the whole sequence), and a document above the engine's
cap is refused up front with an error that names the fix. Results equal the unsegmented ones.
"""

from __future__ import annotations

import pytest
import torch

from picaso_rag import PicasoError
from picaso_rag.errors import DocumentTooLongError
from picaso_rag.kernels import ssd

from .conftest import TEXTS, make_engine

LONG = " ".join(TEXTS) * 12  # ~900 tokens: ~57 chunks of the tiny model (chunk_size 16)


@pytest.fixture()
def fresh_engine(tokenizer):
    return make_engine(tokenizer)  # limits are per engine: tests change them freely


def assert_close(a, b):
    assert a.n_tokens == b.n_tokens
    for name in ("ssm", "conv", "log_decay"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-5), (name, (x - y).abs().max())


def test_segmented_encoding_equals_one_pass(fresh_engine):
    texts = [LONG, TEXTS[0], LONG[: len(LONG) // 2], TEXTS[3]]  # mixed lengths: padded rows end in different segments
    one_pass = fresh_engine.encode(texts)  # every text under the default segment (8192 tokens)
    fresh_engine.encode_segment_tokens = 40  # rounded down to 32 (whole chunks of 16)
    segmented = fresh_engine.encode(texts)
    for a, b in zip(segmented, one_pass):
        assert_close(a, b)
    # and the concatenation identity: the state after reading the text in one prefill (engine.read)
    _, read_state = fresh_engine.read(LONG)
    assert_close(segmented[0], read_state)


def test_encoding_never_reads_more_than_a_segment(fresh_engine, monkeypatch):
    """What makes memory linear (flat): the model and the scan never see more than one segment or block."""
    fresh_engine.encode_segment_tokens = 64
    seen_model, seen_scan = [], []
    forward = fresh_engine.model.forward
    block = ssd._chunk_scan_block

    def spy_forward(ids, *args, **kwargs):
        seen_model.append(ids.shape[1])
        return forward(ids, *args, **kwargs)

    def spy_block(x, *args, **kwargs):
        seen_scan.append(x.shape[1])
        return block(x, *args, **kwargs)

    monkeypatch.setattr(fresh_engine.model, "forward", spy_forward)
    monkeypatch.setattr(ssd, "_chunk_scan_block", spy_block)
    state = fresh_engine.encode([LONG])[0]
    assert state.n_tokens > 300 and max(seen_model) == 64 and len(seen_model) == -(-state.n_tokens // 64)
    assert max(seen_scan) <= 64


def test_reference_scan_in_blocks_equals_one_block():
    torch.manual_seed(0)
    b, l, h, p, g, n = 2, 150, 4, 8, 2, 16
    x, dt = torch.randn(b, l, h, p), torch.rand(b, l, h) * 0.2
    A, D = -torch.rand(h) * 4, torch.randn(h)
    B, C, start = torch.randn(b, l, g, n), torch.randn(b, l, g, n), torch.randn(b, h, p, n)
    y_one, final_one = ssd.chunk_scan_ref(x, dt, A, B, C, D, 16, start, block_tokens=1 << 20)
    for block_tokens in (16, 40, 64):
        y, final = ssd.chunk_scan_ref(x, dt, A, B, C, D, 16, start, block_tokens=block_tokens)
        assert torch.allclose(y, y_one, rtol=1e-4, atol=1e-4) and torch.allclose(final, final_one, rtol=1e-4, atol=1e-5)


def test_document_above_the_cap_is_refused_naming_the_fix(fresh_engine, monkeypatch):
    fresh_engine.max_document_tokens = 300
    with pytest.raises(DocumentTooLongError, match=r"text 1 has .* tokens, above the cap of 300 \(engine.max_document_tokens\); split it"):
        fresh_engine.encode([TEXTS[0], LONG])
    fresh_engine.max_document_tokens = 100
    assert isinstance(DocumentTooLongError("x"), PicasoError)
    # far too many characters: refused before tokenizing (tokenizing alone would take memory and time)
    monkeypatch.setattr(fresh_engine.tokenizer, "encode", lambda text: pytest.fail("tokenized"))
    with pytest.raises(DocumentTooLongError, match="characters.*raise engine.max_document_tokens"):
        fresh_engine.encode(["word " * 400])
    fresh_engine.max_document_tokens = 1 << 17
    monkeypatch.undo()
    assert fresh_engine.encode([LONG])[0].n_tokens > 100  # the cap is per engine and configurable


def test_default_cap_refuses_a_million_characters_up_front(engine):
    """The shipped default (docs/guarantees.md): 131,072 tokens; 1M characters are refused before encoding."""
    assert engine.max_document_tokens == 131_072
    with pytest.raises(DocumentTooLongError, match=r"above the cap of 131,072 \(engine.max_document_tokens\); split it"):
        engine.tokenize("abcd efgh " * 100_000, what="text 0")
