"""A preallocated per-layer key/value cache with positions, for generation and the cached evaluator.

The cache holds the keys and values of up to `capacity` consecutive positions per layer and stream, slot 0 being
absolute position `start`. A forward pass over n new positions appends their keys and values in every layer and
attends over the cache with a sliding window: the query at position p sees the positions p - window + 1 .. p.
Before each pass, `make_room(n)` drops the oldest positions that no new query can see. Keys are stored before the
rotary rotation and rotated at use, relative to `start`, so positions stay small however long the stream runs.
"""
from __future__ import annotations

import torch

from model.config import ModelConfig
from model.ngram import BOUNDARY, boundary
from model.sparse import make_pattern


def through_cache(cache: "KVCache | None", layer: int, k: torch.Tensor, v: torch.Tensor):
    """(k, v, query positions, key positions, mask) for one layer's attention: with a cache, every cached key and
    value of the layer (the new ones appended), positions relative to the cache's first slot and what each new
    query may attend; without one, k and v as given and None for the rest (causal attention over the window)."""
    if cache is None:
        return k, v, None, None, None
    new = k.shape[-2]
    k, v, k_pos, mask = cache.update(layer, k, v)
    return k, v, k_pos[-new:], k_pos, mask


def cache_bytes_per_token(cfg: ModelConfig, element_size: int) -> int:
    """What a KV cache keeps per position of a stream, all layers (keys and values, in cfg.cache_layout)."""
    (k_heads, k_width), (v_heads, v_width) = cfg.cache_layout
    return cfg.n_layer * (k_heads * k_width + v_heads * v_width) * element_size


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, window: int, chunk: int, device, dtype=torch.float32):
        """window: how many positions a query sees (itself included); chunk: most positions per forward pass."""
        if cfg.hourglass:
            raise ValueError("model.hourglass has no KV cache (its shortened blocks see groups of positions): "
                             "evaluate with --mode strided, sample with --no_cache")
        if not 1 <= window <= cfg.block_size or not 1 <= chunk <= cfg.block_size:
            raise ValueError(f"window ({window}) and chunk ({chunk}) must be in [1, block_size={cfg.block_size}]")
        self.window, self.chunk = min(window, cfg.attention_span), chunk  # a local pattern keeps its window only
        self.capacity = self.window - 1 + chunk
        self.pattern = make_pattern(cfg)
        (k_heads, k_width), (v_heads, v_width) = cfg.cache_layout
        self.k = torch.zeros(cfg.n_layer, batch, k_heads, self.capacity, k_width, device=device, dtype=dtype)
        self.v = torch.zeros(cfg.n_layer, batch, v_heads, self.capacity, v_width, device=device, dtype=dtype)
        self.cfg, self.start, self.length = cfg, 0, 0
        self.previous_bytes = boundary(batch, cfg, device)  # the stream's last bytes (model.ngram_max - 1 of them)
        # learned tables end at block_size: a stream that runs past it would index beyond them
        self.position_limit = cfg.block_size if cfg.absolute_positions else None
        self.pos_emb = cfg.pos_emb

    @property
    def bytes_per_token(self) -> int:
        """Cache memory per position of a stream, all layers (keys and values)."""
        return cache_bytes_per_token(self.cfg, self.k.element_size())

    @property
    def bytes_per_stream(self) -> int:
        return self.capacity * self.bytes_per_token

    def reset(self) -> None:
        self.start, self.length = 0, 0
        self.previous_bytes.fill_(BOUNDARY)

    def make_room(self, n: int) -> None:
        """Drop the oldest positions so that n more fit; the last window - 1 positions are always kept."""
        if n > self.chunk:
            raise ValueError(f"a pass of {n} positions exceeds the cache's chunk of {self.chunk}")
        drop = self.length + n - self.capacity
        if drop > 0:
            keep = self.length - drop
            self.k[:, :, :, :keep] = self.k[:, :, :, drop:self.length].clone()
            self.v[:, :, :, :keep] = self.v[:, :, :, drop:self.length].clone()
            self.start, self.length = self.start + drop, keep

    def positions(self, n: int) -> torch.Tensor:
        """Absolute positions of the next n entries. With learned (absolute) positions a stream may not run past
        block_size: that is a ValueError, not an index past the table."""
        first = self.start + self.length
        if self.position_limit is not None and first + n > self.position_limit:
            raise ValueError(f"model.pos_emb={self.pos_emb} has positions 0..{self.position_limit - 1} only, and this "
                             f"cached stream reaches position {first + n - 1}: a rolling KV cache needs relative "
                             f"positions (model.pos_emb=rope); reset the cache for each window instead")
        return torch.arange(first, first + n, device=self.k.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this layer's keys and values (B, H, n, hd) of the next n positions; returns all cached keys and
        values of the layer, their positions relative to `start`, and the mask (n, cached) of what each new query
        may attend."""
        n = k.shape[2]
        end = self.length + n
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        key_pos = torch.arange(end, device=k.device)
        query_pos = key_pos[self.length:]
        mask = (key_pos[None, :] <= query_pos[:, None]) & (key_pos[None, :] > query_pos[:, None] - self.window)
        pattern = self.pattern.allowed(self.start + query_pos, self.start + key_pos)  # in stream positions
        mask = mask if pattern is None else mask & pattern
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], key_pos, mask

    def advance(self, n: int) -> None:
        """Commit the n positions that every layer has stored."""
        self.length += n
