"""Hybrid models (Mamba-2 + attention layers) served by the continuous-batching scheduler
(picaso_rag.scheduler.HybridScheduler) and by the OpenAI-compatible server: each request's
greedy tokens equal engine.generate's alone, whatever joins, leaves or is cancelled beside it;
one request's documents never reach another's answer; the keys and values are bounded.

Both families, as tiny random configs parsed from transformers-style config.json dicts (their
model code is checked against transformers in tests/test_hybrid.py): Granite 4.0-H (NoPE
attention, shared MLP + MoE) and Bamba (RoPE on half of each head, its query read after the
longest document); fp32 on the CPU.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from picaso_rag import PicasoEngine
from picaso_rag.hybrid import HybridLM, init_weights
from picaso_rag.hybrid_config import HybridConfig
from picaso_rag.scheduler import KVBudgetError, Scheduler

from .conftest import TEXTS

MAMBA = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=2, mamba_chunk_size=8)
CONFIGS = {
    "granite-nope": dict(model_type="granitemoehybrid", vocab_size=50288, hidden_size=32, intermediate_size=16,
                         shared_intermediate_size=24, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         num_local_experts=4, num_experts_per_tok=2, layer_types=["mamba", "attention", "mamba", "attention"],
                         embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=3.0,
                         position_embedding_type="nope", **MAMBA),
    "bamba-rope": dict(model_type="bamba", vocab_size=50288, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1, 3], **MAMBA),
}
QUESTIONS = [" Question: when was it built?\nAnswer:", " What is a state?", " Rivers"]


def sensitive_hybrid(tokenizer, family: str) -> PicasoEngine:
    """Weights large and decays slow enough that the answers depend on what the model read (as the
    Mamba-2 scheduler tests' model): a request reading another's documents would show."""
    model = init_weights(HybridLM(HybridConfig.from_dict(CONFIGS[family])), seed=0, std=0.2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.fill_(math.log(0.3))
    return PicasoEngine(model, tokenizer)


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request, tokenizer):
    """(engine, states): documents composed in several ways, of different key counts and positions."""
    engine = sensitive_hybrid(tokenizer, request.param)
    assert engine.model.cfg.rotary_dim == (0 if request.param == "granite-nope" else 4)
    docs = engine.encode(TEXTS)
    prefix = engine.encode(["Context:"])[0]
    states = {"none": None, "one doc": docs[0], "composed": engine.compose(docs[1:4], prefix=prefix),
              "caso": engine.compose(docs[2:], method="caso", prefix=prefix), "two": engine.compose([docs[4], docs[0]])}
    return engine, states


def test_batched_greedy_equals_engine_generate_alone(family):
    """10 requests, 4 rows: requests join mid-batch as others leave (different lengths finish at
    different steps, the last row moving into the hole); each gets engine.generate's tokens."""
    engine, states = family
    cases = [(q, s, 3 + (i * 5) % 9) for i, (q, s) in enumerate((q, s) for q in QUESTIONS[:2] for s in states.values())]
    sampled = dict(temperature=0.9, top_p=0.8, seed=5)  # one seeded sampling row among the greedy ones
    alone = [engine.generate(q, state=s, max_new_tokens=n) for q, s, n in cases]
    alone_sampled = engine.generate(QUESTIONS[1], state=states["composed"], max_new_tokens=9, **sampled)
    assert len({tuple(a.token_ids) for a in alone[:len(states)]}) == len(states)  # the states matter
    with Scheduler(engine, max_batch=4, max_read_batch=3) as scheduler:
        assert scheduler.has_keys
        submitted = [scheduler.submit(q, state=s, max_new_tokens=n) for q, s, n in cases]
        sampling = scheduler.submit(QUESTIONS[1], state=states["composed"], max_new_tokens=9, **sampled)
        got = [r.wait(60) for r in submitted + [sampling]]
        stats = scheduler.stats()
    for want, have in zip(alone + [alone_sampled], got):
        assert have.token_ids == want.token_ids and have.text == want.text and have.finish_reason == want.finish_reason
    assert stats["steps"] > 0 and 2 < stats["mean_batch"] <= 4  # really batched
    assert stats["kv"]["buffer_bytes"] == 0 and stats["active"] == 0  # an idle scheduler holds no keys


def test_one_users_documents_never_reach_another(family):
    """User A's tokens are identical whether user B reads one set of documents or another (of a
    different length: A's row is padded to B's keys), or a third user is cancelled mid-batch; B's
    answer does change with its documents (so the documents matter to this model)."""
    engine, states = family
    a = (QUESTIONS[0], states["one doc"], 14)
    a_alone = engine.generate(a[0], state=a[1], max_new_tokens=a[2]).token_ids
    answers = {}
    for b_docs in ("composed", "two"):
        with Scheduler(engine, max_batch=4) as scheduler:
            cancelled = scheduler.submit(QUESTIONS[2], state=states["caso"], max_new_tokens=400)
            first = scheduler.submit(*a[:2], max_new_tokens=a[2])
            second = scheduler.submit(QUESTIONS[1], state=states[b_docs], max_new_tokens=14)
            next(iter(cancelled))  # its first piece: it is decoding beside the others
            cancelled.cancel()
            answers[b_docs] = (first.wait(60).token_ids, second.wait(60).token_ids)
            assert cancelled.wait(60).finish_reason == "cancelled"
    assert answers["composed"][0] == answers["two"][0] == a_alone
    assert answers["composed"][1] != answers["two"][1]
    assert answers["two"][1] == engine.generate(QUESTIONS[1], state=states["two"], max_new_tokens=14).token_ids


@pytest.mark.parametrize("family", ["granite-nope"], indirect=True)
def test_keys_and_values_are_bounded(family):
    engine, states = family
    state = states["composed"]
    per_token = engine.model.cfg.kv_bytes_per_token(bytes_per_value=4)
    with Scheduler(engine, max_batch=5, max_slot_tokens=state.n_keys + 40, start=False) as scheduler:
        with pytest.raises(KVBudgetError, match="max_slot_tokens"):
            scheduler.submit(QUESTIONS[0], state=state, max_new_tokens=40)
    # room for the keys of exactly two of these requests at once
    reserve = state.n_keys + len(engine.tokenize(QUESTIONS[1])) + 10
    budget = 2 * reserve * per_token
    cases = [(QUESTIONS[1], state, 10)] * 5
    alone = engine.generate(QUESTIONS[1], state=state, max_new_tokens=10).token_ids
    seen = {"active": 0, "bytes": 0}
    lock = threading.Lock()
    with Scheduler(engine, max_batch=5, max_kv_bytes=budget) as scheduler:
        with pytest.raises(KVBudgetError, match="max_kv_bytes"):
            scheduler.submit(QUESTIONS[1], state=state, max_new_tokens=500)  # could not fit even alone

        def watch(request, piece):  # called by the worker thread at every token
            with lock:
                seen["active"] = max(seen["active"], len(scheduler.active))
                seen["bytes"] = max(seen["bytes"], scheduler.stats()["kv"]["buffer_bytes"])

        submitted = [scheduler.submit(q, state=s, max_new_tokens=n, on_event=watch) for q, s, n in cases]
        assert [r.wait(60).token_ids for r in submitted] == [alone] * 5
        stats = scheduler.stats()
    assert seen["active"] == 2 and 0 < seen["bytes"] <= budget  # the others waited for rows to leave
    assert stats["kv"]["waits_for_budget"] > 0 and stats["kv"]["buffer_bytes"] == 0


# ------------------------------------------------------------------------------------ the server
@pytest.mark.parametrize("family", ["bamba-rope"], indirect=True)
def test_server_serves_a_hybrid_to_the_openai_client(family, tmp_path):
    """picaso-server's app (what `picaso-rag serve` runs) over a real Chroma index of hybrid states,
    its own scheduler built from the settings; concurrent clients with their own documents each
    get what engine.generate gives them alone."""
    import chromadb
    from llama_index.core import Document, StorageContext, VectorStoreIndex
    from llama_index.llms.picaso import PicasoLLM, PicasoStateEncoder
    from llama_index.vector_stores.chroma import ChromaVectorStore
    from picaso_server import RagPipeline, ServerSettings, create_app
    from picaso_server.testing import ServerThread
    from picaso_server.protocol import ChatCompletionRequest

    from picaso_rag import StateStore

    from .llamaindex_world import embed_model

    engine, _ = family
    # the index as a user builds it with the pair (small: one node a text)
    vector_store = ChromaVectorStore(chroma_collection=chromadb.PersistentClient(path=str(tmp_path / "chroma"))
                                     .get_or_create_collection("docs"))
    llm = PicasoLLM(engine=engine, state_store=StateStore(tmp_path / "states"))
    index = VectorStoreIndex.from_documents([Document(text=text, id_=f"doc-{i}") for i, text in enumerate(TEXTS)],
                                            storage_context=StorageContext.from_defaults(vector_store=vector_store),
                                            embed_model=embed_model(), transformations=[PicasoStateEncoder(llm, show_progress=False)])
    settings = ServerSettings(model_name="tiny-bamba", default_max_tokens=8, max_tokens_limit=512, max_batch=4,
                              max_queue=16, max_slot_tokens=400)
    rag = RagPipeline(engine, index, vector_store, settings, state_stores=[llm.state_store])
    app = create_app(rag, settings)
    asks = [("When was the Eiffel Tower completed?", None), ("Where does photosynthesis happen?", [TEXTS[2], TEXTS[0]]),
            ("What is a state?", [TEXTS[1]]), ("Why do deltas grow?", [TEXTS[4], TEXTS[3], TEXTS[1]])]

    def body(question, docs):
        extra = {} if docs is None else {"documents": [{"text": t} for t in docs]}
        return [{"role": "user", "content": question}], extra

    expected = []
    for question, docs in asks:
        messages, extra = body(question, docs)
        prepared = rag.prepare_chat(ChatCompletionRequest(model="tiny-bamba", messages=messages, **extra))
        expected.append(engine.generate(prepared.prompt_ids, state=prepared.state, max_new_tokens=8).text)
    with ServerThread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)

        def chat(i):
            messages, extra = body(*asks[i])
            return client.chat.completions.create(model="tiny-bamba", messages=messages, max_tokens=8, extra_body=extra)

        with ThreadPoolExecutor(len(asks)) as pool:
            replies = list(pool.map(chat, range(len(asks))))
        assert [r.choices[0].message.content for r in replies] == expected
        assert replies[0].model_extra["picaso"]["k"] == 3 and replies[0].model_extra["picaso"]["sources"]
        streamed = client.chat.completions.create(model="tiny-bamba", messages=body(*asks[1])[0], max_tokens=8,
                                                  extra_body=body(*asks[1])[1], stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected[1]
        with pytest.raises(openai.BadRequestError, match="max_slot_tokens"):  # keys bounded per request: a 400
            client.chat.completions.create(model="tiny-bamba", messages=body(*asks[0])[0], max_tokens=450)
        scheduler = httpx.get(url + "/health/details").json()["scheduler"]
    assert scheduler["kv"]["max_slot_tokens"] == 400 and scheduler["steps"] > 0 and scheduler["active"] == 0


def test_gpu_check_script_cpu_path(tmp_path):
    """benchmarks/hybrid_serving.py (the H200 check of batched against one-at-a-time hybrid decoding)
    on its CPU path: it runs, and in fp32 every batched answer equals the same request alone."""
    import importlib.util

    from .llamaindex_world import REPO

    spec = importlib.util.spec_from_file_location("hybrid_serving", REPO / "benchmarks" / "hybrid_serving.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--device", "cpu", "--tiny", "--batches", "1,4", "--serial", "4", "--pool", "6", "--doc-tokens", "24",
                       "--k", "3", "--question-tokens", "6", "--answer-tokens", "6", "--out", str(tmp_path / "h.json")])
    assert list(out["modes"]) == ["eager", "graphed"]  # on the CPU both run the same bucketed step eagerly
    for mode in out["modes"].values():
        assert [row["greedy_agreement"] for row in mode["batched"]] == ["1/1", "4/4"]
        assert mode["batched"][1]["mean_decode_batch"] == 4.0 and mode["serial"]["decode_ms_per_token_p50"] > 0
    assert (tmp_path / "h.json").is_file()


