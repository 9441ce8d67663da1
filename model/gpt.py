"""The byte-level transformer of Al-Rfou et al. 2018, with every knob of `ModelConfig`.

Read top to bottom: classifier heads (all of them in one module), then the network. The auxiliary losses of the
paper are heads: one after every block but the last (intermediate losses) and one per extra target t+k
(multiple targets). All of them are scored in one batched computation: `kernels.reference.
multihead_cross_entropy_ref`, or the fused Triton op `kernels.multihead_cross_entropy` with model.kernels=triton.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.mhce import multihead_cross_entropy
from kernels.reference import IGNORE_INDEX, multihead_cross_entropy_ref
from model.config import ModelConfig
from model.hourglass import make_stack
from model.kv_cache import KVCache
from model.block import Block
from model.layers import LearnedPositions, NoPositions, XLRelative, make_norm
from model.lowrank import init_projection
from model.memory import SegmentMemory
from model.moe import MoE
from model.ngram import carry_bytes, make_ngrams


def shifted_targets(y: torch.Tensor, k: int) -> torch.Tensor:
    """Targets of the t+k head from the next-byte targets y (B, T): position t predicts byte t+k, which is
    y[:, t+k-1]; the last k-1 positions of a window have no such byte and are ignored."""
    if k == 1:
        return y
    pad = y.new_full((y.shape[0], k - 1), IGNORE_INDEX)
    return torch.cat([y[:, k - 1:], pad], dim=1)


def head_weights(cfg: ModelConfig, progress: float) -> list[float]:
    """Loss weight of every head at `progress` (fraction of training done, 0..1): intermediate heads first, layer
    by layer (layer l = 1..n-1 counts while progress < l/(2n)): its t+1 head at intermediate_weight, its t+k heads
    (k = 2..intermediate_targets) at intermediate_weight x target_weights[k-1]; then the final t+1..t+K heads at
    target_weights. Once every intermediate head has stopped, only the final heads are returned, so the model
    skips the intermediate classifiers."""
    per_layer = [1.0] + list(cfg.target_weights[1:cfg.intermediate_targets])
    inter = [cfg.intermediate_weight * w if progress < l / (2 * cfg.n_layer) else 0.0
             for l in range(1, cfg.n_intermediate + 1) for w in per_layer]
    final = list(cfg.target_weights)
    return inter + final if any(inter) else final


def training_flops_per_token(cfg: ModelConfig, matmul_weights: int) -> float:
    """Training FLOPs per token of a model with `matmul_weights` weights in its matmuls: 6 per weight (forward 2,
    backward 4) plus causal attention's 12 * n_layer * d_model * block_size (PaLM's count, the mask not halving it)."""
    return 6 * matmul_weights + 12 * cfg.n_layer * cfg.d_model * cfg.block_size


class Heads(nn.Module):
    """Every classifier: intermediate heads (one norm per block but the last, read by that layer's t+1..t+k
    heads), the t+1 head and the extra t+k heads. Weights are kept stacked (H, V, D) so the loss of all heads is
    one batched computation; heads of one layer share its hidden state (the kernel's `source`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        V, D, K, L, KI = cfg.vocab_size, cfg.d_model, cfg.n_targets, cfg.n_intermediate, cfg.intermediate_targets
        self.n_targets, self.n_inter_layers, self.n_inter_heads = K, L, cfg.n_intermediate_heads
        self.main = nn.Parameter(torch.empty(V, D))  # t+1; replaced by the embedding when tied
        self.extra = nn.Parameter(torch.empty(K - 1, V, D)) if K > 1 else None
        self.inter = nn.Parameter(torch.empty(self.n_inter_heads, V, D)) if L else None  # layer-major: t+1..t+KI
        self.inter_norms = nn.ModuleList(make_norm(cfg, D) for _ in range(L))
        self.bias = nn.Parameter(torch.zeros(self.n_inter_heads + K, V)) if cfg.head_bias else None
        self.inter_shifts = [k for _ in range(L) for k in range(1, KI + 1)]  # head h of the intermediate ones: t+k
        # head h reads this hidden state (host-side constants: the loss never reads them back from the device)
        self.source_all = tuple(layer for layer in range(L) for _ in range(KI)) + (L,) * K
        self.source_final = (0,) * K
        self.loss_fn = (functools.partial(multihead_cross_entropy, impl=cfg.loss_impl) if cfg.kernels == "triton"
                        else multihead_cross_entropy_ref)

    def names(self, with_inter: bool) -> list[str]:
        """Each head's name, in the order of the loss's per-head values: "L3/t+2" (layer 3's t+2 head), "final/t+1"."""
        inter = [f"L{layer + 1}/t+{k}" for layer, k in zip(self.source_all, self.inter_shifts)] if with_inter else []
        return inter + [f"final/t+{k}" for k in range(1, self.n_targets + 1)]

    def intermediate_parameters(self) -> list[nn.Parameter]:
        """The parameters only the intermediate heads use (their classifiers and norms)."""
        return ([self.inter] if self.inter is not None else []) + list(self.inter_norms.parameters())

    def weights(self, with_inter: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        parts = ([self.inter] if with_inter and self.inter is not None else []) + [self.main[None]]
        if self.extra is not None:
            parts.append(self.extra)
        bias = self.bias if self.bias is None or with_inter else self.bias[self.n_inter_heads:]
        return torch.cat(parts), bias

    def main_logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = h @ self.main.t()
        return logits if self.bias is None else logits + self.bias[self.n_inter_heads]

    def loss(self, inter_h: list[torch.Tensor], final_h: torch.Tensor, y: torch.Tensor, hw: torch.Tensor):
        """inter_h: the intermediate hidden states (empty once they stopped); final_h (B, T, D); y (B, T).
        Returns (weighted loss, per-head mean CE)."""
        with_inter = len(inter_h) > 0  # not bool(list): torch 2.11's dynamo cannot trace that
        hidden = torch.stack([norm(h) for norm, h in zip(self.inter_norms, inter_h)] + [final_h])
        weight, bias = self.weights(with_inter)
        shifted = [shifted_targets(y, k) for k in range(1, self.n_targets + 1)]  # shifted[k-1]: t+k targets
        targets = ([shifted[k - 1] for k in self.inter_shifts] if with_inter else []) + shifted
        loss, per_head = self.loss_fn(hidden.flatten(1, 2), weight, torch.stack(targets).flatten(1), hw,
                                      source=self.source_all if with_inter else self.source_final, bias=bias,
                                      return_per_head=True)
        return loss, per_head.detach()


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.ngram_emb = make_ngrams(cfg)  # hashed n-gram rows added to the bytes' embeddings (or nothing)
        self.pos_emb = LearnedPositions(cfg.block_size, cfg.d_model) if cfg.pos_emb == "learned" else NoPositions()
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.relative = XLRelative(cfg) if cfg.pos_emb == "xl_relative" else None  # shared by every layer
        self.blocks = nn.ModuleList(Block(cfg, layer, self.relative) for layer in range(cfg.n_layer))
        self.stack = make_stack(cfg)  # how the blocks run: in a row, or as an hourglass
        self.norm_f = make_norm(cfg, cfg.d_model)
        self.heads = Heads(cfg)
        self.moe_layers = [m for m in self.blocks.modules() if isinstance(m, MoE)]  # their balance loss joins ours
        if cfg.tie_embeddings:
            self.heads.main = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self):
        cfg = self.cfg
        std = math.sqrt(2 / (5 * cfg.d_model)) if cfg.init == "small" else 0.02
        for name, p in self.named_parameters():
            if name.endswith("bias"):  # whatever its shape: the heads' biases are (H, V)
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                nn.init.normal_(p, std=std)
        for module in self.modules():  # what has an init of its own: low-rank factors, differential lambdas
            if hasattr(module, "init_own"):
                module.init_own(std)
        if cfg.init == "gpt2":
            for block in self.blocks:
                for proj in block.residual_projections():
                    init_projection(proj, std / math.sqrt(2 * cfg.n_layer))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # shared (tied) tensors count once

    def flops_per_token(self, n_heads: int) -> float:
        """Training FLOPs per token (forward + backward): 6 per weight of every matmul in the blocks and of the
        n_heads classifier heads that score the step (embedding and position lookups are not matmuls), plus causal
        attention's 12 * n_layer * d_model * block_size (PaLM's count, the mask not halving it)."""
        cfg = self.cfg
        blocks = sum(p.numel() for n, p in self.blocks.named_parameters() if p.dim() >= 2 and ".pos." not in n)
        return training_flops_per_token(cfg, blocks + n_heads * cfg.vocab_size * cfg.d_model)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                head_weights: torch.Tensor | None = None, cache: KVCache | None = None,
                memory: SegmentMemory | None = None):
        """idx (B, T) bytes. Without targets: the t+1 logits (B, T, V).
        With next-byte targets (B, T): (loss, per_head). `head_weights` (from `head_weights()`) selects the heads:
        n_inter_heads + n_targets values score every head, n_targets values only the final ones; None scores the
        t+1 head alone (evaluation).
        With a KV cache (logits only): idx continues the cached positions, attending over the cache's window.
        With a memory (model/memory.py): idx is the next segment of the memory's streams; the memory moves on."""
        T = idx.shape[1]
        positions = None
        if cache is not None and memory is not None:
            raise ValueError("pass a KV cache or a segment memory, not both")
        if cache is not None:
            cache.make_room(T)
            positions = cache.positions(T)
        elif T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} bytes exceeds block_size={self.cfg.block_size}")
        with_inter = head_weights is not None and len(head_weights) > self.cfg.n_targets
        stream = cache if cache is not None else memory  # what carries a stream from chunk to chunk
        previous = stream.previous_bytes if stream is not None else None  # the bytes before idx (n-grams)
        x = self.drop(self.pos_emb(self.ngram_emb(self.tok_emb(idx), idx, previous), positions))
        x, inter_h = self.stack(self.blocks, x, with_inter, cache, positions, memory)
        h = self.norm_f(x)
        if stream is not None:
            stream.advance(T)
            carry_bytes(stream.previous_bytes, idx)
        if targets is None:
            return self.heads.main_logits(h)
        if head_weights is None:
            loss = F.cross_entropy(self.heads.main_logits(h).float().flatten(0, 1), targets.flatten(),
                                   ignore_index=IGNORE_INDEX)
            return loss, loss.detach()[None]
        loss, per_head = self.heads.loss(inter_h, h, targets, head_weights)
        for moe in self.moe_layers:  # the auxiliary balance loss (0 with bias balancing, or in evaluation)
            loss = loss + moe.routing.loss
        if memory is not None:  # the compressive memory's reconstruction loss (zero for a plain memory)
            loss = loss + memory.take_loss()
        return loss, per_head
