"""The math of every charlm op in plain PyTorch: the spec that the Triton kernels are tested against.

These run on any device and are what the model uses with `model.kernels=torch` (the default).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from kernels.runtime import device_ints

IGNORE_INDEX = -100


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(mean(x*x, -1) + eps) * weight, statistics in fp32 (fp64 for fp64 inputs), output in x's dtype."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xa = x.to(acc)
    y = xa * torch.rsqrt(xa.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(acc)).to(x.dtype)


def layernorm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  eps: float = 1e-5) -> torch.Tensor:
    """(x - mean) * rsqrt(var + eps) * weight (+ bias) over the last dimension (biased variance), statistics in fp32,
    output in x's dtype."""
    y = F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float() if bias is not None else None, eps)
    return y.to(x.dtype)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise."""
    return F.silu(gate) * up


def swiglu_packed_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """swiglu of the two halves of the last dimension: (.., 2F) -> (.., F)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu_ref(gate, up)


def multihead_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    head_weights: torch.Tensor,
    source: torch.Tensor | Sequence[int] | None = None,
    bias: torch.Tensor | None = None,
    return_per_head: bool = False,
):
    """Cross-entropy of H linear classifier heads in one batched computation.

    hidden (S, N, D): S distinct hidden-state sources; weight (H, V, D) and bias (H, V): each head's classifier;
    targets (H, N) int64, IGNORE_INDEX = no target; head_weights (H,); source (H,) int64 (a tensor or a
    sequence): the row of `hidden` that head h reads (default: arange, S == H).

    Returns the scalar sum_h head_weights[h] * mean over valid n of CE_h(n) (fp32; fp64 for fp64 inputs), and
    with return_per_head also the (H,) unweighted per-head means. A head without any valid target contributes 0.
    """
    n_heads, n_pos = targets.shape
    if source is None:
        if hidden.shape[0] != n_heads:
            raise ValueError(f"hidden has {hidden.shape[0]} sources for {n_heads} heads; pass `source`")
        x = hidden
    else:
        x = hidden.index_select(0, source if torch.is_tensor(source) else device_ints(source, hidden.device))
    logits = torch.bmm(x, weight.transpose(1, 2))  # (H, N, V)
    if bias is not None:
        logits = logits + bias.unsqueeze(1)
    acc = torch.promote_types(logits.dtype, torch.float32)  # fp32 accumulation for bf16/fp16 inputs
    nll = F.cross_entropy(logits.to(acc).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none").view(n_heads, n_pos)
    count = (targets != IGNORE_INDEX).sum(-1).clamp_min(1)
    per_head = nll.sum(-1) / count
    loss = (head_weights.to(acc) * per_head).sum()
    return (loss, per_head) if return_per_head else loss
