"""Evaluator speed by protocol, in bytes/s: strided at stride 1 (the paper's protocol, the reference), strided at
stride block_size (non-overlapping windows) and cached (KV-cache streaming). Speed does not depend on the
weights or the text, so the model is freshly initialised and the bytes are random: the cpu preset's shape at
context 128 (bench_train_step.BENCH_OVERRIDES) on a CPU, T12's shape with RoPE (which the cached protocol needs) on
a GPU, where the cached run covers 5 MB, the size of enwik8's test split (goal on an H100: <= 30 s).

    pytest bench/bench_eval.py -s
"""
from __future__ import annotations

import dataclasses
import functools
import time
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from bench.bench_train_step import bench_config
from bench.timing import Case, report
from model import GPT
from train.evaluate import evaluate_bytes, evaluate_cached
from train.hardware import device_name

# protocol -> (stride or None for cached, bytes scored on a CPU, on a GPU)
PROTOCOLS = {"strided-1": (1, 1_000, 20_000), "strided-block": (0, 50_000, 5_000_000),
             "cached": (None, 50_000, 5_000_000)}


def make_model(device: str):
    preset = "t12" if device == "cuda" else "cpu"
    cfg = dataclasses.replace(bench_config(preset).model, pos_emb="rope", dropout=0.0, intermediate_loss=False,
                              n_targets=1, target_weights=(1.0,))
    torch.manual_seed(0)
    return GPT(cfg).to(device).eval()


def run_case(protocol: str, model=None, benchmark=None) -> dict:
    """Score the bytes once to warm up, then once timed (through pytest-benchmark's fixture when given)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model or make_model(device)
    stride, n_cpu, n_gpu = PROTOCOLS[protocol]
    n = n_gpu if device == "cuda" else n_cpu
    block = model.cfg.block_size
    data = np.random.default_rng(0).integers(0, 256, n + block + 1, dtype=np.uint8)
    a, b = block + 1, block + 1 + n
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if device == "cuda" else nullcontext
    run = (lambda: evaluate_cached(model, data, a, b, streams=64 if device == "cuda" else 16, device=device,
                                   autocast=autocast, progress=False,
                                   cache_dtype=torch.bfloat16 if device == "cuda" else None)) if stride is None else (
        lambda: evaluate_bytes(model, data, a, b, block, stride or block, 64 if device == "cuda" else 16, device,
                               autocast, progress=False))
    times = []

    def timed():
        t0 = time.perf_counter()
        result = run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        return result
    if benchmark is None:
        run()
        out = timed()
    else:
        out = benchmark.pedantic(timed, rounds=1, warmup_rounds=1)
    seconds = times[-1]
    return {"name": f"eval/{protocol}", "reference": "eval/strided-1", "device": device_name(),
            "dtype": "bf16" if device == "cuda" else "fp32", "shape": f"{model.cfg.n_layer}L d{model.cfg.d_model} "
            f"T{block} {out['bytes']} bytes", "seconds": seconds / out["bytes"], "bytes_per_s": out["bytes"] / seconds,
            "run_seconds": seconds}


def suite() -> list[Case]:
    """The protocols on one model, built when the first case runs."""
    shared = functools.cache(lambda: make_model("cuda" if torch.cuda.is_available() else "cpu"))
    return [(protocol, lambda protocol=protocol: run_case(protocol, shared())) for protocol in PROTOCOLS]


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_eval_speed(benchmark, protocol):
    result = run_case(protocol, benchmark=benchmark)
    benchmark.extra_info.update(result)
    report(result)
