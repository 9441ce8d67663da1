"""Transformer-XL memory: the reduction to the plain model, segments with memory against one forward over the
concatenated stream with the memory's mask, bottom-right causality, no gradient into the memory, compile."""
import re

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
        q, k, v = attn.qkv(block.norm1(x)).view(B, L, 3, attn.n_head, C // attn.n_head).permute(2, 0, 3, 1, 4)
        if attn.relative is not None:  # Transformer-XL's relative scores, written out per pair below
            y = xl_reference(attn, q, k, v, mask)
        else:
            attn.rotary.cover(L)
            q, k = attn.rotary(q, positions), attn.rotary(k, positions)
            y = attend_math(q, k, v, mask)
        x = x + attn.proj(y.transpose(1, 2).reshape(B, L, C))
        x = x + block.mlp(block.norm2(x))
    return model.heads.main_logits(model.norm_f(x))


def xl_reference(attn, q, k, v, mask) -> torch.Tensor:
    """Dai et al.'s score for every pair, (q_i + u).k_j + (q_i + v).W_R r(i - j), with the sinusoid r of the
    distance as their code builds it ([sin, cos] of pos * 1/10000^(2i/d)); positions 0..L-1."""
    B, H, L, hd = q.shape
    d_model = H * hd
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    distance = (torch.arange(L)[:, None] - torch.arange(L)[None, :]).clamp(min=0).double()
    angles = distance[..., None] * inv_freq  # (L, L, d/2)
    r = attn.r_proj(torch.cat([angles.sin(), angles.cos()], -1).float()).view(L, L, H, hd)  # W_R r(i - j)
    u, v_bias = attn.relative.u, attn.relative.v
    scores = (torch.einsum("bhid,bhjd->bhij", q + u[:, None], k)
              + torch.einsum("bhid,ijhd->bhij", q + v_bias[:, None], r))
    scores = (scores / hd ** 0.5).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


def memory_mask(length: int, segment: int, mem_len: int) -> torch.Tensor:
    """A query of the segment starting at s sees [s - mem_len .. itself]: the memory's positions before its
    segment and its segment up to itself."""
    query = torch.arange(length)[:, None]
    key = torch.arange(length)[None, :]
    start = query // segment * segment
    return (key <= query) & (key >= start - mem_len)


def by_segments(model: GPT, idx: torch.Tensor, segment: int, memory: SegmentMemory) -> torch.Tensor:
    return torch.cat([model(idx[:, s:s + segment], memory=memory) for s in range(0, idx.shape[1], segment)], 1)


@pytest.mark.parametrize("mem_len,attention,pos_emb", [(16, "sdpa", "rope"), (16, "math", "rope"), (7, "sdpa", "rope"),
                                                       (41, "sdpa", "rope"), (16, "sdpa", "xl_relative"),
                                                       (41, "sdpa", "xl_relative")])
def test_segments_with_memory_equal_one_forward_over_the_stream_with_the_memory_mask(mem_len, attention, pos_emb):
    cfg = small(attention=attention, pos_emb=pos_emb)
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


@pytest.mark.parametrize("compressive,pos_emb", [(False, "rope"), (True, "rope"), (True, "xl_relative")])
def test_compiles_with_fullgraph_and_matches_eager(compressive, pos_emb):
    cfg = small(n_targets=2, target_weights=(1.0, 0.5), intermediate_loss=True, intermediate_targets=2,
                mem_len=16, cmem_len=8 if compressive else 0, pos_emb=pos_emb)
    model = model_for(cfg).train()
    compiled = torch.compile(model, fullgraph=True)
    idx = torch.randint(0, 256, (2, 3 * cfg.block_size + 1))
    hw = torch.tensor([1.0, 0.5, 1.0, 0.5])
    eager_mem, compiled_mem = SegmentMemory(cfg, 2, "cpu"), SegmentMemory(cfg, 2, "cpu")
    for s in range(0, 3 * cfg.block_size, cfg.block_size):
        x, y = idx[:, s:s + cfg.block_size], idx[:, s + 1:s + cfg.block_size + 1]
        want, _ = model(x, y, hw, memory=eager_mem)
        got, _ = compiled(x, y, hw, memory=compiled_mem)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled_mem.last_recon, eager_mem.last_recon, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_mem.states, eager_mem.states, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_mem.compressed, eager_mem.compressed, rtol=1e-5, atol=1e-5)
    assert int(compiled_mem.cvalid) == int(eager_mem.cvalid) == (8 if compressive else 0)


