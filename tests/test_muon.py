"""Muon: the orthogonalisation, which parameters it takes, its AdamW half against torch's, the lr schedule per
group, and exact resume of its state."""
import copy

import pytest
import torch

from model import GPT, head_weights
from train.config import TrainConfig, tiny
from train.muon import Muon, orthogonalise
from train.optim import build_optimizer


@pytest.mark.parametrize("shape", [(37, 91), (91, 37), (64, 64)])
def test_newton_schulz_pushes_every_singular_value_near_one_keeping_the_singular_vectors(shape):
    k = min(shape)
    u = torch.linalg.qr(torch.randn(shape[0], k, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(shape[1], k, dtype=torch.float64)).Q
    g = u @ torch.diag(torch.logspace(-1, 0, k, dtype=torch.float64)) @ v.T  # singular values 0.1 .. 1
    o = orthogonalise(g.float()).double()
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.5 and s.max() < 1.25, s  # the quintic's range: not exactly 1, by design
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh  # the exact orthogonal factor; o = U diag(~1) V^T shares its singular vectors
    cosine = (o * polar).sum() / (o.norm() * polar.norm())
    assert cosine > 0.95, cosine


@pytest.mark.parametrize("shape", [(3, 37, 91), (2, 91, 37)])
def test_a_stack_of_matrices_is_orthogonalised_matrix_by_matrix(shape):
    g = torch.randn(shape)
    stacked = orthogonalise(g)
    for one, alone in zip(stacked, (orthogonalise(m) for m in g)):
        torch.testing.assert_close(one, alone, rtol=1e-5, atol=1e-6)


def test_a_muon_step_is_the_orthogonalised_nesterov_momentum_scaled_by_the_aspect_ratio():
    """Two steps on a tall and a wide matrix against the formula: decay, buf = m buf + (1 - m) g, update
    (1 - m) g + m buf orthogonalised, times lr * sqrt(max(1, rows / cols))."""
    torch.manual_seed(3)
    lr, momentum, decay = 0.02, 0.9, 0.1
    tall, wide = torch.nn.Parameter(torch.randn(12, 5)), torch.nn.Parameter(torch.randn(5, 12))
    expected = [tall.detach().clone(), wide.detach().clone()]
    buffers = [torch.zeros(12, 5), torch.zeros(5, 12)]
    opt = Muon([{"params": [tall, wide], "muon": True, "weight_decay": decay}], lr=lr, betas=(0.9, 0.95),
               momentum=momentum)
    for _ in range(2):
        grads = [torch.randn(12, 5), torch.randn(5, 12)]
        tall.grad, wide.grad = (g.clone() for g in grads)
        opt.step()
        for i, (g, (rows, cols)) in enumerate(zip(grads, [(12, 5), (5, 12)])):
            buffers[i] = momentum * buffers[i] + (1 - momentum) * g
            update = orthogonalise((1 - momentum) * g + momentum * buffers[i])
            expected[i] = expected[i] * (1 - lr * decay) - lr * max(1.0, rows / cols) ** 0.5 * update
    torch.testing.assert_close(tall.detach(), expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wide.detach(), expected[1], rtol=1e-5, atol=1e-6)


def model_and_optimizer(seed=0, **train):
    cfg = tiny()
    cfg.model.pos_emb = "learned_per_layer"
    torch.manual_seed(seed)
    model = GPT(cfg.model)
    t = TrainConfig(optimizer="muon", **train)
    return cfg, model, build_optimizer(model, t, train_bytes=1000), t


def test_the_blocks_matrices_go_to_muon_and_everything_else_to_adamw():
    cfg, model, opt, t = model_and_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]}
    expected = {n for n, p in model.named_parameters()
                if n.startswith("blocks.") and p.dim() == 2 and not n.endswith("pos.weight")}
    assert muon == expected and len(muon) == 4 * cfg.model.n_layer
    assert all(g["lr_scale"] == pytest.approx(t.muon_lr / t.lr) for g in opt.param_groups if g["muon"])
    others = {names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]}
    assert {"tok_emb.weight", "heads.main", "blocks.0.pos.weight", "norm_f.weight"} <= others
    decay = {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay["tok_emb.weight"] == decay["blocks.0.attn.qkv.weight"] == t.weight_decay > 0
    assert decay["norm_f.weight"] == decay["blocks.0.attn.qkv.bias"] == 0.0  # gains and biases never decay
    assert all(g["lr_scale"] == 1.0 for g in opt.param_groups if not g["muon"])  # AdamW's groups: train.lr itself


def test_its_adamw_half_matches_torch_adamw():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 7)), torch.nn.Parameter(torch.randn(7))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = Muon([{"params": params, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.99), momentum=0.95)
    ref = torch.optim.AdamW([{"params": twins, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def steps(cfg, model, opt, n, seed):
    gen = torch.Generator().manual_seed(seed)
    hw = torch.tensor(head_weights(cfg.model, 0.0))
    for _ in range(n):
        x = torch.randint(0, 256, (3, cfg.model.block_size), generator=gen)
        loss, _ = model(x, torch.roll(x, -1, 1), hw)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_state_dict_round_trip_continues_bit_for_bit():
    cfg, model, opt, _ = model_and_optimizer()
    steps(cfg, model, opt, 3, seed=1)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    steps(cfg, model, opt, 3, seed=2)
    _, resumed, resumed_opt, _ = model_and_optimizer(seed=5)  # other initial weights, overwritten by the load
    resumed.load_state_dict(saved_model)
    resumed_opt.load_state_dict(saved_opt)
    steps(cfg, resumed, resumed_opt, 3, seed=2)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
