"""SwiGLU: Triton kernels vs the eager and the torch.compile'd reference, bf16, forward and forward+backward,
on one packed gate+up tensor (as the model calls it), reported as GB/s of ideal traffic against the device's
measured copy bandwidth.

    pytest bench/bench_swiglu.py -s        (GPU; skipped without CUDA)
"""
import torch

from bench.timing import Case, measure, row_kernel_suite, row_kernel_test
from kernels import swiglu_packed
from kernels.reference import swiglu_packed_ref

IMPLS = {"triton": swiglu_packed, "eager": swiglu_packed_ref, "compiled": torch.compile(swiglu_packed_ref)}


def run_case(impl: str, rows: int, d: int, pass_: str, benchmark=None) -> dict:
    fn, backward, n = IMPLS[impl], pass_ == "fwd+bwd", rows * d * 2  # bytes of one bf16 (rows, d) tensor

    def make():
        gate_up = torch.randn(rows, 2 * d, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
        return gate_up, torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)

    def step(gate_up, dy):
        y = fn(gate_up)
        if backward:
            y.backward(dy)
    # ideal traffic: read gate and up, write y; the backward reads dy, gate, up and writes dgate, dup
    case = f"swiglu/{pass_}/{rows}x{d}"
    return measure(benchmark, step, make, traffic=n * (8 if backward else 3), input_bytes=4 * n,
                   name=f"{case}/{impl}", reference=f"{case}/compiled", dtype="bf16", shape=f"{rows}x{d}")


def suite() -> list[Case]:
    return row_kernel_suite(run_case, IMPLS)


test_swiglu = row_kernel_test(run_case, IMPLS)
