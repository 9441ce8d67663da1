"""Dynamic evaluation (train/dynamic.py): with lr 0 it is the strided protocol; no byte is scored after the model
trained on it; it learns from what it has scored, by the documented update; the trained weights come back; the CLI
reports its protocol."""
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli, tiny_config
from model import GPT, ModelConfig
from train.config import Args, ConfigError
from train.dynamic import EPS_REL, evaluate_dynamic, gradient_rms
from train.evaluate import evaluate_bytes
from train.loop import train

BLOCK = 16


def model_and_rms(seed=0):
    torch.manual_seed(seed)
    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=16, d_ff=32, block_size=BLOCK, pos_emb="rope"))
    train_text = np.random.default_rng(seed).integers(0, 256, 2000, dtype=np.uint8)
    return model, gradient_rms(model, train_text, BLOCK, batch_size=4, n_batches=3)


def test_with_lr_0_it_is_the_strided_protocol_at_stride_segment():
    model, rms = model_and_rms()
    text = np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8)
    dyn = evaluate_dynamic(model, text, 40, 300, segment=5, lr=0.0, decay=0.0, rms=rms, progress=False)
    strided = evaluate_bytes(model, text, 40, 300, BLOCK, 5, progress=False)
    assert dyn["bytes"] == strided["bytes"] == 260
    assert math.isclose(dyn["nll_nats"], strided["nll_nats"], rel_tol=1e-6)
    assert math.isclose(dyn["bpc"], strided["bpc"], rel_tol=1e-6)
    assert math.isclose(dyn["bpc"], dyn["nll_nats"] / 260 / math.log(2), rel_tol=1e-12)  # nats per byte / ln 2


@pytest.mark.parametrize("p", [123, 125, 200])  # a segment boundary (segment 5 from 40: 120, 125) and inside one
def test_no_byte_is_scored_after_the_model_trained_on_it(p):
    """Change every byte from position p on: the losses of all targets before p stay identical, bit for bit.
    Had any update used a byte >= p before a target < p was scored, they would differ (checked: the later
    losses do change, and lr > 0 changes the scores)."""
    model, rms = model_and_rms()
    text = np.random.default_rng(2).integers(0, 256, 260, dtype=np.uint8)
    other = text.copy()
    other[p:] = (other[p:].astype(np.int64) + 1 + np.arange(len(text) - p) % 7).astype(np.uint8)
    run = lambda data, lr: evaluate_dynamic(model, data, 40, 260, segment=5, lr=lr, decay=0.01, rms=rms,
                                            progress=False, per_byte=True)["per_byte_nll"]
    a, b = run(text, 1e-3), run(other, 1e-3)
    assert torch.equal(a[: p - 40], b[: p - 40])
    assert not torch.equal(a[p - 40:], b[p - 40:])
    assert not torch.allclose(a[10:], run(text, 0.0)[10:])  # the updates do change the scores


def test_it_learns_from_what_it_has_scored_and_restores_the_weights():
    model, rms = model_and_rms(seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pattern = np.random.default_rng(4).integers(0, 256, 23, dtype=np.uint8)
    text = np.tile(pattern, 30)  # a random 23-byte phrase, repeated: a model that adapts must gain
    static = evaluate_bytes(model, text, 23, len(text), BLOCK, 4, progress=False)["bpc"]
    dynamic = evaluate_dynamic(model, text, 23, len(text), segment=4, lr=1e-3, decay=0.0, rms=rms,
                               progress=False)["bpc"]
    assert dynamic < static - 3.0, (dynamic, static)  # measured: 8.0 -> 1.0 bpc
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_the_second_segment_is_scored_with_the_documented_update():
    """theta <- theta - lr g / (rms + eps), then a pull of min(1, decay rms / mean(rms)) back toward theta_0 (at
    decay 0.9 the pull saturates at 1 for parameters whose rms exceeds 1.11x the mean: they return to theta_0)."""
    model, rms = model_and_rms(seed=5)
    text = np.random.default_rng(6).integers(0, 256, 26, dtype=np.uint8)
    lr, decay = 3e-2, 0.9
    mean = torch.cat([r.flatten() for r in rms]).mean()
    assert any(bool((decay * r / mean > 1).any()) for r in rms)  # the clamp matters here
    scored = evaluate_dynamic(model, text, 16, 26, segment=5, lr=lr, decay=decay, rms=rms, progress=False,
                              per_byte=True)["per_byte_nll"]
    reference = copy.deepcopy(model).eval()
    params = list(reference.parameters())

    def losses(net, w0, w1):
        rows = torch.from_numpy(text[w0:w1].astype(np.int64))[None]
        return F.cross_entropy(net(rows[:, :-1])[0, -5:], rows[0, -5:], reduction="none")
    first = losses(reference, 4, 21)  # targets 16..20, with the context before them
    grads = torch.autograd.grad(first.mean(), params, allow_unused=True)
    with torch.no_grad():
        for p, g, r in zip(params, grads, rms):
            if g is not None:
                step = lr * g / (r + EPS_REL * mean)
                p -= (1 - torch.clamp(decay * r / mean, max=1.0)) * step
        second = losses(reference, 9, 26)  # targets 21..25
        static = losses(model.eval(), 9, 26)  # the trained weights, restored
    torch.testing.assert_close(scored, torch.cat([first.detach(), second]), rtol=1e-5, atol=1e-6)
    assert (second - static).abs().max() > 1e-4  # the update did change the scores


def test_a_diverging_run_is_an_error_not_a_number():
    model, rms = model_and_rms(seed=3)
    text = np.tile(np.random.default_rng(4).integers(0, 256, 23, dtype=np.uint8), 30)
    with pytest.raises(ConfigError, match="dynamic evaluation diverged .* lower --dyn_lr"):
        evaluate_dynamic(model, text, 23, len(text), segment=4, lr=1.0, decay=0.0, rms=rms, progress=False)


def test_dynamic_cli_reports_its_protocol(small_corpus, tmp_path):
    train(Args(tiny_config(small_corpus, tmp_path / "run", train__max_steps="3"), "tiny"))
    r = run_cli("--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--split", "val", "--max_bytes", "300", "--mode",
                "dynamic", "--dyn_stat_batches", "2", "--dyn_lr", "1e-4", module="train.evaluate")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["protocol"] == "dynamic" and out["segment"] == 8 and out["lr"] == 1e-4 and out["bytes"] == 300
    assert out["protocol_name"].startswith("dynamic, segment 8 of block 32, lr 0.0001") and 0 < out["bpc"] < 9
