"""Ingestion: states follow the nodes through their whole lifecycle.

Usage::

    vector_store = PicasoChromaVectorStore(chroma_collection=collection, llm=llm)   # llm has a state_store
    index = VectorStoreIndex.from_documents(docs, storage_context=StorageContext.from_defaults(
        vector_store=vector_store), embed_model=embed)
    index.insert(doc); index.delete_ref_doc("doc-1"); index.refresh_ref_docs(docs)   # states follow, stock calls
    # or, for large corpora, in batches Chroma accepts, resumable, re-ingesting changed documents:
    ingest(docs, [SentenceSplitter(), PicasoStateEncoder(llm), embed], vector_store)

:class:`PicasoChromaVectorStore` is a ``ChromaVectorStore`` that writes each node's state before
its record (``add``: ``index.insert``, ``IngestionPipeline`` upserts, ``refresh_ref_docs``) and
deletes the states of the records it deletes (``delete``, ``delete_nodes``, ``clear``), so stock
LlamaIndex calls leave exactly one state per live node. With a plain ``ChromaVectorStore``, use
:class:`PicasoStateEncoder` in the transformations and :func:`delete_ref_doc` / :func:`prune_states`.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, List, Optional, Sequence

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.ingestion import IngestionPipeline
from llama_index.core.node_parser import NodeParser
from llama_index.core.node_parser.node_utils import default_id_func
from llama_index.core.schema import BaseNode, Document, TransformComponent
from llama_index.core.vector_stores.types import (BasePydanticVectorStore, MetadataFilter, MetadataFilters,
                                                 VectorStoreQuery, VectorStoreQueryResult)
from llama_index.vector_stores.chroma import ChromaVectorStore
from tqdm.auto import tqdm

from picaso_rag import PicasoError, StateStore
from picaso_rag.engine import replace_lone_surrogates

from .base import PicasoLLM
from .handoff import DocumentRef
from .nodes import node_llm_text

logger = logging.getLogger("llama_index.llms.picaso")

METADATA_KEY = "picaso_key"
DOC_NODES_KEY = "picaso_doc_nodes"  # on every node ingest() adds: how many nodes its document has
DOC_HASH_KEY = "picaso_doc_hash"  # on every node ingest() adds: its document's hash (re-ingested when it changes)
CHROMA_MAX_BATCH = 5461  # records per add accepted by Chroma's local (SQLite) client


class PicasoStateEncoder(TransformComponent):
    """Encodes each node's state from exactly its LLM text and writes it to the LLM's state store.

    The node's metadata gets only a short key (``picaso_key``: the first 16 hex digits of the
    sha256 of that text), excluded from the LLM and embedding text, so nothing the model or the
    embedder reads changes. Put it after every transformation that edits text or metadata.
    Nodes whose stored state is valid for this model and text are skipped (re-runs are cheap).

    ``text_metadata_key``: with ``SentenceWindowNodeParser`` + ``MetadataReplacementPostProcessor(
    target_metadata_key="window")`` the LLM sees the window, not the sentence: pass the same key
    so that the stored state is the state of the text the LLM will see.
    """

    batch_size: int = Field(default=16, gt=0, description="Nodes encoded per model call.")
    show_progress: bool = Field(default=True, description="Show a progress bar while encoding.")
    model_fingerprint: str = Field(default="", description="The model's fingerprint (part of the ingestion cache key).")
    text_metadata_key: str | None = Field(default=None, description="Metadata key whose value replaces the node text "
                                          "before the LLM sees it (as MetadataReplacementPostProcessor does).")

    _llm: PicasoLLM = PrivateAttr()

    def __init__(self, llm: PicasoLLM, batch_size: int = 16, show_progress: bool = True,
                 text_metadata_key: str | None = None, **kwargs: Any) -> None:
        if not isinstance(llm, PicasoLLM):
            raise PicasoError(f"PicasoStateEncoder needs a PicasoLLM, got {type(llm).__name__}.")
        if llm.state_store is None:
            raise PicasoError("PicasoStateEncoder writes states to the LLM's store: create the LLM with "
                              "state_store=StateStore('<dir beside the vector store>').")
        super().__init__(batch_size=batch_size, show_progress=show_progress, text_metadata_key=text_metadata_key,
                         model_fingerprint=llm.engine.fingerprint, **kwargs)
        self._llm = llm

    @classmethod
    def class_name(cls) -> str:
        return "PicasoStateEncoder"

    @property
    def state_store(self) -> StateStore:
        return self._llm.state_store  # type: ignore[return-value]

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        store: StateStore = self._llm.state_store  # type: ignore[assignment]
        fingerprint = self._llm.engine.fingerprint
        todo: list[tuple[BaseNode, str]] = []
        for node in nodes:
            mark_node(node)
            text = state_text(node, self.text_metadata_key)
            if not text:
                logger.info("node %s has no text: no state encoded", node.node_id)
                continue
            node.metadata[METADATA_KEY] = DocumentRef.of(text).key
            if not store.get(node.node_id, fingerprint, text=text, spec=self._llm.engine.state_spec).ok:
                todo.append((node, text))
        bar = tqdm(total=len(todo), desc="Encoding states", unit="node", disable=not self.show_progress or not todo)
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start:start + self.batch_size]
            states = self._llm.engine.encode([text for _, text in batch], batch_size=self.batch_size)
            for (node, text), state in zip(batch, states):
                store.put(node.node_id, state, text=text)
            bar.update(len(batch))
        bar.close()
        return nodes


def state_text(node: BaseNode, text_metadata_key: str | None = None) -> str:
    """The LLM text a node's state is encoded from: its own, or (``text_metadata_key``) the text a
    MetadataReplacementPostProcessor will put in its place before the LLM sees it."""
    if text_metadata_key and text_metadata_key in node.metadata:
        replaced = node.model_copy()
        replaced.set_content(str(node.metadata[text_metadata_key]))
        return node_llm_text(replaced)
    return node_llm_text(node)


def mark_node(node: BaseNode) -> None:
    """Exclude the state key from the node's LLM and embedding text (idempotent)."""
    for keys in (node.excluded_llm_metadata_keys, node.excluded_embed_metadata_keys):
        if METADATA_KEY not in keys:
            keys.append(METADATA_KEY)


