"""Multi-head latent attention (model.attn_type=mla): DeepSeek-V2's equations written out in fp64 against the module
(outputs and every gradient), the absorbed decoding form against the naive one, the KV cache keeping only the
latent and the shared rotary key, the reduction to standard attention, unequal value widths, causality."""
import math

import pytest
import torch

from model import GPT, ModelConfig
from model.attention import attend_sdpa, with_equal_widths
from model.kv_cache import KVCache
from model.layers import CausalSelfAttention
from model.mla import LatentAttention


def small(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(n_layer=2, n_head=4, d_model=32, d_ff=64, block_size=17, pos_emb="rope",
                                 attn_type="mla", kv_lora_rank=12, rope_head_dim=6, v_head_dim=5), **kw})


def reference(module: LatentAttention, x: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V2 eqs. (9)-(19), head by head, causal: c = norm(W_DKV x), k_C = W_UK c, v = W_UV c,
    k_R = RoPE(W_KR x) shared, q = [W_Q x]_nope ++ RoPE([W_Q x]_rope)."""
    B, T, _ = x.shape
    H, nope, rope, dv, rank = module.n_head, module.nope, module.rope, module.v_dim, module.rank
    down = x @ module.kv_down.weight.T + module.kv_down.bias
    c = down[..., :rank]
    c = c * c.pow(2).mean(-1, keepdim=True).add(module.kv_norm.eps).rsqrt() * module.kv_norm.weight
    k_rope = module.rotary(down[..., rank:][:, None])[:, 0]  # (B, T, rope)
    q_all = module.q(x)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    heads = []
    for h in range(H):
        q_h = q_all[..., h * (nope + rope):(h + 1) * (nope + rope)]
        q_h = torch.cat([q_h[..., :nope], module.rotary(q_h[..., nope:][:, None])[:, 0]], dim=-1)
        k_h = torch.cat([c @ module.k_up.weight[h * nope:(h + 1) * nope].T, k_rope], dim=-1)
        v_h = c @ module.v_up.weight[h * dv:(h + 1) * dv].T
        scores = (q_h @ k_h.transpose(1, 2) / math.sqrt(nope + rope)).masked_fill(~causal, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v_h)
    return module.proj(torch.cat(heads, dim=-1))


@pytest.mark.parametrize("q_lora_rank", [0, 10])
def test_the_module_follows_deepseek_v2_with_every_gradient(q_lora_rank):
    torch.manual_seed(0)
    module = LatentAttention(small(q_lora_rank=q_lora_rank), layer=0).double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))  # norm weights and biases away from 1 and 0
    x = torch.randn(2, 17, 32, dtype=torch.float64, requires_grad=True)
    params = [x, *module.parameters()]
    out, expected = module(x), reference(module, x)
    grad_out = torch.randn_like(out)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    names = ["x"] + [n for n, _ in module.named_parameters()]
    for name, a, b in zip(names, torch.autograd.grad(out, params, grad_out),
                          torch.autograd.grad(expected, params, grad_out)):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("with_mask", [False, True])
def test_absorbed_decoding_equals_the_naive_form(with_mask):
    """fp32: W_UK folded into the query and W_UV after attention, against per-head keys and values."""
    torch.manual_seed(1)
    module = LatentAttention(small(), layer=0)
    B, H, T, K = 3, 4, 5, 13
    q_nope, q_rope = torch.randn(B, H, T, 8), torch.randn(B, H, T, 6)
    latent, k_rope = torch.randn(B, 1, K, 12), torch.randn(B, 1, K, 6)
    mask = torch.rand(T, K) < 0.6 if with_mask else torch.ones(T, K, dtype=torch.bool).tril(K - T)
    mask[:, -1] = True
    naive = module.naive(q_nope, q_rope, latent, k_rope, mask, 0.0)
    absorbed = module.absorbed(q_nope, q_rope, latent, k_rope, mask, 0.0)
    torch.testing.assert_close(absorbed, naive, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [dict(), dict(q_lora_rank=10), dict(v_head_dim=0, nope_head_dim=3),
                                       dict(attn_pattern="strided", attn_window=4, attn_stride=3)],
                         ids=["full-rank-q", "low-rank-q", "nope-3", "strided"])
def test_cached_decoding_keeps_only_the_latent_and_the_rotary_key(overrides):
    torch.manual_seed(2)
    model = GPT(small(**overrides)).eval()
    x = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.cfg, 2, window=17, chunk=6, device="cpu")
        pieces = [model(x[:, t:t + n], cache=cache) for t, n in [(0, 1), (1, 6), (7, 6), (13, 4)]]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.k.shape[2:] == (1, cache.capacity, 6) and cache.v.shape[2:] == (1, cache.capacity, 12)
    standard = KVCache(small(attn_type="standard"), 2, window=17, chunk=6, device="cpu")
    assert cache.bytes_per_token == 2 * (12 + 6) * 4 and standard.bytes_per_token == 2 * 2 * 32 * 4


def test_an_identity_latent_with_a_silent_rotary_part_is_standard_attention():
    """kv_lora_rank = d_model with W_DKV = I on RMS-normalised inputs, rotary query weights zero: MLA scores and
    mixes exactly like standard attention with W_Q, W_K = W_UK, W_V = W_UV (the reduction to the baseline)."""
    torch.manual_seed(3)
    cfg = small(kv_lora_rank=32, v_head_dim=0, bias=False)
    mla, standard = LatentAttention(cfg, layer=0), CausalSelfAttention(small(attn_type="standard", bias=False,
                                                                             pos_emb="learned"), layer=0)
    with torch.no_grad():
        mla.kv_down.weight.zero_()
        mla.kv_down.weight[:32].copy_(torch.eye(32))
        q_weight = mla.q.weight.view(4, 8 + 6, 32)
        q_weight[:, 8:].zero_()
        q_standard = q_weight[:, :8].reshape(32, 32) * math.sqrt(8 / 14)  # its scale 1/sqrt(8), MLA's 1/sqrt(8 + 6)
        standard.qkv.weight.copy_(torch.cat([q_standard, mla.k_up.weight, mla.v_up.weight]))
        standard.proj.weight.copy_(mla.proj.weight)
    x = torch.randn(2, 17, 32)
    x = x * x.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()  # what the block's RMSNorm hands over
    torch.testing.assert_close(mla(x), standard(x), rtol=2e-5, atol=2e-5)


def test_values_of_another_width_reach_equal_width_kernels_padded():
    """v_head_dim 5 < nope + rope 14: a backend that needs equal widths (flash) gets zero-padded values."""
    torch.manual_seed(4)
    model = GPT(small()).eval()
    x = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        expected = model(x)

        def needs_equal_widths(q, k, v, mask=None, dropout=0.0):
            assert v.shape[-1] == q.shape[-1] == 14
            return attend_sdpa(q, k, v, mask, dropout)
        for block in model.blocks:
            block.attn.attend = with_equal_widths(needs_equal_widths)
        torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)


def test_no_output_sees_a_later_byte():
    torch.manual_seed(5)
    model = GPT(small(q_lora_rank=10)).eval()
    x = torch.randint(0, 256, (1, 17))
    changed = x.clone()
    changed[0, 8] = (x[0, 8] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=0)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("overrides,message", [
    (dict(pos_emb="learned"), "set model.pos_emb=rope"),
    (dict(rope_head_dim=5), "rope_head_dim even"),
    (dict(mem_len=8), "not implemented with model.mem_len=8"),
])
def test_impossible_combinations_are_one_line_errors(overrides, message):
    errors = small(**overrides).errors()
    assert len(errors) == 1 and message in errors[0], errors