def test_memory_needs_relative_positions():
    with pytest.raises(ConfigError, match="model.mem_len=32 needs relative positions"):
        parse_args(["--preset=tiny", "--model.mem_len=32"])
    with pytest.raises(ValueError, match="absolute positions"):
        SegmentMemory(small(pos_emb="learned"), 1, "cpu")
    assert parse_args(["--preset=tiny", "--model.mem_len=32", "--model.pos_emb=rope"]).cfg.model.mem_len == 32


# ------------------------------------------------------------------------------------------------ training
def test_streams_cover_the_split_once_per_pass_without_overlap_and_resume_exactly():
    import numpy as np
    from train.data import Streams
    split = np.arange(1000, dtype=np.int64)  # each byte is its own position
    streams = Streams(split, 4, 16, torch.Generator().manual_seed(0), (0, 1))
    assert streams.per_pass == (250 - 1) // 16 == 15
    passes = []
    for _ in range(3):
        draws = [streams.draw() for _ in range(15)]
        assert [restart for _, _, restart in draws] == [True] + [False] * 14
        x = torch.stack([d[0] for d in draws], 1)  # (rows, segments, T)
        assert torch.equal(torch.stack([d[1] for d in draws], 1), (x + 1) % 1000)
        flat = x.flatten(1)  # each row reads one contiguous stretch (wrapping at the end)
        assert torch.equal(flat, (flat[:, :1] + torch.arange(flat.shape[1])) % 1000)
        assert torch.equal(flat[1:, 0], (flat[:-1, 0] + 250) % 1000)  # rows 250 bytes apart: no overlap
        passes.append(int(x[0, 0, 0]))
    assert len(set(passes)) == 3  # a new random offset every pass
    tight = Streams(np.arange(1024, dtype=np.int64), 4, 16, torch.Generator().manual_seed(0), (0, 1))
    assert tight.per_pass == 15  # stretches of 256 = 16 x 16: a 16th segment's last target is the next row's byte
    draws = [tight.draw() for _ in range(15)]
    first, targets = draws[0][0][:, :1], torch.cat([y for _, y, _ in draws], 1)
    assert bool((((targets - first) % 1024) < 256).all())  # every target inside its own row's stretch
    half = Streams(split, 4, 16, torch.Generator().manual_seed(0), (1, 2)).draw()[0]
    assert torch.equal(half, Streams(split, 4, 16, torch.Generator().manual_seed(0), (0, 1)).draw()[0][2:])
    for cut in (0, 7, 15, 16):  # before anything, mid-pass, at a pass's end, just into the next
        whole = Streams(split, 4, 16, torch.Generator().manual_seed(1), (0, 1))
        want = [whole.draw() for _ in range(cut + 20)][cut:]
        first = Streams(split, 4, 16, torch.Generator().manual_seed(1), (0, 1))
        for _ in range(cut):
            first.draw()
        resumed = Streams(split, 4, 16, torch.Generator().manual_seed(99), (0, 1))
        resumed.restore(first.state())
        for (x, y, r), (wx, wy, wr) in zip([resumed.draw() for _ in range(20)], want):
            assert torch.equal(x, wx) and torch.equal(y, wy) and r == wr


