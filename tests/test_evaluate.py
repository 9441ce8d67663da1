"""The strided evaluator: every byte scored exactly once, with the context the protocol promises."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli, tiny_config
from model import GPT, ModelConfig
from train.config import Args, ConfigError
from train.evaluate import evaluate_bytes, plan_windows
from train.loop import train


@pytest.mark.parametrize("a, b, block, stride", [(0, 100, 8, 8), (0, 100, 8, 3), (1, 2, 8, 1), (37, 101, 16, 1),
                                                  (50, 51, 4, 4), (5, 200, 32, 32), (90, 95, 8, 5), (3, 64, 7, 6)])
def test_plan_scores_every_byte_exactly_once(a, b, block, stride):
    scored = []
    for w0, w1, c0 in plan_windows(a, b, block, stride):
        assert 0 <= w0 < c0 < w1 and w1 - w0 <= block + 1  # at most block_size inputs
        assert w1 - c0 <= stride
        if w0 > 0:  # past the file start every window is full and gives >= block - stride + 1 bytes of context
            assert w1 - w0 == block + 1 and c0 - w0 >= block - stride + 1
        scored += range(c0, w1)
    assert scored == list(range(max(a, 1), b))


def test_plan_rejects_bad_strides():
    for stride in (0, 9):
        with pytest.raises(ConfigError):
            plan_windows(0, 100, 8, stride)


@torch.no_grad()
def brute_force_nll(model, data, a, b, block, stride):
    """Score each byte alone: run the model on exactly the context the protocol gives it, take the last logit."""
    nll = 0.0
    for p in range(max(a, 1), b):
        chunk_start = max(a, 1) + (p - max(a, 1)) // stride * stride
        chunk_end = min(chunk_start + stride, b)
        ctx_start = max(0, chunk_end - block - 1)
        x = torch.from_numpy(data[ctx_start:p].astype(np.int64))[None]
        logits = model(x)[0, -1]
        nll += float(F.cross_entropy(logits[None], torch.tensor([int(data[p])])))
    return nll


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_strided_evaluator_matches_brute_force(stride):
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=16, d_ff=32, block_size=8, pos_emb="rope")).eval()
    text = np.frombuffer(b"The quick brown fox jumps over the lazy dog. Pack my box with five dozen jugs.",
                         dtype=np.uint8)
    a, b = 20, len(text)
    result = evaluate_bytes(model, text, a, b, block_size=8, stride=stride, batch_size=5, progress=False)
    expect = brute_force_nll(model, text, a, b, 8, stride)
    assert result["bytes"] == b - a
    assert math.isclose(result["nll_nats"], expect, rel_tol=1e-5)
    assert math.isclose(result["bpc"], expect / (b - a) / math.log(2), rel_tol=1e-5)


def test_evaluate_cli_prints_json_last(small_corpus, tmp_path):
    train(Args(tiny_config(small_corpus, tmp_path / "run", train__max_steps="5"), "tiny"))
    ckpt = tmp_path / "run" / "ckpt.pt"
    r = run_cli("--ckpt", str(ckpt), "--split", "all", "--max_bytes", "700", "--stride", "16",
                module="train.evaluate")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["bytes"] == 1400 and out["protocol"] == "strided" and out["stride"] == 16
    assert set(out["splits"]) == {"val", "test"} and 0 < out["bpc"] < 9 and out["seconds"] >= 0
    assert out["dataset"]["sha256"] and out["step"] == 5
    # the same bytes scored in-process give the same number
    from train.checkpoint import model_from_checkpoint
    from train.data import load_corpus
    model, cfg, _ = model_from_checkpoint(ckpt)
    corpus = load_corpus(cfg.data)
    a, _ = corpus.bounds["val"]
    val = evaluate_bytes(model, corpus.data, a, a + 700, 32, 16, progress=False)
    assert math.isclose(val["bpc"], out["splits"]["val"]["bpc"], rel_tol=1e-9)


def test_evaluate_cli_errors_are_one_line(tmp_path):
    r = run_cli("--ckpt", str(tmp_path / "missing.pt"), module="train.evaluate")
    assert r.returncode == 2 and r.stderr.strip() == f"error: no checkpoint at {tmp_path / 'missing.pt'}"


@pytest.mark.parametrize("mode, option, message", [
    ("strided", ["--mem_len", "64"], "--mode strided does not use --mem_len (--mode memory)"),
    ("cached", ["--stride", "4", "--dyn_lr", "0.1"],
     "--mode cached does not use --stride (--mode strided), --dyn_lr (--mode dynamic)"),
    ("dynamic", ["--streams", "2"], "--mode dynamic does not use --streams (--mode cached / memory)")])
def test_evaluate_cli_refuses_an_option_its_mode_does_not_use(tmp_path, mode, option, message):
    """An option of another mode is an error, not dropped: `--mode strided --mem_len 64` scored no memory."""
    r = run_cli("--ckpt", str(tmp_path / "missing.pt"), "--mode", mode, *option, module="train.evaluate")
    assert r.returncode == 2 and r.stderr.strip() == f"error: {message}"


def rope_model(n_layer=2, block=16, seed=0):
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=n_layer, n_head=2, d_model=16, d_ff=32, block_size=block, pos_emb="rope")).eval()


def test_cached_and_strided_agree_on_a_text_no_longer_than_block_size():
    from train.evaluate import evaluate_cached
    model = rope_model(n_layer=3, block=32)
    text = np.frombuffer(b"Pack my box with five dozen jugs", dtype=np.uint8)  # 32 bytes
    strided = evaluate_bytes(model, text, 1, len(text), 32, 32, progress=False)
    cached = evaluate_cached(model, text, 1, len(text), streams=1, chunk=7, progress=False)
    assert cached["bytes"] == strided["bytes"] == 31
    assert math.isclose(cached["bpc"], strided["bpc"], rel_tol=1e-5)
    for protocol in (evaluate_cached(model, text, 0, len(text), streams=1, chunk=7, progress=False),
                     evaluate_bytes(model, text, 0, len(text), 32, 32, progress=False)):  # a whole file (--split file)
        assert protocol["bytes"] == 31 and math.isclose(protocol["bpc"], strided["bpc"], rel_tol=1e-5)  # no byte 0


@pytest.mark.parametrize("streams, chunk", [(1, 16), (3, 5), (7, 1)])
def test_cached_streams_equal_stride_1_for_one_layer(streams, chunk):
    """With one layer the cached protocol's receptive field is the window itself: every byte then sees exactly
    the block_size - 1 bytes before it, as strided evaluation at stride 1 gives it."""
    from train.evaluate import evaluate_cached
    model = rope_model(n_layer=1, block=16, seed=streams)
    text = np.frombuffer(b"The quick brown fox jumps over the lazy dog. " * 3, dtype=np.uint8)
    a, b = 20, len(text)
    cached = evaluate_cached(model, text, a, b, streams=streams, chunk=chunk, progress=False)
    strided = evaluate_bytes(model, text, a, b, 16, 1, progress=False)
    assert cached["bytes"] == strided["bytes"] == b - a
    assert math.isclose(cached["nll_nats"], strided["nll_nats"], rel_tol=1e-5)


def test_cached_mode_reports_the_caches_memory_and_a_local_model_keeps_its_window():
    """cache_bytes_per_token: keys and values of every layer per position (2 x n_layer x d_model x 4 bytes in
    fp32); per stream: times the positions kept (window - 1 + chunk), the window being attn_window for a local
    model, whose bpc equals the dense model's when attn_window covers the block."""
    from train.evaluate import evaluate_cached
    text = np.frombuffer(b"The quick brown fox jumps over the lazy dog. " * 3, dtype=np.uint8)
    results = {}
    for window in (16, 5):
        torch.manual_seed(0)
        cfg = ModelConfig(n_layer=2, n_head=2, d_model=16, d_ff=32, block_size=16, pos_emb="rope",
                          attn_pattern="local", attn_window=window)
        results[window] = evaluate_cached(GPT(cfg).eval(), text, 20, len(text), streams=2, chunk=4, progress=False)
    dense = evaluate_cached(rope_model(), text, 20, len(text), streams=2, chunk=4, progress=False)
    assert dense["cache_bytes_per_token"] == results[5]["cache_bytes_per_token"] == 2 * 2 * 16 * 4
    assert dense["cache_bytes_per_stream"] == results[16]["cache_bytes_per_stream"] == (16 - 1 + 4) * 256
    assert results[5]["window"] == 5 and results[5]["cache_bytes_per_stream"] == (5 - 1 + 4) * 256
    assert math.isclose(results[16]["bpc"], dense["bpc"], rel_tol=1e-6)


