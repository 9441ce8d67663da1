"""kernels.layernorm against the plain-PyTorch reference: output and every gradient (x, weight, bias), with and
without a bias, fresh random inputs, odd shapes; under TRITON_INTERPRET=1 on a CPU, on the GPU where there is one."""
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_parity, permuted
from kernels import layernorm
from kernels.layernorm import MAX_COLS, layernorm_fwd
from kernels.reference import layernorm_ref
from kernels.runtime import use_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
SHAPES = [(1, 64), (7, 33), (5, 123, 123), (3, 4096), (2, 3, 512), (2, 3000)]


def inputs(shape, dtype, seed, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3 + 0.5  # an offset the centring must remove
    w = 1 + 0.2 * torch.randn(shape[-1], generator=g)
    b = 0.3 * torch.randn(shape[-1], generator=g) if with_bias else None
    dy = torch.randn(shape, generator=g)
    to = lambda t: None if t is None else t.to(DEVICE, dtype)
    return to(x), to(w), to(b), to(dy)


def grads(fn, x, w, b, dy):
    params = [t.detach().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    y = fn(params[0], params[1], params[2] if b is not None else None)
    y.backward(dy)
    return [y.detach()] + [p.grad for p in params]


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layernorm_matches_reference(shape, dtype, with_bias):
    assert use_triton(torch.empty(0, device=DEVICE)), "the kernels must run here (GPU or TRITON_INTERPRET=1)"
    x, w, b, dy = inputs(shape, dtype, seed=sum(shape) + with_bias, with_bias=with_bias)
    got = grads(layernorm, x, w, b, dy)
    same = grads(layernorm_ref, x, w, b, dy)
    exact = grads(layernorm_ref, *(t.double() if t is not None else None for t in (x, w, b, dy)))
    for name, a, s, c in zip(("y", "dx", "dw", "db"), got, same, exact):
        assert_parity(f"{name} {shape} {dtype}", a, s, c, ATOL[dtype] * max(1.0, c.abs().max().item()))


def test_reference_is_torch_layer_norm_and_statistics_are_saved():
    x, w, b, _ = inputs((6, 50), torch.float32, seed=1)
    torch.testing.assert_close(layernorm_ref(x, w, b), F.layer_norm(x, (50,), w, b, 1e-5))
    y, mean, rstd = layernorm_fwd(x, w, b, 1e-5)
    torch.testing.assert_close(mean, x.mean(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rstd, (x.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-5, atol=0)


def test_fp32_weight_and_bias_with_bf16_input_and_strided_rows():
    """The autocast mix (bf16 activations, fp32 parameters) on every other row of a tensor: gradients come back
    in the parameters' dtype."""
    x, _, _, dy = inputs((10, 96), torch.bfloat16, seed=7)
    _, w, b, _ = inputs((10, 96), torch.float32, seed=8)
    got = grads(layernorm, x[::2], w, b, dy[::2])
    same = grads(layernorm_ref, x[::2], w, b, dy[::2])
    exact = grads(layernorm_ref, x[::2].double(), w.double(), b.double(), dy[::2].double())
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == got[3].dtype == torch.float32
    for name, a, s, c in zip(("y", "dx", "dw", "db"), got, same, exact):
        assert_parity(name, a, s, c, 1e-2 * max(1.0, c.abs().max().item()))


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_compiles_with_fullgraph(with_bias):
    x, w, b, dy = inputs((6, 40), torch.float32, seed=3, with_bias=with_bias)
    compiled = torch.compile(lambda x, w, b: layernorm(x, w, b) * 2, fullgraph=True)
    got = grads(compiled, x, w, b, dy)
    want = grads(lambda x, w, b: layernorm_ref(x, w, b) * 2, x, w, b, dy)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_permuted_input_and_fake_strides_match_the_kernel():
    """A dense non-contiguous input: right values, and the fake (compile-time) outputs have the real ones' strides
    (torch.library.opcheck, forward and backward ops)."""
    x, w, b, dy = inputs((5, 7, 40), torch.float32, seed=12)
    xp, dyp = permuted(x), permuted(dy)
    exact = grads(layernorm_ref, x.double(), w.double(), b.double(), dy.double())
    for name, a, c in zip(("y", "dx", "dw", "db"), grads(layernorm, xp, w, b, dyp), exact):
        torch.testing.assert_close(a.double(), c, rtol=1e-5, atol=1e-5, msg=name)
    torch.library.opcheck(torch.ops.charlm.layernorm.default, (xp.requires_grad_(), w.requires_grad_(),
                                                               b.requires_grad_(), 1e-5))
    _, mean, rstd = layernorm_fwd(x, w, b, 1e-5)
    torch.library.opcheck(torch.ops.charlm.layernorm_backward.default,
                          (dyp, xp.detach(), w.detach(), mean, rstd, True))


def test_rows_wider_than_the_kernel_run_the_reference():
    x, w, b, _ = inputs((2, MAX_COLS + 3), torch.float32, seed=2)
    torch.testing.assert_close(layernorm(x, w, b), layernorm_ref(x, w, b))
