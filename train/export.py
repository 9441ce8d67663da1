"""Export a charlm checkpoint as a Hugging Face `transformers` model.

    python -m train.export --ckpt runs/a/ckpt.pt --to hf --out DIR [--overwrite]

DIR then loads with `transformers.AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`
without charlm installed (config.json, model.safetensors, a byte-level tokenizer: 256 ids, id = byte value), so
`pipeline("text-generation", model=DIR)` works on raw text. Only shapes with an exact counterpart are exported:

- GPT-2 (GPT2LMHeadModel): learned positions at the input, LayerNorm with biases, biases in the linear layers,
  exact GELU or ReLU MLP;
- Llama (LlamaForCausalLM): RMSNorm, SwiGLU, RoPE (half-split, base 10000), no biases;

both with plain residuals, standard dense attention, dense MLPs, every block at full resolution, no memory, the
t+1 head tied or untied, its bias zero or absent. Anything else is refused with a one-line error naming the first
feature without an exact counterpart; auxiliary heads (t+2.., intermediate layers) are training-only and dropped
with a note. Before writing, the export's logits are checked against the checkpoint's on a probe
(`logit_difference`). Needs `transformers` (only here: training and evaluation do not).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.config import ModelConfig
from train.config import ConfigError, from_dict

GPT2_ACTIVATIONS = {"gelu": "gelu", "relu": "relu"}  # charlm's nn.GELU() is the exact (erf) GELU


def first_unmappable(cfg: ModelConfig, state: dict) -> tuple[str | None, str]:
    """(the first feature without an exact counterpart or None, the target architecture: gpt2 | llama)."""
    target = "llama" if cfg.pos_emb == "rope" else "gpt2"
    common = [(cfg.residual_scale != "none", f"model.residual_scale={cfg.residual_scale}"),
              (cfg.attn_type != "standard", f"model.attn_type={cfg.attn_type}"),
              (cfg.attn_pattern != "dense", f"model.attn_pattern={cfg.attn_pattern}"),
              (cfg.mem_len > 0, f"model.mem_len={cfg.mem_len} (Transformer-XL memory)"),
              (cfg.low_rank > 0, f"model.low_rank={cfg.low_rank} (factored projections)"),
              (cfg.ngram_max > 1, f"model.ngram_max={cfg.ngram_max} (hashed n-gram input embeddings)"),
              (cfg.moe_experts > 0, f"model.moe_experts={cfg.moe_experts} (mixture of experts)"),
              (bool(cfg.hourglass), f"model.hourglass={','.join(map(str, cfg.hourglass))} (shortened blocks)"),
              (cfg.head_bias and bool(state["heads.bias"][cfg.n_intermediate_heads].any()),
               "a non-zero bias in the t+1 head (train with model.head_bias=false to export)")]
    if target == "gpt2":
        checks = [(cfg.pos_emb != "learned", f"model.pos_emb={cfg.pos_emb} (GPT-2: learned positions at the input; "
                                             f"Llama: rope)"),
                  (cfg.norm != "layernorm", f"model.norm={cfg.norm} with learned positions (GPT-2 has LayerNorm)"),
                  (not cfg.bias, "model.bias=false with learned positions (GPT-2 has biases)"),
                  (cfg.activation not in GPT2_ACTIVATIONS, f"model.activation={cfg.activation} (GPT-2: gelu or relu)")]
    else:
        checks = [(cfg.norm != "rmsnorm", f"model.norm={cfg.norm} with rope (Llama has RMSNorm)"),
                  (cfg.activation != "swiglu", f"model.activation={cfg.activation} with rope (Llama has SwiGLU)"),
                  (cfg.bias, "model.bias=true with rope (Llama has no biases)")]
    for bad, name in checks + common:
        if bad:
            return name, target
    return None, target


def gpt2_model(cfg: ModelConfig, state: dict):
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=256, n_positions=cfg.block_size, n_embd=cfg.d_model, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, n_inner=cfg.d_ff, activation_function=GPT2_ACTIVATIONS[cfg.activation],
                        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                        layer_norm_epsilon=1e-5, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None,
                        eos_token_id=None)
    out = {"transformer.wte.weight": state["tok_emb.weight"], "transformer.wpe.weight": state["pos_emb.weight"],
           "transformer.ln_f.weight": state["norm_f.weight"], "transformer.ln_f.bias": state["norm_f.bias"],
           "lm_head.weight": state["heads.main"]}
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b in [("norm1", "ln_1"), ("norm2", "ln_2")]:
            for kind in ("weight", "bias"):
                out[f"{theirs}{b}.{kind}"] = state[f"{ours}{a}.{kind}"]
        for a, b in [("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"),
                     ("mlp.proj", "mlp.c_proj")]:  # GPT-2's Conv1D keeps weights as (in, out)
            out[theirs + b + ".weight"] = state[ours + a + ".weight"].t()
            out[theirs + b + ".bias"] = state[ours + a + ".bias"]
    return GPT2LMHeadModel(config), out


def llama_model(cfg: ModelConfig, state: dict):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=256, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                         num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
                         head_dim=cfg.head_dim, max_position_embeddings=cfg.block_size, rms_norm_eps=1e-6,
                         rope_theta=10000.0, attention_bias=False, mlp_bias=False, hidden_act="silu",
                         attention_dropout=cfg.dropout, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None,
                         eos_token_id=None, pad_token_id=None)
    out = {"model.embed_tokens.weight": state["tok_emb.weight"], "model.norm.weight": state["norm_f.weight"],
           "lm_head.weight": state["heads.main"]}
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = state[ours + "attn.qkv.weight"].chunk(3, dim=0)
        gate, up = state[ours + "mlp.gate_up.weight"].chunk(2, dim=0)
        out |= {theirs + "input_layernorm.weight": state[ours + "norm1.weight"],
                theirs + "post_attention_layernorm.weight": state[ours + "norm2.weight"],
                theirs + "self_attn.q_proj.weight": q, theirs + "self_attn.k_proj.weight": k,
                theirs + "self_attn.v_proj.weight": v,
                theirs + "self_attn.o_proj.weight": state[ours + "attn.proj.weight"],
                theirs + "mlp.gate_proj.weight": gate, theirs + "mlp.up_proj.weight": up,
                theirs + "mlp.down_proj.weight": state[ours + "mlp.proj.weight"]}
    return LlamaForCausalLM(config), out


def bytes_to_unicode() -> dict[int, str]:
    """The printable stand-in of every byte that byte-level tokenizers use (GPT-2's table): printable Latin-1
    bytes stand for themselves, the others map to code points from 256 up."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer():
    """A fast tokenizer whose ids are the bytes of the UTF-8 text: BPE over the 256 byte symbols, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {symbol: b for b, symbol in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


def require_transformers() -> None:
    """A one-line error where transformers is missing, or where it cannot load its models because charlm's own
    `kernels` package takes the import name of Hugging Face's `kernels` (a dependency of transformers >= 5.25)."""
    try:
        from transformers import GPT2LMHeadModel, LlamaForCausalLM  # noqa: F401
    except ImportError as e:
        if "kernels" in str(e):
            raise ConfigError("transformers imports Hugging Face's `kernels` package, whose name charlm's `kernels` "
                              "package takes: pip install 'transformers<5.25' && pip uninstall -y kernels") from None
        raise ConfigError("exporting needs transformers: pip install 'transformers<5.25'") from None


def logit_difference(cfg: ModelConfig, state: dict, hf_model) -> float:
    """The largest difference between the t+1 logits of the checkpoint's model and of its export on a probe of
    random bytes (fp32, relative to the largest logit): ~1e-6 for an exact mapping, the check that nothing was
    missed. Computed with torch's kernels and SDPA (the same weights: model.IMPLEMENTATION_FIELDS)."""
    import dataclasses

    import torch

    from model import GPT
    ours = GPT(dataclasses.replace(cfg, kernels="torch", attention="sdpa"))
    ours.load_state_dict(state)
    probe = torch.randint(0, 256, (2, min(cfg.block_size, 64)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours.float().eval()(probe)
        got = hf_model.float().eval()(input_ids=probe).logits
    return float((got - expected).abs().max() / expected.abs().max().clamp(min=1.0))


def export_hf(ckpt_path: Path, out: Path, overwrite: bool = False) -> dict:
    """Write the HF model of a checkpoint into `out`; returns what was done (architecture, dropped heads)."""
    from train.checkpoint import load_checkpoint
    ckpt = load_checkpoint(ckpt_path)
    try:
        cfg = from_dict(ckpt["config"]).model
    except (ConfigError, TypeError, KeyError) as e:
        raise ConfigError(f"{ckpt_path} is not a charlm checkpoint (its config does not load: {e})"[:300]) from None
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty: pass --overwrite to write into it")
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    feature, target = first_unmappable(cfg, state)
    if feature is not None:
        raise ConfigError(f"cannot export to Hugging Face: {feature} has no exact counterpart in "
                          f"{'GPT-2' if target == 'gpt2' else 'Llama'}")
    require_transformers()
    model, weights = gpt2_model(cfg, state) if target == "gpt2" else llama_model(cfg, state)
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight") and "attn.bias" not in k]
    if missing or unexpected:
        raise ConfigError(f"internal: the {target} mapping missed {missing[:3]} / left {unexpected[:3]}")
    difference = logit_difference(cfg, state, model)
    if difference > 1e-4:
        raise ConfigError(f"internal: the {target} model's logits differ from the checkpoint's by up to "
                          f"{difference:.2g} (relative) on a probe; nothing written")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    dropped = (cfg.n_targets - 1) + cfg.n_intermediate_heads
    return {"architecture": type(model).__name__, "out": str(out), "dropped_heads": dropped,
            "params": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="a charlm checkpoint (ckpt.pt)")
    p.add_argument("--to", required=True, choices=["hf"], help="hf: a Hugging Face transformers model directory")
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty directory")
    args = p.parse_args(argv)
    try:
        done = export_hf(Path(args.ckpt), Path(args.out), args.overwrite)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    note = (f"; {done['dropped_heads']} auxiliary head(s) dropped (training-only)" if done["dropped_heads"] else "")
    print(f"wrote {done['out']}: {done['architecture']}, {done['params']:,} parameters, byte-level tokenizer{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
