"""Training loops: language-model pre-training and composition fine-tuning (BP2C, BPTC).

One loop (:func:`train`) runs any loss function with AdamW, warm-up + cosine learning rate over a
step or time budget, bf16 autocast on CUDA, a progress bar, periodic checkpoints and a loss curve.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..compose import METHODS, canonical_order, compose_tensors
from ..loading import Tokenizer, save_checkpoint
from ..model import ModelOutput, PicasoLM
from .data import PassagePairs, TokenWindows

MODES = ("bp2c", "bptc")


@dataclass
class TrainConfig:
    out_dir: str
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_steps: int | None = None
    time_budget_s: float | None = None  # stop (and finish the schedule) after this much training time
    log_every: int = 10
    checkpoint_every_s: float = 600.0
    seed: int = 0
    extra: dict = field(default_factory=dict)  # recorded in the run's JSON (data, method, ...)

    def __post_init__(self) -> None:
        if self.max_steps is None and self.time_budget_s is None:
            raise ValueError("give max_steps or time_budget_s (or both).")


def lm_loss(model: PicasoLM, inputs: Tensor, targets: Tensor) -> Tensor:
    logits = model(inputs).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def composition_loss(model: PicasoLM, contexts: Tensor, targets: Tensor, separator: Tensor,
                     method: str = "picaso-s", mode: str = "bp2c") -> Tensor:
    """Loss of the target read from the composed state of the contexts.

    contexts [B, k, S] token ids (k may be 0), targets [B, T]; each context is encoded as
    ``context + separator`` (the same separator the evaluation uses). The target is read from the
    composed state (:func:`compose_batch`: the SSM states composed, the union of the contexts' keys
    and values for attention layers; every context of a batch has S + len(separator) tokens, so the
    unions of the rows have equal length and stack); tokens 1..T-1 are scored (a state carries no
    logits for token 0). BP2C: the contexts' pass runs without gradient (states as a store would
    serve them). BPTC: gradients flow through the composition into every context's pass.

    Usage: ``loss = composition_loss(model, contexts, targets, torch.tensor(sep_ids), "picaso-s", "bptc")``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    B, k = contexts.shape[:2]
    state, position = {}, 0
    if k:
        docs = torch.cat([contexts, separator.expand(B, k, -1)], dim=-1).flatten(0, 1)
        with torch.set_grad_enabled(mode == "bptc"):
            state, position = compose_batch(model, model(docs, logits="none"), B, k, method)
    logits = model(targets[:, :-1], position=position, **state).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), targets[:, 1:].flatten())


hybrid_composition_loss = composition_loss  # deprecated alias (one release)


def concat_loss(model: PicasoLM, contexts: Tensor, targets: Tensor, separator: Tensor) -> Tensor:
    """Loss of the target read after its contexts concatenated (``context + separator`` each, in the
    batch's order), scored like :func:`composition_loss` (tokens 1..T-1) and like the evaluation's
    ``concat`` row. Mixed into composition fine-tuning so the model keeps reading concatenated text.

    Usage: ``loss = concat_loss(model, contexts, targets, torch.tensor(sep_ids))``.
    """
    B, k = contexts.shape[:2]
    prefix = torch.cat([contexts, separator.expand(B, k, -1)], dim=-1).flatten(1)  # [B, k * (S + len(sep))]
    logits = model(torch.cat([prefix, targets[:, :-1]], dim=1)).logits[:, prefix.shape[1]:]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets[:, 1:].flatten())


