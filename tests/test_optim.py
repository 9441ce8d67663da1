"""The optimisers' construction: AdamW and Adam take their fused form on a CPU too, and step as the for-each
form does."""
import copy

import pytest
import torch

from model import GPT, ModelConfig
from train.config import TrainConfig
from train.optim import build_optimizer, param_groups


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
