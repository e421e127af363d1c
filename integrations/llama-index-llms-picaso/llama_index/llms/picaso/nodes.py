"""The marked copies of retrieved nodes that carry a hand-off's markers (see ``handoff.py``).

    marked = marked_node(node, *ticket.markers(0))   # its LLM text wrapped in the markers, all else equal
    original_node(marked) is node                    # what a response's source_nodes show

Its own module because the postprocessor makes them and the response metadata unwraps them.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Optional

from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.schema import BaseNode, MetadataMode


def node_llm_text(node: Any) -> str:
    """The text the LLM sees for a node (its LLM metadata string and content), stripped.

    Stripped because ``compact`` mode strips each chunk before packing; the whitespace around a
    document is template text and is read as such.
    """
    return node.get_content(metadata_mode=MetadataMode.LLM).strip()



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
