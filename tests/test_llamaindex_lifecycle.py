"""States follow the documents (issue 11, point 5): stock insert, delete_ref_doc, refresh_ref_docs,
IngestionPipeline upserts, ingest() of changed documents and window-style postprocessors leave
exactly one valid state per live node and no orphan. Real Chroma, MiniLM, a tiny random Mamba-2."""

from __future__ import annotations

import chromadb
import pytest
from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.ingestion import IngestionPipeline
from llama_index.core.node_parser import SentenceSplitter, SentenceWindowNodeParser
from llama_index.core.postprocessor import MetadataReplacementPostProcessor
from llama_index.core.storage.docstore import SimpleDocumentStore
from llama_index.llms.picaso import (PicasoChromaVectorStore, PicasoLLM, PicasoNodePostprocessor, PicasoStateEncoder,
                                     ingest, node_llm_text)
from llama_index.vector_stores.chroma import ChromaVectorStore

from picaso_rag import StateStore

from .filesystem import file_size_limit
from .llamaindex_world import corpus_documents, embed_model, sensitive_engine

SPLITTER = SentenceSplitter(chunk_size=48, chunk_overlap=8)


@pytest.fixture(scope="module")
def engine(tokenizer):
    return sensitive_engine(tokenizer)


def collection(tmp_path, name: str = "docs"):
    return chromadb.PersistentClient(str(tmp_path / "chroma")).get_or_create_collection(name)


def assert_one_valid_state_per_node(vector_store, store: StateStore, fingerprint: str) -> None:
    nodes = vector_store.get_nodes(None)
    assert nodes
    assert sorted(store.node_ids(fingerprint)) == sorted(n.node_id for n in nodes)  # no orphan, none missing
    for node in nodes:
        found = store.get(node.node_id, fingerprint, text=node_llm_text(node))
        assert found.ok, (node.node_id, found.status, found.detail)  # the state of the node's current text


def changed(doc: Document, text: str) -> Document:
    return Document(text=text, id_=doc.doc_id, metadata=dict(doc.metadata),
                    excluded_llm_metadata_keys=list(doc.excluded_llm_metadata_keys))


def test_stock_index_calls_keep_states_in_step(tmp_path, engine):
    store = StateStore(tmp_path / "states")
    llm = PicasoLLM(engine=engine, state_store=store)
    vector_store = PicasoChromaVectorStore(chroma_collection=collection(tmp_path), llm=llm)
    docs = corpus_documents()
    index = VectorStoreIndex.from_documents(docs[:5], storage_context=StorageContext.from_defaults(vector_store=vector_store),
                                            embed_model=embed_model(), transformations=[SPLITTER])
    assert_one_valid_state_per_node(vector_store, store, engine.fingerprint)  # no encoder in the transformations

    index.insert(docs[5])  # encoded now, not at the first query
    assert_one_valid_state_per_node(vector_store, store, engine.fingerprint)

    index.delete_ref_doc(docs[1].doc_id)  # the stock call
    assert_one_valid_state_per_node(vector_store, store, engine.fingerprint)

    index.delete_nodes([vector_store.get_nodes(None)[0].node_id])
    assert_one_valid_state_per_node(vector_store, store, engine.fingerprint)

    edited = changed(docs[2], docs[2].text + " It was repainted in 2024, in a colour close to the original.")
    index.refresh_ref_docs([edited, docs[6]])  # one changed, one new
    assert_one_valid_state_per_node(vector_store, store, engine.fingerprint)
    texts = " ".join(n.get_content() for n in vector_store.get_nodes(None))
    assert "repainted in 2024" in texts

    vector_store.clear()
    assert list(store.node_ids(engine.fingerprint)) == []


