"""The continuous-batching scheduler (picaso_rag/scheduler.py) on the CPU's pure-torch path:
every request of a batch gets exactly the tokens engine.generate gives it alone, from its own
state, whatever else joins or leaves; per-request sampling; stop/EOS/max/cancel free the row."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from picaso_rag import Mamba2LM, PicasoEngine, PicasoError, init_weights
from picaso_rag.scheduler import QueueFullError, Scheduler

from .conftest import TEXTS, tiny_config


@pytest.fixture(scope="module")
def engine(tokenizer):
    """A tiny random Mamba-2 whose output depends on its state (large weights, slow decays): with
    the usual init a random model ignores its context and a mixed-up state could not show."""
    model = init_weights(Mamba2LM(tiny_config()), seed=0, std=0.2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.fill_(math.log(0.3))
    return PicasoEngine(model, tokenizer)


@pytest.fixture(scope="module")
def states(engine):
    docs = engine.encode(TEXTS)
    return {
        "none": None,
        "one doc": docs[0],
        "composed": engine.compose(docs[1:4], method="picaso-s"),
        "caso": engine.compose(docs[2:], method="caso", prefix=docs[0]),
    }


QUESTIONS = [" Question: when was it built?\nAnswer:", " What is a state?", " Where does it happen", " Rivers"]


def requests_of(states):
    """Prompts of different lengths, each with another state (rows of one read are padded)."""
    return [(q, s) for q in QUESTIONS for s in states.values()]


@pytest.fixture(scope="module")
def alone(engine, states):
    """engine.generate's answer to each request of requests_of(states), one at a time."""
    return [engine.generate(q, state=s, max_new_tokens=12 + i % 5) for i, (q, s) in enumerate(requests_of(states))]


def test_batched_greedy_equals_engine_generate(engine, states, alone):
    cases = requests_of(states)
    expected = alone
    with Scheduler(engine, max_batch=6, max_read_batch=4) as scheduler:  # fewer rows than requests: joins mid-decode
        submitted = [scheduler.submit(q, state=s, max_new_tokens=12 + i % 5) for i, (q, s) in enumerate(cases)]
        got = [r.wait(60) for r in submitted]
        stats = scheduler.stats()
    for want, have in zip(expected, got):
        assert have.token_ids == want.token_ids and have.text == want.text
        assert have.finish_reason == want.finish_reason and have.n_prompt_tokens == want.n_prompt_tokens
    assert stats["steps"] > 0 and 1 < stats["mean_batch"] <= 6  # really batched


def test_each_request_reads_its_own_state(engine, states):
    """The same question from different states gives the answers of those states, batched together."""
    q = QUESTIONS[0]
    alone = {name: engine.generate(q, state=s, max_new_tokens=16).token_ids for name, s in states.items()}
    assert len({tuple(v) for v in alone.values()}) > 1  # the states matter to this model
    with Scheduler(engine, max_batch=8) as scheduler:
        together = {name: scheduler.submit(q, state=s, max_new_tokens=16) for name, s in states.items()}
        assert {name: r.wait(60).token_ids for name, r in together.items()} == alone


def test_sampling_parameters_per_request(engine, states):
    s = states["composed"]
    kinds = [dict(temperature=0.8, top_p=0.9, seed=7), dict(temperature=1.3, seed=11), dict(temperature=0.0),
             dict(temperature=0.7, top_p=0.5, seed=3)]
    expected = [engine.generate(QUESTIONS[1], state=s, max_new_tokens=10, **k).token_ids for k in kinds]
    with Scheduler(engine, max_batch=4) as scheduler:
        got = [scheduler.submit(QUESTIONS[1], state=s, max_new_tokens=10, **k) for k in kinds]
        assert [r.wait(60).token_ids for r in got] == expected  # seeded sampling is reproducible in a batch


def test_stop_strings_and_streaming(engine, states):
    full = engine.generate(QUESTIONS[2], state=states["composed"], max_new_tokens=24)
    stop = full.text.strip()[3:6]
    assert stop
    want = engine.generate(QUESTIONS[2], state=states["composed"], max_new_tokens=24, stop=[stop])
    with Scheduler(engine, max_batch=2) as scheduler:
        request = scheduler.submit(QUESTIONS[2], state=states["composed"], max_new_tokens=24, stop=[stop])
        pieces = list(request)
    assert request.result.finish_reason == want.finish_reason == "stop"
    assert "".join(pieces) == request.result.text == want.text and stop not in want.text


