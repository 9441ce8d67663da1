"""charlm's ops. `kernels.reference` holds the plain-PyTorch spec of each op; Triton kernels join it op by op."""
from kernels.reference import IGNORE_INDEX, multihead_cross_entropy_ref, rmsnorm_ref, swiglu_ref

__all__ = ["IGNORE_INDEX", "multihead_cross_entropy_ref", "rmsnorm_ref", "swiglu_ref"]
