"""Sparse attention patterns (model.attn_pattern): each mask against a brute-force reading of Child et al. 2019,
FlexAttention's block-sparse path against the dense mask (outputs and gradients), causality and the reductions to
dense attention in the model, and the KV cache (equal to the full forward; a local pattern keeps its window only)."""
import pytest
import torch

from model import GPT, ModelConfig
from model.attention import attend_sdpa
from model.kv_cache import KVCache
from model.sparse import SparsePattern

PATTERNS = ["local", "strided", "fixed"]


def small(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(n_layer=2, n_head=4, d_model=32, d_ff=64, block_size=23, pos_emb="rope",
                                 attn_window=5, attn_stride=4, attn_summary=2), **kw})


def brute_force(kind: str, n_head: int, T: int, window: int, stride: int, summary: int) -> torch.Tensor:
    """The paper's sets, position by position: A(i) for each head; heads 0..H/2-1 take the first set."""
    mask = torch.zeros(n_head, T, T, dtype=torch.bool)
    for h in range(n_head):
        first = h < n_head // 2
        for i in range(T):
            for j in range(i + 1):
                if kind == "local":
                    ok = i - j < window
                elif kind == "strided":
                    ok = i - j < window if first else (i - j) % stride == 0
                else:  # fixed: own block | the last `summary` cells of every block
                    ok = i // stride == j // stride if first else j % stride in range(stride - summary, stride)
                    ok = ok or (kind == "fixed" and i == j)  # charlm's one addition: no empty row
                mask[h, i, j] = ok
    return mask


@pytest.mark.parametrize("kind", PATTERNS)
@pytest.mark.parametrize("window,stride,summary", [(5, 4, 2), (3, 7, 1), (1, 3, 3)])
def test_masks_match_the_papers_definitions(kind, window, stride, summary):
    cfg = small(attn_pattern=kind, attn_window=window, attn_stride=stride, attn_summary=summary)
    mask = SparsePattern(cfg).mask(23, "cpu").expand(4, 23, 23)
    assert torch.equal(mask, brute_force(kind, 4, 23, window, stride, summary))
    assert mask.diagonal(dim1=1, dim2=2).all()  # every query sees itself: no empty softmax row


