"""A hybrid language model: Mamba-2 layers and a few attention layers, reading from and returning its state.

One model covers IBM Granite 4.0-H (dense and MoE; attention without positions), IBM Bamba (RoPE
attention), NVIDIA Nemotron-H (one mixer a layer: Mamba-2, NoPE attention, squared-ReLU MLP or MoE)
and this project's own small hybrid; :class:`~picaso_rag.hybrid_config.HybridConfig` says which.
Parameter names follow transformers' ``GraniteMoeHybridForCausalLM`` (Bamba's and Nemotron-H's
names are renamed on load), so checkpoints load as they are. The Mamba-2 layers are
:class:`picaso_rag.model.Mamba2Mixer`, unchanged; attention is torch SDPA. Nemotron-H's MLP and MoE
layers read one token at a time and keep nothing: they add no state.

The state of a text is what the next tokens need:
- SSM layers: ``ssm_state`` [b, n_ssm, H, P, N], ``conv_state`` [b, n_ssm, C, W-1], ``log_decay``
  [b, n_ssm, H] (as in picaso_rag.model);
- attention layers: ``keys`` and ``values`` [b, n_attn, kv_heads, T, head_dim] of every token read
  (keys after RoPE, at the positions the tokens were read at);
- ``position``: the position of the next token (RoPE only; NoPE attention ignores it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .hybrid_config import HybridConfig
from .kernels import rmsnorm
from .model import Mamba2Mixer, RMSNorm


class HybridOutput(NamedTuple):
    logits: Tensor | None  # [b, l, vocab], [b, 1, vocab] (last real position) or None
    ssm_state: Tensor  # [b, n_ssm, H, P, N]
    conv_state: Tensor  # [b, n_ssm, C, W-1]
    log_decay: Tensor  # [b, n_ssm, H], fp32, of the tokens read in this call only
    keys: Tensor  # [b, n_attn, kv_heads, l, head_dim]: of the tokens read in this call only
    values: Tensor  # [b, n_attn, kv_heads, l, head_dim]


# ------------------------------------------------------------------------------------- RoPE
def rope_cos_sin(positions: Tensor, rotary_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin [len(positions), rotary_dim] of the standard RoPE (as transformers computes them, in fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float, device=positions.device) / rotary_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first cos.shape[-1] channels of x [..., l, head_dim] (rotate-half convention)."""
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    half = torch.cat([-rot[..., d // 2:], rot[..., :d // 2]], dim=-1)
    return torch.cat([rot * cos + half * sin, rest], dim=-1)


# -------------------------------------------------------------------------------- attention
def attend(q: Tensor, k: Tensor, v: Tensor, scale: float, key_lengths: Tensor | None = None) -> Tensor:
    """Causal attention of the l new queries over T = past + l keys: every past key is visible
    (the state's keys form a set; with several documents, their union), the new ones causally.
    q [b, H, l, d]; k, v [b, KV, T, d] (grouped-query heads share keys). Returns [b, H, l, d].
    ``key_lengths`` [b]: rows whose pasts are of different lengths, padded after their own keys
    (several requests read at once): row r sees its first key_lengths[r] past keys only."""
    l, T = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if T == l:  # nothing before: plain causal attention (the flash kernel on CUDA)
        return F.scaled_dot_product_attention(q, k, v, is_causal=l > 1, scale=scale, enable_gqa=gqa)
    past = T - l
    key, query = torch.arange(T, device=q.device)[None, :], torch.arange(l, device=q.device)[:, None]
    mask = key <= query + past  # [l, T]
    if key_lengths is not None:  # [b, 1, l, T]: a row's padding between its past and the new keys is never seen
        mask = mask & ((key >= past) | (key < key_lengths[:, None, None]))[:, None]
    elif l == 1:
        mask = None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.d_model, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=cfg.attention_bias)
        self.scale = cfg.attention_scale if cfg.attention_scale is not None else hd ** -0.5

    def forward(self, x: Tensor, past_k: Tensor, past_v: Tensor, rope: tuple[Tensor, Tensor] | None,
                key_lengths: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x [b, l, d]; past_k/past_v [b, KV, T, hd] (key_lengths: see :func:`attend`).
        Returns (output, the new tokens' keys, values)."""
        b, l, _ = x.shape
        q = self.q_proj(x).view(b, l, -1, self.cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, l, -1, self.cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, l, -1, self.cfg.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        keys = k if past_k.shape[2] == 0 else torch.cat([past_k.to(k.dtype), k], dim=2)
        values = v if past_v.shape[2] == 0 else torch.cat([past_v.to(v.dtype), v], dim=2)
        y = attend(q, keys, values, self.scale, key_lengths)
        return self.o_proj(y.transpose(1, 2).reshape(b, l, -1)), k, v

    def step(self, x: Tensor, keys: Tensor, values: Tensor, lengths: Tensor,
                   rope: tuple[Tensor, Tensor] | None) -> Tensor:
        """One new token per row, each row over its own keys (a continuous batch's slots).

        x [b, d]; keys/values [b, KV, S, hd]: views of a padded buffer whose row r holds lengths[r]
        keys (S > every length). The new token's key and value are written in place at index
        lengths[r]; row r attends to its keys 0..lengths[r] only (a key mask: the padding after them
        is never seen). rope: cos/sin [b, 1, 1, rotary_dim] at each row's position, or None.
        """
        b, hd = x.shape[0], self.cfg.head_dim
        q = self.q_proj(x).view(b, -1, 1, hd)
        k = self.k_proj(x).view(b, -1, 1, hd)
        v = self.v_proj(x).view(b, -1, 1, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        rows = torch.arange(b, device=x.device)
        keys[rows, :, lengths] = k[:, :, 0].to(keys.dtype)
        values[rows, :, lengths] = v[:, :, 0].to(values.dtype)
        visible = torch.arange(keys.shape[2], device=x.device)[None, :] <= lengths[:, None]  # [b, S]
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible[:, None, None, :], scale=self.scale,
                                           enable_gqa=q.shape[1] != keys.shape[1])
        return self.o_proj(y.reshape(b, -1))


# ----------------------------------------------------------------------------- feed-forward
class Linear3d(nn.Module):
    """One weight per expert, [n_experts, out, in] (transformers' Granite MoE layout)."""

    def __init__(self, n: int, out_features: int, in_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, out_features, in_features))


class GatedMLP(nn.Module):
    """Granite's shared MLP: input_linear makes [gate | up] in one matrix; silu(gate) * up."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.input_linear = nn.Linear(d, 2 * hidden, bias=False)
        self.output_linear = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.input_linear(x).chunk(2, dim=-1)
        return self.output_linear(F.silu(gate) * up)


class LlamaMLP(nn.Module):
    """Bamba's MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, d: int, hidden: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=bias)
        self.up_proj = nn.Linear(d, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Granite's sparse experts: top-k of a linear router, softmax over the k chosen logits."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.top_k = cfg.experts_per_tok
        self.router = nn.Module()
        self.router.layer = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.input_linear = Linear3d(cfg.n_experts, 2 * cfg.expert_dim, cfg.d_model)
        self.output_linear = Linear3d(cfg.n_experts, cfg.d_model, cfg.expert_dim)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        top_logits, top_index = self.router.layer(flat).float().topk(self.top_k, dim=-1)
        top_weights = top_logits.softmax(dim=-1).to(flat.dtype)
        out = torch.zeros_like(flat)
        for expert in top_index.unique().tolist():  # only the experts some token chose
            token, slot = (top_index == expert).nonzero(as_tuple=True)
            gate, up = F.linear(flat[token], self.input_linear.weight[expert]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.output_linear.weight[expert])
            out[token] += y * top_weights[token, slot, None]  # a token picks an expert at most once
        return out.view_as(x)


class ReluSquaredMLP(nn.Module):
    """Nemotron-H's MLP (and its shared expert): down(relu(up(x))^2), no gate."""

    def __init__(self, d: int, hidden: int, bias: bool):
        super().__init__()
        self.up_proj = nn.Linear(d, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.relu(self.up_proj(x)).square())


class SigmoidRouter(nn.Module):
    """Nemotron-H's router (DeepSeek-V3 style): sigmoid scores; the correction bias steers which experts
    are chosen (the best topk_groups groups by the sum of their two best scores, then the top k in
    those), the weights are the chosen scores without it, normalised, times routed_scaling. fp32."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [n, d] -> (expert index [n, k], fp32 weight [n, k])."""
        cfg = self.cfg
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        if cfg.topk_groups < cfg.n_expert_groups:  # keep the experts of the best groups only
            grouped = choice.view(-1, cfg.n_expert_groups, cfg.n_experts // cfg.n_expert_groups)
            best_groups = grouped.topk(2, dim=-1).values.sum(-1).topk(cfg.topk_groups, dim=-1).indices
            kept = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best_groups, True)
            choice = choice.masked_fill(~kept.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        top_index = choice.topk(cfg.experts_per_tok, dim=-1).indices
        weights = scores.gather(1, top_index)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return top_index, weights * cfg.routed_scaling


class NemotronMoE(nn.Module):
    """Nemotron-H's MoE layer: routed squared-ReLU experts (optionally in a smaller latent width) plus a
    shared expert. Expert weights are [n_experts, out, in] (transformers' fused layout)."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        width = cfg.expert_latent_dim or cfg.d_model
        self.gate = SigmoidRouter(cfg)
        self.experts = nn.Module()
        self.experts.up_proj = nn.Parameter(torch.empty(cfg.n_experts, cfg.expert_dim, width))
        self.experts.down_proj = nn.Parameter(torch.empty(cfg.n_experts, width, cfg.expert_dim))
        self.shared_experts = ReluSquaredMLP(cfg.d_model, cfg.shared_expert_dim, cfg.ffn_bias)
        if cfg.expert_latent_dim:
            self.fc1_latent_proj = nn.Linear(cfg.d_model, width, bias=cfg.ffn_bias)
            self.fc2_latent_proj = nn.Linear(width, cfg.d_model, bias=cfg.ffn_bias)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        top_index, top_weights = self.gate(flat)
        h = self.fc1_latent_proj(flat) if hasattr(self, "fc1_latent_proj") else flat
        out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)  # summed in fp32, as transformers does
        for expert in top_index.unique().tolist():  # only the experts some token chose, in index order
            token, slot = (top_index == expert).nonzero(as_tuple=True)
            y = F.linear(F.relu(F.linear(h[token], self.experts.up_proj[expert])).square(), self.experts.down_proj[expert])
            out[token] += y * top_weights[token, slot, None]  # a token picks an expert at most once
        out = out.to(x.dtype)
        if hasattr(self, "fc2_latent_proj"):
            out = self.fc2_latent_proj(out)
        return out.view_as(x) + self.shared_experts(x)


# ---------------------------------------------------------------------------------- blocks
class HybridBlock(nn.Module):
    """x + m * mixer(norm(x)), then x + m * ffn(norm(x)) when the model has feed-forward layers.

    The mixer is ``mamba``, ``self_attn`` or (Nemotron-H's stateless layers) ``mlp``: a squared-ReLU
    MLP or an MoE, which read each token alone."""

    def __init__(self, cfg: HybridConfig, layer_type: str):
        super().__init__()
        self.cfg = cfg
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if layer_type == "mamba":
            self.mamba = Mamba2Mixer(cfg.mamba_config())
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

    def ffn(self, x: Tensor) -> Tensor:
        if self.cfg.ffn == "none":
            return x
        h = rmsnorm(x, self.post_attention_layernorm.weight, self.cfg.norm_eps)
        if self.cfg.ffn == "llama":
            out = self.feed_forward(h)
        else:
            out = self.shared_mlp(h)
            if self.cfg.n_experts:
                out = out + self.block_sparse_moe(h)
        return x + out * self.cfg.residual_multiplier


class Backbone(nn.Module):
    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(HybridBlock(cfg, t) for t in cfg.layer_types)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class HybridLM(nn.Module):
    """Hybrid LM whose forward starts from a given state and returns what it read.

    Usage: ``out = model(ids, ssm_state=s, conv_state=c, keys=k, values=v, position=n)``; then
    ``out.logits``; the state after is ``out.ssm_state``, ``out.conv_state``, the keys and values
    ``cat([k, out.keys], dim=3)`` (likewise values) and ``n + ids.shape[1]``.
    """

    def __init__(self, cfg: HybridConfig):
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

    def _residual(self, x: Tensor) -> Tensor:
        """The residual stream: in fp32 when the config says so (mamba_ssm's layout), else in the weights' dtype."""
        return x.float() if self.cfg.residual_in_fp32 else x

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
    ) -> HybridOutput:
        """Read ``input_ids`` [b, l] (rows right-padded to ``lengths``) after the given state (none if None).

        ``position``: RoPE position of the first token, or one per row (a tensor [b]).
        ``key_lengths`` [b]: rows whose states hold different numbers of keys, each padded after its
        own (several requests read at once); None: every key of ``keys`` is a row's.
        ``logits``: "all", "last" or "none".
        """
        cfg = self.cfg
        b, l = input_ids.shape
        mask = None if lengths is None else (torch.arange(l, device=input_ids.device)[None, :] < lengths[:, None]).float()
        empty = self.empty_state(b) if ssm_state is None or keys is None else None
        ssm_state = empty[0] if ssm_state is None else ssm_state
        conv_state = empty[1] if conv_state is None else conv_state
        keys = empty[2] if keys is None else keys
        values = empty[3] if values is None else values
        rope = self._rope(position, l)

        x = self._residual(self.model.embed_tokens(input_ids) * cfg.embedding_multiplier)
        ssm_out, conv_out, decay_out, k_out, v_out = [], [], [], [], []
        i_ssm = i_attn = 0
        for block in self.model.layers:
            h = rmsnorm(x, block.input_layernorm.weight, cfg.norm_eps).to(self.dtype)
            if hasattr(block, "mamba"):
                h, s, c, d = block.mamba(h, ssm_state[:, i_ssm], conv_state[:, i_ssm], mask, lengths)
                ssm_out.append(s)
                conv_out.append(c)
                decay_out.append(d)
                i_ssm += 1
            elif hasattr(block, "mlp"):  # Nemotron-H's MLP / MoE layers: no state
                h = block.mlp(h)
            else:
                h, k, v = block.self_attn(h, keys[:, i_attn], values[:, i_attn], rope, key_lengths)
                k_out.append(k)
                v_out.append(v)
                i_attn += 1
            x = block.ffn(x + h * cfg.residual_multiplier)
        x = rmsnorm(x, self.model.norm.weight, cfg.norm_eps).to(self.dtype)

        if logits == "all":
            out_logits = self.lm_head(x) / cfg.logits_scaling
        elif logits == "last":
            last = x[:, -1] if lengths is None else x[torch.arange(b, device=x.device), (lengths - 1).clamp(min=0)]
            out_logits = (self.lm_head(last) / cfg.logits_scaling)[:, None]
        elif logits == "none":
            out_logits = None
        else:
            raise ValueError(f"logits must be 'all', 'last' or 'none', got {logits!r}")

        def stack(ts: list[Tensor], like: Tensor) -> Tensor:
            return torch.stack(ts, 1) if ts else like.new_zeros(like.shape[0], 0, *like.shape[2:])

        empty_kv = keys.new_zeros(b, 0, cfg.n_kv_heads, l, cfg.head_dim)
        return HybridOutput(out_logits, stack(ssm_out, ssm_state), stack(conv_out, conv_state),
                            torch.stack(decay_out, 1) if decay_out else torch.zeros(b, 0, cfg.nheads, device=x.device),
                            stack(k_out, empty_kv), stack(v_out, empty_kv))

    def step(self, token_ids: Tensor, ssm_state: Tensor, conv_state: Tensor, keys: Tensor, values: Tensor,
             lengths: Tensor, positions: Tensor) -> Tensor:
        """Decode one token for each of b rows, each from its own state (one request's decoding, or
        the slots of a continuous batch, picaso_rag.scheduler): token_ids [b]; ssm_state/conv_state [b, n_ssm, ...], updated in place;
        keys/values [b, n_attn, KV, S, hd], padded buffers whose row r holds lengths[r] keys (S >
        every length): the new token's key and value are written at index lengths[r], in place, and
        row r attends to its own keys only; positions [b]: each row's RoPE position. Returns logits [b, vocab].

        Usage: ``logits = model.step(ids, ssm, conv, keys[..., :span, :], values[..., :span, :], lengths, positions)``,
        then ``lengths += 1; positions += 1``.
        """
        cfg = self.cfg
        rope = None
        if cfg.rotary_dim:
            cos, sin = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta, self.dtype)
            rope = cos[:, None, None], sin[:, None, None]
        x = self._residual(self.model.embed_tokens(token_ids) * cfg.embedding_multiplier)  # [b, d]
        i_ssm = i_attn = 0
        for block in self.model.layers:
            h = rmsnorm(x, block.input_layernorm.weight, cfg.norm_eps).to(self.dtype)
            if hasattr(block, "mamba"):
                h = block.mamba.step(h, ssm_state[:, i_ssm], conv_state[:, i_ssm])
                i_ssm += 1
            elif hasattr(block, "mlp"):
                h = block.mlp(h)
            else:
                h = block.self_attn.step(h, keys[:, i_attn], values[:, i_attn], lengths, rope)
                i_attn += 1
            x = block.ffn(x + h * cfg.residual_multiplier)
        x = rmsnorm(x, self.model.norm.weight, cfg.norm_eps).to(self.dtype)
        return self.lm_head(x) / cfg.logits_scaling

    def shift_keys(self, keys: Tensor, delta: int) -> Tensor:
        """Keys [..., T, head_dim] read at positions p, as if read at p + delta: RoPE is a rotation,
        so moving a stored document to other positions is one more rotation (identity with NoPE)."""
        if not self.cfg.rotary_dim or delta == 0:
            return keys
        cos, sin = rope_cos_sin(torch.tensor([delta], device=keys.device), self.cfg.rotary_dim, self.cfg.rope_theta, torch.float32)
        return apply_rope(keys.float(), cos, sin).to(keys.dtype)


@torch.no_grad()
def init_weights(model: HybridLM, seed: int = 0, std: float = 0.02) -> HybridLM:
    """Random initialisation as picaso_rag.model.init_weights (mamba_ssm's) for every layer. For tests and training."""
    device = model.device
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
