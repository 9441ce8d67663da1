"""python -m train.ablate: one-factor-at-a-time studies. Every run is an ordinary charlm run in DIR/<run>/
(config.json, metrics.jsonl, ckpt.pt, and train.log with its output), so any of them can be evaluated, sampled,
plotted or resumed on its own.

    python -m train.ablate --out_dir=DIR --base.preset=cpu --base.train.max_steps=500 \\
        --vary model.norm=layernorm,rmsnorm --vary train.lr=1e-3,2e-3,4e-3 --seeds 2
    python -m train.ablate --out_dir=DIR --study study.toml     # the TOML format: train/studies.py
    python -m train.ablate --out_dir=DIR --study notes          # the research notes' knobs on the cpu preset
    python -m train.ablate --report DIR                         # rebuild tables and plots from the run folders

Rerunning the same command continues a study: finished runs are skipped, an interrupted one resumes from its
checkpoint, a failed one (recorded with its one-line error in DIR/<run>/failed.json) is skipped unless
--retry_failed. After every run DIR/results.jsonl, results.md, deltas.png and curves.png are rewritten.
Runs go one at a time, or one per GPU with --gpus 0,1,... (CUDA_VISIBLE_DEVICES per run). Ctrl-C or SIGTERM
stops the running runs at a checkpoint; a killed study's runs stop by themselves (Linux: parent-death signal).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from train.ablate_report import build_report
from train.config import ConfigError
from train.hardware import device_name
from train.lock import RunLock
from train.logger import progress_bar, read_metrics
from train.studies import (NOTES_BUDGET, PlannedRun, Study, from_table, from_toml, notes, parse_vary, plan,
                           study_dict)

# The child: stops with the study, then is `python -m train` with the run's arguments. Linux sends the parent-death
# signal (PR_SET_PDEATHSIG) each time a thread of the dead study that the child was reparented to exits, so it is
# SIGUSR1, turned into one SIGTERM (a second SIGTERM would make the run exit without its checkpoint).
CHILD = """import ctypes, os, runpy, signal, sys
def parent_died(signum, frame, seen=[]):
    if not seen:
        seen.append(signum)
        signal.raise_signal(signal.SIGTERM)
if sys.platform == "linux":
    signal.signal(signal.SIGUSR1, parent_died)
    ctypes.CDLL(None).prctl(1, signal.SIGUSR1)
if os.getppid() != int(sys.argv.pop(1)):
    sys.exit(143)
