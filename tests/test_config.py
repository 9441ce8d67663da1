"""The typed config: presets, dotted overrides, one-line errors, and the knob table."""
import re

import pytest
import torch

from conftest import REPO
from train.config import (PRESETS, Config, ConfigError, from_dict, help_text, knob_markdown, knob_table, parse_args,
                          to_dict)


def test_overrides_are_typed():
    a = parse_args(["--preset=tiny", "--model.n_layer=3", "--train.lr", "1e-3", "--model.bias=false",
                    "--model.n_targets=2", "--model.target_weights=1.0,0.5", "--train.max_steps=1e3",
                    "--out_dir=runs/x", "--data.source=sample", "--resume"])
    c = a.cfg
    assert (c.model.n_layer, c.train.lr, c.model.bias, c.model.target_weights) == (3, 1e-3, False, (1.0, 0.5))
    assert c.train.max_steps == 1000 and isinstance(c.train.max_steps, int)
    assert c.out_dir == "runs/x" and c.data.source == "sample" and a.resume and a.preset == "tiny"


@pytest.mark.parametrize("argv, message", [
    (["--modle.n_layer=3"], "unknown config key 'modle.n_layer'"),
    (["--train.warmup_steps=-1"], "train.warmup_steps must be >= 0"),
    (["--train.grad_accum=0"], "train.grad_accum must be > 0"),
    (["--train.min_lr_ratio=2"], "train.min_lr_ratio must be in [0, 1]"),
    (["--train.optimizer=ivon", "--train.skip_nonfinite=true"], "train.optimizer=ivon works with neither"),
    (["--model.n_layer=three"], "model.n_layer='three': expected an integer"),
    (["--model.n_layer=2.5"], "expected an integer"),
    (["--model.bias=maybe"], "expected true or false"),
    (["--model.norm=batchnorm"], "expected one of layernorm | rmsnorm"),
    (["--model.n_targets=2", "--model.target_weights=1.0"], "model.target_weights has 1 values but model.n_targets=2"),
    (["--model.n_targets=2", "--model.intermediate_targets=3"], "model.intermediate_targets=3 must be between 1 and"),
    (["--model.intermediate_targets=0"], "model.intermediate_targets=0 must be between 1 and model.n_targets=1"),
    (["model.n_layer=3"], "unexpected argument 'model.n_layer=3'"),
    (["--model.n_layer"], "--model.n_layer needs a value"),
    (["--model.dropout=1.5"], "model.dropout must be in [0, 1)"),
    (["--model.pos_emb=rope", "--model.d_model=30", "--model.n_head=2"], "needs an even head dimension"),
    (["--model.n_layer=0"], "model.n_layer must be >= 1 (got 0)"),
    (["--model.d_ff=-2"], "model.d_ff must be >= 1 (got -2)"),
    (["--model.vocab_size=512"], "model.vocab_size must be 256 for byte-level data (got 512)"),
    (["--model.intermediate_weight=-1"], "loss weights must be >= 0"),
    (["--model.n_targets=2", "--model.target_weights=1.0,-0.5"], "loss weights must be >= 0"),
    (["--model.mem_len=-1"], "model.mem_len must be >= 0 (got -1)"),
    (["--model.cmem_ratio=0"], "model.cmem_len and model.cmem_weight must be >= 0, model.cmem_ratio >= 1"),
    (["--model.n_targets=32"], "model.n_targets=32 must be smaller than model.block_size=32"),
    (["--train.eval_stride=33"], "train.eval_stride=33 must be at most model.block_size=32"),
    (["--train.lr=nan"], "train.lr='nan': expected a finite number"),
    (["--train.grad_clip=inf"], "train.grad_clip='inf': expected a finite number"),
    (["--model.n_layer=inf"], "expected an integer"),
])
def test_bad_arguments_are_one_line_errors(argv, message):
    """More cases than tests/test_bad_input.py, which runs the README's catalogue through the CLI."""
    with pytest.raises(ConfigError) as e:
        parse_args(["--preset=tiny", *argv])
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_round_trip_through_plain_data(name):
    cfg = PRESETS[name]()
    assert cfg.errors() == []
    assert from_dict(to_dict(cfg)) == cfg


def test_from_dict_rejects_unknown_keys():
    d = to_dict(Config())
    d["model"]["n_layerz"] = 2
    with pytest.raises(ConfigError, match="unknown config key 'model.n_layerz'"):
        from_dict(d)


