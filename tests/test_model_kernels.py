"""model.kernels=triton (fused RMSNorm, SwiGLU and multi-head loss; the interpreter on a CPU) gives the loss and
gradients of model.kernels=torch, eagerly and under torch.compile(fullgraph=True), with the paper's head layout
(t+1 and t+2 heads at every layer: two heads per hidden state)."""
import pytest
import torch

from model import GPT, ModelConfig, head_weights
from train.config import tiny

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def loss_and_grads(cfg: ModelConfig, compile_: bool = False):
    torch.manual_seed(0)
    model = GPT(cfg).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (3, cfg.block_size), generator=g).to(DEVICE)
    y = torch.randint(0, 256, (3, cfg.block_size), generator=g).to(DEVICE)
    hw = torch.tensor(head_weights(cfg, 0.0), device=DEVICE)
    fn = torch.compile(model, fullgraph=True) if compile_ else model
    loss, _ = fn(x, y, hw)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def tiny_model(**kw) -> ModelConfig:
    cfg = tiny().model
    for k, v in dict(norm="rmsnorm", activation="swiglu", intermediate_loss=True, n_layer=3, n_targets=2,
                     target_weights=(1.0, 0.5), intermediate_targets=2, **kw).items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
def test_triton_kernels_match_torch_in_the_model(compile_):
    ref_loss, ref_grads = loss_and_grads(tiny_model(kernels="torch"))
    loss, grads = loss_and_grads(tiny_model(kernels="triton"), compile_)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
