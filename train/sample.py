"""Generate bytes from a checkpoint.

    python -m train.sample --ckpt runs/a/ckpt.pt [--prompt TEXT] [--tokens N] [--temperature T] [--top_k K]
                           [--seed S] [--no_cache] [--device auto|cpu|cuda]

Context policy (the same with and without the KV cache, so both give the same bytes): the model sees the bytes
from a window start s to the current position; once that window holds block_size bytes, s moves up so that the
last block_size // 2 bytes are kept. With the cache (the default) a byte costs one incremental pass and a window
move one pass over the kept bytes; without it every byte recomputes its whole window. Invalid UTF-8 is shown
with replacement characters; the bytes themselves are kept exact.

A model trained with a Transformer-XL memory (model.mem_len > 0) samples with the memory as its cache: every byte,
prompt bytes included, is one pass that sees the last mem_len + block_size - 1 bytes (a sliding window that the
memory carries), the longest context a training query had. A compressive model (model.cmem_len > 0), which
compresses cmem_ratio positions at a time, samples with the KV cache instead.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from model.kv_cache import KVCache
from model.memory import SegmentMemory
from train.config import ConfigError
from train.logger import progress_bar


@torch.no_grad()
def generate(model, prompt: bytes, n_tokens: int, temperature: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None, use_cache: bool = True, progress: bool = False) -> bytes:
    """Append n_tokens sampled bytes to prompt (temperature 0 = greedy)."""
    device = next(model.parameters()).device
    block = model.cfg.block_size
    keep = max(1, block // 2)
    seq = list(prompt) or [ord("\n")]
    use_cache = use_cache and not model.cfg.hourglass  # no KV cache for an hourglass: windows are recomputed
    if use_cache and model.cfg.mem_len and not model.cfg.cmem_len:
        return generate_with_memory(model, seq, n_tokens, temperature, top_k, generator, progress)
    cache = KVCache(model.cfg, 1, block, block, device) if use_cache else None
    start = 0  # the window: the model sees seq[start:]
    cached_from, fed = 0, 0  # the cache holds seq[cached_from:fed]
    for _ in progress_bar(iterable=range(n_tokens), desc="sampling", unit="B", disable=not progress):
        if len(seq) - start >= block:
            start = len(seq) - keep
        if cache is None:
            logits = model(torch.tensor([seq[start:]], device=device))[0, -1]
        else:
            if cached_from != start:  # the window moved: refill the cache with the kept bytes
                cache.reset()
                cached_from = fed = start
            logits = model(torch.tensor([seq[fed:]], device=device), cache=cache)[0, -1]
            fed = len(seq)
        seq.append(pick(logits, temperature, top_k, generator))
    return bytes(seq[-n_tokens:]) if n_tokens else b""


def pick(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> int:
    """The next byte from the t+1 logits (V,): greedy at temperature 0, else sampled (among the top k)."""
    logits = logits.float()
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=generator))


def generate_with_memory(model, seq: list[int], n_tokens: int, temperature: float, top_k: int,
                         generator: torch.Generator | None, progress: bool) -> bytes:
    """One pass per byte through a memory of mem_len + block_size - 1 positions."""
    device = next(model.parameters()).device
    memory = SegmentMemory(model.cfg, 1, device, mem_len=model.cfg.mem_len + model.cfg.block_size - 1)
    for byte in seq[:-1]:
        model(torch.tensor([[byte]], device=device), memory=memory)
    for _ in progress_bar(iterable=range(n_tokens), desc="sampling", unit="B", disable=not progress):
        logits = model(torch.tensor([[seq[-1]]], device=device), memory=memory)[0, -1]
        seq.append(pick(logits, temperature, top_k, generator))
    return bytes(seq[-n_tokens:]) if n_tokens else b""


def main(argv: list[str] | None = None) -> int:
    from train.checkpoint import model_from_checkpoint

    p = argparse.ArgumentParser(prog="python -m train.sample", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--prompt", default="", help="text to continue (UTF-8)")
    p.add_argument("--tokens", type=int, default=500, help="bytes to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k most likely bytes; 0 = all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_cache", action="store_true", help="recompute the whole window for every byte")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    try:
        if args.tokens < 0 or args.temperature < 0 or args.top_k < 0:
            raise ConfigError("--tokens, --temperature and --top_k must be >= 0")
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        model, _, _ = model_from_checkpoint(args.ckpt, device)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompt = args.prompt.encode("utf-8")
    t0 = time.time()
    out = generate(model, prompt, args.tokens, args.temperature, args.top_k,
                   torch.Generator().manual_seed(args.seed), use_cache=not args.no_cache,
                   progress=sys.stderr.isatty())
    dt = time.time() - t0
    sys.stdout.write((prompt + out).decode("utf-8", errors="replace") + "\n")
    uses_memory = model.cfg.mem_len and not model.cfg.cmem_len
    print(f"[{args.tokens} bytes in {dt:.2f} s: {args.tokens / max(dt, 1e-9):.1f} bytes/s, "
          f"{'no cache' if args.no_cache or model.cfg.hourglass else 'memory' if uses_memory else 'KV cache'}]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
