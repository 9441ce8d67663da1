"""The benchmark gate's logic on synthetic results: ratios against the reference, medians and spread over runs,
the comparison with a baseline, and `python -m bench --check` / `--update-baseline` exit codes."""
import json

import pytest
import torch

import bench.__main__ as runner
import bench.compare as compare_mod
from bench.compare import compare, device_class, extra_fields, failed, median_ratios, ratios


def result(name, seconds, reference="x/ref"):
    return {"name": name, "reference": reference, "seconds": seconds, "dtype": "fp32"}


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
    monkeypatch.setattr(runner, "SUITES", {"fake": lambda: [result("fake/ref", 2.0, "fake/ref"),
                                                           result("fake/new", speed["seconds"], "fake/ref")]})
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
