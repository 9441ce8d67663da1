"""GPU timing for the kernel benchmarks: many calls between two synchronisations, inputs rotated past the L2
cache, the median of several rounds, and the copy bandwidth of the same device for reference."""
from __future__ import annotations

import functools
import statistics

import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs a CUDA device")
L2_FLUSH_BYTES = 256 << 20  # inputs are rotated until this much has been touched: past any current L2
SHAPES = [(8192, 512), (8192, 2048), (32768, 512), (32768, 2048)]  # rows x d of the elementwise/row kernels


def copies(make, nbytes_each: int) -> list:
    """Enough independent input sets that cycling through them leaves the L2 cache cold."""
    return [make() for _ in range(max(1, min(32, L2_FLUSH_BYTES // max(nbytes_each, 1))))]


def time_per_call(fn, inputs: list, calls: int = 50, rounds: int = 7) -> float:
    """Median seconds per call of fn(*inputs[i % len(inputs)]), timed with CUDA events over `calls` calls."""
    for args in inputs[:3]:
        fn(*args)  # warm-up (and compilation)
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(calls):
            fn(*inputs[i % len(inputs)])
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / time_per_call(lambda: dst.copy_(src), [()], calls=20)


@functools.cache
def bandwidth() -> float:
    return copy_bandwidth()


def measure(benchmark, step, make, traffic: int, input_bytes: int, **info) -> None:
    """Time step(*inputs) on rotated inputs from make(), also through pytest-benchmark, and record the time, the
    GB/s of `traffic` ideal bytes per call and its fraction of the copy bandwidth."""
    seconds = time_per_call(step, copies(make, input_bytes))
    benchmark.pedantic(step, args=make(), rounds=3, warmup_rounds=1)
    info.update(device=torch.cuda.get_device_name(), us=seconds * 1e6, gbps=traffic / seconds / 1e9,
                of_copy=traffic / seconds / bandwidth())
    benchmark.extra_info.update(info)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))