def test_ingestion_pipeline_upserts_replace_states(tmp_path, engine):
    store = StateStore(tmp_path / "states")
    llm = PicasoLLM(engine=engine, state_store=store)
    vector_store = PicasoChromaVectorStore(chroma_collection=collection(tmp_path), llm=llm)
    pipeline = IngestionPipeline(transformations=[SPLITTER, embed_model()], vector_store=vector_store,
                                 docstore=SimpleDocumentStore())  # docstore strategy: upserts
    docs = corpus_documents()[:4]
    pipeline.run(documents=docs)
    assert_one_valid_state_per_node(vector_store, store, engine.fingerprint)
    before = set(store.node_ids(engine.fingerprint))
    pipeline.run(documents=[changed(docs[0], "A short replacement text about the Eiffel Tower."), *docs[1:]])
    assert_one_valid_state_per_node(vector_store, store, engine.fingerprint)
    assert set(store.node_ids(engine.fingerprint)) != before


def test_ingest_re_ingests_changed_documents(tmp_path, engine):
    store = StateStore(tmp_path / "states")
    llm = PicasoLLM(engine=engine, state_store=store)
    vector_store = ChromaVectorStore(chroma_collection=collection(tmp_path))  # the plain store: ingest() keeps step
    transformations = [SPLITTER, PicasoStateEncoder(llm, show_progress=False), embed_model()]
    docs = corpus_documents()
    ingest(docs, transformations, vector_store, show_progress=False)
    assert_one_valid_state_per_node(vector_store, store, engine.fingerprint)
    assert ingest(docs, transformations, vector_store, show_progress=False) == []  # unchanged: nothing redone
    shorter = changed(docs[0], "The Eiffel Tower is in Paris.")  # fewer chunks than before
    redone = ingest([shorter, *docs[1:]], transformations, vector_store, show_progress=False)
    assert {n.ref_doc_id for n in redone} == {docs[0].doc_id}
    assert_one_valid_state_per_node(vector_store, store, engine.fingerprint)
    assert len([n for n in vector_store.get_nodes(None) if n.ref_doc_id == docs[0].doc_id]) == 1


def test_window_replacement_gets_states_of_the_window(tmp_path, engine):
    store = StateStore(tmp_path / "states")
    llm = PicasoLLM(engine=engine, state_store=store, max_new_tokens=4)
    vector_store = ChromaVectorStore(chroma_collection=collection(tmp_path))
    parser = SentenceWindowNodeParser.from_defaults(window_size=1)
    index = VectorStoreIndex.from_documents(
        corpus_documents(), storage_context=StorageContext.from_defaults(vector_store=vector_store), embed_model=embed_model(),
        transformations=[parser, PicasoStateEncoder(llm, show_progress=False, text_metadata_key="window")])
    fresh = PicasoLLM(engine=engine, state_store=store, max_new_tokens=4)  # nothing in memory: states from the store
    engine_ = index.as_query_engine(llm=fresh, similarity_top_k=3, node_postprocessors=[
        MetadataReplacementPostProcessor(target_metadata_key="window"), PicasoNodePostprocessor(fresh, method="picaso-s")])
    response = engine_.query("When was the Eiffel Tower completed?")
    retrieval = response.metadata["picaso"]["calls"][0]["retrieval"]
    assert retrieval["states_loaded"] == 3 and retrieval["states_encoded"] == 0, retrieval  # none stale
    assert any(len(node_llm_text(s.node)) > len(s.node.metadata["original_text"]) for s in response.source_nodes)


def test_vector_store_bad_input_names_the_fix(tmp_path, engine):
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding  # noqa: F401 - the real MiniLM below

    from picaso_rag import PicasoError

    store = StateStore(tmp_path / "states")
    llm = PicasoLLM(engine=engine, state_store=store, max_new_tokens=4)
    vector_store = PicasoChromaVectorStore(chroma_collection=collection(tmp_path), llm=llm)
    index = VectorStoreIndex.from_documents(corpus_documents()[:2], embed_model=embed_model(), transformations=[SPLITTER],
                                            storage_context=StorageContext.from_defaults(vector_store=vector_store))
    for top_k in (-3, 0):
        with pytest.raises(PicasoError, match="similarity_top_k must be a positive integer"):
            index.as_retriever(similarity_top_k=top_k).retrieve("Eiffel")

    class OtherDimension(type(embed_model())):  # another embedding model: 385 dimensions instead of 384
        def _get_query_embedding(self, query: str) -> list[float]:
            return super()._get_query_embedding(query) + [0.0]

    other = OtherDimension(model_name=embed_model().model_name, device="cpu")
    with pytest.raises(PicasoError, match="use the embed_model it was ingested with"):
        VectorStoreIndex.from_vector_store(vector_store, embed_model=other).as_retriever().retrieve("Eiffel")
    assert_one_valid_state_per_node(vector_store, store, engine.fingerprint)  # nothing lost


