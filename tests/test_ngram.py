"""Hashed n-gram input embeddings (model.ngram_max): the hash against a per-position formula, the reduction to the
plain model, causality (a position's rows read its own and earlier bytes only), and streams: a KV cache and a
segment memory carry a stream's last bytes, so chunks read as one forward over the whole stream."""
import pytest
import torch

from model import GPT, ModelConfig, SegmentMemory
from model.kv_cache import KVCache
from model.ngram import BOUNDARY, HashedNgrams
from train.config import ConfigError, parse_args


def small(**kw) -> ModelConfig:
    base = dict(n_layer=2, n_head=2, d_model=24, d_ff=40, block_size=16, pos_emb="rope", ngram_max=4,
                ngram_buckets=37)
    return ModelConfig(**(base | kw))


def hash_of(gram: list[int], buckets: int) -> int:
    """The documented hash of one n-gram (oldest byte first), written out in Python integers."""
    value = sum(b * 257 ** power for power, b in enumerate(reversed(gram))) % (2**31 - 1)
    return value * 48271 % (2**31 - 1) % buckets


def test_rows_are_the_hash_of_the_last_n_bytes_with_the_boundary_before_the_start():
    cfg = small(ngram_max=4, ngram_buckets=101)
    ngrams = HashedNgrams(cfg)
    idx = torch.randint(0, 256, (3, 11))
    ids = ngrams.ids(idx)
    assert ids.shape == (3, 11, 3)
    for b in range(3):
        padded = [BOUNDARY] * 3 + idx[b].tolist()
        for t in range(11):
            for order in (2, 3, 4):
                gram = padded[t + 4 - order: t + 4]
                assert ids[b, t, order - 2] == (order - 2) * 101 + hash_of(gram, 101)


def test_previous_bytes_replace_the_boundary():
    ngrams = HashedNgrams(small(ngram_max=3, ngram_buckets=53))
    stream = torch.randint(0, 256, (2, 20))
    whole = ngrams.ids(stream)
    torch.testing.assert_close(ngrams.ids(stream[:, 7:], previous=stream[:, 5:7]), whole[:, 7:], rtol=0, atol=0)


def test_the_hash_spreads_bigrams_over_the_buckets():
    """Every one of the 65,536 byte pairs gets a bucket; with 4096 buckets each holds 16 on average, none more
    than twice that (a base-257 number taken straight modulo 4096 would put 256 pairs where 'a' and 'q' meet)."""
    ngrams = HashedNgrams(small(ngram_max=2, ngram_buckets=4096))
    first, second = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    pairs = torch.stack([first.flatten(), second.flatten()], dim=1)
    counts = torch.bincount(ngrams.ids(pairs[:, 1:], previous=pairs[:, :1]).flatten(), minlength=4096)
    assert counts.min() > 0 and counts.max() <= 32


def test_ngram_max_one_is_the_plain_model_and_zero_rows_change_nothing():
    plain_cfg = small(ngram_max=1)
    torch.manual_seed(0)
    plain = GPT(plain_cfg).eval()
    assert not any("ngram" in name for name in plain.state_dict())
    with_ngrams = GPT(small(ngram_max=3)).eval()
    missing, unexpected = with_ngrams.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["ngram_emb.weight"] and not unexpected
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert not torch.allclose(with_ngrams(idx), plain(idx))  # random rows: the input changes
        with_ngrams.ngram_emb.weight.zero_()
        torch.testing.assert_close(with_ngrams(idx), plain(idx), rtol=0, atol=0)


def test_a_position_reads_its_own_and_earlier_bytes_only():
    torch.manual_seed(1)
    model = GPT(small()).eval()
    idx = torch.randint(0, 256, (1, 16))
    changed = idx.clone()
    changed[0, 9] = (changed[0, 9] + 1) % 256
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    assert torch.equal(a[:9], b[:9]) and not torch.allclose(a[9:], b[9:])


def test_the_rows_learn():
    torch.manual_seed(2)
    model = GPT(small())
    idx = torch.randint(0, 256, (2, 16))
    loss, _ = model(idx, torch.randint(0, 256, (2, 16)), torch.tensor([1.0]))
    loss.backward()
    grad = model.ngram_emb.weight.grad
    used = model.ngram_emb.ids(idx).unique()
    assert grad[used].abs().sum(dim=1).gt(0).all()
    unused = torch.ones(grad.shape[0], dtype=torch.bool)
    unused[used] = False
    assert grad[unused].abs().sum() == 0  # a row no n-gram of the batch hashes to gets nothing


def test_a_reset_kv_cache_starts_at_the_boundary_again():
    """Chunked decoding with the tables: tests/test_kv_cache.py (rope-ngrams). After a reset the carried bytes are
    forgotten: a stream restarted mid-sequence reads as a fresh window."""
    torch.manual_seed(3)
    model = GPT(small()).eval()
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        cache = KVCache(model.cfg, 2, window=16, chunk=16, device="cpu")
        model(x[:, :5], cache=cache)
        assert torch.equal(cache.previous_bytes, x[:, 2:5])
        cache.reset()
        torch.testing.assert_close(model(x[:, 5:], cache=cache), model(x[:, 5:]), rtol=1e-5, atol=1e-5)


def test_segment_memory_carries_the_last_bytes_and_resumes_them():
    """A memory as long as the stream: segment after segment equals one forward over the whole stream (the memory
    model is the plain causal model then); the state dict keeps the carried bytes."""
    cfg = small(mem_len=32)
    torch.manual_seed(4)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        plain = GPT(small(block_size=48, mem_len=0)).eval()
        plain.load_state_dict(model.state_dict())
        memory = SegmentMemory(cfg, batch=2, device="cpu")
        first = model(idx[:, :16], memory=memory)
        saved = memory.state_dict()
        rest = [model(idx[:, s:s + 16], memory=memory) for s in (16, 32)]
        restored = SegmentMemory(cfg, batch=2, device="cpu")
        restored.load_state_dict(saved)
        again = [model(idx[:, s:s + 16], memory=restored) for s in (16, 32)]
    torch.testing.assert_close(torch.cat([first] + rest, dim=1), plain(idx), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(again, dim=1), torch.cat(rest, dim=1), rtol=0, atol=0)
    assert torch.equal(saved["previous_bytes"], idx[:, 13:16])


def test_bad_ngram_settings_are_one_line_errors():
    for bad in ("--model.ngram_max=0", "--model.ngram_buckets=0"):
        with pytest.raises(ConfigError, match="ngram_max and model.ngram_buckets must be >= 1"):
            parse_args(["--preset=tiny", bad])
