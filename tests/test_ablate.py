"""python -m train.ablate: the plan, the significance rule, the study file, GPU scheduling, and a whole study of the
tiny preset: two factors x two seeds, one failing value, killed mid-run and resumed, tables matching the folders."""
import json
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, read_metrics, run_cli
from train import ablate
from train.ablate_report import factor_tables, verdict
from train.config import ConfigError
from train.studies import Level, Study, from_table, notes, parse_vary, plan


def test_significance_rule():
    assert verdict(-0.05, 0.01) == "better" and verdict(0.05, 0.01) == "worse"
    assert verdict(0.019, 0.01) == "noise" and verdict(-0.0201, 0.01) == "better"
    assert verdict(0.3, None) == "n/a (base: 1 seed)" and verdict(None, 0.01) == "-"


def test_tables_from_synthetic_rows():
    """Mean ± sd over seeds, delta to the base's mean, and the verdict against 2 sd of the base's seeds."""
    def done(bpc):
        return {"status": "done", "full_val_bpc": bpc, "full_test_bpc": bpc + 0.1, "params": 1000, "steps": 10,
                "tokens_per_s": 50.0}
    rows = {"b0": done(2.00), "b1": done(2.02), "x0": done(1.90), "x1": done(1.92), "y0": done(2.02),
            "y1": done(2.03), "z0": {"status": "failed", "error": "boom"}, "z1": done(2.5)}
    plan_ = {"tables": {"k": [{"value": "a", "base": True, "runs": ["b0", "b1"]},
                              {"value": "x", "base": False, "runs": ["x0", "x1"]},
                              {"value": "y", "base": False, "runs": ["y0", "y1"]},
                              {"value": "z", "base": False, "runs": ["z0", "z1"]}]}}
    base, x, y, z = factor_tables(plan_, rows)["k"]
    assert base["val"] == pytest.approx(2.01) and base["val_sd"] == pytest.approx(0.0141421, rel=1e-4)
    assert x["delta"] == pytest.approx(-0.10) and x["verdict"] == "better"
    assert y["delta"] == pytest.approx(0.015) and y["verdict"] == "noise"  # inside 2 x 0.0141
    assert z["n"] == 1 and z["of"] == 2 and z["val_sd"] is None and z["verdict"] == "worse"
    assert [r["error"] for r in z["failed"]] == ["boom"]


def test_one_factor_at_a_time_with_the_base_run_once_and_a_grid():
    study = Study(preset="tiny", factors=[parse_vary("model.norm=layernorm,rmsnorm"),
                                          parse_vary("train.lr=3e-3,1e-2,0.003")],
                  seeds=2, budget="steps=20", grid=("model.norm", "train.lr"))
    runs, tables = plan(study)
    assert [r.name for r in runs if r.seed == 0] == ["base-s0", "norm=rmsnorm-s0", "lr=1e-2-s0",
                                                       "norm=rmsnorm,lr=1e-2-s0"]  # 3e-3 and 0.003 are the base's
    assert [r.seed for r in runs] == [0] * 4 + [1] * 4  # seed-major: a partial study has every value once
    assert runs[4].overrides["train.seed"] == "1338" and runs[0].overrides["train.max_time"] == "0"
    assert runs[0].overrides["train.max_steps"] == "20"
    assert tables["model.norm"] == [{"value": "layernorm", "base": True, "runs": ["base-s0", "base-s1"]},
                                    {"value": "rmsnorm", "base": False,
                                     "runs": ["norm=rmsnorm-s0", "norm=rmsnorm-s1"]}]
    assert tables["train.lr"][0]["value"] == "0.003"