@pytest.mark.parametrize("extra, message", [
    (["--model.pos_emb=xl_relative"], "model.pos_emb=xl_relative shares its u and v across layers"),
    (["--train.optimizer=muon"], "train.optimizer=muon needs whole weight matrices"),
    (["--train.optimizer=ivon"], "train.optimizer=ivon works with neither train.fsdp"),
])
def test_what_fsdp_cannot_shard_is_refused_under_torchrun(monkeypatch, extra, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parse_args(["--preset=tiny", "--train.fsdp=true"]).cfg.errors() == []
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(["--preset=tiny", "--train.fsdp=true", *extra])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_cuda_without_a_cuda_device_is_refused():
    with pytest.raises(ConfigError, match="train.device=cuda but no CUDA device is available"):
        parse_args(["--preset=tiny", "--train.device=cuda"])


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["model"].update(n_layer=True), "model.n_layer=True: expected an integer"),
    (lambda d: d.update(out_dir=3), "out_dir=3: expected a string"),
    (lambda d: d.update(model=3), "config section 'model' must be an object"),
])
def test_from_dict_rejects_ill_typed_values(edit, message):
    """A checkpoint's or a config.json's config is JSON: a bool is not an integer, a number not a path."""
    d = to_dict(Config())
    edit(d)
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(d)


def test_every_knob_has_a_comment_and_its_current_row_in_the_readme():
    """The README's table is `python -m train.config`'s output: a default, type or comment changed in the dataclass
    but not there fails here."""
    readme = (REPO / "README.md").read_text()
    rows = knob_markdown().splitlines()
    for (key, _, _, comment), row in zip(knob_table(), rows, strict=True):
        assert comment, f"{key} has no trailing comment in its dataclass"
        assert row in readme, f"the README's knob table lacks {row!r} (regenerate it: python -m train.config)"
        assert f"--{key}" in help_text()


def test_the_issue_interface_names_exist():
    names = {k for k, *_ in knob_table()}
    for key in ["model." + k for k in "n_layer n_head d_model d_ff block_size dropout norm bias activation pos_emb "
                "residual_scale init n_targets target_weights intermediate_loss tie_embeddings".split()] + \
            ["train." + k for k in "optimizer lr schedule warmup_steps batch_size grad_accum grad_clip max_steps "
             "max_time precision compile seed log_interval eval_interval eval_batches full_eval_interval "
             "ckpt_interval".split()] + ["data.source", "out_dir"]:
        assert key in names


@pytest.mark.parametrize("n, weights", [(1, [1.0]), (2, [1.0, 0.5]), (4, [1.0, 0.5, 0.5, 0.5])])
def test_n_targets_alone_gets_the_papers_weights_and_records_them(n, weights):
    cfg = parse_args(["--preset=tiny", f"--model.n_targets={n}"]).cfg
    assert to_dict(cfg)["model"]["target_weights"] == weights
    t12_one = parse_args(["--preset=t12", "--model.n_targets=1", "--model.intermediate_targets=1"]).cfg
    assert t12_one.model.target_weights == (1.0,)  # the preset's (1.0, 0.5) follows n_targets down
    with pytest.raises(ConfigError, match="model.intermediate_targets=2 must be between 1 and model.n_targets=1"):
        parse_args(["--preset=t12", "--model.n_targets=1"])
    explicit = parse_args(["--preset=tiny", "--model.n_targets=2", "--model.target_weights=1,0.25"]).cfg
    assert explicit.model.target_weights == (1.0, 0.25)


def test_bf16_on_a_cpu_needs_native_bf16(monkeypatch):
    import train.config as config_module
    argv = ["--preset=tiny", "--train.precision=bf16", "--train.device=cpu"]
    monkeypatch.setattr(config_module, "cpu_has_bf16", lambda: False)
    with pytest.raises(ConfigError, match="needs a CUDA device or a CPU with native bf16"):
        parse_args(argv)
    monkeypatch.setattr(config_module, "cpu_has_bf16", lambda: True)
    assert parse_args(argv).cfg.train.precision == "bf16"


