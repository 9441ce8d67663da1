"""The KV cache: token-by-token decoding equals one full forward, for every positional scheme, for prefixes up
to block_size; the sliding window equals recomputing each window (one layer); a reset cache is a fresh one; the
window and chunk bounds; the attention backends agree."""
import importlib.util
import logging

import pytest
import torch

from model import GPT, ModelConfig
from model.attention import attend_math, attend_sdpa
from model.kv_cache import KVCache


def small(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(n_layer=3, n_head=2, d_model=32, d_ff=64, block_size=24), **kw})


@pytest.mark.parametrize("shape", [dict(pos_emb="learned"), dict(pos_emb="learned_per_layer"), dict(pos_emb="rope"),
                                   dict(pos_emb="xl_relative"), dict(pos_emb="rope", ngram_max=4, ngram_buckets=37)],
                         ids=["learned", "learned_per_layer", "rope", "xl_relative", "rope-ngrams"])
@pytest.mark.parametrize("chunks", [[1] * 24, [5, 1, 7, 11], [24]], ids=["one-by-one", "mixed", "whole"])
def test_cached_decoding_equals_full_forward(shape, chunks):
    """(With n-gram tables the cache carries each stream's last bytes from chunk to chunk.)"""
    torch.manual_seed(0)
    model = GPT(small(**shape)).eval()
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.cfg, 2, window=24, chunk=24, device="cpu")
        pieces, t = [], 0
        for n in chunks:
            pieces.append(model(x[:, t:t + n], cache=cache))
            t += n
    assert t == 24 and cache.length == 24
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [dict(pos_emb="rope"), dict(pos_emb="xl_relative"),
                                   dict(pos_emb="rope", attn_type="differential"),
                                   dict(pos_emb="rope", attn_type="mla", kv_lora_rank=8, rope_head_dim=4)],
                         ids=["rope", "xl_relative", "differential", "mla"])
def test_sliding_window_equals_recomputing_each_window(shape):
    """With one layer, a query over the rolling cache sees exactly the last `window` bytes: its logits equal a
    full forward over those bytes (relative positions: only distances matter), for every attention type with
    relative positions; the cache holds more positions than block_size (window - 1 + chunk)."""
    torch.manual_seed(1)
    model = GPT(small(n_layer=1, block_size=8, **shape)).eval()
    x = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        cache = KVCache(model.cfg, 1, window=8, chunk=3, device="cpu")
        streamed = torch.cat([model(x[:, t:t + 3], cache=cache) for t in range(0, 40, 3)], dim=1)
        for p in range(40):
            window = x[:, max(0, p - 7): p + 1]
            torch.testing.assert_close(streamed[:, p], model(window)[:, -1], rtol=1e-5, atol=1e-5)
    assert cache.start > 0 and cache.length <= cache.capacity  # it rolled


def test_a_reset_cache_decodes_a_new_stream_as_a_fresh_one():
    """After reset() (a stream's end in the cached evaluator), no key, value, position or n-gram byte of the old
    stream is left: the next stream's logits equal those from a new cache."""
    torch.manual_seed(3)
    model = GPT(small(pos_emb="rope", ngram_max=3, ngram_buckets=31)).eval()
    old, new = torch.randint(0, 256, (2, 1, 30))
    with torch.no_grad():
        used = KVCache(model.cfg, 1, window=12, chunk=6, device="cpu")
        for t in range(0, 30, 6):
            model(old[:, t:t + 6], cache=used)
        used.reset()
        assert (used.start, used.length) == (0, 0)
        fresh = KVCache(model.cfg, 1, window=12, chunk=6, device="cpu")
        for t in range(0, 30, 6):
            torch.testing.assert_close(model(new[:, t:t + 6], cache=used), model(new[:, t:t + 6], cache=fresh),
                                       rtol=0, atol=0)


@pytest.mark.parametrize("pos_emb", ["learned", "learned_per_layer"])
def test_learned_positions_refuse_a_stream_past_block_size(pos_emb):
    """The model itself (not only the evaluator) refuses to run a learned-position model past its table in the
    cache, with a message naming the way out; RoPE streams on."""
    model = GPT(small(pos_emb=pos_emb)).eval()
    x = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        cache = KVCache(model.cfg, 1, window=24, chunk=8, device="cpu")
        for t in range(0, 24, 8):
            model(x[:, t:t + 8], cache=cache)
        with pytest.raises(ValueError, match=f"pos_emb={pos_emb} has positions 0..23 only.*reaches position 24"):
            model(x[:, 24:25], cache=cache)
        narrow = KVCache(model.cfg, 1, window=8, chunk=4, device="cpu")  # rolls: positions count from the stream
        for t in range(0, 24, 4):
            model(x[:, t:t + 4], cache=narrow)
        assert narrow.start > 0 and narrow.start + narrow.length == 24
        with pytest.raises(ValueError, match="reaches position 24"):
            model(x[:, 24:25], cache=narrow)
        rope = GPT(small(pos_emb="rope")).eval()
        cache = KVCache(rope.cfg, 1, window=24, chunk=8, device="cpu")
        for t in range(0, 30, 6):
            rope(x[:, t:t + 6], cache=cache)
        assert cache.start + cache.length == 30


def test_cache_refuses_oversized_passes():
    cfg = small()
    for window, chunk in ((25, 4), (0, 4), (24, 25), (24, 0)):
        with pytest.raises(ValueError, match="must be in"):
            KVCache(cfg, 1, window=window, chunk=chunk, device="cpu")
    assert KVCache(cfg, 1, window=1, chunk=24, device="cpu").capacity == 24  # the bounds themselves are allowed
    cache = KVCache(cfg, 1, window=24, chunk=4, device="cpu")
    with pytest.raises(ValueError, match="exceeds the cache's chunk"):
        cache.make_room(5)


def test_sdpa_and_math_agree_on_outputs_and_gradients():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    dy = torch.randn(2, 3, 17, 8, generator=g, dtype=torch.float64)
    outs = []
    for fn in (attend_math, attend_sdpa):
        y = fn(q, k, v)
        grads = torch.autograd.grad(y, (q, k, v), dy)
        outs.append((y, *grads))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    mask = torch.rand(17, 17, generator=g) > 0.3
    mask[:, 0] = True  # every query sees at least one key
    torch.testing.assert_close(attend_math(q, k, v, mask), attend_sdpa(q, k, v, mask), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_models_with_each_backend_agree(pos_emb):
    x, y = torch.randint(0, 256, (2, 24)), torch.randint(0, 256, (2, 24))
    results = []
    for attention in ("math", "sdpa", "flash"):
        torch.manual_seed(3)
        model = GPT(small(attention=attention, pos_emb=pos_emb))
        loss, _ = model(x, y)
        loss.backward()
        results.append((loss.detach(), model.blocks[0].attn.qkv.weight.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_without_flash_attn_falls_back_with_one_warning(caplog):
    import model.attention as attention
    attention._warned.clear()
    with caplog.at_level(logging.WARNING, logger="charlm"):
        for _ in range(3):
            GPT(small(attention="flash"))
    messages = [r.getMessage() for r in caplog.records if "flash" in r.getMessage()]
    assert messages == ["model.attention=flash: flash-attn is not installed (pip install -e '.[flash]'); using sdpa"]