@pytest.mark.parametrize("compressive", [False, True])
def test_training_with_memory_resumes_mid_stream_bit_for_bit(small_corpus, tmp_path, compressive):
    """A 60-step run against the same run stopped at step 45 and resumed: a pass of the streams ends at step 42,
    so the resumed run continues a second pass with the memory (and compressed memory) the checkpoint holds."""
    from conftest import read_metrics, tiny_config
    from train.config import Args
    from train.loop import train
    corpus = tmp_path / "short.txt"
    corpus.write_bytes(small_corpus.read_bytes()[:6000])  # 5,400 training bytes: 4 streams of 1,350, 42 segments
    common = dict(model__mem_len="32", model__pos_emb="rope", model__dropout="0.1", train__schedule="constant",
                  train__warmup_steps="0", train__log_interval="3", train__ckpt_interval="45",
                  train__eval_interval="0", train__final_eval="false", model__cmem_len="16" if compressive else "0")
    train(Args(tiny_config(corpus, tmp_path / "whole", train__max_steps="60", **common), "tiny"))
    train(Args(tiny_config(corpus, tmp_path / "cut", train__max_steps="45", **common), "tiny"))
    resumed = tiny_config(corpus, tmp_path / "cut", train__max_steps="60", **common)
    train(Args(resumed, "tiny", resume=True, overrides={"train.max_steps": "60"}))

    def losses(run):
        return [(r["step"], r["train_loss"], r.get("loss/recon")) for r in read_metrics(run)
                if "train_loss" in r and "event" not in r]
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole") and len(losses(tmp_path / "whole")) == 20
    assert all((recon is not None and recon > 0) == compressive for *_, recon in losses(tmp_path / "whole")[1:])


@pytest.mark.parametrize("order, mem_len, contiguous", [("auto", "0", False), ("windows", "0", False),
                                                         ("streams", "0", True), ("auto", "16", True)])
def test_data_order_picks_random_windows_or_contiguous_streams(monkeypatch, small_corpus, tmp_path, order, mem_len,
                                                               contiguous):
    """data.order: each row of a step's batch continues the same row of the step before (streams) or not
    (windows); auto streams only with a memory. With streams and no memory the model gets no memory."""
    from conftest import tiny_config
    from train.config import Args
    from train.loop import train
    seen, original = [], GPT.forward

    def forward(self, idx, targets=None, head_weights=None, cache=None, memory=None):
        if targets is not None:
            seen.append((idx.clone(), targets.clone(), memory is not None))
        return original(self, idx, targets, head_weights, cache, memory)
    monkeypatch.setattr(GPT, "forward", forward)
    cfg = tiny_config(small_corpus, tmp_path / "run", train__max_steps="6", train__eval_interval="0",
                      train__final_eval="false", model__pos_emb="rope", model__mem_len=mem_len, data__order=order)
    train(Args(cfg, "tiny"))
    assert len(seen) == 6 and all(with_memory == (mem_len != "0") for *_, with_memory in seen)
    continues = [torch.equal(x[:, 0], y_before[:, -1]) for (_, y_before, _), (x, _, _) in zip(seen, seen[1:])]
    assert continues == [contiguous] * 5


def test_memory_is_refused_with_random_windows():
    with pytest.raises(ConfigError, match="model.mem_len=8 carries each row's memory .* not random windows"):
        parse_args(["--preset=tiny", "--model.mem_len=8", "--model.pos_emb=rope", "--data.order=windows"])
    message = "data.order='stream': expected one of auto | windows | streams"
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(["--preset=tiny", "--data.order=stream"])


def test_activation_checkpointing_is_refused_with_memory():
    with pytest.raises(ConfigError, match="activation_checkpointing does not work with model.mem_len"):
        parse_args(["--preset=tiny", "--model.mem_len=8", "--model.pos_emb=rope",
                    "--train.activation_checkpointing=true"])


