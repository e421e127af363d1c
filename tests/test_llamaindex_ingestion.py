"""Ingestion with PicasoStateEncoder, Chroma's batch limit, and deletion of nodes with their states."""

from __future__ import annotations

import chromadb
import numpy as np
import pytest
from llama_index.core import VectorStoreIndex
from llama_index.core.ingestion import IngestionPipeline
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.schema import MetadataMode, TextNode
from llama_index.llms.picaso import (
    CHROMA_MAX_BATCH,
    METADATA_KEY,
    PicasoLLM,
    PicasoStateEncoder,
    add_nodes,
    delete_nodes,
    delete_ref_doc,
    ingest,
    node_llm_text,
    prune_states,
)
from llama_index.vector_stores.chroma import ChromaVectorStore

from picaso_rag import PicasoError, StateStore, text_sha256

from .llamaindex_world import build_world, corpus_documents, embed_model, sensitive_engine


@pytest.fixture(scope="module")
def engine(tokenizer):
    return sensitive_engine(tokenizer)


@pytest.fixture()
def world(tmp_path, engine):
    return build_world(tmp_path, engine)


def test_ingestion_stores_states_of_the_exact_llm_text_and_only_a_key_in_chroma(world, engine):
    nodes = world.vector_store.get_nodes(None)
    assert len(nodes) > len(corpus_documents())  # the splitter made several chunks of some paragraphs
    raw = world.collection.get(include=["metadatas"])
    for metadata in raw["metadatas"]:  # Chroma holds a short key and no state data
        assert len(metadata[METADATA_KEY]) == 16
        assert all(len(str(v)) < 200 for k, v in metadata.items() if k != "_node_content")
    for node in nodes:
        text = node_llm_text(node)
        assert METADATA_KEY in node.excluded_llm_metadata_keys and METADATA_KEY in node.excluded_embed_metadata_keys
        assert METADATA_KEY not in text and METADATA_KEY not in node.get_content(metadata_mode=MetadataMode.EMBED)
        assert "title: " in text and "shelf" not in text  # LLM metadata included, excluded keys not
        assert node.metadata[METADATA_KEY] == text_sha256(text)[:16]
        found = world.store.get(node.node_id, engine.fingerprint, text=text)
        assert found.ok, found.detail
        alone = engine.encode([text])[0]  # the stored state is the state of exactly that text
        assert found.state.n_tokens == alone.n_tokens == len(engine.tokenize(text))
        assert np.allclose(found.state.ssm.numpy(), alone.ssm.numpy(), rtol=1e-4, atol=1e-6)


def test_encoder_skips_nodes_whose_state_is_stored(world, engine):
    nodes = world.vector_store.get_nodes(None)
    stamps = {n.node_id: world.store.path(n.node_id, engine.fingerprint).stat().st_mtime_ns for n in nodes}
    PicasoStateEncoder(world.llm, show_progress=False)(nodes)
    assert {n.node_id: world.store.path(n.node_id, engine.fingerprint).stat().st_mtime_ns for n in nodes} == stamps
    edited = nodes[0]
    edited.text += " Edited."
    PicasoStateEncoder(world.llm, show_progress=False)([edited])  # a changed text is encoded again
    assert world.store.get(edited.node_id, engine.fingerprint, text=node_llm_text(edited)).ok


def test_encoder_in_an_ingestion_pipeline_with_progress_bar(tmp_path, engine, capsys):
    llm = PicasoLLM(engine=engine, state_store=StateStore(tmp_path / "states"))
    pipeline = IngestionPipeline(transformations=[SentenceSplitter(chunk_size=48, chunk_overlap=8),
                                                  PicasoStateEncoder(llm, batch_size=4)])
    nodes = pipeline.run(documents=corpus_documents())
    assert "Encoding states" in capsys.readouterr().err
    assert sorted(llm.state_store.node_ids(engine.fingerprint)) == sorted(n.node_id for n in nodes)


def test_chroma_refuses_big_adds_and_add_nodes_batches_them(tmp_path):
    def nodes(n):
        rng = np.random.default_rng(0)
        return [TextNode(text=f"record {i}", id_=f"n{i}", embedding=rng.standard_normal(4).tolist()) for i in range(n)]

    many = nodes(CHROMA_MAX_BATCH + 1)
    stock = ChromaVectorStore(chroma_collection=chromadb.PersistentClient(str(tmp_path / "a")).get_or_create_collection("stock"))
    with pytest.raises(Exception, match="(?i)batch"):
        stock.add(many)  # what ChromaVectorStore.add does with 5,462 records (it only splits at 41,665)
    client = chromadb.PersistentClient(str(tmp_path / "b"))
    assert client.get_max_batch_size() == CHROMA_MAX_BATCH
    store = ChromaVectorStore(chroma_collection=client.get_or_create_collection("batched"))
    assert len(add_nodes(store, many)) == len(many)
    assert store.client.count() == len(many)
    with pytest.raises(PicasoError, match="no embedding"):
        add_nodes(store, [TextNode(text="x", id_="no-embedding")])


def test_ingest_in_groups(tmp_path, engine):
    llm = PicasoLLM(engine=engine, state_store=StateStore(tmp_path / "states"))
    vector_store = ChromaVectorStore(chroma_collection=chromadb.PersistentClient(str(tmp_path / "chroma")).get_or_create_collection("docs"))
    added = ingest(corpus_documents(), [SentenceSplitter(chunk_size=48, chunk_overlap=8), PicasoStateEncoder(llm, show_progress=False),
                                        embed_model()], vector_store, documents_per_run=3, show_progress=False)
    assert vector_store.client.count() == len(added) > len(corpus_documents())
    assert sorted(llm.state_store.node_ids(engine.fingerprint)) == sorted(n.node_id for n in added)
    index = VectorStoreIndex.from_vector_store(vector_store, embed_model=embed_model())
    hit = index.as_retriever(similarity_top_k=1).retrieve("Who wrote the first algorithm for a machine?")[0]
    assert "Ada Lovelace" in hit.node.get_content()


def test_deleting_nodes_deletes_their_states(world, engine):
    fingerprint = engine.fingerprint
    ids_of = lambda doc_id: world.collection.get(where={"document_id": doc_id}, include=[])["ids"]  # noqa: E731
    gone = ids_of("doc-2")
    assert gone and all(world.store.get(i, fingerprint).ok for i in gone)
    assert delete_ref_doc(world.index, "doc-2", world.store) == len(gone)
    assert not ids_of("doc-2")
    assert all(world.store.get(i, fingerprint).status.value == "missing" for i in gone)
    assert all(world.store.get(i, fingerprint).ok for i in ids_of("doc-3"))  # others untouched

    one = ids_of("doc-3")[0]
    assert delete_nodes(world.index, [one], world.store) == 1
    assert not world.collection.get(ids=[one])["ids"] and not world.store.get(one, fingerprint).ok

    orphan = ids_of("doc-4")  # deleted with the stock call: the states stay until pruned
    world.index.delete_ref_doc("doc-4")
    assert all(world.store.get(i, fingerprint).ok for i in orphan)
    assert prune_states(world.vector_store, world.store) == len(orphan)
    assert not any(world.store.get(i, fingerprint).ok for i in orphan)
    remaining = set(world.collection.get(include=[])["ids"])
    assert set(world.store.node_ids(fingerprint)) == remaining


def test_encoder_needs_a_store(engine):
    with pytest.raises(PicasoError, match="state_store=StateStore"):
        PicasoStateEncoder(PicasoLLM(engine=engine))
