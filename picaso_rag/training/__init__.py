"""Training: language-model pre-training and composition fine-tuning (BP2C, BPTC).

Library use::

    from picaso_rag.training import TrainConfig, composition_loss, train
Command line: ``python -m picaso_rag.training --help``.
"""

from .data import PassagePairs, TokenWindows, iter_corpus_documents, split_passages, tokenize_to_file, train_tokenizer
from .train import (MODES, TrainConfig, composition_loss, concat_loss, finetune_batches, hybrid_composition_loss, lm_loss,
                    pretrain_batches, train)

__all__ = [
    "MODES",
    "PassagePairs",
    "TokenWindows",
    "TrainConfig",
    "composition_loss",
    "concat_loss",
    "finetune_batches",
    "hybrid_composition_loss",
    "iter_corpus_documents",
    "lm_loss",
    "pretrain_batches",
    "split_passages",
    "tokenize_to_file",
    "train",
    "train_tokenizer",
]
