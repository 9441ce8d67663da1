"""The optimisers' construction: AdamW and Adam take their fused form on a CPU too (not with FSDP or elsewhere),
and step as the for-each form does; IVON's sample size and its gradient samples; the learning-rate schedule."""
import copy
import dataclasses
import math

import pytest
import torch

from model import GPT, ModelConfig
from train.config import TrainConfig
from train.optim import build_optimizer, lr_at, param_groups


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam)])
def test_adam_is_fused_on_a_cpu_and_steps_like_the_for_each_form(name, cls):
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=24, d_ff=40, block_size=16, ngram_max=3, ngram_buckets=29))
    t = TrainConfig(optimizer=name, lr=3e-3, weight_decay=0.1)
    optimizer = build_optimizer(model, t, train_bytes=1000)
    assert optimizer.defaults["fused"]
    reference, start = copy.deepcopy(model), copy.deepcopy(model)
    reference_optimizer = cls(param_groups(reference, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                              foreach=True)
    for _ in range(3):
        for p, q in zip(model.parameters(), reference.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        optimizer.step()
        reference_optimizer.step()
    for p, q, before in zip(model.parameters(), reference.parameters(), start.parameters()):
        assert not torch.equal(p, before)
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # FSDP's sharded parameters and devices without a fused kernel take the default form
    assert build_optimizer(model, dataclasses.replace(t, fsdp=True), train_bytes=1000).defaults["fused"] is None
    assert build_optimizer(copy.deepcopy(model).to("meta"), t, train_bytes=1000).defaults["fused"] is None


def test_ivon_samples_the_weights_in_each_step_and_learns_from_the_samples():
    """train.ivon_ess=0 means the training split's size; sampling() draws a weight sample for the forward and
    backward and hands its gradient to IVON, whose step then moves the mean weights."""
    from train.optim import sampling
    torch.manual_seed(1)
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=16, d_ff=24, block_size=8))
    optimizer = build_optimizer(model, TrainConfig(optimizer="ivon", ivon_ess=0, lr=0.1), train_bytes=12345)
    assert {g["ess"] for g in optimizer.param_groups} == {12345.0}
    assert build_optimizer(model, TrainConfig(optimizer="ivon", ivon_ess=500), 12345).param_groups[0]["ess"] == 500
    before = copy.deepcopy(model.state_dict())
    x = torch.randint(0, 256, (2, 8))
    with sampling(optimizer):
        loss, _ = model(x, torch.roll(x, -1, 1), torch.tensor([1.0]))
        loss.backward()
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())  # the mean is back
    optimizer.step()
    assert not torch.equal(model.heads.main, before["heads.main"])


def test_the_schedule_warms_up_from_the_first_step_then_decays_or_stays():
    """Warmup: the first step already trains (lr / warmup_steps), the last warmup step reaches lr; then cosine
    from lr to lr * min_lr_ratio as progress goes 0 -> 1 (clamped outside), or constant."""
    t = TrainConfig(lr=2e-3, warmup_steps=4, min_lr_ratio=0.1, schedule="cosine")
    assert [lr_at(t, step, 0.0) for step in range(4)] == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3])
    floor = 2e-4
    for progress, expected in [(0.0, 2e-3), (0.25, floor + 1.8e-3 * 0.5 * (1 + math.cos(math.pi / 4))),
                               (0.5, 1.1e-3), (1.0, floor), (1.5, floor), (-0.1, 2e-3)]:
        assert lr_at(t, 10, progress) == pytest.approx(expected), progress
    constant = TrainConfig(lr=2e-3, warmup_steps=0, schedule="constant")
    assert [lr_at(constant, step, p) for step, p in [(0, 0.0), (7, 0.5), (99, 1.0)]] == [2e-3] * 3
