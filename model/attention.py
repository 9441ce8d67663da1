"""Attention backends, chosen by model.attention; all take q, k, v as (B, H, T, hd).

- math:  the explicit reference, softmax(q k^T / sqrt(hd) + mask) v, softmax in fp32 (or fp64);
- sdpa:  torch.nn.functional.scaled_dot_product_attention;
- flash: flash-attn's flash_attn_func (the `flash` extra) on CUDA in fp16/bf16. Where it cannot run (not
         installed, no GPU, fp32 inputs, an explicit mask) it falls back to sdpa, with one logged warning.

`mask` is None for plain causal attention over equal-length q and k, else a boolean (Tq, Tk) tensor (or one per
head), True where a query may attend (the KV cache's sliding window, sparse patterns). Values may be wider or
narrower than queries and keys (differential attention, MLA); sdpa and flash get equal widths
(`with_equal_widths`): their fused kernels need them.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger("charlm")
_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def attend_math(q, k, v, mask=None, dropout: float = 0.0):
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax in fp32 (fp64 for fp64 inputs)
    scores = (q @ k.transpose(-2, -1)).to(acc) / math.sqrt(q.shape[-1])
    if mask is None:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).to(v.dtype)
    if dropout:
        probs = F.dropout(probs, dropout)
    return probs @ v


def with_equal_widths(fn):
    """`fn` for kernels that need values as wide as queries and keys: wider values go through in slices of that
    width (one call each, outputs concatenated; with attention dropout each slice draws its own mask), narrower
    ones padded with zeros (the padding sliced off the output)."""
    def attend(q, k, v, mask=None, dropout: float = 0.0):
        width, v_width = q.shape[-1], v.shape[-1]
        if v_width == width:
            return fn(q, k, v, mask, dropout)
        if v_width < width:
            return fn(q, k, F.pad(v, (0, width - v_width)), mask, dropout)[..., :v_width]
        return torch.cat([attend(q, k, part, mask, dropout) for part in v.split(width, dim=-1)], dim=-1)
    return attend


@with_equal_widths  # values of another width send sdpa to its slow math path (measured on a CPU: 23x)
def attend_sdpa(q, k, v, mask=None, dropout: float = 0.0):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout)


def make_flash(fn):
    """The flash backend around flash-attn's flash_attn_func; sdpa where flash-attn cannot run."""
    @with_equal_widths
    def attend_flash(q, k, v, mask=None, dropout: float = 0.0):
        if mask is not None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
            warn_once("model.attention=flash needs CUDA fp16/bf16 inputs and no explicit mask; using sdpa there")
            return attend_sdpa(q, k, v, mask, dropout)
        out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout, causal=True)
        return out.transpose(1, 2)
    return attend_flash


def resolve(name: str):
    """The attention function for model.attention=name (flash falls back to sdpa when flash-attn is missing)."""
    if name != "flash":
        return {"math": attend_math, "sdpa": attend_sdpa}[name]
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        warn_once("model.attention=flash: flash-attn is not installed (pip install -e '.[flash]'); using sdpa")
        return attend_sdpa
    return make_flash(flash_attn_func)
