"""``picaso-rag ingest``: files and folders into a Chroma collection and their document states.

    picaso-rag ingest ~/notes docs/handbook.md --chroma-path ./picaso_db/chroma --collection notes \\
        --states ./picaso_db/states --model models/picaso-mini [--state-precision bf16] [--chunk-size 256] [--prune]

Each file is one document whose id is its path relative to the folder named on the command line
(``notes/2024/plan.md``), so a re-run finds it again: a file ingested before and unchanged is skipped
(nothing encoded, nothing added), a changed file has its old chunks and states replaced, and
``--prune`` removes the documents of files no longer under the paths given. Interrupted, it resumes
where it stopped (``ingest()`` of the LlamaIndex integration: states are written before their
chunks reach Chroma). Text files (``.txt``, ``.md``, ``.rst``...) are read as UTF-8; other formats
(PDF, HTML, Word) go through LlamaIndex's file readers when ``llama-index-readers-file`` is
installed, and are skipped with a message otherwise. ``serve`` then answers over the collection.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("picaso_server.ingest")

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst", ".org", ".csv", ".tsv", ".json", ".yaml", ".yml"}
READER_SUFFIXES = {".pdf", ".html", ".htm", ".docx", ".pptx", ".epub", ".ipynb"}  # llama-index-readers-file


@dataclass(frozen=True)
class SourceFile:
    path: Path
    doc_id: str  # the path relative to the folder given, prefixed by the folder's name: stable across runs


def source_files(paths: list[str]) -> tuple[list[SourceFile], list[Path]]:
    """The files to ingest under ``paths`` (folders recursively, hidden entries skipped), and the
    files skipped for their format. Raises SystemExit naming a path that does not exist."""
    found: dict[str, SourceFile] = {}
    skipped: list[Path] = []
    for given in paths:
        root = Path(given).expanduser()
        if not root.exists():
            raise SystemExit(f"picaso-rag ingest: {given} does not exist; pass files or folders to ingest.")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if (p.is_file() or p.is_symlink())
                                                      and not any(part.startswith(".") for part in p.relative_to(root).parts))
        for path in files:
            if not path.is_file():  # a link to nothing: reported, not ingested
                skipped.append(path)
                continue
            suffix = path.suffix.lower()
            if suffix not in TEXT_SUFFIXES and suffix not in READER_SUFFIXES:
                skipped.append(path)
                continue
            doc_id = path.name if root.is_file() else f"{root.resolve().name}/{path.relative_to(root).as_posix()}"
            if doc_id in found and found[doc_id].path.resolve() != path.resolve():
                raise SystemExit(f"picaso-rag ingest: {found[doc_id].path} and {path} would both be document {doc_id!r}; "
                                 "ingest them in two runs, or rename one.")
            found[doc_id] = SourceFile(path, doc_id)
    return list(found.values()), skipped


def read_document(source: SourceFile) -> Any | None:
    """The file as one LlamaIndex Document (id: ``source.doc_id``), or None when it has no text or no reader."""
    from llama_index.core import Document

    if source.path.suffix.lower() in TEXT_SUFFIXES:
        try:
            raw = source.path.read_bytes()
        except OSError as exc:  # unreadable (permissions, a broken link): this file only, named
            logger.warning("skipped %s: cannot read it (%s)", source.path, exc.strerror or exc)
            return None
        text = raw.decode("utf-8", errors="replace")
        if "\ufffd" in text and b"\xef\xbf\xbd" not in raw:
            logger.warning("%s is not valid UTF-8: undecodable bytes were replaced by U+FFFD", source.path)
    else:
        try:
            from llama_index.core import SimpleDirectoryReader
            from llama_index.readers.file import PDFReader  # noqa: F401 - present only with llama-index-readers-file
        except ImportError:
            logger.warning("skipped %s: reading %s files needs `pip install llama-index-readers-file`",
                           source.path, source.path.suffix)
            return None
        pages = SimpleDirectoryReader(input_files=[str(source.path)]).load_data()
        text = "\n\n".join(page.text for page in pages)
    if not text.strip():
        return None
    # only stable metadata: the document's hash (what decides "changed") must not move with access times
    return Document(text=text, id_=source.doc_id, metadata={"source": source.doc_id},
                    excluded_embed_metadata_keys=[], excluded_llm_metadata_keys=[])


def run(args: argparse.Namespace) -> dict:
    """The ``ingest`` command; returns its summary (also printed)."""
    import chromadb
    from llama_index.core.node_parser import SentenceSplitter

    try:  # the encoding side of the LlamaIndex integration; serving does not need it
        from llama_index.llms.picaso import PicasoChromaVectorStore, PicasoLLM, PicasoStateEncoder, ingest
    except ImportError:
        raise SystemExit("picaso-rag ingest needs the LlamaIndex integration: pip install 'picaso-server[ingest]' "
                         "(or pip install -e integrations/llama-index-llms-picaso).") from None

    from picaso_rag import StateStore

    from .cli import load_embed_model

    sources, skipped = source_files(args.paths)
    for path in skipped:
        logger.info("skipped %s (not a text file or a format with a reader)", path)
    documents = [d for d in (read_document(s) for s in sources) if d is not None]
    try:
        store = StateStore(args.states, precision=args.state_precision, mac=args.state_key_file or False)
    except Exception as exc:  # a bad key file or directory: the error names the fix
        raise SystemExit(f"picaso-rag ingest: {exc}") from None
    llm = PicasoLLM(model=args.model, device=args.device, state_store=store, tokenizer=args.tokenizer)
    client = (chromadb.PersistentClient(path=args.chroma_path) if args.chroma_path
              else chromadb.HttpClient(host=args.chroma_host, port=args.chroma_port))
    vector_store = PicasoChromaVectorStore(chroma_collection=client.get_or_create_collection(args.collection), llm=llm)
    before = vector_store.client.count()
    added = ingest(documents, [SentenceSplitter(chunk_size=args.chunk_size, chunk_overlap=0),
                               PicasoStateEncoder(llm, show_progress=not args.quiet), load_embed_model(args.embed_model)],
                   vector_store, show_progress=not args.quiet)
    pruned: list[str] = []
    if args.prune:
        kept = {d.id_ for d in documents}
        held = {m.get("document_id") for m in vector_store.client.get(include=["metadatas"])["metadatas"]}
        for doc_id in sorted(d for d in held if d and d not in kept):
            vector_store.delete(doc_id)  # its chunks, then its states (tombstoned against racing queries)
            pruned.append(doc_id)
    summary = {"files": len(sources), "documents": len(documents), "skipped_files": len(skipped),
               "documents_ingested": len({n.ref_doc_id for n in added}), "chunks_added": len(added),
               "documents_pruned": len(pruned), "chunks_before": before, "chunks_now": vector_store.client.count(),
               "collection": args.collection, "states": str(args.states), "state_precision": args.state_precision}
    print(f"{summary['documents_ingested']} of {summary['documents']} documents ingested now ({summary['chunks_added']} "
          f"chunks), {summary['documents'] - summary['documents_ingested']} unchanged, {summary['documents_pruned']} pruned; "
          f"{summary['chunks_now']} chunks in {args.collection!r}. Serve it: picaso-rag serve "
          f"{'--chroma-path ' + args.chroma_path if args.chroma_path else '--chroma-host ' + args.chroma_host} "
          f"--collection {args.collection} --states {args.states} --model {args.model}", flush=True)
    return summary


def add_parser(sub: Any) -> None:
    p = sub.add_parser("ingest", help="files and folders into a Chroma collection and their states",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from .cli import add_index_arguments

    p.add_argument("paths", nargs="+", help="files and folders (recursively) to ingest")
    add_index_arguments(p, "directory of a Chroma PersistentClient (created if missing)")
    p.add_argument("--model", required=True, help="Mamba-2 or hybrid checkpoint directory (serve with the same one)")
    p.add_argument("--tokenizer", help="tokenizer.json or its directory (default: the checkpoint's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--state-precision", default="bf16", choices=["bf16", "fp8", "fp32"],
                   help="how states are stored: bf16 (default) halves fp32 files, fp8 quarters them (docs/scaling.md)")
    p.add_argument("--state-key-file", help="the store's MAC key (as for serve --state-key-file)")
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per chunk (SentenceSplitter)")
    p.add_argument("--prune", action="store_true", help="remove every document of the collection that is not a file under the paths given "
                        "(files deleted since the last run)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def check(args: argparse.Namespace) -> None:
    if (args.chroma_path is None) == (args.chroma_host is None):
        sys.exit("picaso-rag ingest: give --chroma-path DIR or --chroma-host HOST (one of the two).")
    if args.chunk_size < 16:
        sys.exit(f"picaso-rag ingest: --chunk-size {args.chunk_size} is too small; use 16 tokens or more (default 256).")
