"""The one language model: typed layers (Mamba-2, attention, MLP, MoE) reading from, and returning, a state.

A pure Mamba-2 model (state-spaces' mamba2-*, picaso-mini v1) is the case with no attention layers;
IBM Granite 4.0-H (dense and MoE), IBM Bamba, NVIDIA Nemotron-H, mamba_ssm's hybrids and this
project's own picaso_hybrid (picaso-mini v2) mix them. :class:`~picaso_rag.config.ModelConfig` says
which layer is which; picaso_rag.adapters maps each checkpoint layout onto these names (transformers'
``GraniteMoeHybridForCausalLM``: ``model.embed_tokens``, ``model.layers.{i}.mamba`` / ``.self_attn``...).

The state of a text is what the next tokens need:
- SSM layers: ``ssm_state`` [b, n_ssm, H, P, N], ``conv_state`` [b, n_ssm, C, W-1], and ``log_decay``
  [b, n_ssm, H] fp32 (A * sum(dt) over the tokens read: the log of the factor by which this segment
  scaled any state it started from; PICASO needs it);
- attention layers: ``keys`` and ``values`` [b, n_attn, kv_heads, T, head_dim] of every token read
  (keys after RoPE, at the positions the tokens were read at);
- ``position``: the position of the next token (RoPE only; NoPE attention ignores it).
MLP and MoE layers read one token at a time and keep nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from .config import ModelConfig
from .kernels import add_rmsnorm
from .layers import (Attention, GatedMLP, LlamaMLP, Mamba2Mixer, MoE, NemotronMoE, ReluSquaredMLP, RMSNorm,
                     apply_rope, rope_cos_sin)


class ModelOutput(NamedTuple):
    logits: Tensor | None  # [b, l, vocab], [b, 1, vocab] (last real position) or None
    ssm_state: Tensor  # [b, n_ssm, H, P, N]
    conv_state: Tensor  # [b, n_ssm, C, W-1]
    log_decay: Tensor  # [b, n_ssm, H], fp32, of the tokens read in this call only
    keys: Tensor  # [b, n_attn, kv_heads, l, head_dim]: of the tokens read in this call only
    values: Tensor  # [b, n_attn, kv_heads, l, head_dim]


class Block(nn.Module):
    """x + m * mixer(norm(x)), then x + m * ffn(norm(x)) when the model has feed-forward layers.

    The mixer is ``mamba``, ``self_attn`` or (Nemotron-H's stateless layers) ``mlp``: a squared-ReLU
    MLP or an MoE, which read each token alone."""

    def __init__(self, cfg: ModelConfig, layer_type: str):
        super().__init__()
        self.cfg = cfg
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if layer_type == "mamba":
            self.mamba = Mamba2Mixer(cfg)
        elif layer_type == "attention":
            self.self_attn = Attention(cfg)
        elif layer_type == "mlp":
            self.mlp = ReluSquaredMLP(cfg.d_model, cfg.ffn_dim, cfg.ffn_bias)
        else:
            self.mlp = NemotronMoE(cfg)
        if cfg.ffn != "none":
            self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.ffn == "granite":
            self.shared_mlp = GatedMLP(cfg.d_model, cfg.ffn_dim)
            if cfg.n_experts:
                self.block_sparse_moe = MoE(cfg)
        elif cfg.ffn == "llama":
            self.feed_forward = LlamaMLP(cfg.d_model, cfg.ffn_dim, cfg.ffn_bias)

    def ffn(self, hidden: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """The feed-forward after the mixer: (its output, the residual stream), as the mixer's are."""
        if self.cfg.ffn == "none":
            return hidden, residual
        h, residual = add_rmsnorm(hidden, residual, self.post_attention_layernorm.weight, self.cfg.norm_eps,
                                  self.cfg.residual_in_fp32)
        if self.cfg.ffn == "llama":
            out = self.feed_forward(h)
        else:
            out = self.shared_mlp(h)
            if self.cfg.n_experts:
                out = out + self.block_sparse_moe(h)
        return _scaled(out, self.cfg.residual_multiplier), residual


def _scaled(x: Tensor, multiplier: float) -> Tensor:
    return x if multiplier == 1.0 else x * multiplier


def _logits(x: Tensor, logits_scaling: float) -> Tensor:
    return x if logits_scaling == 1.0 else x / logits_scaling  # Granite divides its logits


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, t) for t in cfg.layer_types)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class PicasoLM(nn.Module):
    """The language model of every family, whose forward starts from a given state and returns what it read.

    Usage: ``out = model(ids, ssm_state=s, conv_state=c, keys=k, values=v, position=n)``; then
    ``out.logits``; the state after is ``out.ssm_state``, ``out.conv_state``, the keys and values
    ``cat([k, out.keys], dim=3)`` (likewise values) and ``n + ids.shape[1]``. Rows of ``ids`` are
    right-padded to ``lengths``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)  # named as in transformers, so checkpoints load without renaming
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def empty_state(self, batch: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Zero (ssm_state, conv_state) and no (keys, values): the state before any token."""
        cfg, kw = self.cfg, dict(device=self.device, dtype=self.dtype)
        n_ssm, n_attn = len(cfg.ssm_layers), len(cfg.attn_layers)
        kv = torch.zeros(batch, n_attn, cfg.n_kv_heads, 0, cfg.head_dim, **kw)
        return (torch.zeros(batch, n_ssm, cfg.nheads, cfg.headdim, cfg.d_state, **kw),
                torch.zeros(batch, n_ssm, cfg.conv_dim, cfg.d_conv - 1, **kw), kv, kv.clone())

    def _rope(self, position: int | Tensor, length: int) -> tuple[Tensor, Tensor] | None:
        """cos/sin [length, rotary_dim] from ``position``, or [b, 1, length, rotary_dim] from a
        position per row (a tensor [b]); None without RoPE."""
        if not self.cfg.rotary_dim:
            return None
        if isinstance(position, Tensor):
            positions = position.to(self.device)[:, None] + torch.arange(length, device=self.device)[None, :]
            cos, sin = rope_cos_sin(positions.flatten(), self.cfg.rotary_dim, self.cfg.rope_theta, self.dtype)
            return cos.view(len(position), 1, length, -1), sin.view(len(position), 1, length, -1)
        positions = torch.arange(position, position + length, device=self.device)
        return rope_cos_sin(positions, self.cfg.rotary_dim, self.cfg.rope_theta, self.dtype)

    def forward(
        self,
        input_ids: Tensor,
        ssm_state: Tensor | None = None,
        conv_state: Tensor | None = None,
        keys: Tensor | None = None,
        values: Tensor | None = None,
        position: int | Tensor = 0,
        lengths: Tensor | None = None,
        logits: str = "all",
        key_lengths: Tensor | None = None,
    ) -> ModelOutput:
        """Read ``input_ids`` [b, l] (rows right-padded to ``lengths``) after the given state (none if None).

        ``position``: RoPE position of the first token, or one per row (a tensor [b]).
        ``key_lengths`` [b]: rows whose states hold different numbers of keys, each padded after its
        own (several requests read at once); None: every key of ``keys`` is a row's.
        ``logits``: "all" positions, "last" real position of each row, or "none" (encoding only).
        """
        cfg = self.cfg
        b, l = input_ids.shape
        mask = None if lengths is None else (torch.arange(l, device=input_ids.device)[None, :] < lengths[:, None]).float()
        empty = self.empty_state(b) if ssm_state is None or conv_state is None or keys is None or values is None else None
        ssm_state = empty[0] if ssm_state is None else ssm_state
        conv_state = empty[1] if conv_state is None else conv_state
        keys = empty[2] if keys is None else keys
        values = empty[3] if values is None else values
        rope = self._rope(position, l) if cfg.attn_layers else None

        # pre-norm blocks; each residual add is fused into the norm after it
        hidden, residual = _scaled(self.model.embed_tokens(input_ids), cfg.embedding_multiplier), None
        eps, fp32 = cfg.norm_eps, cfg.residual_in_fp32
        ssm_out, conv_out, decay_out, k_out, v_out = [], [], [], [], []
        for block in self.model.layers:
            hidden, residual = add_rmsnorm(hidden, residual, block.input_layernorm.weight, eps, fp32)
            if hasattr(block, "mamba"):
                i = len(ssm_out)
                hidden, s, c, d = block.mamba(hidden, ssm_state[:, i], conv_state[:, i], mask, lengths)
                ssm_out.append(s)
                conv_out.append(c)
                decay_out.append(d)
            elif hasattr(block, "mlp"):  # Nemotron-H's MLP / MoE layers: no state
                hidden = block.mlp(hidden)
            else:
                i = len(k_out)
                hidden, k, v = block.self_attn(hidden, keys[:, i], values[:, i], rope, key_lengths)
                k_out.append(k)
                v_out.append(v)
            hidden, residual = block.ffn(_scaled(hidden, cfg.residual_multiplier), residual)
        hidden, _ = add_rmsnorm(hidden, residual, self.model.norm.weight, eps, fp32)

        if logits == "all":
            out_logits = _logits(self.lm_head(hidden), cfg.logits_scaling)
        elif logits == "last":
            last = hidden[:, -1] if lengths is None else hidden[torch.arange(b, device=hidden.device), (lengths - 1).clamp(min=0)]
            out_logits = _logits(self.lm_head(last), cfg.logits_scaling)[:, None]
        elif logits == "none":
            out_logits = None
        else:
            raise ValueError(f"logits must be 'all', 'last' or 'none', got {logits!r}")

        def stack(ts: list[Tensor], like: Tensor) -> Tensor:
            return torch.stack(ts, 1) if ts else like.new_zeros(like.shape[0], 0, *like.shape[2:])

        empty_kv = keys.new_zeros(b, 0, cfg.n_kv_heads, l, cfg.head_dim)
        return ModelOutput(out_logits, stack(ssm_out, ssm_state), stack(conv_out, conv_state),
                           torch.stack(decay_out, 1) if decay_out else torch.zeros(b, 0, cfg.nheads, device=hidden.device),
                           stack(k_out, empty_kv), stack(v_out, empty_kv))

    def step(self, token_ids: Tensor, ssm_state: Tensor, conv_state: Tensor, keys: Tensor | None = None,
             values: Tensor | None = None, lengths: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """Decode one token for each of b rows, each from its own state (one request's decoding, or
        the slots of a continuous batch, picaso_rag.scheduler). No copies: a CUDA graph can replay it.

        token_ids [b]; ssm_state/conv_state [b, n_ssm, ...], updated in place. With attention layers:
        keys/values [b, n_attn, KV, S, hd], padded buffers whose row r holds lengths[r] keys (S >
        every length): the new token's key and value are written at index lengths[r], in place, and
        row r attends to its own keys only; positions [b]: each row's RoPE position. Returns logits [b, vocab].

        Usage: ``logits = model.step(ids, ssm, conv, keys[..., :span, :], values[..., :span, :], lengths, positions)``,
        then ``lengths += 1; positions += 1`` (a pure Mamba-2 model: ``model.step(ids, ssm, conv)``).
        """
        cfg = self.cfg
        rope = None
        if cfg.rotary_dim and cfg.attn_layers:
            cos, sin = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta, self.dtype)
            rope = cos[:, None, None], sin[:, None, None]
        hidden, residual = _scaled(self.model.embed_tokens(token_ids), cfg.embedding_multiplier), None  # [b, d]
        eps, fp32 = cfg.norm_eps, cfg.residual_in_fp32
        i_ssm = i_attn = 0
        for block in self.model.layers:
            hidden, residual = add_rmsnorm(hidden, residual, block.input_layernorm.weight, eps, fp32)
            if hasattr(block, "mamba"):
                hidden = block.mamba.step(hidden, ssm_state[:, i_ssm], conv_state[:, i_ssm])
                i_ssm += 1
            elif hasattr(block, "mlp"):
                hidden = block.mlp(hidden)
            else:
                hidden = block.self_attn.step(hidden, keys[:, i_attn], values[:, i_attn], lengths, rope)
                i_attn += 1
            hidden, residual = block.ffn(_scaled(hidden, cfg.residual_multiplier), residual)
        hidden, _ = add_rmsnorm(hidden, residual, self.model.norm.weight, eps, fp32)
        return _logits(self.lm_head(hidden), cfg.logits_scaling)

    def shift_keys(self, keys: Tensor, delta: int) -> Tensor:
        """Keys [..., T, head_dim] read at positions p, as if read at p + delta: RoPE is a rotation,
        so moving a stored document to other positions is one more rotation (identity with NoPE)."""
        if not self.cfg.rotary_dim or delta == 0:
            return keys
        cos, sin = rope_cos_sin(torch.tensor([delta], device=keys.device), self.cfg.rotary_dim, self.cfg.rope_theta, torch.float32)
        return apply_rope(keys.float(), cos, sin).to(keys.dtype)


