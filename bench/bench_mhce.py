"""Multi-head cross-entropy (all intermediate and t+k heads of a step), forward + backward, at T12's heads
(H = 13: 11 intermediate heads + t+1 + t+2 sharing the final hidden state), D = 512, V = 256.

- On any machine: the batched reference (`kernels.reference.multihead_cross_entropy_ref`, one bmm + one
  cross-entropy for all heads) against a Python loop of per-head matmul + cross-entropy (fp32 on a CPU).
- On a GPU: the fused Triton op against the batched reference, eager and torch.compile'd, bf16, N = 16x512 and
  64x512 positions: time and peak memory of the loss path (goal on an H100: >= 2x the compiled reference and
  <= 1/10 of its memory).

    pytest bench/bench_mhce.py -s --benchmark-group-by=param:n_pos
"""
import pytest
import torch
import torch.nn.functional as F

from bench.gpu import needs_cuda, time_per_call
from kernels import multihead_cross_entropy
from kernels.reference import IGNORE_INDEX, multihead_cross_entropy_ref

H, D, V = 13, 512, 256


def per_head_loop(hidden, weight, targets, head_weights, source):
    total = hidden.new_zeros(())
    for h in range(weight.shape[0]):
        logits = hidden[source[h]] @ weight[h].t()
        total = total + head_weights[h] * F.cross_entropy(logits, targets[h], ignore_index=IGNORE_INDEX)
    return total


def make_inputs(n_pos: int, device: str = "cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(H - 1, n_pos, D, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(H, V, D, generator=g) * 0.02).to(device, dtype).requires_grad_()
    targets = torch.randint(0, V, (H, n_pos), generator=g)
    targets[-1, -1] = IGNORE_INDEX
    source = torch.tensor(list(range(H - 1)) + [H - 2])
    return hidden, weight, targets.to(device), torch.ones(H, device=device), source.to(device)


@pytest.mark.parametrize("n_pos", [1024, 4096])
@pytest.mark.parametrize("impl", ["batched", "loop"])
def test_mhce_batched_vs_loop(benchmark, impl, n_pos):
    hidden, weight, targets, hw, source = make_inputs(n_pos)
    fn = multihead_cross_entropy_ref if impl == "batched" else per_head_loop

    def step():
        loss = fn(hidden, weight, targets, hw, source)
        loss.backward()
        hidden.grad = weight.grad = None

    benchmark.extra_info.update(device="cpu", dtype="fp32", shape=f"H={H} N={n_pos} D={D} V={V}")
    benchmark(step)


GPU_IMPLS = {"triton": multihead_cross_entropy, "eager": multihead_cross_entropy_ref,
             "compiled": torch.compile(multihead_cross_entropy_ref)}


@needs_cuda
@pytest.mark.parametrize("n_pos", [16 * 512, 64 * 512])
@pytest.mark.parametrize("impl", list(GPU_IMPLS))
def test_mhce_fwd_bwd_gpu(benchmark, impl, n_pos):
    hidden, weight, targets, hw, source = make_inputs(n_pos, "cuda", torch.bfloat16)
    fn = GPU_IMPLS[impl]

    def step():
        fn(hidden, weight, targets, hw, source).backward()
        hidden.grad = weight.grad = None

    seconds = time_per_call(step, [()], calls=10)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    info = dict(device=torch.cuda.get_device_name(), dtype="bf16", shape=f"H={H} N={n_pos} D={D} V={V}",
                impl=impl, ms=seconds * 1e3, peak_extra_mib=peak / 2**20)
    benchmark.extra_info.update(info)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))