def test_cached_mode_refuses_absolute_positions():
    from train.evaluate import evaluate_cached
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=16, d_ff=32, block_size=16)).eval()
    with pytest.raises(ConfigError, match="--mode cached needs relative positions"):
        evaluate_cached(model, np.zeros(100, dtype=np.uint8), 10, 100)


def test_evaluate_cli_cached_mode(small_corpus, tmp_path):
    train(Args(tiny_config(small_corpus, tmp_path / "run", train__max_steps="3", model__pos_emb="rope"), "tiny"))
    r = run_cli("--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--split", "val", "--max_bytes", "500", "--mode",
                "cached", "--streams", "4", module="train.evaluate")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["protocol"] == "cached" and out["bytes"] == 500 and out["streams"] == 4 and out["window"] == 32


def test_evaluate_cli_defaults_to_a_quarter_block_stride_and_scores_a_whole_file(small_corpus, tmp_path):
    train(Args(tiny_config(small_corpus, tmp_path / "run", train__max_steps="3"), "tiny"))
    ckpt = str(tmp_path / "run" / "ckpt.pt")
    held_out = tmp_path / "mine.txt"
    held_out.write_bytes(b"Some held-out text of the user's own, scored byte by byte." * 5)
    r = run_cli("--ckpt", ckpt, "--split", "file", "--file", str(held_out), module="train.evaluate")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["bytes"] == held_out.stat().st_size - 1  # every byte but byte 0, which has no context
    assert out["stride"] == 8 and out["protocol_name"] == "strided, stride 8 of block 32"
    assert out["dataset"]["name"] == "mine.txt" and "strided, stride 8 of block 32" in r.stderr
    for args, message in [(["--split", "file"], "--split file and --file PATH go together"),
                          (["--file", str(held_out)], "--split file and --file PATH go together"),
                          (["--split", "file", "--file", str(tmp_path / "nope")], "no such file")]:
        r = run_cli("--ckpt", ckpt, *args, module="train.evaluate")
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("mode, option", [("strided", ["--max_bytes", "-1"]), ("strided", ["--batch_size", "0"]),
                                          ("cached", ["--streams", "0"]), ("cached", ["--chunk", "-1"]),
                                          ("memory", ["--mem_len", "-1"])])
def test_evaluate_cli_refuses_out_of_range_sizes(tiny_run, capsys, mode, option):
    from train.evaluate import main
    code = main(["--ckpt", str(tiny_run[0] / "ckpt.pt"), "--mode", mode, *option])
    assert code == 2 and capsys.readouterr().err.endswith(
        "error: --max_bytes, --chunk and --mem_len must be >= 0, --batch_size and --streams >= 1\n")
