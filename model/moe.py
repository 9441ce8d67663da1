"""Mixture of experts in place of the MLP (DeepSeekMoE-style), model.moe_experts > 0.

A router (d_model -> E, softmax in fp32) scores the E routed experts per token; each token goes to its top
model.moe_top_k and sums their outputs weighted by their router probabilities (DeepSeek-V2's gates, not
renormalised: one expert with top-1 is exactly a dense MLP). Experts are MLPs of width model.moe_expert_dim (0 =
d_ff) with the model's activation (SwiGLU experts for activation=swiglu); model.moe_shared always-on shared experts
add one MLP of moe_shared x moe_expert_dim. MoE replaces the MLP in every model.moe_every-th block.

Load balancing (model.moe_balance):
- aux_loss: Switch Transformer's E * sum_i f_i P_i (f_i the fraction of routed slots that chose expert i, P_i its
  mean router probability), added to the loss at model.moe_aux_weight;
- bias: DeepSeek-V3's auxiliary-loss-free balancing: a per-expert bias added to the scores for the choice only (not
  to the gates, never learned by gradient), moved by model.moe_bias_rate toward the mean load after every step
  (`update_bias`, called by the training loop; in the checkpoint).
Every forward leaves its routing counts and balance loss in `self.routing` (a plain object, not a module: the
loop reads it between steps; no host synchronisation inside the model).

Dispatch (`dispatch`, model.moe_dispatch): assignments sorted by expert; then either
- grouped: the sorted (N k, d) rows through torch's grouped matmul (F.grouped_mm: one GEMM over jagged groups, the
  group ends a cumulative sum of the counts, read by the kernel on the device), or
- padded: the rows placed into a zero-padded (E, N, d) buffer (an expert receives at most N of the N x k
  assignments, since a token's k experts are distinct) and two batched matmuls: E / k times the routed compute.
Both gather back and sum with their gates; shapes are static and nothing is read back to the host, so both compile
with fullgraph. `auto` takes grouped where torch's kernel takes the inputs (`grouped_supported`: CUDA in bf16 on
sm80+; a CPU eagerly in fp32/bf16/fp16, compiled in bf16 only, as torch 2.13's shape function demands bf16; row
widths of 16-byte multiples) and padded elsewhere. Measured on a 2-core CPU (fp32, 8,192 rows of 128, 8 experts of
128, top-2): one grouped matmul 3.8 ms, the padded bmm 14.0 ms. `reference` loops over experts (tests).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of x runs in: autocast's where it is on for x's device, else x's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def grouped_supported(device: torch.device, dtype: torch.dtype, *widths: int) -> bool:
    """Whether torch's grouped matmul (F.grouped_mm) takes rows of these widths in this dtype on this device."""
    if not hasattr(F, "grouped_mm") or any(w * torch.finfo(dtype).bits % 128 for w in widths):  # 16-byte rows
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_properties(device).major >= 8  # (folded by dynamo)
    if device.type == "cpu":
        return dtype == torch.bfloat16 or (dtype in (torch.float32, torch.float16)
                                           and not torch.compiler.is_compiling())
    return False


