"""Multi-head cross-entropy (all intermediate and t+k heads of a step), forward + backward.

On this CPU: the batched reference (`kernels.reference.multihead_cross_entropy_ref`, one bmm + one cross-entropy
for all heads) against a Python loop of per-head matmul + cross-entropy, at T12's head count (H = 13: 11
intermediate heads + t+1 + t+2 sharing the final hidden state), D = 512, V = 256.

    pytest bench/bench_mhce.py --benchmark-group-by=param:n_pos
"""
import pytest
import torch
import torch.nn.functional as F

from kernels.reference import IGNORE_INDEX, multihead_cross_entropy_ref

H, D, V = 13, 512, 256


def per_head_loop(hidden, weight, targets, head_weights, source):
    total = hidden.new_zeros(())
    for h in range(weight.shape[0]):
        logits = hidden[source[h]] @ weight[h].t()
        total = total + head_weights[h] * F.cross_entropy(logits, targets[h], ignore_index=IGNORE_INDEX)
    return total


def make_inputs(n_pos: int):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(H - 1, n_pos, D, generator=g, requires_grad=True)
    weight = (torch.randn(H, V, D, generator=g) * 0.02).requires_grad_()
    targets = torch.randint(0, V, (H, n_pos), generator=g)
    targets[-1, -1] = IGNORE_INDEX
    source = torch.tensor(list(range(H - 1)) + [H - 2])
    return hidden, weight, targets, torch.ones(H), source


@pytest.mark.parametrize("n_pos", [1024, 4096])
@pytest.mark.parametrize("impl", ["batched", "loop"])
def test_mhce_fwd_bwd_cpu(benchmark, impl, n_pos):
    hidden, weight, targets, hw, source = make_inputs(n_pos)
    fn = multihead_cross_entropy_ref if impl == "batched" else per_head_loop

    def step():
        loss = fn(hidden, weight, targets, hw, source)
        loss.backward()
        hidden.grad = weight.grad = None

    benchmark.extra_info.update(device="cpu", dtype="fp32", shape=f"H={H} N={n_pos} D={D} V={V}")
    benchmark(step)
