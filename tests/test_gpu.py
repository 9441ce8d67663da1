"""CUDA checks (ctest -L gpu; skipped without a GPU): bf16 autocast, torch.compile, flash attention."""
import dataclasses
import importlib.util
import math

import pytest
import torch

from conftest import read_metrics, tiny_config
from model import GPT, head_weights
from train.config import Args, t12
from train.loop import train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_loss_tracks_fp32_on_t12():
    cfg = t12().model
    torch.manual_seed(0)
    model = GPT(cfg).cuda().eval()
    x = torch.randint(0, 256, (4, cfg.block_size), device="cuda")
    y = torch.randint(0, 256, (4, cfg.block_size), device="cuda")
    hw = torch.tensor(head_weights(cfg, 0.0), device="cuda")
    with torch.no_grad():
        ref, _ = model(x, y, hw)
        with torch.autocast("cuda", torch.bfloat16):
            low, _ = model(x, y, hw)
    assert low.dtype == torch.float32 and abs(float(low) - float(ref)) < 1e-2 * float(ref)


def test_compiled_bf16_training_on_cuda(small_corpus, tmp_path):
    cfg = tiny_config(small_corpus, tmp_path / "run", train__precision="bf16", train__compile="true",
                      train__device="cuda", model__intermediate_loss="true", model__n_layer="3")
    final = train(Args(cfg, "tiny"))
    losses = [r["train_loss"] for r in read_metrics(tmp_path / "run") if "train_loss" in r and "event" not in r]
    assert all(math.isfinite(v) for v in losses) and sum(losses[-3:]) < sum(losses[:3]) - 0.9
    assert math.isfinite(final["full_val_bpc"])


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed here")
def test_flash_attention_matches_sdpa():
    cfg = dataclasses.replace(t12().model, n_layer=2, dropout=0.0, attention="sdpa")
    x = torch.randint(0, 256, (2, cfg.block_size), device="cuda")
    outs = []
    for attention in ("sdpa", "flash"):
        torch.manual_seed(0)
        model = GPT(dataclasses.replace(cfg, attention=attention)).cuda()
        with torch.autocast("cuda", torch.bfloat16):
            outs.append(model(x).float())
    assert (outs[0] - outs[1]).abs().max().item() < 5e-2 * outs[0].abs().max().item()


@pytest.mark.parametrize("impl", ["gemm", "fused"])
def test_fused_loss_under_autocast_matches_the_reference_under_autocast(impl):
    from kernels import multihead_cross_entropy
    from kernels.reference import multihead_cross_entropy_ref
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 4096, 512, generator=g).cuda()  # fp32, as LayerNorm outputs under autocast
    weight = (torch.randn(4, 256, 512, generator=g) * 0.02).cuda()
    targets = torch.randint(0, 256, (4, 4096), generator=g).cuda()
    hw, source = torch.tensor([1.0, 1.0, 1.0, 0.5]).cuda(), torch.tensor([0, 1, 2, 2]).cuda()
    with torch.autocast("cuda", torch.bfloat16):
        got = multihead_cross_entropy(hidden, weight, targets, hw, source, impl=impl)
        want = multihead_cross_entropy_ref(hidden, weight, targets, hw, source)
    exact = multihead_cross_entropy_ref(hidden.double(), weight.double(), targets, hw.double(), source)
    assert abs(float(got) - float(exact)) <= 2 * abs(float(want) - float(exact)) + 1e-3 * float(exact)
