"""Fused LayerNorm, forward and backward: y = (x - mean(x)) * rsqrt(var(x) + eps) * w (+ b) over the last dimension.

Algorithm. Forward: each program normalises a tile of BLOCK_M whole rows, statistics in fp32 (the variance from the
centred values, not E[x^2] - E[x]^2), and stores y (x's dtype) plus one fp32 mean and rstd per row for the
backward. Backward: a persistent grid; each program walks its share of row tiles and writes
dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w, xhat = (x - mean) * rstd, keeping its partial
sums of dw = sum(dy * xhat) and db = sum(dy) over its rows in registers; one torch sum reduces the
(programs x n_cols) partials: no atomics.
Limits. A row is one block: up to MAX_COLS = 4096 columns (wider rows run the reference, `F.layer_norm`). fp32,
bf16 and fp16 inputs; weight and bias of any float dtype; statistics and accumulation in fp32. The weight is
required (LayerNorm as the model uses it: elementwise affine), the bias optional.
Speed. Not yet measured on a GPU (bench/bench_layernorm.py: the rmsnorm kernels' goals, >= 80% of copy bandwidth
on an H100 and never slower than the torch.compile'd reference).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kernels.reference import layernorm_ref
from kernels.runtime import INTERPRET, as_rows, next_pow2, num_programs, use_triton

MAX_COLS = 4096


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _layernorm_fwd_kernel(X, W, B, Y, MEAN, RSTD, n_rows, n_cols, stride_x, stride_y, eps,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    xc = tl.where(col_ok[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
    y = xc * rstd[:, None] * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None].to(tl.int64) * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _layernorm_bwd_kernel(DY, X, W, MEAN, RSTD, DX, DW_PART, DB_PART, n_rows, n_cols, stride_dy, stride_x, stride_dx,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for tile in range(pid, tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = rows[:, None].to(tl.int64)
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        mean_g = tl.sum(g, axis=1) / n_cols
        mean_gx = tl.sum(g * xhat, axis=1) / n_cols
        dx = (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None]
        tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        if HAS_BIAS:
            db += tl.sum(dy, axis=0)
    tl.store(DW_PART + pid.to(tl.int64) * n_cols + cols, dw, mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_PART + pid.to(tl.int64) * n_cols + cols, db, mask=col_ok)


# ------------------------------------------------------------------------------------------------ launchers
def launch_config(n_cols: int, interpret: bool = INTERPRET) -> dict:
    """The whole row in one block, ~4096 elements a tile on a GPU (8 warps from 4096 up); 64-row tiles under the
    interpreter, where every program instance costs milliseconds. (8192-wide rows spill in the backward on sm_90a,
    with 8 or 16 warps: kernels.aot; hence MAX_COLS.)"""
    bn = next_pow2(n_cols)
    bm = 64 if interpret else max(1, min(16, 4096 // bn))
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": 8 if bm * bn >= 4096 else 4}


def layernorm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float):
    """(y, mean, rstd) for x of any leading shape; mean and rstd are fp32 with x's leading shape."""
    x2 = as_rows(x)
    n_rows, n_cols = x2.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    cfg = launch_config(n_cols)
    _layernorm_fwd_kernel[(triton.cdiv(n_rows, cfg["BLOCK_M"]),)](
        x2, weight, bias if bias is not None else weight, y, mean, rstd, n_rows, n_cols, x2.stride(0), y.stride(0),
        eps, HAS_BIAS=bias is not None, **cfg)
    return y.view(x.shape), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


def layernorm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                  has_bias: bool):
    """(dx, dweight, dbias) of layernorm_fwd; dbias is an empty tensor without a bias."""
    x2, dy2 = as_rows(x), as_rows(dy)
    n_rows, n_cols = x2.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    cfg = launch_config(n_cols)
    n_prog = max(1, min(triton.cdiv(n_rows, cfg["BLOCK_M"]), num_programs(x.device)))
    dw_part = torch.empty((n_prog, n_cols), dtype=torch.float32, device=x.device)
    db_part = torch.empty((n_prog if has_bias else 0, n_cols), dtype=torch.float32, device=x.device)
    _layernorm_bwd_kernel[(n_prog,)](dy2, x2, weight, mean.reshape(-1), rstd.reshape(-1), dx, dw_part, db_part,
                                     n_rows, n_cols, dy2.stride(0), x2.stride(0), dx.stride(0), HAS_BIAS=has_bias,
                                     **cfg)
    return dx.view(x.shape), dw_part.sum(0).to(weight.dtype), db_part.sum(0)


# ------------------------------------------------------------------------------------------------ torch.library
@torch.library.custom_op("charlm::layernorm", mutates_args=())
def _layernorm_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layernorm_fwd(x, weight, bias, eps)


@_layernorm_op.register_fake
def _(x, weight, bias, eps):  # contiguous, as the kernel writes them (not empty_like: that keeps x's strides)
    stats = dict(dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], **stats), x.new_empty(x.shape[:-1], **stats)


@torch.library.custom_op("charlm::layernorm_backward", mutates_args=())
def _layernorm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                           rstd: torch.Tensor, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layernorm_bwd(dy, x, weight, mean, rstd, has_bias)


@_layernorm_backward_op.register_fake
def _(dy, x, weight, mean, rstd, has_bias):
    return (x.new_empty(x.shape), weight.new_empty(weight.shape),
            x.new_empty(x.shape[-1] if has_bias else 0, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(x, weight, output[1], output[2])


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    has_bias = ctx.bias_dtype is not None
    dx, dw, db = _layernorm_backward_op(dy.contiguous(), x, weight, mean, rstd, has_bias)
    return dx, dw, db.to(ctx.bias_dtype) if has_bias else None, None


torch.library.register_autograd("charlm::layernorm", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ public
def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              eps: float = 1e-5) -> torch.Tensor:
    """(x - mean) * rsqrt(var + eps) * weight (+ bias) over the last dimension: the Triton kernels where they can
    run (rows up to MAX_COLS wide), else the reference."""
    if not use_triton(x) or x.shape[-1] > MAX_COLS:
        return layernorm_ref(x, weight, bias, eps)
    return _layernorm_op(x, weight, bias, eps)[0]