def test_a_shared_store_that_is_down_degrades_to_encoding(tmp_path, engine):
    """An S3 store that cannot be reached: the query is answered from states encoded now, and says so."""
    import socket

    boto3 = pytest.importorskip("boto3")
    from botocore.config import Config

    from picaso_rag.s3store import S3StateStore

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="x", aws_secret_access_key="y",
                          region_name="us-east-1", config=Config(connect_timeout=1, retries={"max_attempts": 1}))
    down = S3StateStore("states", client=client)
    vector_store = ChromaVectorStore(chroma_collection=collection(tmp_path))
    index = VectorStoreIndex.from_documents(corpus_documents()[:3], embed_model=embed_model(), transformations=[SPLITTER],
                                            storage_context=StorageContext.from_defaults(vector_store=vector_store))
    llm = PicasoLLM(engine=engine, state_store=down, max_new_tokens=4)
    response = index.as_query_engine(llm=llm, similarity_top_k=2, node_postprocessors=[
        PicasoNodePostprocessor(llm, method="picaso-s")]).query("When was the Eiffel Tower completed?")
    meta = response.metadata["picaso"]
    assert str(response) and meta["k"] == 2 and meta["states_encoded"] == 2 and meta["states_queued_for_store"] == 2
    assert meta["calls"][0]["retrieval"]["encode_reasons"] == {"store unavailable": 2}
    assert llm.state_writer.flush(60) and llm.state_writer.stats().failed == 2  # the write-backs failed too: counted


def test_a_lone_surrogate_costs_neither_the_document_nor_its_group(tmp_path, engine, caplog):
    store = StateStore(tmp_path / "states")
    llm = PicasoLLM(engine=engine, state_store=store, max_new_tokens=4)
    vector_store = ChromaVectorStore(chroma_collection=collection(tmp_path))
    docs = [Document(text="Good text one.", id_="a"), Document(text="Bad \ud800 text.", id_="b", metadata={"t": "x\udc00"}),
            Document(text="Good text two.", id_="c")]
    added = ingest(docs, [SentenceSplitter(), PicasoStateEncoder(llm, show_progress=False), embed_model()], vector_store,
                   show_progress=False)
    assert sorted(n.ref_doc_id for n in added) == ["a", "b", "c"] and vector_store.client.count() == 3
    assert "lone surrogate" in caplog.text
    assert_one_valid_state_per_node(vector_store, store, engine.fingerprint)
    assert "Bad \ufffd text." in [n.get_content() for n in vector_store.get_nodes(None)]


