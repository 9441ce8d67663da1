"""The other harder architectures (#13: Transformer-XL's relative positions; #15: mixture of experts with each
dispatch, low-rank projections, the hourglass) in a whole training step against the plain model of the same preset,
measured in the same run, as bench/bench_attention.py does for the attention variants: seconds per step, tokens/s,
the speed-up over the baseline, parameters.

On a GPU the t12-modern preset (T12 size, compiled, bf16): xl_relative through FlexAttention's score_mod, MoE
through torch's grouped matmul and through the padded batched matmul. On a CPU the cpu preset, eager (at the
benchmarks' shape: context 128, AdamW). The sizes follow the CPU study bench/studies/variants-cpu.toml: 2 of 4
experts of half the MLP's width (the dense MLP's active compute), rank d_model / 4 in every projection, an
hourglass of a quarter of the layers at each end shortened by 2. The device suite runs it in its own lease
(`--architectures`); Transformer-XL memory is the train_step suite's t12-xl case.

    python -m bench --only architectures
"""
from __future__ import annotations

import pytest

from bench.bench_attention import run_variant
from bench.timing import Case, case, report

MOE = {"model.moe_experts": "4", "model.moe_top_k": "2", "model.moe_expert_dim": "{dff2}"}
ARCHITECTURES = {
    "baseline": {},
    "xl-relative": {"model.pos_emb": "xl_relative"},
    "moe-grouped": MOE | {"model.moe_dispatch": "grouped"},
    "moe-padded": MOE | {"model.moe_dispatch": "padded"},
    "low-rank": {"model.low_rank": "{d4}"},
    "hourglass": {"model.hourglass": "{hourglass}", "model.shorten_factor": "2"},
}


def run_architecture(variant: str, benchmark=None) -> dict:
    return run_variant(variant, benchmark, table=ARCHITECTURES, group="architectures", baseline="baseline")


def suite() -> list[Case]:
    return [case(variant, run_architecture, variant) for variant in ARCHITECTURES]


@pytest.mark.parametrize("variant", list(ARCHITECTURES))
def test_architecture_step(benchmark, variant):
    result = run_architecture(variant, benchmark)
    benchmark.extra_info.update(result)
    report(result)
