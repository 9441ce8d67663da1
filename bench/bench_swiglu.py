"""SwiGLU: Triton kernels vs the eager and the torch.compile'd reference, bf16, forward and forward+backward,
on one packed gate+up tensor (as the model calls it), reported as GB/s of ideal traffic against the
device's measured copy bandwidth.

    pytest bench/bench_swiglu.py -s        (GPU; skipped without CUDA)
"""
import functools

import pytest
import torch

from bench.gpu import copies, copy_bandwidth, needs_cuda, record, time_per_call
from kernels import swiglu_packed
from kernels.reference import swiglu_packed_ref

pytestmark = needs_cuda
IMPLS = {"triton": swiglu_packed, "eager": swiglu_packed_ref, "compiled": torch.compile(swiglu_packed_ref)}


@functools.cache
def bandwidth() -> float:
    return copy_bandwidth()


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("rows, d", [(8192, 512), (8192, 2048), (32768, 512), (32768, 2048)])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_swiglu(benchmark, impl, rows, d, pass_):
    fn, elem = IMPLS[impl], 2  # bf16
    backward = pass_ == "fwd+bwd"

    def make():
        gate_up = torch.randn(rows, 2 * d, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
        return gate_up, torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)

    def step(gate_up, dy):
        y = fn(gate_up)
        if backward:
            y.backward(dy)
    # ideal traffic: read gate and up, write y; the backward reads dy, gate, up and writes dgate, dup
    traffic = rows * d * elem * (8 if backward else 3)
    seconds = time_per_call(step, copies(make, rows * d * elem * 4))
    benchmark.pedantic(step, args=make(), rounds=3, warmup_rounds=1)
    record(benchmark, device=torch.cuda.get_device_name(), dtype="bf16", shape=f"{rows}x{d}", impl=impl,
           pass_=pass_, us=seconds * 1e6, gbps=traffic / seconds / 1e9, of_copy=traffic / seconds / bandwidth())
