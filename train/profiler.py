"""train.profile: a torch.profiler trace of a few training steps, written to the run folder as a Chrome trace
(chrome://tracing or https://ui.perfetto.dev), for GPU work: kernels, their launch gaps, host synchronisations."""
from __future__ import annotations

from pathlib import Path

import torch

WARMUP_STEPS = 5  # steps run before tracing starts: compilation and allocator warm-up stay out of the trace


class StepProfiler:
    """Call `step_done()` after every training step: tracing starts after WARMUP_STEPS and covers `steps` steps;
    `close()` writes <out>/trace.json (also when the run ends early) and returns its path, or None."""

    def __init__(self, steps: int, out: Path, cuda: bool, enabled: bool = True):
        self.steps, self.path = steps, out / "trace.json"
        self.seen, self.traced, self.prof = 0, 0, None
        self.enabled = enabled and steps > 0
        self.activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                                   if cuda else [])

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
            self.prof.__enter__()

    def close(self) -> Path | None:
        if self.prof is None:
            return None
        self.prof.__exit__(None, None, None)
        self.prof.export_chrome_trace(str(self.path))
        self.prof, self.enabled = None, False
        return self.path
