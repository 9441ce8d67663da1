"""Differential attention (Ye et al. 2024, "Differential Transformer"), model.attn_type=differential.

With n_head = H and head_dim = d = d_model / H as for standard attention, the layer has H/2 differential heads
(equal parameters: the same q, k, v and output projections). Head i owns two query/key pairs of width d (the
sub-heads 2i and 2i+1) and one value of width 2d:

    attn_i = (softmax(Q1 K1^T / sqrt(d)) - lambda * softmax(Q2 K2^T / sqrt(d))) V
    lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init,  lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1))

(l the 1-based layer; lq1, lk1, lq2, lk2 learned vectors of width d per layer, initialised N(0, 0.1)); each head's
output goes through an RMSNorm over its 2d channels (weights shared by the heads) and is scaled by
(1 - lambda_init). Both softmaxes of every head are one call of the configured backend (sdpa, flash, math) over
the n_head sub-heads, each pair given its head's value, so the fast kernels still serve it; sdpa and flash take
the double-width values in two slices of equal width (model/attention.py). RoPE rotates every sub-head; the KV cache
keeps the H sub-head keys and the H/2 double-width values. Not with Transformer-XL memory or positions, nor with
the head-splitting sparse patterns (refused by model.errors()).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from model.attention import resolve as resolve_attention
from model.config import ModelConfig
from model.kv_cache import KVCache, through_cache
from model.layers import RMSNORM_FN, RMSNorm, Rotary
from model.lowrank import make_linear
from model.sparse import make_pattern

LAMBDA_STD = 0.1  # the lambda vectors' initial scale, as in the paper's code


def lambda_init(layer: int) -> float:
    """The paper's initial lambda of 0-based layer `layer` (its l - 1)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer)


class DifferentialAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, relative=None):
        super().__init__()
        self.layer, self.n_head, self.head_dim, self.dropout = layer, cfg.n_head, cfg.head_dim, cfg.dropout
        self.qkv = make_linear(cfg, "qkv", cfg.d_model, 3 * cfg.d_model, cfg.bias)
        self.proj = make_linear(cfg, "attn_out", cfg.d_model, cfg.d_model, cfg.bias)
        self.rotary = Rotary(cfg.head_dim, cfg.block_size) if cfg.pos_emb == "rope" else None
        self.attend = resolve_attention(cfg.attention)
        self.pattern = make_pattern(cfg)
        self.lambda_init = lambda_init(layer)
        self.lambdas = nn.Parameter(torch.randn(4, cfg.head_dim) * LAMBDA_STD)  # lq1, lk1, lq2, lk2
        self.head_norm = RMSNorm(2 * cfg.head_dim, eps=1e-5, fn=RMSNORM_FN[cfg.kernels])  # shared by the heads

    def init_own(self, std: float) -> None:
        """The lambda vectors N(0, LAMBDA_STD) again, whatever the model's init scale `std`: GPT.reset_parameters
        gives every 2-D parameter its own first."""
        nn.init.normal_(self.lambdas, std=LAMBDA_STD)

    def lam(self) -> torch.Tensor:
        q1, k1, q2, k2 = self.lambdas.to(torch.promote_types(self.lambdas.dtype, torch.float32))  # fp32 at least
        return torch.exp((q1 * k1).sum()) - torch.exp((q2 * k2).sum()) + self.lambda_init

    def forward(self, x, cache: KVCache | None = None, memory=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # sub-heads 2i, 2i+1: head i's pairs
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head // 2, 2 * self.head_dim).transpose(1, 2)
        k, v, q_pos, k_pos, mask = through_cache(cache, self.layer, k, v)
        if self.rotary is not None:
            q, k = self.rotary(q, q_pos), self.rotary(k, k_pos)
        dropout = self.dropout if self.training else 0.0
        # both softmaxes of every head in one call over the n_head sub-heads, each pair sharing its head's value
        both = self.pattern.attend(self.attend, q, k, v.repeat_interleave(2, dim=1), mask, dropout)
        first, second = both.view(B, self.n_head // 2, 2, -1, 2 * self.head_dim).unbind(2)
        y = first - self.lam().to(first.dtype) * second
        y = self.head_norm(y) * (1 - self.lambda_init)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))
