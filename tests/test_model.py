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


def test_t12_has_the_papers_44m_parameters():
    n = GPT(t12().model).num_params()
    # 12 x (attention 1.05M + MLP 2.10M + positions 0.26M) + 24 classifier heads of 0.13M; the paper reports 44M
    assert 44_000_000 <= n <= 44_500_000, n


def test_t12_heads_are_the_papers_auxiliary_losses():
    cfg = t12().model
    assert cfg.n_intermediate == 11 and cfg.n_targets == 2 and cfg.target_weights == (1.0, 0.5)
    assert head_weights(cfg, 0.0) == [1.0, 0.5] * 12  # t+1 and t+2 at every layer: 24 heads
    assert head_weights(cfg, 0.5) == [1.0, 0.5]  # from half-time on only the last layer's


def test_intermediate_targets_weights_follow_target_weights():
    cfg = small(n_layer=3, intermediate_loss=True, n_targets=3, target_weights=(1.0, 0.5, 0.25),
                intermediate_weight=0.4, intermediate_targets=2)
    assert cfg.n_intermediate_heads == 4
    assert head_weights(cfg, 0.0) == [0.4, 0.2, 0.4, 0.2, 1.0, 0.5, 0.25]
    assert head_weights(cfg, 1 / 6) == [0.0, 0.0, 0.4, 0.2, 1.0, 0.5, 0.25]  # layer 1 stopped at 1/6


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


def ce(logits, y, k):
    """Mean CE of a t+k head: position t predicts y[:, t+k-1]; the last k-1 positions have no target."""
    T = y.shape[1]
    return F.cross_entropy(logits[:, : T - k + 1].flatten(0, 1), y[:, k - 1:].flatten())


@pytest.mark.parametrize("n_layer", [2, 3])
@pytest.mark.parametrize("intermediate_targets", [1, 2])
def test_model_loss_matches_heads_scored_one_by_one(intermediate_targets, n_layer):
    torch.manual_seed(0)
    cfg = small(intermediate_loss=True, n_targets=2, target_weights=(1.0, 0.5),
                intermediate_targets=intermediate_targets, n_layer=n_layer)
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.heads.bias.normal_()  # zero at init: make the layout of the biases visible too
    x, y = torch.randint(0, 256, (2, 12)), torch.randint(0, 256, (2, 12))
    hw = torch.tensor(head_weights(cfg, 0.0))
    loss, per_head = model(x, y, hw)
    # recompute every head by hand from the blocks' outputs: layer-major, t+1..t+k per layer, then the final heads
    h = model.pos_emb(model.tok_emb(x))
    outs = []
    for block in model.blocks:
        h = block(h)
        outs.append(h)
    heads = model.heads
    expect, head = [], 0
    for l in range(cfg.n_layer - 1):
        hidden = heads.inter_norms[l](outs[l])
        for k in range(1, intermediate_targets + 1):
            expect.append(ce(hidden @ heads.inter[head].t() + heads.bias[head], y, k))
            head += 1
    final = model.norm_f(outs[-1])
    expect.append(ce(final @ heads.main.t() + heads.bias[head], y, 1))
    expect.append(ce(final @ heads.extra[0].t() + heads.bias[head + 1], y, 2))
    assert len(expect) == len(hw) == (cfg.n_layer - 1) * intermediate_targets + 2
    names = [f"L{l + 1}/t+{k}" for l in range(cfg.n_layer - 1) for k in range(1, intermediate_targets + 1)]
    assert heads.names(with_inter=True) == names + ["final/t+1", "final/t+2"]  # the logs' per-head keys
    assert heads.names(with_inter=False) == ["final/t+1", "final/t+2"]
    torch.testing.assert_close(per_head, torch.stack(expect).detach())
    torch.testing.assert_close(loss, (hw * torch.stack(expect)).sum())
    # evaluation: logits of the t+1 head, and its loss alone
    logits = model(x)
    eval_loss, _ = model(x, y)
    torch.testing.assert_close(eval_loss, F.cross_entropy(logits.flatten(0, 1), y.flatten()))
    torch.testing.assert_close(eval_loss, per_head[head])


def test_every_bias_starts_at_zero_and_is_never_decayed():
    from train.config import TrainConfig
    from train.optim import build_optimizer
    model = GPT(small(intermediate_loss=True, n_targets=2, target_weights=(1.0, 0.5), intermediate_targets=2))
    names = {id(p): n for n, p in model.named_parameters()}
    biases = [n for n in names.values() if n.endswith("bias")]
    assert "heads.bias" in biases and model.heads.bias.dim() == 2  # (heads, V): shaped like a matrix
    for n, p in model.named_parameters():
        if n.endswith("bias"):
            assert (p == 0).all(), n
    groups = build_optimizer(model, TrainConfig(weight_decay=0.1), train_bytes=1000).param_groups
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed and not any(n.endswith("bias") for n in decayed)
    assert {"heads.inter", "heads.main", "tok_emb.weight"} <= decayed
    shapes = {n: p.dim() for n, p in model.named_parameters()}
    assert all(shapes[n] >= 2 for n in decayed)  # no norm gains
    assert sum(len(g["params"]) for g in groups) == len(names)


