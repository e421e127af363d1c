"""The typed layers of the one model (picaso_rag.model): what each layer of a checkpoint is.

- :class:`Mamba2Mixer`: Mamba-2's SSD mixer, with a state (the SSM memory, the conv inputs);
- :class:`Attention`: grouped-query attention over a state's keys and values (RoPE or none), torch SDPA;
- feed-forward layers, which keep nothing: Granite's gated MLP and MoE, Bamba's Llama MLP, Nemotron-H's
  squared-ReLU MLP and sigmoid-routed MoE.

Parameter names follow transformers (Granite's ``mamba``/``self_attn``/``shared_mlp``...) and mamba_ssm
(the mixer's ``in_proj``, ``conv1d``, ``A_log``...); picaso_rag.adapters maps the other layouts onto them.
Each kernel sits behind a function of picaso_rag.kernels with a pure-torch reference beside it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import ModelConfig
from .kernels import causal_conv, chunk_scan, conv_step, rmsnorm, ssm_step


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, group_size: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.group_size = group_size or dim

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        """Mamba-2's gated norm when ``gate`` is given: norm(x * silu(gate)), per group of channels."""
        return rmsnorm(x, self.weight, self.eps, gate=gate, group_size=self.group_size)


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d_in_proj = 2 * cfg.d_inner + 2 * cfg.ngroups * cfg.d_state + cfg.nheads  # z, x, B, C, dt
        self.in_proj = nn.Linear(cfg.d_model, d_in_proj, bias=cfg.bias)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim, bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(cfg.nheads))
        self.A_log = nn.Parameter(torch.zeros(cfg.nheads))
        self.D = nn.Parameter(torch.ones(cfg.nheads))
        self.norm = RMSNorm(cfg.d_inner, cfg.norm_eps, group_size=cfg.d_inner // cfg.ngroups)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=cfg.bias)

    def forward(self, u: Tensor, ssm_state: Tensor, conv_state: Tensor, mask: Tensor | None, lengths: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Read u [b, l, d_model] from the states; ``mask``/``lengths`` None: no row is padded."""
        cfg = self.cfg
        b, l, _ = u.shape
        z, xBC, dt = self.in_proj(u).split([cfg.d_inner, cfg.conv_dim, cfg.nheads], dim=-1)
        xBC, conv_state = causal_conv(xBC, conv_state, self.conv1d.weight[:, 0], self.conv1d.bias, lengths)
        x, B, C = xBC.split([cfg.d_inner, cfg.ngroups * cfg.d_state, cfg.ngroups * cfg.d_state], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if cfg.dt_limit != (0.0, math.inf):  # softplus is >= 0 already: skip a no-op clamp (one launch per layer)
            dt = dt.clamp(*cfg.dt_limit)
        if mask is not None:  # padding reads as dt = 0: no decay, no input
            dt = dt * mask[..., None]
        A = -torch.exp(self.A_log.float())
        log_decay = A * dt.sum(dim=1)  # [b, h]; padding has dt = 0
        x = x.unflatten(-1, (cfg.nheads, cfg.headdim))
        B, C = B.unflatten(-1, (cfg.ngroups, cfg.d_state)), C.unflatten(-1, (cfg.ngroups, cfg.d_state))
        y, final = chunk_scan(x, dt, A, B, C, self.D, cfg.chunk_size, initial_state=ssm_state)
        ssm_state = final.to(ssm_state.dtype)
        y = self.norm(y.flatten(-2), z)
        return self.out_proj(y), ssm_state, conv_state, log_decay

    def step(self, u: Tensor, ssm_state: Tensor, conv_state: Tensor) -> Tensor:
        """Decode one token: u [b, d_model]; updates ssm_state [b, H, P, N] and conv_state in place."""
        cfg = self.cfg
        z, xBC, dt = self.in_proj(u).split([cfg.d_inner, cfg.conv_dim, cfg.nheads], dim=-1)
        xBC = conv_step(xBC, conv_state, self.conv1d.weight[:, 0], self.conv1d.bias)
        x, B, C = xBC.split([cfg.d_inner, cfg.ngroups * cfg.d_state, cfg.ngroups * cfg.d_state], dim=-1)
        A = -torch.exp(self.A_log.float())
        y = ssm_step(ssm_state, x.unflatten(-1, (cfg.nheads, cfg.headdim)), dt, A,
                     B.unflatten(-1, (cfg.ngroups, cfg.d_state)), C.unflatten(-1, (cfg.ngroups, cfg.d_state)), self.D,
                     dt_bias=self.dt_bias, dt_limit=cfg.dt_limit)
        return self.out_proj(self.norm(y.flatten(-2), z))


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
    def __init__(self, cfg: ModelConfig):
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

    def __init__(self, cfg: ModelConfig):
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

    def __init__(self, cfg: ModelConfig):
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

    def __init__(self, cfg: ModelConfig):
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
