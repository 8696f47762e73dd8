"""Pure-PyTorch reference ops: the executable specification every backend is tested against.

They import neither the compiled extension nor Triton, so they run wherever torch runs.
"""

from pem_kernels.reference.deform_conv import deform_conv2d_ref
from pem_kernels.reference.prototype_attention import prototype_attention_ref
from pem_kernels.reference.prototype_select import prototype_select_ref

__all__ = ["deform_conv2d_ref", "prototype_attention_ref", "prototype_select_ref"]