@pytest.mark.parametrize("kind", PATTERNS)
def test_flex_attention_equals_the_dense_mask(kind):
    """FlexAttention's block-sparse path (unfused on a CPU, which has no FlexAttention backward: the gradients and
    the compiled kernel are checked on CUDA in test_gpu_variants.py) against sdpa with the dense mask."""
    torch.manual_seed(1)
    pattern = SparsePattern(small(attn_pattern=kind))
    q, k, v = (torch.randn(2, 4, 37, 8) for _ in range(3))
    torch.testing.assert_close(pattern.attend_flex(q, k, v), attend_sdpa(q, k, v, pattern.mask(37, "cpu")),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", PATTERNS)
def test_flex_block_mask_computes_exactly_the_non_empty_blocks_of_each_head(kind):
    """The CUDA kernel computes only the blocks the block mask marks (a CPU's flex evaluates every element, so the
    test above cannot see this): each head's marked 128 x 128 tiles are those where its dense mask allows a pair."""
    T, tile = 300, 128
    pattern = SparsePattern(small(attn_pattern=kind, block_size=T))
    n = -(-T // tile)
    dense = torch.nn.functional.pad(pattern.mask(T, "cpu"), (0, n * tile - T, 0, n * tile - T))
    occupied = dense.view(-1, n, tile, n, tile).any(dim=4).any(dim=2)  # (heads, query tiles, key tiles)
    marked = pattern.block_mask(T, "cpu").to_dense()[0].bool()
    assert marked.shape == occupied.shape == ((1 if kind == "local" else 4), n, n)
    assert torch.equal(marked, occupied)
    assert kind == "local" or not torch.equal(occupied[0], occupied[-1])  # the two halves skip different tiles


@pytest.mark.parametrize("kind", PATTERNS)
@pytest.mark.parametrize("pos_emb", ["rope", "learned", "xl_relative"])
def test_no_output_sees_a_later_byte(kind, pos_emb):
    torch.manual_seed(2)
    model = GPT(small(attn_pattern=kind, pos_emb=pos_emb)).eval()
    x = torch.randint(0, 256, (1, 23))
    changed = x.clone()
    changed[0, 11] = (x[0, 11] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :11], b[:, :11], rtol=0, atol=0)
    assert not torch.allclose(a[:, 11:], b[:, 11:])


def test_a_local_layer_sees_exactly_its_window():
    """One layer, window 5: the output at p depends on bytes p-4..p and on nothing earlier."""
    torch.manual_seed(3)
    model = GPT(small(n_layer=1, attn_pattern="local")).eval()
    x = torch.randint(0, 256, (1, 23))
    changed = x.clone()
    changed[0, 6] = (x[0, 6] + 1) % 256
    with torch.no_grad():
        difference = (model(x) - model(changed)).abs().amax(dim=-1)[0]
    assert (difference[:6] == 0).all() and (difference[6:11] > 0).all() and (difference[11:] == 0).all()


@pytest.mark.parametrize("overrides", [dict(attn_pattern="local", attn_window=23),
                                       dict(attn_pattern="strided", attn_window=23, attn_stride=1),
                                       dict(attn_pattern="fixed", attn_stride=23, attn_summary=23)],
                         ids=["local", "strided", "fixed"])
@pytest.mark.parametrize("pos_emb", ["rope", "xl_relative"])
def test_neutral_settings_reduce_to_dense_attention(overrides, pos_emb):
    torch.manual_seed(4)
    dense = GPT(small(pos_emb=pos_emb)).eval()
    sparse = GPT(small(pos_emb=pos_emb, **overrides)).eval()
    sparse.load_state_dict(dense.state_dict())
    x = torch.randint(0, 256, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", PATTERNS)
def test_cached_decoding_equals_the_full_forward(kind):
    torch.manual_seed(5)
    model = GPT(small(attn_pattern=kind)).eval()
    x = torch.randint(0, 256, (2, 23))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.cfg, 2, window=23, chunk=7, device="cpu")
        pieces = [model(x[:, t:t + n], cache=cache) for t, n in [(0, 1), (1, 7), (8, 4), (12, 7), (19, 4)]]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_a_local_cache_keeps_only_its_window():
    """The cache of a local model holds attn_window - 1 + chunk positions (not block_size - 1 + chunk), and a
    stream far past block_size still equals the model run on each position's window (one layer)."""
    torch.manual_seed(6)
    model = GPT(small(n_layer=1, attn_pattern="local")).eval()
    dense_cache = KVCache(small(n_layer=1), 1, window=23, chunk=3, device="cpu")
    cache = KVCache(model.cfg, 1, window=23, chunk=3, device="cpu")
    assert cache.window == 5 and cache.capacity == 5 - 1 + 3
    assert cache.bytes_per_stream * (23 - 1 + 3) == dense_cache.bytes_per_stream * (5 - 1 + 3)
    assert cache.bytes_per_token == 2 * 1 * 32 * 4  # keys and values, one layer, d_model 32, fp32
    x = torch.randint(0, 256, (1, 61))
    with torch.no_grad():
        streamed = torch.cat([model(x[:, t:t + 3], cache=cache) for t in range(0, 61, 3)], dim=1)
        for p in range(61):
            torch.testing.assert_close(streamed[:, p], model(x[:, max(0, p - 4): p + 1])[:, -1], rtol=1e-5,
                                       atol=1e-5)


@pytest.mark.parametrize("overrides,message", [
    (dict(attn_pattern="strided", n_head=3, d_model=30), "must be even"),
    (dict(attn_pattern="local", mem_len=16), "not implemented with a Transformer-XL memory"),
    (dict(attn_pattern="fixed", attn_stride=4, attn_summary=5), "attn_summary <= attn_stride"),
    (dict(attn_pattern="local", attn_window=0), "must be >= 1"),
])
def test_impossible_patterns_are_one_line_errors(overrides, message):
    errors = small(**overrides).errors()
    assert len(errors) == 1 and message in errors[0]