sys.argv[0] = "train"
runpy.run_module("train", run_name="__main__", alter_sys=True)
"""
LOCK_WAIT_S = 120.0  # how long a run waits for its folder's lock (a previous study's run still checkpointing)


def finished(folder: Path) -> bool:
    path = folder / "metrics.jsonl"
    return path.exists() and any(record.get("event") == "end" for record in read_metrics(path))


def error_line(log: Path, exit_code: int) -> str:
    """The one line that says why a run failed: its `error:` line, else the exception of a traceback."""
    lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if l.strip()] if log.exists() else []
    found = next((l for l in reversed(lines) if l.startswith("error:")), None)
    found = found or next((l for l in reversed(lines) if re.match(r"^[\w.]+(Error|Exception)\b", l)), None)
    if found is None and exit_code < 0:
        found = f"killed by {signal.Signals(-exit_code).name}"
    return (found or (lines[-1] if lines else f"exit code {exit_code}")).removeprefix("error: ")[:300]


class StudyRunner:
    """Runs the planned runs (one worker per GPU, or one), rebuilding the report after each."""

    def __init__(self, out: Path, study: Study, runs: list[PlannedRun], gpus: list[str], retry_failed: bool):
        self.out, self.study, self.runs, self.gpus, self.retry_failed = out, study, runs, gpus, retry_failed
        self.stop_signal: int | None = None
        self.children: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.bar = None

    def argv(self, run: PlannedRun, resume: bool) -> list[str]:
        return [sys.executable, "-c", CHILD, str(os.getpid()), f"--preset={self.study.preset}",
                *(f"--{k}={v}" for k, v in run.overrides.items()), f"--out_dir={self.out / run.name}",
                "--resume" if resume else "--overwrite"]

    def on_signal(self, signum, frame) -> None:
        if self.stop_signal is None:
            print(f"\n{signal.Signals(signum).name}: stopping the running runs at a checkpoint; rerun the same "
                  f"command to continue the study", file=sys.stderr, flush=True)
        self.stop_signal = signum
        with self.lock:
            for child in self.children:
                child.send_signal(signal.SIGTERM)

    def wait_for_folder(self, folder: Path) -> None:
        """A run of a study that was killed a moment ago may still be writing its checkpoint: wait for its lock."""
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                RunLock(folder).release()
                return
            except ConfigError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def execute(self, run: PlannedRun, gpu: str | None) -> str:
        """One run to its end: 'done', 'failed' or 'interrupted'."""
        folder = self.out / run.name
        failure = folder / "failed.json"
        folder.mkdir(parents=True, exist_ok=True)
        failure.unlink(missing_ok=True)
        try:
            self.wait_for_folder(folder)
        except ConfigError as e:
            failure.write_text(json.dumps({"exit_code": None, "error": str(e)}) + "\n")
            return "failed"
        resume = (folder / "ckpt.pt").exists()
        env = dict(os.environ) | ({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})
        log_path = folder / "train.log"
        with open(log_path, "a" if resume else "w") as log:
            log.write(f"# charlm study {self.study.name}: {'resuming' if resume else 'starting'} {run.name} at "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            log.flush()
            with self.lock:
                if self.stop_signal is not None:
                    return "interrupted"
                child = subprocess.Popen(self.argv(run, resume), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)  # Ctrl-C reaches the study, which stops it once
                self.children.add(child)
            code = child.wait()
            with self.lock:
                self.children.discard(child)
        if self.stop_signal is not None and not finished(folder):
            return "interrupted"
        if code == 0 and finished(folder):
            return "done"
        failure.write_text(json.dumps({"exit_code": code, "error": error_line(log_path, code)}) + "\n")
        return "failed"

    def worker(self, todo: queue.Queue, gpu: str | None) -> None:
        while self.stop_signal is None:
            try:
                run = todo.get_nowait()
            except queue.Empty:
                return
            with self.lock:
                self.bar.set_postfix_str(run.name, refresh=True)
            status = self.execute(run, gpu)
            with self.lock:
                if status != "interrupted":
                    build_report(self.out)
                    self.bar.update(1)
                if status == "failed":
                    error = json.loads((self.out / run.name / "failed.json").read_text())["error"]
                    self.bar.write(f"run {run.name} failed (recorded; the study goes on): {error}", file=sys.stderr)

    def run(self) -> int:
        pending = [r for r in self.runs if not finished(self.out / r.name)
                   and (self.retry_failed or not (self.out / r.name / "failed.json").exists())]
        handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        todo = queue.Queue()
        for r in pending:
            todo.put(r)
        self.bar = progress_bar(total=len(self.runs), initial=len(self.runs) - len(pending), unit="run",
                                desc=f"study {self.study.name}", mininterval=1.0)
        try:
            workers = [threading.Thread(target=self.worker, args=(todo, gpu), daemon=True)
                       for gpu in (self.gpus or [None])]
            for w in workers:
                w.start()
            for w in workers:
                while w.is_alive():
                    w.join(0.2)
        finally:
            self.bar.close()
            for s, h in handlers.items():
                signal.signal(s, h)
        rows = build_report(self.out)
        counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "failed", "unfinished", "pending")}
        print(f"study {self.study.name}: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v) +
              f" of {len(rows)} runs; results: {self.out / 'results.md'}", flush=True)
        return 128 + self.stop_signal if self.stop_signal is not None else 0


# ------------------------------------------------------------------------------------------------ CLI
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.ablate", description=__doc__.split("\n")[0],
                                epilog="--base.KEY=VALUE sets a key of the base config (--base.preset=NAME its preset)")
    p.add_argument("--out_dir", help="the study's folder (one sub-folder per run)")
    p.add_argument("--study", help="'notes' (built in) or a TOML file")
    p.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2,...", help="a factor (repeatable)")
    p.add_argument("--grid", metavar="KEY1,KEY2", help="also run every combination of these two factors")
    p.add_argument("--seeds", type=int, help="runs per value, seeds base+0, base+1, ... (default 1; notes: 2)")
    p.add_argument("--budget", metavar="steps=N|seconds=S|tokens=T",
                   help=f"every run's budget (default: the base config's own; notes: {NOTES_BUDGET})")
    p.add_argument("--gpus", metavar="0,1,...", help="run one run per listed GPU at a time")
    p.add_argument("--retry_failed", action="store_true", help="run the runs that failed before again")
    p.add_argument("--dry_run", action="store_true", help="print the planned runs and exit")
    p.add_argument("--report", metavar="DIR", help="only rebuild DIR's results and plots from its run folders")
    return p


def build_study(args: argparse.Namespace, base_args: list[str]) -> Study:
    if args.study == "notes":
        study = from_table(notes(args.budget or NOTES_BUDGET), "notes")
    elif args.study:
        study = from_toml(Path(args.study))
    else:
        study = Study(name=Path(args.out_dir).name)
    for arg in base_args:
        key, eq, value = arg[len("--base."):].partition("=")
        if not eq:
            raise ConfigError(f"{arg}: expected --base.KEY=VALUE")
        if key == "preset":
            study.preset = value
        else:
            study.base[key] = value
    for spec in args.vary:
        factor = parse_vary(spec)
        study.factors = [f for f in study.factors if f.key != factor.key] + [factor]
    if args.seeds is not None:
        study.seeds = args.seeds
    if args.budget is not None:
        study.budget = args.budget
    if args.grid:
        study.grid = tuple(k.strip() for k in args.grid.split(","))
    return study


def check_folder(out: Path, runs: list[PlannedRun]) -> None:
    """A study folder may grow (more seeds, more factors), but a run already there must keep its settings."""
    path = out / "study.json"
    if not path.exists():
        return
    before = {r["name"]: r["overrides"] for r in json.loads(path.read_text())["runs"]}
    for run in runs:
        if run.name in before and before[run.name] != run.overrides:
            changed = sorted(set(before[run.name].items()) ^ set(run.overrides.items()))[0][0]
            raise ConfigError(f"{out / run.name} was run with other settings ({changed} differs); use another "
                              f"--out_dir for a different study")


def main(argv: list[str]) -> int:
    base_args = [a for a in argv if a.startswith("--base.")]
    args, unknown = parser().parse_known_args([a for a in argv if not a.startswith("--base.")])
    try:
        if unknown:
            raise ConfigError(f"unexpected argument '{unknown[0]}'; see python -m train.ablate --help")
        if args.report:
            out = Path(args.report)
            if not (out / "study.json").exists():
                raise ConfigError(f"{out} holds no study (no study.json)")
            build_report(out)
            print(f"wrote {out / 'results.md'}, results.jsonl and the plots")
            return 0
        if not args.out_dir:
            raise ConfigError("--out_dir=DIR is required (the study's folder)")
        study = build_study(args, base_args)
        runs, tables = plan(study)
        if args.dry_run:
            for r in runs:
                print(r.name, " ".join(f"--{k}={v}" for k, v in r.overrides.items()))
            print(f"{len(runs)} runs")
            return 0
        out = Path(args.out_dir)
        check_folder(out, runs)
        lock = RunLock(out)  # one study per folder at a time
        gpus = [g.strip() for g in args.gpus.split(",")] if args.gpus else []
        record = {"study": study_dict(study), "machine": device_name(), "grid": list(study.grid or []) or None,
                  "runs": [r.__dict__ for r in runs], "tables": tables}
        (out / "study.json").write_text(json.dumps(record, indent=1) + "\n")
        try:
            return StudyRunner(out, study, runs, gpus, args.retry_failed).run()
        finally:
            lock.release()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