def compose_batch(model: PicasoLM, out: ModelOutput, B: int, k: int, method: str) -> tuple[dict[str, Tensor], int]:
    """Compose B rows of k documents of equal length, read from nothing in one pass (``out`` of
    ``model(docs)``, docs [B * k, L], row-major). Differentiable. Returns (the keyword arguments of
    ``PicasoLM.forward``: ssm_state, conv_state, keys, values; the position to read on at).

    As picaso_rag.compose.compose with no prefix: SSM layers by :func:`compose_tensors` (conv "mean"); attention
    layers: the union of the documents' keys and values, document after document along the token
    axis; positions: documents in parallel at 0..L-1 and reading on at L, or, for CASO, document j
    moved by j * L (RoPE only) and reading on at k * L. PICASO-R composes each row's documents in
    compose's canonical (content-sorted) order, as inference does: it averages the rotations of one
    cyclic order, and for k >= 3 the batch's order is another one. The other methods, and attention
    over a union, do not depend on the order (up to the order of floating-point sums).
    Usage: ``state, position = compose_batch(model, model(docs, logits="none"), B, k, "picaso-s")``.
    """
    unflat = lambda t: t.unflatten(0, (B, k))  # noqa: E731
    if method == "picaso-r" and k >= 3 and out.ssm_state.shape[1]:
        log_decay = unflat(out.log_decay).detach().cpu()
        order = torch.tensor([canonical_order(row, [0] * k) for row in log_decay], device=out.ssm_state.device)
        flat = (order + k * torch.arange(B, device=order.device)[:, None]).flatten()  # row-major index into B * k
        out = out._replace(ssm_state=out.ssm_state[flat], conv_state=out.conv_state[flat], log_decay=out.log_decay[flat])
    if out.ssm_state.shape[1]:
        ssm, conv, _ = compose_tensors(unflat(out.ssm_state), unflat(out.conv_state), unflat(out.log_decay), method)
    else:  # attention layers only: empty SSM states of the right batch
        ssm, conv = unflat(out.ssm_state)[:, 0], unflat(out.conv_state)[:, 0]
    keys, values = unflat(out.keys), unflat(out.values)  # [B, k, n_attn, kv_heads, L, head_dim]
    doc_len = keys.shape[4]
    if method == "caso":  # one document after the other, as in a concatenation
        if model.cfg.rotary_dim:
            keys = torch.stack([model.shift_keys(keys[:, j], j * doc_len) for j in range(k)], dim=1)
        position = k * doc_len
    else:  # in parallel, reading on after the longest (all are L long)
        position = doc_len
    union = lambda t: t.permute(0, 2, 3, 1, 4, 5).flatten(3, 4)  # noqa: E731  [B, n_attn, kv_heads, k * L, head_dim]
    return {"ssm_state": ssm, "conv_state": conv, "keys": union(keys), "values": union(values)}, position


compose_hybrid_batch = compose_batch  # deprecated alias (one release)


def pretrain_batches(data: TokenWindows, device: torch.device) -> Iterator[Callable[[PicasoLM], Tensor]]:
    for inputs, targets in data:
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        yield lambda model, i=inputs, t=targets: lm_loss(model, i, t)


def finetune_batches(pairs: PassagePairs, batch_size: int, separator: list[int], device: torch.device,
                     method: str | Sequence[str], mode: str, max_k: int = 10, seed: int = 0,
                     lm_windows: TokenWindows | None = None, lm_fraction: float = 0.0,
                     concat_fraction: float = 0.0) -> Iterator[Callable[[PicasoLM], Tensor]]:
    """Epochs over the passage pairs; k drawn uniformly from {0..max_k} per batch, as in the paper.
    All contexts of a batch have one length (segments of one size), so a hybrid's key/value unions stack.

    ``method``: one composition method, or several (each batch draws one uniformly). A fraction of
    the batches can keep the model's other two ways of reading: ``lm_fraction`` plain language-model
    batches from ``lm_windows``, ``concat_fraction`` batches whose k >= 1 contexts are concatenated
    (:func:`concat_loss`) instead of composed. Usage: see ``python -m picaso_rag.training finetune``."""
    methods = [method] if isinstance(method, str) else list(method)
    if not methods or any(m not in METHODS for m in methods):
        raise ValueError(f"method must be one or more of {METHODS}, got {method!r}")
    if not (0 <= lm_fraction and 0 <= concat_fraction and lm_fraction + concat_fraction < 1):
        raise ValueError(f"lm_fraction + concat_fraction must be in [0, 1), got {lm_fraction} + {concat_fraction}")
    if lm_fraction and lm_windows is None:
        raise ValueError("lm_fraction > 0 needs lm_windows (a token file: --lm-data).")
    rng = random.Random(seed)
    sep = torch.tensor(separator, device=device)
    lm = iter(lm_windows) if lm_windows is not None else None
    while True:
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            kind = rng.random()
            if kind < lm_fraction:
                inputs, lm_targets = (t.to(device, non_blocking=True) for t in next(lm))
                yield lambda model, i=inputs, t=lm_targets: lm_loss(model, i, t)
                continue
            concat = kind < lm_fraction + concat_fraction
            k = rng.randint(1 if concat else 0, max_k)
            m = rng.choice(methods)
            contexts, targets = pairs.batch(order[start:start + batch_size], k)
            contexts, targets = contexts.to(device), targets.to(device)
            if concat:
                yield lambda model, c=contexts, t=targets: concat_loss(model, c, t, sep)
            else:
                yield lambda model, c=contexts, t=targets, m=m: composition_loss(model, c, t, sep, m, mode)