def test_study_tables_companion_values_and_bad_studies():
    study = from_table({"seeds": 2, "budget": "tokens=5000", "base": {"preset": "tiny", "train": {"lr": 0.002}},
                        "factors": {"train.optimizer": ["adamw", {"value": "ivon", "train.lr": 0.3}],
                                    "model": {"bias": [False]}}}, "mine")
    assert study.base == {"train.lr": "0.002"} and study.name == "mine"
    assert study.factors[0].levels[1] == Level("ivon+train.lr=0.3", {"train.optimizer": "ivon", "train.lr": "0.3"})
    runs, _ = plan(study)
    assert [r.name for r in runs if r.seed == 0] == ["base-s0", "optimizer=ivon,lr=0.3-s0", "bias=false-s0"]
    with pytest.raises(ConfigError, match="unknown config key 'model.nrom'"):
        plan(Study(preset="tiny", factors=[parse_vary("model.nrom=rmsnorm")]))
    with pytest.raises(ConfigError, match="expected steps=N, seconds=S or tokens=T"):
        plan(Study(preset="tiny", factors=[parse_vary("model.norm=rmsnorm")], budget="minutes=3"))
    with pytest.raises(ConfigError, match="grid"):
        plan(Study(preset="tiny", factors=[parse_vary("model.norm=rmsnorm")], grid=("model.norm", "train.lr")))
    with pytest.raises(ConfigError, match="unknown entries"):
        from_table({"factor": {}}, "typo")
    assert from_table({"factors": {"model.norm": "rmsnorm"}}, "plain").seeds == 1  # one seed unless told
    for bad in ("model.norm", "model.norm=", "model.norm= "):
        with pytest.raises(ConfigError, match="expected KEY=VALUE1,VALUE2"):
            parse_vary(bad)


def test_the_notes_study_plans_every_knob_of_the_notes():
    study = from_table(notes("tokens=1000000"), "notes")
    keys = {f.key for f in study.factors}
    assert {"model.block_size", "model.n_head", "model.d_model", "model.dropout", "model.n_layer", "model.norm",
            "model.bias", "model.activation", "model.residual_scale", "model.pos_emb", "model.init", "train.lr",
            "train.optimizer", "train.grad_accum", "train.batch_size", "model.n_targets",
            "model.intermediate_loss", "train.max_tokens"} <= keys
    runs, tables = plan(study)
    assert len(runs) == 2 * (1 + sum(len(rows) - 1 for rows in tables.values()))
    budget = next(f for f in study.factors if f.key == "train.max_tokens")
    assert [lv.label for lv in budget.levels] == ["500000", "2000000"]
    for factor in study.factors:  # no value of the list is the cpu preset's own (it would fold into the base run)
        assert len(tables[factor.key]) == 1 + len(factor.levels), factor.key


def test_runs_go_one_per_gpu_at_a_time(tmp_path, monkeypatch):
    runs, _ = plan(Study(preset="tiny", factors=[parse_vary("train.lr=1e-3,2e-3,3e-3,4e-3,5e-3")]))
    runner = ablate.StudyRunner(tmp_path, Study(), runs, ["0", "1"], retry_failed=False)
    seen, running, peak, guard = [], set(), [0], threading.Lock()

    def fake_execute(run, gpu):
        with guard:
            assert gpu not in running  # never two runs on one GPU
            running.add(gpu)
            peak[0] = max(peak[0], len(running))
        time.sleep(0.05)
        with guard:
            running.discard(gpu)
            seen.append((run.name, gpu))
        return "done"

    monkeypatch.setattr(runner, "execute", fake_execute)
    monkeypatch.setattr(ablate, "build_report", lambda out: [])
    assert runner.run() == 0
    assert sorted(n for n, _ in seen) == sorted(r.name for r in runs) and {g for _, g in seen} == {"0", "1"}
    assert peak[0] == 2


def test_cli_errors_are_one_line(tmp_path):
    for args, message in [(["--vary", "model.norm=rmsnorm"], "--out_dir=DIR is required"),
                          ([f"--out_dir={tmp_path}", "--vary", "model.norm"], "expected KEY=VALUE1,VALUE2"),
                          ([f"--out_dir={tmp_path}", "--base.preset=huge", "--vary", "model.norm=rmsnorm"],
                           "unknown preset 'huge'"),
                          ([f"--out_dir={tmp_path}", "--frobnicate"], "unexpected argument '--frobnicate'"),
                          (["--report", str(tmp_path)], "holds no study")]:
        r = run_cli(*args, module="train.ablate")
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and message in r.stderr, (args, r.stderr)


