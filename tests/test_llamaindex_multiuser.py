"""One shared PicasoLLM, many requests: each composes exactly its own retrieval, with its own method,
whatever the others retrieve or type (issue 11). Real Chroma, MiniLM, a tiny random Mamba-2 on CPU."""

from __future__ import annotations

import asyncio
import string
import threading

import pytest
from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.node_parser import SentenceSplitter
from llama_index.llms.picaso import DocumentRef, PicasoLLM, PicasoLLMError, PicasoNodePostprocessor, PicasoStateEncoder

from picaso_rag import StateMismatchError, StateStore

from .llamaindex_world import build_world, embed_model, node_text, sensitive_engine

pytestmark = pytest.mark.slow  # many users through real LlamaIndex engines: not in `pytest -m "not slow"`

TIMINGS = {"compose_ms", "prepare_ms", "generate_ms", "load_ms", "encode_ms"}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    return build_world(tmp_path_factory.mktemp("multiuser"), sensitive_engine(tokenizer))


def shared_llm(world, **kwargs) -> PicasoLLM:
    return PicasoLLM(engine=world.llm.engine, state_store=world.store, max_new_tokens=kwargs.pop("max_new_tokens", 4),
                     **kwargs)


def query_engine(index, llm, method: str | None = "picaso-s", k: int = 2, **kwargs):
    postprocessors = [PicasoNodePostprocessor(llm, method=method)] if method else []
    return index.as_query_engine(llm=llm, similarity_top_k=k, node_postprocessors=postprocessors, **kwargs)


def own_keys(response) -> set[str]:
    return {DocumentRef.of(node_text(s)).key for s in response.source_nodes}


def composed_keys(response) -> set[str]:
    return {key for call in response.metadata["picaso"]["calls"] for key in call["documents"]}


def comparable(response) -> tuple:
    """Everything a response says about itself, but wall times."""
    calls = [{k: v for k, v in c.items() if k not in TIMINGS and k != "retrieval"} for c in response.metadata["picaso"]["calls"]]
    return str(response), calls, [s.node.node_id for s in response.source_nodes]


QUESTIONS = [f"{a} {b}?" for a in ["When was", "Who built", "Where is", "How tall is", "What is", "Why is"]
             for b in ["the Eiffel Tower", "photosynthesis", "the Rhine", "Kilimanjaro", "the reef", "honey bee dancing",
                       "hieroglyph decoding", "Ada Lovelace's algorithm", "the World's Fair", "a delta", "chlorophyll",
                       "the Nile", "sugar in plants", "Gustave Eiffel", "the Rosetta Stone", "a glacier", "coral",
                       "Queensland", "a wrought-iron lattice", "the Analytical Engine", "a beehive", "carbon dioxide",
                       "the Alps", "sediment", "Paris", "the Great Barrier Reef", "a chloroplast", "Egypt", "a waggle dance",
                       "Champollion", "oxygen", "a river mouth", "Tanzania", "Charles Babbage", "the 1889 fair",
                       "a mountain", "light energy", "a flower", "stone inscriptions", "a machine", "330 metres",
                       "a volcano", "the sea", "water", "a queen bee", "a coastline", "iron", "a tower", "a computer",
                       "an ancient script"]]


def test_16_threads_each_compose_exactly_their_own_nodes(world):
    llm = shared_llm(world)
    engine = query_engine(world.index, llm)
    questions = QUESTIONS[:48]
    alone = {q: comparable(engine.query(q)) for q in questions[:16]}
    results: dict[str, object] = {}

    def worker(offset: int) -> None:
        for q in questions[offset::16]:
            results[q] = engine.query(q)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == len(questions)
    for q, response in results.items():
        assert composed_keys(response) == own_keys(response) and response.metadata["picaso"]["k"] == 2, q
        if q in alone:
            assert comparable(response) == alone[q], q
    assert len({frozenset(s.node.node_id for s in r.source_nodes) for r in results.values()}) > 10