@pytest.mark.parametrize("family", ["bamba-rope"], indirect=True)
def test_bucketed_decode_equals_reading_the_whole_text_again(family):
    """The slot decode step (picaso_rag.graphs.HybridStepGraphs: new keys written in place into kept
    buffers; bucketed as the graphs replay it: test_bucketed_step_equals_the_exact_step) against an independent reference: greedy tokens from reading
    prompt + answer so far again from the state, with the model's forward. Prompts of 1, 2 and many
    tokens; answers that cross key-span buckets; in the scheduler, after rows left and others joined."""
    engine, states = family
    state = states["composed"]
    prompts = [[1000], [1000, 2000], engine.tokenize(QUESTIONS[0] * 3)]
    n_new = 64 + 8 - state.n_keys % 64  # past the next multiple of 64 keys: a span bucket is crossed while decoding

    def reference(prompt: list[int]) -> list[int]:
        ids: list[int] = []
        for _ in range(n_new):
            logits, _ = engine.read(prompt + ids, state=state)
            ids.append(int(logits[-1].argmax()))
        return ids

    eos, engine.tokenizer.eos_token_id = engine.tokenizer.eos_token_id, None
    try:
        want = [reference(p) for p in prompts]
        assert [engine.generate(p, state=state, max_new_tokens=n_new).token_ids for p in prompts] == want
        with Scheduler(engine, max_batch=2) as scheduler:  # 3 requests, 2 rows: the third joins a freed row
            first = [scheduler.submit(p, state=state, max_new_tokens=n) for p, n in zip(prompts, (5, n_new, n_new))]
            got = [r.wait(120).token_ids for r in first]
    finally:
        engine.tokenizer.eos_token_id = eos
    assert got == [want[0][:5], want[1], want[2]]


