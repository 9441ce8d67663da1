"""The benchmark gate's logic on synthetic results: ratios against the reference, medians and spread over runs,
the comparison with a baseline, and `python -m bench --check` / `--update-baseline` exit codes."""
import json

import pytest
import torch

import bench.__main__ as runner
import bench.compare as compare_mod
from bench.compare import compare, device_class, extra_fields, failed, median_ratios, ratios


def result(name, seconds, reference="x/ref"):
    return {"name": name, "reference": reference, "seconds": seconds, "dtype": "fp32", "shape": "4x5"}


def test_ratio_is_reference_time_over_time_within_one_run():
    r = ratios([result("x/ref", 2.0), result("x/fast", 1.0), result("x/slow", 4.0), result("y/orphan", 1.0, "y/none")])
    assert r == {"x/fast": 2.0, "x/slow": 0.5}  # no ratio for the reference itself or without one in the run


def test_extra_fields_in_table_order_with_timing():
    r = {**result("x/fast", 1.0), "params": 10, "tokens_per_s": 1234.5, "timing": "graph"}
    assert extra_fields(r) == "tokens_per_s=1.23e+03, params=10, graph"
    assert extra_fields(r, sep=" ", timing_prefix="timed as ") == "tokens_per_s 1.23e+03, params 10, timed as graph"
    assert extra_fields({**result("x/plain", 1.0), "timing": "wall"}) == ""  # wall-clock timing is not named


def test_median_and_spread_over_runs():
    med, spread = median_ratios([{"a": 1.0, "b": 2.0}, {"a": 1.2, "b": 2.0}, {"a": 0.9, "b": 2.2}])
    assert med == {"a": 1.0, "b": 2.0}
    assert spread["a"] == pytest.approx(1.2 / 0.9 - 1) and spread["b"] == pytest.approx(0.1)


def test_compare_flags_drops_beyond_tolerance_and_missing_cases():
    baseline = {"same": 1.0, "slower": 2.0, "faster": 1.0, "edge": 1.0, "gone": 3.0}
    current = {"same": 1.05, "slower": 1.7, "faster": 1.5, "edge": 0.9, "added": 1.0}
    verdicts = {v.name: v for v in compare(current, baseline, tolerance=0.10)}
    assert {n: v.status for n, v in verdicts.items()} == {
        "same": "ok", "slower": "regressed", "faster": "improved", "edge": "ok", "gone": "missing", "added": "new"}
    assert verdicts["slower"].change == pytest.approx(-0.15)
    assert sorted(v.name for v in failed(list(verdicts.values()))) == ["gone", "slower"]