def test_a_full_disk_degrades_like_a_read_only_store(tmp_path, engine):
    """A file system that refuses the state files (the kernel's EFBIG, as on a full quota): answered from
    fresh states, flagged, nothing half-written left behind."""
    vector_store = ChromaVectorStore(chroma_collection=collection(tmp_path))
    index = VectorStoreIndex.from_documents(corpus_documents()[:3], embed_model=embed_model(), transformations=[SPLITTER],
                                            storage_context=StorageContext.from_defaults(vector_store=vector_store))
    store = StateStore(tmp_path / "states")
    llm = PicasoLLM(engine=engine, state_store=store, max_new_tokens=4)
    query_engine = index.as_query_engine(llm=llm, similarity_top_k=2, node_postprocessors=[PicasoNodePostprocessor(llm, method="picaso-s")])
    state_bytes = engine.encode(["When was the Eiffel Tower completed?"])[0].nbytes  # a state file holds at least this
    with file_size_limit(state_bytes // 4):
        response = query_engine.query("When was the Eiffel Tower completed?")
        assert llm.state_writer.flush(30)  # the write-backs run in the background: under the limit too
    meta = response.metadata["picaso"]
    assert str(response) and meta["k"] == 2 and meta["states_encoded"] == 2 and meta["states_queued_for_store"] == 2
    assert llm.state_writer.stats().failed == 2 and llm.state_writer.stats().written == 0
    assert not list(store.node_ids())
    assert not [p for p in store.directory.rglob("*") if p.is_file() and p.suffix not in (".lock",) and p.name != ".mac-key"]


def test_the_answer_does_not_wait_for_the_stores_write(tmp_path, engine):
    """A store whose writes hang (a slow disk, a stalled network): the query is answered from the states
    encoded for it, the write-backs wait in the LLM's bounded writer, and land once the store moves."""
    from .test_state_tiers import BlockingStore

    vector_store = ChromaVectorStore(chroma_collection=collection(tmp_path))
    index = VectorStoreIndex.from_documents(corpus_documents()[:3], embed_model=embed_model(), transformations=[SPLITTER],
                                            storage_context=StorageContext.from_defaults(vector_store=vector_store))
    slow = BlockingStore(StateStore(tmp_path / "states"))
    llm = PicasoLLM(engine=engine, state_store=slow, max_new_tokens=4)
    query_engine = index.as_query_engine(llm=llm, similarity_top_k=2, node_postprocessors=[PicasoNodePostprocessor(llm, method="picaso-s")])
    response = query_engine.query("When was the Eiffel Tower completed?")  # returns while both writes hang
    meta = response.metadata["picaso"]
    assert str(response) and meta["states_encoded"] == 2 and meta["states_queued_for_store"] == 2
    assert llm.state_writer.stats().pending == 2 and slow.puts == 0 and not list(slow.inner.node_ids())
    slow.release.set()
    assert llm.state_writer.flush(30) and slow.puts == 2
    assert sorted(slow.inner.node_ids()) == sorted(s.node.node_id for s in response.source_nodes)


def test_a_query_that_retrieved_a_node_just_before_it_was_deleted_does_not_bring_it_back(tmp_path, engine):
    """The query retrieved the node, then the node was deleted (stock delete_ref_doc), then the query
    needed its state: it is encoded for this answer, and not written back (no orphan state)."""
    from llama_index.llms.picaso import DocumentRef

    store = StateStore(tmp_path / "states")
    llm = PicasoLLM(engine=engine, state_store=store)
    vector_store = PicasoChromaVectorStore(chroma_collection=collection(tmp_path), llm=llm)
    docs = corpus_documents()
    index = VectorStoreIndex.from_documents(docs[:3], storage_context=StorageContext.from_defaults(vector_store=vector_store),
                                            embed_model=embed_model(), transformations=[SPLITTER])
    retrieved = [n for n in vector_store.get_nodes(None) if n.ref_doc_id == docs[1].doc_id]  # what the query got
    refs = [DocumentRef.of(node_llm_text(n), n.node_id) for n in retrieved]
    index.delete_ref_doc(docs[1].doc_id)  # deleted before the query resolved its states
    fresh = PicasoLLM(engine=engine, state_store=store)  # a fresh LLM: nothing in memory
    resolution = fresh.resolve_states(refs)
    assert len(resolution.states) == len(refs) and resolution.stats["states_encoded"] == len(refs)
    assert resolution.stats["write_back_queued"] == len(refs) and fresh.state_writer.flush(30)  # then written back
    assert_one_valid_state_per_node(vector_store, store, engine.fingerprint)  # no orphan of the deleted nodes
    index.insert(docs[1])  # ingested again: its states are stored again
    assert_one_valid_state_per_node(vector_store, store, engine.fingerprint)
