"""Ranks, model wrapping (torch.compile, DistributedDataParallel, FSDP2) and full state dicts.

One process is world 1; under torchrun every rank runs the same loop. Checkpoints always hold full (unsharded)
state dicts keyed by parameter name, so a checkpoint from any number of ranks, with or without FSDP, resumes on
any other.
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT
from train.config import TrainConfig


class Distributed:
    """rank/world from torchrun's environment, the process group, and the few collectives the loop needs."""

    def __init__(self, cuda: bool):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{self.local_rank}" if cuda else "cpu")
        if self.world > 1 and not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group("nccl" if cuda else "gloo")
        self.main = self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def max(self, values: list[float]) -> list[float]:
        """Element-wise maximum over ranks: how ranks agree on the training clock and on stopping."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def checkpoint_activations(raw: GPT, t: TrainConfig) -> None:
    """train.activation_checkpointing: every block keeps only its input for the backward pass and recomputes the
    rest (non-reentrant torch.utils.checkpoint, which restores the dropout RNG, so gradients are unchanged).
    In place, before sharding; state-dict keys stay the plain model's."""
    if not t.activation_checkpointing:
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
    for i, block in enumerate(raw.blocks):
        raw.blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def shard(raw: GPT, t: TrainConfig) -> None:
    """FSDP2: each block is its own unit, the root holds embeddings and heads. In place, before the optimiser."""
    if not t.fsdp:  # Config.errors() has checked that there are several ranks
        return
    from torch.distributed.fsdp import fully_shard
    for block in raw.blocks:
        fully_shard(block)
    fully_shard(raw)


def uses_ddp(t: TrainConfig, dd: Distributed) -> bool:
    return dd.world > 1 and not t.fsdp


def wrap(raw: GPT, t: TrainConfig, dd: Distributed) -> torch.nn.Module:
    """The module the loop calls: DDP when distributed without FSDP, then compiled if asked (DDP first, so that
    the compiler's DDPOptimizer splits the graph at gradient-bucket boundaries and all-reduces overlap the backward
    pass). Every parameter that requires a gradient must get one each step (no find_unused_parameters): the loop
    freezes the intermediate heads' parameters and wraps again when they stop."""
    model = raw
    if uses_ddp(t, dd):
        model = DDP(raw, device_ids=[dd.local_rank] if dd.device.type == "cuda" else None)
    if t.compile:
        model = torch.compile(model, mode=None if t.compile_mode == "default" else t.compile_mode)
    return model


def no_grad_sync(model: torch.nn.Module, raw: GPT, t: TrainConfig, dd: Distributed, last_micro: bool):
    """Skip gradient reduction on all but the last micro-step of an accumulated step."""
    if dd.world == 1:
        return nullcontext()
    if t.fsdp:
        raw.set_requires_gradient_sync(last_micro)
        return nullcontext()
    return nullcontext() if last_micro else model.no_sync()


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def is_ivon(optimizer) -> bool:
    return hasattr(optimizer, "sampled_params")


def full_state(raw: GPT, optimizer) -> tuple[dict, dict]:
    """(model, optimiser) state, unsharded and on the CPU, keyed by parameter name. A collective under FSDP."""
    if is_ivon(optimizer):  # IVON keeps tensors in its param groups, which torch.distributed.checkpoint rejects
        return ({k: v.cpu() for k, v in raw.state_dict().items()},
                {"ivon": optimizer.state_dict(), "current_step": optimizer.current_step})
    return get_state_dict(raw, optimizer, options=FULL)


def load_full_state(raw: GPT, optimizer, model_state: dict, optim_state: dict) -> None:
    """Model and optimiser state from a checkpoint. The optimiser's settings (betas, momentum, weight decay, Muon's
    lr scale, ...: every entry of its parameter groups but the parameters and tensors) stay those it was built with
    from the current config, so that a resume's overrides take effect; only its state (moments, momentum buffers,
    IVON's Hessian) comes from the checkpoint. torch's load_state_dict would restore the saved settings instead."""
    settings = [{k: v for k, v in group.items() if k != "params" and not torch.is_tensor(v)}
                for group in optimizer.param_groups]
    if is_ivon(optimizer):
        raw.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state["ivon"])
        optimizer.current_step = optim_state["current_step"]
    else:
        set_state_dict(raw, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                       options=StateDictOptions(full_state_dict=True))
    for group, kept in zip(optimizer.param_groups, settings, strict=True):
        group.update(kept)