def _chroma_collection(vector_store: BasePydanticVectorStore) -> Any:
    """The Chroma collection behind a ChromaVectorStore (its public ``client``), else None."""
    return vector_store.client if isinstance(vector_store, ChromaVectorStore) else None


def add_batch_limit(vector_store: BasePydanticVectorStore) -> int:
    """Records one ``add`` may carry: Chroma's own limit (5,461 for the local client), else 2,048."""
    collection = _chroma_collection(vector_store)
    client = getattr(collection, "_client", None)
    if client is not None and hasattr(client, "get_max_batch_size"):
        return min(CHROMA_MAX_BATCH, int(client.get_max_batch_size()))
    return 2048


def add_nodes(vector_store: BasePydanticVectorStore, nodes: Sequence[BaseNode], batch_size: int | None = None) -> list[str]:
    """Add embedded nodes to the vector store in batches it accepts; returns their ids.

    (ChromaVectorStore.add itself sends up to 41,665 records per call, which Chroma's local
    client refuses past 5,461; a refused add can leave the collection unusable.)
    """
    limit = add_batch_limit(vector_store)
    batch_size = min(batch_size or limit, limit)
    missing = [n.node_id for n in nodes if n.embedding is None]
    if missing:
        raise PicasoError(f"{len(missing)} nodes have no embedding (e.g. {missing[0]}); put an embedding model "
                          "in the transformations, or embed the nodes before adding them.")
    ids: list[str] = []
    for start in range(0, len(nodes), batch_size):
        ids += vector_store.add(list(nodes[start:start + batch_size]))
    return ids


