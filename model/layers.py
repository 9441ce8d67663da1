"""The swappable pieces of a block: norms, MLPs, positions, attention. Each variant is a small module chosen by a
config field through a table, so the network in `gpt.py` never branches on knob values."""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels.reference import rmsnorm_ref, swiglu_packed_ref
from model.attention import resolve as resolve_attention, warn_once
from model.config import ModelConfig
from model.kv_cache import KVCache, through_cache
from model.lowrank import make_linear
from model.memory import Compressor, SegmentMemory, detached_attention, project_heads
from model.sparse import make_pattern

# model.kernels -> swiglu of a packed gate+up: the fused Triton op or its plain-PyTorch reference
SWIGLU = {"torch": swiglu_packed_ref, "triton": kernels.swiglu_packed}


# ---------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, fn=rmsnorm_ref):
        super().__init__()
        self.eps, self.fn = eps, fn
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.fn(x, self.weight, self.eps)


class LayerNorm(nn.Module):
    """nn.LayerNorm's parameters (same names: checkpoints interchange) through the fused Triton kernel."""

    def __init__(self, dim: int, bias: bool, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        return kernels.layernorm(x, self.weight, self.bias, self.eps)


# (model.norm, model.kernels) -> the norm module
RMSNORM_FN = {"torch": rmsnorm_ref, "triton": kernels.rmsnorm}  # model.kernels -> the RMSNorm function
NORMS = {("rmsnorm", "torch"): lambda cfg, dim: RMSNorm(dim, fn=RMSNORM_FN["torch"]),
         ("rmsnorm", "triton"): lambda cfg, dim: RMSNorm(dim, fn=RMSNORM_FN["triton"]),
         ("layernorm", "torch"): lambda cfg, dim: nn.LayerNorm(dim, bias=cfg.bias),
         ("layernorm", "triton"): lambda cfg, dim: LayerNorm(dim, bias=cfg.bias)}


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    return NORMS[cfg.norm, cfg.kernels](cfg, dim)


# ---------------------------------------------------------------- MLPs
class SoLU(nn.Module):
    """Softmax linear unit (Elhage et al. 2022): x * softmax(x), then LayerNorm."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(x * torch.softmax(x, dim=-1))


ACTIVATIONS = {"gelu": lambda d: nn.GELU(), "relu": lambda d: nn.ReLU(), "solu": SoLU}


class MLP(nn.Module):
    """fc -> activation -> proj."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = make_linear(cfg, "mlp_in", cfg.d_model, cfg.d_ff, cfg.bias)
        self.act = ACTIVATIONS[cfg.activation](cfg.d_ff)
        self.proj = make_linear(cfg, "mlp_out", cfg.d_ff, cfg.d_model, cfg.bias)

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


class SwiGLU(nn.Module):
    """proj(silu(gate(x)) * up(x)) (Shazeer 2020); gate and up are d_ff wide each."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = make_linear(cfg, "mlp_in", cfg.d_model, 2 * cfg.d_ff, cfg.bias)
        self.proj = make_linear(cfg, "mlp_out", cfg.d_ff, cfg.d_model, cfg.bias)
        self.fn = SWIGLU[cfg.kernels]

    def forward(self, x):
        return self.proj(self.fn(self.gate_up(x)))


def make_mlp(cfg: ModelConfig) -> nn.Module:
    return SwiGLU(cfg) if cfg.activation == "swiglu" else MLP(cfg)


# ---------------------------------------------------------------- positions
class LearnedPositions(nn.Module):
    """A learned table added to the residual stream: once at the input (pos_emb=learned) or at the input of
    every block (pos_emb=learned_per_layer, as in Al-Rfou et al.). Absolute: positions < block_size."""

    def __init__(self, block_size: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(block_size, dim))

    def forward(self, x, positions: torch.Tensor | None = None):
        return x + (self.weight[: x.shape[1]] if positions is None else self.weight[positions])


class NoPositions(nn.Module):
    def forward(self, x, positions=None):
        return x


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021) on queries and keys, half-split layout, base 10000. Tables
    cover 2 x block_size positions: a window plus a chunk of the KV-cache path."""

    def __init__(self, head_dim: int, block_size: int, base: float = 10000.0):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        cos, sin = self.tables(2 * block_size)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def tables(self, n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-width tables of n positions: out = x * cos + swap_halves(x) * sin, i.e.
        (x1 cos - x2 sin, x2 cos + x1 sin)."""
        inv_freq = 1.0 / self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
        angles = torch.outer(torch.arange(n, dtype=torch.float64), inv_freq)
        cos, sin = angles.cos().repeat(1, 2).float(), torch.cat([-angles.sin(), angles.sin()], dim=1).float()
        return cos.to(device), sin.to(device)

    def cover(self, n: int) -> None:
        """Tables of at least n positions: a memory may be longer than the training context (evaluation)."""
        if n > self.cos.shape[0]:
            self.cos, self.sin = self.tables(n, self.cos.device)

    def forward(self, x, positions: torch.Tensor | None = None):
        """x (B, H, T, hd); positions (T,) or None for 0..T-1. Computed in fp32, returned in x's dtype."""
        if positions is None:
            cos, sin = self.cos[: x.shape[-2]], self.sin[: x.shape[-2]]
        else:
            cos, sin = self.cos[positions], self.sin[positions]
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return (xf * cos + torch.cat((x2, x1), dim=-1) * sin).to(x.dtype)


class XLRelative(nn.Module):
    """Transformer-XL's relative positions (Dai et al. 2019, sec. 3.3): the score of query i and key j is
    (q_i + u) . k_j + (q_i + v) . W_R r(i - j), over sqrt(head_dim), with r the sinusoid of the distance, W_R each
    layer's own `r_proj`, and u, v per head shared by every layer (this module is shared). The paper's relative
    shift is done as a gather of the (q + v) . W_R r(d) table at each pair's distance d, which also serves keys
    that are not evenly spaced (compressed memory) and the KV cache. In a compiled model on CUDA without attention
    dropout through FlexAttention (`attend_flex`: the content term as its q k^T with q + u, the table added by a
    score_mod, the mask as a block mask: no (T, K) scores or probabilities held for the backward); elsewhere
    explicitly (math)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.u = nn.Parameter(torch.zeros(cfg.n_head, cfg.head_dim))
        self.v = nn.Parameter(torch.zeros(cfg.n_head, cfg.head_dim))
        inv_freq = 1.0 / 10000 ** (torch.arange(0, cfg.d_model, 2, dtype=torch.float64) / cfg.d_model)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, q, k, v, q_pos, k_pos, mask, span: int, r_proj: nn.Linear, dropout: float,
                flex: bool | None = None):
        """q (B, H, T, hd), k and v (B, H, K, hd); positions (T,) and (K,) or None (0..T-1 for both, causal);
        mask (T, K) or None; span: positions covered (every distance is below it); flex: FlexAttention or math
        (None: flex on CUDA in a compiled model without attention dropout)."""
        B, H, T, hd = q.shape
        if q_pos is None:
            q_pos = k_pos = torch.arange(T, device=q.device)
        distance = q_pos[:, None] - k_pos[None, :]  # (T, K)
        allowed = distance >= 0 if mask is None else mask
        angles = torch.arange(span, device=q.device, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        r = r_proj(torch.cat([angles.sin(), angles.cos()], dim=-1).to(q.dtype)).view(span, H, hd)
        table = (q + self.v[:, None, :]) @ r.permute(1, 2, 0)  # (B, H, T, span): every distance
        if flex is None:  # FlexAttention where it is a fused kernel: CUDA, inside the compiled model
            flex = q.is_cuda and torch.compiler.is_compiling()
            if flex and dropout:
                warn_once("model.pos_emb=xl_relative with attention dropout: FlexAttention has none, using math")
                flex = False
        if flex:
            return self.attend_flex(q, k, v, q_pos, k_pos, allowed, table)
        content = (q + self.u[:, None, :]) @ k.transpose(-2, -1)  # (B, H, T, K)
        index = distance.clamp(0, span - 1).expand(B, H, T, distance.shape[1])
        scores = (content + table.gather(-1, index)).float() / math.sqrt(hd)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).to(v.dtype)
        if dropout:
            probs = F.dropout(probs, dropout)
        return probs @ v

    def attend_flex(self, q, k, v, q_pos, k_pos, allowed, table):
        """The same scores through FlexAttention: `allowed` (T, K), or (H or 1, T, K) with a sparse pattern, as its
        block mask; `table` (B, H, T, span) read at each pair's distance by the score_mod. Compiled on CUDA (in the
        compiled model, or wrap it); on a CPU only its unfused forward runs (no backward there)."""
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        B, H, T, hd = q.shape
        span, scale = table.shape[-1], 1.0 / math.sqrt(hd)
        per_head = allowed.dim() == 3 and allowed.shape[0] > 1

        def score_mod(score, batch, head, i, j):
            return score + table[batch, head, i, (q_pos[i] - k_pos[j]).clamp(0, span - 1)] * scale

        def mask_mod(batch, head, i, j):
            return allowed[head, i, j] if per_head else allowed.view(T, -1)[i, j]

        block_mask = create_block_mask(mask_mod, None, H if per_head else None, T, k.shape[-2], device=q.device)
        out = flex_attention(q + self.u[:, None, :].to(q.dtype), k, v, score_mod=score_mod, block_mask=block_mask,
                             scale=scale)
        return out.to(v.dtype)


# ---------------------------------------------------------------- attention
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; with a KV cache, over the cache's sliding window. RoPE rotates queries
    and keys in the same place on both paths."""

    def __init__(self, cfg: ModelConfig, layer: int, relative: XLRelative | None = None):
        super().__init__()
        self.layer, self.n_head, self.dropout = layer, cfg.n_head, cfg.dropout
        self.relative = relative  # pos_emb=xl_relative: u and v shared by every layer, W_R of this layer
        self.r_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False) if relative is not None else None
        self.qkv = make_linear(cfg, "qkv", cfg.d_model, 3 * cfg.d_model, cfg.bias)
        self.proj = make_linear(cfg, "attn_out", cfg.d_model, cfg.d_model, cfg.bias)
        self.rotary = Rotary(cfg.head_dim, cfg.block_size) if cfg.pos_emb == "rope" else None
        self.attend = resolve_attention(cfg.attention)
        self.pattern = make_pattern(cfg)  # model.attn_pattern: which earlier positions each head sees
        self.compressor = Compressor(cfg.d_model, cfg.cmem_ratio) if cfg.cmem_len else None

    def forward(self, x, cache: KVCache | None = None, memory: SegmentMemory | None = None):
        B, T, C = x.shape
        if memory is not None:
            return self.forward_with_memory(x, memory)
        # split, not view + permute: backward then writes the three gradients into place (one cat), not a
        # stack and a copy (one layer at the cpu preset's shape: 9-15% less time for forward + backward)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        # keys are cached unrotated; positions are relative to the cache's first slot
        k, v, q_pos, k_pos, mask = through_cache(cache, self.layer, k, v)
        y = self.mix(q, k, v, q_pos, k_pos, mask, k.shape[-2])
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def mix(self, q, k, v, q_pos, k_pos, mask, span: int):
        """Positions (rotary or Transformer-XL relative, over `span` positions), then attention."""
        dropout = self.dropout if self.training else 0.0
        if self.relative is not None:
            mask = self.pattern.mask(q.shape[-2], q.device) if mask is None else mask
            return self.relative(q, k, v, q_pos, k_pos, mask, span, self.r_proj, dropout)
        if self.rotary is not None:
            self.rotary.cover(span)
            q, k = self.rotary(q, q_pos), self.rotary(k, k_pos)
        return self.pattern.attend(self.attend, q, k, v, mask, dropout)

    def forward_with_memory(self, x, memory: SegmentMemory):
        """Queries from the segment, keys and values from [memory; segment] through the same projections."""
        B, T, C = x.shape
        ctx, mask, k_pos = memory.context(self.layer, x)
        q, k, v = project_heads(self.qkv.weight, self.qkv.bias, x, ctx, self.n_head)
        y = self.mix(q, k, v, k_pos[-T:], k_pos, mask, memory.cmem_len * memory.ratio + memory.mem_len + T)
        if self.compressor is not None:
            memory.compress(self.layer, self.compressor, functools.partial(detached_attention, self.qkv, self.n_head),
                            x.detach(), with_loss=self.training)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))
