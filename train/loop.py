"""The training loop: build everything from a Config, train until the step or time budget is spent (or a signal
arrives), evaluate, checkpoint, log. One process, or one per rank under torchrun (DDP or FSDP2).

Resuming restores the model, optimiser, step, training clock, data sampler, every RNG and the logging
accumulators, so a resumed CPU fp32 run logs the same losses, bit for bit, as one never interrupted.
"""
from __future__ import annotations

import gc
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from model import GPT, head_weights
from train.checkpoint import check_same_architecture, git_sha, load_checkpoint, save_checkpoint
from train.config import Args, ConfigError, from_dict, set_value, to_dict, uses_cuda
from train.data import load_corpus, random_batch
from train.distributed import Distributed, full_state, load_full_state, no_grad_sync, shard, wrap
from train.evaluate import default_stride, evaluate_bytes
from train.guard import StopOnSignal, TrainingError, check_finite
from train.logger import MetricsLog
from train.optim import build_optimizer, lr_at, sampling

LN2 = math.log(2)
RUNNING_PROTOCOL = "random windows, all positions"  # the running val_bpc: eval_batches random batches


def prepare_out_dir(args: Args, main: bool) -> tuple[Path, dict | None]:
    """Resolve the run folder; with --resume load its checkpoint and adopt its config (plus CLI overrides).
    The main rank refuses a folder that holds another run unless --resume or --overwrite (other ranks write
    nothing there and skip the check, which could otherwise see the main rank's fresh files). Writes nothing."""
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
        if resumed.train.optimizer != saved.train.optimizer:
            raise ConfigError(f"checkpoint {out / 'ckpt.pt'} holds {saved.train.optimizer} state; it cannot resume "
                              f"with train.optimizer={resumed.train.optimizer}")
        problems = resumed.errors()
        if problems:
            raise ConfigError(problems[0])
        resumed.out_dir = str(out)
        args.cfg = resumed
        return out, ckpt
    problems = cfg.errors()
    if problems:
        raise ConfigError(problems[0])
    if main and ((out / "metrics.jsonl").exists() or (out / "ckpt.pt").exists()):
        if not args.overwrite:
            raise ConfigError(f"{out} holds another run; pass --resume to continue it or --overwrite to replace it")
        for name in ("metrics.jsonl", "ckpt.pt", "config.json"):
            (out / name).unlink(missing_ok=True)
    return out, None