class PicasoChromaVectorStore(ChromaVectorStore):
    """A ChromaVectorStore whose nodes' states live and die with their records (see the module docstring).

    Usage: ``PicasoChromaVectorStore(chroma_collection=collection, llm=llm)``, then any stock
    LlamaIndex ingestion, insertion, refresh or deletion. Adds are split within Chroma's batch limit.
    """

    _encoder: PicasoStateEncoder = PrivateAttr()

    def __init__(self, chroma_collection: Any = None, *, llm: PicasoLLM, text_metadata_key: str | None = None,
                 encode_batch_size: int = 16, **kwargs: Any) -> None:
        super().__init__(chroma_collection=chroma_collection, **kwargs)
        self._encoder = PicasoStateEncoder(llm, batch_size=encode_batch_size, show_progress=False,
                                           text_metadata_key=text_metadata_key)

    @classmethod
    def class_name(cls) -> str:
        return "PicasoChromaVectorStore"

    @property
    def state_store(self) -> StateStore:
        return self._encoder.state_store

    def add(self, nodes: List[BaseNode], **add_kwargs: Any) -> List[str]:
        self._encoder(nodes)  # states first: a crash before the records leaves no record without its state
        limit = add_batch_limit(self)
        ids: list[str] = []
        for start in range(0, len(nodes), limit):
            with _named_chroma_errors("the nodes' embeddings"):
                ids += super().add(list(nodes[start:start + limit]), **add_kwargs)
        return ids

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        top_k = query.similarity_top_k
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise PicasoError(f"similarity_top_k must be a positive integer, got {top_k!r}; pass e.g. "
                              "index.as_query_engine(similarity_top_k=3).")
        with _named_chroma_errors("the query embedding"):
            return super().query(query, **kwargs)

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        node_ids = self.client.get(where={"document_id": ref_doc_id}, include=[])["ids"]
        super().delete(ref_doc_id, **delete_kwargs)
        # after the records: a crash in between leaves prunable states; tombstones stop racing queries' write-backs
        self.state_store.delete_many(node_ids, node_deleted=True)

    def delete_nodes(self, node_ids: Optional[List[str]] = None, filters: Optional[MetadataFilters] = None,
                     **delete_kwargs: Any) -> None:
        if filters:  # the ids the filters match, through the stock (public) read
            gone = [node.node_id for node in self.get_nodes(node_ids=node_ids or None, filters=filters)]
        else:
            gone = list(node_ids or [])
        super().delete_nodes(node_ids=node_ids, filters=filters, **delete_kwargs)
        self.state_store.delete_many(gone, node_deleted=True)

    def clear(self) -> None:
        gone = self.client.get(include=[])["ids"]
        super().clear()
        self.state_store.delete_many(gone, node_deleted=True)


