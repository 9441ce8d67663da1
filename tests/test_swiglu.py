"""kernels.swiglu against the plain-PyTorch reference: output and both gradients, fresh random inputs, odd
shapes, strided halves of one projection; under TRITON_INTERPRET=1 on a CPU, on the GPU where there is one."""
import pytest
import torch

from conftest import assert_parity, permuted
from kernels import swiglu, swiglu_packed
from kernels.reference import swiglu_packed_ref, swiglu_ref
from kernels.runtime import use_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}
SHAPES = [(1, 1), (7, 33), (5, 123, 123), (3, 2048), (2, 5, 1500)]


def run(fn, gate_up, dy):
    """fn on one (.., 2F) tensor (packed) or on its two halves; returns y and d(gate_up)."""
    gate_up = gate_up.detach().requires_grad_()
    y = fn(gate_up) if fn in (swiglu_packed, swiglu_packed_ref) else fn(*gate_up.chunk(2, dim=-1))
    y.backward(dy)
    return y.detach(), gate_up.grad


@pytest.mark.parametrize("fn", [swiglu, swiglu_packed], ids=["halves", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_swiglu_matches_reference(shape, dtype, fn):
    assert use_triton(torch.empty(0, device=DEVICE)), "the kernels must run here (GPU or TRITON_INTERPRET=1)"
    g = torch.Generator().manual_seed(sum(shape))
    gate_up = (torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * 3).to(DEVICE, dtype)
    dy = torch.randn(shape, generator=g).to(DEVICE, dtype)
    got, same, exact = run(fn, gate_up, dy), run(swiglu_ref, gate_up, dy), run(swiglu_ref, gate_up.double(),
                                                                              dy.double())
    for name, a, b, c in zip(("y", "d(gate, up)"), got, same, exact):
        assert_parity(f"{name} {shape} {dtype}", a, b, c, ATOL[dtype] * max(1.0, c.abs().max().item()))


def test_separate_contiguous_inputs_and_fullgraph_compile():
    g = torch.Generator().manual_seed(11)
    gate, up, dy = (torch.randn(4, 9, 21, generator=g).to(DEVICE) for _ in range(3))
    compiled = torch.compile(lambda a, b: swiglu(a, b) + 1, fullgraph=True)
    a, b = gate.clone().requires_grad_(), up.clone().requires_grad_()
    compiled(a, b).backward(dy)
    ra, rb = gate.clone().requires_grad_(), up.clone().requires_grad_()
    (swiglu_ref(ra, rb) + 1).backward(dy)
    torch.testing.assert_close(a.grad, ra.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, rb.grad, rtol=1e-5, atol=1e-6)


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="even last dimension"):
        swiglu_packed(torch.zeros(2, 5))


@pytest.mark.parametrize("fn", [swiglu, swiglu_packed], ids=["halves", "packed"])
def test_permuted_input_and_fake_strides_match_the_kernel(fn):
    """A dense non-contiguous input: right values, and the fake (compile-time) outputs have the real ones' strides
    (torch.library.opcheck, forward and backward ops)."""
    g = torch.Generator().manual_seed(13)
    gate_up = (torch.randn(5, 7, 2 * 21, generator=g) * 3).to(DEVICE)
    dy = torch.randn(5, 7, 21, generator=g).to(DEVICE)
    got = run(fn, permuted(gate_up), permuted(dy))
    exact = run(swiglu_ref, gate_up.double(), dy.double())
    for name, a, c in zip(("y", "d(gate, up)"), got, exact):
        torch.testing.assert_close(a.double(), c, rtol=1e-5, atol=1e-5, msg=name)
    gp = permuted(gate_up)
    if fn is swiglu_packed:
        torch.library.opcheck(torch.ops.charlm.swiglu_packed.default, (gp.requires_grad_(),))
        torch.library.opcheck(torch.ops.charlm.swiglu_packed_backward.default, (permuted(dy), gp.detach()))
    else:
        gate, up = (permuted(t) for t in gate_up.chunk(2, dim=-1))
        torch.library.opcheck(torch.ops.charlm.swiglu.default, (gate.requires_grad_(), up.requires_grad_()))
        torch.library.opcheck(torch.ops.charlm.swiglu_backward.default, (permuted(dy), gate.detach(), up.detach()))
