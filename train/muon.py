"""Muon (Jordan et al. 2024, the optimiser of the modded-nanogpt speedruns): for the weight matrices of the
transformer blocks, SGD momentum (Nesterov) whose update is replaced by the nearest semi-orthogonal matrix,
computed with five quintic Newton-Schulz iterations and scaled by sqrt(max(1, rows / cols)); AdamW for every other
parameter (embeddings, position tables, classifier heads, norms, biases).

One torch.optim.Optimizer holds both kinds (param groups flagged `muon`), so checkpoints, exact resume and the
learning-rate schedule work as for the other optimisers; each group's lr is the schedule's lr times its
`lr_scale` (Muon's: train.muon_lr / train.lr).
"""
from __future__ import annotations

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # modded-nanogpt's quintic: fast convergence of singular values to ~1
NS_STEPS = 5


def orthogonalise(g: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T (singular values pushed into ~[0.7, 1.2]), by Newton-Schulz iteration
    in bf16 on a GPU (as the speedruns do) and fp32 elsewhere."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    wide = x.size(0) <= x.size(1)
    if not wide:
        x = x.mT
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.mT).to(g.dtype)


class Muon(torch.optim.Optimizer):
    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], momentum: float,
                 eps: float = 1e-8):
        defaults = dict(lr=lr, betas=betas, eps=eps, momentum=momentum, weight_decay=0.0, muon=False, lr_scale=1.0)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                if group["muon"]:
                    self.muon_update(p, group)
                else:
                    self.adamw_update(p, group)
        return loss

    def muon_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - group["momentum"])
        update = orthogonalise(p.grad.lerp(buf, group["momentum"]))  # Nesterov
        p.add_(update, alpha=-group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5)

    def adamw_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = float(state["step"])
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** step))


def muon_groups(model: torch.nn.Module, weight_decay: float, lr_scale: float, decays) -> list[dict]:
    """The blocks' nn.Linear weights go to Muon; the rest to AdamW (decay as for AdamW: `decays(name, p)`)."""
    hidden = {id(m.weight) for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if id(p) in hidden], "muon": True, "lr_scale": lr_scale,
               "weight_decay": weight_decay},
              {"params": [p for n, p in named if id(p) not in hidden and decays(n, p)], "weight_decay": weight_decay},
              {"params": [p for n, p in named if id(p) not in hidden and not decays(n, p)], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
