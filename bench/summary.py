"""The device suite's markdown summary, from what bench/device_suite.sh wrote into its output folder.

    python -m bench.summary OUT_DIR [--parity-rc N] [--bench-rc N] [--train-rc N] [--train-log PATH] [--profile PATH]
                                    [--no-train]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from bench.compare import extra_fields
from train.logger import read_metrics

GOALS = {  # what the issues ask of an H100, checked against the measured ratios where the run has them
    "rmsnorm": "Triton >= 80% of copy bandwidth and never slower than the compiled reference",
    "layernorm": "Triton >= 80% of copy bandwidth and never slower than the compiled reference",
    "swiglu": "Triton >= 80% of copy bandwidth and never slower than the compiled reference",
    "mhce": "the faster Triton variant >= 2x the compiled reference",
    "eval": "cached evaluation of a T12-sized model over 5 MB <= 30 s",
}


def parity_section(out: Path, rc: int) -> list[str]:
    lines = ["## Parity tests", ""]
    xml = out / "parity.xml"
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        lines.append(f"{counts['tests']} tests: {counts['failures']} failed, {counts['errors']} errors, "
                     f"{counts['skipped']} skipped (pytest exit code {rc})")
        for case in suite.iter("testcase"):
            for child in case:
                if child.tag in ("failure", "error"):
                    lines.append(f"- **{child.tag.upper()}** {case.get('classname')}::{case.get('name')}: "
                                 f"{(child.get('message') or '')[:200]}")
                elif child.tag == "skipped":
                    lines.append(f"- skipped {case.get('name')}: {(child.get('message') or '')[:150]}")
    else:
        lines.append(f"no parity.xml (pytest exit code {rc})")
    return lines + [""]


def bench_section(out: Path, rc: int) -> list[str]:
    path = out / "bench.json"
    if not path.exists():
        return ["## Benchmarks", "", f"no bench.json (python -m bench exit code {rc})", ""]
    data = json.loads(path.read_text())
    ratios = data["ratios"]
    lines = ["## Benchmarks", "", f"Device: {data['device']}. Speed-up = reference time / time, both measured in "
             "this run.", "", "| case | dtype | shape | time | speed-up | more |", "|---|---|---|---|---|---|"]
    for r in data["results"]:
        more = extra_fields(r, sep=" ", timing_prefix="timed as ")
        ratio = (f"{ratios[r['name']]:.3f}" if r["name"] in ratios
                 else "reference" if r.get("reference") == r["name"] else "its reference did not run")
        lines.append(f"| {r['name']} | {r['dtype']} | {r['shape']} | {r['seconds'] * 1e3:.4g} ms | {ratio} | {more} |")
    notes = [f"- **FAILED** {e['case']}: {e['error']}" for e in data.get("errors", [])]
    if data.get("skipped"):
        notes.append(f"- not run (time budget or interrupt): {', '.join(data['skipped'])}")
    if not data.get("complete", True):
        notes.append(f"- **incomplete** (python -m bench exit code {rc}): the table holds what was measured")
    lines += ["", *notes] if notes else []
    lines += ["", "Goals (from the issues): " + "; ".join(f"{k}: {v}" for k, v in GOALS.items()), ""]
    return lines + loss_winners(data["results"], ratios) + kernel_verdicts(data["results"])


def kernel_verdicts(results: list[dict]) -> list[str]:
    """Whether charlm's Triton kernels speed up each preset's compiled training step (issue #11: t12 switches to
    model.kernels=triton if they do), from the charlm-compiled and charlm-compiled-triton cases."""
    seconds = {r["name"]: r["seconds"] for r in results}
    lines = []
    for preset in ("t12", "t12-modern"):
        plain, fused = (seconds.get(f"train_step/{preset}/{impl}") for impl in ("charlm-compiled",
                                                                                 "charlm-compiled-triton"))
        if plain and fused:
            verdict = "faster" if fused < plain else "slower"
            lines.append(f"- {preset}: {verdict} with the Triton kernels ({fused * 1e3:.3g} ms against "
                         f"{plain * 1e3:.3g} ms a step, {plain / fused:.2f}x)")
    return ["Compiled training step with model.kernels=triton against torch:", "", *lines, ""] if lines else []


def loss_winners(results: list[dict], ratios: dict) -> list[str]:
    """Which multi-head loss implementation is fastest in each benchmarked case (model.loss_impl's default should
    follow this)."""
    cases: dict[str, list[dict]] = {}
    for r in results:
        if r["name"].startswith("mhce/H="):
            cases.setdefault(r["name"].rsplit("/", 1)[0], []).append(r)
    lines = []
    for case, rows in cases.items():
        best = min(rows, key=lambda r: r["seconds"])
        lines.append(f"- {case}: fastest {best['name'].rsplit('/', 1)[1]} ({best['seconds'] * 1e3:.3g} ms, "
                     f"{ratios.get(best['name'], 1.0):.2f}x the compiled reference)")
    return ["Multi-head loss, fastest implementation per case:", "", *lines, ""] if lines else []


def train_section(out: Path, rc: int, log: Path | None) -> list[str]:
    lines = ["## Training run", ""]
    path = out / "t12_metrics.jsonl"
    if not path.exists():
        tail = log.read_text().splitlines()[-15:] if log and log.exists() else []
        return lines + [f"no metrics (exit code {rc})", "", "```", *tail, "```", ""]
    rows = read_metrics(path)  # a run the suite's timeout killed may have torn its last line
    start, steps = rows[0], [r for r in rows if "event" not in r]
    end = rows[-1] if rows[-1].get("event") in ("end", "interrupted") else {}
    losses = [r["train_loss"] for r in steps if "train_loss" in r]
    vals = [(r["step"], r["val_bpc"]) for r in steps if "val_bpc" in r]
    cfg = start["config"]
    lines += [f"Preset {start.get('preset')} ({start['n_params']:,} parameters, "
              f"{cfg['train']['precision']}, compile={cfg['train']['compile']}, attention={cfg['model']['attention']}) "
              f"on {start['dataset']['name']} ({start['dataset']['bytes']:,} bytes), exit code {rc}.", ""]
    if losses:
        lines.append(f"- {end.get('step', steps[-1]['step'])} steps in {end.get('train_time_s', 0):.0f} s; train loss "
                     f"{losses[0] / math.log(2):.3f} -> {losses[-1] / math.log(2):.3f} bits/byte")
    if steps and "tokens_per_s" in steps[-1]:
        lines.append(f"- last logged throughput: {steps[-1]['tokens_per_s']:,.0f} tokens/s")
    if vals:
        shown = vals[:: max(1, len(vals) // 8)][:8] + ([vals[-1]] if len(vals) > 8 else [])
        lines.append("- running validation bpc: " + ", ".join(f"{v:.3f} (step {s})" for s, v in shown))
    if end.get("full_val_bpc"):
        lines.append(f"- at the end, whole splits: validation {end['full_val_bpc']:.4f} bpc, test "
                     f"{end['full_test_bpc']:.4f} bpc ({end['full_val_protocol']})")
    lines.append("- curves: curves.png")
    return lines + [""]


def profile_section(path: Path | None) -> list[str]:
    """The training run's train.profile summary (profile.txt): where a step's time goes."""
    if path is None or not path.exists():
        return []
    return ["### Where a step's time goes (train.profile, 3 steps after 5)", "", "```", *path.read_text().splitlines(),
            "```", ""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.summary", description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--parity-rc", type=int, default=0)
    p.add_argument("--bench-rc", type=int, default=0)
    p.add_argument("--train-rc", type=int, default=0)
    p.add_argument("--train-log", type=Path)
    p.add_argument("--profile", type=Path, help="the training run's profile.txt")
    p.add_argument("--no-train", action="store_true",
                   help="the suite ran without its training step (--kernels, --variants)")
    args = p.parse_args(argv)
    env = (args.out / "env.txt").read_text().strip() if (args.out / "env.txt").exists() else "no env.txt"
    status = "PASSED" if args.parity_rc == 0 else "**FAILED**"
    lines = [f"# charlm device suite: parity {status}", "", "```", env, "```", ""]
    lines += parity_section(args.out, args.parity_rc)
    lines += bench_section(args.out, args.bench_rc)
    lines += (["## Training run", "", "not run (a --kernels or --variants lease)", ""] if args.no_train
              else train_section(args.out, args.train_rc, args.train_log) + profile_section(args.profile))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
