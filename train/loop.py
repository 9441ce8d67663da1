"""The training loop: build everything from a Config, train until the step or time budget is spent, evaluate,
checkpoint, log. Single process, or one process per rank under torchrun (DistributedDataParallel)."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from model import GPT, head_weights
from train.checkpoint import check_same_architecture, git_sha, load_checkpoint, load_model_state, save_checkpoint
from train.config import Args, ConfigError, from_dict, set_value, to_dict, uses_cuda
from train.data import Corpus, load_corpus, random_batch
from train.evaluate import evaluate_bytes
from train.optim import build_optimizer, lr_at, sampling

LN2 = math.log(2)


class Distributed:
    """rank/world from torchrun's environment; one process is world 1."""

    def __init__(self, cuda: bool):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group("nccl" if cuda else "gloo")
        self.main = self.rank == 0

    def sum(self, values: list[float], device) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def from_main(self, value: float, device) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.broadcast(t, 0)
        return float(t.item())

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def prepare_out_dir(args: Args, main: bool) -> tuple[Path, dict | None]:
    """Resolve the run folder; with --resume load its checkpoint and adopt its config (plus CLI overrides).
    The main rank refuses a folder that holds another run unless --resume or --overwrite (other ranks write
    nothing there and skip the check, which could otherwise see the main rank's fresh files)."""
    cfg = args.cfg
    if not cfg.out_dir:
        cfg.out_dir = f"runs/{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(cfg.out_dir)
    if args.resume:
        ckpt = load_checkpoint(out / "ckpt.pt")
        saved, resumed = from_dict(ckpt["config"]), from_dict(ckpt["config"])
        for key, value in args.overrides.items():
            set_value(resumed, key, value)
        check_same_architecture(saved, resumed, out / "ckpt.pt")
        problems = resumed.errors()
        if problems:
            raise ConfigError(problems[0])
        resumed.out_dir = str(out)
        args.cfg = resumed
        return out, ckpt
    if main and ((out / "metrics.jsonl").exists() or (out / "ckpt.pt").exists()):
        if not args.overwrite:
            raise ConfigError(f"{out} holds another run; pass --resume to continue it or --overwrite to replace it")
        for name in ("metrics.jsonl", "ckpt.pt", "config.json"):
            (out / name).unlink(missing_ok=True)
    return out, None


@torch.no_grad()
def running_val_bpc(model: GPT, corpus: Corpus, cfg, dd: Distributed, device, autocast) -> float:
    """Mean next-byte loss (bits) on eval_batches random validation batches; the same batches every time."""
    t, block = cfg.train, cfg.model.block_size
    gen = torch.Generator().manual_seed(t.seed + 1)
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(t.eval_batches):
        x, y = random_batch(corpus.split("val"), t.batch_size, block, gen, (dd.rank, dd.world))
        with autocast():
            loss, _ = model(x.to(device), y.to(device))
        total += float(loss)
    model.train(was_training)
    return dd.sum([total], device)[0] / (t.eval_batches * dd.world) / LN2


