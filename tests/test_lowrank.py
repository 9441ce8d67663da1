"""Low-rank projections (model.low_rank, model.low_rank_targets): a full-rank factorisation of a full model's
weights reproduces it; a lower rank is the best rank-r approximation (Eckart-Young); parameters and targets;
the product's initial scale; the memory path reading a factored qkv; one-line errors."""
import math

import pytest
import torch

from model import GPT, ModelConfig
from model.lowrank import LowRankLinear, factorize_state_dict

TARGETS = ("qkv", "attn_out", "mlp_in", "mlp_out")


def small(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(n_layer=2, n_head=2, d_model=24, d_ff=40, block_size=13), **kw})


@pytest.mark.parametrize("shape", [dict(), dict(norm="rmsnorm", activation="swiglu", pos_emb="rope", bias=False),
                                   dict(attn_type="differential", pos_emb="rope"),
                                   dict(attn_type="mla", pos_emb="rope", kv_lora_rank=8, rope_head_dim=4)],
                         ids=["gpt2-like", "llama-like", "differential", "mla"])
def test_a_full_rank_factorisation_of_a_full_models_weights_reproduces_it(shape):
    """Rank d_model reaches min(in, out) of every target: the truncated SVD is exact (fp64)."""
    torch.manual_seed(0)
    full = GPT(small(**shape)).double().eval()
    targets = tuple(t for t in TARGETS if not (shape.get("attn_type") == "mla" and t == "qkv"))
    low = GPT(small(**shape, low_rank=24, low_rank_targets=targets)).double().eval()
    assert sum(isinstance(m, LowRankLinear) for m in low.modules()) == 2 * len(targets)
    low.load_state_dict(factorize_state_dict(full.state_dict(), low))
    x = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(low(x), full(x), rtol=1e-10, atol=1e-10)


def test_a_lower_rank_is_the_best_rank_r_approximation():
    torch.manual_seed(1)
    full = GPT(small()).double()
    errors = []
    for rank in (2, 6, 12, 24):
        low = GPT(small(low_rank=rank, low_rank_targets=("mlp_in",))).double()
        low.load_state_dict(factorize_state_dict(full.state_dict(), low))
        weight, product = full.blocks[0].mlp.fc.weight, low.blocks[0].mlp.fc.weight
        s = torch.linalg.svdvals(weight)
        dropped = math.sqrt(float((s[rank:] ** 2).sum()))  # Eckart-Young: the least any rank-r matrix leaves
        errors.append(float(torch.linalg.matrix_norm(weight - product)))
        assert errors[-1] == pytest.approx(dropped, rel=1e-9, abs=1e-12)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-12


def test_parameters_and_targets():
    full = GPT(small()).num_params()
    mlp_only = GPT(small(low_rank=4, low_rank_targets=("mlp_in", "mlp_out")))
    d, f, r = 24, 40, 4
    saved = 2 * ((d * f - r * (d + f)) * 2)  # two layers, fc and proj each: d*f weights -> r*(d+f)
    assert mlp_only.num_params() == full - saved
    assert isinstance(mlp_only.blocks[0].mlp.fc, LowRankLinear) and isinstance(mlp_only.blocks[1].mlp.proj,
                                                                                LowRankLinear)
    assert not isinstance(mlp_only.blocks[0].attn.qkv, LowRankLinear)
    assert GPT(small(low_rank=0)).num_params() == full  # the neutral value is the baseline


@pytest.mark.parametrize("init", ["normal", "gpt2"])
def test_the_products_start_at_the_scale_of_the_full_matrices(init):
    """Entries of U V have the full matrix's standard deviation (0.02; gpt2: the residual projections divided by
    sqrt(2 n_layer)), not the product of two small factors."""
    torch.manual_seed(2)
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=256, d_ff=512, block_size=8, low_rank=64, init=init)
    model = GPT(cfg)
    out_std = 0.02 / math.sqrt(4) if init == "gpt2" else 0.02
    assert float(model.blocks[0].attn.qkv.weight.std()) == pytest.approx(0.02, rel=0.05)
    assert float(model.blocks[0].mlp.proj.weight.std()) == pytest.approx(out_std, rel=0.05)


def test_memory_attention_reads_the_factored_qkv():
    """Transformer-XL memory projects keys from the memory with the qkv matrix: a factored qkv serves it, and a
    full-rank factorisation gives the full model's outputs segment after segment."""
    from model.memory import SegmentMemory
    torch.manual_seed(3)
    cfg = small(pos_emb="rope", mem_len=13)
    full = GPT(cfg).double().eval()
    low = GPT(small(pos_emb="rope", mem_len=13, low_rank=24)).double().eval()
    low.load_state_dict(factorize_state_dict(full.state_dict(), low))
    x = torch.randint(0, 256, (2, 39))
    memories = [SegmentMemory(m.cfg, 2, "cpu", torch.float64) for m in (full, low)]
    with torch.no_grad():
        for t in range(0, 39, 13):
            a, b = (m(x[:, t:t + 13], memory=mem) for m, mem in zip((full, low), memories))
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("overrides,message", [
    (dict(low_rank=-1), "model.low_rank must be >= 0"),
    (dict(low_rank=4, low_rank_targets=("mlp",)), "a non-empty list of qkv, attn_out, mlp_in, mlp_out (got mlp)"),
    (dict(low_rank=4, attn_type="mla", pos_emb="rope"), "qkv is not a projection of model.attn_type=mla"),
])
def test_bad_settings_are_one_line_errors(overrides, message):
    errors = small(**overrides).errors()
    assert len(errors) == 1 and message in errors[0], errors


def test_targets_from_the_command_line():
    from train.config import ConfigError, parse_args
    cfg = parse_args(["--preset=tiny", "--model.low_rank=4", "--model.low_rank_targets=mlp_in, mlp_out"]).cfg
    assert cfg.model.low_rank_targets == ("mlp_in", "mlp_out")
    with pytest.raises(ConfigError, match="low_rank_targets must be a non-empty list"):
        parse_args(["--preset=tiny", "--model.low_rank=4", "--model.low_rank_targets=attn"])
