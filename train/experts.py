"""The training loop's bookkeeping for a mixture-of-experts model (model.moe_experts > 0): the routed slots per layer
and expert and the balance loss per layer, summed over a step's micro-batches and between log lines, DeepSeek-V3's
routing-bias update after each optimiser step, the log line's loads, and the sums' place in the checkpoint. With
no MoE layer every method is a no-op. Nothing here reads back to the host except `record` (at log lines)."""
from __future__ import annotations

import torch


class ExpertLoads:
    def __init__(self, layers: list, device: torch.device, balance: str, bias_rate: float, world: int):
        self.layers, self.balance_mode, self.bias_rate, self.world = layers, balance, bias_rate, world
        experts = layers[0].n_experts if layers else 0
        self.counts = torch.zeros(len(layers), experts, device=device)  # since the last log line
        self.balance = torch.zeros(len(layers), device=device)
        self.step_counts, self.step_balance = torch.zeros_like(self.counts), torch.zeros_like(self.balance)

    def __bool__(self) -> bool:
        return bool(self.layers)

    def start_step(self) -> None:
        self.step_counts.zero_()
        self.step_balance.zero_()

    def add_micro_batch(self, grad_accum: int) -> None:
        """After a micro-batch's forward: what its routing left in each layer."""
        if self.layers:
            self.step_counts += torch.stack([layer.routing.counts for layer in self.layers])
            self.step_balance += torch.stack([layer.routing.balance for layer in self.layers]) / grad_accum

    def after_update(self) -> None:
        """After an optimiser step: the routing biases move toward balance (bias balancing; counts summed over
        ranks so that every rank moves them alike), and the step's loads join the log sums."""
        if not self.layers:
            return
        if self.world > 1 and self.balance_mode == "bias":
            torch.distributed.all_reduce(self.step_counts)
        for layer, layer_counts in zip(self.layers, self.step_counts):
            layer.update_bias(layer_counts, self.bias_rate)
        self.counts += self.step_counts
        self.balance += self.step_balance

    def record(self, steps: int) -> dict:
        """Expert load over the `steps` since the last log line, averaged over the MoE layers: each expert's fraction
        of the routed slots, the busiest expert's load over the mean, and the balance loss (E * sum f_i P_i, 1.0
        when even). Resets the sums."""
        fractions = self.counts / self.counts.sum(dim=1, keepdim=True).clamp(min=1)
        max_over_mean = fractions.max(dim=1).values * fractions.shape[1]
        values = torch.cat([fractions.mean(0), max_over_mean.mean()[None], self.balance.mean()[None] / steps]).tolist()
        self.counts.zero_()
        self.balance.zero_()
        return {"moe/load": [round(v, 4) for v in values[:-2]], "moe/load_max_over_mean": values[-2],
                "moe/balance_loss": values[-1]}

    def state(self) -> dict:
        """The log sums for the checkpoint's log accumulator."""
        return {"moe_counts": self.counts.tolist(), "moe_balance": self.balance.tolist()}

    def restore(self, acc: dict) -> None:
        if "moe_counts" in acc:
            self.counts.copy_(torch.tensor(acc["moe_counts"]).view_as(self.counts))
            self.balance.copy_(torch.tensor(acc["moe_balance"]).view_as(self.balance))