def _param_groups(model: PicasoLM, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # matrices decay; norms, biases and the SSM's A_log, D, dt_bias do not (as in mamba_ssm)
        (decay if p.dim() >= 2 and "conv1d" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(model: PicasoLM, tokenizer: Tokenizer, batches: Iterator[Callable[[PicasoLM], Tensor]], cfg: TrainConfig,
          name: str = "train") -> dict:
    """Run the loop; writes ``out_dir/checkpoint`` (bf16, loadable by PicasoEngine), ``history.json``
    and ``loss.png``. Returns the history. Usage: see ``python -m picaso_rag.training --help``."""
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = model.device
    model.train()
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), fused=fused)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    history = {"name": name, "config": asdict(cfg), "step": [], "loss": [], "lr": [], "elapsed_s": []}
    start, last_ckpt, step = time.perf_counter(), time.perf_counter(), 0
    bar = tqdm(total=cfg.max_steps, desc=name, unit="step")
    while True:
        elapsed = time.perf_counter() - start
        progress = max(step / cfg.max_steps if cfg.max_steps else 0.0, elapsed / cfg.time_budget_s if cfg.time_budget_s else 0.0)
        if progress >= 1.0:
            break
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) * (
            cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_fn = next(batches)
        with autocast:
            loss = loss_fn(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == 1:
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value} at step {step}; lower the learning rate.")
            history["step"].append(step)
            history["loss"].append(value)
            history["lr"].append(lr)
            history["elapsed_s"].append(time.perf_counter() - start)
            bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2e}")
        if time.perf_counter() - last_ckpt > cfg.checkpoint_every_s:
            save(model, tokenizer, out_dir / "checkpoint")
            last_ckpt = time.perf_counter()
    bar.close()
    history["steps"] = step
    history["train_time_s"] = time.perf_counter() - start
    model.eval()
    save(model, tokenizer, out_dir / "checkpoint")
    (out_dir / "history.json").write_text(json.dumps(history, indent=1))
    try:
        plot_history([history], out_dir / "loss.png")
    except ImportError:  # the GPU machine has no matplotlib: plot later with `python -m picaso_rag.training plot`
        print(f"matplotlib is not installed: no loss.png; run `python -m picaso_rag.training plot {out_dir / 'history.json'}`")
    return history


def save(model: PicasoLM, tokenizer: Tokenizer, directory: Path) -> None:
    """Save a bf16 copy (the shipping format) without changing the training model."""
    shipped = PicasoLM(model.cfg)
    shipped.load_state_dict(model.state_dict())
    save_checkpoint(shipped.to(torch.bfloat16), tokenizer, directory)


def plot_history(histories: list[dict], path: Path, smooth: int = 20) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for h in histories:
        loss = torch.tensor(h["loss"])
        if len(loss) > smooth:
            loss = torch.cat([loss[:smooth - 1], loss.unfold(0, smooth, 1).mean(1)])
        ax.plot(h["step"], loss.tolist(), label=h["name"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
