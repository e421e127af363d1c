"""PicasoNodePostprocessor: loads (or lazily encodes) the retrieved nodes' states for PicasoLLM.

Usage::

    composer = PicasoNodePostprocessor(llm=llm, method="picaso-s")   # or picaso-r, caso, soup, concat
    engine = index.as_query_engine(llm=llm, node_postprocessors=[composer], similarity_top_k=5)

It opens a ticket with the LLM (the method and the nodes' exact LLM texts, under a fresh random
token) and returns copies of the nodes whose LLM text carries the ticket's markers; their text,
metadata and ids are the real ones, and the stock engines' ``response.source_nodes`` are the
original nodes again (see ``handoff.py`` and ``metadata.py``). Put it last among the
postprocessors, so that it sees the text the LLM will see. ``method="concat"`` is the ordinary
baseline: the same model reads the documents' tokens.
"""

from __future__ import annotations

from typing import Any, List, Optional

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, QueryBundle

from picaso_rag import CONV_POLICIES, PicasoError

from .base import COMPOSE_METHODS, CONCAT, PicasoLLM
from .handoff import DocumentRef, Ticket
from .metadata import note_retrieval
from .nodes import marked_node, node_llm_text, original_node


class PicasoNodePostprocessor(BaseNodePostprocessor):
    """Hands the retrieved nodes' states to a :class:`PicasoLLM` (see the module docstring)."""

    method: str = Field(default="picaso-s", description="picaso-s, picaso-r, caso, soup or concat.")
    conv: str = Field(default="mean", description="conv state after composition: mean or zero (last: caso only).")

    _llm: PicasoLLM = PrivateAttr()

    def __init__(self, llm: PicasoLLM, method: str = "picaso-s", conv: str = "mean", **kwargs: Any) -> None:
        if not isinstance(llm, PicasoLLM):
            raise PicasoError(f"PicasoNodePostprocessor needs the PicasoLLM that will answer, got {type(llm).__name__}.")
        if method not in COMPOSE_METHODS:
            raise PicasoError(f"unknown method {method!r}; choose one of {', '.join(COMPOSE_METHODS)}.")
        if conv not in CONV_POLICIES or (conv == "last" and method not in ("caso", CONCAT)):
            raise PicasoError(f"conv={conv!r} does not fit method {method!r}; use 'mean' (default) or 'zero'.")
        super().__init__(method=method, conv=conv, **kwargs)
        self._llm = llm

    @classmethod
    def class_name(cls) -> str:
        return "PicasoNodePostprocessor"

    @property
    def llm(self) -> PicasoLLM:
        return self._llm

    def _postprocess_nodes(self, nodes: List[NodeWithScore], query_bundle: Optional[QueryBundle] = None) -> List[NodeWithScore]:
        # (a chat engine's condensed question that came back empty was already replaced by the
        # user's message: see PicasoLLM and metadata.condense_fallback)
        if query_bundle is not None and not query_bundle.query_str.strip():
            raise PicasoError("the query is empty or whitespace; pass a question (the documents would be composed "
                              "for nothing).")
        note_retrieval()
        originals = [original_node(scored.node) for scored in nodes]  # a node marked by an earlier call
        docs: list[DocumentRef] = []
        slots: list[int | None] = []
        for node in originals:
            text = node_llm_text(node)
            slots.append(len(docs) if text else None)
            if text:
                docs.append(DocumentRef.of(text, node.node_id))
        stats: dict = {}
        if self.method != CONCAT and docs:
            stats = self._llm.resolve_states(docs).stats  # loads or encodes now, keeps them in memory
        ticket = self._llm.handoff.open(Ticket(self.method, self.conv, docs, stats))
        return [NodeWithScore(node=marked_node(node, *ticket.markers(slot)) if slot is not None else node,
                              score=scored.score)
                for scored, node, slot in zip(nodes, originals, slots)]
