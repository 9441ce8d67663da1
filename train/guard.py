"""What stops a run cleanly: SIGTERM / Ctrl-C, and non-finite losses or gradients."""
from __future__ import annotations

import math
import signal
import sys
import threading

import torch


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite values, ...): reported as one line, exit code 1."""


class StopOnSignal:
    """The first SIGINT or SIGTERM asks the loop to finish its current step, checkpoint and exit; a second one
    exits at once (KeyboardInterrupt for SIGINT, the default action for SIGTERM)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, verbose: bool = True):
        self.received: int | None = None
        self.verbose = verbose
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        self.received = signum
        for sig in self.SIGNALS:  # a second signal takes the default path: immediate exit
            signal.signal(sig, self._previous.get(sig, signal.SIG_DFL))
        if self.verbose:
            print(f"\nreceived {signal.Signals(signum).name}: finishing the current step, then checkpointing "
                  f"(send it again to exit at once)", file=sys.stderr, flush=True)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""


def check_finite(step: int, loss: float, grad_norm: float | None) -> str | None:
    """The first non-finite quantity of a step, described, or None."""
    if not math.isfinite(loss):
        return f"train loss is {loss} at step {step}"
    if grad_norm is not None and not math.isfinite(grad_norm):
        return f"gradient norm is {grad_norm} at step {step}"
    return None


class NonFiniteFlag:
    """The non-finite guard on the device: each step folds its loss and gradient norm into a small device tensor
    (the first bad step, its loss and its norm) without reading anything back; `read()` brings it to the host at the
    loop's synchronisation points (log, evaluation and checkpoint steps) and clears it."""

    def __init__(self, device: torch.device):
        self.record = torch.zeros(3, dtype=torch.float64, device=device)  # step (0: none yet), loss, grad norm

    def update(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        norm = grad_norm if grad_norm is not None else torch.zeros((), device=loss.device)
        bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
        now = torch.stack([torch.full((), float(step), dtype=torch.float64, device=loss.device),
                           loss.double(), norm.double()])
        self.record = torch.where(bad & (self.record[0] == 0), now, self.record)

    def read(self) -> tuple[int, str] | None:
        """(step, description) of the first non-finite quantity since the last read, or None."""
        step, loss, norm = self.record.tolist()
        if step == 0:
            return None
        self.record.zero_()
        return int(step), check_finite(int(step), loss, norm)
