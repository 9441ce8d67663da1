"""The multi-head cross-entropy: the batched reference against a per-head loop in fp64, and the fused Triton op
(kernels.multihead_cross_entropy, both impls: fused and gemm; the interpreter on a CPU) against the reference for the
loss and every gradient: ignored targets, zero-weight heads, shared sources, N not a multiple of the tile, D in
{64, 96, 512}."""
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_parity, permuted
from kernels import multihead_cross_entropy
from kernels.reference import IGNORE_INDEX, multihead_cross_entropy_ref
from kernels.runtime import use_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def per_head_loop(hidden, weight, targets, hw, source, bias):
    """The plain loop the batched reference replaces: one matmul + cross-entropy per head."""
    total = 0.0
    for h in range(weight.shape[0]):
        logits = hidden[source[h]] @ weight[h].t() + (bias[h] if bias is not None else 0)
        valid = targets[h] != IGNORE_INDEX
        ce = F.cross_entropy(logits, targets[h], ignore_index=IGNORE_INDEX, reduction="sum") / valid.sum().clamp_min(1)
        total = total + hw[h] * ce
    return total


@pytest.mark.parametrize("with_bias", [True, False])
def test_batched_multihead_loss_equals_a_per_head_loop(with_bias):
    g = torch.Generator().manual_seed(0)
    S, H, N, D, V = 3, 5, 37, 24, 256
    hidden = torch.randn(S, N, D, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(H, V, D, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(H, V, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, V, (H, N), generator=g)
    targets[1, -4:] = IGNORE_INDEX
    targets[2, :] = IGNORE_INDEX  # a head with no valid target contributes 0
    hw = torch.tensor([1.0, 0.5, 0.3, 0.0, 2.0], dtype=torch.float64)
    source = torch.tensor([0, 1, 2, 2, 1])  # heads 2 and 3 share a source, as t+1 and t+2 do
    batched = multihead_cross_entropy_ref(hidden, weight, targets, hw, source, bias)
    looped = per_head_loop(hidden, weight, targets, hw, source, bias)
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)
    params = [hidden, weight] + ([bias] if with_bias else [])
    for a, b in zip(torch.autograd.grad(batched, params), torch.autograd.grad(looped, params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    _, per_head = multihead_cross_entropy_ref(hidden, weight, targets, hw, source, bias, return_per_head=True)
    assert per_head[2] == 0 and torch.isclose((hw * per_head).sum(), batched)


def test_fp32_reference_agrees_with_fp64():
    g = torch.Generator().manual_seed(1)
    H, N, D, V = 4, 64, 32, 256
    hidden, weight = torch.randn(H, N, D, generator=g, dtype=torch.float64), torch.randn(H, V, D, generator=g,
                                                                                         dtype=torch.float64) / 8
    targets, hw = torch.randint(0, V, (H, N), generator=g), torch.rand(H, generator=g, dtype=torch.float64)
    exact = multihead_cross_entropy_ref(hidden, weight, targets, hw)
    fp32 = multihead_cross_entropy_ref(hidden.float(), weight.float(), targets, hw.float())
    assert fp32.dtype == torch.float32 and abs(float(fp32) - float(exact)) < 1e-5 * float(exact)


def case(S, H, N, D, dtype, seed, with_bias=True):
    """Random inputs with every awkward feature: ignored targets (a whole head of them, too), a zero-weight head,
    two heads sharing a source, a source no weighted head reads."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, N, D, generator=g)
    weight = torch.randn(H, 256, D, generator=g) / D ** 0.5
    bias = torch.randn(H, 256, generator=g) if with_bias else None
    targets = torch.randint(0, 256, (H, N), generator=g)
    targets[0, -3:] = IGNORE_INDEX  # like the t+2 head at the end of a window
    targets[-1, :] = IGNORE_INDEX  # a head with no valid target
    head_weights = torch.rand(H, generator=g) + 0.25
    head_weights[1] = 0.0  # a stopped intermediate head
    source = torch.arange(H) % S
    source[-2:] = S - 1  # two heads (t+1, t+2) read the last source
    if S > 2:
        source[source == 1] = 0  # nothing with a weight reads source 1 (head 1 has weight 0)
    to = lambda t: None if t is None else t.to(DEVICE, dtype)
    return to(hidden), to(weight), targets.to(DEVICE), head_weights.to(DEVICE, dtype), source.to(DEVICE), to(bias)


def loss_and_grads(fn, hidden, weight, targets, head_weights, source, bias, **kwargs):
    params = [t.detach().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    loss, per_head = fn(params[0], params[1], targets, head_weights, source, params[2] if bias is not None else None,
                        return_per_head=True, **kwargs)
    grads = torch.autograd.grad(loss, params)
    return [loss.detach(), per_head.detach(), *grads]


def assert_fused_matches_reference(inputs, label: str, atol: float, impl: str = "fused"):
    """The Triton op (either impl) against the fp64 reference, within twice the same-dtype reference's error (+ atol
    relative to the largest value): loss, per-head losses of the weighted heads (weight-0 heads report 0), every
    gradient."""
    got = loss_and_grads(multihead_cross_entropy, *inputs, impl=impl)
    same = loss_and_grads(multihead_cross_entropy_ref, *inputs)
    exact = loss_and_grads(multihead_cross_entropy_ref, *(t.double() if torch.is_tensor(t) and t.is_floating_point()
                                                          else t for t in inputs))
    weighted = inputs[3] != 0
    got[1], same[1], exact[1] = got[1][weighted], same[1][weighted], exact[1][weighted]
    for name, a, b, c in zip(("loss", "per-head", "d hidden", "d weight", "d bias"), got, same, exact):
        assert_parity(f"{name} {label}", a, b, c, atol * max(1.0, c.abs().max().item()))


@pytest.mark.parametrize("impl", ["fused", "gemm"])
@pytest.mark.parametrize("D", [64, 96, 512])
@pytest.mark.parametrize("S, H, N", [(3, 5, 37), (2, 4, 130), (1, 2, 64)])
def test_fused_op_matches_reference_fp32(S, H, N, D, impl):
    assert use_triton(torch.empty(0, device=DEVICE)), "the kernels must run here (GPU or TRITON_INTERPRET=1)"
    assert_fused_matches_reference(case(S, H, N, D, torch.float32, seed=S * 1000 + N + D + len(impl)),
                                   f"{impl} S={S} H={H} N={N} D={D}", atol=1e-6, impl=impl)


def test_heads_per_source_reads_the_models_layout_only():
    from kernels.mhce import heads_per_source
    assert heads_per_source([0, 0, 1, 1, 2, 2], 3) == 2 and heads_per_source(range(4), 4) == 1
    assert heads_per_source([0, 1, 2, 2], 3) == 0 and heads_per_source([0, 0, 1, 1], 3) == 0
    assert heads_per_source([1, 1, 0, 0], 2) == 0


@pytest.mark.parametrize("as_list", [True, False], ids=["grouped", "gathered"])
def test_gemm_variant_in_chunks_of_positions(as_list, monkeypatch):
    """The gemm variant's two layouts (the heads of a source as one wide classifier when `source` is a list in the
    model's order; gathered hidden states otherwise), with the positions split into chunks (the last one short)."""
    from kernels import mhce
    hidden, weight, targets, hw, _, bias = case(3, 6, 45, 40, torch.float32, seed=3)
    source = [0, 0, 1, 1, 2, 2]
    inputs = (hidden, weight, targets, hw, source if as_list else torch.tensor(source, device=DEVICE), bias)
    assert_fused_matches_reference(inputs, "one chunk", atol=1e-6, impl="gemm")
    monkeypatch.setattr(mhce, "LOGITS_BUDGET_BYTES", 6 * 256 * 4 * 16)  # 16 positions a chunk: 16 + 16 + 13
    assert_fused_matches_reference(inputs, "chunks of 16", atol=1e-6, impl="gemm")


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="impl must be one of gemm, fused"):
        multihead_cross_entropy(*case(2, 3, 4, 8, torch.float32, seed=0), impl="cublas")


@pytest.mark.parametrize("impl", ["fused", "gemm"])
def test_zero_weight_heads_contribute_nothing_and_unread_sources_get_zero_gradient(impl):
    hidden, weight, targets, hw, source, bias = case(3, 5, 40, 64, torch.float32, seed=5)
    _, per_head, d_hidden, d_weight, d_bias = loss_and_grads(multihead_cross_entropy, hidden, weight, targets, hw,
                                                             source, bias, impl=impl)
    assert per_head[1] == 0 and (d_weight[1] == 0).all() and (d_bias[1] == 0).all()
    assert (d_hidden[1] == 0).all()  # source 1 is read only by the zero-weight head
    assert per_head[-1] == 0 and (d_weight[-1] == 0).all()  # no valid target


@pytest.mark.parametrize("impl", ["fused", "gemm"])
def test_without_bias_under_no_grad_and_compiled(impl):
    hidden, weight, targets, hw, source, _ = case(2, 3, 50, 64, torch.float32, seed=9, with_bias=False)
    want = multihead_cross_entropy_ref(hidden, weight, targets, hw, source)
    with torch.no_grad():
        torch.testing.assert_close(multihead_cross_entropy(hidden, weight, targets, hw, source, impl=impl), want)
    compiled = torch.compile(multihead_cross_entropy, fullgraph=True)
    got = loss_and_grads(compiled, hidden, weight, targets, hw, source.tolist(), None, impl=impl)
    ref = loss_and_grads(multihead_cross_entropy_ref, hidden, weight, targets, hw, source, None)
    for a, b in zip(got[:1] + got[2:], ref[:1] + ref[2:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["fused", "gemm"])
def test_gradients_scale_with_the_upstream_gradient(impl):
    hidden, weight, targets, hw, source, bias = case(2, 3, 33, 64, torch.float32, seed=4)
    h = hidden.clone().requires_grad_()
    (3.0 * multihead_cross_entropy(h, weight, targets, hw, source, bias, impl=impl)).backward()
    h2 = hidden.clone().requires_grad_()
    (3.0 * multihead_cross_entropy_ref(h2, weight, targets, hw, source, bias)).backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tl.dot is wrong under the interpreter: GPU only")
@pytest.mark.parametrize("impl", ["fused", "gemm"])
@pytest.mark.parametrize("D", [64, 96, 512])
def test_fused_op_matches_reference_bf16_on_gpu(D, impl):
    assert_fused_matches_reference(case(3, 5, 1000, D, torch.bfloat16, seed=D), f"{impl} bf16 D={D}", atol=1e-2,
                                   impl=impl)
    hidden, weight, targets, hw, _, bias = case(3, 6, 1000, D, torch.bfloat16, seed=D + 1)
    assert_fused_matches_reference((hidden, weight, targets, hw, [0, 0, 1, 1, 2, 2], bias), f"{impl} bf16 grouped",
                                   atol=1e-2, impl=impl)


@pytest.mark.parametrize("triton_version", [(3, 6), (3, 8)], ids=["triton3.6", "triton3.8"])
def test_gpu_launch_configurations_match_reference_fp32(triton_version, monkeypatch):
    """The tiles a GPU launch uses (they differ by triton version: D in chunks of 16, or 8 from triton 3.8 on),
    run here too, with D not a multiple of the chunk and N not a multiple of the tile."""
    from kernels import mhce
    from kernels.runtime import TRITON_VERSION
    if triton_version > TRITON_VERSION:
        pytest.skip(f"triton {'.'.join(map(str, TRITON_VERSION))} cannot build the tiles of triton >= "
                    f"{'.'.join(map(str, triton_version))}")
    gpu_config = mhce.launch_config
    monkeypatch.setattr(mhce, "launch_config", lambda V, dtype: gpu_config(V, dtype, interpret=False,
                                                                           triton_version=triton_version))
    assert mhce.launch_config(256, torch.float32)["BLOCK_D"] == (8 if triton_version >= (3, 8) else 16)
    assert_fused_matches_reference(case(2, 3, 37, 44, torch.float32, seed=sum(triton_version)),
                                   f"GPU tiles of triton {triton_version}", atol=1e-6)


@pytest.mark.parametrize("impl", ["fused", "gemm"])
def test_permuted_hidden_gets_its_gradient_in_the_right_places(impl):
    """hidden (S, N, D) as a dense non-contiguous view: d(hidden) matches the reference, and the fake (compile-time)
    outputs have the real ones' strides (torch.library.opcheck)."""
    hidden, weight, targets, hw, source, bias = case(3, 5, 37, 40, torch.float32, seed=21)
    inputs = (permuted(hidden), weight, targets, hw, source, bias)
    assert_fused_matches_reference(inputs, f"{impl} permuted hidden", atol=1e-6, impl=impl)
    torch.library.opcheck(torch.ops.charlm.multihead_cross_entropy.default,
                          (permuted(hidden).requires_grad_(), weight.requires_grad_(), targets, hw, source.tolist(),
                           bias.requires_grad_(), True, impl))


def test_fp16_is_refused_with_the_reason():
    hidden, weight, targets, hw, source, bias = case(2, 3, 20, 32, torch.float32, seed=2)
    with pytest.raises(ValueError, match="does not take fp16: its d\\(logits\\)"):
        multihead_cross_entropy(hidden.half(), weight.half(), targets, hw, source, bias.half())
