"""Ingestion: encode states while nodes are ingested; add nodes within Chroma's batch limit; delete.

Usage::

    encoder = PicasoStateEncoder(llm=llm)            # llm has a state_store
    index = VectorStoreIndex.from_documents(docs, storage_context=ctx, embed_model=embed,
                                            transformations=[SentenceSplitter(), encoder])
    # or, for large corpora, in batches Chroma accepts:
    ingest(docs, [SentenceSplitter(), encoder, embed], vector_store)
    delete_ref_doc(index, "doc-1", llm.state_store)  # the index's nodes and their states
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Sequence

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.ingestion import IngestionPipeline
from llama_index.core.schema import BaseNode, Document, TransformComponent
from llama_index.core.vector_stores.types import BasePydanticVectorStore, MetadataFilter, MetadataFilters
from tqdm.auto import tqdm

from picaso_rag import PicasoError, StateStore

from .base import PicasoLLM
from .handoff import DocumentRef
from .postprocessor import node_llm_text

logger = logging.getLogger("llama_index.llms.picaso")

METADATA_KEY = "picaso_key"
CHROMA_MAX_BATCH = 5461  # records per add accepted by Chroma's local (SQLite) client


class PicasoStateEncoder(TransformComponent):
    """Encodes each node's state from exactly its LLM text and writes it to the LLM's state store.

    The node's metadata gets only a short key (``picaso_key``: the first 16 hex digits of the
    sha256 of that text), excluded from the LLM and embedding text, so nothing the model or the
    embedder reads changes. Put it after every transformation that edits text or metadata.
    Nodes whose stored state is valid for this model and text are skipped (re-runs are cheap).
    """

    batch_size: int = Field(default=16, gt=0, description="Nodes encoded per model call.")
    show_progress: bool = Field(default=True, description="Show a progress bar while encoding.")
    model_fingerprint: str = Field(default="", description="The model's fingerprint (part of the ingestion cache key).")

    _llm: PicasoLLM = PrivateAttr()

    def __init__(self, llm: PicasoLLM, batch_size: int = 16, show_progress: bool = True, **kwargs: Any) -> None:
        if not isinstance(llm, PicasoLLM):
            raise PicasoError(f"PicasoStateEncoder needs a PicasoLLM, got {type(llm).__name__}.")
        if llm.state_store is None:
            raise PicasoError("PicasoStateEncoder writes states to the LLM's store: create the LLM with "
                              "state_store=StateStore('<dir beside the vector store>').")
        super().__init__(batch_size=batch_size, show_progress=show_progress,
                         model_fingerprint=llm.engine.fingerprint, **kwargs)
        self._llm = llm

    @classmethod
    def class_name(cls) -> str:
        return "PicasoStateEncoder"

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        store: StateStore = self._llm.state_store  # type: ignore[assignment]
        fingerprint = self._llm.engine.fingerprint
        todo: list[tuple[BaseNode, str]] = []
        for node in nodes:
            mark_node(node)
            text = node_llm_text(node)
            if not text:
                logger.info("node %s has no text: no state encoded", node.node_id)
                continue
            node.metadata[METADATA_KEY] = DocumentRef.of(text).key
            if not store.get(node.node_id, fingerprint, text=text).ok:
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


def mark_node(node: BaseNode) -> None:
    """Exclude the state key from the node's LLM and embedding text (idempotent)."""
    for keys in (node.excluded_llm_metadata_keys, node.excluded_embed_metadata_keys):
        if METADATA_KEY not in keys:
            keys.append(METADATA_KEY)


def add_batch_limit(vector_store: BasePydanticVectorStore) -> int:
    """Records one ``add`` may carry: Chroma's own limit (5,461 for the local client), else 2,048."""
    collection = getattr(vector_store, "_collection", None)
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


def ingest(documents: Sequence[Document], transformations: Sequence[TransformComponent],
           vector_store: BasePydanticVectorStore, documents_per_run: int = 256, show_progress: bool = True) -> list[BaseNode]:
    """Run ``transformations`` (splitter, :class:`PicasoStateEncoder`, embedding model...) over the
    documents, a group at a time, adding each group's nodes to ``vector_store`` within its batch limit.

    Returns the nodes added. Usage: ``ingest(docs, [SentenceSplitter(), encoder, embed_model], vector_store)``.
    """
    if documents_per_run < 1:
        raise PicasoError(f"documents_per_run must be >= 1, got {documents_per_run}.")
    pipeline = IngestionPipeline(transformations=list(transformations))
    added: list[BaseNode] = []
    groups = range(0, len(documents), documents_per_run)
    for start in tqdm(groups, desc="Ingesting", unit="group", disable=not show_progress or len(groups) < 2):
        nodes = pipeline.run(documents=list(documents[start:start + documents_per_run]), show_progress=False)
        add_nodes(vector_store, nodes)
        added += nodes
    return added


def _ref_doc_node_ids(vector_store: BasePydanticVectorStore, ref_doc_id: str) -> list[str]:
    collection = getattr(vector_store, "_collection", None)
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
    return state_store.delete_many(node_ids)


def delete_nodes(index: Any, node_ids: Iterable[str], state_store: StateStore, **delete_kwargs: Any) -> int:
    """Delete nodes from the index and their states from the store; returns state files removed."""
    node_ids = list(node_ids)
    index.delete_nodes(node_ids, **delete_kwargs)
    return state_store.delete_many(node_ids)


def prune_states(vector_store: BasePydanticVectorStore, state_store: StateStore) -> int:
    """Delete states whose node is no longer in the vector store (e.g. after stock deletions)."""
    collection = getattr(vector_store, "_collection", None)
    if collection is None or not hasattr(collection, "get"):
        raise PicasoError("prune_states lists ids through Chroma; for another store call "
                          "state_store.prune(<ids still in the index>).")
    return state_store.prune(set(collection.get(include=[])["ids"]))
