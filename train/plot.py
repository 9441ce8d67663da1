"""Plot the learning curves of one or several runs.

    python -m train.plot RUN_DIR [RUN_DIR ...] [--out curves.png]

Four panels: train loss (t+1 head, in bits per byte) and validation bpc, each against optimiser steps and
against training seconds, one colour per run; for runs that log every head's loss (several heads), two more: the
final heads (t+1, t+2, ...: one line style each) and the first such run's intermediate heads (one colour per
layer), against steps. Reads each run's metrics.jsonl.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from train.logger import read_metrics


def load_run(run_dir: Path) -> dict:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    rows = read_metrics(path)
    steps = [r for r in rows if "event" not in r]
    series = {}
    for key, scale in (("train_loss", 1 / math.log(2)), ("val_bpc", 1.0), ("full_val_bpc", 1.0)):
        pts = [(r["step"], r.get("train_time_s", float("nan")), r[key] * scale) for r in steps if key in r]
        ends = [(r["step"], r["train_time_s"], r[key]) for r in rows if r.get("event") == "end" and r.get(key)]
        series[key] = pts + (ends if key == "full_val_bpc" else [])
    heads = sorted({k for r in steps for k in r if k.startswith("loss/")})
    head_series = {k[len("loss/"):]: [(r["step"], r[k] / math.log(2)) for r in steps if k in r] for k in heads}
    return {"name": Path(run_dir).name, "series": series, "heads": head_series}


def plot_heads(axes, runs: list[dict]) -> None:
    """Final heads of every run; intermediate heads of the first run that has them."""
    styles = ["-", "--", ":", "-."]
    ax = axes[0]
    for i, run in enumerate(runs):
        for name, pts in run["heads"].items():
            if name.startswith("final/"):
                k = int(name.split("+")[1])
                ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[(k - 1) % 4], color=f"C{i % 10}",
                        lw=1.2, label=f"{run['name']} {name}")
    ax.set(xlabel="step", ylabel="loss (bits/byte)", title="final heads")
    ax.legend(fontsize=7)
    ax = axes[1]
    run = next((r for r in runs if any(n.startswith("L") for n in r["heads"])), None)
    if run is not None:
        layers = sorted({int(n[1:].split("/")[0]) for n in run["heads"] if n.startswith("L")})
        for name, pts in run["heads"].items():
            if name.startswith("L"):
                layer, k = int(name[1:].split("/")[0]), int(name.split("+")[1])
                shade = layers.index(layer) / max(1, len(layers) - 1)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[(k - 1) % 4], lw=1.0,
                        color=(0.1 + 0.8 * shade, 0.3, 0.9 - 0.8 * shade),
                        label=name if k == 1 or len(layers) < 4 else None)
        ax.set_title(f"intermediate heads of {run['name']} (blue: layer 1 ... red: layer {layers[-1]})")
        ax.legend(fontsize=6, ncol=2)
    ax.set(xlabel="step", ylabel="loss (bits/byte)")
    for a in axes:
        a.grid(alpha=0.3)


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_heads = any(run["heads"] for run in runs)
    fig, axes = plt.subplots(3 if with_heads else 2, 2, figsize=(12, 12 if with_heads else 8), sharey="row")
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
    if with_heads:
        plot_heads(axes[2], runs)
    fig.suptitle("charlm: " + ", ".join(r["name"] for r in runs))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_run_curves(run_dir: Path) -> str | None:
    """The end of a training run: its curves as <run_dir>/curves.png. Returns a warning line instead when
    matplotlib is missing or the plot fails: a finished run is never failed by its picture."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "no curves.png: plotting needs matplotlib (pip install matplotlib)"
    try:
        plot([load_run(Path(run_dir))], Path(run_dir) / "curves.png")
    except Exception as e:  # noqa: BLE001 - whatever broke, the run's checkpoint and logs are already written
        return f"warning: curves.png not written ({type(e).__name__}: {e})"[:300]
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (each with a metrics.jsonl)")
    p.add_argument("--out", default="curves.png", help="image file to write (PNG, SVG or PDF by extension)")
    args = p.parse_args(argv)
    try:
        runs = [load_run(Path(r)) for r in args.runs]
    except FileNotFoundError as e:
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
