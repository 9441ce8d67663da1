"""Plot the learning curves of one or several runs.

    python -m train.plot RUN_DIR [RUN_DIR ...] [--out curves.png]

Four panels: train loss (t+1 head, in bits per byte) and validation bpc, each against optimiser steps and
against training seconds, one colour per run. Reads each run's metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def load_run(run_dir: Path) -> dict:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "event" not in r]
    series = {}
    for key, scale in (("train_loss", 1 / math.log(2)), ("val_bpc", 1.0), ("full_val_bpc", 1.0)):
        pts = [(r["step"], r.get("train_time_s", float("nan")), r[key] * scale) for r in steps if key in r]
        ends = [(r["step"], r["train_time_s"], r[key]) for r in rows if r.get("event") == "end" and r.get(key)]
        series[key] = pts + (ends if key == "full_val_bpc" else [])
    return {"name": Path(run_dir).name, "series": series}


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharey="row")
    panels = [("train_loss", "train loss (bits/byte)"), ("val_bpc", "validation bpc")]
    for row, (key, label) in enumerate(panels):
        for col, (x_index, x_label) in enumerate([(0, "step"), (1, "training time (s)")]):
            ax = axes[row][col]
            for i, run in enumerate(runs):
                color = f"C{i % 10}"
                pts = run["series"][key]
                if pts:
                    ax.plot([p[x_index] for p in pts], [p[2] for p in pts], color=color, label=run["name"],
                            lw=1.2, marker="." if len(pts) < 30 else None)
                full = run["series"]["full_val_bpc"] if key == "val_bpc" else []
                if full:
                    ax.plot([p[x_index] for p in full], [p[2] for p in full], "o", color=color, mfc="none",
                            label=f"{run['name']} (full split)")
            ax.set_xlabel(x_label)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    axes[1][0].legend(fontsize=8)
    fig.suptitle("charlm: " + ", ".join(r["name"] for r in runs))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (each with a metrics.jsonl)")
    p.add_argument("--out", default="curves.png", help="image file to write (PNG, SVG or PDF by extension)")
    args = p.parse_args(argv)
    try:
        runs = [load_run(Path(r)) for r in args.runs]
    except (FileNotFoundError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: plotting needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    plot(runs, Path(args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
