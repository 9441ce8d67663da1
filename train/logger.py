"""metrics.jsonl (always, main rank), Weights & Biases (log.wandb=true), and progress bars fit for a terminal or a
log file."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from tqdm import tqdm

from train.config import LogConfig


def parses(line: str) -> dict | None:
    """The record of one metrics.jsonl line, or None for a line torn by a crash in the middle of its write."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def read_metrics(path: Path) -> list[dict]:
    """Every record of a metrics.jsonl, less a line torn by a crash (plots, studies and reports read through this)."""
    return [record for line in path.read_text().splitlines() if line.strip() and (record := parses(line)) is not None]


def truncate_after(path: Path, step: int) -> int:
    """Drop the step lines written after `step` (a run that died after its last checkpoint wrote them; the resumed
    run writes them again) and a line its death tore. Returns how many were dropped. Rewrites the file atomically."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    keep = [l for l in lines if (record := parses(l)) is not None and record.get("step", 0) <= step]
    if len(keep) == len(lines):
        return 0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(l + "\n" for l in keep))
    os.replace(tmp, path)
    return len(lines) - len(keep)


class MetricsLog:
    def __init__(self, out: Path, cfg: LogConfig, enabled: bool, run_config: dict, resume_step: int | None):
        self.enabled = enabled
        self.wandb_run = None
        if not enabled:
            return
        self.path = out / "metrics.jsonl"
        if resume_step is not None:
            truncate_after(self.path, resume_step)
        if cfg.wandb:  # Config.errors() has checked that wandb is installed
            import wandb
            self.wandb_run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_name or out.name,
                                        config=run_config, dir=str(out))
        self.file = open(self.path, "a")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None and "event" not in record:
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            if numbers:
                self.wandb_run.log(numbers, step=record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


PLAIN_INTERVAL_S = 30.0  # seconds between progress lines when stderr is not a terminal


class _Lines:
    """A stream for tqdm that turns each redraw into one plain line: what a log file (nohup, SLURM, CI) wants."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> None:
        s = s.replace("\r", "").rstrip()
        if s:
            self.stream.write(s + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar_postfix(last: dict) -> str:
    """The training bar's text from the last log records: the step, the train loss converted from nats to bits per
    byte (so it reads on the same scale as the validation bpc beside it) and the validation bpc."""
    shown = {"step": last.get("step"), "val_bpc": last.get("val_bpc"),
             "train_bpc": last["train_loss"] / math.log(2) if last.get("train_loss") is not None else None}
    return ", ".join(f"{k} {shown[k]:.4g}" for k in ("step", "train_bpc", "val_bpc") if shown[k] is not None)


def progress_bar(**kwargs) -> tqdm:
    """A tqdm bar on stderr: redrawn in place on a terminal; elsewhere one plain line at most every
    PLAIN_INTERVAL_S seconds and its final line (leave=False only clears a terminal's bar: a log keeps how it
    ended) instead of a redraw every second."""
    if sys.stderr.isatty():
        return tqdm(file=sys.stderr, **kwargs)
    # miniters=1: tqdm's monitor thread then never forces a redraw (it does only for miniters > 1: a line every
    # maxinterval, 10 s by default, and the next update() drew one more at once, since a forced redraw leaves the
    # time of the last line as it was)
    plain = {"mininterval": PLAIN_INTERVAL_S, "maxinterval": PLAIN_INTERVAL_S, "miniters": 1, "leave": True}
    return tqdm(file=_Lines(sys.stderr), **(kwargs | plain))


def summary(out: Path, final: dict, dataset: dict, plot_note: str | None = None) -> str:
    """What the main rank prints when a run ends: the scores, the run folder's files and the next commands.
    plot_note: None when curves.png was written, else why not."""
    ckpt = out / "ckpt.pt"
    curves = "" if plot_note else f", curves in {out / 'curves.png'}"
    if final["event"] == "interrupted":
        return (f"interrupted by {final['signal']} at step {final['step']}; checkpoint saved to {ckpt}{curves}\n"
                f"  resume:   python -m train --resume --out_dir={out}")
    warning = "" if dataset["name"] == "enwik8" else f"  (data: {dataset['name']}, not enwik8: not comparable)"
    scores = (f"validation {final['full_val_bpc']:.4f} bpc, test {final['full_test_bpc']:.4f} bpc over the whole "
              f"splits ({final['full_val_protocol']}){warning}" if "full_val_bpc" in final else
              "no final evaluation (train.final_eval=false)")
    return "\n".join([
        f"done: {final['step']} steps in {final['train_time_s']:.0f} s of training",
        scores,
        f"run folder: {out}  (config.json, metrics.jsonl, ckpt.pt{'' if plot_note else ', curves.png'})",
        *([f"  {plot_note}"] if plot_note else []),
        "next:",
        f"  evaluate: python -m train.evaluate --ckpt {ckpt} --split test",
        f"  sample:   python -m train.sample --ckpt {ckpt} --prompt 'The ' --tokens 300",
        f"  compare:  python -m train.plot {out} OTHER_RUN ... --out curves.png",
    ])
