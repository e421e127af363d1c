"""The pre-training loss curves of picaso-mini v1, the all-Mamba-2 control and the hybrid, in one PNG.

    python scripts/plot_pretrain_losses.py
"""
import json
from pathlib import Path
from picaso_rag.training.train import plot_history
runs = {"picaso-mini v1 (Mamba-2; H100, 440 s time schedule)": "docs/results/training/pretrain_history.json",
        "all-Mamba-2 control (H200, 2,164-step schedule)": "docs/results/hybrid/history-mamba-control.json",
        "hybrid, layers 5 and 11 NoPE attention (H200, same)": "docs/results/hybrid/history-hybrid.json"}
plot_history([{**json.loads(Path(p).read_text()), "name": n} for n, p in runs.items()], Path("docs/results/hybrid/pretrain_loss.png"))
