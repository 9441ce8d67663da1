"""Multi-head cross-entropy (all intermediate and t+k heads of a step), forward + backward, at T12's heads
(H = 13: 11 intermediate heads + t+1 + t+2 sharing the final hidden state), D = 512, V = 256.

- On any machine: the batched reference (`kernels.reference.multihead_cross_entropy_ref`, one bmm + one
  cross-entropy for all heads) against a Python loop of per-head matmul + cross-entropy (fp32 on a CPU).
- On a GPU: the fused Triton op against the batched reference, eager and torch.compile'd, bf16, N = 16x512 and
  64x512 positions: time and peak memory of the loss path (goal on an H100: >= 2x the compiled reference and
  <= 1/10 of its memory).

    pytest bench/bench_mhce.py -s
"""
import pytest
import torch
import torch.nn.functional as F

from bench.timing import device_name, needs_cuda, report, time_per_call
from kernels import multihead_cross_entropy
from kernels.reference import IGNORE_INDEX, multihead_cross_entropy_ref

H, D, V = 13, 512, 256
CPU_SIZES, GPU_SIZES = [1024, 4096], [16 * 512, 64 * 512]


def per_head_loop(hidden, weight, targets, head_weights, source):
    total = hidden.new_zeros(())
    for h in range(weight.shape[0]):
        logits = hidden[source[h]] @ weight[h].t()
        total = total + head_weights[h] * F.cross_entropy(logits.float(), targets[h], ignore_index=IGNORE_INDEX)
    return total


IMPLS = {"loop": per_head_loop, "batched": multihead_cross_entropy_ref, "triton": multihead_cross_entropy,
         "compiled": torch.compile(multihead_cross_entropy_ref)}


def make_inputs(n_pos: int, device: str, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(H - 1, n_pos, D, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(H, V, D, generator=g) * 0.02).to(device, dtype).requires_grad_()
    targets = torch.randint(0, V, (H, n_pos), generator=g)
    targets[-1, -1] = IGNORE_INDEX
    source = torch.tensor(list(range(H - 1)) + [H - 2])
    return hidden, weight, targets.to(device), torch.ones(H, device=device), source.to(device)


def run_case(impl: str, n_pos: int, benchmark=None) -> dict:
    """Forward + backward of one implementation: seconds and (GPU) the peak memory it adds."""
    cuda = torch.cuda.is_available()
    hidden, weight, targets, hw, source = make_inputs(n_pos, "cuda" if cuda else "cpu",
                                                      torch.bfloat16 if cuda else torch.float32)
    fn = IMPLS[impl]

    def step():
        fn(hidden, weight, targets, hw, source).backward()
        hidden.grad = weight.grad = None

    seconds = time_per_call(step, [()], calls=10)
    case = f"mhce/N={n_pos}"
    info = {"name": f"{case}/{impl}", "reference": f"{case}/{'compiled' if cuda else 'loop'}",
            "device": device_name(), "dtype": "bf16" if cuda else "fp32", "shape": f"H={H} N={n_pos} D={D} V={V}",
            "seconds": seconds}
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


def impls_here() -> list[str]:
    return ["triton", "batched", "compiled"] if torch.cuda.is_available() else ["batched", "loop"]


def suite() -> list[dict]:
    sizes = GPU_SIZES if torch.cuda.is_available() else CPU_SIZES[:1]
    return [run_case(impl, n) for n in sizes for impl in impls_here()]


@pytest.mark.parametrize("n_pos", CPU_SIZES)
@pytest.mark.parametrize("impl", ["batched", "loop"])
def test_mhce_batched_vs_loop(benchmark, impl, n_pos):
    run_case(impl, n_pos, benchmark)


@needs_cuda
@pytest.mark.parametrize("n_pos", GPU_SIZES)
@pytest.mark.parametrize("impl", ["triton", "batched", "compiled"])
def test_mhce_fwd_bwd_gpu(benchmark, impl, n_pos):
    run_case(impl, n_pos, benchmark)
