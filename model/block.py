"""The transformer block: pre-norm attention and MLP branches, the attention chosen by model.attn_type from a
table (standard multi-head attention in `layers.py`, the variants in their own files)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from model.config import ModelConfig
from model.differential import DifferentialAttention
from model.kv_cache import KVCache
from model.layers import CausalSelfAttention, LearnedPositions, NoPositions, XLRelative, make_mlp, make_norm
from model.memory import SegmentMemory
from model.mla import LatentAttention
from model.moe import MoE

# model.attn_type -> the attention module (cfg, layer, relative positions or None)
ATTENTIONS = {"standard": CausalSelfAttention, "differential": DifferentialAttention, "mla": LatentAttention}


class ScaledDropout(nn.Module):
    """Dropout, then a constant scale: the branch of a depth-scaled residual."""

    def __init__(self, p: float, scale: float):
        super().__init__()
        self.drop, self.scale = nn.Dropout(p), scale

    def forward(self, x):
        return self.scale * self.drop(x)


def make_branch(cfg: ModelConfig) -> nn.Module:
    """What a residual branch's output goes through before it is added: dropout and the residual scale, each only
    where it does something (a multiply by 1.0 and a dropout of 0 cost a full pass each way, measured: ~10 ms of a
    ~300 ms CPU step of the cpu preset)."""
    if cfg.residual_scale == "depth-scaled":
        return ScaledDropout(cfg.dropout, 1.0 / math.sqrt(2 * cfg.n_layer))
    return nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()


class Block(nn.Module):
    """Pre-norm transformer block: x += s*drop(attn(norm(x))); x += s*drop(mlp(norm(x))), s the residual scale."""

    def __init__(self, cfg: ModelConfig, layer: int, relative: XLRelative | None = None):
        super().__init__()
        per_layer = cfg.pos_emb == "learned_per_layer"
        self.pos = LearnedPositions(cfg.block_size, cfg.d_model) if per_layer else NoPositions()
        self.norm1, self.attn = make_norm(cfg, cfg.d_model), ATTENTIONS[cfg.attn_type](cfg, layer, relative)
        moe = cfg.moe_experts and (layer + 1) % cfg.moe_every == 0  # MoE in every moe_every-th block
        self.norm2, self.mlp = make_norm(cfg, cfg.d_model), MoE(cfg) if moe else make_mlp(cfg)
        self.branch = make_branch(cfg)  # dropout and residual scale

    def forward(self, x, cache: KVCache | None = None, positions: torch.Tensor | None = None,
                memory: SegmentMemory | None = None):
        x = self.pos(x, positions)
        x = x + self.branch(self.attn(self.norm1(x), cache, memory))
        return x + self.branch(self.mlp(self.norm2(x)))

    def residual_projections(self) -> list[nn.Module | nn.Parameter]:
        """The layers that write into the residual stream (scaled down by init=gpt2)."""
        return [self.attn.proj, self.mlp.proj]
