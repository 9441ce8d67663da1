"""`python -m train.export --to hf`: GPT-2- and Llama-shaped checkpoints load in `transformers` without charlm
(imports of charlm's packages blocked in the loading process) and give the same logits (GPT-2 in fp64 to 1e-9,
Llama in fp32) and the same greedy bytes as `python -m train.sample --temperature 0`; the byte tokenizer and
`pipeline("text-generation")` work on raw text; unmappable features and bad inputs are one-line errors."""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from model import GPT
from train.checkpoint import model_from_checkpoint
from train.config import ConfigError, tiny, to_dict
from train.export import require_transformers
from train.sample import generate

PROMPT = "Wiki "
NEW_BYTES = 20  # prompt + new bytes stay within the tiny preset's window of 32

# Runs in a fresh interpreter in which charlm's packages cannot be found, as on a machine without charlm
LOAD_WITHOUT_CHARLM = r"""
import importlib.util, os, sys
# charlm is not installed here: its editable-install finder and any path holding its packages are taken away
sys.meta_path[:] = [f for f in sys.meta_path if not (f if isinstance(f, type) else type(f)).__module__.startswith(
    "__editable__")]
sys.path[:] = [p for p in sys.path if not os.path.isfile(os.path.join(p or ".", "train", "export.py"))]
assert importlib.util.find_spec("train") is None and importlib.util.find_spec("model") is None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
out, dtype, n_new = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
tok = AutoTokenizer.from_pretrained(out)
x = torch.load(sys.argv[4])
prompt = sys.argv[5]
with torch.no_grad():
    logits = model(x).logits
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    greedy = model.generate(ids, max_new_tokens=n_new, do_sample=False, min_new_tokens=n_new, pad_token_id=0)
text = pipeline("text-generation", model=model, tokenizer=tok)(prompt, max_new_tokens=3, do_sample=False,
                                                               pad_token_id=0)[0]["generated_text"]
torch.save({"logits": logits, "prompt_ids": ids[0].tolist(), "greedy": greedy[0].tolist(), "text": text,
            "class": type(model).__name__}, out + "/result.pt")
"""


def checkpoint(tmp_path: Path, seed: int = 0, **model) -> Path:
    """A tiny-preset checkpoint with random weights, every norm weight and bias moved off its init."""
    cfg = tiny()
    for key, value in model.items():
        setattr(cfg.model, key, value)
    torch.manual_seed(seed)
    net = GPT(cfg.model)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name != "heads.bias":
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "ckpt.pt"
    torch.save({"model": net.state_dict(), "config": to_dict(cfg), "step": 0}, path)
    return path


def load_elsewhere(out: Path, dtype: str, x: torch.Tensor) -> dict:
    torch.save(x, out / "input.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_CHARLM, str(out), dtype, str(NEW_BYTES),
                        str(out / "input.pt"), PROMPT], capture_output=True, text=True, timeout=300, cwd=out, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return torch.load(out / "result.pt")


@pytest.mark.parametrize("shape,architecture,dtype,tolerance", [
    (dict(activation="gelu"), "GPT2LMHeadModel", "float64", 1e-9),
    (dict(activation="relu", tie_embeddings=True, head_bias=False, n_targets=2, target_weights=(1.0, 0.5),
          intermediate_loss=True), "GPT2LMHeadModel", "float64", 1e-9),
    (dict(norm="rmsnorm", activation="swiglu", pos_emb="rope", bias=False), "LlamaForCausalLM", "float32", 1e-5),
    (dict(norm="rmsnorm", activation="swiglu", pos_emb="rope", bias=False, head_bias=False, tie_embeddings=True),
     "LlamaForCausalLM", "float32", 1e-5),
], ids=["gpt2", "gpt2-tied-relu-aux-heads", "llama", "llama-tied"])
def test_exported_model_matches_charlm_without_charlm(tmp_path, shape, architecture, dtype, tolerance):
    ckpt = checkpoint(tmp_path, **shape)
    out = tmp_path / "hf"
    r = run_cli("--ckpt", str(ckpt), "--to", "hf", "--out", str(out), module="train.export")
    assert r.returncode == 0, r.stderr
    assert architecture in r.stdout and ("auxiliary head(s) dropped" in r.stdout) == ("n_targets" in shape)
    x = torch.randint(0, 256, (2, 32))
    result = load_elsewhere(out, dtype, x)
    assert result["class"] == architecture
    model, _, _ = model_from_checkpoint(ckpt)
    with torch.no_grad():
        logits = model.to(getattr(torch, dtype))(x)
    assert (result["logits"] - logits).abs().max() < tolerance
    # the tokenizer: one id per byte of the UTF-8 text
    assert result["prompt_ids"] == list(PROMPT.encode())
    # greedy decoding: the same bytes as charlm's sampler at temperature 0, and as the CLI prints them
    ours = generate(model_from_checkpoint(ckpt)[0], PROMPT.encode(), NEW_BYTES, temperature=0.0)
    assert bytes(result["greedy"][len(PROMPT):]) == ours
    cli = run_cli("--ckpt", str(ckpt), "--prompt", PROMPT, "--tokens", str(NEW_BYTES), "--temperature", "0",
                  module="train.sample")
    assert cli.returncode == 0 and cli.stdout == (PROMPT.encode() + ours).decode("utf-8", errors="replace") + "\n"
    assert result["text"].startswith(PROMPT) and len(result["text"]) > len(PROMPT)


