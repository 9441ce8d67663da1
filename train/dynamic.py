"""Dynamic evaluation (Krause et al. 2018, "Dynamic Evaluation of Neural Sequence Models"; 2019, "... of
Transformer Language Models"): the model keeps learning from the text it is scored on.

    python -m train.evaluate --ckpt runs/a/ckpt.pt --mode dynamic [--dyn_lr 1e-5] [--dyn_decay 0] [--dyn_segment N]

Protocol `dynamic`. The split's targets are cut into segments of `segment` bytes, in order. Segment [c0, c1) is
first scored exactly as the strided protocol scores it (one window of up to block_size inputs ending at c1, only its
last c1 - c0 predictions count), with the weights as they are after the previous segments; then one update is made
on the mean loss of those same predictions:

    theta <- theta - lr * grad / (rms + eps) + decay * (rms / mean(rms), at most 1 / decay) * (theta_0 - theta)

with rms the root mean square of each parameter's gradient over `stat_batches` random batches of the training split
at the trained weights theta_0 (RMS-normalised SGD with a decay back to the trained weights, their "RMS with an RMS
global prior"), mean(rms) its mean over all weights and eps = EPS_REL * mean(rms): a weight the statistics never
moved (the embedding row of a byte absent from those batches) takes steps at most 1 / EPS_REL times a typical one
instead of dividing by ~0. No byte is ever scored after the model has trained on it. With lr = 0 it is the strided
protocol with stride = segment. The weights are restored afterwards.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from train.config import ConfigError
from train.data import random_batch
from train.evaluate import plan_windows
from train.logger import progress_bar

EPS_REL = 0.1  # eps of the RMS normalisation, relative to the mean rms


def gradient_rms(model, train_split: np.ndarray, block_size: int, batch_size: int, n_batches: int,
                 device: str = "cpu", autocast=nullcontext, seed: int = 0) -> list[torch.Tensor]:
    """Per-parameter root mean square of the next-byte loss's gradient over n_batches random training batches."""
    params = [p for p in model.parameters() if p.requires_grad]
    mean_sq = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()  # no dropout: the statistics of the function that is evaluated
    for _ in range(n_batches):
        x, y = random_batch(train_split, batch_size, block_size, gen)
        with autocast():
            logits = model(x.to(device))
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten())
        for m, g in zip(mean_sq, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                m += g.float() ** 2 / n_batches
    model.train(was_training)
    return [m.sqrt() for m in mean_sq]


def evaluate_dynamic(model, data: np.ndarray, a: int, b: int, segment: int, lr: float, decay: float,
                     rms: list[torch.Tensor], device: str = "cpu", autocast=nullcontext, progress: bool = True,
                     per_byte: bool = False) -> dict:
    """Protocol `dynamic` over the targets [a, b) of `data` (see the module docstring); `rms` from gradient_rms.
    With per_byte, also the NLL (nats) of every scored target, in order."""
    block = model.cfg.block_size
    if lr < 0 or not 0 <= decay < 1:
        raise ConfigError(f"--dyn_lr must be >= 0 and --dyn_decay in [0, 1) (got {lr}, {decay})")
    params = [p for p in model.parameters() if p.requires_grad]
    if len(rms) != len(params):
        raise ValueError(f"{len(rms)} gradient statistics for {len(params)} parameters")
    theta0 = [p.detach().clone() for p in params]
    mean_rms = torch.cat([r.flatten() for r in rms]).mean().clamp_min(1e-12)
    eps = EPS_REL * mean_rms
    pull = [torch.clamp(decay * r / mean_rms, max=1.0) for r in rms]
    was_training = model.training
    model.eval()
    nll, count, losses_out = torch.zeros((), dtype=torch.float64, device=device), 0, []
    windows = plan_windows(a, b, block, segment)
    bar = progress_bar(total=len(windows), desc="dynamic eval", unit="segment", disable=not progress, leave=False)
    try:
        for w0, w1, c0 in windows:
            rows = torch.from_numpy(data[w0:w1].astype(np.int64)).to(device)[None]
            with autocast():
                logits = model(rows[:, :-1])
            losses = F.cross_entropy(logits[0, -(w1 - c0):].float(), rows[0, -(w1 - c0):], reduction="none")
            nll += losses.detach().double().sum()  # scored with the weights of the previous segments only
            count += w1 - c0
            if per_byte:
                losses_out.append(losses.detach().cpu())
            if lr > 0:
                grads = torch.autograd.grad(losses.mean(), params, allow_unused=True)
                with torch.no_grad():
                    for p, g, r, p0, k in zip(params, grads, rms, theta0, pull):
                        if g is not None:
                            p -= (lr * g.float() / (r + eps)).to(p.dtype)
                        if decay > 0:
                            p += (k * (p0 - p)).to(p.dtype)
            bar.update(1)
    finally:
        bar.close()
        with torch.no_grad():
            for p, p0 in zip(params, theta0):
                p.copy_(p0)
        model.train(was_training)
    nll = float(nll)
    if not math.isfinite(nll):
        raise ConfigError(f"dynamic evaluation diverged (a non-finite loss): lower --dyn_lr (got {lr:g})")
    out = {"bpc": nll / max(count, 1) / math.log(2), "bytes": count, "nll_nats": nll,
           "protocol": f"dynamic, segment {segment} of block {block}, lr {lr:g}, decay {decay:g}"}
    if per_byte:
        out["per_byte_nll"] = torch.cat(losses_out) if losses_out else torch.zeros(0)
    return out
