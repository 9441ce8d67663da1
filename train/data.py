"""Byte corpora: enwik8, the offline Wikipedia sample, or any file; memory-mapped uint8 with fixed splits.

- enwik8: `<data_dir>/enwik8` or `<data_dir>/enwik8.zip` if present, else the official zip is downloaded, checked
  against its sha256 and unpacked. Split 90M / 5M / 5M bytes. If the download fails, the run falls back to
  `sample` with a loud warning: its numbers are not comparable to published enwik8 results.
- sample: English Wikipedia XML shipped as test data inside the PyPI package gensim (the `dev` extra), unpacked once
  into `<data_dir>`. Split 90% / 5% / 5% by bytes, like any other file.
Training draws random windows (contiguous streams for a model with memory); evaluation walks deterministic
windows (`train.evaluate`).
"""
from __future__ import annotations

import bz2
import hashlib
import os
import queue
import sys
import threading
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from train.config import ConfigError, DataConfig

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_ZIP_BYTES = 36_445_475
ENWIK8_ZIP_SHA256 = "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"
ENWIK8_BYTES = 100_000_000
SAMPLE_MEMBER = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SAMPLE_BYTES = 6_089_746
SPLITS = ("train", "val", "test")


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _warn(msg: str) -> None:
    print(f"\n{'!' * 100}\nWARNING: {msg}\n{'!' * 100}\n", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ sources
def _download_enwik8(zip_path: Path, timeout: float) -> None:
    """Download the official zip into zip_path, verified; raises OSError on any failure."""
    tmp = zip_path.with_name(zip_path.name + ".part")
    h = hashlib.sha256()
    with urllib.request.urlopen(ENWIK8_URL, timeout=timeout) as r, open(tmp, "wb") as f:
        while block := r.read(1 << 20):
            h.update(block)
            f.write(block)
    if tmp.stat().st_size != ENWIK8_ZIP_BYTES or h.hexdigest() != ENWIK8_ZIP_SHA256:
        tmp.unlink()
        raise OSError(f"downloaded enwik8.zip failed its checksum (sha256 {h.hexdigest()})")
    os.replace(tmp, zip_path)


def enwik8_path(cfg: DataConfig) -> Path | None:
    """The unpacked enwik8 file, downloading it if needed; None when it cannot be had."""
    root = Path(cfg.data_dir)
    raw, zpath = root / "enwik8", root / "enwik8.zip"
    if raw.exists():
        return raw
    if not zpath.exists():
        root.mkdir(parents=True, exist_ok=True)
        print(f"downloading {ENWIK8_URL} ({ENWIK8_ZIP_BYTES / 1e6:.1f} MB) ...", file=sys.stderr, flush=True)
        try:
            _download_enwik8(zpath, cfg.download_timeout)
        except OSError as e:  # URLError, timeouts and checksum failures are all OSErrors
            if not cfg.fallback:
                raise ConfigError(f"could not download enwik8 ({e}); put enwik8.zip or enwik8 into {root}/ (or set "
                                  f"data.fallback=true to train on the 6 MB sample instead)") from None
            _warn(f"could not download enwik8 ({e}).\nFalling back to data.source=sample (Wikipedia XML shipped "
                  f"with gensim, 6.1 MB). Results are NOT comparable to published enwik8 numbers.\nTo use "
                  f"enwik8, put enwik8 or enwik8.zip into {root}/.")
            return None
    elif sha256_file(zpath) != ENWIK8_ZIP_SHA256:
        raise ConfigError(f"{zpath} is not the official enwik8.zip (sha256 mismatch); remove it or replace it")
    with zipfile.ZipFile(zpath) as z:
        _atomic_write(raw, z.read("enwik8"))
    return raw


def sample_path(cfg: DataConfig) -> Path:
    """The gensim Wikipedia sample, unpacked once into data_dir."""
    out = Path(cfg.data_dir) / "enwiki-sample.xml"
    if out.exists() and out.stat().st_size == SAMPLE_BYTES:
        return out
    try:
        import gensim
    except ImportError:
        raise ConfigError("data.source=sample needs the gensim package: pip install -e '.[dev]'") from None
    src = Path(gensim.__file__).parent / SAMPLE_MEMBER
    if not src.exists():
        raise ConfigError(f"gensim is installed but lacks its test corpus {src}")
    data = bz2.decompress(src.read_bytes())
    if len(data) != SAMPLE_BYTES:
        raise ConfigError(f"gensim's sample unpacked to {len(data)} bytes, expected {SAMPLE_BYTES}")
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(out, data)
    return out


# ------------------------------------------------------------------------------------------------ corpus
@dataclass
class Corpus:
    """A memory-mapped byte file with its split boundaries and identity."""
    name: str
    path: Path
    data: np.ndarray  # uint8 memmap of the whole file
    bounds: dict[str, tuple[int, int]]  # split -> [start, end) byte offsets
    sha256: str

    @property
    def identity(self) -> dict:
        return {"name": self.name, "path": str(self.path), "bytes": int(len(self.data)), "sha256": self.sha256}

    def split(self, name: str) -> np.ndarray:
        a, b = self.bounds[name]
        return self.data[a:b]


def split_bounds(n: int, is_enwik8: bool) -> dict[str, tuple[int, int]]:
    """enwik8: 90M/5M/5M bytes; anything else: 90%/5%/5%."""
    if is_enwik8:
        n_train, n_val = 90_000_000, 5_000_000
    else:
        n_train, n_val = int(n * 0.9), int(n * 0.05)
    return {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}


def load_corpus(cfg: DataConfig, min_split_bytes: int = 2) -> Corpus:
    """Resolve data.source to a memory-mapped corpus. Each split must hold at least min_split_bytes bytes
    (a window plus its target), else ConfigError."""
    name = cfg.source
    if name == "enwik8":
        path = enwik8_path(cfg)
        if path is None:
            name, path = "sample", sample_path(cfg)
    elif name == "sample":
        path = sample_path(cfg)
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"data file not found: {path}")
    n = path.stat().st_size
    if n == 0:
        raise ConfigError(f"data file {path} is empty")
    is_enwik8 = name == "enwik8"
    if is_enwik8 and n != ENWIK8_BYTES:
        raise ConfigError(f"{path} has {n} bytes; enwik8 has {ENWIK8_BYTES}")
    bounds = split_bounds(n, is_enwik8)
    shortest = min(b - a for a, b in bounds.values())
    if shortest < min_split_bytes:
        raise ConfigError(f"data file {path} is too short ({n} bytes): each split needs at least {min_split_bytes} "
                          f"bytes (block_size + 1), the smallest has {shortest}")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return Corpus(name if name in ("enwik8", "sample") else path.name, path, data, bounds, sha256_file(path))