@pytest.mark.parametrize("mem_len", [16, 40])
def test_memory_evaluation_scores_every_byte_as_the_masked_stream_does(mem_len):
    import math

    import numpy as np
    import torch.nn.functional as F
    from train.evaluate import evaluate_memory
    cfg = small()
    model = model_for(cfg)
    data = np.random.default_rng(0).integers(0, 256, 150, dtype=np.uint8)
    got = evaluate_memory(model, data, 0, 150, mem_len, streams=1, progress=False)
    stream = torch.from_numpy(data.astype(np.int64))[None]
    with torch.no_grad():
        logits = masked_forward(model, stream[:, :-1], memory_mask(149, cfg.block_size, mem_len))
    nll = F.cross_entropy(logits[0], stream[0, 1:], reduction="sum").item()
    assert got["bytes"] == 149 and got["protocol"] == f"memory, mem_len {mem_len}, segment 16, 1 streams"
    assert got["bpc"] == pytest.approx(nll / 149 / math.log(2), rel=1e-5)
    two = evaluate_memory(model, data, 0, 150, mem_len, streams=2, progress=False)  # the second warms up first
    assert two["bytes"] == 149 and abs(two["bpc"] - got["bpc"]) < 0.1


def test_memory_evaluation_refuses_absolute_positions():
    import numpy as np
    from train.evaluate import evaluate_memory
    with pytest.raises(ConfigError, match="--mode memory needs relative positions"):
        evaluate_memory(model_for(small(pos_emb="learned", mem_len=0)), np.zeros(100, np.uint8), 0, 100, 16)


@pytest.mark.parametrize("variant", [dict(attn_type="differential"), dict(attn_type="mla", kv_lora_rank=8,
                                     rope_head_dim=4), dict(attn_pattern="local", attn_window=4),
                                     dict(n_layer=3, hourglass=(1, 1, 1))])
def test_memory_evaluation_refuses_layers_without_a_memory(variant):
    """These layers train without a memory (model.errors()) and would ignore or misuse one: a memory evaluation of
    them (--mem_len given at evaluation) is refused, not run as a different protocol under the memory's name."""
    import numpy as np
    from train.evaluate import evaluate_memory
    model = model_for(small(mem_len=0, **variant))
    with pytest.raises(ConfigError, match=r"--mode memory cannot run this model with a memory \(.*not implemented"):
        evaluate_memory(model, np.zeros(100, np.uint8), 0, 100, 16, progress=False)


def test_sampling_uses_the_memory_as_its_cache():
    """Greedy bytes from the memory sampler equal the argmax of one forward over the whole text in which every
    position sees the last mem_len + block_size - 1 positions."""
    from train.sample import generate
    cfg = small(mem_len=8)
    model = model_for(cfg)
    prompt = bytes(range(65, 65 + 30))
    out = generate(model, prompt, 12, temperature=0)
    window = cfg.mem_len + cfg.block_size  # itself and the mem_len + block_size - 1 before it
    seq = list(prompt)
    for _ in range(12):
        idx = torch.tensor([seq])
        L = idx.shape[1]
        pos = torch.arange(L)
        mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
        with torch.no_grad():
            seq.append(int(masked_forward(model, idx, mask)[0, -1].argmax()))
    assert out == bytes(seq[len(prompt):])


# ------------------------------------------------------------------------------------------------ compressive
def test_compressive_memory_is_the_plain_memory_until_real_memories_are_evicted_then_attends_to_them():
    cfg = small(mem_len=32, cmem_len=8, cmem_ratio=4)
    compressive = model_for(cfg)
    plain = model_for(small(mem_len=32))
    plain.load_state_dict(compressive.state_dict(), strict=False)  # all but the compressors
    idx = torch.randint(0, 256, (2, 5 * cfg.block_size))
    mem_c, mem_p = SegmentMemory(cfg, 2, "cpu"), SegmentMemory(small(mem_len=32), 2, "cpu")
    with torch.no_grad():
        for s in range(5):
            x = idx[:, s * 16:(s + 1) * 16]
            got, want = compressive(x, memory=mem_c), plain(x, memory=mem_p)
            # segments 0 and 1 push out empty slots, segment 2 the first 16 real memories: 4 compressed slots
            assert int(mem_c.cvalid) == min(8, 4 * max(0, s - 1))
            if s < 3:  # nothing compressed to attend to yet
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(mem_c.states, mem_p.states, rtol=1e-6, atol=1e-6)
            else:
                assert not torch.allclose(got, want)


