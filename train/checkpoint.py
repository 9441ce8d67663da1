"""Checkpoints: plain data and tensors only (loaded with weights_only=True), written atomically.

A checkpoint holds the model and optimiser state, the step, every RNG state, the full config as plain data, the
dataset's identity and the git SHA of the code that wrote it.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import torch

from model import GPT
from model.config import IMPLEMENTATION_FIELDS
from train.config import Config, ConfigError, from_dict, reads_streams

REPO = Path(__file__).resolve().parent.parent


def git_sha() -> str:
    """HEAD of the charlm checkout, with '-dirty' when tracked files differ from it; 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`: a crash at any moment
    leaves either the previous checkpoint or the new one, never a torn file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... on damaged files
        pickled = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))  # weights_only refused an object in it
        if pickled:
            raise ConfigError(f"{path} holds a pickled {pickled.group(1)}, which charlm checkpoints never do; "
                              f"refused: unpickling objects could run code") from None
        raise ConfigError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e})"[:300]) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ConfigError(f"{path} is not a charlm checkpoint")
    return ckpt


def check_resumable(saved: Config, current: Config, path: Path) -> None:
    """What a resume may not change (a one-line ConfigError each): the architecture (model.* but the
    IMPLEMENTATION_FIELDS: attention backend, kernels, loss implementation, MoE dispatch, dropout), the optimiser (its
    state's kind), the seed (the random streams continue from the checkpoint) and the sampler (random windows or
    contiguous streams, whose rows own stream positions and memories, so their number stays too)."""
    diff = [k for k, v in vars(saved.model).items()
            if k not in IMPLEMENTATION_FIELDS and getattr(current.model, k) != v]
    if diff:
        pairs = ", ".join(f"model.{k}: checkpoint {getattr(saved.model, k)!r} vs {getattr(current.model, k)!r}"
                          for k in diff[:3])
        raise ConfigError(f"checkpoint {path} is of another architecture ({pairs})")
    if current.train.optimizer != saved.train.optimizer:
        raise ConfigError(f"checkpoint {path} holds {saved.train.optimizer} state; it cannot resume with "
                          f"train.optimizer={current.train.optimizer}")
    if current.train.seed != saved.train.seed:  # config.json would name a seed that seeded nothing
        raise ConfigError(f"train.seed cannot change on --resume (checkpoint {saved.train.seed}): the random "
                          f"streams continue from the checkpoint; start a new run for another seed")
    streams = reads_streams(saved)
    if reads_streams(current) != streams or (streams and current.train.batch_size != saved.train.batch_size):
        raise ConfigError(f"a run that reads {'contiguous streams' if streams else 'random windows'} resumes reading "
                          f"them: data.order ({saved.data.order}) and, with streams, train.batch_size "
                          f"({saved.train.batch_size} rows) cannot change on --resume")


def dataset_change(saved: dict | None, current: dict) -> str | None:
    """A warning when a resume trains on another dataset than the checkpoint's (told apart by sha256), else None.
    Allowed (fine-tuning on a new corpus), but said: the logs and checkpoints from here on name the new one."""
    if not saved or saved.get("sha256") in (None, current["sha256"]):
        return None
    return (f"warning: resuming on {current['name']} (sha256 {current['sha256'][:12]}...), not on the checkpoint's "
            f"dataset {saved.get('name')} (sha256 {saved['sha256'][:12]}...); the resume event logs the new one")


def load_model_state(model: GPT, state: dict, path: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ConfigError(f"checkpoint {path} does not fit this model: {' '.join(first[:2])}"[:300]) from None


def model_from_checkpoint(path: Path, device: str = "cpu") -> tuple[GPT, Config, dict]:
    """The model a checkpoint holds (eval mode), its config and the raw checkpoint."""
    ckpt = load_checkpoint(path)
    cfg = from_dict(ckpt["config"])
    model = GPT(cfg.model)
    load_model_state(model, ckpt["model"], Path(path))
    return model.to(device).eval(), cfg, ckpt
