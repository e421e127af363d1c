"""Fine-tuning recipes (issue "fine-tune v3"): batches of several composition methods, plain
language-model batches and concatenated-context batches mixed into one run, and a concatenated
batch scored exactly as the evaluation scores concatenation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from picaso_rag.config import ModelConfig
from picaso_rag.model import PicasoLM, init_weights
from picaso_rag.training import PassagePairs, TokenWindows, concat_loss
from picaso_rag.training.__main__ import main as cli
from picaso_rag.training.train import finetune_batches, save

from .conftest import make_engine

SEP = torch.tensor([199, 199])


def hybrid() -> PicasoLM:
    cfg = ModelConfig(family="picaso_hybrid", vocab_size=512, d_model=32, layer_types=("mamba", "attention", "mamba"),
                      d_state=16, headdim=16, n_heads=2, n_kv_heads=2, head_dim=16, tie_embeddings=True, eos_token_id=0)
    return init_weights(PicasoLM(cfg), seed=1).float().eval()


@pytest.mark.parametrize("k", [0, 1, 3])
def test_concat_loss_is_the_nll_of_each_row_read_as_one_text(k):
    model = hybrid()
    g = torch.Generator().manual_seed(k)
    contexts, targets = torch.randint(1, 512, (2, k, 6), generator=g), torch.randint(1, 512, (2, 9), generator=g)
    # independently: each row's documents, separators and target as one token list, one row at a time
    total, count = 0.0, 0
    for b in range(2):
        ids = [t for j in range(k) for t in contexts[b, j].tolist() + SEP.tolist()] + targets[b].tolist()
        logits = model(torch.tensor([ids])).logits[0]
        n = targets.shape[1]
        total += F.cross_entropy(logits[-n:-1].float(), targets[b, 1:], reduction="sum").item()
        count += n - 1
    with torch.no_grad():
        assert concat_loss(model, contexts, targets, SEP).item() == pytest.approx(total / count, rel=1e-5)


def _kind(fn) -> str:
    """Which loss a batch of finetune_batches runs (its bound arguments tell)."""
    defaults = fn.__defaults__
    if len(defaults) == 3:
        return f"compose:{defaults[2]}"
    return "concat" if defaults[0].dim() == 3 else "lm"


def test_mixed_batches_come_in_their_fractions(tmp_path):
    passages = np.arange(64 * 2 * 8).reshape(64, 2, 8) % 500
    pairs = PassagePairs.build(passages, vocab_size=500, max_k=4)
    (np.arange(5000) % 500).astype(np.uint16).tofile(tmp_path / "lm.bin")
    windows = TokenWindows(tmp_path / "lm.bin", 16, 3, seed=0)
    batches = finetune_batches(pairs, 4, [187], torch.device("cpu"), ["picaso-s", "soup"], "bptc", max_k=4, seed=0,
                               lm_windows=windows, lm_fraction=0.3, concat_fraction=0.2)
    drawn = [next(batches) for _ in range(600)]
    kinds = [_kind(fn) for fn in drawn]
    share = {k: kinds.count(k) / len(kinds) for k in set(kinds)}
    assert set(share) == {"lm", "concat", "compose:picaso-s", "compose:soup"}
    assert share["lm"] == pytest.approx(0.3, abs=0.06) and share["concat"] == pytest.approx(0.2, abs=0.06)
    assert all(fn.__defaults__[0].shape[1] >= 1 for fn, k in zip(drawn, kinds) if k == "concat")  # k >= 1 to concatenate
    assert all(fn.__defaults__[0].shape == (3, 16) for fn, k in zip(drawn, kinds) if k == "lm")
    model = hybrid()
    for fn in drawn[:12]:  # each kind runs and gives a finite loss on a hybrid
        assert torch.isfinite(fn(model))


@pytest.mark.parametrize("bad", [dict(method="picaso-x"), dict(method=[]), dict(lm_fraction=0.5),
                                 dict(lm_fraction=0.6, concat_fraction=0.5, lm_windows=object())])
def test_bad_recipes_are_refused_with_the_fix(bad):
    pairs = PassagePairs.build(np.arange(8 * 2 * 8).reshape(8, 2, 8) % 500, vocab_size=500, max_k=2)
    kwargs = dict(method="picaso-s") | bad
    with pytest.raises(ValueError, match="method|lm_windows|lm_fraction"):
        next(finetune_batches(pairs, 2, [187], torch.device("cpu"), kwargs.pop("method"), "bptc", max_k=2, **kwargs))


def test_cli_finetunes_with_a_mixed_recipe(tmp_path, tokenizer):
    engine = make_engine(tokenizer, seed=2)
    save(engine.model.float(), tokenizer, tmp_path / "base")
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 1000, 40 * 33, dtype=np.uint16)
    tokens[32::33] = tokenizer.eos_token_id  # documents of 32 tokens: passages of 2 x 16
    tokens.tofile(tmp_path / "data.bin")
    cli(["finetune", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "data.bin"), "--mode", "bptc",
         "--method", "picaso-s,picaso-r,caso", "--concat-fraction", "0.3", "--lm-fraction", "0.3", "--lm-seq-len", "16",
         "--lm-batch-size", "2", "--segment-len", "16", "--n-passages", "40", "--batch-size", "2", "--max-k", "3",
         "--max-steps", "4", "--device", "cpu", "--out", str(tmp_path / "ft")])
    extra = json.loads((tmp_path / "ft" / "history.json").read_text())["config"]["extra"]
    assert extra["method"] == "picaso-s,picaso-r,caso" and extra["concat_fraction"] == 0.3 and extra["lm_fraction"] == 0.3
