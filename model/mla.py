"""Multi-head latent attention (DeepSeek-V2, Liu et al. 2024, sec. 2.1), model.attn_type=mla.

Keys and values come from one shared low-rank latent per position, c = RMSNorm(W_DKV x) of width
model.kv_lora_rank: per head k_nope = W_UK c (model.nope_head_dim) and v = W_UV c (model.v_head_dim). Position
enters only through a decoupled rotary part: one key k_rope = RoPE(W_KR x) (model.rope_head_dim) shared by every
head, and per head q_rope. Queries are full-rank (W_Q x), or low-rank with model.q_lora_rank > 0
(W_UQ RMSNorm(W_DQ x)). Head h scores [q_nope; q_rope] . [k_nope; k_rope] / sqrt(nope + rope).

The KV cache keeps only c and the unrotated k_rope: (kv_lora_rank + rope_head_dim) values per layer and position
instead of 2 x d_model. With a cache the attention runs in absorbed form: W_UK folded into the query
(q_nope W_UK scores c directly) and W_UV applied after attention to the attended latent, so the cache is never
expanded per head; this equals the naive form (tested). Without a cache (training, strided evaluation) the naive
form runs through the configured backend; values narrower or wider than the query/key width go to flash in equal
widths (model/attention.py). Needs RoPE; not with Transformer-XL memory (model.errors()).
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


class LatentAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, relative=None):
        super().__init__()
        self.layer, self.n_head, self.dropout = layer, cfg.n_head, cfg.dropout
        self.nope, self.rope, self.v_dim, self.rank = (cfg.mla_nope_head_dim, cfg.rope_head_dim, cfg.mla_v_head_dim,
                                                       cfg.kv_lora_rank)
        H, D, norm = cfg.n_head, cfg.d_model, RMSNORM_FN[cfg.kernels]
        q_width = H * (self.nope + self.rope)
        if cfg.q_lora_rank:  # low-rank queries: W_UQ RMSNorm(W_DQ x)
            self.q = nn.Sequential(nn.Linear(D, cfg.q_lora_rank, bias=cfg.bias), RMSNorm(cfg.q_lora_rank, fn=norm),
                                   nn.Linear(cfg.q_lora_rank, q_width, bias=cfg.bias))
        else:
            self.q = nn.Linear(D, q_width, bias=cfg.bias)
        self.kv_down = nn.Linear(D, self.rank + self.rope, bias=cfg.bias)  # W_DKV and W_KR side by side
        self.kv_norm = RMSNorm(self.rank, fn=norm)
        self.k_up = nn.Linear(self.rank, H * self.nope, bias=False)  # W_UK
        self.v_up = nn.Linear(self.rank, H * self.v_dim, bias=False)  # W_UV
        self.proj = make_linear(cfg, "attn_out", H * self.v_dim, D, cfg.bias)
        self.rotary = Rotary(self.rope, cfg.block_size)
        self.attend = resolve_attention(cfg.attention)
        self.pattern = make_pattern(cfg)

    def forward(self, x, cache: KVCache | None = None, memory=None):
        B, T, _ = x.shape
        H = self.n_head
        q = self.q(x).view(B, T, H, self.nope + self.rope).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.kv_down(x).split([self.rank, self.rope], dim=-1)
        latent, k_rope = self.kv_norm(latent)[:, None], k_rope[:, None]  # (B, 1, T, width): one "head"
        # cached: the latent and the unrotated rotary key only
        k_rope, latent, q_pos, k_pos, mask = through_cache(cache, self.layer, k_rope, latent)
        q_rope, k_rope = self.rotary(q_rope, q_pos), self.rotary(k_rope, k_pos)
        dropout = self.dropout if self.training else 0.0
        attention = self.absorbed if cache is not None else self.naive
        y = attention(q_nope, q_rope, latent, k_rope, mask, dropout)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * self.v_dim))

    def naive(self, q_nope, q_rope, latent, k_rope, mask, dropout: float):
        """Per-head keys and values expanded from the latent, then ordinary attention."""
        B, H, K = latent.shape[0], self.n_head, latent.shape[-2]
        k_nope = self.k_up(latent[:, 0]).view(B, K, H, self.nope).transpose(1, 2)
        v = self.v_up(latent[:, 0]).view(B, K, H, self.v_dim).transpose(1, 2)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, H, K, self.rope)], dim=-1)
        return self.pattern.attend(self.attend, q, k, v, mask, dropout)

    def absorbed(self, q_nope, q_rope, latent, k_rope, mask, dropout: float):
        """W_UK folded into the query (it then scores the latent itself), W_UV applied to the attended latent.
        Queries are scaled so that the backend's 1/sqrt(rank + rope) becomes the naive 1/sqrt(nope + rope)."""
        B, H, K = q_nope.shape[0], self.n_head, latent.shape[-2]
        w_uk = self.k_up.weight.view(H, self.nope, self.rank)
        q_latent = q_nope @ w_uk  # (B, H, T, rank)
        rescale = math.sqrt((self.rank + self.rope) / (self.nope + self.rope))
        q = torch.cat([q_latent, q_rope], dim=-1) * rescale
        k = torch.cat([latent, k_rope], dim=-1).expand(B, H, K, self.rank + self.rope)
        attended = self.pattern.attend(self.attend, q, k, latent.expand(B, H, K, self.rank), mask, dropout)
        w_uv = self.v_up.weight.view(H, self.v_dim, self.rank)
        return attended @ w_uv.transpose(1, 2)  # (B, H, T, v_dim)
