"""A separate process that ingests a corpus into a state store and a Chroma collection (the tests
kill it mid-way, or run two at once). Run: ``python -m tests.ingest_worker DIR [options]``.

It is what a user runs (tests/llamaindex_world.py's tiny sensitive Mamba-2, real MiniLM embeddings,
a real Chroma PersistentClient, :func:`ingest`); the options only choose the documents and where
the process SIGKILLs itself, so that a kill can land exactly inside a state write or a Chroma add.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from .llamaindex_world import corpus_documents, embed_model, sensitive_engine

import chromadb  # noqa: E402
from llama_index.core import Document  # noqa: E402
from llama_index.core.node_parser import SentenceSplitter  # noqa: E402
from llama_index.llms.picaso import PicasoLLM, PicasoStateEncoder, ingest, stable_node_id  # noqa: E402
from llama_index.vector_stores.chroma import ChromaVectorStore  # noqa: E402

from picaso_rag import StateStore, Tokenizer  # noqa: E402

from .conftest import TOKENIZER_JSON  # noqa: E402

DOCUMENTS_PER_RUN = 3


def documents(copies: int, variant: str = "") -> list[Document]:
    """``copies`` distinct copies of the test corpus (8 paragraphs each), with stable ids."""
    docs = []
    for copy in range(copies):
        for doc in corpus_documents():
            doc.id_ = f"{doc.id_}-copy{copy}"
            doc.set_content(f"{doc.text} (copy {copy}{variant})")
            docs.append(doc)
    return docs


def splitter() -> SentenceSplitter:
    return SentenceSplitter(chunk_size=48, chunk_overlap=8)


def expected_nodes(copies: int, variant: str = ""):
    """The nodes ingest() makes of these documents (stable ids), before embedding."""
    return splitter().model_copy(update={"id_func": stable_node_id})(documents(copies, variant))


def open_world(directory: Path, engine, collection: str = "docs", states: Path | None = None) -> tuple[ChromaVectorStore, PicasoLLM]:
    """Chroma under ``directory/chroma``; the state store under ``states`` (default ``directory/states``)."""
    client = chromadb.PersistentClient(path=str(directory / "chroma"))
    vector_store = ChromaVectorStore(chroma_collection=client.get_or_create_collection(collection))
    return vector_store, PicasoLLM(engine=engine, state_store=StateStore(states or directory / "states"))


def run_ingest(directory: Path, engine, copies: int, variant: str = "", collection: str = "docs",
               states: Path | None = None) -> list:
    vector_store, llm = open_world(directory, engine, collection, states)
    transformations = [splitter(), PicasoStateEncoder(llm, batch_size=4, show_progress=False), embed_model()]
    return ingest(documents(copies, variant), transformations, vector_store, documents_per_run=DOCUMENTS_PER_RUN,
                  show_progress=False)


def _kill_on_call(owner, name: str, nth: int, when) -> None:
    """SIGKILL this process during the ``nth`` call of ``owner.name`` for which ``when(*args)`` holds."""
    real, calls = getattr(owner, name), [0]

    def wrapped(*args, **kwargs):
        if when(*args):
            calls[0] += 1
            if calls[0] == nth:
                return when.kill(real, *args, **kwargs)
        return real(*args, **kwargs)

    setattr(owner, name, wrapped)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory", type=Path)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--variant", default="")
    parser.add_argument("--collection", default="docs")
    parser.add_argument("--states", type=Path, help="state store directory (default DIR/states)")
    parser.add_argument("--kill-in-state-write", type=int, default=0,
                        help="SIGKILL after the Nth state's temporary file is written and fsynced, before its rename")
    parser.add_argument("--kill-in-chroma-add", type=int, default=0,
                        help="SIGKILL while the Nth Chroma add is running")
    args = parser.parse_args(argv)

    if args.kill_in_state_write:
        def in_state_write(src, dst=None, *rest):
            return str(dst).endswith(".safetensors")
        in_state_write.kill = lambda real, *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        _kill_on_call(os, "replace", args.kill_in_state_write, in_state_write)
    if args.kill_in_chroma_add:
        def in_add(*_):
            return True

        def kill_during(real, *a, **k):
            threading.Timer(0.002, os.kill, (os.getpid(), signal.SIGKILL)).start()
            real(*a, **k)
            os.kill(os.getpid(), signal.SIGKILL)  # the add finished first: die right after it
        in_add.kill = kill_during
        _kill_on_call(ChromaVectorStore, "add", args.kill_in_chroma_add, in_add)

    engine = sensitive_engine(Tokenizer.from_file(TOKENIZER_JSON))
    added = run_ingest(args.directory, engine, args.copies, args.variant, args.collection, args.states)
    (args.directory / f"done-{args.collection}").write_text(str(len(added)))
    print(f"ingested {len(added)} nodes", file=sys.stderr)


if __name__ == "__main__":
    main()
