"""Public ops: typed functions that check their arguments and dispatch to a backend."""

from pem_kernels.ops.deform_conv import deform_conv2d
from pem_kernels.ops.prototype_attention import prototype_attention
from pem_kernels.ops.prototype_select import prototype_select

__all__ = ["deform_conv2d", "prototype_attention", "prototype_select"]
