"""Transformer-XL recurrence memory (Dai et al. 2019): each layer attends over [memory; current segment].

The memory of a batch of streams holds, per layer, the attention inputs (the normed residual stream entering the
layer's attention) of the last `mem_len` positions before the segment, detached: no gradient flows into earlier
segments, while the layer's current key/value projections are applied to it (as in Transformer-XL), so those
projections learn from the remembered positions too. Queries come from the segment only; the query at segment
position i sees every valid memory slot and segment positions 0..i (bottom-right causal over (T, mem_len + T)).

After `reset()` no slot is valid (masked out), so a stream's first segment is the plain causal model; slots become
valid as segments pass. Fixed shapes and a device-side count of valid slots: no host synchronisation and one
compiled graph for every step. Positions must be relative (RoPE): memory slot 0 is position 0, the segment starts
at mem_len.
"""
from __future__ import annotations

import torch

from model.config import ModelConfig


class SegmentMemory:
    def __init__(self, cfg: ModelConfig, batch: int, device, dtype=torch.float32, mem_len: int | None = None):
        """mem_len: slots per layer (default model.mem_len; evaluation may use more than training did)."""
        self.mem_len = cfg.mem_len if mem_len is None else mem_len
        if self.mem_len < 1:
            raise ValueError(f"a memory needs mem_len >= 1 (got {self.mem_len})")
        if cfg.absolute_positions:
            raise ValueError(f"model.pos_emb={cfg.pos_emb} gives absolute positions, which cannot index a memory; "
                             f"use model.pos_emb=rope")
        self.states = torch.zeros(cfg.n_layer, batch, self.mem_len, cfg.d_model, device=device, dtype=dtype)
        self.valid = torch.zeros((), dtype=torch.long, device=device)  # how many of the last slots are real

    def reset(self) -> None:
        """Forget everything (the streams restart): in place, on the device."""
        self.valid.zero_()

    def context(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D): this layer's attention input for the segment. Returns [memory; x] (B, mem_len + T, D) and
        the mask (T, mem_len + T) of what each query may attend; stores the last mem_len positions of [memory; x]
        as this layer's memory for the next segment."""
        T, M = x.shape[1], self.mem_len
        if x.shape[0] != self.states.shape[1]:
            raise ValueError(f"a batch of {x.shape[0]} streams does not fit a memory of {self.states.shape[1]}")
        ctx = torch.cat([self.states[layer].to(x.dtype), x], dim=1)
        key = torch.arange(M + T, device=x.device)
        query = key[M:]
        mask = (key[None, :] <= query[:, None]) & (key[None, :] >= M - self.valid)
        self.states[layer] = ctx[:, -M:].detach().to(self.states.dtype)
        return ctx, mask

    def advance(self, n: int) -> None:
        """Every layer has stored the segment's n positions."""
        self.valid.copy_(torch.clamp(self.valid + n, max=self.mem_len))

    def state_dict(self) -> dict:
        return {"states": self.states.detach().cpu().clone(), "valid": int(self.valid)}

    def load_state_dict(self, state: dict) -> None:
        if state["states"].shape != self.states.shape:
            raise ValueError(f"memory of shape {tuple(state['states'].shape)} does not fit {tuple(self.states.shape)}")
        self.states.copy_(state["states"])
        self.valid.fill_(state["valid"])