class Routing:
    """What the last forward routed: counts per expert (E,), the balance loss (unweighted) and the loss term."""
    counts: torch.Tensor | None = None
    balance: torch.Tensor | None = None
    loss: torch.Tensor | float = 0.0


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from model.layers import make_mlp  # the shared experts are one ordinary MLP
        E, D = cfg.moe_experts, cfg.d_model
        hidden = cfg.moe_expert_dim or cfg.d_ff
        self.n_experts, self.top_k, self.glu = E, cfg.moe_top_k, cfg.activation == "swiglu"
        self.balance_mode, self.aux_weight = cfg.moe_balance, cfg.moe_aux_weight
        self.dispatch_mode = cfg.moe_dispatch
        self.act = None if self.glu else ACTIVATIONS[cfg.activation]
        self.router = nn.Linear(D, E, bias=False)
        self.fc = nn.Parameter(0.02 * torch.randn(E, D, (2 if self.glu else 1) * hidden))  # SwiGLU: gate | up
        self.proj = nn.Parameter(0.02 * torch.randn(E, hidden, D))  # (GPT.reset_parameters initialises both again)
        shared = dataclasses.replace(cfg, d_ff=hidden * cfg.moe_shared, low_rank=0)
        self.shared = make_mlp(shared) if cfg.moe_shared else None
        self.register_buffer("route_bias", torch.zeros(E))  # bias balancing: moves the choice, not the gates
        self.routing = Routing()

    def expert(self, x: torch.Tensor, fc: torch.Tensor, proj: torch.Tensor, matmul=torch.matmul) -> torch.Tensor:
        h = matmul(x, fc)
        if self.glu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = self.act(h)
        return matmul(h, proj)

    def route(self, flat: torch.Tensor):
        """(probabilities (N, E) fp32, chosen experts (N, k), gates (N, k))."""
        probs = torch.softmax(self.router(flat).float(), dim=-1)
        choice = (probs + self.route_bias).topk(self.top_k, dim=-1).indices
        return probs, choice, probs.gather(1, choice)

    def forward(self, x):
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        probs, choice, gates = self.route(flat)
        counts = torch.zeros(self.n_experts, device=x.device).index_add_(
            0, choice.reshape(-1), torch.ones(choice.numel(), device=x.device))
        balance = self.n_experts * (counts / choice.numel() * probs.mean(0)).sum()
        self.routing.counts, self.routing.balance = counts, balance.detach()
        self.routing.loss = self.aux_weight * balance if self.balance_mode == "aux_loss" and self.training else 0.0
        y = self.dispatch(flat, choice, gates.to(x.dtype))
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(B, T, D)

    def dispatch(self, flat: torch.Tensor, choice: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        N, k, E = flat.shape[0], self.top_k, self.n_experts
        expert = choice.reshape(-1)
        token = torch.arange(N, device=flat.device).repeat_interleave(k)
        order = torch.argsort(expert, stable=True)
        expert, token = expert[order], token[order]
        counts = torch.zeros(E, dtype=torch.long, device=flat.device).index_add_(0, expert, torch.ones_like(expert))
        compute = compute_dtype(flat)
        widths = flat.shape[1], self.fc.shape[2], self.proj.shape[1]
        grouped = grouped_supported(flat.device, compute, *widths)
        if self.dispatch_mode == "grouped" and not grouped:
            raise RuntimeError(f"model.moe_dispatch=grouped: torch's grouped matmul does not take {compute} rows of "
                               f"widths {widths} on {flat.device.type} here; use auto or padded")
        if grouped and self.dispatch_mode != "padded":
            ends = torch.cumsum(counts, 0).to(torch.int32)  # group e is rows [ends[e-1], ends[e]) of the sorted ones
            out = self.expert(flat[token].to(compute), self.fc.to(compute), self.proj.to(compute),
                              lambda rows, weight: F.grouped_mm(rows, weight, offs=ends)).to(flat.dtype)
        else:
            first = torch.cumsum(counts, 0) - counts  # where each expert's run starts in the sorted order
            slot = torch.arange(N * k, device=flat.device) - first[expert]
            row = expert * N + slot  # the assignment's row in the (E, N) padded buffer
            buffer = flat.new_zeros(E * N, flat.shape[1]).index_copy(0, row, flat[token]).view(E, N, -1)
            out = self.expert(buffer, self.fc.to(flat.dtype), self.proj.to(flat.dtype)).flatten(0, 1)[row]
        weighted = out * gates.reshape(-1)[order, None]
        return flat.new_zeros(flat.shape).index_add_(0, token, weighted)

    def reference(self, flat: torch.Tensor, choice: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """The plain loop over experts (host-synchronising): what `dispatch` must equal."""
        out = torch.zeros_like(flat)
        for e in range(self.n_experts):
            token, rank = (choice == e).nonzero(as_tuple=True)
            if token.numel():
                out = out.index_add(0, token, gates[token, rank, None] * self.expert(flat[token], self.fc[e],
                                                                                      self.proj[e]))
        return out

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3's update after a step: +rate for experts below the mean load, -rate above (a no-op with
        aux_loss balancing). `counts`: this step's routed slots per expert, summed over ranks by the caller."""
        if self.balance_mode == "bias":
            self.route_bias += rate * torch.sign(counts.mean() - counts)