class Run:
    """One training run: its parts, its state, and the steps of its loop."""

    def __init__(self, args: Args):
        main = int(os.environ.get("RANK", "0")) == 0
        self.out, ckpt = prepare_out_dir(args, main)
        self.cfg, self.preset = args.cfg, args.preset
        t, m = self.cfg.train, self.cfg.model
        self.dd = dd = Distributed(uses_cuda(t))
        if t.batch_size % dd.world:
            raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by the {dd.world} ranks")
        self.device = dd.device
        self.corpus = load_corpus(self.cfg.data, min_split_bytes=m.block_size + 1)

        torch.manual_seed(t.seed)
        self.raw = GPT(m).to(self.device)
        self.n_params = self.raw.num_params()
        shard(self.raw, t)
        self.model = wrap(self.raw, t, dd, find_unused=m.n_intermediate > 0)  # intermediate heads stop mid-run
        self.optimizer = build_optimizer(self.raw, t, len(self.corpus.split("train")))
        self.data_gen = torch.Generator().manual_seed(t.seed)
        self.step, self.train_time, self.skipped = 0, 0.0, 0
        self.loss_sum, self.steps_since, self.time_since = torch.zeros((), device=self.device), 0, 0.0
        torch.manual_seed(t.seed + dd.rank)  # dropout streams differ across ranks
        if ckpt is not None:
            self.restore(ckpt)
        self.autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if t.precision == "bf16" else nullcontext
        self.meta = {"n_params": self.n_params, "dataset": self.corpus.identity, "git_sha": git_sha()}
        self.config = to_dict(self.cfg)  # as plain data, for config.json, the logs and every checkpoint
        if dd.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        self.log = MetricsLog(self.out, self.cfg.log, dd.main, self.config,
                              resume_step=self.step if ckpt is not None else None)
        self.log.write({"event": "resume" if ckpt else "start", "step": self.step, **self.meta,
                        "config": self.config, "preset": self.preset, "world_size": dd.world,
                        "device": str(self.device), "time": time.time()})

    # ------------------------------------------------------------------------------------------ state
    def restore(self, ckpt: dict) -> None:
        try:
            load_full_state(self.raw, self.optimizer, ckpt["model"], ckpt["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise ConfigError(f"checkpoint {self.out / 'ckpt.pt'} does not fit this model or optimiser: "
                              f"{str(e).strip().splitlines()[0]}"[:300]) from None
        self.step, self.train_time, self.skipped = ckpt["step"], ckpt["train_time"], ckpt.get("skipped", 0)
        acc = ckpt["log_acc"]
        self.loss_sum.fill_(acc["loss_sum"])
        self.steps_since, self.time_since = acc["steps"], acc["time"]
        self.data_gen.set_state(ckpt["rng"]["data"])
        if self.dd.main:  # other ranks keep their own dropout streams
            torch.set_rng_state(ckpt["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)

    def checkpoint(self, **extra) -> None:
        model_state, optim_state = full_state(self.raw, self.optimizer)  # a collective under FSDP
        if not self.dd.main:
            return
        rng = {"torch": torch.get_rng_state(), "data": self.data_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        save_checkpoint(self.out / "ckpt.pt", {
            "model": model_state, "optimizer": optim_state, "step": self.step, "train_time": self.train_time,
            "skipped": self.skipped, "rng": rng, "config": self.config, "world_size": self.dd.world,
            "log_acc": {"loss_sum": float(self.loss_sum), "steps": self.steps_since, "time": self.time_since},
            **self.meta, **extra})

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def running_val_bpc(self) -> float:
        """Mean next-byte loss (bits) on eval_batches random validation batches; the same batches every time."""
        t, dd = self.cfg.train, self.dd
        gen = torch.Generator().manual_seed(t.seed + 1)
        was_training = self.raw.training
        self.raw.eval()
        total = 0.0
        for _ in range(t.eval_batches):
            x, y = random_batch(self.corpus.split("val"), t.batch_size, self.cfg.model.block_size, gen,
                                (dd.rank, dd.world))
            with self.autocast():
                loss, _ = self.raw(x.to(self.device), y.to(self.device))
            total += float(loss)
        self.raw.train(was_training)
        return dd.sum([total])[0] / (t.eval_batches * dd.world) / LN2

    def full_eval(self, split: str) -> dict:
        """bpc over every byte of a split with the strided protocol, and the protocol's name."""
        t, block = self.cfg.train, self.cfg.model.block_size
        a, b = self.corpus.bounds[split]
        r = evaluate_bytes(self.raw, self.corpus.data, a, b, block, t.eval_stride or default_stride(block),
                           t.eval_batch_size or 4 * t.batch_size, self.device, self.autocast,
                           progress=self.dd.main, shard=(self.dd.rank, self.dd.world))
        return {f"full_{split}_bpc": r["bpc"], f"full_{split}_protocol": r["protocol"]}

    # ------------------------------------------------------------------------------------------ training
    def progress(self) -> float:
        t = self.cfg.train
        p = [self.step / t.max_steps if t.max_steps else 0.0, self.train_time / t.max_time if t.max_time else 0.0]
        return min(1.0, max(p))

    def done(self) -> bool:
        t = self.cfg.train
        return bool((t.max_steps and self.step >= t.max_steps) or (t.max_time and self.train_time >= t.max_time))

    def train_step(self, stop: StopOnSignal) -> dict:
        """One optimiser step; returns its log record (empty when nothing is due)."""
        t, m, dd = self.cfg.train, self.cfg.model, self.dd
        t0 = time.perf_counter()
        weights = head_weights(m, self.progress())
        hw = torch.tensor(weights, device=self.device)
        main_head = len(weights) - m.n_targets
        lr = lr_at(t, self.step, self.progress())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        step_loss, main_loss = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        with sampling(self.optimizer):
            for micro in range(t.grad_accum):
                x, y = random_batch(self.corpus.split("train"), t.batch_size, m.block_size, self.data_gen,
                                    (dd.rank, dd.world))
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                with no_grad_sync(self.model, self.raw, t, dd, micro == t.grad_accum - 1), self.autocast():
                    loss, per_head = self.model(x, y, hw)
                (loss / t.grad_accum).backward()
                step_loss += loss.detach() / t.grad_accum
                main_loss += per_head[main_head] / t.grad_accum
            norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), t.grad_clip or float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        bad = check_finite(self.step + 1, float(step_loss), norm)
        stop_flag, bad_flag, clock = dd.max([float(stop.received is not None), float(bad is not None),
                                             self.train_time + time.perf_counter() - t0])
        if bad_flag:
            if not t.skip_nonfinite:
                self.log.write({"event": "nonfinite", "step": self.step + 1, "what": bad or "on another rank"})
                last = self.out / "ckpt.pt"
                where = (f"last good checkpoint: {last} (step {load_checkpoint(last)['step']})" if last.exists()
                         else "no checkpoint was written yet")
                raise TrainingError(f"non-finite values: {bad or 'on another rank'}; stopped before updating the "
                                    f"weights; {where}")
            self.skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.loss_sum += main_loss
            self.steps_since += 1
        self.step += 1
        dt = clock - self.train_time
        self.train_time, self.time_since = clock, self.time_since + dt
        if stop_flag and stop.received is None:
            stop.received = signal.SIGTERM  # another rank got the signal: stop together
        return self.record(lr, norm)

    def record(self, lr: float, norm: float) -> dict:
        t, dd = self.cfg.train, self.dd
        record = {}
        if self.step % t.log_interval == 0 or self.step == t.max_steps:
            record = {"step": self.step, "lr": lr, "train_time_s": round(self.train_time, 3),
                      "progress": round(self.progress(), 5), "grad_norm": norm if math.isfinite(norm) else None}
            if self.steps_since:  # 0 when every step since the last line was skipped
                total, tsum = dd.sum([float(self.loss_sum), self.time_since])
                tokens = t.batch_size * t.grad_accum * self.cfg.model.block_size * self.steps_since
                record.update(train_loss=total / (self.steps_since * dd.world),
                              tokens_per_s=tokens / max(tsum / dd.world, 1e-9))
            if self.skipped:
                record["skipped_steps"] = self.skipped
            self.loss_sum.zero_()
            self.steps_since, self.time_since = 0, 0.0
        if t.eval_interval and self.step % t.eval_interval == 0:
            record.update(step=self.step, val_bpc=self.running_val_bpc(), val_protocol=RUNNING_PROTOCOL)
        if t.full_eval_interval and self.step % t.full_eval_interval == 0:
            record.update(step=self.step, **self.full_eval("val"))
        return record

    def loop(self) -> dict:
        t = self.cfg.train
        bar = tqdm(total=100, disable=not self.dd.main, file=sys.stderr, mininterval=1.0,
                   bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}{postfix}]")
        last = {}
        self.raw.train()
        with StopOnSignal(verbose=self.dd.main) as stop:
            try:
                while not self.done() and stop.received is None:
                    record = self.train_step(stop)
                    if record:
                        self.log.write(record)
                        last.update(record)
                        bar.set_postfix_str(", ".join(f"{k} {last[k]:.4g}" for k in ("step", "train_loss", "val_bpc")
                                                      if k in last), refresh=False)
                    if t.ckpt_interval and self.step % t.ckpt_interval == 0:
                        self.checkpoint()
                    bar.n = round(100 * self.progress(), 1)
                    bar.refresh()
            finally:
                bar.close()
            if stop.received is not None:
                self.checkpoint()
                final = {"event": "interrupted", "signal": stop.name, "step": self.step,
                         "train_time_s": round(self.train_time, 3)}
            else:
                final = {"event": "end", "step": self.step, "train_time_s": round(self.train_time, 3),
                         **(self.full_eval("val") | self.full_eval("test") if t.final_eval else {}),
                         "train_loss": last.get("train_loss"), "val_bpc": last.get("val_bpc"),
                         "val_protocol": last.get("val_protocol"), "tokens_per_s": last.get("tokens_per_s"),
                         "n_params": self.n_params, "skipped_steps": self.skipped}
                self.checkpoint(**{k: v for k, v in final.items() if k.startswith("full_")})
        self.log.write(final)
        return final

    def close(self) -> None:
        self.log.close()
        # Free DDP's reducer while the process group is still registered: destroying the group from the
        # reducer's destructor, which holds the GIL, can deadlock with gloo's worker threads.
        self.model = self.raw = self.optimizer = None
        gc.collect()
        self.dd.close()


def train(args: Args) -> dict:
    """Run training as configured; returns the last record (event "end", or "interrupted" after a signal)."""
    run = Run(args)
    try:
        final = run.loop()
        if run.dd.main:
            print(summary(run.out, final, run.corpus.identity), flush=True)
        return final
    finally:
        run.close()


def summary(out: Path, final: dict, dataset: dict) -> str:
    ckpt = out / "ckpt.pt"
    if final["event"] == "interrupted":
        return (f"interrupted by {final['signal']} at step {final['step']}; checkpoint saved to {ckpt}\n"
                f"  resume:   python -m train --resume --out_dir={out}")
    warning = "" if dataset["name"] == "enwik8" else f"  (data: {dataset['name']}, not enwik8: not comparable)"
    scores = (f"validation {final['full_val_bpc']:.4f} bpc, test {final['full_test_bpc']:.4f} bpc over the whole "
              f"splits ({final['full_val_protocol']}){warning}" if "full_val_bpc" in final else
              "no final evaluation (train.final_eval=false)")
    return "\n".join([
        f"done: {final['step']} steps in {final['train_time_s']:.0f} s of training",
        scores,
        f"run folder: {out}  (config.json, metrics.jsonl, ckpt.pt)",
        "next:",
        f"  evaluate: python -m train.evaluate --ckpt {ckpt} --split test",
        f"  sample:   python -m train.sample --ckpt {ckpt} --prompt 'The ' --tokens 300",
        f"  plot:     python -m train.plot {out} --out {out}/curves.png",
    ])
