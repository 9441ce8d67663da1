"""Sparse attention patterns (Child et al. 2019, "Generating Long Sequences with Sparse Transformers"), chosen by
model.attn_pattern: which earlier positions j each query i may attend, on top of causality (j <= i).

- dense:   every earlier position;
- local:   the last attn_window positions (i - j < attn_window);
- strided: the paper's strided pattern with its heads split in two: the first half of the heads see the local band
           (i - j < attn_window; the paper takes attn_window = attn_stride), the second half every attn_stride-th
           position back ((i - j) mod attn_stride == 0);
- fixed:   the paper's fixed pattern, heads split likewise: the first half see their own block of attn_stride
           positions (floor(j / l) == floor(i / l)), the second half the last attn_summary positions of every block
           (j mod l >= l - c: the "summary" cells) and, beyond the paper's set, the query's own position (else a
           query before the first summary cell would see nothing: an empty softmax).

`rule(head, i, j)` is the one definition, written with tensor operations so it serves both as a dense boolean mask
(broadcast over (H, Tq, Tk): the KV cache, the math/sdpa backends, Transformer-XL's relative positions) and as
FlexAttention's mask_mod (CUDA, no dropout on the attention weights: block-sparse, skipping empty blocks). fixed
depends on absolute positions: in training, positions within the window; in the KV cache, positions in the stream.
Transformer-XL memory is refused with a pattern (model.errors()).
"""
from __future__ import annotations

import torch

from model.attention import warn_once
from model.config import ModelConfig


class DensePattern:
    """Plain causal attention: masks pass through unchanged (None = causal over equal-length q and k)."""

    def allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
        return None

    def mask(self, T: int, device) -> torch.Tensor | None:
        return None

    def attend(self, backend, q, k, v, mask, dropout: float):
        return backend(q, k, v, mask, dropout)


class SparsePattern(DensePattern):
    def __init__(self, cfg: ModelConfig):
        self.kind, self.n_head = cfg.attn_pattern, cfg.n_head
        self.window, self.stride, self.summary = cfg.attn_window, cfg.attn_stride, cfg.attn_summary
        self.block_masks: dict[tuple, object] = {}
        self.mask_mod = lambda batch, head, i, j: self.rule(head, i, j)  # FlexAttention's signature

    def rule(self, head, i, j):
        """True where query position i may attend key position j in this head (tensors that broadcast)."""
        causal = j <= i
        if self.kind == "local":
            return causal & (i - j < self.window)
        first_half = head < self.n_head // 2
        if self.kind == "strided":
            near, far = i - j < self.window, (i - j) % self.stride == 0
        else:
            near = i // self.stride == j // self.stride
            far = (j % self.stride >= self.stride - self.summary) | (i == j)
        return causal & ((first_half & near) | (~first_half & far))

    def allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(H, Tq, Tk) boolean mask of absolute query and key positions ((1, Tq, Tk) for local: every head alike)."""
        heads = 1 if self.kind == "local" else self.n_head
        head = torch.arange(heads, device=q_pos.device)[:, None, None]
        return self.rule(head, q_pos[None, :, None], k_pos[None, None, :])

    def mask(self, T: int, device) -> torch.Tensor:
        positions = torch.arange(T, device=device)
        return self.allowed(positions, positions)

    def block_mask(self, T: int, device):
        """FlexAttention's block mask of a T-long window (built once per length and device)."""
        from torch.nn.attention.flex_attention import create_block_mask
        heads = None if self.kind == "local" else self.n_head  # local: one mask for any number of heads
        if torch.compiler.is_compiling():  # traced into the compiled graph (a few cheap ops), not cached
            return create_block_mask(self.mask_mod, None, heads, T, T, device=device)
        key = (T, str(device))
        if key not in self.block_masks:
            self.block_masks[key] = create_block_mask(self.mask_mod, None, heads, T, T, device=device)
        return self.block_masks[key]


    def attend_flex(self, q, k, v):
        """Causal attention of a window with this pattern through FlexAttention (on CPU: its unfused reference)."""
        from torch.nn.attention.flex_attention import flex_attention
        return flex_attention(q, k, v, block_mask=self.block_mask(q.shape[-2], q.device))

    def attend(self, backend, q, k, v, mask, dropout: float):
        """The training window (mask None) on CUDA goes through FlexAttention's block-sparse kernel; the rest
        (a KV cache's mask, attention dropout, CPU) through `backend` with the dense mask."""
        if mask is None and q.is_cuda:
            if not dropout:
                return self.attend_flex(q, k, v)
            warn_once("model.attn_pattern with attention dropout: FlexAttention has none, using a dense mask")
        return backend(q, k, v, self.mask(q.shape[-2], q.device) if mask is None else mask, dropout)


def make_pattern(cfg: ModelConfig) -> DensePattern:
    return DensePattern() if cfg.attn_pattern == "dense" else SparsePattern(cfg)