# ------------------------------------------------------------------------------------------------ batches
def random_batch(split: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator,
                 shard: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: x = bytes [i, i+T), y = bytes [i+1, i+T+1), i uniform. Every rank draws the same global
    batch from the same generator and keeps its shard (rank, world), so a run's data does not depend on the
    number of ranks."""
    starts = torch.randint(0, len(split) - block_size, (batch_size,), generator=generator)
    rank, world = shard
    per = batch_size // world
    rows = np.stack([split[i: i + block_size + 1] for i in starts[rank * per:(rank + 1) * per].tolist()])
    t = torch.from_numpy(rows.astype(np.int64))
    return t[:, :-1], t[:, 1:]


class RandomWindows:
    """The training batches of the plain model: `random_batch` from a generator; its state is the generator's."""

    def __init__(self, split: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator,
                 shard: tuple[int, int]):
        self.args, self.generator = (split, batch_size, block_size, generator, shard), generator

    def draw(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(x, y, the streams restart here): random windows never continue one another."""
        return (*random_batch(*self.args), False)

    def state(self):
        return self.generator.get_state()

    def restore(self, state) -> None:
        self.generator.set_state(state)


class Streams:
    """Contiguous streams for a model with memory. Each pass over the split starts at a random offset o (drawn from
    the generator); global row i reads the stretch of L = len(split) // batch_size bytes from o + i * L (wrapping
    at the split's end), one segment of block_size bytes (plus the next byte as target) per draw. The rows of a
    pass cover the split once without overlap; a pass ends when a stretch has no whole segment left, and the
    next draw starts a new pass, flagged so that the memory is reset. Ranks keep their shard of rows."""

    def __init__(self, split: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator,
                 shard: tuple[int, int]):
        self.split, self.block, self.generator = split, block_size, generator
        self.stretch = len(split) // batch_size
        self.per_pass = (self.stretch - 1) // block_size  # segments per pass
        if self.per_pass < 1:
            raise ConfigError(f"a training split of {len(split)} bytes gives {batch_size} streams of "
                              f"{self.stretch} bytes, shorter than one segment of model.block_size={block_size} + 1")
        rank, world = shard
        per = batch_size // world
        self.rows = torch.arange(rank * per, (rank + 1) * per)
        self.pass_state, self.offset, self.drawn = None, 0, self.per_pass  # no pass begun yet

    def draw(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        restart = self.drawn == self.per_pass
        if restart:
            self.pass_state = self.generator.get_state()
            self.offset = int(torch.randint(0, len(self.split), (1,), generator=self.generator))
            self.drawn = 0
        starts = self.offset + self.rows * self.stretch + self.drawn * self.block
        index = (starts[:, None] + torch.arange(self.block + 1)) % len(self.split)
        rows = torch.from_numpy(self.split[index.numpy()].astype(np.int64))
        self.drawn += 1
        return rows[:, :-1], rows[:, 1:], restart

    def state(self) -> dict:
        """The generator's state when this pass began (before any pass: the generator's) and how many segments
        of the pass were drawn."""
        return {"pass": self.pass_state, "drawn": self.drawn,
                "generator": self.generator.get_state() if self.pass_state is None else None}

    def restore(self, state: dict) -> None:
        if state["pass"] is None:
            self.generator.set_state(state["generator"])
            return
        self.generator.set_state(state["pass"])  # then the pass's offset is drawn again, as it was
        self.offset = int(torch.randint(0, len(self.split), (1,), generator=self.generator))
        self.pass_state, self.drawn = state["pass"], state["drawn"]


class BatchPrefetcher:
    """Training batches drawn from a sampler (RandomWindows or Streams) in a background thread, `depth` ahead of
    the step that uses them, into pinned memory on CUDA (so the copy to the device is asynchronous), handed over in
    order. `state` is the sampler's state after the last batch handed over, which is what a checkpoint must save
    for an exact resume (the batches drawn ahead are drawn again after it)."""

    def __init__(self, sampler: RandomWindows | Streams, device: torch.device, depth: int = 2):
        self.state = sampler.state()
        self.device, self.sampler = device, sampler
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._work, name="charlm-batches", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        pin = self.device.type == "cuda"
        try:
            while not self._closed.is_set():
                x, y, restart = self.sampler.draw()
                item = (x.pin_memory(), y.pin_memory()) if pin else (x, y)
                self._put((*item, restart, self.sampler.state()))
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, raised there
            self._put(e)

    def _put(self, item) -> None:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The next batch (x, y) on the device, and whether the streams restart with it."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        x, y, restart, self.state = item
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), restart

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)


if __name__ == "__main__":
    from train.datastats import main
    sys.exit(main())
