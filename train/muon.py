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
from torch.optim.adam import adam

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # modded-nanogpt's quintic: fast convergence of singular values to ~1
NS_STEPS = 5


def orthogonalise(g: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T (singular values pushed into ~[0.7, 1.2]), by Newton-Schulz iteration
    in bf16 on a GPU (as the speedruns do) and fp32 elsewhere."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    wide = x.size(-2) <= x.size(-1)  # g may be a stack of matrices of one shape (one batched matmul per product)
    if not wide:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
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
            params = [p for p in group["params"] if p.grad is not None]
            if not group["muon"]:
                self.adamw_update(params, group)
                continue
            same_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
            for p in params:
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                same_shape.setdefault(tuple(p.shape), []).append(p)
            for matrices in same_shape.values():  # orthogonalised together (the cpu preset's Muon update: 40 -> 31 ms)
                self.muon_update(matrices, group)
        return loss

    def muon_update(self, matrices: list[torch.Tensor], group: dict) -> None:
        """One Muon step of matrices of one shape."""
        updates = []
        for p in matrices:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - group["momentum"])
            updates.append(p.grad.lerp(buf, group["momentum"]))  # Nesterov
        rows, cols = matrices[0].shape
        for p, update in zip(matrices, orthogonalise(torch.stack(updates))):
            p.add_(update, alpha=-group["lr"] * max(1.0, rows / cols) ** 0.5)

    def adamw_update(self, params: list[torch.Tensor], group: dict) -> None:
        """torch's AdamW (decoupled decay) on a group's parameters, in its fused form on a CPU (one kernel; the
        for-each form elsewhere, whose step counts may stay on the host as they are stored)."""
        if not params:
            return
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        on_cpu = all(p.device.type == "cpu" for p in params)
        adam(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
             [s["step"] for s in states], fused=on_cpu or None, foreach=None if on_cpu else True,
             decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
             weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def muon_groups(model: torch.nn.Module, weight_decay: float, lr_scale: float, decays) -> list[dict]:
    """The blocks' nn.Linear weights go to Muon; the rest to AdamW (decay as for AdamW: `decays(name, p)`)."""
    hidden = {id(m.weight) for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if id(p) in hidden], "muon": True, "lr_scale": lr_scale,
               "weight_decay": weight_decay},
              {"params": [p for n, p in named if id(p) not in hidden and decays(n, p)], "weight_decay": weight_decay},
              {"params": [p for n, p in named if id(p) not in hidden and not decays(n, p)], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