def train(args: Args) -> dict:
    """Run training as configured; returns the final summary (also the last line of metrics.jsonl)."""
    out, ckpt = prepare_out_dir(args, main=int(os.environ.get("RANK", "0")) == 0)
    cfg = args.cfg
    t, m = cfg.train, cfg.model
    cuda = uses_cuda(t)
    dd = Distributed(cuda)
    if t.batch_size % dd.world:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by the {dd.world} ranks")
    device = torch.device(f"cuda:{dd.local_rank}" if cuda else "cpu")
    corpus = load_corpus(cfg.data, min_split_bytes=m.block_size + 1)

    torch.manual_seed(t.seed)
    raw = GPT(m).to(device)
    optimizer = build_optimizer(raw, t, len(corpus.split("train")))
    data_gen = torch.Generator().manual_seed(t.seed)
    step, train_time = 0, 0.0
    if ckpt is not None:
        load_model_state(raw, ckpt["model"], out / "ckpt.pt")
        optimizer.load_state_dict(ckpt["optimizer"])
        step, train_time = ckpt["step"], ckpt["train_time"]
        data_gen.set_state(ckpt["rng"]["data"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if cuda and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    else:
        torch.manual_seed(t.seed + dd.rank)  # dropout streams differ across ranks
    model = torch.compile(raw) if t.compile else raw
    if dd.world > 1:
        model = DDP(model, device_ids=[dd.local_rank] if cuda else None,
                    find_unused_parameters=m.n_intermediate > 0)  # intermediate heads drop out mid-run
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if t.precision == "bf16" else nullcontext

    n_params = raw.num_params()
    meta = {"n_params": n_params, "dataset": corpus.identity, "git_sha": git_sha()}
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    log = open(out / "metrics.jsonl", "a") if dd.main else None

    def write(record: dict) -> None:
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()

    write({"event": "resume" if ckpt else "start", "step": step, **meta, "config": to_dict(cfg),
           "preset": args.preset, "world_size": dd.world, "device": str(device), "time": time.time()})

    def progress() -> float:
        p = [step / t.max_steps if t.max_steps else 0.0, train_time / t.max_time if t.max_time else 0.0]
        return min(1.0, max(p))

    def checkpoint(extra: dict) -> None:
        if not dd.main:
            return
        rng = {"torch": torch.get_rng_state(), "data": data_gen.get_state()}
        if cuda:
            rng["cuda"] = torch.cuda.get_rng_state(device)
        save_checkpoint(out / "ckpt.pt", {"model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                                          "step": step, "train_time": train_time, "rng": rng,
                                          "config": to_dict(cfg), **meta, **extra})

    def full_val() -> float:
        a, b = corpus.bounds["val"]
        r = evaluate_bytes(raw, corpus.data, a, b, m.block_size, m.block_size, t.batch_size, device, autocast,
                           progress=dd.main, shard=(dd.rank, dd.world))
        return r["bpc"]

    bar = tqdm(total=100, disable=not dd.main, file=sys.stderr, mininterval=1.0,
               bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}{postfix}]")
    tokens_per_step = t.batch_size * t.grad_accum * m.block_size
    loss_sum, steps_since, time_since = torch.zeros((), device=device), 0, 0.0
    last = {}
    raw.train()
    while not ((t.max_steps and step >= t.max_steps) or (t.max_time and train_time >= t.max_time)):
        t0 = time.perf_counter()
        p = progress()
        weights = head_weights(m, p)
        hw = torch.tensor(weights, device=device)
        main_head = len(weights) - m.n_targets
        lr = lr_at(t, step, p)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        with sampling(optimizer):
            for micro in range(t.grad_accum):
                x, y = random_batch(corpus.split("train"), t.batch_size, m.block_size, data_gen, (dd.rank, dd.world))
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync = model.no_sync() if dd.world > 1 and micro < t.grad_accum - 1 else nullcontext()
                with sync, autocast():
                    loss, per_head = model(x, y, hw)
                (loss / t.grad_accum).backward()
                loss_sum += per_head[main_head] / t.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), t.grad_clip) if t.grad_clip else None
        optimizer.step()
        step += 1
        steps_since += 1
        dt = time.perf_counter() - t0
        train_time = dd.from_main(train_time + dt, device) if t.max_time else train_time + dt
        time_since += dt

        record = {}
        if step % t.log_interval == 0 or step == t.max_steps:
            total, tsum = dd.sum([float(loss_sum), time_since], device)
            record = {"step": step, "train_loss": total / (steps_since * dd.world), "lr": lr,
                      "tokens_per_s": tokens_per_step * steps_since / max(tsum / dd.world, 1e-9),
                      "train_time_s": round(train_time, 3), "progress": round(progress(), 5)}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            loss_sum.zero_()
            steps_since, time_since = 0, 0.0
        if t.eval_interval and step % t.eval_interval == 0:
            record.update(step=step, val_bpc=running_val_bpc(raw, corpus, cfg, dd, device, autocast))
        if t.full_eval_interval and step % t.full_eval_interval == 0:
            record.update(step=step, full_val_bpc=full_val())
        if record:
            write(record)
            last.update(record)
            bar.set_postfix_str(", ".join(f"{k} {last[k]:.4g}" for k in ("step", "train_loss", "val_bpc") if k in last),
                                refresh=False)
        if t.ckpt_interval and step % t.ckpt_interval == 0:
            checkpoint({})
        bar.n = round(100 * progress(), 1)
        bar.refresh()
    bar.close()

    final = {"event": "end", "step": step, "train_time_s": round(train_time, 3), "full_val_bpc": full_val(),
             "train_loss": last.get("train_loss"), "val_bpc": last.get("val_bpc"), "n_params": n_params,
             "tokens_per_s": last.get("tokens_per_s")}
    checkpoint({"full_val_bpc": final["full_val_bpc"]})
    write(final)
    if log:
        log.close()
        print(summary(out, final, corpus.identity), flush=True)
    dd.close()
    return final


def summary(out: Path, final: dict, dataset: dict) -> str:
    ckpt = out / "ckpt.pt"
    warning = "" if dataset["name"] == "enwik8" else f"  (data: {dataset['name']}, not enwik8: not comparable)"
    return "\n".join([
        f"done: {final['step']} steps in {final['train_time_s']:.0f} s of training; "
        f"validation {final['full_val_bpc']:.4f} bpc over the whole split{warning}",
        f"run folder: {out}  (config.json, metrics.jsonl, ckpt.pt)",
        "next:",
        f"  evaluate: python -m train.evaluate --ckpt {ckpt} --split test",
        f"  sample:   python -m train.sample --ckpt {ckpt} --prompt 'The ' --tokens 300",
    ])
