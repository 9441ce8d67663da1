"""Differential attention (model.attn_type=differential): the paper's formula written out in fp64 against the
module (outputs and every gradient), lambda = 0 reducing to plain attention over the first sub-heads with the head
norm, the lambda schedule, equal parameters, causality, the KV cache, and values of unequal width for flash."""
import math

import pytest
import torch

from model import GPT, ModelConfig
from model.attention import attend_sdpa, with_equal_widths
from model.differential import DifferentialAttention, lambda_init
from model.kv_cache import KVCache


def small(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(n_layer=3, n_head=4, d_model=40, d_ff=64, block_size=19, pos_emb="learned",
                                 attn_type="differential"), **kw})


def reference(module: DifferentialAttention, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Ye et al. 2024 eq. (1)-(3) head by head, causal, no positions: head i uses sub-heads 2i, 2i+1."""
    B, T, C = x.shape
    H, d = module.n_head // 2, module.head_dim
    q, k, v = (x @ module.qkv.weight.T + module.qkv.bias).split(C, dim=-1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    heads = []
    for i in range(H):
        def softmax_of(s):
            scores = q[..., s * d:(s + 1) * d] @ k[..., s * d:(s + 1) * d].transpose(1, 2) / math.sqrt(d)
            return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        out = (softmax_of(2 * i) - lam * softmax_of(2 * i + 1)) @ v[..., 2 * i * d:(2 * i + 2) * d]
        rms = out.pow(2).mean(-1, keepdim=True).add(1e-5).rsqrt()
        heads.append(out * rms * module.head_norm.weight * (1 - module.lambda_init))
    return module.proj(torch.cat(heads, dim=-1))


def test_the_module_follows_the_papers_formula_with_every_gradient():
    torch.manual_seed(0)
    module = DifferentialAttention(small(), layer=2).double()
    with torch.no_grad():
        module.head_norm.weight.uniform_(0.5, 1.5)
        module.qkv.bias.normal_()
    x = torch.randn(2, 19, 40, dtype=torch.float64, requires_grad=True)
    params = [x, *module.parameters()]
    out = module(x)
    q1, k1, q2, k2 = module.lambdas
    lam = torch.exp(q1 @ k1) - torch.exp(q2 @ k2) + lambda_init(2)
    expected = reference(module, x, lam)
    grad_out = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, params, grad_out)
    expected_grads = torch.autograd.grad(expected, params, grad_out)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(["x"] + [n for n, _ in module.named_parameters()], got_grads, expected_grads):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_lambda_zero_is_plain_attention_over_the_first_sub_heads_with_the_norm():
    """lambda_init 0 and exp(lq1.lk1) = exp(lq2.lk2) (zero vectors): the second softmax drops out, the scale is 1."""
    torch.manual_seed(1)
    module = DifferentialAttention(small(), layer=0)
    module.lambda_init = 0.0
    with torch.no_grad():
        module.lambdas.zero_()
    assert float(module.lam()) == 0.0
    x = torch.randn(3, 19, 40)
    B, T, C = x.shape
    q, k, v = module.qkv(x).split(C, dim=-1)
    q = q.view(B, T, 4, 10).transpose(1, 2)[:, 0::2]
    k = k.view(B, T, 4, 10).transpose(1, 2)[:, 0::2]
    v = v.view(B, T, 2, 20).transpose(1, 2)
    plain = attend_sdpa(q, k, v)
    expected = module.proj(module.head_norm(plain).transpose(1, 2).reshape(B, T, C))
    torch.testing.assert_close(module(x), expected, rtol=1e-6, atol=1e-6)


def test_the_lambda_schedule():
    assert lambda_init(0) == pytest.approx(0.2)
    assert lambda_init(1) == pytest.approx(0.8 - 0.6 * math.exp(-0.3))
    values = [lambda_init(layer) for layer in range(24)]
    assert all(a < b for a, b in zip(values, values[1:])) and values[-1] < 0.8
    model = GPT(small())
    assert [b.attn.lambda_init for b in model.blocks] == [lambda_init(i) for i in range(3)]


@pytest.mark.parametrize("init", ["normal", "small", "gpt2"])
def test_the_lambda_vectors_start_at_the_papers_scale_in_every_init_scheme(init):
    """lq1, lk1, lq2, lk2 ~ N(0, 0.1) in the model too (its init gives 2-D parameters 0.02 or its own scale)."""
    torch.manual_seed(0)
    model = GPT(small(n_layer=2, n_head=4, d_model=256, d_ff=32, init=init))
    for block in model.blocks:
        assert abs(block.attn.lambdas.std().item() - 0.1) < 0.015  # 4 x 64 draws: the std's own error is ~4%
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.1) > 0.05  # the rest keeps the scheme's scale


def test_equal_parameters_with_half_the_heads_of_full_width():
    """Same projections as standard attention; per layer only 4 lambda vectors and the head norm (2d) extra."""
    cfg = small()
    standard = GPT(small(attn_type="standard")).num_params()
    assert GPT(cfg).num_params() == standard + cfg.n_layer * (4 * cfg.head_dim + 2 * cfg.head_dim)
    attn = GPT(cfg).blocks[0].attn
    assert attn.n_head // 2 == 2 and attn.head_dim == 10  # 2 heads of 2 x 10 (not 2 heads of 2 x 5)


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_no_output_sees_a_later_byte(pos_emb):
    torch.manual_seed(2)
    model = GPT(small(pos_emb=pos_emb)).eval()
    x = torch.randint(0, 256, (1, 19))
    changed = x.clone()
    changed[0, 9] = (x[0, 9] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=0)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("overrides", [dict(pos_emb="rope"), dict(pos_emb="learned_per_layer"),
                                       dict(pos_emb="rope", attn_pattern="local", attn_window=6)],
                         ids=["rope", "learned_per_layer", "local"])
def test_cached_decoding_equals_the_full_forward(overrides):
    torch.manual_seed(3)
    model = GPT(small(**overrides)).eval()
    x = torch.randint(0, 256, (2, 19))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.cfg, 2, window=19, chunk=6, device="cpu")
        pieces = [model(x[:, t:t + n], cache=cache) for t, n in [(0, 1), (1, 6), (7, 5), (12, 6), (18, 1)]]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.v.shape[2:] == (2, cache.capacity, 20) and cache.k.shape[2:] == (4, cache.capacity, 10)


@pytest.mark.parametrize("v_width", [5, 8, 24, 20])
def test_unequal_value_widths_through_a_kernel_that_needs_equal_ones(v_width):
    """with_equal_widths (used by flash): values of any width give what sdpa gives them directly."""
    torch.manual_seed(4)
    q, k = torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8)
    v = torch.randn(2, 3, 11, v_width)

    def needs_equal_widths(q, k, v, mask=None, dropout=0.0):
        assert v.shape[-1] == q.shape[-1]
        return attend_sdpa(q, k, v, mask, dropout)
    torch.testing.assert_close(with_equal_widths(needs_equal_widths)(q, k, v), attend_sdpa(q, k, v),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("overrides,message", [
    (dict(n_head=5), "must be even"),
    (dict(mem_len=8, pos_emb="rope"), "not implemented with model.mem_len=8"),
    (dict(pos_emb="xl_relative"), "not implemented with model.pos_emb=xl_relative"),
    (dict(attn_pattern="strided"), "not implemented with model.attn_pattern=strided"),
])
def test_impossible_combinations_are_one_line_errors(overrides, message):
    errors = small(**overrides).errors()
    assert len(errors) == 1 and message in errors[0], errors
