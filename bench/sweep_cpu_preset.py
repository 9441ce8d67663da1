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

from train.logger import read_metrics


def shape(n_layer: int, d_model: int, block: int, batch: int, lr: float | None = None) -> list[str]:
    """Overrides for one candidate: 64-wide heads, d_ff = 4 d_model; lr None keeps the preset's."""
    args = [f"--model.n_layer={n_layer}", f"--model.d_model={d_model}", f"--model.n_head={d_model // 64}",
            f"--model.d_ff={4 * d_model}", f"--model.block_size={block}", f"--train.batch_size={batch}"]
    return args + ([f"--train.lr={lr}"] if lr else [])


# round 1 ran at lr 2e-3 (the preset's lr then), round 2 around the round-1 winners
CANDIDATES = {
    "L4-d256-T256": shape(4, 256, 256, 16, 2e-3),
    "L4-d256-T128-B32": shape(4, 256, 128, 32, 2e-3),
    "L3-d192-T128-B32": shape(3, 192, 128, 32, 2e-3),
    "L6-d192-T128-B32": shape(6, 192, 128, 32, 2e-3),
    "L4-d128-T128-B32": shape(4, 128, 128, 32, 2e-3),
    "L3-d192-T128-B32-lr4e-3": shape(3, 192, 128, 32, 4e-3),
    "L3-d192-T128-B16-lr3e-3": shape(3, 192, 128, 16, 3e-3),
    "L2-d256-T128-B32-lr3e-3": shape(2, 256, 128, 32, 3e-3),
    "L4-d128-T128-B32-lr4e-3": shape(4, 128, 128, 32, 4e-3),
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
        lines = read_metrics(run_dir / "metrics.jsonl")
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
