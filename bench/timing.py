"""Timing for the benchmarks. On a GPU: many calls between two CUDA events, inputs rotated past the L2 cache, the
median of several rounds, and the device's copy bandwidth for reference; kernels are timed as CUDA-graph replays
(time_kernels), so that what is measured is the device's work, not Python's and autograd's launch overhead (the
first H200 run, 2026-11-28: ~0.5 ms per forward+backward call of any implementation on 8 MB, host-bound). On a
CPU: wall-clock medians."""
from __future__ import annotations

import functools
import statistics
import time
from typing import Callable

import pytest
import torch

from train.hardware import device_name

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs a CUDA device")
L2_FLUSH_BYTES = 256 << 20  # inputs are rotated until this much has been touched: past any current L2
SHAPES = [(8192, 512), (8192, 2048), (32768, 512), (32768, 2048)]  # rows x d of the elementwise/row kernels
PASSES = ["fwd", "fwd+bwd"]
Case = tuple[str, Callable[[], dict]]  # one case of a suite: (label, measure() -> result), run one at a time


def case(label: str, fn, *args, **kwargs) -> Case:
    """A suite's case: fn(*args, **kwargs) measures it and returns its result."""
    return label, functools.partial(fn, *args, **kwargs)


def copies(make, nbytes_each: int) -> list:
    """Enough independent input sets that cycling through them leaves the L2 cache cold."""
    return [make() for _ in range(max(1, min(32, L2_FLUSH_BYTES // max(nbytes_each, 1))))]


def time_per_call(fn, inputs: list, calls: int = 50, rounds: int = 7, warmup: int = 3) -> float:
    """Median seconds per call of fn(*inputs[i % len(inputs)]): CUDA events around `calls` calls on a GPU,
    wall clock around each call on a CPU (where `calls` is ignored and `rounds` calls are timed)."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])  # warm-up (and compilation)
    if not torch.cuda.is_available():
        times = []
        for i in range(rounds):
            t0 = time.perf_counter()
            fn(*inputs[i % len(inputs)])
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    torch.cuda.synchronize()

    def calls_in_turn():
        for i in range(calls):
            fn(*inputs[i % len(inputs)])
    return event_median(calls_in_turn, calls, rounds)


def event_median(body, calls: int, rounds: int) -> float:
    """Median over `rounds` runs of body() (which makes `calls` calls) between two CUDA events, per call."""
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        body()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def time_graph(fn, inputs: list, calls: int = 50, rounds: int = 7, warmup: int = 3) -> float:
    """Median seconds per call of fn(*inputs[i % len(inputs)]), `calls` calls captured in one CUDA graph and its
    replays timed with CUDA events. Raises what the capture raises (an op that synchronises, say)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, lazy allocations) off the default stream, as for capture
        for i in range(warmup):
            fn(*inputs[i % len(inputs)])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(*inputs[i % len(inputs)])
    graph.replay()
    torch.cuda.synchronize()
    return event_median(graph.replay, calls, rounds)


def time_kernels(fn, inputs: list, calls: int = 50) -> tuple[float, str]:
    """(seconds per call, how it was timed): graph replays on a GPU ("graph"); where the capture fails, plain
    calls between events ("stream", the failure printed); on a CPU wall clock ("wall")."""
    if not torch.cuda.is_available():
        return time_per_call(fn, inputs, calls), "wall"
    try:
        return time_graph(fn, inputs, calls), "graph"
    except Exception as e:  # noqa: BLE001 - any capture failure: fall back, say why
        torch.cuda.synchronize()
        print(f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}): timing calls on "
              f"the stream instead", flush=True)
        return time_per_call(fn, inputs, calls), "stream"


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / time_per_call(lambda: dst.copy_(src), [()], calls=20)


@functools.cache
def bandwidth() -> float:
    return copy_bandwidth()


def report(info: dict) -> None:
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()), flush=True)


def measure(benchmark, step, make, traffic: int, input_bytes: int, **info) -> dict:
    """Time step(*inputs) on rotated inputs from make() (also through pytest-benchmark's fixture when given) and
    return `info` with the time, the GB/s of `traffic` ideal bytes per call and its fraction of the copy
    bandwidth."""
    seconds, timing = time_kernels(step, copies(make, input_bytes))
    if benchmark is not None:
        benchmark.pedantic(step, args=make(), rounds=3, warmup_rounds=1)
    info.update(device=device_name(), seconds=seconds, timing=timing, gbps=traffic / seconds / 1e9,
                of_copy=traffic / seconds / bandwidth())
    if benchmark is not None:
        benchmark.extra_info.update(info)
    report(info)
    return info


def row_kernel_suite(run_case, impls) -> list[Case]:
    """Every shape x pass x implementation of a row-wise kernel, the compiled reference first in each (GPU only;
    on a CPU the kernels run only interpreted, which says nothing about speed)."""
    if not torch.cuda.is_available():
        return []
    ordered = sorted(impls, key=lambda impl: impl != "compiled")
    return [case(f"{pass_}/{rows}x{d}/{impl}", run_case, impl, rows, d, pass_)
            for rows, d in SHAPES for pass_ in PASSES for impl in ordered]


def row_kernel_test(run_case, impls):
    """The pytest-benchmark test of a row-wise kernel, parametrized like row_kernel_suite."""
    @needs_cuda
    @pytest.mark.parametrize("pass_", PASSES)
    @pytest.mark.parametrize("rows, d", SHAPES)
    @pytest.mark.parametrize("impl", list(impls))
    def test(benchmark, impl, rows, d, pass_):
        run_case(impl, rows, d, pass_, benchmark)
    return test
