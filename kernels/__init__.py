"""charlm's ops: Triton kernels with their plain-PyTorch references (`kernels.reference`).

Each public function runs its Triton kernels on CUDA tensors (and on CPU tensors under TRITON_INTERPRET=1) and
falls back to the reference elsewhere.
"""
from kernels.reference import (IGNORE_INDEX, layernorm_ref, multihead_cross_entropy_ref, rmsnorm_ref,
                               swiglu_packed_ref, swiglu_ref)
from kernels.layernorm import layernorm
from kernels.mhce import multihead_cross_entropy
from kernels.rmsnorm import rmsnorm
from kernels.swiglu import swiglu, swiglu_packed

__all__ = ["IGNORE_INDEX", "layernorm", "layernorm_ref", "multihead_cross_entropy", "multihead_cross_entropy_ref",
           "rmsnorm", "rmsnorm_ref", "swiglu", "swiglu_packed", "swiglu_packed_ref", "swiglu_ref"]