@pytest.mark.parametrize("family", ["bamba-rope"], indirect=True)
def test_bucketed_step_equals_the_exact_step(family):
    """What the CUDA graphs replay (rows and key span rounded up to buckets, rows past the active ones
    at length 0) equals the step at the exact shapes, step after step, logits, SSM states and keys."""
    from picaso_rag.graphs import HybridStepGraphs

    engine, _ = family
    model, cfg = engine.model, engine.model.cfg
    gen = torch.Generator().manual_seed(0)
    n_rows, capacity = 3, 160
    ssm, conv, _, _ = model.empty_state(4)
    ssm.normal_(generator=gen)
    conv.normal_(generator=gen)
    keys = torch.randn(4, len(cfg.attn_layers), cfg.n_kv_heads, capacity, cfg.head_dim, generator=gen)
    values = torch.randn(keys.shape, generator=gen)
    lengths = torch.tensor([5, 70, 1, 0])  # the bucket of 3 rows is 4: the fourth row is padding
    positions = lengths + 3
    buffers = [torch.randint(0, 50000, (4,), generator=gen), ssm, conv, keys, values, lengths, positions]
    exact = HybridStepGraphs(model, *[t.clone() for t in buffers], graphed=False)
    bucketed = HybridStepGraphs(model, *[t.clone() for t in buffers], graphed=False, bucketed=True)
    assert bucketed.bucket(n_rows, 70) == (4, 128) and exact.bucket(n_rows, 70) == (3, 71)
    for _ in range(3):
        longest = int(exact.lengths[:n_rows].max())
        want, have = exact.step(n_rows, longest)[:n_rows], bucketed.step(n_rows, longest)[:n_rows]
        assert torch.allclose(have, want, atol=1e-5, rtol=1e-5)
        assert torch.allclose(bucketed.ssm_state[:n_rows], exact.ssm_state[:n_rows], atol=1e-6)
        for slots in (exact, bucketed):
            slots.token_ids[:n_rows] = want.argmax(-1)
            slots.lengths[:n_rows] += 1
            slots.positions[:n_rows] += 1
    span = int(exact.lengths.max())
    assert torch.allclose(bucketed.keys[:n_rows, :, :, :span], exact.keys[:n_rows, :, :, :span], atol=1e-6)


