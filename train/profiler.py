"""train.profile: a torch.profiler trace of a few training steps, written to the run folder as a Chrome trace
(chrome://tracing or https://ui.perfetto.dev), for GPU work: kernels, their launch gaps, host synchronisations;
and beside it profile.txt, the same steps in words: wall time per step against the time the device was busy
(on a GPU: the sum of its kernels' times, so the gap is what the GPU waited for the host), the kernels' time by
family (matmuls, attention, inductor's fused kernels, charlm's Triton kernels, copies) and the top operators."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType

WARMUP_STEPS = 5  # steps run before tracing starts: compilation and allocator warm-up stay out of the trace
TOP_ROWS = 25  # operators and kernels in profile.txt's table
KERNEL_FAMILIES = [  # (family, substrings of a GPU kernel's lower-cased name), first match wins
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "wgmma", "triton_tem_")),
    ("inductor (fused pointwise and reductions)", ("triton_",)),
    ("copies and fills", ("memcpy", "memset", "copy", "fill")),
    ("ATen (eager) kernels", ("at::native", "at::", "aten")),
]


def kernel_family(name: str) -> str:
    """The family of a GPU kernel's name; charlm's own Triton kernels are named `_<op>_kernel` (kernels/)."""
    low = name.lower()
    for family, keys in KERNEL_FAMILIES:
        if any(k in low for k in keys):
            return family
    if name.startswith("_") and name.endswith("_kernel"):
        return "charlm Triton kernels"
    return "other"


def summary_text(events, steps: int, seconds: float, cuda: bool) -> str:
    """profile.txt: per-step wall time and device-busy time, kernel families (GPU) and the top operators."""
    wall = seconds / steps * 1e3
    lines = [f"{steps} steps traced: {wall:.2f} ms wall time per step"]
    if cuda:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA  # record_function ranges span kernels
                   and not getattr(e, "is_user_annotation", False)]
        busy = sum(e.self_device_time_total for e in kernels) / 1e3 / steps
        if not kernels:
            lines.append("no GPU kernels recorded (is CUPTI available?)")
        else:
            lines.append(f"GPU busy {busy:.2f} ms per step ({busy / wall:.0%} of the wall time; the rest the GPU "
                         f"waited for the host), {sum(e.count for e in kernels) / steps:.0f} kernels per step")
            families: dict[str, float] = {}
            for e in kernels:
                family = kernel_family(e.key)
                families[family] = families.get(family, 0.0) + e.self_device_time_total / 1e3 / steps
            lines += ["", "GPU time per step by kernel family:"]
            lines += [f"  {family:<44} {ms:8.2f} ms  {ms / busy:5.1%}"
                      for family, ms in sorted(families.items(), key=lambda kv: -kv[1])]
    else:
        busy = sum(e.self_cpu_time_total for e in events if e.device_type == DeviceType.CPU) / 1e3 / steps
        lines.append(f"operators' self CPU time {busy:.2f} ms per step (all threads)")
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    lines += ["", events.table(sort_by=sort, row_limit=TOP_ROWS, max_name_column_width=70)]
    return "\n".join(lines) + "\n"


class StepProfiler:
    """Call `step_done()` after every training step: tracing starts after WARMUP_STEPS and covers `steps` steps;
    `close()` writes <out>/trace.json and <out>/profile.txt (also when the run ends early) and returns the trace's
    path, or None."""

    def __init__(self, steps: int, out: Path, cuda: bool, enabled: bool = True):
        self.steps, self.path, self.text_path = steps, out / "trace.json", out / "profile.txt"
        self.seen, self.traced, self.prof, self.cuda, self.started = 0, 0, None, cuda, 0.0
        self.enabled = enabled and steps > 0
        self.activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                                   if cuda else [])

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def step_done(self) -> None:
        if not self.enabled:
            return
        self.seen += 1
        if self.prof is not None:
            self.traced += 1
            if self.traced >= self.steps:
                self.close()
        elif self.seen == WARMUP_STEPS:
            self.prof = torch.profiler.profile(activities=self.activities)
            self.sync()
            self.prof.__enter__()
            self.started = time.perf_counter()

    def close(self) -> Path | None:
        if self.prof is None:
            return None
        self.sync()
        seconds = time.perf_counter() - self.started
        self.prof.__exit__(None, None, None)
        self.prof.export_chrome_trace(str(self.path))
        if self.traced:
            try:  # words about the trace are a bonus: never the reason a run fails
                self.text_path.write_text(summary_text(self.prof.key_averages(), self.traced, seconds, self.cuda))
            except Exception as e:  # noqa: BLE001
                print(f"profile.txt not written: {type(e).__name__}: {e}", file=sys.stderr)
        self.prof, self.enabled = None, False
        return self.path
