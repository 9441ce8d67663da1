"""metrics.jsonl (always, main rank) and Weights & Biases (log.wandb=true)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from train.config import LogConfig


def truncate_after(path: Path, step: int) -> int:
    """Drop the step lines written after `step` (a run that died after its last checkpoint wrote them; the resumed
    run writes them again). Returns how many were dropped. Rewrites the file atomically."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    keep = [l for l in lines if l.strip() and json.loads(l).get("step", 0) <= step]
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