# Deprecated aliases (one release): one class runs every model.
Mamba2LM = PicasoLM
HybridLM = PicasoLM
ForwardOutput = ModelOutput
HybridOutput = ModelOutput


@torch.no_grad()
def init_weights(model: PicasoLM, seed: int = 0, std: float = 0.02) -> PicasoLM:
    """Random initialisation as in mamba_ssm (dt in [1e-3, 0.1], A in [1, 16]) for every layer. For tests and training."""
    device = model.device  # generate where the weights are: a 2.7B model initialises in seconds on a GPU
    gen = torch.Generator(device=device).manual_seed(seed)
    cfg = model.cfg
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.log(torch.empty(p.shape, device=device).uniform_(1, 16, generator=gen)))
        elif name.endswith("dt_bias"):
            low, high = torch.log(torch.tensor(1e-3)), torch.log(torch.tensor(0.1))
            dt = torch.exp(torch.rand(p.shape, generator=gen, device=device) * (high - low) + low).clamp(min=1e-4)
            p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        elif name.endswith(".D") or "norm" in name:
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        elif name.endswith("conv1d.weight"):
            bound = 1 / (cfg.d_conv ** 0.5)
            p.copy_(torch.empty(p.shape, device=device).uniform_(-bound, bound, generator=gen))
        else:
            p.copy_(torch.randn(p.shape, generator=gen, device=device) * std)
    for block in model.model.layers:  # GPT-2 style: scale residual projections by depth
        if hasattr(block, "mamba") or hasattr(block, "self_attn"):
            out = block.mamba.out_proj if hasattr(block, "mamba") else block.self_attn.o_proj
            out.weight.div_((2 * cfg.n_layer) ** 0.5)
    return model
