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

from model import GPT, SegmentMemory, head_weights
from train.checkpoint import check_resumable, dataset_change, git_sha, load_checkpoint, save_checkpoint
from train.config import Args, ConfigError, from_dict, reads_streams, set_value, to_dict, uses_cuda
from train.data import BatchPrefetcher, RandomWindows, Streams, load_corpus, random_batch
from train.distributed import (Distributed, checkpoint_activations, full_state, load_full_state, no_grad_sync, shard,
                               uses_ddp, wrap)
from train.evaluate import default_stride, evaluate_bytes
from train.experts import ExpertLoads
from train.guard import NonFiniteFlag, StopOnSignal, TrainingError
from train.hardware import peak_bf16_flops
from train.lock import RunLock
from train.logger import MetricsLog, bar_postfix, progress_bar, summary
from train.plot import write_run_curves
from train.profiler import StepProfiler
from train.optim import build_optimizer, lr_at, sampling

LN2 = math.log(2)
RUNNING_PROTOCOL = "random windows, all positions"  # the running val_bpc: eval_batches random batches


def prepare_out_dir(args: Args, main: bool) -> tuple[Path, dict | None]:
    """Resolve the run folder; with --resume load its checkpoint and adopt its config (plus CLI overrides).
    The main rank refuses a folder that holds another run unless --resume or --overwrite (other ranks write
    nothing there and skip the check, which could otherwise see the main rank's fresh files). Writes nothing:
    --overwrite's removals wait for the run folder's lock (Run.__init__)."""
    cfg = args.cfg
    if not cfg.out_dir:
        cfg.out_dir = f"runs/{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(cfg.out_dir)
    if args.resume:
        ckpt = load_checkpoint(out / "ckpt.pt")
        saved, resumed = from_dict(ckpt["config"]), from_dict(ckpt["config"])
        for key, value in args.overrides.items():
            set_value(resumed, key, value)
        check_resumable(saved, resumed, out / "ckpt.pt")
        problems = resumed.errors()
        if problems:
            raise ConfigError(problems[0])
        resumed.out_dir = str(out)
        args.cfg = resumed
        return out, ckpt
    problems = cfg.errors()
    if problems:
        raise ConfigError(problems[0])
    if main and ((out / "metrics.jsonl").exists() or (out / "ckpt.pt").exists()) and not args.overwrite:
        raise ConfigError(f"{out} holds another run; pass --resume to continue it or --overwrite to replace it")
    return out, None


