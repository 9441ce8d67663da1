"""Evaluation of a checkpoint: bits per byte over every byte of a split.

    python -m train.evaluate --ckpt runs/a/ckpt.pt [--data.source=...] [--split val|test|all|file] [--file PATH]
                             [--max_bytes N] [--mode strided|cached|dynamic|memory] [--stride N] [--batch_size N]
                             [--streams N] [--chunk N] [--mem_len N] [--dyn_lr X] [--dyn_decay X] [--dyn_segment N]
                             [--device auto|cpu|cuda]

Protocol `strided`: the split's bytes [a, b) are cut into chunks of `stride` targets. Chunk [c0, c1) is scored by
one window of the byte stream ending at c1 and at most block_size + 1 bytes long (block_size inputs); only its
last c1 - c0 predictions count. So every byte of the split is scored exactly once, each with the longest context
its window gives (at least block_size - stride + 1 bytes once past the start of the file; stride = block_size:
non-overlapping windows, which give the average byte only half a context and read worse). The default stride is
block_size / 4 (`default_stride`). Context may reach into the bytes that precede the split in the file; byte 0 of
the file, which has no context, is never a target. Every bpc is reported with its protocol's name.

Protocol `cached` (see evaluate_cached): streaming with a rolling KV cache; a different function, reported under
its own name. Protocol `memory` (evaluate_memory): segments with a Transformer-XL memory. Protocol `dynamic`
(train/dynamic.py): the strided protocol with stride = segment, the model learning from each segment after scoring
it. The last line of stdout is JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.kv_cache import KVCache
from model.memory import SegmentMemory
from train.config import ConfigError, DataConfig
from train.logger import progress_bar


DYN_LR, DYN_DECAY = 1e-5, 0.0  # dynamic evaluation's defaults (README, "Evaluation protocols")


def default_stride(block_size: int) -> int:
    """A quarter of the context: every byte then has at least 3/4 of block_size bytes of context, which measured
    within 0.001 bpc of stride 1 (cpu preset, block 128: stride 32 2.0742, stride 8 2.0747, stride 1 2.0750, while
    non-overlapping windows, stride 128, read 2.1341), at a quarter of the cost of stride block_size / 16."""
    return max(1, block_size // 4)


def strided_protocol(stride: int, block_size: int) -> str:
    """The name reported next to every strided bpc."""
    return f"strided, stride {stride} of block {block_size}"


def plan_windows(a: int, b: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(w0, w1, c0) per window: bytes [w0, w1) of the file, targets c0..w1-1 scored."""
    if not 1 <= stride <= block_size:
        raise ConfigError(f"stride must be in [1, block_size={block_size}] (got {stride})")
    plan = []
    for c0 in range(max(a, 1), b, stride):
        c1 = min(c0 + stride, b)
        plan.append((max(0, c1 - block_size - 1), c1, c0))
    return plan


