"""A Mamba-2 language model that reads from, and returns, its recurrent state.

Parameter names follow mamba_ssm's ``MambaLMHeadModel`` so that state-spaces checkpoints
load as they are. Per layer the state is:
- ``ssm_state``  [batch, nheads, headdim, d_state]: the SSM memory h;
- ``conv_state`` [batch, conv_dim, d_conv - 1]: the last inputs of the causal conv1d;
- ``log_decay``  [batch, nheads], fp32: A * sum(dt) over the tokens read, i.e. the log of
  the factor by which this segment scaled any state it started from (PICASO needs it).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import Mamba2Config
from .kernels import add_rmsnorm, causal_conv, chunk_scan, conv_step, rmsnorm, ssm_step


class ForwardOutput(NamedTuple):
    logits: Tensor | None  # [batch, seq, vocab], [batch, 1, vocab] (last position) or None
    ssm_state: Tensor  # [batch, n_layer, nheads, headdim, d_state]
    conv_state: Tensor  # [batch, n_layer, conv_dim, d_conv - 1]
    log_decay: Tensor  # [batch, n_layer, nheads], fp32, of the tokens read in this call only


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
    def __init__(self, cfg: Mamba2Config):
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


class Block(nn.Module):
    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = Mamba2Mixer(cfg)


class Backbone(nn.Module):
    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)


class Mamba2LM(nn.Module):
    """Mamba-2 LM whose forward starts from given states and returns the final ones.

    Usage: ``out = model(input_ids, ssm_state=s, conv_state=c, lengths=n)`` then
    ``out.logits``, ``out.ssm_state``... Rows of ``input_ids`` are right-padded to ``lengths``.
    """

    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.backbone.embedding.weight.device

    def empty_state(self, batch: int) -> tuple[Tensor, Tensor]:
        """Zero (ssm_state, conv_state): the state before any token."""
        cfg = self.cfg
        kw = dict(device=self.device, dtype=self.dtype)
        return (torch.zeros(batch, cfg.n_layer, cfg.nheads, cfg.headdim, cfg.d_state, **kw),
                torch.zeros(batch, cfg.n_layer, cfg.conv_dim, cfg.d_conv - 1, **kw))

    def forward(
        self,
        input_ids: Tensor,
        ssm_state: Tensor | None = None,
        conv_state: Tensor | None = None,
        lengths: Tensor | None = None,
        logits: str = "all",
    ) -> ForwardOutput:
        """Read ``input_ids`` [batch, seq] starting from the given states (zeros if None).

        ``logits``: "all" positions, "last" real position of each row, or "none" (encoding only).
        """
        b, l = input_ids.shape
        mask = None if lengths is None else (torch.arange(l, device=input_ids.device)[None, :] < lengths[:, None]).float()
        zero_ssm, zero_conv = self.empty_state(b) if ssm_state is None or conv_state is None else (None, None)
        ssm_state = zero_ssm if ssm_state is None else ssm_state
        conv_state = zero_conv if conv_state is None else conv_state

        hidden, residual = self.backbone.embedding(input_ids), None
        eps, fp32 = self.cfg.norm_eps, self.cfg.residual_in_fp32
        ssm_out, conv_out, decay_out = [], [], []
        for i, block in enumerate(self.backbone.layers):  # pre-norm blocks; the add is fused into the norm
            hidden, residual = add_rmsnorm(hidden, residual, block.norm.weight, eps, fp32)
            hidden, s, c, d = block.mixer(hidden, ssm_state[:, i], conv_state[:, i], mask, lengths)
            ssm_out.append(s)
            conv_out.append(c)
            decay_out.append(d)
        hidden, _ = add_rmsnorm(hidden, residual, self.backbone.norm_f.weight, eps, fp32)

        if logits == "all":
            out_logits = self.lm_head(hidden)
        elif logits == "last":
            last = hidden[:, -1] if lengths is None else hidden[torch.arange(b, device=hidden.device), (lengths - 1).clamp(min=0)]
            out_logits = self.lm_head(last)[:, None]
        elif logits == "none":
            out_logits = None
        else:
            raise ValueError(f"logits must be 'all', 'last' or 'none', got {logits!r}")
        return ForwardOutput(out_logits, torch.stack(ssm_out, 1), torch.stack(conv_out, 1), torch.stack(decay_out, 1))

    def step(self, token_ids: Tensor, ssm_state: Tensor, conv_state: Tensor) -> Tensor:
        """Decode one token per row: token_ids [batch]; the states [batch, n_layer, ...] are updated
        in place (no copies: a CUDA graph can replay this). Returns logits [batch, vocab].

        Usage: ``logits = model.step(next_ids, out.ssm_state, out.conv_state)``.
        """
        hidden, residual = self.backbone.embedding(token_ids), None
        eps, fp32 = self.cfg.norm_eps, self.cfg.residual_in_fp32
        for i, block in enumerate(self.backbone.layers):
            hidden, residual = add_rmsnorm(hidden, residual, block.norm.weight, eps, fp32)
            hidden = block.mixer.step(hidden, ssm_state[:, i], conv_state[:, i])
        hidden, _ = add_rmsnorm(hidden, residual, self.backbone.norm_f.weight, eps, fp32)
        return self.lm_head(hidden)


@torch.no_grad()
def init_weights(model: Mamba2LM, seed: int = 0, std: float = 0.02) -> Mamba2LM:
    """Random initialisation as in mamba_ssm (dt in [1e-3, 0.1], A in [1, 16]). For tests and training."""
    device = model.device  # generate where the weights are: a 2.7B model initialises in seconds on a GPU
    gen = torch.Generator(device=device).manual_seed(seed)
    cfg = model.cfg
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.log(torch.empty(p.shape, device=device).uniform_(1, 16, generator=gen)))
        elif name.endswith("dt_bias"):
            dt = torch.exp(torch.rand(p.shape, generator=gen, device=device) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3))) + torch.log(torch.tensor(1e-3))).clamp(min=1e-4)
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
    for block in model.backbone.layers:  # GPT-2 style: scale residual projections by depth
        block.mixer.out_proj.weight.div_((2 * cfg.n_layer) ** 0.5)
    return model
