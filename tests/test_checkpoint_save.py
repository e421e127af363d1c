"""A checkpoint save killed midway leaves the old checkpoint readable (and never a mix).

A worker process saves a hybrid checkpoint over an existing one and is killed (SIGKILL, by itself)
in the middle of writing the weights: half the bytes are on disk when it dies, as after a crash or
an out-of-memory kill. The directory must still load, with the old weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from picaso_rag import load_checkpoint, save_checkpoint
from picaso_rag.hybrid import HybridLM, init_weights
from picaso_rag.hybrid_config import HybridConfig

WORKER = r"""
import os, signal, sys
import safetensors.torch
from picaso_rag import Tokenizer, loading
from picaso_rag.hybrid import HybridLM, init_weights
from picaso_rag.hybrid_config import HybridConfig
real_save = safetensors.torch.save_file

def save_then_die_halfway(weights, path, metadata=None):  # the kill lands inside the weights' write
    real_save(weights, path, metadata=metadata)
    os.truncate(path, os.path.getsize(path) // 2)
    os.kill(os.getpid(), signal.SIGKILL)

loading.save_file = save_then_die_halfway
cfg = HybridConfig(**eval(sys.argv[3]))
loading.save_checkpoint(init_weights(HybridLM(cfg), seed=1), Tokenizer.from_file(sys.argv[2]), sys.argv[1])
"""

FIELDS = dict(family="picaso_hybrid", vocab_size=50288, d_model=32, layer_types=("mamba", "attention", "mamba"),
              n_heads=2, n_kv_heads=2, head_dim=16, d_state=8, headdim=16, chunk_size=16)


def test_hybrid_save_killed_midway_leaves_the_old_checkpoint_readable(tmp_path, tokenizer):
    directory = tmp_path / "ckpt"
    old = init_weights(HybridLM(HybridConfig(**FIELDS)), seed=0)
    save_checkpoint(old, tokenizer, directory)
    tokenizer_file = tmp_path / "tokenizer.json"
    tokenizer.save(tokenizer_file)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", WORKER, str(directory), str(tokenizer_file), repr(FIELDS)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, f"the worker was not killed inside the save: {proc.stderr[-2000:]}"
    model, _ = load_checkpoint(directory)  # raises CheckpointError on a truncated weights file
    found = model.state_dict()
    assert all(torch.equal(found[name], w) for name, w in old.state_dict().items()), "not the old checkpoint's weights"