def test_head_bias_is_its_own_knob():
    def n_bias(model):
        return sum(n.endswith("bias") for n, _ in model.named_parameters())
    heads_only = GPT(small(bias=False, head_bias=True))
    assert heads_only.heads.bias is not None and n_bias(heads_only) == 1
    assert GPT(small(bias=True, head_bias=False)).heads.bias is None
    assert n_bias(GPT(small(bias=False, head_bias=False))) == 0


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


def test_training_flops_per_token_count_every_matmul_and_the_active_heads():
    from train.config import t12
    cfg = t12().model
    model = GPT(cfg)
    D, F, L, T, V = cfg.d_model, cfg.d_ff, cfg.n_layer, cfg.block_size, cfg.vocab_size
    blocks = L * (3 * D * D + D * D + D * F + F * D)  # qkv, out-projection, fc, proj (positions are lookups)
    assert model.flops_per_token(0) == 6 * blocks + 12 * L * D * T
    assert model.flops_per_token(24) - model.flops_per_token(2) == 6 * 22 * V * D


def test_mfu_peaks_tell_card_variants_apart():
    """The dense bf16 peak by device name: PCIe and NVL H100s are not the SXM part, an A10 is not an A100, an L40S
    is not an L4; an unknown card has no peak (no MFU rather than a wrong one)."""
    from train.hardware import peak_for_name
    assert peak_for_name("NVIDIA H100 80GB HBM3") == peak_for_name("NVIDIA H200") == 989e12
    assert peak_for_name("NVIDIA H100 PCIe") == 756e12 and peak_for_name("NVIDIA H100 NVL") == 835e12
    assert peak_for_name("NVIDIA A100-SXM4-80GB") == peak_for_name("NVIDIA A100 80GB PCIe") == 312e12
    assert peak_for_name("NVIDIA A10") == 125e12 and peak_for_name("NVIDIA A10G") is None
    assert peak_for_name("NVIDIA L40S") == 362e12 and peak_for_name("NVIDIA L4") == 121e12
    assert peak_for_name("NVIDIA GeForce RTX 4090") is None


@pytest.mark.parametrize("variant", [dict(), dict(pos_emb="xl_relative"),
                                     dict(attn_type="differential", pos_emb="rope"),
                                     dict(attn_type="mla", pos_emb="rope", kv_lora_rank=8, rope_head_dim=4),
                                     dict(attn_pattern="local", attn_window=5)])
def test_dropout_acts_only_in_training(variant):
    """model.dropout (embeddings, attention weights, residual branches) is off in eval mode: there the model with
    dropout 0.5 gives exactly the outputs of the same weights without dropout; in training mode it does not."""
    torch.manual_seed(0)
    dropped = GPT(small(dropout=0.5, **variant))
    plain = GPT(small(**variant))
    plain.load_state_dict(dropped.state_dict())
    x = torch.randint(0, 256, (2, 12))
    torch.testing.assert_close(dropped.eval()(x), plain.eval()(x), rtol=0, atol=0)
    assert not torch.allclose(dropped.train()(x), plain(x))


def test_rotary_turns_each_channel_pair_by_position_times_its_frequency():
    """RoPE (Su et al. 2021), half-split layout: channels i and i + d/2 at position m turn by m * 10000^(-2i/d),
    (a, b) -> (a cos - b sin, b cos + a sin); explicit positions (a KV cache's) index the same angles."""
    from model.layers import Rotary
    torch.manual_seed(0)
    d, T = 8, 7
    rotary = Rotary(d, block_size=T)
    x = torch.randn(2, 3, T, d)

    def expected(positions):
        out = torch.empty_like(x)
        for t, m in enumerate(positions):
            for i in range(d // 2):
                angle = torch.tensor(m * 10000 ** (-2 * i / d))
                a, b = x[..., t, i], x[..., t, i + d // 2]
                cos, sin = angle.cos(), angle.sin()
                out[..., t, i], out[..., t, i + d // 2] = a * cos - b * sin, b * cos + a * sin
        return out
    torch.testing.assert_close(rotary(x), expected(range(T)), rtol=1e-5, atol=1e-5)
    positions = [3, 0, 13, 9, 1, 12, 5]  # up to 2 x block_size - 1: a window and a chunk of the cache
    torch.testing.assert_close(rotary(x, torch.tensor(positions)), expected(positions), rtol=1e-5, atol=1e-5)


def test_depth_scaled_residuals_scale_both_branches_of_every_block_by_one_over_sqrt_2n():
    """model.residual_scale=depth-scaled: x + s attn(norm1(x)), then + s mlp(norm2(.)), s = 1/sqrt(2 n_layer)."""
    torch.manual_seed(0)
    plain = GPT(small(n_layer=4)).eval()
    scaled = GPT(small(n_layer=4, residual_scale="depth-scaled")).eval()
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(2, 12, 16)
    s = 1 / math.sqrt(8)
    for block in scaled.blocks:
        h = x + s * block.attn(block.norm1(x))
        torch.testing.assert_close(block(x), h + s * block.mlp(block.norm2(h)), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(scaled.blocks[0](x), plain.blocks[0](x))