def test_t12_is_the_papers_model_and_never_trains_on_the_sample():
    cfg = PRESETS["t12"]()
    assert (cfg.model.n_targets, cfg.model.intermediate_loss, cfg.model.intermediate_targets) == (2, True, 2)
    assert cfg.data.source == "enwik8" and cfg.data.fallback is False
    assert PRESETS["cpu"]().data.fallback and PRESETS["tiny"]().data.fallback


BASE = dict(n_layer=2, n_head=2, d_model=16, d_ff=32, block_size=16)
EDGES = [  # (overrides of a small model, the error expected, or None where the edge is still allowed)
    (dict(n_head=0), "model.n_head must be >= 1"),  # and no division by zero on the way
    (dict(pos_emb="rope", n_head=1, d_model=15), "needs an even head dimension"),
    (dict(dropout=0.999), None), (dict(dropout=1.0), "model.dropout must be in [0, 1)"),
    (dict(n_targets=2, target_weights=(1.0, 0.0), intermediate_weight=0.0), None),
    (dict(pos_emb="rope", mem_len=8, cmem_len=4, cmem_ratio=1, cmem_weight=0.0), None),
    (dict(pos_emb="rope", mem_len=6, cmem_len=4, cmem_ratio=4), "must divide model.block_size=16 and model.mem_len=6"),
    (dict(attn_pattern="local", attn_window=1, attn_stride=1, attn_summary=1), None),
    (dict(attn_type="differential", pos_emb="rope"), None),
    (dict(attn_type="mla", pos_emb="rope", kv_lora_rank=1, rope_head_dim=2), None),
    (dict(attn_type="mla", pos_emb="rope", rope_head_dim=3), "model.rope_head_dim even and >= 2"),
    (dict(low_rank=4, low_rank_targets=("qkv", "bogus")), "model.low_rank_targets must be"),
    (dict(moe_experts=2, moe_top_k=2), None),
    (dict(moe_experts=2, moe_top_k=1, moe_aux_weight=-1.0), "moe_aux_weight and moe_bias_rate must be >= 0"),
    (dict(hourglass=(1, 1)), "must be three block counts"),
    (dict(ngram_max=0), "model.ngram_max and model.ngram_buckets must be >= 1"),
    (dict(ngram_buckets=0), "model.ngram_max and model.ngram_buckets must be >= 1"),
    (dict(ngram_max=2, ngram_buckets=1), None),
    (dict(moe_experts=2, moe_top_k=1), None),
    (dict(n_targets=2, target_weights=(1.0, -0.5)), "loss weights must be >= 0"),
    (dict(intermediate_weight=-0.1), "loss weights must be >= 0"),
    (dict(pos_emb="rope", mem_len=8, cmem_len=4, cmem_ratio=0), "model.cmem_ratio >= 1"),
    (dict(pos_emb="rope", mem_len=8, cmem_len=4, cmem_weight=-1.0), "model.cmem_weight must be >= 0"),
    (dict(attn_window=0), "must be >= 1, attn_summary <= attn_stride"),
    (dict(attn_stride=4, attn_summary=5), "must be >= 1, attn_summary <= attn_stride"),
    (dict(attn_type="differential", pos_emb="rope", n_head=3, d_model=18), "model.n_head=3 must be even"),
    (dict(attn_type="mla", pos_emb="rope", kv_lora_rank=0), "model.kv_lora_rank must be >= 1"),
    (dict(attn_type="mla", pos_emb="rope", q_lora_rank=-1), "model.kv_lora_rank must be >= 1"),
    (dict(moe_experts=2, moe_top_k=0), "model.moe_top_k=0 must be between 1 and model.moe_experts=2"),
    (dict(moe_experts=2, moe_top_k=3), "model.moe_top_k=3 must be between 1 and model.moe_experts=2"),
    (dict(n_layer=3, hourglass=(1, 1, 1)), None),
    (dict(n_layer=2, hourglass=(1, 0, 1)), "must be three block counts"),
    (dict(n_layer=4, hourglass=(1, 1, 1)), "adding up to model.n_layer=4"),
]


@pytest.mark.parametrize("overrides,message", EDGES, ids=[",".join(f"{k}={v}" for k, v in o.items()) for o, _ in EDGES])
def test_each_model_check_draws_its_line_where_the_message_says(overrides, message):
    from model import ModelConfig
    errors = ModelConfig(**{**BASE, **overrides}).errors()
    if message is None:
        assert errors == []
    else:
        assert any(message in e for e in errors), errors
