"""When the Triton kernels run, and the launch sizes they share.

On CUDA tensors the kernels run on the GPU. On CPU tensors they run only with TRITON_INTERPRET=1 (set before
triton is imported), through Triton's interpreter: slow, for tests. Otherwise the public functions fall back to
their references in `kernels.reference`.
"""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


def num_programs(device: torch.device, waves: int = 4) -> int:
    """Programs for a persistent grid: `waves` per SM on a GPU; 4 under the interpreter (each costs ~ms)."""
    if device.type != "cuda":
        return 4
    return waves * torch.cuda.get_device_properties(device).multi_processor_count


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dimension is contiguous (what the kernels index with stride 1), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A (rows, last dim) view with a contiguous last dimension, copying only when the layout allows no view."""
    return unit_stride(t.reshape(-1, t.shape[-1]))
