"""The network: parameter count of T12, the auxiliary-loss heads and their schedule, the batched loss."""
import math

import pytest
import torch
import torch.nn.functional as F

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