@torch.no_grad()
def evaluate_bytes(model, data: np.ndarray, a: int, b: int, block_size: int, stride: int, batch_size: int = 16,
                   device: str = "cpu", autocast=nullcontext, progress: bool = True,
                   shard: tuple[int, int] = (0, 1)) -> dict:
    """Sum of next-byte NLL (nats) over targets [a, b) of `data` with the strided protocol. Batches of equal-length
    windows are dealt round-robin to the ranks (shard = (rank, world)) and the sums all-reduced; every rank runs
    the same number of forward passes (a rank short of batches repeats one and scores nothing), as FSDP needs."""
    was_training = model.training
    model.eval()
    by_length: dict[int, list] = {}
    for w in plan_windows(a, b, block_size, stride):
        by_length.setdefault(w[1] - w[0], []).append(w)
    batches = [ws[i:i + batch_size] for ws in by_length.values() for i in range(0, len(ws), batch_size)]
    rank, world = shard
    mine = batches[rank::world]
    rounds = -(-len(batches) // world)
    nll, count = torch.zeros((), dtype=torch.float64, device=device), 0
    bar = progress_bar(total=rounds, desc="eval", unit="batch", disable=not progress, leave=False)
    for j in range(rounds):
        group = mine[j] if j < len(mine) else batches[0]
        length = group[0][1] - group[0][0]
        rows = torch.from_numpy(np.stack([data[w0:w1] for w0, w1, _ in group]).astype(np.int64)).to(device)
        with autocast():
            logits = model(rows[:, :-1])
        if j < len(mine):
            losses = F.cross_entropy(logits.float().transpose(1, 2), rows[:, 1:], reduction="none")  # (B, L-1)
            n_scored = torch.tensor([w1 - c0 for _, w1, c0 in group], device=device)
            keep = torch.arange(length - 1, device=device)[None, :] >= (length - 1 - n_scored)[:, None]
            nll += (losses.double() * keep).sum()
            count += int(n_scored.sum())
        bar.update(1)
    bar.close()
    model.train(was_training)
    if world > 1:
        total = torch.stack([nll, torch.tensor(float(count), dtype=torch.float64, device=device)])
        dist.all_reduce(total)
        nll, count = total[0], int(total[1].item())
    nll = float(nll)
    return {"bpc": nll / max(count, 1) / math.log(2), "bytes": count, "nll_nats": nll,
            "protocol": strided_protocol(stride, block_size)}


def stream_layout(data: np.ndarray, a: int, b: int, streams: int, warm_max: int, device):
    """The targets [a, b) cut into `streams` contiguous parts side by side, each first reading the (up to)
    warm_max bytes before it, unscored: (inputs, targets, scored) as (streams, width) device tensors, streams."""
    first = max(a, 1)
    streams = max(1, min(streams, b - first))
    per = -(-(b - first) // streams)
    warm = min(warm_max, first - 1)
    width = warm + per
    inputs, targets = np.zeros((streams, width), dtype=np.int64), np.zeros((streams, width), dtype=np.int64)
    scored = np.zeros((streams, width), dtype=bool)
    for j in range(streams):
        t0, t1 = first + j * per, min(first + (j + 1) * per, b)  # this stream's targets
        if t0 >= t1:
            continue
        lo = t0 - 1 - warm  # first input byte
        inputs[j, : t1 - 1 - lo] = data[lo: t1 - 1]
        targets[j, : t1 - 1 - lo] = data[lo + 1: t1]
        scored[j, warm: warm + t1 - t0] = True
    return (*(torch.from_numpy(t).to(device) for t in (inputs, targets, scored)), streams)


def score_streams(model, inputs, targets, scored, chunk: int, autocast, progress: bool, desc: str, **state) -> dict:
    """bpc, bytes and summed NLL of the scored positions, `chunk` positions per forward pass, the model carrying
    `state` (a KV cache or a memory) from pass to pass."""
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=inputs.device)
    bar = progress_bar(total=inputs.shape[1], desc=desc, unit="pos", disable=not progress, leave=False)
    for c0 in range(0, inputs.shape[1], chunk):
        with autocast():
            logits = model(inputs[:, c0:c0 + chunk], **state)
        losses = F.cross_entropy(logits.float().transpose(1, 2), targets[:, c0:c0 + chunk], reduction="none")
        nll += (losses.double() * scored[:, c0:c0 + chunk]).sum()
        bar.update(logits.shape[1])
    bar.close()
    model.train(was_training)
    count = int(scored.sum())
    return {"bpc": float(nll) / max(count, 1) / math.log(2), "bytes": count, "nll_nats": float(nll)}


@torch.no_grad()
def evaluate_cached(model, data: np.ndarray, a: int, b: int, streams: int = 16, chunk: int = 0, device: str = "cpu",
                    autocast=nullcontext, progress: bool = True, cache_dtype: torch.dtype | None = None) -> dict:
    """Protocol `cached`: stream the targets [a, b) through the model with a KV cache of the last block_size
    positions per layer, each query attending over a sliding window of block_size positions (itself included;
    model.attn_pattern=local: attn_window positions, and the cache keeps only those).
    Its receptive field grows with depth (layer l sees l * (block_size - 1) bytes back), so it is not the
    function `strided` computes. The bytes are cut into `streams` contiguous parts run side by side; each part
    first reads the (up to) block_size - 1 bytes before it, unscored. Needs relative positions (RoPE or
    Transformer-XL's)."""
    cfg = model.cfg
    if cfg.absolute_positions:
        raise ConfigError(f"--mode cached needs relative positions (model.pos_emb=rope or xl_relative); this model "
                          f"uses pos_emb={cfg.pos_emb}, whose absolute positions end at block_size: use --mode strided")
    if cfg.hourglass:
        raise ConfigError("--mode cached needs a KV cache, which model.hourglass does not have: use --mode strided")
    block = cfg.block_size
    chunk = min(chunk or block, block)
    inputs, targets, scored, streams = stream_layout(data, a, b, streams, block - 1, device)
    cache = KVCache(cfg, streams, block, chunk, device, dtype=cache_dtype or next(model.parameters()).dtype)
    result = score_streams(model, inputs, targets, scored, chunk, autocast, progress, "cached eval", cache=cache)
    return result | {"streams": streams, "chunk": chunk, "window": cache.window,
                     "cache_bytes_per_token": cache.bytes_per_token, "cache_bytes_per_stream": cache.bytes_per_stream,
                     "protocol": f"cached, window {cache.window}, {streams} streams, chunk {chunk}"}


@torch.no_grad()
def evaluate_memory(model, data: np.ndarray, a: int, b: int, mem_len: int, streams: int = 16, segment: int = 0,
                    device: str = "cpu", autocast=nullcontext, progress: bool = True) -> dict:
    """Protocol `memory`: the targets [a, b) cut into `streams` contiguous parts run side by side, each read
    segment after segment (`segment` bytes, default block_size) with a Transformer-XL memory of `mem_len`
    positions per layer (model/memory.py), which may exceed the training memory. Each part first reads the (up to)
    mem_len bytes before it, unscored, to fill its memory. Needs relative positions (RoPE or
    Transformer-XL's)."""
    cfg = model.cfg
    if cfg.absolute_positions:
        raise ConfigError(f"--mode memory needs relative positions (model.pos_emb=rope or xl_relative); this model "
                          f"uses pos_emb={cfg.pos_emb}: use --mode strided")
    if mem_len < 1:
        raise ConfigError("--mode memory needs a memory: --mem_len N (the model was trained without one)")
    segment = min(segment or cfg.block_size, cfg.block_size)
    if cfg.cmem_len and (segment % cfg.cmem_ratio or mem_len % cfg.cmem_ratio):
        raise ConfigError(f"a compressive memory compresses {cfg.cmem_ratio} positions at a time: --chunk "
                          f"({segment}) and --mem_len ({mem_len}) must be multiples of {cfg.cmem_ratio}")
    problems = dataclasses.replace(cfg, mem_len=mem_len).errors()  # layers that would ignore or misuse a memory
    if problems:
        raise ConfigError(f"--mode memory cannot run this model with a memory ({problems[0]}): use --mode strided")
    inputs, targets, scored, streams = stream_layout(data, a, b, streams, mem_len, device)
    memory = SegmentMemory(cfg, streams, device, mem_len=mem_len)
    result = score_streams(model, inputs, targets, scored, segment, autocast, progress, "memory eval", memory=memory)
    return result | {"streams": streams, "segment": segment, "mem_len": mem_len,
                     "protocol": f"memory, mem_len {mem_len}, segment {segment}, {streams} streams"}


def whole_file(path: str):
    """A corpus whose one split, `file`, is every byte of the file at path (byte 0, without context, excepted)."""
    from train.data import Corpus, sha256_file
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"--file {file}: no such file")
    n = file.stat().st_size
    if n < 2:
        raise ConfigError(f"--file {file} has {n} byte(s): nothing to score (byte 0 has no context)")
    data = np.memmap(file, dtype=np.uint8, mode="r")
    return Corpus(file.name, file, data, {"file": (0, n)}, sha256_file(file))


