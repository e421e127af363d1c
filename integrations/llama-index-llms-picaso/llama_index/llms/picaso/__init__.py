"""LlamaIndex integration of picaso-rag: answers read from composed document states of Mamba-2 or hybrid models (PICASO).

Usage::

    from llama_index.llms.picaso import PicasoLLM, PicasoNodePostprocessor, PicasoStateEncoder
    from picaso_rag import StateStore

    llm = PicasoLLM(model="./models/picaso-mini", state_store=StateStore("./picaso_db/states"))
    index = VectorStoreIndex.from_documents(docs, storage_context=ctx, embed_model=embed,
                                            transformations=[SentenceSplitter(), PicasoStateEncoder(llm)])
    engine = index.as_query_engine(llm=llm, similarity_top_k=5,
                                   node_postprocessors=[PicasoNodePostprocessor(llm, method="picaso-s")])
    response = engine.query("...")
    response.metadata["picaso"]          # method, k, tokens read at query time, states loaded/encoded, ...
"""

from .base import COMPOSE_METHODS, CONCAT, PicasoLLM, PicasoLLMError
from .handoff import DocumentRef
from .ingestion import (
    CHROMA_MAX_BATCH,
    DOC_HASH_KEY,
    DOC_NODES_KEY,
    METADATA_KEY,
    PicasoChromaVectorStore,
    PicasoStateEncoder,
    add_nodes,
    delete_nodes,
    delete_ref_doc,
    ingest,
    prune_states,
    stable_node_id,
    state_text,
)
from .metadata import METADATA_KEY as RESPONSE_METADATA_KEY
from .nodes import node_llm_text, original_node
from .postprocessor import PicasoNodePostprocessor

__all__ = [
    "CHROMA_MAX_BATCH",
    "COMPOSE_METHODS",
    "CONCAT",
    "DOC_HASH_KEY",
    "DOC_NODES_KEY",
    "DocumentRef",
    "METADATA_KEY",
    "PicasoLLM",
    "PicasoLLMError",
    "PicasoNodePostprocessor",
    "PicasoChromaVectorStore",
    "PicasoStateEncoder",
    "RESPONSE_METADATA_KEY",
    "add_nodes",
    "delete_nodes",
    "delete_ref_doc",
    "ingest",
    "node_llm_text",
    "original_node",
    "prune_states",
    "stable_node_id",
    "state_text",
]
