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

import copy
import functools
from typing import Any, List, Optional

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore, QueryBundle

from picaso_rag import CONV_POLICIES, PicasoError

from .base import COMPOSE_METHODS, CONCAT, PicasoLLM
from .handoff import DocumentRef, Ticket
from .metadata import note_retrieval


def node_llm_text(node: Any) -> str:
    """The text the LLM sees for a node (its LLM metadata string and content), stripped.

    Stripped because ``compact`` mode strips each chunk before packing; the whitespace around a
    document is template text and is read as such.
    """
    return node.get_content(metadata_mode=MetadataMode.LLM).strip()


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


def marked_node(node: BaseNode, open_marker: str, close_marker: str) -> BaseNode:
    """A copy of ``node`` whose LLM text (only) is wrapped in the markers; everything else equal.

    The copy's class is a subclass of the node's own (``isinstance`` checks hold, ``class_name``
    is the original's), and the markers are private attributes: never serialized.
    """
    cls = _marked_class(type(node))
    values = {name: getattr(node, name) for name in type(node).model_fields}
    values["metadata"] = dict(node.metadata)
    values["excluded_llm_metadata_keys"] = list(node.excluded_llm_metadata_keys)
    values["excluded_embed_metadata_keys"] = list(node.excluded_embed_metadata_keys)
    marked = cls.model_construct(**values)
    marked._picaso_markers = (open_marker, close_marker)
    marked._picaso_original = node
    return marked


def original_node(node: BaseNode) -> BaseNode:
    """The node a marked copy was made from (``node`` itself when it is not marked)."""
    return node._picaso_original if isinstance(node, MarkedNode) else node  # type: ignore[attr-defined]


class MarkedNode:
    """Mixin of the marked copies' classes (``isinstance(node, MarkedNode)``)."""


@functools.cache
def _marked_class(cls: type) -> type:
    def get_content(self: Any, metadata_mode: MetadataMode = MetadataMode.NONE) -> str:
        content = cls.get_content(self, metadata_mode=metadata_mode)
        if metadata_mode != MetadataMode.LLM or not self._picaso_markers:
            return content
        open_marker, close_marker = self._picaso_markers
        return f"{open_marker}{content.strip()}{close_marker}"

    return type(f"PicasoMarked{cls.__name__}", (cls, MarkedNode), {
        "__module__": __name__,
        "__annotations__": {"_picaso_markers": Optional[tuple], "_picaso_original": Optional[Any]},
        "_picaso_markers": PrivateAttr(default=None),
        "_picaso_original": PrivateAttr(default=None),
        "get_content": get_content,
        # pickled (another process, a cache), a marked copy is its original node: the markers stay here
        "__reduce_ex__": lambda self, protocol: (copy.copy, (self._picaso_original,)),
    })
