"""Dataset statistics: what a byte-level model faces, and the floors it must beat.

    python -m train.data --stats [--data.source=enwik8|sample|PATH] [--data.data_dir=data] [--out_dir=DIR]

For the whole file and each split: bytes, distinct byte values, the order-0 entropy (the bpc of a unigram model
fitted to that very text) and the bpc of the standard library's compressors (zlib level 9, bz2 level 9, lzma
preset 6); pages (`<page>` ... `</page>` elements: count, mean / median / p90 length in bytes). Printed as a
table, written to DIR/stats.json, and DIR/byte_histogram.png (byte frequencies, log scale, per split).
"""
from __future__ import annotations

import argparse
import bz2
import json
import lzma
import re
import sys
import zlib
from pathlib import Path

import numpy as np

from train.config import ConfigError, DataConfig

COMPRESSORS = {"zlib": lambda b: zlib.compress(b, 9), "bz2": lambda b: bz2.compress(b, 9),
               "lzma": lambda b: lzma.compress(b, preset=6)}
PAGE = re.compile(rb"<page>.*?</page>", re.S)


def byte_counts(data: np.ndarray) -> np.ndarray:
    return np.bincount(np.asarray(data, dtype=np.uint8), minlength=256)


def order0_bpc(counts: np.ndarray) -> float:
    """Entropy of the byte distribution in bits: what a unigram model fitted to the text itself scores."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def compressor_bpc(data: bytes) -> dict[str, float]:
    return {name: 8 * len(compress(data)) / max(1, len(data)) for name, compress in COMPRESSORS.items()}


def page_stats(data: bytes) -> dict:
    lengths = np.array([m.end() - m.start() for m in PAGE.finditer(data)])
    if not len(lengths):
        return {"pages": 0}
    return {"pages": int(len(lengths)), "mean_bytes": float(lengths.mean()), "median_bytes": float(np.median(lengths)),
            "p90_bytes": float(np.percentile(lengths, 90))}


def part_stats(data: np.ndarray) -> dict:
    counts = byte_counts(data)
    raw = bytes(np.asarray(data))
    return {"bytes": int(len(data)), "distinct": int((counts > 0).sum()), "order0_bpc": order0_bpc(counts),
            **{f"{name}_bpc": v for name, v in compressor_bpc(raw).items()}, **page_stats(raw)}


def corpus_stats(corpus) -> dict:
    parts = {"whole": corpus.data, **{s: corpus.split(s) for s in ("train", "val", "test")}}
    return {"dataset": corpus.identity, **{name: part_stats(data) for name, data in parts.items()},
            "counts": {s: byte_counts(corpus.split(s)).tolist() for s in ("train", "val", "test")}}


def table(stats: dict) -> str:
    cols = ["bytes", "distinct", "order0_bpc", "zlib_bpc", "bz2_bpc", "lzma_bpc", "pages", "mean_bytes",
            "median_bytes", "p90_bytes"]
    rows = ["| part | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for part in ("whole", "train", "val", "test"):
        cells = [stats[part].get(c) for c in cols]
        rows.append(f"| {part} | " + " | ".join("-" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.3f}"
                                                for v in cells) + " |")
    return "\n".join(rows)


def plot_histogram(stats: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4))
    for split, counts in stats["counts"].items():
        freq = np.array(counts, dtype=float) / max(1, sum(counts))
        ax.semilogy(np.arange(256), np.where(freq > 0, freq, np.nan), ".", ms=3, label=split)
    ax.set(xlabel="byte value", ylabel="frequency", title=f"byte frequencies: {stats['dataset']['name']}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from train.data import load_corpus
    p = argparse.ArgumentParser(prog="python -m train.data", description=__doc__.split("\n")[0])
    p.add_argument("--stats", action="store_true", help="compute and write the dataset's statistics")
    p.add_argument("--data.source", dest="source", default=DataConfig.source)
    p.add_argument("--data.data_dir", dest="data_dir", default=DataConfig.data_dir)
    p.add_argument("--out_dir", help="where stats.json and byte_histogram.png go (default: runs/stats-<dataset>)")
    args = p.parse_args(argv)
    if not args.stats:
        p.error("nothing to do: pass --stats")
    try:
        corpus = load_corpus(DataConfig(source=args.source, data_dir=args.data_dir, fallback=False))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stats = corpus_stats(corpus)
    out = Path(args.out_dir or f"runs/stats-{corpus.name}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    plot_histogram(stats, out / "byte_histogram.png")
    print(f"{corpus.name} ({corpus.identity['bytes']:,} bytes, sha256 {corpus.sha256[:12]}...)")
    print(table(stats))
    print(f"wrote {out / 'stats.json'} and {out / 'byte_histogram.png'}")
    return 0
