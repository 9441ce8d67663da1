"""CUDA checks of the harder architectures' fast paths (skipped without a GPU), each against its fp32 reference
with every gradient: FlexAttention's sparse patterns (#14; the device suite's --variants lease), Transformer-XL's
relative positions through FlexAttention and MoE's grouped matmul (#13, #15; its --architectures lease)."""
import dataclasses

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("kind", ["local", "strided", "fixed"])
def test_compiled_flex_attention_matches_the_dense_mask_with_gradients(kind):
    """model.attn_pattern's CUDA path (FlexAttention's block-sparse kernel, compiled) against the fp32 dense-mask
    reference, outputs and every gradient: error within 2x of sdpa's own bf16 error plus a small atol."""
    from model.attention import attend_sdpa
    from model.config import ModelConfig
    from model.sparse import SparsePattern
    torch.manual_seed(0)
    cfg = ModelConfig(n_head=8, d_model=512, block_size=512, attn_pattern=kind, attn_window=96, attn_stride=64,
                      attn_summary=8)
    pattern = SparsePattern(cfg)
    q, k, v = (torch.randn(4, 8, 509, 64, device="cuda", requires_grad=True) for _ in range(3))
    grad_out = torch.randn(4, 8, 509, 64, device="cuda")
    mask = pattern.mask(509, "cuda")

    def run(fn, dtype):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*inputs)
        return [out.float(), *(g.float() for g in torch.autograd.grad(out, inputs, grad_out.to(dtype)))]

    reference = run(lambda a, b, c: attend_sdpa(a, b, c, mask), torch.float32)
    sdpa_bf16 = run(lambda a, b, c: attend_sdpa(a, b, c, mask), torch.bfloat16)
    flex_bf16 = run(torch.compile(pattern.attend_flex), torch.bfloat16)
    for ref, low, flex in zip(reference, sdpa_bf16, flex_bf16):
        assert (flex - ref).abs().max() <= 2 * (low - ref).abs().max() + 1e-3


def test_compiled_xl_relative_flex_attention_matches_the_math_path_with_gradients():
    """model.pos_emb=xl_relative's CUDA path (FlexAttention with the distance table as a score_mod, compiled) over
    a Transformer-XL memory at T12 size, against the fp32 math path: output and the gradients of q, k, v, u, v and
    W_R within 2x of the math path's own bf16 error plus a small atol."""
    from model.config import ModelConfig
    from model.layers import XLRelative
    torch.manual_seed(0)
    cfg = ModelConfig(n_head=8, d_model=512, block_size=512, pos_emb="xl_relative", mem_len=512)
    relative = XLRelative(cfg).cuda()
    r_proj = torch.nn.Linear(512, 512, bias=False).cuda()
    with torch.no_grad():
        relative.u.normal_(std=0.5)
        relative.v.normal_(std=0.5)
    T, K = 509, 1021
    k_pos = torch.arange(K, device="cuda")
    q_pos = k_pos[-T:]
    mask = (q_pos[:, None] >= k_pos[None, :]) & (q_pos[:, None] - k_pos[None, :] <= 512)
    q = torch.randn(4, 8, T, 64, device="cuda")
    k, v = torch.randn(4, 8, K, 64, device="cuda"), torch.randn(4, 8, K, 64, device="cuda")
    grad_out = torch.randn(4, 8, T, 64, device="cuda")
    params = [relative.u, relative.v, r_proj.weight]

    def run(flex: bool, dtype):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        fn = lambda a, b, c: relative(a, b, c, q_pos, k_pos, mask, K, r_proj, 0.0, flex=flex)  # noqa: E731
        with torch.autocast("cuda", torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = (torch.compile(fn) if flex else fn)(*inputs)
        grads = torch.autograd.grad(out, inputs + params, grad_out.to(out.dtype))
        return [out.float(), *(g.float() for g in grads)]

    reference = run(False, torch.float32)
    math_bf16 = run(False, torch.bfloat16)
    flex_bf16 = run(True, torch.bfloat16)
    for ref, low, flex in zip(reference, math_bf16, flex_bf16):
        assert (flex - ref).abs().max() <= 2 * (low - ref).abs().max() + 1e-3 * ref.abs().max().clamp(min=1)


def test_moe_grouped_matmul_under_autocast_matches_the_loop_with_gradients():
    """model.moe_dispatch=grouped on CUDA (torch's grouped matmul in bf16 under autocast) at T12 size against the
    fp32 loop over experts: output and the gradients of the input, both expert matrices and the router within 2x
    of the padded dispatch's own bf16 error plus a small atol."""
    from model.config import ModelConfig
    from model.moe import MoE
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=512, d_ff=1344, activation="swiglu", moe_experts=8, moe_top_k=2, moe_expert_dim=672)
    x = torch.randn(4093, 512, device="cuda")
    grad_out = torch.randn(4093, 512, device="cuda")

    def run(dispatch: str, low: bool):
        torch.manual_seed(1)  # the same weights in every run
        moe = MoE(dataclasses.replace(cfg, moe_dispatch=dispatch)).cuda()
        with torch.no_grad():
            for p in moe.parameters():
                p.normal_(std=0.05)
        inputs = x.clone().requires_grad_()
        _, choice, gates = moe.route(inputs)  # in fp32: the same choice in every run
        with torch.autocast("cuda", torch.bfloat16, enabled=low):
            out = (moe.reference if dispatch == "loop" else moe.dispatch)(inputs, choice, gates)
        grads = torch.autograd.grad(out, [inputs, moe.fc, moe.proj, moe.router.weight], grad_out.to(out.dtype))
        return [out.float(), *(g.float() for g in grads)]

    reference = run("loop", False)
    padded = run("padded", True)
    grouped = run("grouped", True)
    for ref, low, fast in zip(reference, padded, grouped):
        assert (fast - ref).abs().max() <= 2 * (low - ref).abs().max() + 1e-3 * ref.abs().max().clamp(min=1)