# what --overwrite removes
RUN_FILES = ("metrics.jsonl", "ckpt.pt", "config.json", "curves.png", "trace.json", "profile.txt")


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
        checkpoint_activations(self.raw, t)
        shard(self.raw, t)
        self.model = wrap(self.raw, t, dd)
        self.optimizer = build_optimizer(self.raw, t, len(self.corpus.split("train")))
        sampler = Streams if reads_streams(self.cfg) else RandomWindows  # memory: streams, memory carried along
        self.sampler = sampler(self.corpus.split("train"), t.batch_size, m.block_size,
                               torch.Generator().manual_seed(t.seed), (dd.rank, dd.world))
        self.memory = SegmentMemory(m, t.batch_size // dd.world, self.device) if m.mem_len else None
        self.memory_kwargs = {"memory": self.memory} if self.memory is not None else {}  # the model's call as before
        self.batches: BatchPrefetcher | None = None  # started by the first step (after a resume has set the sampler)
        self.step, self.train_time, self.skipped = 0, 0.0, 0
        self.loss_sum, self.steps_since, self.time_since = torch.zeros((), device=self.device), 0, 0.0
        self.guard = NonFiniteFlag(self.device)
        self.hw, self.hw_values = None, ()  # the heads' weights on the device, and as last computed
        self.head_sum, self.head_steps = torch.zeros(0, device=self.device), 0  # per-head losses since the last log
        self.recon_sum = torch.zeros((), device=self.device)  # the compressive memory's reconstruction loss, same
        self.experts = ExpertLoads(self.raw.moe_layers, self.device, m.moe_balance, m.moe_bias_rate, dd.world)
        self.agreed_time, self.stop_agreed = 0.0, False
        torch.manual_seed(t.seed + dd.rank)  # dropout streams differ across ranks
        if ckpt is not None:
            self.restore(ckpt)
        bf16 = t.precision == "bf16"  # autocast on CUDA, or on a CPU with native bf16 (config.cpu_has_bf16)
        self.autocast = (lambda: torch.autocast(self.device.type, torch.bfloat16)) if bf16 else nullcontext
        self.peak_flops = peak_bf16_flops(self.device) if bf16 else None  # for MFU
        self.meta = {"n_params": self.n_params, "dataset": self.corpus.identity, "git_sha": git_sha()}
        self.config = to_dict(self.cfg)  # as plain data, for config.json, the logs and every checkpoint
        self.lock = None
        if dd.main:  # the folder's one writer from here on: before anything in it is removed or written
            self.lock = RunLock(self.out)
            if args.overwrite and ckpt is None:
                for name in RUN_FILES:
                    (self.out / name).unlink(missing_ok=True)
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
        if self.dd.main and (note := dataset_change(ckpt.get("dataset"), self.corpus.identity)):
            print(note, file=sys.stderr, flush=True)
        self.step, self.train_time, self.skipped = ckpt["step"], ckpt["train_time"], ckpt.get("skipped", 0)
        self.agreed_time = self.train_time
        acc = ckpt["log_acc"]
        self.loss_sum.fill_(acc["loss_sum"])
        self.steps_since, self.time_since = acc["steps"], acc["time"]
        self.head_sum = torch.tensor(acc.get("head_sum", []), dtype=torch.float32, device=self.device)
        self.head_steps = acc.get("head_steps", 0)
        self.recon_sum.fill_(acc.get("recon_sum", 0.0))
        self.experts.restore(acc)
        self.sampler.restore(ckpt["rng"]["data"])
        if self.memory is not None and ckpt.get("memory") is not None:
            self.memory.load_state_dict(ckpt["memory"])
        if self.dd.main:  # other ranks keep their own dropout streams
            torch.set_rng_state(ckpt["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)

    def checkpoint(self, **extra) -> None:
        """Save everything a resume needs. A non-finite step since the last read stops the run first: no checkpoint
        ever holds the weights it produced."""
        self.check_guard()
        model_state, optim_state = full_state(self.raw, self.optimizer)  # a collective under FSDP
        if not self.dd.main:
            return
        rng = {"torch": torch.get_rng_state(),
               "data": self.batches.state if self.batches is not None else self.sampler.state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        save_checkpoint(self.out / "ckpt.pt", {
            "model": model_state, "optimizer": optim_state, "step": self.step, "train_time": self.train_time,
            "skipped": self.skipped, "rng": rng, "config": self.config, "world_size": self.dd.world,
            "memory": self.memory.state_dict() if self.memory is not None and self.dd.world == 1 else None,
            "log_acc": {"loss_sum": float(self.loss_sum), "steps": self.steps_since, "time": self.time_since,
                        "head_sum": self.head_sum.tolist(), "head_steps": self.head_steps,
                        "recon_sum": float(self.recon_sum), **self.experts.state()},
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
    def elapsed(self) -> float:
        """The training clock that schedules and budgets read: with several ranks the one they agreed on at the
        last synchronisation point, so that every rank computes the same learning rate and head weights and stops
        at the same step."""
        return self.train_time if self.dd.world == 1 else self.agreed_time

    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.batch_size * t.grad_accum * self.cfg.model.block_size

    def tokens(self) -> int:
        """Tokens trained on so far (all ranks; skipped steps count: their batches were drawn)."""
        return self.step * self.tokens_per_step()

    def progress(self) -> float:
        """The fraction of the budget spent: the largest of steps, time and tokens, each over its limit."""
        t = self.cfg.train
        p = [self.step / t.max_steps if t.max_steps else 0.0, self.elapsed() / t.max_time if t.max_time else 0.0,
             self.tokens() / t.max_tokens if t.max_tokens else 0.0]
        return min(1.0, max(p))

    def last_step(self) -> int | None:
        """The step a step or token budget ends at (logged like a log step), or None under a time budget alone."""
        t = self.cfg.train
        ends = [t.max_steps] * bool(t.max_steps) + [-(-t.max_tokens // self.tokens_per_step())] * bool(t.max_tokens)
        return min(ends) if ends else None

    def done(self) -> bool:
        t = self.cfg.train
        return bool((t.max_steps and self.step >= t.max_steps) or (t.max_time and self.elapsed() >= t.max_time)
                    or (t.max_tokens and self.tokens() >= t.max_tokens))

    def stopping(self, stop: StopOnSignal) -> bool:
        """A signal ends the loop: at once in one process, at the next synchronisation point with several ranks
        (where they agree on it)."""
        return stop.received is not None if self.dd.world == 1 else self.stop_agreed

    def sync_due(self, step: int) -> bool:
        """Whether step `step` reads scalars back from the device: log, evaluation and checkpoint steps, the last
        step of a step or token budget, and every step with train.skip_nonfinite (which must know before updating)."""
        t = self.cfg.train
        return bool(t.skip_nonfinite or step % t.log_interval == 0 or step == self.last_step()
                    or (t.eval_interval and step % t.eval_interval == 0)
                    or (t.full_eval_interval and step % t.full_eval_interval == 0)
                    or (t.ckpt_interval and step % t.ckpt_interval == 0))

    def head_weights(self) -> torch.Tensor:
        """The heads' loss weights as a device tensor, rewritten in place when they change (an intermediate layer
        stops); a new tensor, and one recompile under torch.compile, only when the last intermediate head stops."""
        m = self.cfg.model
        weights = tuple(head_weights(m, self.progress()))
        if weights != self.hw_values:
            if self.hw is None or len(weights) != self.hw.numel():
                self.hw = torch.tensor(weights, device=self.device)
                if self.hw_values:
                    print(f"step {self.step}: every intermediate head has stopped; the loss now scores the final "
                          f"heads only (a compiled model recompiles once)", file=sys.stderr, flush=True)
                if len(weights) == m.n_targets and m.n_intermediate and uses_ddp(self.cfg.train, self.dd):
                    self.unwrap_intermediate_heads()
            else:
                self.hw.copy_(torch.tensor(weights), non_blocking=True)
            self.hw_values = weights
        return self.hw

    def unwrap_intermediate_heads(self) -> None:
        """DDP reduces the gradient of every parameter that requires one: once the intermediate heads have stopped,
        their parameters are frozen and the model wrapped again (the old wrapper freed first, with its hooks)."""
        for p in self.raw.heads.intermediate_parameters():
            p.requires_grad_(False)
        self.model = None
        gc.collect()
        self.model = wrap(self.raw, self.cfg.train, self.dd)

    def grad_norm(self, want: bool) -> torch.Tensor | None:
        """Clip to train.grad_clip and return the global norm (a device tensor); without clipping the norm is
        computed only when `want` (a logged step)."""
        t = self.cfg.train
        if not (t.grad_clip or want):
            return None
        params = [p for p in self.raw.parameters() if p.grad is not None]
        if t.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def check_guard(self) -> None:
        """Read the non-finite flag (all ranks agree) and stop the run if a step since the last read was bad."""
        found = self.guard.read()
        if self.dd.max([float(found is not None)])[0]:
            self.nonfinite(found, self.step, before_update=False)

    def nonfinite(self, found: tuple[int, str] | None, now: int, before_update: bool) -> None:
        """Stop the run on a non-finite step read from the device flag (found on another rank: found is None)."""
        step, what = found if found is not None else (now, "on another rank")
        self.log.write({"event": "nonfinite", "step": step, "what": what})
        last = self.out / "ckpt.pt"
        where = (f"last good checkpoint: {last} (step {load_checkpoint(last)['step']})" if last.exists()
                 else "no checkpoint was written yet")
        when = ("stopped before updating the weights" if before_update and step == now
                else f"read at step {now}, after the weights were updated")
        raise TrainingError(f"non-finite values: {what}; {when}; {where}")

    def train_step(self, stop: StopOnSignal) -> dict:
        """One optimiser step; returns its log record (empty when nothing is due). Nothing is read back from the
        device unless the step is a synchronisation point (sync_due): the loss, the gradient norm and the
        non-finite flag stay device tensors in between."""
        t, m, dd = self.cfg.train, self.cfg.model, self.dd
        t0 = time.perf_counter()
        if self.batches is None:
            self.batches = BatchPrefetcher(self.sampler, self.device)
        now = self.step + 1
        sync = self.sync_due(now)
        hw = self.head_weights()
        main_head = hw.numel() - m.n_targets
        lr = lr_at(t, self.step, self.progress())
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's matrices: train.muon_lr / train.lr
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=self.device)
        head_loss = torch.zeros(hw.numel(), device=self.device)  # per head; the t+1 head's is the train loss
        recon = torch.zeros((), device=self.device)
        self.experts.start_step()
        with sampling(self.optimizer):
            for micro in range(t.grad_accum):
                x, y, restart = self.batches.next()
                if restart and self.memory is not None:
                    self.memory.reset()
                with no_grad_sync(self.model, self.raw, t, dd, micro == t.grad_accum - 1), self.autocast():
                    loss, per_head = self.model(x, y, hw, **self.memory_kwargs)
                (loss / t.grad_accum).backward()
                step_loss += loss.detach() / t.grad_accum
                head_loss += per_head.float() / t.grad_accum
                if m.cmem_len:
                    recon += self.memory.last_recon / t.grad_accum
                self.experts.add_micro_batch(t.grad_accum)
            norm = self.grad_norm(want=sync)
        self.guard.update(now, step_loss, norm)
        skip = False
        if sync:
            found = self.guard.read()
            stop_flag, bad_flag, clock = dd.max([float(stop.received is not None), float(found is not None),
                                                 self.train_time + time.perf_counter() - t0])
            if bad_flag and not t.skip_nonfinite:
                self.nonfinite(found, now, before_update=True)
            skip = bool(bad_flag)
            self.agreed_time = clock
            if stop_flag:
                self.stop_agreed = True
                if stop.received is None:
                    stop.received = signal.SIGTERM  # another rank got the signal: stop together
        else:
            clock = self.train_time + time.perf_counter() - t0
        update_start = time.perf_counter()
        if skip:
            self.skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.loss_sum += head_loss[main_head]
            self.steps_since += 1
            if self.head_sum.numel() != head_loss.numel():  # the intermediate heads stopped: their sums end here
                self.head_sum, self.head_steps = torch.zeros_like(head_loss), 0
            self.head_sum += head_loss
            self.recon_sum += recon
            self.head_steps += 1
            self.experts.after_update()
        clock += time.perf_counter() - update_start  # the update is training time too (after the ranks agreed)
        self.step = now
        self.time_since += clock - self.train_time
        self.train_time = clock
        return self.record(lr, float(norm) if sync and norm is not None else None)

    def record(self, lr: float, norm: float | None) -> dict:
        t, dd = self.cfg.train, self.dd
        record = {}
        if self.step % t.log_interval == 0 or self.step == self.last_step():
            record = {"step": self.step, "lr": lr, "train_time_s": round(self.train_time, 3),
                      "progress": round(self.progress(), 5),
                      "grad_norm": norm if norm is not None and math.isfinite(norm) else None}
            if self.steps_since:  # 0 when every step since the last line was skipped
                total, tsum = dd.sum([float(self.loss_sum), self.time_since])
                tokens_per_s = self.tokens_per_step() * self.steps_since / max(tsum / dd.world, 1e-9)
                record.update(train_loss=total / (self.steps_since * dd.world), tokens_per_s=tokens_per_s)
                if self.peak_flops:
                    flops = self.raw.flops_per_token(self.hw.numel()) * tokens_per_s  # tokens of all ranks
                    record["mfu"] = flops / (self.peak_flops * dd.world)
            if self.head_steps and self.cfg.model.cmem_len:
                record["loss/recon"] = self.dd.sum([float(self.recon_sum)])[0] / (self.head_steps * dd.world)
            if self.head_steps and self.head_sum.numel() > 1:
                record.update(self.head_losses())
            if self.head_steps and self.experts:
                record.update(self.experts.record(self.head_steps))
            if self.skipped:
                record["skipped_steps"] = self.skipped
            self.loss_sum.zero_()
            self.steps_since, self.time_since = 0, 0.0
            self.head_sum, self.head_steps = torch.zeros_like(self.head_sum), 0
            self.recon_sum.zero_()
        if t.eval_interval and self.step % t.eval_interval == 0:
            record.update(step=self.step, val_bpc=self.running_val_bpc(), val_protocol=RUNNING_PROTOCOL)
        if t.full_eval_interval and self.step % t.full_eval_interval == 0:
            record.update(step=self.step, **self.full_eval("val"))
        return record

    def head_losses(self) -> dict:
        """Every active head's mean loss (nats, like train_loss) since the last log line, over all ranks:
        {"loss/L3/t+1": ..., "loss/final/t+2": ...}; heads of weight 0 (stopped) are left out."""
        values = self.dd.sum((self.head_sum / self.head_steps).tolist())
        names = self.raw.heads.names(with_inter=len(values) > self.cfg.model.n_targets)
        return {f"loss/{name}": v / self.dd.world for name, v, w in zip(names, values, self.hw_values) if w}

    def loop(self) -> dict:
        t = self.cfg.train
        if self.done() and self.dd.main:  # a resume past the budget
            print(f"step {self.step}: the budget is already spent; nothing to train", file=sys.stderr, flush=True)
        bar = progress_bar(total=100, initial=round(100 * self.progress(), 1), disable=not self.dd.main,
                           mininterval=1.0, bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}{postfix}]")
        last = {}
        self.raw.train()
        profiler = StepProfiler(t.profile, self.out, self.device.type == "cuda", enabled=self.dd.main)
        with StopOnSignal(verbose=self.dd.main) as stop:
            try:
                while not self.done() and not self.stopping(stop):
                    record = self.train_step(stop)
                    profiler.step_done()
                    if record:
                        self.log.write(record)
                        last.update(record)
                        bar.set_postfix_str(bar_postfix(last), refresh=False)
                    if t.ckpt_interval and self.step % t.ckpt_interval == 0:
                        self.checkpoint()
                    bar.update(round(100 * self.progress(), 1) - bar.n)  # redrawn at the bar's interval
            finally:
                bar.close()
                profiler.close()
                if profiler.traced:
                    self.log.write({"event": "profile", "steps": profiler.traced, "trace": str(profiler.path)})
            self.check_guard()  # before the final evaluation and checkpoint
            if self.stopping(stop):
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
        if self.lock is not None:
            self.lock.release()
        if self.batches is not None:
            self.batches.close()
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
            plot_note = write_run_curves(run.out) if run.cfg.log.plot else "no curves.png (log.plot=false)"
            print(summary(run.out, final, run.corpus.identity, plot_note), flush=True)
        return final
    finally:
        run.close()
