"""Multi-head cross-entropy (all intermediate and t+k heads of a step), forward + backward, D = 512, V = 256, at
T12's head layouts: H = 24 (11 intermediate layers x t+1, t+2, and the final t+1, t+2: two heads per hidden
state, the gemm variant's grouped layout) and H = 13 (intermediate t+1 only; the final t+1 and t+2 share a state).

- On any machine: the batched reference (`kernels.reference.multihead_cross_entropy_ref`, one bmm + one
  cross-entropy for all heads) against a Python loop of per-head matmul + cross-entropy (fp32 on a CPU, H = 13).
- On a GPU: both Triton variants (impl="gemm": batched matmuls around one row kernel; impl="fused": one kernel)
  against the batched reference, eager and torch.compile'd, bf16, N = 16x512 (a T12 step) and 64x512 positions:
  time and peak memory of the loss path (goal on an H100: >= 2x the compiled reference).

    pytest bench/bench_mhce.py -s
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from bench.timing import Case, case, needs_cuda, report, time_kernels
from kernels import multihead_cross_entropy
from kernels.reference import IGNORE_INDEX, multihead_cross_entropy_ref
from train.hardware import device_name

D, V = 512, 256
CPU_SIZES = [1024, 4096]  # positions, at H = 13
GPU_CASES = [(24, 16 * 512), (13, 16 * 512), (24, 64 * 512)]  # (heads, positions)


def per_head_loop(hidden, weight, targets, head_weights, source):
    total = hidden.new_zeros(())
    for h in range(weight.shape[0]):
        logits = hidden[source[h]] @ weight[h].t()
        total = total + head_weights[h] * F.cross_entropy(logits.float(), targets[h], ignore_index=IGNORE_INDEX)
    return total


IMPLS = {"loop": per_head_loop, "batched": multihead_cross_entropy_ref,
         "gemm": functools.partial(multihead_cross_entropy, impl="gemm"),
         "fused": functools.partial(multihead_cross_entropy, impl="fused"),
         "compiled": torch.compile(multihead_cross_entropy_ref)}


def make_inputs(n_heads: int, n_pos: int, device: str, dtype):
    """The model's layout: 12 hidden states (11 intermediate + final); 24 heads read two each, 13 heads one each
    but the last, which the final t+1 and t+2 heads share. `source` as a tuple, as the model passes it."""
    g = torch.Generator().manual_seed(0)
    n_sources = 12
    source = (tuple(s for s in range(n_sources) for _ in range(2)) if n_heads == 2 * n_sources
              else tuple(range(n_sources)) + (n_sources - 1,))
    hidden = torch.randn(n_sources, n_pos, D, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(n_heads, V, D, generator=g) * 0.02).to(device, dtype).requires_grad_()
    targets = torch.randint(0, V, (n_heads, n_pos), generator=g)
    targets[-1, -1] = IGNORE_INDEX
    return hidden, weight, targets.to(device), torch.ones(n_heads, device=device), source


def run_case(impl: str, n_pos: int, benchmark=None, n_heads: int = 13) -> dict:
    """Forward + backward of one implementation: seconds and (GPU) the peak memory it adds."""
    cuda = torch.cuda.is_available()
    hidden, weight, targets, hw, source = make_inputs(n_heads, n_pos, "cuda" if cuda else "cpu",
                                                      torch.bfloat16 if cuda else torch.float32)
    fn = IMPLS[impl]

    def step():
        fn(hidden, weight, targets, hw, source).backward()
        hidden.grad = weight.grad = None

    seconds, timing = time_kernels(step, [()], calls=10)
    case = f"mhce/H={n_heads}/N={n_pos}" if cuda else f"mhce/N={n_pos}"
    info = {"name": f"{case}/{impl}", "reference": f"{case}/{'compiled' if cuda else 'loop'}",
            "device": device_name(), "dtype": "bf16" if cuda else "fp32",
            "shape": f"H={n_heads} N={n_pos} D={D} V={V}",
            "seconds": seconds, "timing": timing}
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        info["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    if benchmark is not None:
        benchmark.pedantic(step, rounds=3, warmup_rounds=1)
        benchmark.extra_info.update(info)
    report(info)
    return info


GPU_IMPLS = ["compiled", "gemm", "fused", "batched"]  # the reference first


def suite() -> list[Case]:
    if torch.cuda.is_available():
        return [case(f"H={h}/N={n}/{impl}", run_case, impl, n, n_heads=h) for h, n in GPU_CASES for impl in GPU_IMPLS]
    return [case(f"N={CPU_SIZES[0]}/{impl}", run_case, impl, CPU_SIZES[0]) for impl in ["loop", "batched"]]


@pytest.mark.parametrize("n_pos", CPU_SIZES)
@pytest.mark.parametrize("impl", ["batched", "loop"])
def test_mhce_batched_vs_loop(benchmark, impl, n_pos):
    run_case(impl, n_pos, benchmark)


@needs_cuda
@pytest.mark.parametrize("n_heads, n_pos", GPU_CASES)
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_mhce_fwd_bwd_gpu(benchmark, impl, n_heads, n_pos):
    run_case(impl, n_pos, benchmark, n_heads)