def test_the_compressor_learns_from_the_reconstruction_loss_only_and_the_projections_from_the_lm_loss_only():
    cfg = small(mem_len=16, cmem_len=8, cmem_ratio=4)
    model = model_for(cfg).train()
    memory = SegmentMemory(cfg, 2, "cpu")
    idx = torch.randint(0, 256, (2, 3 * cfg.block_size + 1))
    hw = torch.tensor([1.0])
    for s in range(2):  # fill the memory with real positions
        model(idx[:, s * 16:(s + 1) * 16], idx[:, s * 16 + 1:(s + 1) * 16 + 1], hw, memory=memory)
    taken, take = [], memory.take_loss
    memory.take_loss = lambda: taken.append(take()) or taken[-1]  # the reconstruction loss the model adds
    total, _ = model(idx[:, 32:48], idx[:, 33:49], hw, memory=memory)
    recon = taken[-1]
    assert recon.item() > 0 and memory.last_recon.item() == recon.item() and not memory.last_recon.requires_grad
    attn = model.blocks[1].attn
    compressor, projections = list(attn.compressor.parameters()), [attn.qkv.weight, attn.proj.weight]
    g_comp = torch.autograd.grad(total - recon, compressor, retain_graph=True, allow_unused=True)
    g_proj = torch.autograd.grad(total - recon, projections, retain_graph=True)
    assert all(g is None or g.abs().sum() == 0 for g in g_comp) and all(g.abs().sum() > 0 for g in g_proj)
    g_comp = torch.autograd.grad(recon, compressor, retain_graph=True)
    g_proj = torch.autograd.grad(recon, projections, allow_unused=True)
    assert all(g.abs().sum() > 0 for g in g_comp) and all(g is None or g.abs().sum() == 0 for g in g_proj)
    assert attn.qkv.weight.requires_grad and attn.proj.weight.requires_grad  # never detached in place


def test_compressive_config_errors():
    for args, message in [(["--model.cmem_len=8"], "set model.mem_len too"),
                          (["--model.mem_len=32", "--model.cmem_len=8", "--model.cmem_ratio=3"],
                           "must divide model.block_size=32 and model.mem_len=32")]:
        with pytest.raises(ConfigError, match=message):
            parse_args(["--preset=tiny", "--model.pos_emb=rope", *args])


