"""The benchmark suite for the current device, as a table of speed-ups over the reference PyTorch.

    python -m bench [--only train_step eval mhce layernorm rmsnorm swiglu attention architectures] [--repeat N]
                    [--json PATH] [--check [--tolerance X]] [--update-baseline]

Every case is timed against its reference in the same run (the plain reference GPT for training steps, stride-1
strided evaluation for the evaluator, torch.compile'd references for kernels on a GPU, the per-head loop for the
loss on a CPU), and the ratio, reference time / time, is what is kept and compared: absolute times vary between
machines of a class, ratios much less. `--check` compares the ratios with bench/baselines/<device>.json (a CPU
model without a file of its own: cpu.json) and exits 1 when any falls more than the tolerance below its baseline
(or a baseline case did not run); `--update-baseline` writes the device's own file. With --repeat N each ratio is
the median of N runs, and the spread between runs is shown.

Cases run one at a time, and nothing measured is lost: a case that raises is reported (with its traceback on
stderr) and the others still run; with --budget S no case starts later than S seconds after the start (the rest
are listed as skipped); Ctrl-C or SIGINT (the device suite's time limit) ends the run with the table of what was
measured. The --json file is rewritten after every case ("complete": false until the end). Exit code: 130 when
interrupted, 1 when a case failed, else the check's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from bench import (bench_architectures, bench_attention, bench_eval, bench_layernorm, bench_mhce, bench_rmsnorm,
                   bench_swiglu, bench_train_step)
from bench.compare import compare, device_class, failed, load_baseline, median_ratios, ratios, save_baseline
from bench.compare import extra_fields, verdict_table
from train.hardware import device_name

SUITES = {"train_step": bench_train_step.suite, "eval": bench_eval.suite, "mhce": bench_mhce.suite,
          "layernorm": bench_layernorm.suite, "rmsnorm": bench_rmsnorm.suite, "swiglu": bench_swiglu.suite,
          "attention": bench_attention.suite, "architectures": bench_architectures.suite}
DEFAULT_TOLERANCE = 0.10


def table(results: list[dict], ratio: dict[str, float]) -> str:
    rows = [f"{'case':<48} {'dtype':<5} {'time':>10} {'vs ref':>7}  more"]
    for r in results:
        more = extra_fields(r)
        vs = (f"{ratio[r['name']]:7.3f}" if r["name"] in ratio
              else f"{'ref':>7}" if r.get("reference") == r["name"] else f"{'no ref':>7}")
        rows.append(f"{r['name']:<48} {r['dtype']:<5} {r['seconds'] * 1e3:8.3f}ms {vs}  {more}")
    return "\n".join(rows)


def run_suites(names: list[str], started: float, budget: float | None = None, progress=lambda outcome: None,
               clock=time.monotonic) -> dict:
    """One run of the named suites, case by case: {"results", "errors" (case, error), "skipped" (cases not started:
    past the budget or after an interrupt), "interrupted"}. progress(outcome) is called after every case."""
    outcome = {"results": [], "errors": [], "skipped": [], "interrupted": False}
    for name in names:
        for label, measure in SUITES[name]():
            full = f"{name}/{label}"
            if outcome["interrupted"] or (budget is not None and clock() - started >= budget):
                outcome["skipped"].append(full)
                continue
            t0, error = clock(), None
            try:
                result = measure()
            except KeyboardInterrupt:
                outcome["interrupted"] = True
                outcome["skipped"].append(full)
                print(f"[{clock() - started:5.0f} s] {full}: interrupted", file=sys.stderr, flush=True)
            except Exception as e:  # one case's failure must not cost the other cases their numbers
                traceback.print_exc()
                error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            else:
                outcome["results"].append(result)
                print(f"[{clock() - started:5.0f} s] {result['name']}: {result['seconds'] * 1e3:.4g} ms "
                      f"({clock() - t0:.0f} s)", file=sys.stderr, flush=True)
                if result["name"] != full:  # kept, but --check finds baselines by suite name: a failure
                    error = f"its result is named {result['name']}, not {full}"
            if error is not None:
                outcome["errors"].append({"case": full, "error": error})
                print(f"[{clock() - started:5.0f} s] {full}: FAILED {error}", file=sys.stderr, flush=True)
            progress(outcome)
    return outcome


def write_json(path: str, device: str, results: list[dict], current: dict, spread: dict, outcome: dict,
               complete: bool) -> None:
    """The results so far, written to a temporary file and renamed, so that a kill leaves the last whole one."""
    data = {"device": device, "results": [r | {"ratio": current.get(r["name"])} for r in results],
            "ratios": current, "spread": spread, "errors": outcome["errors"], "skipped": outcome["skipped"],
            "complete": complete}
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=list(SUITES), help="suites to run, in this order (default: all)")
    p.add_argument("--repeat", type=int, default=1, help="runs of the suite; ratios are their medians")
    p.add_argument("--budget", type=float, help="seconds after which no further case starts (default: none)")
    p.add_argument("--json", help="write every result (and the ratios) to this file, rewritten after every case")
    p.add_argument("--check", action="store_true", help="compare with the stored baseline; exit 1 on a regression")
    p.add_argument("--tolerance", type=float, help="relative drop allowed by --check (default: the baseline's)")
    p.add_argument("--update-baseline", action="store_true", help="store these ratios as the baseline")
    args = p.parse_args(argv)
    device = device_name()
    names = args.only or list(SUITES)
    started = time.monotonic()
    runs, measured = [], {}  # ratios of each run; name -> its latest result
    errors, skipped = [], []
    outcome = {"interrupted": False}

    def progress(partial: dict) -> None:
        if args.json:
            latest = measured | {r["name"]: r for r in partial["results"]}
            current, spread = median_ratios(runs + [ratios(partial["results"])])
            write_json(args.json, device, list(latest.values()), current, spread,
                       {"errors": errors + partial["errors"], "skipped": skipped + partial["skipped"]}, False)

    for i in range(args.repeat):
        t0 = time.monotonic()
        outcome = run_suites(names, started, args.budget, progress)
        errors += outcome["errors"]
        skipped += [name for name in outcome["skipped"] if name not in skipped]
        measured |= {r["name"]: r for r in outcome["results"]}
        runs.append(ratios(outcome["results"]))
        print(f"run {i + 1}/{args.repeat}: {len(outcome['results'])} cases in {time.monotonic() - t0:.0f} s",
              file=sys.stderr)
        if outcome["interrupted"]:
            break
    results = list(measured.values())
    current, spread = median_ratios(runs)
    print(f"\n{device} ({device_class(device)}): speed-up over the reference, measured in the same run\n")
    print(table(results, current))
    if args.repeat > 1:
        print("\nspread between runs (max/min - 1): " + ", ".join(f"{k} {v:.1%}" for k, v in sorted(spread.items())))
    for e in errors:
        print(f"FAILED {e['case']}: {e['error']}")
    if skipped:
        why = "interrupted" if outcome["interrupted"] else f"past the budget of {args.budget:.0f} s"
        print(f"not run ({why}): {', '.join(skipped)}")
    if args.json:
        write_json(args.json, device, results, current, spread, {"errors": errors, "skipped": skipped},
                   not (errors or skipped or outcome["interrupted"]))
    if outcome["interrupted"]:
        return 130
    baseline = load_baseline(device)
    if args.update_baseline:
        if errors or skipped:
            print("\nerror: baseline not written: not every case ran", file=sys.stderr)
            return 1
        tolerance = args.tolerance or (baseline or {}).get("tolerance", DEFAULT_TOLERANCE)
        path = save_baseline(device, current, tolerance, {"suites": names, "repeat": args.repeat,
                                                          "measured": time.strftime("%Y-%m-%d")})
        print(f"\nbaseline written: {path}")
    if args.check:
        if baseline is None:
            print(f"\nerror: no baseline for {device_class(device)}: run with --update-baseline first",
                  file=sys.stderr)
            return 2
        tolerance = args.tolerance or baseline.get("tolerance", DEFAULT_TOLERANCE)
        wanted = {k: v for k, v in baseline["ratios"].items() if k.split("/")[0] in names}
        verdicts = compare(current, wanted, tolerance)
        print(f"\nagainst bench/baselines/{baseline['file']} (measured on {baseline['device']})")
        print(verdict_table(verdicts, tolerance))
        bad = failed(verdicts)
        if bad:
            print(f"\nFAILED: {len(bad)} case(s) " + ", ".join(f"{v.name} ({v.status})" for v in bad),
                  file=sys.stderr)
            return 1
        print("\nbenchmark check passed")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