@pytest.mark.parametrize("shape,feature", [
    (dict(pos_emb="learned_per_layer"), "model.pos_emb=learned_per_layer"),
    (dict(activation="solu"), "model.activation=solu"),
    (dict(residual_scale="depth-scaled"), "model.residual_scale=depth-scaled"),
    (dict(attn_type="differential", pos_emb="rope", norm="rmsnorm", activation="swiglu", bias=False),
     "model.attn_type=differential"),
    (dict(mem_len=16, pos_emb="rope", norm="rmsnorm", activation="swiglu", bias=False), "model.mem_len=16"),
    (dict(pos_emb="rope"), "model.norm=layernorm with rope"),
    (dict(bias=False), "model.bias=false"),
    (dict(low_rank=8), "model.low_rank=8"),
    (dict(ngram_max=3), "model.ngram_max=3"),
    (dict(moe_experts=2, moe_top_k=1), "model.moe_experts=2 (mixture of experts)"),  # was a KeyError traceback
    (dict(n_layer=3, hourglass=(1, 1, 1)), "model.hourglass=1,1,1"),  # was written as a plain (wrong) GPT-2
])
def test_unmappable_features_are_named_in_one_line(tmp_path, shape, feature):
    r = run_cli("--ckpt", str(checkpoint(tmp_path, **shape)), "--to", "hf", "--out", str(tmp_path / "hf"),
                module="train.export")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and feature in r.stderr, r.stderr
    assert "no exact counterpart" in r.stderr and not (tmp_path / "hf").exists()


def test_an_export_whose_logits_differ_from_the_checkpoints_is_not_written(tmp_path, monkeypatch):
    """The last guard, for a feature the refusals above do not know yet: the export's logits are compared with
    the checkpoint's on a probe before anything is written (an hourglass let through maps onto a plain GPT-2)."""
    from train import export
    require_transformers()
    monkeypatch.setattr(export, "first_unmappable", lambda cfg, state: (None, "gpt2"))
    with pytest.raises(ConfigError, match=r"the gpt2 model's logits differ from the checkpoint's by up to .*; "
                                          r"nothing written"):
        export.export_hf(checkpoint(tmp_path, n_layer=3, hourglass=(1, 1, 1)), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_nonzero_head_bias_is_refused(tmp_path):
    ckpt = checkpoint(tmp_path)
    saved = torch.load(ckpt)
    saved["model"]["heads.bias"][0, 7] = 0.5
    torch.save(saved, ckpt)
    r = run_cli("--ckpt", str(ckpt), "--to", "hf", "--out", str(tmp_path / "hf"), module="train.export")
    assert r.returncode == 2 and "non-zero bias in the t+1 head" in r.stderr


def test_bad_inputs_are_one_line_errors(tmp_path):
    not_charlm = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, not_charlm)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    for path, message in [(not_charlm, "is not a charlm checkpoint"), (text, "truncated or corrupt"),
                          (tmp_path / "missing.pt", "no checkpoint at")]:
        r = run_cli("--ckpt", str(path), "--to", "hf", "--out", str(tmp_path / "hf"), module="train.export")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    ckpt = checkpoint(tmp_path)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    r = run_cli("--ckpt", str(ckpt), "--to", "hf", "--out", str(busy), module="train.export")
    assert r.returncode == 2 and "pass --overwrite" in r.stderr and (busy / "keep.txt").read_text() == "mine"
    r = run_cli("--ckpt", str(ckpt), "--to", "hf", "--out", str(busy), "--overwrite", module="train.export")
    assert r.returncode == 0 and json.loads((busy / "config.json").read_text())["model_type"] == "gpt2"


class ShadowedKernels(types.ModuleType):
    """transformers >= 5.25 where charlm's `kernels` comes first on the path: its models fail to import."""

    def __getattr__(self, name):
        raise ImportError("cannot import name 'CUDAProperties' from 'kernels' (/repo/kernels/__init__.py)")


@pytest.mark.parametrize("installed, message", [(None, "exporting needs transformers"),
                                                (ShadowedKernels("transformers"), "pip uninstall -y kernels")],
                         ids=["missing", "kernels-shadowed"])
def test_transformers_that_cannot_load_models_is_a_one_line_error(monkeypatch, installed, message):
    monkeypatch.setitem(sys.modules, "transformers", installed)
    with pytest.raises(ConfigError) as raised:
        require_transformers()
    assert message in str(raised.value) and "\n" not in str(raised.value)
