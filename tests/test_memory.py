"""Transformer-XL memory: the reduction to the plain model, segments with memory against one forward over the
concatenated stream with the memory's mask, bottom-right causality, no gradient into the memory, compile."""
import pytest
import torch

from model import GPT, ModelConfig, SegmentMemory
from model.attention import attend_math
from train.config import ConfigError, parse_args


def small(**kw) -> ModelConfig:
    base = dict(n_layer=2, n_head=2, d_model=24, d_ff=40, block_size=16, pos_emb="rope", norm="rmsnorm",
                activation="swiglu", mem_len=16)
    return ModelConfig(**(base | kw))


def model_for(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():  # non-zero biases and position-free weights: nothing hides behind a zero
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    return model


def masked_forward(model: GPT, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The t+1 logits of one forward over the whole stream, each query seeing what `mask` (L, L) allows: the
    network written out plainly (rotary positions 0..L-1)."""
    x = model.tok_emb(idx)
    B, L, C = x.shape
    positions = torch.arange(L)
    for block in model.blocks:
        attn = block.attn
        attn.rotary.cover(L)
        q, k, v = attn.qkv(block.norm1(x)).view(B, L, 3, attn.n_head, C // attn.n_head).permute(2, 0, 3, 1, 4)
        q, k = attn.rotary(q, positions), attn.rotary(k, positions)
        x = x + attn.proj(attend_math(q, k, v, mask).transpose(1, 2).reshape(B, L, C))
        x = x + block.mlp(block.norm2(x))
    return model.heads.main_logits(model.norm_f(x))


def memory_mask(length: int, segment: int, mem_len: int) -> torch.Tensor:
    """A query of the segment starting at s sees [s - mem_len .. itself]: the memory's positions before its
    segment and its segment up to itself."""
    query = torch.arange(length)[:, None]
    key = torch.arange(length)[None, :]
    start = query // segment * segment
    return (key <= query) & (key >= start - mem_len)


def by_segments(model: GPT, idx: torch.Tensor, segment: int, memory: SegmentMemory) -> torch.Tensor:
    return torch.cat([model(idx[:, s:s + segment], memory=memory) for s in range(0, idx.shape[1], segment)], 1)


@pytest.mark.parametrize("mem_len,attention", [(16, "sdpa"), (16, "math"), (7, "sdpa"), (41, "sdpa")])
def test_segments_with_memory_equal_one_forward_over_the_stream_with_the_memory_mask(mem_len, attention):
    cfg = small(attention=attention)
    model = model_for(cfg)
    idx = torch.randint(0, 256, (3, 4 * cfg.block_size))
    memory = SegmentMemory(cfg, batch=3, device="cpu", mem_len=mem_len)  # 41: longer than training's, 2.5 segments
    with torch.no_grad():
        got = by_segments(model, idx, cfg.block_size, memory)
        want = masked_forward(model, idx, memory_mask(idx.shape[1], cfg.block_size, mem_len))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mem_len_zero_and_an_empty_memory_are_the_plain_model():
    cfg = small()
    with_memory, plain = model_for(cfg), model_for(small(mem_len=0))
    assert with_memory.state_dict().keys() == plain.state_dict().keys()  # no parameter of its own
    idx = torch.randint(0, 256, (2, cfg.block_size))
    with torch.no_grad():
        first = with_memory(idx, memory=SegmentMemory(cfg, batch=2, device="cpu"))
        torch.testing.assert_close(first, plain(idx), rtol=1e-6, atol=1e-6)
        memory = SegmentMemory(cfg, batch=2, device="cpu")
        with_memory(idx, memory=memory)
        memory.reset()  # a restarted stream forgets
        torch.testing.assert_close(with_memory(idx, memory=memory), plain(idx), rtol=1e-6, atol=1e-6)


def test_queries_shorter_than_keys_are_causal_from_the_bottom_right():
    """The last query sees everything, the first sees the memory and itself: changing segment byte j changes
    no output before j (sdpa's own is_causal would align the triangle top-left instead)."""
    cfg = small()
    model = model_for(cfg)
    idx = torch.randint(0, 256, (1, 2 * cfg.block_size))
    outs = []
    for change in (None, 5):
        stream = idx.clone()
        if change is not None:
            stream[0, cfg.block_size + change] = (stream[0, cfg.block_size + change] + 1) % 256
        with torch.no_grad():
            outs.append(by_segments(model, stream, cfg.block_size, SegmentMemory(cfg, 1, "cpu")))
    second_a, second_b = outs[0][0, cfg.block_size:], outs[1][0, cfg.block_size:]
    assert torch.equal(second_a[:5], second_b[:5]) and not torch.allclose(second_a[5:], second_b[5:])


def test_no_gradient_reaches_the_memory():
    cfg = small()
    model = model_for(cfg).train()
    memory = SegmentMemory(cfg, batch=2, device="cpu")
    idx = torch.randint(0, 256, (2, 2 * cfg.block_size))
    captured = []
    hook = model.tok_emb.register_forward_hook(lambda mod, inp, out: captured.append(out))
    first = model(idx[:, :cfg.block_size], memory=memory)
    loss = model(idx[:, cfg.block_size:], memory=memory).logsumexp(-1).mean()
    hook.remove()
    assert not memory.states.requires_grad and first.requires_grad
    first_emb, second_emb, kv_weight = captured[0], captured[1], model.blocks[0].attn.qkv.weight
    g_first, g_second, g_weight = torch.autograd.grad(loss, [first_emb, second_emb, kv_weight], allow_unused=True)
    assert g_first is None  # segment 1 is not in the second segment's graph
    assert g_second.abs().sum() > 0 and g_weight[cfg.d_model:].abs().sum() > 0  # the projections learn


def test_compiles_with_fullgraph_and_matches_eager():
    cfg = small(n_targets=2, target_weights=(1.0, 0.5), intermediate_loss=True, intermediate_targets=2)
    model = model_for(cfg)
    compiled = torch.compile(model, fullgraph=True)
    idx = torch.randint(0, 256, (2, 3 * cfg.block_size + 1))
    hw = torch.tensor([1.0, 0.5, 1.0, 0.5])
    eager_mem, compiled_mem = SegmentMemory(cfg, 2, "cpu"), SegmentMemory(cfg, 2, "cpu")
    for s in range(0, 3 * cfg.block_size, cfg.block_size):
        x, y = idx[:, s:s + cfg.block_size], idx[:, s + 1:s + cfg.block_size + 1]
        want, _ = model(x, y, hw, memory=eager_mem)
        got, _ = compiled(x, y, hw, memory=compiled_mem)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_mem.states, eager_mem.states, rtol=1e-5, atol=1e-5)


def test_memory_needs_relative_positions():
    with pytest.raises(ConfigError, match="model.mem_len=32 needs relative positions"):
        parse_args(["--preset=tiny", "--model.mem_len=32"])
    with pytest.raises(ValueError, match="absolute positions"):
        SegmentMemory(small(pos_emb="learned"), 1, "cpu")
    assert parse_args(["--preset=tiny", "--model.mem_len=32", "--model.pos_emb=rope"]).cfg.model.mem_len == 32
