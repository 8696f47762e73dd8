"""pem_kernels: fused kernels for PEM (Prototype-based Efficient MaskFormer, CVPR 2024).

Public ops (each takes ``backend=``, see :data:`BACKENDS`):

- :func:`prototype_select`: masked argmax over pixels + gather of PEM's cross-attention.
- :func:`prototype_attention`: the element-wise prototype attention after the gather.
- :func:`deform_conv2d`: modulated deformable convolution, torchvision-compatible.

:mod:`pem_kernels.reference` holds the pure-PyTorch specification of every op.
"""

from pem_kernels import reference
from pem_kernels._backends import BACKENDS, BackendUnavailableError, available_backends
from pem_kernels._extension import EXTENSION_ERROR, EXTENSION_LOADED
from pem_kernels import nn
from pem_kernels.ops import deform_conv2d, prototype_attention, prototype_select

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "EXTENSION_ERROR",
    "EXTENSION_LOADED",
    "available_backends",
    "nn",
    "deform_conv2d",
    "prototype_attention",
    "prototype_select",
    "reference",
]