@contextmanager
def _named_chroma_errors(what: str) -> Iterator[None]:
    """Chroma's dimension error, as an error that names the fix."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - chromadb.errors.InvalidArgumentError, re-raised if not ours
        message = str(exc)
        if "expecting embedding with dimension" not in message:
            raise
        raise PicasoError(f"{what}: {message}. The collection was built with another embedding model: use the "
                          "embed_model it was ingested with, or ingest into a new collection.") from exc


def stable_node_id(i: int, doc: BaseNode) -> str:
    """Node id ``<document id>#<chunk index>``: a document split again gets the same node ids, so a
    re-run of :func:`ingest` finds the states it already wrote (a node parser's ``id_func``)."""
    return f"{doc.node_id}#{i}"


def _with_stable_ids(transformation: TransformComponent) -> TransformComponent:
    """A node parser with LlamaIndex's default (random uuid) ids, copied to use :func:`stable_node_id`."""
    if isinstance(transformation, NodeParser) and transformation.id_func is default_id_func:
        return transformation.model_copy(update={"id_func": stable_node_id})
    return transformation


def _ingested(vector_store: BasePydanticVectorStore, docs: list[Document]) -> tuple[set[str], list[str]]:
    """(documents whose every node is in the vector store, unchanged; ids of the records of documents
    only partly there or whose text or metadata changed since).

    A document is complete when it holds as many records as its nodes say it has
    (:data:`DOC_NODES_KEY`, written by :func:`ingest` on every node) and they carry its current hash
    (:data:`DOC_HASH_KEY`); records without a count were added otherwise and are taken as complete.
    """
    doc_ids = [d.node_id for d in docs]
    hashes = {d.node_id: d.hash for d in docs}
    collection = _chroma_collection(vector_store)
    if collection is None or not hasattr(collection, "get"):
        raise PicasoError(f"ingest(resume=True) looks up what is already ingested through Chroma; with "
                          f"{type(vector_store).__name__} pass resume=False.")
    found = collection.get(where={"document_id": {"$in": doc_ids}}, include=["metadatas"])
    records: dict[str, list[tuple[str, Any, Any]]] = {}
    for node_id, metadata in zip(found["ids"], found["metadatas"]):
        records.setdefault(metadata.get("document_id"), []).append(
            (node_id, metadata.get(DOC_NODES_KEY), metadata.get(DOC_HASH_KEY)))
    complete, redo = set(), []
    for doc_id, held in records.items():
        counts = {count for _, count, _ in held}
        stored_hashes = {h for _, _, h in held}
        changed = stored_hashes != {None} and stored_hashes != {hashes.get(doc_id)}
        # no count: added by something else than ingest (e.g. VectorStoreIndex.from_documents), taken as whole
        if (counts == {None} or counts == {len(held)}) and not changed:
            complete.add(doc_id)
        else:  # an add cut short (a document's nodes spread over several batches), or the document changed
            redo += [node_id for node_id, _, _ in held]
    return complete, redo


def _count_nodes_per_document(nodes: Sequence[BaseNode], hashes: dict[str, str]) -> None:
    """Write into each node how many nodes its document has, and the document's hash (excluded from
    the LLM and embedding text, so neither the stored state nor the embedding changes)."""
    per_doc: dict[str | None, int] = {}
    for node in nodes:
        per_doc[node.ref_doc_id] = per_doc.get(node.ref_doc_id, 0) + 1
    for node in nodes:
        node.metadata[DOC_NODES_KEY] = per_doc[node.ref_doc_id]
        node.metadata[DOC_HASH_KEY] = hashes.get(node.ref_doc_id or "", "")
        for key in (DOC_NODES_KEY, DOC_HASH_KEY):
            for keys in (node.excluded_llm_metadata_keys, node.excluded_embed_metadata_keys):
                if key not in keys:
                    keys.append(key)


def ingest(documents: Sequence[Document], transformations: Sequence[TransformComponent],
           vector_store: BasePydanticVectorStore, documents_per_run: int = 256, show_progress: bool = True,
           resume: bool = True) -> list[BaseNode]:
    """Run ``transformations`` (splitter, :class:`PicasoStateEncoder`, embedding model...) over the
    documents, a group at a time, adding each group's nodes to ``vector_store`` within its batch limit.

    Crash-safe and resumable (``resume=True``, Chroma): a document whose nodes are all in the vector
    store, with its current hash, is skipped; one only partly there (an interrupted add) or whose
    text or metadata changed has its records and their states removed and is ingested again. States are written (atomically, fsynced) before their nodes reach the vector
    store, and node ids are stable (``<document id>#<chunk>``, see :func:`stable_node_id`), so a
    re-run after a crash reuses the states already written and leaves no orphan. Documents need
    stable ids (``Document(id_=...)``) for this; leftover temporary files of the state store are
    removed first. See docs/guarantees.md.

    Returns the nodes added. Usage: ``ingest(docs, [SentenceSplitter(), encoder, embed_model], vector_store)``.
    """
    if documents_per_run < 1:
        raise PicasoError(f"documents_per_run must be >= 1, got {documents_per_run}.")
    transformations = [_with_stable_ids(t) for t in transformations]
    stores = [t.state_store for t in transformations if isinstance(t, PicasoStateEncoder)]
    if isinstance(vector_store, PicasoChromaVectorStore):
        stores.append(vector_store.state_store)
    for store in stores:
        store.remove_temp_files()  # what a killed writer left (never another live writer's)
    pipeline = IngestionPipeline(transformations=transformations)
    documents = [_valid_unicode(d) for d in documents]
    added: list[BaseNode] = []
    groups = range(0, len(documents), documents_per_run)
    for start in tqdm(groups, desc="Ingesting", unit="group", disable=not show_progress or len(groups) < 2):
        group = list(documents[start:start + documents_per_run])
        if resume:
            complete, redo = _ingested(vector_store, group)
            if redo:
                logger.info("re-ingesting %d records of documents left incomplete or changed since", len(redo))
                vector_store.delete_nodes(redo)
                for store in stores:  # records first, then their states (a crash in between: prunable)
                    store.delete_many(redo)
            group = [d for d in group if d.node_id not in complete]
            if not group:
                continue
        nodes = pipeline.run(documents=group, show_progress=False)
        _count_nodes_per_document(nodes, {d.node_id: d.hash for d in group})
        add_nodes(vector_store, nodes)
        added += nodes
    return added


def _valid_unicode(doc: Document) -> Document:
    """``doc``, or a copy with lone surrogates (text that cannot be UTF-8, e.g. from a broken decoder)
    replaced by U+FFFD, with a warning: Chroma, the embedder and the tokenizer all need valid UTF-8,
    and one such document used to fail its whole ingestion group with a raw UnicodeEncodeError."""
    what = f"document {doc.node_id}"
    text = replace_lone_surrogates(doc.text, what)
    metadata = {key: replace_lone_surrogates(value, f"{what}, metadata {key!r}") if isinstance(value, str) else value
                for key, value in doc.metadata.items()}
    if text == doc.text and metadata == doc.metadata:
        return doc
    fixed = doc.model_copy()
    fixed.set_content(text)
    fixed.metadata = metadata
    return fixed


def _ref_doc_node_ids(vector_store: BasePydanticVectorStore, ref_doc_id: str) -> list[str]:
    collection = _chroma_collection(vector_store)
    if collection is not None and hasattr(collection, "get"):  # Chroma: ids only, no payload
        return list(collection.get(where={"document_id": ref_doc_id}, include=[])["ids"])
    try:
        nodes = vector_store.get_nodes(filters=MetadataFilters(filters=[MetadataFilter(key="doc_id", value=ref_doc_id)]))
    except NotImplementedError:
        raise PicasoError(f"{type(vector_store).__name__} cannot list a document's nodes; delete them with "
                          "delete_nodes(index, node_ids, store), or call store.prune(ids still in the index).") from None
    return [n.node_id for n in nodes]


def delete_ref_doc(index: Any, ref_doc_id: str, state_store: StateStore, **delete_kwargs: Any) -> int:
    """Delete a source document's nodes from the index and their states from the store.

    Returns the number of state files removed. Usage: ``delete_ref_doc(index, "doc-1", llm.state_store)``.
    """
    node_ids = _ref_doc_node_ids(index.vector_store, ref_doc_id)
    index.delete_ref_doc(ref_doc_id, **delete_kwargs)
    return state_store.delete_many(node_ids, node_deleted=True)


def delete_nodes(index: Any, node_ids: Iterable[str], state_store: StateStore, **delete_kwargs: Any) -> int:
    """Delete nodes from the index and their states from the store; returns state files removed."""
    node_ids = list(node_ids)
    index.delete_nodes(node_ids, **delete_kwargs)
    return state_store.delete_many(node_ids, node_deleted=True)


def prune_states(vector_store: BasePydanticVectorStore, state_store: StateStore) -> int:
    """Delete states whose node is no longer in the vector store (e.g. after stock deletions)."""
    collection = _chroma_collection(vector_store)
    if collection is None or not hasattr(collection, "get"):
        raise PicasoError("prune_states lists ids through Chroma; for another store call "
                          "state_store.prune(<ids still in the index>).")
    return state_store.prune(set(collection.get(include=[])["ids"]))
