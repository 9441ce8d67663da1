"""How the blocks are run: one after another at full resolution (`Stack`), or as an hourglass (Nawrot et al. 2022,
"Hierarchical Transformers Are More Efficient Language Models"), model.hourglass = (a, b, c): a blocks at full
resolution, b blocks over a sequence shortened by model.shorten_factor k, c blocks at full resolution again.

Shortening keeps causality: the a-block output is shifted right by k - 1 (zeros in front), then each group of k
positions is pooled (model.hourglass_pool: avg, or linear over the concatenated group), so shortened position j
sees positions <= j k only. The b shortened blocks attend causally among themselves. Upsampling
(model.hourglass_upsample: repeat, or linear: one projection to k vectors) gives full position t the output of
shortened position floor(t / k), which saw nothing after t; the a-block output is added back as a residual, then
the c blocks run. A window whose length is not a multiple of k (strided evaluation's first windows, sampling) is
padded at its end, which no earlier output can see, and cropped. Intermediate heads attach to the full-resolution
blocks only (a + c - 1 of them). No KV cache (sampling recomputes each window) and no memory (model.errors()).
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig


class Stack(nn.Module):
    """Every block at full resolution; intermediate heads read every block's output but the last."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()

    def forward(self, blocks: nn.ModuleList, x, with_inter: bool, *block_args):
        inter_h = []
        for i, block in enumerate(blocks):
            x = block(x, *block_args)
            if with_inter and i < len(blocks) - 1:
                inter_h.append(x)
        return x, inter_h


class Hourglass(Stack):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.k, (self.n_pre, self.n_short, self.n_post) = cfg.shorten_factor, cfg.hourglass
        D = cfg.d_model
        self.pool = nn.Linear(self.k * D, D) if cfg.hourglass_pool == "linear" else None
        self.upsample = nn.Linear(D, self.k * D) if cfg.hourglass_upsample == "linear" else None

    def shorten(self, x):
        """(B, T, D) -> (B, T / k, D): shift right by k - 1, pool each group of k."""
        B, T, D = x.shape
        shifted = F.pad(x, (0, 0, self.k - 1, 0))[:, :T]
        groups = shifted.view(B, T // self.k, self.k, D)
        return groups.mean(2) if self.pool is None else self.pool(groups.flatten(2))

    def expand(self, s, T: int):
        """(B, T / k, D) -> (B, T, D): each shortened position to the k full positions of its group."""
        if self.upsample is None:
            return s.repeat_interleave(self.k, dim=1)
        return self.upsample(s).view(s.shape[0], T, -1)

    def forward(self, blocks: nn.ModuleList, x, with_inter: bool, *block_args):
        T = x.shape[1]
        padded = -(-T // self.k) * self.k
        x = F.pad(x, (0, 0, 0, padded - T))
        inter_h = []
        pre, short = blocks[:self.n_pre], blocks[self.n_pre:self.n_pre + self.n_short]
        post = blocks[self.n_pre + self.n_short:]
        for block in pre:
            x = block(x, *block_args)
            if with_inter:
                inter_h.append(x[:, :T])
        s = self.shorten(x)
        for block in short:
            s = block(s, *block_args)
        x = x + self.expand(s, padded)
        for i, block in enumerate(post):
            x = block(x, *block_args)
            if with_inter and i < len(post) - 1:
                inter_h.append(x[:, :T])
        return x[:, :T], inter_h


def make_stack(cfg: ModelConfig) -> Stack:
    return Hourglass(cfg) if cfg.hourglass else Stack(cfg)
