"""LayerNorm (with a bias, as T12 uses it): Triton kernels vs the eager and the torch.compile'd reference, bf16,
forward and forward+backward, reported as GB/s of ideal traffic against the device's measured copy bandwidth.

    pytest bench/bench_layernorm.py -s       (GPU; skipped without CUDA)
"""
import torch

from bench.timing import Case, measure, row_kernel_suite, row_kernel_test
from kernels import layernorm
from kernels.reference import layernorm_ref

IMPLS = {"triton": layernorm, "eager": layernorm_ref, "compiled": torch.compile(layernorm_ref)}


def run_case(impl: str, rows: int, d: int, pass_: str, benchmark=None) -> dict:
    fn, backward, n = IMPLS[impl], pass_ == "fwd+bwd", rows * d * 2  # bytes of one bf16 activation

    def make():
        x = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
        w = torch.ones(d, device="cuda", requires_grad=backward)
        b = torch.zeros(d, device="cuda", requires_grad=backward)
        return x, w, b, torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)

    def step(x, w, b, dy):
        y = fn(x, w, b)
        if backward:
            y.backward(dy)
    # ideal traffic: read x, write y; the backward reads x and dy and writes dx
    case = f"layernorm/{pass_}/{rows}x{d}"
    return measure(benchmark, step, make, traffic=n * (5 if backward else 2), input_bytes=3 * n,
                   name=f"{case}/{impl}", reference=f"{case}/compiled", dtype="bf16", shape=f"{rows}x{d}")


def suite() -> list[Case]:
    return row_kernel_suite(run_case, IMPLS)


test_layernorm = row_kernel_test(run_case, IMPLS)
