"""The attention variants (#14: sparse patterns, differential attention, multi-head latent attention) in a whole
training step against standard attention of the same model, measured in the same run: seconds per step, tokens/s,
the speed-up over standard attention, parameters and KV-cache bytes per token (bf16 on a GPU, fp32 on a CPU).

On a GPU the t12-modern preset (T12 size: 12 layers, d_model 512, context 512, batch 16), compiled, bf16: the sparse
patterns through FlexAttention's block-sparse kernel. On a CPU the cpu preset, eager, few rounds (sparse patterns
as dense masks there: they cost, not save). The device suite runs this suite in its own lease (`--variants`): five
compilations do not fit the main suite's budget.

    python -m bench --only attention
"""
from __future__ import annotations

import pytest
import torch

from bench.bench_train_step import bench_config, make_step
from bench.timing import Case, case, report, time_per_call
from model import GPT
from model.kv_cache import cache_bytes_per_token
from train.hardware import device_name

# variant -> dotted overrides of the preset; block 512 on a GPU (the windows are fractions of it), 128 on a CPU
VARIANTS = {
    "standard": {},
    "local": {"model.attn_pattern": "local", "model.attn_window": "{block4}"},
    "strided": {"model.attn_pattern": "strided", "model.attn_window": "{block8}", "model.attn_stride": "{block8}"},
    "fixed": {"model.attn_pattern": "fixed", "model.attn_stride": "{block8}", "model.attn_summary": "8"},
    "differential": {"model.attn_type": "differential"},
    "mla": {"model.attn_type": "mla", "model.kv_lora_rank": "{d2}", "model.rope_head_dim": "{hd2}"},
}


def setting() -> tuple[str, str]:
    """(preset, implementation) timed on this machine."""
    return ("t12-modern", "charlm-compiled-triton") if torch.cuda.is_available() else ("cpu", "charlm-eager")


def overrides_for(variant: str, preset: str, table: dict[str, dict[str, str]]) -> dict[str, str]:
    model = bench_config(preset).model
    sizes = {"block4": model.block_size // 4, "block8": model.block_size // 8, "d2": model.d_model // 2,
             "d4": model.d_model // 4, "hd2": model.head_dim // 2, "dff2": model.d_ff // 2,
             "hourglass": f"{model.n_layer // 4},{model.n_layer - model.n_layer // 4 * 2},{model.n_layer // 4}"}
    return {k: v.format(**sizes) for k, v in table[variant].items()}


def run_variant(variant: str, benchmark=None, table: dict[str, dict[str, str]] = VARIANTS, group: str = "attention",
                baseline: str = "standard") -> dict:
    """One variant of `table` in a whole training step, named `<group>/<variant>` against `<group>/<baseline>`."""
    preset, impl = setting()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = overrides_for(variant, preset, table)
    step, cfg, batch, _ = make_step(preset, impl, device, overrides)
    cuda = device == "cuda"
    seconds = time_per_call(step, [()], calls=10 if cuda else 1, rounds=7 if cuda else 3, warmup=3 if cuda else 1)
    if benchmark is not None:
        benchmark.pedantic(step, rounds=3)
    tokens = batch * cfg.block_size
    return {"name": f"{group}/{variant}", "reference": f"{group}/{baseline}", "device": device_name(),
            "dtype": "bf16" if cuda else "fp32", "shape": f"{preset} {cfg.n_layer}L d{cfg.d_model} B{batch} "
            f"T{cfg.block_size}", "seconds": seconds, "tokens_per_s": tokens / seconds,
            "params": GPT(cfg).num_params(), "overrides": overrides,
            "cache_bytes_per_token": cache_bytes_per_token(cfg, 2 if cuda else 4)}


def suite() -> list[Case]:
    return [case(variant, run_variant, variant) for variant in VARIANTS]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_attention_variant_step(benchmark, variant):
    result = run_variant(variant, benchmark)
    benchmark.extra_info.update(result)
    report(result)