def test_a_study_runs_records_a_failure_survives_a_kill_and_its_tables_match_its_folders(small_corpus, tmp_path):
    out = tmp_path / "study"
    args = ["-m", "train.ablate", f"--out_dir={out}", "--base.preset=tiny", f"--base.data.source={small_corpus}",
            "--base.train.ckpt_interval=10", "--base.train.eval_interval=50", "--base.train.log_interval=10",
            "--vary", "model.norm=layernorm,rmsnorm", "--vary", "model.n_head=2,3", "--seeds", "2",
            "--budget", "steps=300"]  # n_head=3 does not divide d_model=32: those two runs fail
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cut = out / "norm=rmsnorm-s0"
    deadline = time.time() + 240
    while not (cut / "ckpt.pt").exists():  # the second run has written its first checkpoint
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    proc.kill()  # SIGKILL: the study gets no chance to stop its run; the run stops itself (parent-death signal)
    proc.wait()
    deadline = time.time() + 120
    while not any(r.get("event") == "interrupted" for r in read_metrics(cut)):
        assert time.time() < deadline, "the orphaned run did not stop"
        time.sleep(0.1)
    assert not any(r.get("event") == "end" for r in read_metrics(cut))

    again = run_cli(*args[2:], module="train.ablate", timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "run n_head=3-s0 failed (recorded; the study goes on)" in again.stderr
    assert "4 done, 2 failed of 6 runs" in again.stdout
    events = [r["event"] for r in read_metrics(cut) if "event" in r]
    assert events == ["start", "interrupted", "resume", "end"]

    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["factor"], r["value"], r["seed"], r["status"]) for r in rows] == [
        ("base", "base", 0, "done"), ("model.norm", "rmsnorm", 0, "done"), ("model.n_head", "3", 0, "failed"),
        ("base", "base", 1, "done"), ("model.norm", "rmsnorm", 1, "done"), ("model.n_head", "3", 1, "failed")]
    for row in rows:
        folder = out / row["run"]
        if row["status"] == "failed":
            assert "model.n_head=3 does not divide model.d_model=32" in row["error"]
            continue
        end = read_metrics(folder)[-1]
        assert (row["full_val_bpc"], row["full_test_bpc"], row["steps"]) == (
            end["full_val_bpc"], end["full_test_bpc"], 300)
        assert row["tokens"] == 300 * 4 * 32 and row["params"] == end["n_params"]
        assert json.loads((folder / "config.json").read_text())["train"]["seed"] == 1337 + row["seed"]
    base = [r["full_val_bpc"] for r in rows if r["factor"] == "base"]
    rms = [r["full_val_bpc"] for r in rows if r["value"] == "rmsnorm"]
    md = (out / "results.md").read_text()
    assert f"| rmsnorm | 2/2 | {sum(rms) / 2:.4f} ± " in md and f"{sum(rms) / 2 - sum(base) / 2:+.4f}" in md
    assert "| 3 | 0/2 | - |" in md and "## Failed runs" in md
    assert (out / "deltas.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0

    # the interrupted and resumed run equals the same run made in one go
    direct = run_cli("--preset=tiny", *(f"--{k}={v}" for k, v in json.loads((out / "study.json").read_text())
                                         ["runs"][1]["overrides"].items()), f"--out_dir={tmp_path / 'direct'}")
    assert direct.returncode == 0, direct.stderr
    assert read_metrics(tmp_path / "direct")[-1]["full_val_bpc"] == rows[1]["full_val_bpc"]

    # a finished study reruns nothing; the report is rebuilt from the run folders alone
    before = (out / "base-s0" / "metrics.jsonl").stat().st_mtime_ns
    results = (out / "results.jsonl").read_text()
    (out / "results.jsonl").unlink()
    (out / "results.md").unlink()
    report = run_cli("--report", str(out), module="train.ablate")
    assert report.returncode == 0 and (out / "results.jsonl").read_text() == results and (out / "results.md").exists()
    third = run_cli(*args[2:], module="train.ablate")
    assert third.returncode == 0 and "4 done, 2 failed of 6 runs" in third.stdout
    assert (out / "base-s0" / "metrics.jsonl").stat().st_mtime_ns == before
    changed = run_cli(*args[2:], "--base.train.lr=0.01", module="train.ablate")
    assert changed.returncode == 2 and "was run with other settings (train.lr differs)" in changed.stderr


def test_a_run_killed_in_the_middle_of_a_line_is_unfinished_not_an_error(tmp_path):
    """What decides whether a study reruns a run: an end event in its metrics.jsonl, read past a torn last line."""
    finished = ablate.finished
    assert not finished(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"event": "start"}\n{"step": 5, "train_loss": 3.1}\n{"step": 10, "tr')
    assert not finished(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"event": "start"}\n{"step": 5, "train_loss": 3.1}\n{"event": "end"}\n')
    assert finished(tmp_path)


def test_a_runs_row_and_curve_from_its_folder_in_every_state(tmp_path):
    """What the report reads from a run folder: pending (nothing yet), failed (failed.json), unfinished (steps, no
    end; a torn last line), done (the end event's numbers; tokens = steps x batch x grad_accum x block); the curve
    in tokens, the running validation apart from the whole-split one."""
    from train.ablate_report import curve, run_row
    config = {"train": {"batch_size": 4, "grad_accum": 3}, "model": {"block_size": 16}}  # 192 tokens per step
    start = {"event": "start", "step": 0, "config": config, "git_sha": "abc", "dataset": {"name": "sample"}}
    steps = [{"step": 10, "train_loss": 3.0, "val_bpc": 4.0}, {"step": 20, "train_loss": 2.5}]
    end = {"event": "end", "step": 20, "n_params": 999, "tokens_per_s": 50.0, "train_time_s": 7.0,
           "full_val_bpc": 3.5, "full_val_protocol": "strided", "full_test_bpc": 3.6, "full_test_protocol": "strided"}

    def row(name, lines=None, failed=None):
        (tmp_path / name).mkdir()
        if lines is not None:
            text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in lines)  # a str: a torn line
            (tmp_path / name / "metrics.jsonl").write_text(text)
        if failed is not None:
            (tmp_path / name / "failed.json").write_text(json.dumps(failed))
        return run_row(tmp_path, {"name": name, "factor": "f", "value": "v", "seed": 1,
                                  "overrides": {"train.seed": "1338"}})
    pending = row("pending")
    assert pending == {"run": "pending", "factor": "f", "value": "v", "seed": 1, "train_seed": 1338,
                       "status": "pending"}
    failed = row("failed", [start], {"error": "boom", "exit_code": 3})
    assert (failed["status"], failed["error"], failed["exit_code"]) == ("failed", "boom", 3)
    assert row("started", [start])["steps"] == 0
    unfinished = row("unfinished", [start, *steps, '{"step": 30, "tr'])
    assert (unfinished["status"], unfinished["steps"]) == ("unfinished", 20)
    done = row("done", [start, *steps, end])
    assert done | {"run": None} == pending | {"run": None, "status": "done", "params": 999, "steps": 20,
                                              "tokens": 20 * 192, "tokens_per_s": 50.0, "train_time_s": 7.0,
                                              "git_sha": "abc", "dataset": "sample", "full_val_bpc": 3.5,
                                              "full_val_protocol": "strided", "full_test_bpc": 3.6,
                                              "full_test_protocol": "strided"}
    assert curve(tmp_path, "done") == ([(10 * 192, 4.0)], [(20 * 192, 3.5)])
    assert curve(tmp_path, "pending") == ([], [])