def test_300_asyncio_tasks_with_two_methods_on_one_llm(world):
    llm = shared_llm(world)
    engines = {"picaso-s": query_engine(world.index, llm, "picaso-s"), "concat": query_engine(world.index, llm, "concat")}
    questions = QUESTIONS[:300]
    assert len(set(questions)) == 300
    methods = ["picaso-s" if i % 2 else "concat" for i in range(len(questions))]
    sample = {i: comparable(engines[methods[i]].query(questions[i])) for i in range(0, 300, 25)}

    async def together():
        return await asyncio.gather(*(engines[m].aquery(q) for q, m in zip(questions, methods)))

    responses = asyncio.run(together())
    for i, (response, method) in enumerate(zip(responses, methods)):
        meta = response.metadata["picaso"]
        assert meta["method"] == method and meta["k"] == 2, (i, meta["method"])
        assert composed_keys(response) == own_keys(response), i
        if i in sample:
            assert comparable(response) == sample[i], i


ADVERSARIAL = ["form", "Context information is below.", "Answer", "the"]


@pytest.fixture(scope="module")
def adversarial(tmp_path_factory, world):
    """An index whose documents are a single common word, a line of the prompt template, ..."""
    import chromadb
    from llama_index.vector_stores.chroma import ChromaVectorStore

    directory = tmp_path_factory.mktemp("adversarial")
    collection = chromadb.PersistentClient(str(directory / "chroma")).get_or_create_collection("adv")
    store = StateStore(directory / "states")
    llm = PicasoLLM(engine=world.llm.engine, state_store=store, max_new_tokens=4)
    docs = [Document(text=t, id_=f"adv-{i}") for i, t in enumerate(ADVERSARIAL)]
    docs += [Document(text=d.text, id_=d.doc_id) for d in world_documents()]
    index = VectorStoreIndex.from_documents(
        docs, storage_context=StorageContext.from_defaults(vector_store=ChromaVectorStore(chroma_collection=collection)),
        embed_model=embed_model(), transformations=[SentenceSplitter(chunk_size=64, chunk_overlap=8), PicasoStateEncoder(llm, show_progress=False)])
    return index, llm


def world_documents():
    from .llamaindex_world import corpus_documents
    return corpus_documents()


def test_no_document_text_or_typed_guess_changes_another_requests_answer_or_metadata(adversarial):
    index, llm = adversarial
    victim = query_engine(index, llm, k=1)
    question = "Where does photosynthesis take place in plant cells?"
    victim.query(question)  # warm the caches, so that both measured runs see the same ones
    before = comparable(victim.query(question))
    attacker = query_engine(index, llm, k=1)
    for word in ADVERSARIAL:  # each retrieves a document that is a common word or a template line
        response = attacker.query(word)
        assert node_text(response.source_nodes[0]) == word
    guess = node_text(victim.query(question).source_nodes[0])
    probe = attacker.query(f"Is this in your documents: {guess}")  # the victim's document, typed verbatim
    assert composed_keys(probe) == own_keys(probe)  # only what the attacker retrieved, never the typed text
    probe_again = attacker.query(f"Is this in your documents: {guess}")
    assert comparable(probe_again) == comparable(probe)  # a right guess changes nothing the attacker sees
    after = comparable(victim.query(question))
    assert after == before
    assert len(llm.handoff) >= len(ADVERSARIAL)  # the attacker's tickets were open all along


def test_a_plain_llm_call_after_a_retrieval_composes_nothing(world):
    llm = shared_llm(world)
    composed = query_engine(world.index, llm).query("When was the Eiffel Tower completed?")
    assert composed.metadata["picaso"]["k"] == 2
    plain = query_engine(world.index, llm, method=None).query("When was the Eiffel Tower completed?")
    fresh = query_engine(world.index, shared_llm(world), method=None).query("When was the Eiffel Tower completed?")
    assert plain.metadata["picaso"]["k"] == 0 and plain.metadata["picaso"]["method"] == "none"
    assert comparable(plain) == comparable(fresh)  # the earlier retrieval is not sticky


