"""The measurement behind the `cpu` preset: train candidate configs for the same wall-clock budget on this
machine and rank them by full validation bpc. Each candidate is a list of overrides on top of the cpu preset.

    python -m bench.sweep_cpu_preset [--budget 300] [--out bench/results/cpu-preset-sweep.jsonl] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CANDIDATES = {
    "L4-d256-T256": ["--model.n_layer=4", "--model.d_model=256", "--model.n_head=4", "--model.d_ff=1024",
                     "--model.block_size=256"],
    "L4-d256-T128-B32": ["--model.n_layer=4", "--model.d_model=256", "--model.n_head=4", "--model.d_ff=1024",
                         "--model.block_size=128", "--train.batch_size=32"],
    "L3-d192-T128-B32": ["--model.n_layer=3", "--model.d_model=192", "--model.n_head=3", "--model.d_ff=768",
                         "--model.block_size=128", "--train.batch_size=32"],
    "L6-d192-T128-B32": ["--model.n_layer=6", "--model.d_model=192", "--model.n_head=3", "--model.d_ff=768",
                         "--model.block_size=128", "--train.batch_size=32"],
    "L4-d128-T128-B32": ["--model.n_layer=4", "--model.d_model=128", "--model.n_head=2", "--model.d_ff=512",
                         "--model.block_size=128", "--train.batch_size=32"],
    # round 2: learning rate, batch and width around the round-1 winners
    "L3-d192-T128-B32-lr4e-3": ["--model.n_layer=3", "--model.d_model=192", "--model.n_head=3",
                                "--model.d_ff=768", "--model.block_size=128", "--train.batch_size=32",
                                "--train.lr=4e-3"],
    "L3-d192-T128-B16-lr3e-3": ["--model.n_layer=3", "--model.d_model=192", "--model.n_head=3",
                                "--model.d_ff=768", "--model.block_size=128", "--train.batch_size=16",
                                "--train.lr=3e-3"],
    "L2-d256-T128-B32-lr3e-3": ["--model.n_layer=2", "--model.d_model=256", "--model.n_head=4",
                                "--model.d_ff=1024", "--model.block_size=128", "--train.batch_size=32",
                                "--train.lr=3e-3"],
    "L4-d128-T128-B32-lr4e-3": ["--model.n_layer=4", "--model.d_model=128", "--model.n_head=2",
                                "--model.d_ff=512", "--model.block_size=128", "--train.batch_size=32",
                                "--train.lr=4e-3"],
}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--budget", type=float, default=300.0, help="seconds of training per candidate")
    p.add_argument("--out", default="bench/results/cpu-preset-sweep.jsonl")
    p.add_argument("--only", nargs="*", help="candidate names (default: all)")
    p.add_argument("--extra", nargs="*", default=[], help="overrides added to every candidate")
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.only or CANDIDATES:
        run_dir = Path("runs/sweep") / name
        cmd = [sys.executable, "-m", "train", "--preset=cpu", "--data.source=sample", f"--out_dir={run_dir}",
               "--overwrite", f"--train.max_time={args.budget}", *CANDIDATES[name], *args.extra]
        t0 = time.time()
        subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
        lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        end = lines[-1]
        row = {"name": name, "overrides": CANDIDATES[name] + args.extra, "budget_s": args.budget,
               "full_val_bpc": end["full_val_bpc"], "steps": end["step"], "n_params": end["n_params"],
               "tokens_per_s": end["tokens_per_s"], "wall_s": round(time.time() - t0, 1),
               "git_sha": lines[0]["git_sha"]}
        print(json.dumps(row), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
