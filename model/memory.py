"""Transformer-XL recurrence memory (Dai et al. 2019) and the Compressive Transformer's compressed memory (Rae et
al. 2019): each layer attends over [compressed memory; memory; current segment].

The memory of a batch of streams holds, per layer, the attention inputs (the normed residual stream entering the
layer's attention) of the last `mem_len` positions before the segment, detached: no gradient flows into earlier
segments, while the layer's current key/value projections are applied to it (as in Transformer-XL), so those
projections learn from the remembered positions too. Queries come from the segment only; the query at segment
position i sees every valid memory slot and segment positions 0..i (bottom-right causal).

Compressive (`model.cmem_len` > 0): the positions a segment pushes out of the memory are compressed by a 1-D
convolution (kernel = stride = `model.cmem_ratio`) into slots of a compressed memory of cmem_len slots, which
every layer attends to as well. The compressor sees only detached inputs and is trained only by the attention-
reconstruction loss: the MSE between the layer's attention over the evicted memories and over their compression,
computed with the segment's detached queries and the layer's projections applied as detached copies (the
parameters themselves stay trainable: the language-model loss still reaches them). Rotary positions space the
compressed slots `cmem_ratio` apart, before the memory.

After `reset()` no slot is valid (masked out), so a stream's first segment is the plain causal model; slots become
valid as segments pass. Fixed shapes and device-side counts of valid slots: no host synchronisation and one
compiled graph for every step.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig
from model.ngram import BOUNDARY, boundary


class SegmentMemory:
    def __init__(self, cfg: ModelConfig, batch: int, device, dtype=torch.float32, mem_len: int | None = None):
        """mem_len: slots per layer (default model.mem_len; evaluation may use more than training did)."""
        self.mem_len = cfg.mem_len if mem_len is None else mem_len
        self.cmem_len, self.ratio, self.recon_weight = cfg.cmem_len, cfg.cmem_ratio, cfg.cmem_weight
        if self.mem_len < 1:
            raise ValueError(f"a memory needs mem_len >= 1 (got {self.mem_len})")
        if cfg.absolute_positions:
            raise ValueError(f"model.pos_emb={cfg.pos_emb} gives absolute positions, which cannot index a memory; "
                             f"use model.pos_emb=rope or xl_relative")
        if self.cmem_len and self.mem_len % self.ratio:
            raise ValueError(f"a compressive memory needs mem_len ({self.mem_len}) to be a multiple of "
                             f"model.cmem_ratio={self.ratio}")
        shape = (cfg.n_layer, batch, self.mem_len, cfg.d_model)
        self.states = torch.zeros(shape, device=device, dtype=dtype)
        self.compressed = torch.zeros(cfg.n_layer, batch, self.cmem_len, cfg.d_model, device=device, dtype=dtype)
        self.valid = torch.zeros((), dtype=torch.long, device=device)  # how many of the last slots are real
        self.cvalid = torch.zeros((), dtype=torch.long, device=device)  # the same for the compressed slots
        self.evicted: list[torch.Tensor | None] = [None] * cfg.n_layer  # what the segment pushed out, per layer
        self.recon = torch.zeros((), device=device)  # this forward's reconstruction loss, summed over layers
        self.last_recon = torch.zeros((), device=device)
        self.previous_bytes = boundary(batch, cfg, device)  # the streams' last bytes (model.ngram_max - 1 of them)

    def reset(self) -> None:
        """Forget everything (the streams restart): in place, on the device."""
        self.valid.zero_()
        self.cvalid.zero_()
        self.previous_bytes.fill_(BOUNDARY)

    def context(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D): this layer's attention input for the segment. Returns [compressed; memory; x], the mask
        (T, keys) of what each query may attend, and the keys' positions (the queries' are the last T); stores
        the last mem_len positions of [memory; x] as this layer's memory for the next segment."""
        T, M, C = x.shape[1], self.mem_len, self.cmem_len
        if x.shape[0] != self.states.shape[1]:
            raise ValueError(f"a batch of {x.shape[0]} streams does not fit a memory of {self.states.shape[1]}")
        recent = torch.cat([self.states[layer].to(x.dtype), x], dim=1)  # (B, M + T, D)
        ctx = torch.cat([self.compressed[layer].to(x.dtype), recent], dim=1) if C else recent
        key = torch.arange(M + T, device=x.device)
        mask = (key[None, :] <= key[M:, None]) & (key[None, :] >= M - self.valid)
        positions = key + C * self.ratio
        if C:
            slot = torch.arange(C, device=x.device)
            mask = torch.cat([(slot >= C - self.cvalid).expand(T, C), mask], dim=1)
            positions = torch.cat([slot * self.ratio, positions])
            self.evicted[layer] = recent[:, :T].detach()
        self.states[layer] = recent[:, -M:].detach().to(self.states.dtype)
        return ctx, mask, positions

    def evicted_valid(self, n: int) -> torch.Tensor:
        """How many of the n positions a segment of n pushes out were real memories (a device scalar)."""
        return torch.clamp(self.valid + n - self.mem_len, 0, n)

    def compress(self, layer: int, compressor: nn.Module, attention_of, queries: torch.Tensor,
                 with_loss: bool) -> None:
        """Compress this layer's evicted positions into the compressed memory and, with_loss (training), add the
        reconstruction loss: attention_of(queries, keys_from, key_ok) is the layer's attention with detached
        projections."""
        evicted = self.evicted[layer]
        T = evicted.shape[1]
        squeezed = compressor(evicted)  # (B, T / ratio, D): gradients into the compressor only
        if with_loss:
            real = self.evicted_valid(T)
            key_ok = torch.arange(T, device=evicted.device) >= T - real  # the real ones are the newest
            slot_ok = torch.arange(T // self.ratio, device=evicted.device) * self.ratio >= T - real
            target = attention_of(queries, evicted, key_ok)
            loss = F.mse_loss(attention_of(queries, squeezed, slot_ok), target)
            self.recon = self.recon + torch.where(real > 0, loss, torch.zeros_like(loss))
        kept = torch.cat([self.compressed[layer], squeezed.detach().to(self.compressed.dtype)], dim=1)
        self.compressed[layer] = kept[:, -self.cmem_len:]

    def advance(self, n: int) -> None:
        """Every layer has stored the segment's n positions (and compressed what they pushed out)."""
        if self.cmem_len:
            self.cvalid.copy_(torch.clamp(self.cvalid + self.evicted_valid(n) // self.ratio, max=self.cmem_len))
        self.valid.copy_(torch.clamp(self.valid + n, max=self.mem_len))

    def take_loss(self) -> torch.Tensor:
        """The weighted reconstruction loss of the last training forward (zero without compression), cleared; the
        unweighted value stays in `last_recon` (detached) for the logs."""
        self.last_recon = self.recon.detach()
        loss, self.recon = self.recon * self.recon_weight, torch.zeros_like(self.recon)
        return loss

    def state_dict(self) -> dict:
        return {"states": self.states.detach().cpu().clone(), "valid": int(self.valid),
                "compressed": self.compressed.detach().cpu().clone(), "cvalid": int(self.cvalid),
                "previous_bytes": self.previous_bytes.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["states"].shape != self.states.shape or state["compressed"].shape != self.compressed.shape:
            raise ValueError(f"memory of shape {tuple(state['states'].shape)} does not fit {tuple(self.states.shape)}")
        self.states.copy_(state["states"])
        self.compressed.copy_(state["compressed"])
        self.valid.fill_(state["valid"])
        self.cvalid.fill_(state["cvalid"])
        if "previous_bytes" in state:  # checkpoints before model.ngram_max had none (and no n-grams to carry)
            self.previous_bytes.copy_(state["previous_bytes"])


class Compressor(nn.Module):
    """Rae et al.'s best compression function: a 1-D convolution over time, kernel = stride = ratio."""

    def __init__(self, d_model: int, ratio: int):
        super().__init__()
        self.conv = nn.Conv1d(d_model, d_model, kernel_size=ratio, stride=ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T / ratio, D)."""
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


def project_heads(weight: torch.Tensor, bias: torch.Tensor | None, queries: torch.Tensor, keys_from: torch.Tensor,
                  n_head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused qkv projection (rows q | k | v) applied with queries and keys/values from different inputs:
    q (B, H, Tq, hd) from queries, k and v (B, H, Tk, hd) from keys_from."""
    B, T, C = queries.shape
    q = F.linear(queries, weight[:C], None if bias is None else bias[:C]).view(B, T, n_head, -1).transpose(1, 2)
    kv = F.linear(keys_from, weight[C:], None if bias is None else bias[C:])
    k, v = (t.view(B, keys_from.shape[1], n_head, -1).transpose(1, 2) for t in kv.split(C, dim=2))  # as attention's
    return q, k, v


def detached_attention(qkv: nn.Linear, n_head: int, queries: torch.Tensor, keys_from: torch.Tensor,
                       key_ok: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v over keys_from (no causal mask: they all precede the queries), with the
    projection's weights detached: the reconstruction loss trains the compressor, never the attention."""
    bias = qkv.bias.detach() if qkv.bias is not None else None
    q, k, v = project_heads(qkv.weight.detach(), bias, queries, keys_from, n_head)
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~key_ok, -1e9)  # finite: a layer with nothing real evicted scores zero loss
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v
