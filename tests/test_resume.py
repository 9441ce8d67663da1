"""Runs that survive: exact resume after SIGTERM, SIGKILL during a checkpoint write, Ctrl-C handling."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, read_metrics, run_cli
from train.checkpoint import load_checkpoint

# dropout, intermediate heads (they stop at a third and two thirds of the run) and a t+2 head: every RNG stream
# and schedule is exercised; log_interval 3 makes the resumed run restore a half-filled logging accumulator
EXACT = ["--preset=tiny", "--model.dropout=0.1", "--model.intermediate_loss=true", "--model.n_layer=3",
         "--model.n_targets=2", "--model.target_weights=1.0,0.5", "--model.d_model=64", "--model.d_ff=128",
         "--train.max_steps=240", "--train.log_interval=3", "--train.eval_interval=40", "--train.ckpt_interval=50",
         "--train.full_eval_interval=100"]


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "train", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout: float = 120.0, poll: float = 0.005):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError("condition not reached in time")


def step_lines(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [l for l in path.read_text().splitlines() if l.startswith('{"step"')]


def comparable(run_dir):
    """Per-step values that must repeat exactly (not the clock-dependent ones)."""
    keys = ("step", "train_loss", "lr", "grad_norm", "val_bpc", "full_val_bpc")
    return [{k: r[k] for k in keys if k in r} for r in read_metrics(run_dir) if "event" not in r]


def test_resume_after_sigterm_repeats_the_uninterrupted_run_bit_for_bit(small_corpus, tmp_path):
    data = f"--data.source={small_corpus}"
    whole = run_cli(*EXACT, data, f"--out_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr
    cut = tmp_path / "cut"
    proc = start(*EXACT, data, f"--out_dir={cut}")
    wait_for(lambda: len(step_lines(cut)) >= 7)  # somewhere past step 21, not on a log or checkpoint boundary
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped = load_checkpoint(cut / "ckpt.pt")["step"]
    assert 21 <= stopped < 240 and f"interrupted by SIGTERM at step {stopped}" in out
    assert "received SIGTERM: finishing the current step, then checkpointing" in err
    assert read_metrics(cut)[-1] == {"event": "interrupted", "signal": "SIGTERM", "step": stopped,
                                     "train_time_s": read_metrics(cut)[-1]["train_time_s"]}
    resumed = run_cli("--resume", f"--out_dir={cut}")
    assert resumed.returncode == 0, resumed.stderr
    assert comparable(cut) == comparable(tmp_path / "whole")  # exact float equality, every logged step
    assert read_metrics(cut)[-1]["full_val_bpc"] == read_metrics(tmp_path / "whole")[-1]["full_val_bpc"]


def test_sigkill_during_a_checkpoint_write_leaves_a_loadable_checkpoint(small_corpus, tmp_path):
    run = tmp_path / "run"
    # ~3.3M parameters: each checkpoint (weights + AdamW moments) is ~40 MB, written at every step
    proc = start("--preset=tiny", f"--data.source={small_corpus}", f"--out_dir={run}", "--model.n_layer=4",
                 "--model.d_model=256", "--model.d_ff=1024", "--model.n_head=4", "--train.batch_size=2",
                 "--train.max_steps=100000", "--train.ckpt_interval=1", "--train.eval_interval=0")
    try:
        wait_for(lambda: (run / "ckpt.pt").exists())
        wait_for(lambda: (run / "ckpt.pt.tmp").exists(), poll=0.0005)  # a write is under way
        proc.kill()
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    ckpt = load_checkpoint(run / "ckpt.pt")  # the previous checkpoint is whole
    assert ckpt["step"] >= 1
    r = run_cli("--resume", f"--out_dir={run}", f"--train.max_steps={ckpt['step'] + 2}")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(run / "ckpt.pt")["step"] == ckpt["step"] + 2 and not (run / "ckpt.pt.tmp").exists()
    steps = [r["step"] for r in read_metrics(run) if "event" not in r]
    assert steps == sorted(set(steps))  # lines the killed run wrote after its checkpoint were dropped on resume


def test_ctrl_c_finishes_the_step_and_checkpoints(small_corpus, tmp_path):
    args = ["--preset=tiny", f"--data.source={small_corpus}", "--train.max_steps=100000", "--train.eval_interval=0",
            "--model.d_model=64", "--model.d_ff=128"]
    once = tmp_path / "once"
    proc = start(*args, f"--out_dir={once}")
    wait_for(lambda: len(step_lines(once)) >= 3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    step = load_checkpoint(once / "ckpt.pt")["step"]
    assert f"interrupted by SIGINT at step {step}; checkpoint saved to {once / 'ckpt.pt'}" in out
    assert f"python -m train --resume --out_dir={once}" in out


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_sigterm_to_torchrun_stops_every_rank_at_the_same_step(small_corpus, tmp_path):
    run = tmp_path / "ddp"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "train", "--preset=tiny", f"--data.source={small_corpus}", f"--out_dir={run}",
                             "--train.max_steps=100000", "--train.eval_interval=0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for(lambda: len(step_lines(run)) >= 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    step = load_checkpoint(run / "ckpt.pt")["step"]
    assert f"interrupted by SIGTERM at step {step}" in out
    r = run_cli("--resume", f"--out_dir={run}", f"--train.max_steps={step + 2}")  # one process resumes it
    assert r.returncode == 0, r.stderr
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == step + 2
