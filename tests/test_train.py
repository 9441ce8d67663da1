"""The trainer through its command line: outputs, resume, bad input, sampling."""
import json

import pytest
import torch

from conftest import read_metrics, run_cli


@pytest.fixture(scope="module")
def tiny_run(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    r = run_cli("--preset=tiny", f"--data.source={small_corpus}", f"--out_dir={out}", "--train.max_steps=20",
                "--train.log_interval=5", "--train.eval_interval=10")
    assert r.returncode == 0, r.stderr
    return out, r


def test_run_writes_config_metrics_and_checkpoint(tiny_run, small_corpus):
    out, r = tiny_run
    config = json.loads((out / "config.json").read_text())
    assert set(config) == {"model", "train", "data", "out_dir"} and config["train"]["max_steps"] == 20
    lines = read_metrics(out)
    start = lines[0]
    assert start["event"] == "start" and set(start) >= {"n_params", "dataset", "git_sha", "config"}
    assert start["config"] == config and start["dataset"]["path"] == str(small_corpus)
    assert start["dataset"]["bytes"] == 200_000 and len(start["dataset"]["sha256"]) == 64
    steps = [l for l in lines if "event" not in l]
    assert [l["step"] for l in steps] == [5, 10, 15, 20]
    assert all({"step", "train_loss", "lr", "tokens_per_s"} <= set(l) for l in steps)
    assert [l["step"] for l in steps if "val_bpc" in l] == [10, 20]
    assert lines[-1]["event"] == "end" and lines[-1]["full_val_bpc"] > 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 20 and ckpt["config"] == config and ckpt["dataset"] == start["dataset"]
    assert ckpt["git_sha"] == start["git_sha"] and set(ckpt["rng"]) >= {"torch", "data"}
    assert "python -m train.evaluate --ckpt" in r.stdout and "python -m train.sample --ckpt" in r.stdout


def test_resume_continues_from_the_checkpoint(tiny_run, tmp_path):
    out, _ = tiny_run
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("ckpt.pt", "metrics.jsonl", "config.json"):
        (copy / name).write_bytes((out / name).read_bytes())
    r = run_cli("--resume", f"--out_dir={copy}", "--train.max_steps=30")
    assert r.returncode == 0, r.stderr
    lines = read_metrics(copy)
    resume = [l for l in lines if l.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == 20 and resume[0]["config"]["train"]["max_steps"] == 30
    assert [l["step"] for l in lines if "event" not in l][-2:] == [25, 30]
    assert torch.load(copy / "ckpt.pt", weights_only=True)["step"] == 30


def test_sample_cli_generates_bytes(tiny_run):
    out, _ = tiny_run
    r = run_cli("--ckpt", str(out / "ckpt.pt"), "--prompt", "The ", "--tokens", "40", "--seed", "1",
                module="train.sample")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The ") and "bytes/s" in r.stderr
    again = run_cli("--ckpt", str(out / "ckpt.pt"), "--prompt", "The ", "--tokens", "40", "--seed", "1",
                    module="train.sample")
    assert again.stdout == r.stdout  # seeded


@pytest.mark.parametrize("args, message", [
    (["--model.n_layerz=3"], "unknown config key 'model.n_layerz' (did you mean 'model.n_layer'?)"),
    (["--train.lr=abc"], "train.lr='abc': expected a number"),
    (["--model.n_head=3"], "model.n_head=3 does not divide model.d_model=32"),
    (["--data.source=/nonexistent/corpus.txt"], "data file not found: /nonexistent/corpus.txt"),
    (["--preset=gigantic"], "unknown preset 'gigantic'"),
])
def test_bad_input_is_a_one_line_error_and_writes_nothing(args, message, tmp_path):
    out = tmp_path / "run"
    r = run_cli("--preset=tiny", f"--out_dir={out}", *args)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {message}" or (r.stderr.count("\n") == 1 and message in r.stderr), r.stderr
    assert not out.exists()


def test_checkpoint_of_another_architecture_is_refused(tiny_run, tmp_path):
    out, _ = tiny_run
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "ckpt.pt").write_bytes((out / "ckpt.pt").read_bytes())
    r = run_cli("--resume", f"--out_dir={copy}", "--model.n_layer=3")
    assert r.returncode == 2 and "is of another architecture (model.n_layer: checkpoint 2 vs 3)" in r.stderr
    assert r.stderr.count("\n") == 1
    # a state dict that does not fit the config it claims is caught as well
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["config"]["model"]["d_ff"] = 48
    torch.save(ckpt, copy / "ckpt.pt")
    r = run_cli("--ckpt", str(copy / "ckpt.pt"), module="train.evaluate")
    assert r.returncode == 2 and "does not fit this model" in r.stderr


def test_out_dir_of_another_run_is_refused_unless_resume_or_overwrite(tiny_run):
    out, _ = tiny_run
    before = (out / "metrics.jsonl").read_bytes()
    r = run_cli("--preset=tiny", f"--out_dir={out}")
    assert r.returncode == 2 and "holds another run" in r.stderr
    assert (out / "metrics.jsonl").read_bytes() == before


def test_resume_without_checkpoint_is_an_error(tmp_path):
    r = run_cli("--resume", f"--out_dir={tmp_path}")
    assert r.returncode == 2 and r.stderr.strip() == f"error: no checkpoint at {tmp_path / 'ckpt.pt'}"


def test_help_lists_the_knobs():
    r = run_cli("--help")
    assert r.returncode == 0 and "--model.n_layer" in r.stdout and "--train.max_time" in r.stdout
