"""The hourglass (model.hourglass, Nawrot et al. 2022): causality for every pooling, upsampling and shortening
factor (and window lengths that are not multiples of it), shortening and upsampling against their definitions,
intermediate heads at full-resolution blocks only, strided evaluation and sampling without a cache, refusals."""
import numpy as np
import pytest
import torch

from model import GPT, ModelConfig
from model.hourglass import Hourglass
from model.kv_cache import KVCache
from train.config import ConfigError
from train.evaluate import evaluate_bytes, evaluate_cached
from train.sample import generate


def small(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(n_layer=4, n_head=2, d_model=16, d_ff=32, block_size=24, pos_emb="rope",
                                 hourglass=(1, 2, 1), shorten_factor=3), **kw})


@pytest.mark.parametrize("pool", ["avg", "linear"])
@pytest.mark.parametrize("upsample", ["repeat", "linear"])
@pytest.mark.parametrize("k,T", [(2, 24), (3, 24), (4, 23)])
def test_no_output_sees_a_later_byte(pool, upsample, k, T):
    torch.manual_seed(0)
    model = GPT(small(shorten_factor=k, hourglass_pool=pool, hourglass_upsample=upsample)).eval()
    x = torch.randint(0, 256, (1, T))
    with torch.no_grad():
        base = model(x)
        for t in (0, k - 1, k, 11, T - 1):
            changed = x.clone()
            changed[0, t] = (x[0, t] + 1) % 256
            out = model(changed)
            assert torch.equal(out[:, :t], base[:, :t]), f"byte {t} changed an earlier output"
            assert not torch.allclose(out[:, t], base[:, t])


def test_shortening_and_upsampling_follow_their_definitions():
    """avg: shortened j = mean of positions j k - k + 1 .. j k (zeros before the start); repeat: position t takes
    shortened floor(t / k)."""
    hourglass = Hourglass(small(shorten_factor=3))
    x = torch.randn(2, 12, 16)
    s = hourglass.shorten(x)
    padded = torch.cat([torch.zeros(2, 2, 16), x], dim=1)
    expected = torch.stack([padded[:, 3 * j: 3 * j + 3].mean(1) for j in range(4)], dim=1)
    torch.testing.assert_close(s, expected)
    up = hourglass.expand(s, 12)
    assert all(torch.equal(up[:, t], s[:, t // 3]) for t in range(12))


def test_intermediate_heads_only_at_full_resolution_blocks():
    cfg = small(n_layer=6, hourglass=(2, 2, 2), intermediate_loss=True)
    model = GPT(cfg)
    assert cfg.n_intermediate == 3 and model.heads.names(True)[:3] == ["L1/t+1", "L2/t+1", "L3/t+1"]
    x, y = torch.randint(0, 256, (2, 24)), torch.randint(0, 256, (2, 24))
    loss, per_head = model(x, y, torch.ones(4))
    assert per_head.shape == (4,) and torch.isfinite(loss)


def test_strided_evaluation_and_sampling_without_a_cache():
    torch.manual_seed(1)
    model = GPT(small()).eval()
    text = np.frombuffer(b"An hourglass shortens the middle of the stack. " * 3, dtype=np.uint8)
    result = evaluate_bytes(model, text, 1, len(text), 24, 5, progress=False)  # windows of every length
    assert result["bytes"] == len(text) - 1 and np.isfinite(result["bpc"])
    out = generate(model, b"An ", 30, temperature=0.0)
    assert len(out) == 30 and out == generate(model, b"An ", 30, temperature=0.0, use_cache=False)
    with pytest.raises(ValueError, match="no KV cache"):
        KVCache(model.cfg, 1, 24, 24, "cpu")
    with pytest.raises(ConfigError, match="use --mode strided"):
        evaluate_cached(model, text, 1, len(text), progress=False)


@pytest.mark.parametrize("overrides,message", [
    (dict(hourglass=(1, 2)), "must be three block counts"),
    (dict(hourglass=(1, 1, 1)), "adding up to model.n_layer=4"),
    (dict(shorten_factor=5), "must be >= 2 and divide model.block_size=24"),
    (dict(mem_len=8), "not implemented with model.mem_len=8"),
])
def test_bad_settings_are_one_line_errors(overrides, message):
    errors = small(**overrides).errors()
    assert len(errors) == 1 and message in errors[0], errors