def test_a_request_cancelled_between_steps_leaves_the_others_whole(family):
    """The worker's order made deterministic: three rows join, the first is cancelled, the worker drops
    it before the next step (the last row's keys and values move into its place), then decodes the
    rest to the end. The others answer as alone (the drop once failed the whole batch: it wrote the
    key buffer outside inference mode)."""
    engine, states = family
    scheduler = Scheduler(engine, max_batch=4, start=False)  # not started: this thread plays the worker
    cancelled = scheduler.submit(QUESTIONS[2], state=states["caso"], max_new_tokens=50)
    first = scheduler.submit(QUESTIONS[0], state=states["one doc"], max_new_tokens=8)
    second = scheduler.submit(QUESTIONS[1], state=states["two"], max_new_tokens=8)
    scheduler._join(scheduler._take_joining())
    scheduler._decode()
    cancelled.cancel()
    scheduler._drop_cancelled()
    while scheduler.active:
        scheduler._decode()
    assert cancelled.wait(1).finish_reason == "cancelled"
    assert first.wait(1).token_ids == engine.generate(QUESTIONS[0], state=states["one doc"], max_new_tokens=8).token_ids
    assert second.wait(1).token_ids == engine.generate(QUESTIONS[1], state=states["two"], max_new_tokens=8).token_ids
