"""Drop-in modules built on the pem_kernels ops.

- :class:`PEMCrossAttention`: PEM's prototype-based masked cross-attention (the official
  ``PEM_CA``).
- :class:`MaskedCrossAttention`, :class:`SDPAMaskedCrossAttention`: Mask2Former's masked
  cross-attention with the same interface, the baselines PEM-CA is compared against.
- :class:`DeformConv2d`: a drop-in for ``torchvision.ops.DeformConv2d``;
  :class:`ModulatedDeformConv2d`: DCNv2 owning its zero-initialized offset/mask conv (PEM's
  ``DeformLayer``).
"""

from pem_kernels.nn.deform_conv import DeformConv2d, ModulatedDeformConv2d
from pem_kernels.nn.baselines import MaskedCrossAttention, SDPAMaskedCrossAttention
from pem_kernels.nn.pem_cross_attention import LocalRepresentation, PEMCrossAttention

__all__ = [
    "DeformConv2d",
    "LocalRepresentation",
    "MaskedCrossAttention",
    "ModulatedDeformConv2d",
    "PEMCrossAttention",
    "SDPAMaskedCrossAttention",
]
