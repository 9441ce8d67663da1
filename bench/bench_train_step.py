"""A whole training step (forward, backward, AdamW step) of a preset's model: charlm eager, charlm compiled,
charlm compiled with the Triton kernels, and the plain reference GPT (bench/reference_gpt.py) on the same
config and batch; and the real thing, `Run.train_step` of `python -m train --preset=<preset>` with its data
thread, guard and logging (case `run`), so that the MFU reported is what training gets. Reports seconds per
step, tokens/s, MFU (GPU) and the speed-up over the reference.

    pytest bench/bench_train_step.py -s        (cpu preset at context 128 on any machine; t12 on a GPU)
    python -m bench                            (the whole suite as a table of ratios)
"""
from __future__ import annotations

import dataclasses
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch

from bench.reference_gpt import ReferenceGPT
from bench.timing import Case, case, report, time_per_call
from model import GPT, head_weights
from model.gpt import training_flops_per_token
from train.config import PRESETS, Args, set_value
from train.guard import StopOnSignal
from train.hardware import device_name, peak_bf16_flops
from train.loop import Run

IMPLS = ["reference", "charlm-eager", "charlm-compiled", "charlm-compiled-triton", "run"]


# The benchmarks' shapes stay where the gate's baselines (bench/baselines/*.json) were measured, whatever a preset
# is later tuned to: the cpu preset's model at context 128, without n-gram tables, trained by AdamW (its own context
# became 64 in the second study round, the tables and Muon came in the third).
BENCH_OVERRIDES = {"cpu": {"model.block_size": "128", "model.ngram_max": "1", "train.optimizer": "adamw"}}


def bench_config(preset: str):
    """The preset's config at the benchmarks' shape (BENCH_OVERRIDES)."""
    cfg = PRESETS[preset]()
    for key, value in BENCH_OVERRIDES.get(preset, {}).items():
        set_value(cfg, key, value)
    return cfg


def cases_here() -> list[tuple[str, str]]:
    """(preset, implementation) pairs timed on this machine: on a GPU every implementation of t12 and t12-modern
    and the real step of t12-xl (memory; each compiled case costs ~40 s of compilation in the device suite's
    budget), most wanted first, since the suite stops at its time budget: the real steps' MFU of t12 and
    t12-modern, then the kernels' effect (compiled with and without them; eager and compiled t12 were measured
    on the first H200); on a CPU the cpu preset without the Triton kernels (which run there only interpreted)."""
    if torch.cuda.is_available():
        kernels_effect = ["charlm-compiled-triton", "charlm-compiled"]
        return ([(preset, impl) for preset in ("t12", "t12-modern") for impl in ("reference", "run")]
                + [(preset, impl) for preset in ("t12", "t12-modern") for impl in kernels_effect]
                + [("t12", "charlm-eager"), ("t12-xl", "reference"), ("t12-xl", "run")])
    return [("cpu", impl) for impl in IMPLS if not impl.endswith("triton")]


def matmul_weights(model: torch.nn.Module) -> int:
    """Weights of a model's matmuls (charlm's or the reference's): every matrix but the embedding and position
    tables, which are lookups."""
    return sum(p.numel() for n, p in model.named_parameters()
               if p.dim() >= 2 and not any(k in n for k in ("tok_emb", "pos", "wte", "wpe")))


def make_step(preset: str, impl: str, device: str, overrides: dict[str, str] | None = None):
    """(step function, model config, batch size, matmul parameter count) for one implementation of the preset
    with dotted `overrides` ({"model.attn_type": "mla"})."""
    run = bench_config(preset)
    for key, value in (overrides or {}).items():
        set_value(run, key, value)
    cfg = dataclasses.replace(run.model, dropout=0.0, kernels="triton" if impl.endswith("triton") else "torch")
    torch.manual_seed(0)
    model = (ReferenceGPT(cfg) if impl == "reference" else GPT(cfg)).to(device)
    n_matmul = matmul_weights(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fn = torch.compile(model) if "compiled" in impl else model
    batch = run.train.batch_size
    x = torch.randint(0, 256, (batch, cfg.block_size), device=device)
    y = torch.randint(0, 256, (batch, cfg.block_size), device=device)
    hw = torch.tensor(head_weights(cfg, 0.0), device=device)
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if device == "cuda" else nullcontext

    def step():
        with autocast():
            loss = fn(x, y) if impl == "reference" else fn(x, y, hw)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, cfg, batch, n_matmul


@contextmanager
def real_run(preset: str):
    """(step function, model config, batch size, matmul parameter count) of the trainer itself: a Run of the
    preset (on the sample corpus; data/enwiki-sample.xml when present, as the device suite carries it) in a
    temporary folder, without evaluations or checkpoints."""
    cfg = bench_config(preset)
    sample = Path("data/enwiki-sample.xml")
    cfg.data.source = str(sample) if sample.exists() else "sample"
    cfg.train.max_steps, cfg.train.max_time = 10**9, 0.0
    cfg.train.eval_interval = cfg.train.full_eval_interval = cfg.train.ckpt_interval = 0
    with tempfile.TemporaryDirectory() as tmp:
        cfg.out_dir = tmp
        run = Run(Args(cfg, preset))
        stop = StopOnSignal(verbose=False)  # never entered: no handlers installed
        try:
            yield (lambda: run.train_step(stop)), cfg.model, cfg.train.batch_size, matmul_weights(run.raw)
        finally:
            run.close()


def run_case(preset: str, impl: str, benchmark=None) -> dict:
    """Time one implementation (and, given pytest-benchmark's fixture, hand it the same step)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with real_run(preset) if impl == "run" else nullcontext(make_step(preset, impl, device)) as made:
        step, cfg, batch, n_matmul = made
        seconds = time_per_call(step, [()], calls=10, rounds=7 if device == "cuda" else 9, warmup=3)
        if benchmark is not None:
            benchmark.pedantic(step, rounds=3)
    tokens = batch * cfg.block_size
    peak = peak_bf16_flops(torch.device(device))
    result = {"name": f"train_step/{preset}/{impl}", "reference": f"train_step/{preset}/reference",
              "device": device_name(), "dtype": "bf16" if device == "cuda" else "fp32",
              "shape": f"{cfg.n_layer}L d{cfg.d_model} B{batch} T{cfg.block_size}", "seconds": seconds,
              "tokens_per_s": tokens / seconds}
    if peak:
        result["mfu"] = training_flops_per_token(cfg, n_matmul) * tokens / seconds / peak
    return result


def suite() -> list[Case]:
    return [case(f"{preset}/{impl}", run_case, preset, impl) for preset, impl in cases_here()]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("preset", ["cpu", "t12", "t12-modern", "t12-xl"])
def test_train_step(benchmark, preset, impl):
    if (preset, impl) not in cases_here():
        pytest.skip(f"{preset}/{impl} is not timed on this machine (see cases_here)")
    result = run_case(preset, impl, benchmark)
    benchmark.extra_info.update(result)
    report(result)
