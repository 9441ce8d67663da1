"""kernels.rmsnorm against the plain-PyTorch reference: outputs and both gradients, fresh random inputs, odd
shapes, rows wider than one block; under TRITON_INTERPRET=1 on a CPU, on the GPU where there is one."""
import pytest
import torch

from conftest import assert_parity, permuted
from kernels import rmsnorm
from kernels.reference import rmsnorm_ref
from kernels.rmsnorm import rmsnorm_bwd, rmsnorm_fwd
from kernels.runtime import use_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
SHAPES = [(1, 64), (7, 33), (5, 123, 123), (3, 4096), (2, 3, 512), (4, 6000)]  # 6000 > one 4096-wide block


def inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3 + 0.5
    w = 1 + 0.2 * torch.randn(shape[-1], generator=g)
    dy = torch.randn(shape, generator=g)
    return x.to(DEVICE, dtype), w.to(DEVICE, dtype), dy.to(DEVICE, dtype)


def grads(fn, x, w, dy):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = fn(x, w)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rmsnorm_matches_reference(shape, dtype):
    assert use_triton(torch.empty(0, device=DEVICE)), "the kernels must run here (GPU or TRITON_INTERPRET=1)"
    x, w, dy = inputs(shape, dtype, seed=sum(shape))
    got = grads(rmsnorm, x, w, dy)
    same = grads(rmsnorm_ref, x, w, dy)
    exact = grads(rmsnorm_ref, x.double(), w.double(), dy.double())
    for name, a, b, c in zip(("y", "dx", "dw"), got, same, exact):
        assert_parity(f"{name} {shape} {dtype}", a, b, c, ATOL[dtype] * max(1.0, c.abs().max().item()))


@pytest.mark.parametrize("block_n", [16, 32, 64])
def test_rows_wider_than_one_block(block_n):
    """The chunked path, forced with small blocks: 123 columns in 2 to 8 chunks."""
    x, w, dy = inputs((9, 123), torch.float32, seed=block_n)
    y, rstd = rmsnorm_fwd(x, w, 1e-6, block_n=block_n)
    dx, dw = rmsnorm_bwd(dy, x, w, rstd, block_n=block_n)
    exact = grads(rmsnorm_ref, x.double(), w.double(), dy.double())
    for name, a, c in zip(("y", "dx", "dw"), (y, dx, dw), exact):
        torch.testing.assert_close(a.double(), c, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(rstd.double(), x.double().pow(2).mean(-1).add(1e-6).rsqrt(), rtol=1e-6, atol=0)


def test_non_contiguous_rows_and_fp32_weight_with_bf16_input():
    """A strided view (every other row) and the bf16-activation / fp32-weight mix of autocast training."""
    x, _, dy = inputs((10, 96), torch.bfloat16, seed=7)
    w = (1 + 0.2 * torch.randn(96, generator=torch.Generator().manual_seed(8))).to(DEVICE)
    got = grads(rmsnorm, x[::2], w, dy[::2])
    same = grads(rmsnorm_ref, x[::2], w, dy[::2])
    exact = grads(rmsnorm_ref, x[::2].double(), w.double(), dy[::2].double())
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    for name, a, b, c in zip(("y", "dx", "dw"), got, same, exact):
        assert_parity(name, a, b, c, 1e-2 * max(1.0, c.abs().max().item()))


def test_compiles_with_fullgraph():
    x, w, dy = inputs((6, 40), torch.float32, seed=3)
    compiled = torch.compile(lambda x, w: rmsnorm(x, w) * 2, fullgraph=True)
    got = grads(compiled, x, w, dy)
    want = grads(lambda x, w: rmsnorm_ref(x, w) * 2, x, w, dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_permuted_input_and_fake_strides_match_the_kernel():
    """A dense non-contiguous input: right values, and the fake (compile-time) outputs have the real ones' strides
    (torch.library.opcheck, forward and backward ops)."""
    x, w, dy = inputs((5, 7, 40), torch.float32, seed=12)
    xp, dyp = permuted(x), permuted(dy)
    exact = grads(rmsnorm_ref, x.double(), w.double(), dy.double())
    for name, a, c in zip(("y", "dx", "dw"), grads(rmsnorm, xp, w, dyp), exact):
        torch.testing.assert_close(a.double(), c, rtol=1e-5, atol=1e-5, msg=name)
    torch.library.opcheck(torch.ops.charlm.rmsnorm.default, (xp.requires_grad_(), w.requires_grad_(), 1e-6))
    _, rstd = rmsnorm_fwd(x, w, 1e-6)
    torch.library.opcheck(torch.ops.charlm.rmsnorm_backward.default, (dyp, xp.detach(), w.detach(), rstd))