def test_cancel_frees_the_row_and_queue_is_bounded(engine, states):
    with Scheduler(engine, max_batch=1, max_queue=1) as scheduler:
        long = scheduler.submit(QUESTIONS[0], state=states["none"], max_new_tokens=100_000, stop=["\x00never"])
        deadline = time.monotonic() + 30
        while not scheduler.stats()["active"] and time.monotonic() < deadline:
            time.sleep(0.01)
        queued = scheduler.submit(QUESTIONS[1], max_new_tokens=3)  # waits: the only row is taken
        with pytest.raises(QueueFullError, match="retry later"):
            scheduler.submit(QUESTIONS[2], max_new_tokens=3)
        long.cancel()
        assert long.wait(30).finish_reason == "cancelled"
        assert queued.wait(30).finish_reason in ("length", "eos")  # got the freed row
        assert scheduler.stats()["active"] == 0


def test_bad_input_names_the_fix(engine):
    with Scheduler(engine, max_batch=1) as scheduler:
        with pytest.raises(PicasoError, match="non-empty"):
            scheduler.submit("")
        with pytest.raises(PicasoError, match="temperature"):
            scheduler.submit("hi", temperature=-1)
        assert scheduler.submit("hi", max_new_tokens=0).wait(5).finish_reason == "length"


def test_concurrent_submitters(engine, states):
    """Many threads submitting at once: every request answered with its own tokens."""
    cases = requests_of(states)[:10]
    expected = [engine.generate(q, state=s, max_new_tokens=8).token_ids for q, s in cases]
    results: dict[int, list[int]] = {}
    with Scheduler(engine, max_batch=4) as scheduler:
        def client(i):
            q, s = cases[i]
            results[i] = scheduler.generate(q, state=s, timeout=60, max_new_tokens=8).token_ids

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(cases))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
    assert [results[i] for i in range(len(cases))] == expected


def test_windowed_detokenisation_equals_full(engine, tokenizer):
    """The scheduler re-decodes only recent ids; the pieces and text equal TextStream's full decoding,
    also with multi-byte characters split across tokens and stop strings."""
    from picaso_rag.generation import TextStream
    from picaso_rag.scheduler import _WindowedDecode, _concatenative

    assert _concatenative(engine)
    rng = torch.Generator().manual_seed(0)
    text_ids = tokenizer.encode("Les élèves de l'école — 東京 and Zürich: naïve café, 🙂 emoji " * 6)
    for ids in (torch.randint(0, 50000, (300,), generator=rng).tolist(), text_ids):
        for stop in ((), ("é",), ("Zürich",)):
            full, windowed = TextStream(tokenizer.decode, stop), TextStream(_WindowedDecode(tokenizer.decode), stop)
            for i in ids:
                assert full.push(i) == windowed.push(i)
                if full.stopped:
                    break
            assert windowed.stopped == full.stopped and full.flush() == windowed.flush() and full.text == windowed.text


def test_graphed_joins_reference_path(engine, states, alone, monkeypatch):
    """The CUDA path of joins (BatchedReadGraphs: prompts padded to bucketed lengths and rows, static
    inputs and outputs) run on the CPU with each "graph" replayed eagerly: same tokens as engine.generate."""
    import picaso_rag.graphs as graphs

    class Replay:
        def __init__(self, fn, out):
            self.fn, self.out = fn, out

        def replay(self):
            self.out.copy_(self.fn())

    def capture(fn, pool=None):
        out = fn()
        return Replay(fn, out), out

    monkeypatch.setattr(graphs, "_capture", capture)
    monkeypatch.setattr(graphs.torch.cuda, "graph_pool_handle", lambda: None)
    cases = requests_of(states)
    scheduler = Scheduler(engine, max_batch=8, start=False)
    scheduler.read_graphs = graphs.BatchedReadGraphs(engine.model, *scheduler._empty_state(4), *scheduler._empty_state(4),
                                                     lengths=(8, 16))
    scheduler.read_graphs.capture_all()
    with scheduler.start():
        got = [scheduler.submit(q, state=s, max_new_tokens=12 + i % 5) for i, (q, s) in enumerate(cases)]
        assert [r.wait(60).token_ids for r in got] == [g.token_ids for g in alone]
