"""Checkpoint plumbing without a training run: the git SHA (clean, dirty, outside git), loading (missing, torn,
foreign files, a model of another shape), what a resume may and may not change, the dataset-change warning, and the
run folder's lock."""
import dataclasses
import os
import subprocess

import pytest
import torch

import train.checkpoint as checkpoint
from model import GPT, ModelConfig
from model.config import IMPLEMENTATION_FIELDS
from train.checkpoint import (check_resumable, dataset_change, git_sha, load_checkpoint, load_model_state,
                              save_checkpoint)
from train.config import ConfigError, tiny
from train.lock import RunLock


def git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_git_sha_names_the_commit_and_whether_tracked_files_differ(tmp_path, monkeypatch):
    git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git(tmp_path, "add", "a.py")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr(checkpoint, "REPO", tmp_path)
    (tmp_path / "untracked.txt").write_text("not part of the code\n")
    assert git_sha() == head and len(head) == 40
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_sha() == head + "-dirty"
    plain = tmp_path.parent / f"{tmp_path.name}-plain"  # a folder outside any checkout (git looks no higher)
    plain.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.setattr(checkpoint, "REPO", plain)
    assert git_sha() == "unknown"
    monkeypatch.setattr(checkpoint, "REPO", tmp_path / "missing")  # git cannot even start there
    assert git_sha() == "unknown"


def test_load_checkpoint_refuses_missing_torn_and_foreign_files(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "ckpt.pt")
    save_checkpoint(tmp_path / "ckpt.pt", {"model": {"w": torch.ones(3)}, "config": {}, "step": 7})
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 7 and not (tmp_path / "ckpt.pt.tmp").exists()
    whole = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "torn.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ConfigError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "torn.pt")
    for foreign in ({"weights": torch.ones(3)}, {"model": {}}, {"config": {}}, [1, 2]):
        torch.save(foreign, tmp_path / "other.pt")
        with pytest.raises(ConfigError, match="is not a charlm checkpoint"):
            load_checkpoint(tmp_path / "other.pt")
    torch.save({"model": {}, "config": {}, "payload": Pickled()}, tmp_path / "pickled.pt")
    with pytest.raises(ConfigError, match="holds a pickled test_checkpoint.Pickled, .*refused"):
        load_checkpoint(tmp_path / "pickled.pt")  # loaded with weights_only: nothing is unpickled


class Pickled:
    """An arbitrary object: unpickling one can run code."""


def test_a_state_of_another_shape_is_a_one_line_error(tmp_path):
    small = dict(n_layer=1, n_head=2, d_model=16, d_ff=24, block_size=8)
    state = GPT(ModelConfig(**small)).state_dict()
    model = GPT(ModelConfig(**{**small, "d_model": 24}))
    with pytest.raises(ConfigError, match=r"ckpt.pt does not fit this model: .*size mismatch") as error:
        load_model_state(model, state, tmp_path / "ckpt.pt")
    assert "\n" not in str(error.value) and len(str(error.value)) <= 300


def changed(cfg, **sections):
    """cfg with some fields of its sections replaced: changed(cfg, train=dict(lr=1e-3))."""
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields)
                                       for name, fields in sections.items()})


@pytest.mark.parametrize("sections,message", [
    (dict(model=dict(d_model=48)), r"another architecture \(model.d_model: checkpoint 32 vs 48\)"),
    (dict(model=dict(n_layer=3, kernels="triton")), r"another architecture \(model.n_layer: checkpoint 2 vs 3\)"),
    (dict(train=dict(optimizer="sgd")), "holds adamw state; it cannot resume with train.optimizer=sgd"),
    (dict(train=dict(seed=1)), r"train.seed cannot change on --resume \(checkpoint 1337\)"),
    (dict(data=dict(order="streams")), r"reads random windows resumes reading them: data.order \(auto\)"),
], ids=["architecture", "architecture-and-kernels", "optimizer", "seed", "order"])
def test_a_resume_refuses_what_the_checkpoint_fixes(sections, message):
    saved = tiny()
    with pytest.raises(ConfigError, match=message):
        check_resumable(saved, changed(saved, **sections), "ckpt.pt")


@pytest.mark.parametrize("field,value", [("attention", "math"), ("kernels", "triton"), ("loss_impl", "fused"),
                                         ("moe_dispatch", "padded"), ("dropout", 0.2)])
def test_a_resume_may_change_how_the_same_weights_are_computed(field, value):
    """A run trained on a CPU with torch's kernels resumes on a GPU with Triton's, flash attention or dropout: the
    implementation fields leave the weights as they are (the checkpoint's state loads strictly)."""
    saved = changed(tiny(), model=dict(norm="rmsnorm", activation="swiglu", moe_experts=3, moe_top_k=1))
    current = changed(saved, model={field: value})
    assert field in IMPLEMENTATION_FIELDS and getattr(current.model, field) != getattr(saved.model, field)
    check_resumable(saved, current, "ckpt.pt")
    GPT(current.model).load_state_dict(GPT(saved.model).state_dict())


def test_a_resume_may_change_the_schedule_the_budget_and_a_windows_batch_but_not_a_streams_batch():
    saved = tiny()
    check_resumable(saved, changed(saved, train=dict(lr=1e-4, max_steps=999, batch_size=3, weight_decay=0.5)), "c")
    check_resumable(saved, changed(saved, data=dict(order="windows")), "c")  # auto without memory reads windows too
    streams = changed(saved, data=dict(order="streams"))
    check_resumable(streams, changed(streams, train=dict(lr=1e-4)), "c")
    with pytest.raises(ConfigError, match=r"reads contiguous streams .* train.batch_size \(4 rows\)"):
        check_resumable(streams, changed(streams, train=dict(batch_size=5)), "c")


def test_another_dataset_on_resume_is_a_warning_naming_both():
    current = {"name": "enwik8", "sha256": "b" * 64}
    assert dataset_change(None, current) is None  # a checkpoint from before datasets were recorded
    assert dataset_change({"name": "enwik8", "sha256": "b" * 64}, current) is None
    assert dataset_change({"name": "old"}, current) is None  # no sha256 to compare
    warning = dataset_change({"name": "sample", "sha256": "a" * 64}, current)
    assert warning.startswith("warning: resuming on enwik8 (sha256 bbbbbbbbbbbb...)")
    assert "checkpoint's dataset sample (sha256 aaaaaaaaaaaa...)" in warning


def test_one_writer_per_run_folder(tmp_path):
    run = tmp_path / "study" / "run"  # created with its parents
    first = RunLock(run)
    assert (run / ".lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(ConfigError, match=rf"run is in use by another run \(process {os.getpid()}\)"):
        RunLock(run)
    first.release()
    first.release()  # twice is harmless
    RunLock(run).release()
