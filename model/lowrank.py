"""Low-rank projections (model.low_rank, model.low_rank_targets): a chosen projection W (out x in) becomes the
product U V of an up-projection U (out x r, with W's bias) and a down-projection V (r x in), r = model.low_rank:
r (in + out) weights instead of in x out.

Targets: qkv (the fused query/key/value projection of standard and differential attention), attn_out (attention's
output projection), mlp_in (the MLP's input projection; SwiGLU's packed gate and up), mlp_out (the MLP's output
projection). Initialised so that the product has the entry scale of the full matrix it stands for (each factor
N(0, sqrt(std / sqrt(r)))); `factorize_state_dict` initialises a low-rank model from a full one's weights by
truncated SVD (exact when r reaches min(in, out); the best rank-r approximation otherwise, Eckart-Young).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from model.config import ModelConfig


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)  # V
        self.up = nn.Linear(rank, out_features, bias=bias)  # U, and the projection's bias

    def forward(self, x):
        return self.up(self.down(x))

    @property
    def weight(self) -> torch.Tensor:
        """The product U V (out x in), for code that reads a projection's full matrix (attention over memory)."""
        return self.up.weight @ self.down.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    def init_own(self, std: float) -> None:
        """Both factors N(0, s) with s^4 r = std^2: the entries of U V then have standard deviation std."""
        factor_std = (std * std / self.down.out_features) ** 0.25
        nn.init.normal_(self.down.weight, std=factor_std)
        nn.init.normal_(self.up.weight, std=factor_std)


def make_linear(cfg: ModelConfig, target: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
    """The projection `target` (qkv | attn_out | mlp_in | mlp_out): low-rank where the config asks for it."""
    if cfg.low_rank and target in cfg.low_rank_targets:
        return LowRankLinear(in_features, out_features, cfg.low_rank, bias)
    return nn.Linear(in_features, out_features, bias=bias)


def init_projection(projection: nn.Module | nn.Parameter, std: float) -> None:
    """Entries N(0, std) for a full projection (a module, or the experts' stacked weights), the same scale for the
    product of a low-rank one."""
    if isinstance(projection, LowRankLinear):
        projection.init_own(std)
    else:
        nn.init.normal_(projection if isinstance(projection, nn.Parameter) else projection.weight, std=std)


@torch.no_grad()
def factorize_state_dict(full: dict[str, torch.Tensor], low_rank_model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of `low_rank_model` from a full model's state dict: every LowRankLinear at `name` gets the
    truncated SVD of full[name.weight] (U sqrt(S) and sqrt(S) V^T, computed in fp64) and full[name.bias]; every
    other entry is copied."""
    out = dict(full)
    for name, module in low_rank_model.named_modules():
        if not isinstance(module, LowRankLinear):
            continue
        weight = out.pop(f"{name}.weight")
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        r = module.down.out_features
        root = s[:r].sqrt()
        up, down = u[:, :r] * root, root[:, None] * vh[:r]
        if r > s.shape[0]:  # a rank beyond min(in, out): the extra directions stay zero
            up = torch.cat([up, up.new_zeros(up.shape[0], r - s.shape[0])], dim=1)
            down = torch.cat([down, down.new_zeros(r - s.shape[0], down.shape[1])], dim=0)
        out[f"{name}.up.weight"], out[f"{name}.down.weight"] = up.to(weight.dtype), down.to(weight.dtype)
        if f"{name}.bias" in out:
            out[f"{name}.up.bias"] = out.pop(f"{name}.bias")
    return out

