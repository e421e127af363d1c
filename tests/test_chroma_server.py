"""Chroma in client-server mode: a real ``chroma run`` on 127.0.0.1, ``chromadb.HttpClient``, the
integration's ingest() as it is (resumable across a server killed mid-ingest), queries with states.
"""

from __future__ import annotations

import pytest
from llama_index.core import VectorStoreIndex
from llama_index.core.schema import TransformComponent
from llama_index.llms.picaso import PicasoLLM, PicasoNodePostprocessor, PicasoStateEncoder, ingest, node_llm_text
from llama_index.vector_stores.chroma import ChromaVectorStore

from picaso_rag import StateStore

from .ingest_worker import documents, expected_nodes, splitter
from .llamaindex_world import embed_model, sensitive_engine
from .servers import ChromaServer

pytestmark = pytest.mark.slow  # starts a Chroma server: not in `pytest -m "not slow"`

COPIES = 1  # the 8 documents of the test corpus
PER_RUN = 2


@pytest.fixture(scope="module")
def engine(tokenizer):
    return sensitive_engine(tokenizer)


@pytest.fixture(scope="module")
def chroma(tmp_path_factory):
    server = ChromaServer(tmp_path_factory.mktemp("chroma-server") / "data")
    server.start()
    yield server
    server.stop()


class StopServerOnGroup(TransformComponent):
    """Stops (SIGKILL) the Chroma server when ingest() transforms its ``group``-th group of documents:
    that group's add then meets a dead server (what a crash of the server mid-ingest does)."""

    group: int
    calls: int = 0

    def __call__(self, nodes, **kwargs):
        self.calls += 1
        if self.calls == self.group:
            SERVER["chroma"].process.kill()
            SERVER["chroma"].process.wait(10)
        return nodes


SERVER: dict = {}


def vector_store_of(chroma: ChromaServer, name: str) -> ChromaVectorStore:
    return ChromaVectorStore(chroma_collection=chroma.client().get_or_create_collection(name))


def test_resumable_ingest_and_queries_against_a_chroma_server(chroma, engine, tmp_path):
    store = StateStore(tmp_path / "states")
    llm = PicasoLLM(engine=engine, state_store=store, max_new_tokens=8)
    docs = documents(COPIES)
    SERVER["chroma"] = chroma
    killer = StopServerOnGroup(group=3)
    transformations = [splitter(), PicasoStateEncoder(llm, batch_size=8, show_progress=False), embed_model(), killer]
    with pytest.raises(Exception):  # the third group's add meets the dead server
        ingest(docs, transformations, vector_store_of(chroma, "docs"), documents_per_run=PER_RUN, show_progress=False)
    chroma.stop()
    chroma.start()  # same data directory, same port
    vector_store = vector_store_of(chroma, "docs")
    done = vector_store._collection.count()
    expected = {n.node_id: node_llm_text(n) for n in expected_nodes(COPIES)}
    assert 0 < done < len(expected)  # two groups made it before the crash
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "states").rglob("*.safetensors")}

    added = ingest(docs, transformations[:-1], vector_store, documents_per_run=PER_RUN, show_progress=False)
    assert len(added) == len(expected) - done  # only what was missing
    records = vector_store._collection.get(include=["metadatas"])
    assert sorted(records["ids"]) == sorted(expected)  # every node once, none twice
    for node_id, text in expected.items():
        assert store.get(node_id, engine.fingerprint, text=text).ok
    # the states of the nodes that were in Chroma before the crash were not encoded again
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert ingest(docs, transformations[:-1], vector_store, documents_per_run=PER_RUN, show_progress=False) == []

    # queries through the server: retrieval from Chroma over HTTP, documents from their stored states
    index = VectorStoreIndex.from_vector_store(vector_store, embed_model=embed_model())
    query_engine = index.as_query_engine(llm=llm, similarity_top_k=3,
                                         node_postprocessors=[PicasoNodePostprocessor(llm, method="picaso-s")])
    response = query_engine.query("Which river carries sediment to the sea?")
    assert len(response.source_nodes) == 3
    for scored in response.source_nodes:
        assert scored.node.node_id in expected and node_llm_text(scored.node) == expected[scored.node.node_id]
    meta = response.metadata["picaso"]
    assert meta["k"] == 3 and meta["states_encoded"] == 0  # every state came from the store, none re-encoded


def test_two_clients_share_one_server(chroma, engine, tmp_path):
    """Two replicas' clients: what one ingests, the other retrieves."""
    store = StateStore(tmp_path / "states")
    llm = PicasoLLM(engine=engine, state_store=store, max_new_tokens=4)
    first = vector_store_of(chroma, "shared")
    ingest(documents(1)[:3], [splitter(), PicasoStateEncoder(llm, show_progress=False), embed_model()], first,
           documents_per_run=PER_RUN, show_progress=False)
    second = ChromaVectorStore(chroma_collection=chroma.client().get_collection("shared"))
    index = VectorStoreIndex.from_vector_store(second, embed_model=embed_model())
    nodes = index.as_retriever(similarity_top_k=2).retrieve("the tower in Paris")
    assert len(nodes) == 2 and all(store.get(n.node.node_id, engine.fingerprint, text=node_llm_text(n.node)).ok for n in nodes)
