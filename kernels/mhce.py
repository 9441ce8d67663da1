"""Cross-entropy over all prediction and intermediate heads at once: loss, d(hidden), d(weight), d(bias).

    kernels.multihead_cross_entropy(hidden (S, N, D), weight (H, V, D), targets (H, N), head_weights (H,),
                                    source (H ints) = range(H), bias (H, V) = None, impl = "gemm" | "fused")
      = sum_h head_weights[h] * mean over valid n of CE(hidden[source[h], n] @ weight[h].T + bias[h], targets[h, n])

Algorithm, impl="gemm" (the default). Positions in chunks (a LOGITS_BUDGET_BYTES logits buffer): the logits of
every head by one batched matmul (when `source` is the model's layout, k heads per hidden state in order, the k
heads of a state are one classifier of k*V outputs: no gather of hidden states); _ce_rows_kernel turns a tile of
logits into per-position losses and, in place, d(logits) = (softmax - onehot) * weight / n_valid; then d(hidden) =
d(logits) @ W and d(weight) += d(logits)^T @ hidden by batched matmuls (cuBLAS). No atomics.
Algorithm, impl="fused". A grid of (position tiles x sources). A program takes BLOCK_N positions of one
hidden-state source and walks the heads that read that source, skipping heads whose weight is 0. Per head it
computes the BLOCK_N x V logits with tl.dot over D in BLOCK_D chunks, keeping them on chip; the log-sum-exp and the
target logit give the loss, one partial sum per (tile, head). With gradients, the same pass turns the logits into
d(logits), then d(hidden) tile = d(logits) @ W_h (owned by the program: stored by the first head, accumulated by
the others), and d(weight) partial = d(logits)^T @ hidden tile, atomically added into one of N_SLOTS fp32 copies
of d(weight); one torch sum reduces the copies. The logits never reach device memory.
Both: the backward only rescales the saved gradients by the upstream gradient; `source` is a host-side list of
ints (its tensor form costs a device read), so no step reads anything back from the device.
Limits. V <= 1024 (the whole vocabulary is one tile; charlm's is 256). fp32 and bf16 inputs (under autocast the
inputs are cast to the autocast dtype first, as the reference's bmm is); matmuls in the input dtype with fp32
accumulation (fused fp32: IEEE dots, not TF32); loss and d(weight) accumulated in fp32. fp16 is refused: d(logits)
are stored in the input dtype before the upstream gradient scales them, and at ~1e-7 they would underflow in fp16.
Gradients come out contiguous whatever the inputs' strides. Per-head losses of zero-weight heads are reported as 0.
Speed (H200, bf16, forward + backward, 2026-11-28): fused 4.43 ms at 13 heads x 8192 positions x D 512, 0.23x the
torch.compile'd reference (16.3 ms, 0.15x at 32768 positions): ~4e8 atomics and 32 x 16 tiles lose to cuBLAS.
gemm: not yet measured on a GPU (goal: >= 2x the compiled reference; bench/bench_mhce.py, 13 and 24 heads).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from kernels.reference import IGNORE_INDEX, multihead_cross_entropy_ref
from kernels.runtime import INTERPRET, TRITON_VERSION, device_ints, next_pow2, unit_stride, use_triton

N_SLOTS = 4  # fp32 copies of d(weight) that the tiles spread their partial sums over
LOGITS_BUDGET_BYTES = 64 << 20  # the gemm variant's logits buffer: positions are processed in chunks that fit
IMPLS = ("gemm", "fused")


# ------------------------------------------------------------------------------------------------ kernel
@triton.jit
def _mhce_kernel(X, W, B, T, HW, COUNT, HEAD_ORDER, SRC_START, LOSS_PART, DX, DW, DB,
                 N, D, V, n_heads, n_slots, stride_xs, stride_xn, stride_wh, stride_wv, stride_bh, stride_th,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                 NEED_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    src = tl.program_id(1)
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    vs = tl.arange(0, BLOCK_V)
    v_ok = vs < V
    ds = tl.arange(0, BLOCK_D)
    x_rows = X + src.to(tl.int64) * stride_xs + rows[:, None].to(tl.int64) * stride_xn
    dx_rows = DX + (src.to(tl.int64) * N + rows[:, None]) * D
    slot = tile % n_slots
    written = tl.zeros([], dtype=tl.int32)  # a run-time flag: has a head of this source stored d(hidden) yet?
    for i in range(tl.load(SRC_START + src), tl.load(SRC_START + src + 1)):
        h = tl.load(HEAD_ORDER + i)
        w_h = tl.load(HW + h).to(tl.float32)
        if w_h != 0.0:
            w_rows = W + h.to(tl.int64) * stride_wh + vs[:, None] * stride_wv
            tgt = tl.load(T + h.to(tl.int64) * stride_th + rows, mask=row_ok, other=-100)
            valid = row_ok & (tgt != -100)
            logits = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d_ok = (d0 + ds) < D
                x = tl.load(x_rows + (d0 + ds)[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                w = tl.load(w_rows + (d0 + ds)[None, :], mask=v_ok[:, None] & d_ok[None, :], other=0.0)
                logits = tl.dot(x, tl.trans(w).to(x.dtype), logits, input_precision=DOT_PRECISION)
            if HAS_BIAS:
                logits += tl.load(B + h.to(tl.int64) * stride_bh + vs, mask=v_ok, other=0.0).to(tl.float32)[None, :]
            logits = tl.where(v_ok[None, :], logits, float("-inf"))
            row_max = tl.max(logits, axis=1)
            tgt_logit = tl.sum(tl.where(vs[None, :] == tgt[:, None], logits, 0.0), axis=1)
            p = tl.exp(logits - row_max[:, None])  # logits are dead from here on: p takes their registers
            z = tl.sum(p, axis=1)
            nll = tl.where(valid, row_max + tl.log(z) - tgt_logit, 0.0)
            tl.store(LOSS_PART + tile * n_heads + h, tl.sum(nll, axis=0))
            if NEED_GRAD:
                coef = tl.where(valid, w_h / tl.maximum(tl.load(COUNT + h), 1).to(tl.float32), 0.0)
                dlogits = p * (coef / z)[:, None] - tl.where(vs[None, :] == tgt[:, None], coef[:, None], 0.0)
                if HAS_BIAS:
                    tl.atomic_add(DB + (slot * n_heads + h) * V + vs, tl.sum(dlogits, axis=0), mask=v_ok)
                dl = dlogits.to(X.dtype.element_ty)
                dw_rows = DW + ((slot * n_heads + h).to(tl.int64) * V + vs[:, None]) * D
                for d0 in range(0, D, BLOCK_D):
                    d_ok = (d0 + ds) < D
                    w = tl.load(w_rows + (d0 + ds)[None, :], mask=v_ok[:, None] & d_ok[None, :], other=0.0)
                    dx = tl.dot(dl, w.to(dl.dtype), input_precision=DOT_PRECISION)
                    m = row_ok[:, None] & d_ok[None, :]
                    if written:
                        dx += tl.load(dx_rows + (d0 + ds)[None, :], mask=m, other=0.0).to(tl.float32)
                    tl.store(dx_rows + (d0 + ds)[None, :], dx.to(DX.dtype.element_ty), mask=m)
                    x = tl.load(x_rows + (d0 + ds)[None, :], mask=m, other=0.0)
                    dw = tl.dot(tl.trans(dl), x, input_precision=DOT_PRECISION)
                    tl.atomic_add(dw_rows + (d0 + ds)[None, :], dw, mask=v_ok[:, None] & d_ok[None, :])
                written = 1
    if NEED_GRAD:
        if written == 0:  # no head with a weight reads this source: its gradient is zero
            for d0 in range(0, D, BLOCK_D):
                m = row_ok[:, None] & ((d0 + ds) < D)[None, :]
                tl.store(dx_rows + (d0 + ds)[None, :], tl.zeros([BLOCK_N, BLOCK_D], dtype=DX.dtype.element_ty),
                         mask=m)

@triton.jit
def _ce_rows_kernel(LOGITS, B, T, COEF, NLL, n_pos, V, heads_per_source, stride_ls, stride_ln, stride_bh, stride_th,
                    stride_nll, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, HAS_BIAS: tl.constexpr,
                    NEED_GRAD: tl.constexpr):
    """The gemm variant's middle step, for BLOCK_R positions of head h: logits (computed by a batched matmul) ->
    per-position loss, and d(logits) written over the logits in place."""
    h = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_pos
    vs = tl.arange(0, BLOCK_V)
    v_ok = vs < V
    ptrs = (LOGITS + (h // heads_per_source).to(tl.int64) * stride_ls + (h % heads_per_source) * V
            + rows[:, None].to(tl.int64) * stride_ln + vs[None, :])
    m = row_ok[:, None] & v_ok[None, :]
    logits = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        logits += tl.load(B + h * stride_bh + vs, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    logits = tl.where(v_ok[None, :], logits, float("-inf"))
    tgt = tl.load(T + h.to(tl.int64) * stride_th + rows, mask=row_ok, other=-100)
    valid = row_ok & (tgt != -100)
    row_max = tl.max(logits, axis=1)
    is_tgt = vs[None, :] == tgt[:, None]
    tgt_logit = tl.sum(tl.where(is_tgt, logits, 0.0), axis=1)
    p = tl.exp(logits - row_max[:, None])
    z = tl.sum(p, axis=1)
    tl.store(NLL + h * stride_nll + rows, tl.where(valid, row_max + tl.log(z) - tgt_logit, 0.0), mask=row_ok)
    if NEED_GRAD:
        coef = tl.where(valid, tl.load(COEF + h), 0.0)
        dlogits = p * (coef / z)[:, None] - tl.where(is_tgt, coef[:, None], 0.0)
        tl.store(ptrs, dlogits.to(LOGITS.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------------------------ launchers
def launch_config(V: int, dtype: torch.dtype, interpret: bool = INTERPRET,
                  triton_version: tuple[int, int] = TRITON_VERSION) -> dict:
    """The whole vocabulary per tile, 8 warps, 2 pipeline stages, 32 positions (16 for fp32 inputs or V > 256) and
    D in chunks of 16: the largest tiles that compile without spills for sm_80 and sm_90a at V = 256 (kernels.aot;
    64 x 64 tiles, or 3 stages in fp32, spill). fp32 (IEEE dots on the FMA units) sits at the 255-register limit
    with chunks of 16, and triton 3.9 spills there on sm_90a (40 bytes of stack); triton >= 3.8 accepts fp32 dots
    with K = 8, and chunks of 8 need 128-184 registers, so fp32 takes chunks of 8 where the compiler allows them
    (measured with kernels.aot on triton 3.6.0, 3.7.1, 3.8.0 and 3.9.0). Under the interpreter larger tiles, since
    every program instance costs milliseconds."""
    block_v = max(16, next_pow2(V))
    if interpret:
        return {"BLOCK_N": 64, "BLOCK_V": block_v, "BLOCK_D": 64, "num_warps": 4}
    wide = block_v > 256 or dtype == torch.float32
    block_d = 8 if dtype == torch.float32 and triton_version >= (3, 8) else 16
    return {"BLOCK_N": 16 if wide else 32, "BLOCK_V": block_v, "BLOCK_D": block_d, "num_warps": 8, "num_stages": 2}


def mhce_fwd(hidden, weight, targets, head_weights, source, bias, need_grad: bool):
    """(loss, per-head mean CE, d(hidden), d(weight), d(bias)) with gradients of the loss (empty tensors when
    need_grad is False or there is no bias)."""
    S, N, D = hidden.shape
    H, V, _ = weight.shape
    if V > 1024:
        raise ValueError(f"multihead_cross_entropy supports a vocabulary of up to 1024 (got {V})")
    hidden, weight = unit_stride(hidden), unit_stride(weight)
    targets = targets.contiguous()
    dev = hidden.device
    counts = (targets != IGNORE_INDEX).sum(1).to(torch.int32)
    order = device_ints(sorted(range(H), key=lambda h: source[h]), dev, torch.int32)  # the heads, source by source
    src_start = device_ints([sum(s < src for s in source) for src in range(S + 1)], dev, torch.int32)
    cfg = launch_config(V, hidden.dtype)
    n_tiles = triton.cdiv(N, cfg["BLOCK_N"])
    n_slots = min(N_SLOTS, n_tiles)
    loss_part = torch.zeros((n_tiles, H), dtype=torch.float32, device=dev)
    def empty():  # a distinct placeholder each time: custom op outputs must not alias one another
        return torch.empty(0, dtype=hidden.dtype, device=dev)
    dx = torch.empty(hidden.shape, dtype=hidden.dtype, device=dev) if need_grad else empty()  # contiguous
    dw = torch.zeros((n_slots, H, V, D), dtype=torch.float32, device=dev) if need_grad else empty()
    db = torch.zeros((n_slots, H, V), dtype=torch.float32, device=dev) if need_grad and bias is not None else empty()
    b = bias if bias is not None else empty()
    _mhce_kernel[(n_tiles, S)](
        hidden, weight, b, targets, head_weights, counts, order, src_start, loss_part, dx, dw, db,
        N, D, V, H, n_slots, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        b.stride(0) if bias is not None else 0, targets.stride(0),
        HAS_BIAS=bias is not None, NEED_GRAD=need_grad,
        DOT_PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32", **cfg)
    per_head = loss_part.sum(0) / counts.clamp_min(1)
    loss = (head_weights.float() * per_head).sum()
    if need_grad:
        dw = dw.sum(0).to(weight.dtype)
        db = db.sum(0).to(bias.dtype) if bias is not None else db
    return loss, per_head, dx, dw, db


def gemm_launch_config(V: int, interpret: bool = INTERPRET) -> dict:
    """The gemm variant's row kernel: the whole vocabulary per program, 4096 logits a tile (16 positions at V = 256)
    over 8 warps: 16 values a thread (32 spill on sm_80 and sm_90a: kernels.aot). 64 positions under the
    interpreter, where programs are what costs."""
    block_v = max(16, next_pow2(V))
    return {"BLOCK_R": 64 if interpret else max(1, 4096 // block_v), "BLOCK_V": block_v, "num_warps": 8}


def heads_per_source(source: Sequence[int], n_sources: int) -> int:
    """k when `source` is [0]*k + [1]*k + ... + [S-1]*k (the heads of a source adjacent, every source read by k
    heads), else 0. Then the gemm variant treats the k heads of a source as one classifier of k*V outputs: no
    gather of hidden states, no scatter of their gradients."""
    k = len(source) // n_sources if n_sources else 0
    return k if k and list(source) == [s for s in range(n_sources) for _ in range(k)] else 0


def mhce_gemm_fwd(hidden, weight, targets, head_weights, source, bias, need_grad: bool, group: int):
    """The gemm variant of mhce_fwd (same outputs): per chunk of positions, logits by a batched matmul, loss and
    d(logits) by _ce_rows_kernel in place, then d(hidden) = d(logits) @ W and d(weight) += d(logits)^T @ hidden by
    batched matmuls. group = heads_per_source(source) (0: hidden gathered per head, d(hidden) scattered back)."""
    S, N, D = hidden.shape
    H, V, _ = weight.shape
    dev, dtype = hidden.device, hidden.dtype
    targets = targets.contiguous()
    n_mm, width = (S, group * V) if group else (H, V)  # batch and output width of the matmuls
    w_mm = weight.reshape(n_mm, width, D)
    n_valid = (targets != IGNORE_INDEX).sum(1).clamp_min(1)
    coef = head_weights.float() / n_valid
    gather = None if group else device_ints(source, dev)  # hidden row of each head, when not grouped
    chunk = LOGITS_BUDGET_BYTES // (H * V * hidden.element_size())
    chunk = max(1, min(N, chunk // 128 * 128 if chunk >= 128 else chunk))  # whole 128-row tiles for the matmuls
    buffer = torch.empty(n_mm * chunk * width, dtype=dtype, device=dev)
    nll = torch.empty((H, N), dtype=torch.float32, device=dev)
    dx = dw = db = None
    if need_grad and not group:
        dx = torch.zeros((S, N, D), dtype=dtype, device=dev)
    elif need_grad and N > chunk:
        dx = torch.empty((S, N, D), dtype=dtype, device=dev)
    cfg = gemm_launch_config(V)
    for start in range(0, N, chunk):
        n = min(chunk, N - start)
        x = hidden[:, start:start + n]
        x = x if group else x.index_select(0, gather)
        logits = torch.bmm(x, w_mm.transpose(1, 2), out=buffer[:n_mm * n * width].view(n_mm, n, width))
        _ce_rows_kernel[(triton.cdiv(n, cfg["BLOCK_R"]), H)](
            logits, bias if bias is not None else logits, targets[:, start:], coef, nll[:, start:], n, V,
            max(group, 1), logits.stride(0), logits.stride(1), bias.stride(0) if bias is not None else 0,
            targets.stride(0), nll.stride(0), HAS_BIAS=bias is not None,
            NEED_GRAD=need_grad, **cfg)
        if not need_grad:
            continue
        dx_part = torch.bmm(logits, w_mm)  # logits now hold d(logits)
        if not group:
            dx[:, start:start + n].index_add_(0, gather, dx_part)
        elif n == N:
            dx = dx_part
        else:
            dx[:, start:start + n] = dx_part
        dw_part = torch.bmm(logits.transpose(1, 2), x)
        dw = dw_part.float() if dw is None else dw.add_(dw_part)
        if bias is not None:
            db_part = logits.sum(1, dtype=torch.float32)
            db = db_part if db is None else db.add_(db_part)
    per_head = torch.where(head_weights != 0, nll.sum(1) / n_valid, 0.0)
    loss = (head_weights.float() * per_head).sum()
    empty = lambda: torch.empty(0, dtype=dtype, device=dev)  # distinct placeholders: outputs must not alias
    dx = dx if dx is not None else empty()
    dw = dw.to(weight.dtype).view(H, V, D) if dw is not None else empty()
    db = db.to(bias.dtype).view(H, V) if db is not None else empty()
    return loss, per_head, dx, dw, db


# ------------------------------------------------------------------------------------------------ torch.library
@torch.library.custom_op("charlm::multihead_cross_entropy", mutates_args=())
def _mhce_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, head_weights: torch.Tensor,
             source: list[int], bias: Optional[torch.Tensor], need_grad: bool, impl: str
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if impl == "gemm":
        group = heads_per_source(source, hidden.shape[0])
        return mhce_gemm_fwd(hidden, weight, targets, head_weights, source, bias, need_grad, group)
    return mhce_fwd(hidden, weight, targets, head_weights, source, bias, need_grad)


@_mhce_op.register_fake
def _(hidden, weight, targets, head_weights, source, bias, need_grad, impl):
    f32 = dict(dtype=torch.float32, device=hidden.device)
    # contiguous gradients, as mhce_fwd makes them (empty_like would keep a permuted input's strides)
    return (torch.empty((), **f32), torch.empty(weight.shape[0], **f32),
            hidden.new_empty(hidden.shape) if need_grad else hidden.new_empty(0),
            weight.new_empty(weight.shape) if need_grad else hidden.new_empty(0),
            bias.new_empty(bias.shape) if need_grad and bias is not None else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    _, _, dx, dw, db = output
    ctx.has_bias = inputs[5] is not None
    ctx.save_for_backward(dx, dw, db)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, g_loss, _g_per_head, _gdx, _gdw, _gdb):
    dx, dw, db = ctx.saved_tensors
    if dx.numel() == 0 and dw.numel() == 0:
        raise RuntimeError("multihead_cross_entropy ran without gradients (need_grad=False) but was differentiated")
    return (dx * g_loss.to(dx.dtype), dw * g_loss.to(dw.dtype), None, None, None,
            db * g_loss.to(db.dtype) if ctx.has_bias else None, None, None)


torch.library.register_autograd("charlm::multihead_cross_entropy", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ public
def multihead_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            head_weights: torch.Tensor, source: torch.Tensor | Sequence[int] | None = None,
                            bias: torch.Tensor | None = None, return_per_head: bool = False, impl: str = "gemm"):
    """sum_h head_weights[h] * mean CE of head h (see the module docstring); with return_per_head also the (H,)
    per-head mean CE (detached; 0 for heads of weight 0). impl: "gemm" (batched matmuls around one Triton kernel)
    or "fused" (one Triton kernel). `source`: a sequence of ints (a tensor works too, but is read back to the host:
    one synchronisation per call, and no torch.compile fullgraph). Where Triton cannot run:
    `kernels.reference.multihead_cross_entropy_ref`."""
    if impl not in IMPLS:
        raise ValueError(f"multihead_cross_entropy: impl must be one of {', '.join(IMPLS)} (got {impl!r})")
    if not use_triton(hidden):
        return multihead_cross_entropy_ref(hidden, weight, targets, head_weights, source, bias, return_per_head)
    device_type = hidden.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if torch.float16 in (hidden.dtype, torch.get_autocast_dtype(device_type) if autocast else None):
        raise ValueError("multihead_cross_entropy does not take fp16: its d(logits), ~1e-7 at typical batch sizes, "
                         "would underflow in fp16 before the upstream gradient scales them; use bf16 or fp32")
    n_sources, n_heads = hidden.shape[0], weight.shape[0]
    if source is None:
        if n_sources != n_heads:
            raise ValueError(f"hidden has {n_sources} sources for {n_heads} heads; pass `source`")
        source = range(n_heads)
    source = source.tolist() if torch.is_tensor(source) else [int(s) for s in source]
    if autocast:  # run the matmuls in the autocast dtype, as the reference's bmm does
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    bias = unit_stride(bias) if bias is not None else None
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    loss, per_head, *_ = _mhce_op(hidden, weight, targets, head_weights, source, bias, need_grad, impl)
    return (loss, per_head) if return_per_head else loss
