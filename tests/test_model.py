"""The network: parameter count of T12, the auxiliary-loss heads and their schedule, the batched loss."""
import math

import pytest
import torch
import torch.nn.functional as F

from kernels.reference import IGNORE_INDEX, multihead_cross_entropy_ref
from model import GPT, ModelConfig, head_weights
from model.gpt import shifted_targets
from train.config import t12


def small(**kw) -> ModelConfig:
    base = dict(n_layer=3, n_head=2, d_model=16, d_ff=24, block_size=12)
    return ModelConfig(**{**base, **kw})


def test_t12_has_about_44m_parameters():
    n = GPT(t12().model).num_params()
    # 12 x (attention 1.05M + MLP 2.10M + positions 0.26M) + 13 classifier heads: 42.8M; the paper reports 44M
    assert 42_000_000 <= n <= 46_000_000, n


def test_t12_heads_are_the_papers_auxiliary_losses():
    cfg = t12().model
    assert cfg.n_intermediate == 11 and cfg.n_targets == 2 and cfg.target_weights == (1.0, 0.5)
    assert len(head_weights(cfg, 0.0)) == 13


def test_intermediate_layer_l_stops_at_l_over_2n():
    cfg = small(n_layer=4, intermediate_loss=True, n_targets=2, target_weights=(1.0, 0.5), intermediate_weight=0.7)
    n = cfg.n_layer
    for l in range(1, n):  # heads 0..n-2 belong to layers 1..n-1
        before, after = head_weights(cfg, l / (2 * n) - 1e-9), head_weights(cfg, l / (2 * n))
        assert before[l - 1] == 0.7
        if l < n - 1:
            assert after[l - 1] == 0.0 and after[l] == 0.7
    assert head_weights(cfg, 0.0) == [0.7, 0.7, 0.7, 1.0, 0.5]
    assert head_weights(cfg, (n - 1) / (2 * n)) == [1.0, 0.5]  # all stopped: the intermediate heads are dropped
    assert head_weights(cfg, 1.0) == [1.0, 0.5]
    assert head_weights(small(), 0.0) == [1.0]


def test_shifted_targets_predict_t_plus_k():
    y = torch.arange(10).view(2, 5)
    assert torch.equal(shifted_targets(y, 1), y)
    assert shifted_targets(y, 3).tolist() == [[2, 3, 4, -100, -100], [7, 8, 9, -100, -100]]


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
    per_head = multihead_cross_entropy_ref(hidden, weight, targets, hw, source, bias, reduction="none")
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


def test_model_loss_matches_heads_scored_one_by_one():
    torch.manual_seed(0)
    cfg = small(intermediate_loss=True, n_targets=2, target_weights=(1.0, 0.5))
    model = GPT(cfg).eval()
    x, y = torch.randint(0, 256, (2, 12)), torch.randint(0, 256, (2, 12))
    hw = torch.tensor(head_weights(cfg, 0.0))
    loss, per_head = model(x, y, hw)
    # recompute every head by hand from the blocks' outputs
    h = model.pos_emb(model.tok_emb(x))
    outs = []
    for block in model.blocks:
        h = block(h)
        outs.append(h)
    heads = model.heads
    expect = []
    for l in range(cfg.n_layer - 1):
        logits = heads.inter_norms[l](outs[l]) @ heads.inter[l].t() + heads.bias[l]
        expect.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()))
    final = model.norm_f(outs[-1])
    expect.append(F.cross_entropy((final @ heads.main.t() + heads.bias[2]).flatten(0, 1), y.flatten()))
    logits2 = final @ heads.extra[0].t() + heads.bias[3]
    expect.append(F.cross_entropy(logits2[:, :-1].flatten(0, 1), y[:, 1:].flatten()))
    torch.testing.assert_close(per_head, torch.stack(expect).detach())
    torch.testing.assert_close(loss, (hw * torch.stack(expect)).sum())
    # evaluation: logits of the t+1 head, and its loss alone
    logits = model(x)
    eval_loss, _ = model(x, y)
    torch.testing.assert_close(eval_loss, F.cross_entropy(logits.flatten(0, 1), y.flatten()))
    torch.testing.assert_close(eval_loss, per_head[2])


def test_dropped_intermediate_heads_get_no_gradient():
    cfg = small(intermediate_loss=True)
    model = GPT(cfg)
    x, y = torch.randint(0, 256, (2, 12)), torch.randint(0, 256, (2, 12))
    loss, per_head = model(x, y, torch.tensor(head_weights(cfg, 1.0)))
    loss.backward()
    assert per_head.shape == (1,) and model.heads.inter.grad is None
    assert model.heads.main.grad is not None


def test_causality_the_future_does_not_change_the_past():
    for pos_emb in ("learned", "learned_per_layer", "rope"):
        model = GPT(small(pos_emb=pos_emb)).eval()
        x = torch.randint(0, 256, (1, 12))
        x2 = x.clone()
        x2[0, 7:] = (x2[0, 7:] + 1) % 256
        torch.testing.assert_close(model(x)[0, :7], model(x2)[0, :7])
        assert not torch.allclose(model(x)[0, 7:], model(x2)[0, 7:])


def test_tied_embeddings_share_one_tensor():
    model = GPT(small(tie_embeddings=True))
    assert model.heads.main is model.tok_emb.weight
    assert model.num_params() == GPT(small()).num_params() - 256 * 16


def test_init_schemes():
    def std_of(init):
        torch.manual_seed(0)
        m = GPT(small(n_layer=8, d_model=64, d_ff=256, init=init))
        return m.blocks[0].attn.qkv.weight.std().item(), m.blocks[0].mlp.proj.weight.std().item()
    qkv, proj = std_of("normal")
    assert abs(qkv - 0.02) < 2e-3 and abs(proj - 0.02) < 2e-3
    qkv, proj = std_of("gpt2")
    assert abs(qkv - 0.02) < 2e-3 and abs(proj - 0.02 / 4) < 5e-4
    qkv, _ = std_of("small")
    assert abs(qkv - math.sqrt(2 / (5 * 64))) < 0.01


def test_sequences_longer_than_the_context_are_refused():
    with pytest.raises(ValueError, match="exceeds block_size"):
        GPT(small())(torch.zeros(1, 13, dtype=torch.long))
