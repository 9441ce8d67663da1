"""When the Triton kernels run, and the launch sizes they share.

On CUDA tensors the kernels run on the GPU. On CPU tensors they run only with TRITON_INTERPRET=1 (set before
triton is imported), through Triton's interpreter: slow, for tests. Otherwise the public functions fall back to
their references in `kernels.reference`.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Sequence

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def version_tuple(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '3.9.0' or '3.6.0+git1234abcd'."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise ValueError(f"cannot read a version from {version!r}")
    return int(m.group(1)), int(m.group(2))


TRITON_VERSION = version_tuple(triton.__version__)  # launch configurations that are spill-free differ by version


def _patch_old_interpreter_index() -> None:
    """Triton < 3.7's interpreter turns a scalar into a Python int (a loop bound, say) with int() of a one-element
    array, which numpy 2.x refuses ("only 0-dimensional arrays can be converted to Python scalars"), so every
    kernel with a run-time loop bound failed under the interpreter with triton 3.6 (the GPU machines' version).
    Triton 3.7 squeezes the array first; this does the same for older versions, inside the interpreter's own patch
    scope (undone after each launch, like the rest of its patches)."""
    from triton.runtime import interpreter
    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


if INTERPRET and TRITON_VERSION < (3, 7):
    _patch_old_interpreter_index()


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


@functools.lru_cache(maxsize=256)
def _device_ints(values: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def device_ints(values: Sequence[int], device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A constant index list as a device tensor, made once per (values, device, dtype): a host-to-device copy each
    step would wait for the GPU. Under torch.compile a plain tensor, which the compiler folds into its kernels."""
    if torch.compiler.is_compiling():
        return torch.tensor(list(values), dtype=dtype, device=device)
    return _device_ints(tuple(int(v) for v in values), torch.device(device), dtype)
