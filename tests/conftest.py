"""Shared fixtures: a real BPE tokenizer from the repository (the shipped picaso-mini's; the tests read
nothing outside the clone) and tiny random Mamba-2 models."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from picaso_rag import Mamba2Config, Mamba2LM, PicasoEngine, Tokenizer, init_weights

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_JSON = REPO / "models" / "picaso-mini" / "tokenizer.json"  # 16,384 tokens; every model here has >= that
TEST_DATA = REPO / "tests" / "data"

TEXTS = [
    "The Eiffel Tower was completed in 1889 for the World's Fair in Paris.",
    "Mamba is a state space model whose state has a fixed size.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen, and it happens in chloroplasts.",
    "Ok.",
    "Rivers carry sediment to the sea; over millions of years the deltas grow outward and the coastline moves.",
]


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    if not TOKENIZER_JSON.is_file():
        pytest.fail(f"{TOKENIZER_JSON} is missing: restore models/picaso-mini from the repository (git checkout models).")
    return Tokenizer.from_file(TOKENIZER_JSON)


def tiny_config(**overrides) -> Mamba2Config:
    base = dict(d_model=64, n_layer=2, vocab_size=50288, d_state=16, d_conv=4, expand=2, headdim=16,
                ngroups=2, chunk_size=16)
    base.update(overrides)
    return Mamba2Config(**base)


def make_engine(tokenizer: Tokenizer, seed: int = 0, **overrides) -> PicasoEngine:
    model = init_weights(Mamba2LM(tiny_config(**overrides)), seed=seed)
    return PicasoEngine(model, tokenizer)


@pytest.fixture(scope="session")
def engine(tokenizer) -> PicasoEngine:
    """Two layers, d_conv 4, two groups, chunk 16 (so short texts already span several chunks)."""
    return make_engine(tokenizer)


@pytest.fixture(scope="session")
def exact_engine(tokenizer) -> PicasoEngine:
    """One layer with d_conv=1: the model for which composition is exact (docs/method.md)."""
    return make_engine(tokenizer, seed=1, n_layer=1, d_conv=1)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory, tokenizer):
    """A tiny random transformers Mamba2ForCausalLM saved in the transformers layout."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Mamba2Config(vocab_size=50288, hidden_size=64, num_hidden_layers=3, state_size=16, head_dim=16,
                                    num_heads=8, expand=2, n_groups=2, conv_kernel=4, chunk_size=16,
                                    tie_word_embeddings=True)
    model = transformers.Mamba2ForCausalLM(cfg).eval()
    directory = tmp_path_factory.mktemp("hf_mamba2")
    model.save_pretrained(directory)
    shutil.copy(TOKENIZER_JSON, directory / "tokenizer.json")
    return model, directory
