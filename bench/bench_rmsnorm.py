"""RMSNorm: Triton kernels vs the eager and the torch.compile'd reference, bf16, forward and forward+backward,
reported as GB/s of ideal traffic against the device's measured copy bandwidth.

    pytest bench/bench_rmsnorm.py -s       (GPU; skipped without CUDA)
"""
import pytest
import torch

from bench.gpu import SHAPES, measure, needs_cuda
from kernels import rmsnorm
from kernels.reference import rmsnorm_ref

pytestmark = needs_cuda
IMPLS = {"triton": rmsnorm, "eager": rmsnorm_ref, "compiled": torch.compile(rmsnorm_ref)}


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("rows, d", SHAPES)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_rmsnorm(benchmark, impl, rows, d, pass_):
    fn, backward, n = IMPLS[impl], pass_ == "fwd+bwd", rows * d * 2  # bytes of one bf16 activation

    def make():
        x = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
        w = torch.ones(d, device="cuda", requires_grad=backward)
        return x, w, torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)

    def step(x, w, dy):
        y = fn(x, w)
        if backward:
            y.backward(dy)
    # ideal traffic: read x, write y; the backward reads x and dy and writes dx
    measure(benchmark, step, make, traffic=n * (5 if backward else 2), input_bytes=3 * n, dtype="bf16",
            shape=f"{rows}x{d}", impl=impl, pass_=pass_)