def test_device_class_names_the_baseline_file():
    assert device_class("cpu") == "cpu"
    assert device_class("cpu AMD EPYC") == "cpu-amd-epyc"
    assert device_class("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_a_cpu_model_without_a_baseline_of_its_own_uses_the_generic_one(monkeypatch, tmp_path):
    monkeypatch.setattr(compare_mod, "BASELINES", tmp_path)
    (tmp_path / "cpu.json").write_text(json.dumps({"device": "cpu", "tolerance": 0.25, "ratios": {"a": 1.0}}))
    assert compare_mod.load_baseline("cpu Some Other CPU")["file"] == "cpu.json"
    (tmp_path / "cpu-amd-epyc.json").write_text(json.dumps({"device": "cpu AMD EPYC", "ratios": {"a": 2.0}}))
    assert compare_mod.load_baseline("cpu AMD EPYC")["ratios"] == {"a": 2.0}
    assert compare_mod.load_baseline("NVIDIA H200") is None  # a GPU never falls back to a CPU's numbers


@pytest.fixture
def synthetic(monkeypatch, tmp_path):
    """The runner with one fake suite whose candidate takes `speed["seconds"]`, baselines in tmp_path."""
    speed = {"seconds": 1.0}
    monkeypatch.setattr(compare_mod, "BASELINES", tmp_path)
    monkeypatch.setattr(runner, "SUITES", {"fake": lambda: [("ref", lambda: result("fake/ref", 2.0, "fake/ref")),
                                                           ("new", lambda: result("fake/new", speed["seconds"],
                                                                                  "fake/ref"))]})
    monkeypatch.setattr(runner, "device_name", lambda: "cpu")
    return speed, tmp_path


def test_check_passes_then_fails_on_a_regression(synthetic, capsys):
    speed, folder = synthetic
    assert runner.main(["--check"]) == 2  # no baseline yet
    assert runner.main(["--update-baseline", "--tolerance", "0.2"]) == 0
    stored = json.loads((folder / "cpu.json").read_text())
    assert stored["ratios"] == {"fake/new": 2.0} and stored["tolerance"] == 0.2
    assert runner.main(["--check"]) == 0
    speed["seconds"] = 1.2  # ratio 1.67: -17%, inside 20%
    assert runner.main(["--check"]) == 0
    speed["seconds"] = 1.3  # ratio 1.54: -23%
    assert runner.main(["--check"]) == 1
    assert "fake/new (regressed)" in capsys.readouterr().err
    assert runner.main(["--check", "--tolerance", "0.3"]) == 0


def test_a_case_named_outside_its_suite_fails_and_keeps_its_number(synthetic, monkeypatch, capsys):
    """--check finds a suite's baseline cases by the suite's name: the architectures suite once named its cases
    architecture/..., so its stored baseline was never compared. Such a result is kept in the table but fails the
    run, and no baseline is written from it."""
    speed, folder = synthetic
    monkeypatch.setattr(runner, "SUITES", {"fake": lambda: [("ref", lambda: result("fake/ref", 2.0, "fake/ref")),
                                                           ("new", lambda: result("fakes/new", 1.0, "fake/ref"))]})
    assert runner.main(["--update-baseline"]) == 1
    assert not (folder / "cpu.json").exists()
    (folder / "cpu.json").write_text(json.dumps({"device": "cpu", "tolerance": 0.2, "ratios": {"fakes/new": 2.0}}))
    assert runner.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "fakes/new" in out and "FAILED fake/new: its result is named fakes/new, not fake/new" in out


def raises(error):
    def measure():
        raise error
    return measure


def test_a_failing_case_and_an_interrupt_keep_what_was_measured(monkeypatch, tmp_path, capsys):
    """One case raises (reported, the others run), then SIGINT arrives (the device suite's time limit): the table
    and the JSON hold the measured cases, name the failure and the cases not run, and the exit code says so."""
    import bench.summary as summary
    monkeypatch.setattr(runner, "device_name", lambda: "cpu")
    monkeypatch.setattr(runner, "SUITES", {
        "a": lambda: [("ref", lambda: result("a/ref", 2.0, "a/ref")), ("boom", raises(ValueError("bad shape"))),
                      ("new", lambda: result("a/new", 1.0, "a/ref"))],
        "b": lambda: [("orphan", lambda: result("b/orphan", 1.0, "b/ref")), ("cut", raises(KeyboardInterrupt())),
                      ("never", lambda: result("b/never", 1.0, "b/ref"))],
        "c": lambda: [("later", lambda: result("c/later", 1.0, "c/later"))]})
    path = tmp_path / "bench.json"
    assert runner.main(["--json", str(path)]) == 130
    out = capsys.readouterr()
    assert "a/new" in out.out and "no ref" in out.out and "FAILED a/boom: ValueError: bad shape" in out.out
    assert "ValueError: bad shape" in out.err  # the traceback
    data = json.loads(path.read_text())
    assert [r["name"] for r in data["results"]] == ["a/ref", "a/new", "b/orphan"]
    assert data["ratios"] == {"a/new": 2.0} and not data["complete"]
    assert data["errors"] == [{"case": "a/boom", "error": "ValueError: bad shape"}]
    assert data["skipped"] == ["b/cut", "b/never", "c/later"]
    text = "\n".join(summary.bench_section(tmp_path, 130))
    assert "| a/new | fp32 | 4x5 |" in text and "| 2.000 |" in text and "its reference did not run" in text
    assert "**FAILED** a/boom" in text and "b/cut, b/never, c/later" in text and "**incomplete**" in text
    assert runner.main(["--only", "c"]) == 0


def test_the_summary_says_whether_the_kernels_speed_up_each_compiled_step():
    from bench.summary import kernel_verdicts
    rows = [result("train_step/t12/charlm-compiled", 0.020), result("train_step/t12/charlm-compiled-triton", 0.025),
            result("train_step/t12-modern/charlm-compiled", 0.020),
            result("train_step/t12-modern/charlm-compiled-triton", 0.016)]
    text = "\n".join(kernel_verdicts(rows))
    assert "- t12: slower with the Triton kernels (25 ms against 20 ms a step, 0.80x)" in text
    assert "- t12-modern: faster with the Triton kernels (16 ms against 20 ms a step, 1.25x)" in text
    assert kernel_verdicts(rows[:1]) == []  # nothing to compare


def test_the_budget_stops_new_cases_and_the_json_follows_every_case(monkeypatch, tmp_path):
    """With a budget no case starts after it (a fake clock: each case takes 10 s); the JSON file is rewritten
    after every case, so a SIGKILL leaves what was measured before it."""
    clock = {"now": 0.0}
    seen = []

    def timed(name):
        def measure():
            clock["now"] += 10
            return result(name, 1.0, "s/a")
        return measure
    monkeypatch.setattr(runner, "SUITES", {"s": lambda: [(n, timed(f"s/{n}")) for n in "abcde"]})
    outcome = runner.run_suites(["s"], 0.0, budget=25, progress=lambda o: seen.append(len(o["results"])),
                                clock=lambda: clock["now"])
    assert [r["name"] for r in outcome["results"]] == ["s/a", "s/b", "s/c"]  # c starts at 20 s < 25 s
    assert outcome["skipped"] == ["s/d", "s/e"] and not outcome["interrupted"] and seen == [1, 2, 3]
    monkeypatch.setattr(runner, "device_name", lambda: "cpu")
    path = tmp_path / "b.json"
    assert runner.main(["--json", str(path), "--budget", "0"]) == 0
    assert json.loads(path.read_text())["skipped"] == [f"s/{n}" for n in "abcde"]
    assert runner.main(["--budget", "0", "--update-baseline"]) == 1  # a baseline needs every case


def test_on_a_gpu_each_group_of_cases_starts_with_its_reference(monkeypatch):
    """The GPU's case lists (only listed here, not run): a budget or an interrupt can cut a suite short, so within
    each group the reference runs first, and t12's reference and real step lead the training steps."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("mhce", "layernorm", "rmsnorm", "swiglu"):
        labels = [label for label, _ in runner.SUITES[name]()]
        groups: dict[str, list[str]] = {}
        for label in labels:
            group, impl = label.rsplit("/", 1)
            groups.setdefault(group, []).append(impl)
        assert len(groups) > 1 and all(impls[0] == "compiled" and len(impls) > 2 for impls in groups.values())
    steps = [label for label, _ in runner.SUITES["train_step"]()]
    assert steps[:4] == ["t12/reference", "t12/run", "t12-modern/reference", "t12-modern/run"]
    assert {"t12-modern/charlm-compiled", "t12-modern/charlm-compiled-triton"} <= set(steps)  # the kernels' effect
    assert steps.index("t12-xl/reference") < steps.index("t12-xl/run")


def test_kernel_measurement_reports_device_and_bandwidth(monkeypatch):
    """bench.timing.measure, the kernel benchmarks' common path (run on GPUs only), with the GPU copy-bandwidth
    probe replaced: it names the device and turns the time into GB/s and a fraction of the copy bandwidth."""
    import bench.timing as timing
    monkeypatch.setattr(timing, "bandwidth", lambda: 1e12)
    n = 64 * 33 * 4
    info = timing.measure(None, lambda a: a * 2, lambda: (torch.randn(64, 33),), traffic=2 * n, input_bytes=n,
                          name="double")
    assert info["name"] == "double" and info["device"] and info["seconds"] > 0
    assert info["gbps"] == pytest.approx(2 * n / info["seconds"] / 1e9)
    assert info["of_copy"] == pytest.approx(2 * n / info["seconds"] / 1e12)


def test_the_device_summary_reads_a_training_log_whose_last_line_the_timeout_tore(tmp_path):
    """The device suite runs under a timeout: the summary still reports the run it cut off."""
    import json

    from bench.summary import train_section
    config = {"train": {"precision": "bf16", "compile": True}, "model": {"attention": "sdpa"}}
    start = {"event": "start", "preset": "t12", "n_params": 44_000_000, "config": config,
             "dataset": {"name": "enwik8", "bytes": 100_000_000}}
    steps = [{"step": 10, "train_loss": 2.0, "tokens_per_s": 5000.0}, {"step": 20, "train_loss": 1.5}]
    (tmp_path / "t12_metrics.jsonl").write_text("\n".join(map(json.dumps, [start, *steps])) + '\n{"step": 30, "tr')
    text = "\n".join(train_section(tmp_path, 124, None))
    assert "Preset t12 (44,000,000 parameters, bf16, compile=True, attention=sdpa)" in text and "exit code 124" in text
    assert "- 20 steps in 0 s; train loss 2.885 -> 2.164 bits/byte" in text
