"""RMSNorm: Triton kernels vs the eager and the torch.compile'd reference, bf16, forward and forward+backward,
reported as GB/s of ideal traffic against the device's measured copy bandwidth.

    pytest bench/bench_rmsnorm.py -s       (GPU; skipped without CUDA)
"""
import functools

import pytest
import torch

from bench.gpu import copies, copy_bandwidth, needs_cuda, record, time_per_call
from kernels import rmsnorm
from kernels.reference import rmsnorm_ref

pytestmark = needs_cuda
IMPLS = {"triton": rmsnorm, "eager": rmsnorm_ref, "compiled": torch.compile(rmsnorm_ref)}


@functools.cache
def bandwidth() -> float:
    return copy_bandwidth()


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("rows, d", [(8192, 512), (8192, 2048), (32768, 512), (32768, 2048)])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_rmsnorm(benchmark, impl, rows, d, pass_):
    fn, elem = IMPLS[impl], 2  # bf16
    backward = pass_ == "fwd+bwd"

    def make():
        x = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
        w = torch.ones(d, device="cuda", requires_grad=backward)
        return x, w, torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)

    def step(x, w, dy):
        y = fn(x, w)
        if backward:
            y.backward(dy)
    # ideal traffic: read x, write y; the backward reads x and dy and writes dx
    traffic = rows * d * elem * (5 if backward else 2)
    seconds = time_per_call(step, copies(make, rows * d * elem * 3))
    benchmark.pedantic(step, args=make(), rounds=3, warmup_rounds=1)
    record(benchmark, device=torch.cuda.get_device_name(), dtype="bf16", shape=f"{rows}x{d}", impl=impl,
           pass_=pass_, us=seconds * 1e6, gbps=traffic / seconds / 1e9, of_copy=traffic / seconds / bandwidth())
