"""Hashed n-gram input embeddings (model.ngram_max): besides its own byte's embedding, position t gets one row per
order n = 2..ngram_max from a table of `model.ngram_buckets` rows indexed by a hash of the n bytes ending at t, as
in the Byte Latent Transformer's hash n-gram embeddings (Pagnoni et al. 2024) — what a byte model otherwise spends
its first layers assembling.

The hash: the n bytes read as a number in base 257 modulo the prime 2^31 - 1, scrambled by one step of the Lehmer
generator (x 48271 modulo the same prime, a bijection), modulo the bucket count; computed byte by byte in int64
without overflow, for any order. Bytes before the start of what the model knows (a window's first positions, a
stream's start) are the symbol 256, which no byte equals. A KV cache or a segment memory hands over the last
ngram_max - 1 bytes of the stream (`previous`), so a stream fed in chunks gets the same rows as one fed whole. The
rows only add to the input: causality is kept (position t reads bytes <= t only).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from model.config import ModelConfig

BOUNDARY = 256  # the byte before the first known one
PRIME, SCRAMBLE = 2**31 - 1, 48271  # the hash's modulus and the Lehmer generator's multiplier


class NoNgrams(nn.Module):
    def forward(self, x: torch.Tensor, idx: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        return x


class HashedNgrams(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.context, self.buckets = cfg.ngram_max - 1, cfg.ngram_buckets
        self.weight = nn.Parameter(torch.empty(self.context * self.buckets, cfg.d_model))  # order 2 first
        self.register_buffer("offsets", torch.arange(self.context) * self.buckets, persistent=False)

    def ids(self, idx: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """Rows (B, T, ngram_max - 1) of the table for idx (B, T); previous (B, ngram_max - 1): the bytes just
        before idx, or None (unknown: BOUNDARY)."""
        B, T = idx.shape
        if previous is None:
            previous = idx.new_full((B, self.context), BOUNDARY)
        stream = torch.cat([previous.to(idx.dtype), idx], dim=1)  # (B, context + T)
        value, rows = idx, []
        for back in range(1, self.context + 1):  # order back + 1: the byte `back` positions earlier, and later ones
            earlier = stream[:, self.context - back: self.context - back + T]
            value = (earlier * pow(257, back, PRIME) + value) % PRIME
            rows.append(value * SCRAMBLE % PRIME % self.buckets)
        return torch.stack(rows, dim=-1) + self.offsets

    def forward(self, x: torch.Tensor, idx: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d_model), the bytes' own embeddings, plus the sum of their n-gram rows."""
        return x + nn.functional.embedding(self.ids(idx, previous), self.weight).sum(dim=2)


def make_ngrams(cfg: ModelConfig) -> nn.Module:
    return HashedNgrams(cfg) if cfg.ngram_max > 1 else NoNgrams()


def boundary(batch: int, cfg: ModelConfig, device) -> torch.Tensor:
    """What a KV cache or memory hands over before a stream's first chunk: (batch, ngram_max - 1) x BOUNDARY."""
    return torch.full((batch, cfg.ngram_max - 1), BOUNDARY, dtype=torch.long, device=device)


def carry_bytes(previous: torch.Tensor, idx: torch.Tensor) -> None:
    """After a chunk idx (B, T): previous (B, n) becomes the last n bytes of [previous; idx], in place."""
    n = previous.shape[1]
    if n:
        previous.copy_(torch.cat([previous, idx.to(previous.dtype)], dim=1)[:, -n:])