# ------------------------------------------------------------------------------------------------ XL relative
def test_xl_relative_positions_depend_on_distances_only_and_share_u_and_v():
    cfg = small(pos_emb="xl_relative", mem_len=0)
    model = model_for(cfg)
    attn = model.blocks[0].attn
    assert all(block.attn.relative is model.relative for block in model.blocks)  # u and v: one pair for all
    assert model.num_params() == sum(p.numel() for p in set(model.parameters()))
    q, k, v = (torch.randn(2, 2, 5, 12) for _ in range(3))
    pos = torch.arange(5)
    mask = pos[None, :] <= pos[:, None]
    with torch.no_grad():
        base = model.relative(q, k, v, pos, pos, mask, 5, attn.r_proj, 0.0)
        shifted = model.relative(q, k, v, pos + 7, pos + 7, mask, 12, attn.r_proj, 0.0)
        torch.testing.assert_close(base, shifted, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(base, xl_reference(attn, q, k, v, mask), rtol=1e-5, atol=1e-6)
        loaded = model_for(cfg, seed=3)
        loaded.load_state_dict(model.state_dict())
        torch.testing.assert_close(loaded(torch.arange(16)[None]), model(torch.arange(16)[None]))


def xl_flex_cases():
    """(q_pos, k_pos, mask, span) of the callers: a training window, a memory (queries the last T of K keys, each
    seeing mem_len back), a compressed memory (unevenly spaced key positions), a per-head sparse mask."""
    window = (None, None, None, 13)
    keys = torch.arange(21)
    memory = (keys[-13:], keys, (keys[-13:, None] >= keys[None, :]) & (keys[-13:, None] - keys[None, :] <= 9), 21)
    spaced = torch.cat([torch.arange(0, 12, 3), torch.arange(12, 25)])
    compressed = (spaced[-13:], spaced, spaced[-13:, None] >= spaced[None, :], 25)
    i, j = torch.arange(13)[:, None], torch.arange(13)[None, :]
    per_head = (None, None, torch.stack([(j <= i) & (i - j < 4), (j <= i) & ((i - j) % 3 == 0)]), 13)
    return {"window": window, "memory": memory, "compressed": compressed, "per-head": per_head}


@pytest.mark.parametrize("case", list(xl_flex_cases()))
def test_xl_relative_flex_attention_matches_the_math_path(case):
    """pos_emb=xl_relative's CUDA path (FlexAttention: score_mod reads the distance table, block mask) against the
    explicit scores, forward in fp32 (a CPU runs no flex backward: test_gpu_variants.py checks the gradients on
    CUDA)."""
    q_pos, k_pos, mask, span = xl_flex_cases()[case]
    model = model_for(small(pos_emb="xl_relative", mem_len=0))
    attn = model.blocks[1].attn
    with torch.no_grad():
        model.relative.u.normal_()
        model.relative.v.normal_()
        keys = 13 if k_pos is None else len(k_pos)
        q = torch.randn(3, 2, 13, 12)
        k, v = torch.randn(3, 2, keys, 12), torch.randn(3, 2, keys, 12)
        want = model.relative(q, k, v, q_pos, k_pos, mask, span, attn.r_proj, 0.0, flex=False)
        got = model.relative(q, k, v, q_pos, k_pos, mask, span, attn.r_proj, 0.0, flex=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if case == "memory":  # the fused kernel as the compiled model runs it (a CPU template here)
            compiled = torch.compile(model.relative, fullgraph=True)
            got = compiled(q, k, v, q_pos, k_pos, mask, span, attn.r_proj, 0.0, flex=True)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_reconstruction_loss_reads_only_the_real_evicted_positions_and_their_slots():
    """mem_len 32, segments of 24, ratio 4: the first segment evicts only empty slots (no loss); the second evicts
    24 positions of which the newest 16 are real, so the loss's attention reads keys 8..23 of the evicted and the
    compressed slots 2..5 (each covering 4 real positions)."""
    from model.memory import SegmentMemory
    memory = SegmentMemory(small(mem_len=32, cmem_len=8, cmem_ratio=4), batch=1, device="cpu")
    memory.states.normal_()  # stale values in slots that are not valid (as after a reset): they must not count
    seen = []

    def attention_of(queries, keys_from, key_ok):
        seen.append(key_ok.tolist())
        return keys_from.sum(1) * len(seen)  # the two calls differ: a loss > 0 wherever one is counted

    def squeeze(evicted):
        return evicted.unflatten(1, (-1, 4)).mean(2)
    recon = []
    for segment in torch.randn(2, 1, 24, 24):
        memory.context(0, segment)
        memory.compress(0, squeeze, attention_of, segment, with_loss=True)
        memory.advance(24)
        recon.append(memory.take_loss().item())
    assert seen[2:] == [[False] * 8 + [True] * 16, [False, False, True, True, True, True]]
    assert recon[0] == 0.0 and recon[1] > 0.0  # nothing real was evicted by the first segment


def test_the_reconstruction_attention_is_scaled_dot_product_attention_over_the_real_keys():
    """detached_attention (the attention the reconstruction loss compares) against torch's SDPA with the same
    projections and the key mask; and it passes no gradient to the projection."""
    import torch.nn.functional as F

    from model.memory import detached_attention, project_heads
    torch.manual_seed(5)
    qkv = torch.nn.Linear(24, 72)
    queries, keys_from = torch.randn(2, 5, 24), torch.randn(2, 7, 24)
    key_ok = torch.tensor([False, False, True, True, True, False, True])
    got = detached_attention(qkv, 3, queries, keys_from, key_ok)
    q, k, v = project_heads(qkv.weight, qkv.bias, queries, keys_from, 3)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=key_ok.expand(5, 7))  # per head, scaled by 1/sqrt(8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not got.requires_grad