# the modes that read each mode-specific option: one given to another mode is refused, not silently dropped
MODE_OPTIONS = {"stride": ("strided",), "batch_size": ("strided",), "streams": ("cached", "memory"),
                "chunk": ("cached", "memory"), "mem_len": ("memory",), "dyn_lr": ("dynamic",),
                "dyn_decay": ("dynamic",), "dyn_segment": ("dynamic",), "dyn_stat_batches": ("dynamic",)}


def main(argv: list[str] | None = None) -> int:
    from train.checkpoint import model_from_checkpoint
    from train.data import load_corpus

    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint written by python -m train")
    p.add_argument("--data.source", dest="source", help="corpus (default: the checkpoint's)")
    p.add_argument("--data.data_dir", dest="data_dir", help="data folder (default: the checkpoint's)")
    p.add_argument("--split", default="test", choices=["val", "test", "all", "file"],
                   help="all = val and test; file = every byte of --file (byte 0 excepted)")
    p.add_argument("--file", help="--split file: a file of held-out text, read as raw bytes")
    p.add_argument("--mode", default="strided", choices=["strided", "cached", "dynamic", "memory"],
                   help="strided: exact windows (the reference); cached: KV-cache streaming (RoPE models); "
                        "dynamic: learns from each segment after scoring it (train/dynamic.py); memory: "
                        "segments with a Transformer-XL memory (RoPE models)")
    p.add_argument("--mem_len", type=int, default=0,
                   help="memory: positions of memory per layer (default: the model's model.mem_len)")
    p.add_argument("--stride", type=int, default=0,
                   help="strided: bytes scored per window (default: block_size / 4, within ~0.001 bpc of stride 1)")
    p.add_argument("--streams", type=int, default=16, help="cached: parts of the split run side by side")
    p.add_argument("--chunk", type=int, default=0, help="cached: positions per forward pass (default: block_size)")
    p.add_argument("--dyn_lr", type=float, default=DYN_LR, help="dynamic: step size of the RMS-normalised update")
    p.add_argument("--dyn_decay", type=float, default=DYN_DECAY, help="dynamic: pull back to the trained weights")
    p.add_argument("--dyn_segment", type=int, default=0, help="dynamic: bytes per update (default: block_size / 4)")
    p.add_argument("--dyn_stat_batches", type=int, default=20,
                   help="dynamic: training batches for the gradient statistics")
    p.add_argument("--max_bytes", type=int, default=0, help="score only the first N bytes of each split")
    p.add_argument("--batch_size", type=int, default=16, help="windows per forward pass")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    try:
        unused = [f"--{name} (--mode {' / '.join(modes)})" for name, modes in MODE_OPTIONS.items()
                  if args.mode not in modes and getattr(args, name) != p.get_default(name)]
        if unused:
            raise ConfigError(f"--mode {args.mode} does not use {', '.join(unused)}")
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        model, cfg, ckpt = model_from_checkpoint(args.ckpt, device)
        data_cfg = DataConfig(**{**vars(cfg.data), **{k: v for k, v in (("source", args.source),
                                                                        ("data_dir", args.data_dir)) if v}})
        if (args.split == "file") != (args.file is not None):
            raise ConfigError("--split file and --file PATH go together")
        block = cfg.model.block_size
        corpus = load_corpus(data_cfg) if args.file is None else whole_file(args.file)
        stride = args.stride or default_stride(block)
        segment = args.dyn_segment or default_stride(block)
        if args.max_bytes < 0 or args.batch_size < 1 or args.streams < 1 or args.chunk < 0 or args.mem_len < 0:
            raise ConfigError("--max_bytes, --chunk and --mem_len must be >= 0, --batch_size and --streams >= 1")
        splits = {"all": ["val", "test"], "file": ["file"]}.get(args.split, [args.split])
        autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if (
            device == "cuda" and cfg.train.precision == "bf16") else nullcontext
        t0, results = time.time(), {}
        if args.mode == "dynamic":
            from train.dynamic import evaluate_dynamic, gradient_rms
            if args.dyn_stat_batches < 1 or args.dyn_segment < 0 or args.dyn_segment > block:
                raise ConfigError(f"--dyn_stat_batches must be >= 1 and --dyn_segment in [0, {block}]")
            # statistics from the checkpoint's training data (the corpus already loaded, unless --file replaced it)
            train_split = (corpus if args.file is None else load_corpus(data_cfg)).split("train")
            rms = gradient_rms(model, train_split, block, cfg.train.batch_size, args.dyn_stat_batches, device,
                               autocast, seed=cfg.train.seed)
        for name in splits:
            a, b = corpus.bounds[name]
            if args.max_bytes:
                b = min(b, a + args.max_bytes)
            if args.mode == "dynamic":
                results[name] = evaluate_dynamic(model, corpus.data, a, b, segment, args.dyn_lr, args.dyn_decay, rms,
                                                 device, autocast)
            elif args.mode == "memory":
                results[name] = evaluate_memory(model, corpus.data, a, b, args.mem_len or cfg.model.mem_len,
                                                args.streams, args.chunk, device, autocast)
            elif args.mode == "cached":
                results[name] = evaluate_cached(model, corpus.data, a, b, args.streams, args.chunk, device, autocast,
                                                cache_dtype=torch.bfloat16 if autocast is not nullcontext else None)
            else:
                results[name] = evaluate_bytes(model, corpus.data, a, b, block, stride, args.batch_size, device,
                                               autocast)
            print(f"{name}: {results[name]['bpc']:.4f} bpc over {results[name]['bytes']:,} bytes "
                  f"({results[name]['protocol']})", file=sys.stderr)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    nll, n = sum(r["nll_nats"] for r in results.values()), sum(r["bytes"] for r in results.values())
    first = results[splits[0]]
    if args.mode == "strided":
        protocol = {"protocol": "strided", "stride": stride}
    elif args.mode == "cached":
        protocol = {"protocol": "cached", "window": first["window"], "streams": first["streams"],
                    "chunk": first["chunk"], "cache_bytes_per_token": first["cache_bytes_per_token"],
                    "cache_bytes_per_stream": first["cache_bytes_per_stream"]}
    elif args.mode == "memory":
        protocol = {"protocol": "memory", "mem_len": first["mem_len"], "segment": first["segment"],
                    "streams": first["streams"]}
    else:
        protocol = {"protocol": "dynamic", "segment": segment, "lr": args.dyn_lr, "decay": args.dyn_decay,
                    "stat_batches": args.dyn_stat_batches}
    protocol["protocol_name"] = first["protocol"]
    out = {"bpc": nll / n / math.log(2), "bytes": n, **protocol, "block_size": block, "split": args.split,
           "seconds": round(time.time() - t0, 3), "splits": results,
           "checkpoint": str(args.ckpt), "step": ckpt.get("step"), "dataset": corpus.identity}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
