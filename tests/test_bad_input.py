"""The bad-input catalogue (README, 'Bad input'): each is a one-line `error: ...` with exit code 2 that touches no
existing output."""
import pytest
import torch

from conftest import copy_run, run_cli, snapshot


def one_line_error(r, message):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr[-2000:]
    assert message in r.stderr, r.stderr


@pytest.fixture
def files(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "short.txt").write_bytes(b"too short for a window of 32 bytes in each split" * 5)
    return tmp_path


NEW_RUN_CASES = [
    (["--data.source={tmp}/missing.txt"], "data file not found: {tmp}/missing.txt"),
    (["--data.source={tmp}/empty.txt"], "data file {tmp}/empty.txt is empty"),
    (["--data.source={tmp}/short.txt"], "is too short (240 bytes): each split needs at least 33 bytes"),
    (["--model.n_layerz=3"], "unknown config key 'model.n_layerz' (did you mean 'model.n_layer'?)"),
    (["--train.lr=abc"], "train.lr='abc': expected a number"),
    (["--train.max_steps=1.5"], "train.max_steps='1.5': expected an integer"),
    (["--model.n_head=3"], "model.n_head=3 does not divide model.d_model=32"),
    (["--train.lr=0"], "train.lr must be > 0 (got 0.0)"),
    (["--train.lr=-0.1"], "train.lr must be > 0 (got -0.1)"),
    (["--train.batch_size=0"], "train.batch_size must be > 0 (got 0)"),
    (["--train.batch_size=-4"], "train.batch_size must be > 0 (got -4)"),
    (["--train.max_steps=-1"], "train.max_steps must be >= 0 (got -1)"),
    (["--train.max_steps=0"], "set train.max_steps, train.max_time or train.max_tokens"),
    (["--preset=gigantic"], "unknown preset 'gigantic'; choose one of tiny, cpu, t12, t12-modern, t12-xl"),
]


@pytest.mark.parametrize("args, message", NEW_RUN_CASES, ids=[c[1][:40] for c in NEW_RUN_CASES])
def test_bad_input_for_a_new_run(args, message, files, small_corpus):
    out = files / "run"
    args = [a.format(tmp=files) for a in args]
    source = [] if any(a.startswith("--data.source") for a in args) else [f"--data.source={small_corpus}"]
    r = run_cli("--preset=tiny", f"--out_dir={out}", *source, *args)
    one_line_error(r, message.format(tmp=files))
    assert not out.exists()


def test_resume_without_a_checkpoint(tmp_path):
    r = run_cli("--resume", f"--out_dir={tmp_path}")
    one_line_error(r, f"no checkpoint at {tmp_path / 'ckpt.pt'}")
    assert snapshot(tmp_path) == {}


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "not_a_checkpoint"])
def test_damaged_checkpoint(damage, tiny_run, tmp_path):
    run = copy_run(tiny_run[0], tmp_path / "run")
    ckpt = run / "ckpt.pt"
    data = ckpt.read_bytes()
    if damage == "truncated":
        ckpt.write_bytes(data[: len(data) // 2])
    elif damage == "corrupt":
        ckpt.write_bytes(bytes(b ^ 0x5A for b in data[:4096]) + data[4096:])
    else:
        torch.save({"weights": torch.zeros(3)}, ckpt)
    before = snapshot(run)
    message = "is not a charlm checkpoint" if damage == "not_a_checkpoint" else "is truncated or corrupt"
    one_line_error(run_cli("--resume", f"--out_dir={run}"), message)
    one_line_error(run_cli("--ckpt", str(ckpt), module="train.evaluate"), message)
    one_line_error(run_cli("--ckpt", str(ckpt), module="train.sample"), message)
    assert snapshot(run) == before


def test_checkpoint_of_another_architecture(tiny_run, tmp_path):
    run = copy_run(tiny_run[0], tmp_path / "run")
    before = snapshot(run)
    one_line_error(run_cli("--resume", f"--out_dir={run}", "--model.n_layer=3"),
                   "is of another architecture (model.n_layer: checkpoint 2 vs 3)")
    one_line_error(run_cli("--resume", f"--out_dir={run}", "--train.optimizer=sgd"),
                   "holds adamw state; it cannot resume with train.optimizer=sgd")
    one_line_error(run_cli("--resume", f"--out_dir={run}", "--train.seed=7"),
                   "train.seed cannot change on --resume (checkpoint 1337)")
    one_line_error(run_cli("--resume", f"--out_dir={run}", "--data.order=streams"),
                   "a run that reads random windows resumes reading them: data.order (auto)")
    # a state dict that does not fit the config it claims
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    ckpt["config"]["model"]["d_ff"] = 48
    torch.save(ckpt, tmp_path / "lying.pt")
    one_line_error(run_cli("--ckpt", str(tmp_path / "lying.pt"), module="train.evaluate"), "does not fit this model")
    assert snapshot(run) == before


def test_out_dir_of_another_run(tiny_run, small_corpus, tmp_path):
    run = copy_run(tiny_run[0], tmp_path / "run")
    before = snapshot(run)
    one_line_error(run_cli("--preset=tiny", f"--out_dir={run}", f"--data.source={small_corpus}"),
                   "holds another run; pass --resume to continue it or --overwrite to replace it")
    assert snapshot(run) == before
    (run / "curves.png").write_bytes(b"the old run's")  # tiny draws none: a stale picture must not stay
    r = run_cli("--preset=tiny", f"--out_dir={run}", f"--data.source={small_corpus}", "--overwrite",
                "--train.max_steps=3")
    assert r.returncode == 0, r.stderr
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 3 and not (run / "curves.png").exists()


def test_a_stream_run_resumes_with_its_rows(small_corpus, tmp_path):
    """Each batch row of a memory run owns a stream position and a memory: another batch size on --resume is a
    one-line error (it was a traceback from the memory's load), the same one resumes."""
    run = tmp_path / "run"
    common = ["--preset=tiny", f"--data.source={small_corpus}", f"--out_dir={run}", "--model.pos_emb=rope",
              "--model.mem_len=16", "--train.final_eval=false"]
    assert run_cli(*common, "--train.max_steps=4").returncode == 0
    before = snapshot(run)
    one_line_error(run_cli(*common, "--resume", "--train.batch_size=6", "--train.max_steps=6"),
                   "data.order (auto) and, with streams, train.batch_size (4 rows) cannot change on --resume")
    assert snapshot(run) == before
    r = run_cli(*common, "--resume", "--train.max_steps=6")
    assert r.returncode == 0, r.stderr
