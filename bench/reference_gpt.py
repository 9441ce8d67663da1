"""A plain PyTorch GPT in the manner of nanoGPT, the reference every charlm training step is timed against.

LayerNorm, GELU MLP, scaled_dot_product_attention, learned positions at the input, and the auxiliary losses of a
charlm config computed the straightforward way: one matmul + cross-entropy per head in a Python loop. It reads
the shape of a `ModelConfig` (n_layer, n_head, d_model, d_ff, block_size, n_targets, target_weights,
intermediate_loss, intermediate_targets) and ignores charlm's other knobs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_head = cfg.n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, cfg.d_ff), nn.Linear(cfg.d_ff, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class ReferenceGPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        n_inter = cfg.n_layer - 1 if cfg.intermediate_loss else 0
        self.inter_ln = nn.ModuleList(nn.LayerNorm(cfg.d_model) for _ in range(n_inter))
        self.inter_heads = nn.ModuleList(nn.ModuleList(nn.Linear(cfg.d_model, cfg.vocab_size)
                                                       for _ in range(cfg.intermediate_targets))
                                         for _ in range(n_inter))
        self.heads = nn.ModuleList(nn.Linear(cfg.d_model, cfg.vocab_size) for _ in range(cfg.n_targets))

    def targets_loss(self, heads, x, targets):
        """sum_k weight_k * CE of the t+k+1 head, which has no target in the last k positions."""
        T, loss = x.shape[1], 0.0
        for k, (head, weight) in enumerate(zip(heads, self.cfg.target_weights)):
            logits = head(x[:, : T - k])
            loss = loss + weight * F.cross_entropy(logits.flatten(0, 1).float(), targets[:, k:].flatten())
        return loss

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        loss = 0.0
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.inter_heads):
                loss = loss + self.targets_loss(self.inter_heads[i], self.inter_ln[i](x), targets)
        return loss + self.targets_loss(self.heads, self.ln_f(x), targets)