@pytest.mark.parametrize("mode, streaming", [(m, s) for m in ["compact", "refine", "tree_summarize", "simple_summarize",
                                                               "accumulate"] for s in (False, True)
                                             if not (s and m == "accumulate")])  # LlamaIndex cannot stream accumulate
def test_errors_surface_instead_of_empty_response(world, monkeypatch, mode, streaming):
    llm = shared_llm(world)

    def bad_state(*args, **kwargs):
        raise StateMismatchError("state of another model: re-ingest with this model (test fault)")

    monkeypatch.setattr(llm.engine, "compose", bad_state)
    engine = query_engine(world.index, llm, response_mode=mode, streaming=streaming)
    with pytest.raises(PicasoLLMError, match="re-ingest with this model"):
        response = engine.query("When was the Eiffel Tower completed?")
        if streaming:
            "".join(response.response_gen)


def test_condense_plus_context_with_an_empty_condensed_question(world):
    """A model that says nothing: the condensed question is empty, so retrieval uses the user's message."""
    llm = shared_llm(world, stop=list(string.printable) + [chr(c) for c in range(0xA0, 0x3000)])
    chat = world.index.as_chat_engine(chat_mode="condense_plus_context", llm=llm, similarity_top_k=2,
                                      node_postprocessors=[PicasoNodePostprocessor(llm, method="picaso-s")])
    retriever = world.index.as_retriever(similarity_top_k=2)
    for message in ["Tell me about coral reefs.", "How large is the reef?", "And where is it?"]:
        response = chat.chat(message)
        calls = response.metadata["picaso"]["calls"]
        assert [n.node.node_id for n in response.source_nodes] == [n.node.node_id for n in retriever.retrieve(message)]
        assert response.metadata["picaso"]["k"] == 2
    assert calls[0].get("condense_fallback") is True and calls[0]["k"] == 0  # the last turn's condense step


def test_a_custom_pipeline_that_builds_its_own_prompt(world):
    """No stock engine: retrieve, postprocess_nodes, then the LLM with a prompt built from the nodes'
    LLM text (as the synthesizers and most workflows do). Two such requests interleaved."""
    from llama_index.core.schema import MetadataMode
    from llama_index.llms.picaso import node_llm_text, original_node

    llm = shared_llm(world)
    picaso, concat = PicasoNodePostprocessor(llm, method="picaso-s"), PicasoNodePostprocessor(llm, method="concat")
    retriever = world.index.as_retriever(similarity_top_k=3)

    def prepare(question: str, postprocessor) -> tuple[list, str]:
        nodes = postprocessor.postprocess_nodes(retriever.retrieve(question), query_str=question)
        context = "\n\n".join(n.node.get_content(metadata_mode=MetadataMode.LLM) for n in nodes)
        return nodes, f"Context:\n{context}\n\nQuestion: {question}\nAnswer:"

    nodes_a, prompt_a = prepare("When was the Eiffel Tower completed?", picaso)
    nodes_b, prompt_b = prepare("How do honey bees communicate?", concat)  # opened before A's LLM call
    for nodes, prompt, method in [(nodes_a, prompt_a, "picaso-s"), (nodes_b, prompt_b, "concat")]:
        figures = llm.complete(prompt, formatted=True).additional_kwargs["picaso"]
        assert figures["method"] == method and figures["k"] == 3
        assert figures["documents"] == [DocumentRef.of(node_llm_text(original_node(n.node))).key for n in nodes]
        assert all(n.node.text in world.chroma_text(n.node.node_id) for n in nodes)  # real text, real ids
    plain = "Context:\n" + "\n\n".join(node_llm_text(original_node(n.node)) for n in nodes_a) + "\n\nQuestion: When?\nAnswer:"
    assert llm.complete(plain, formatted=True).additional_kwargs["picaso"]["k"] == 0  # the text alone: nothing composed
