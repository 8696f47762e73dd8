"""Drop-in modules built on the pem_kernels ops.

- :class:`PEMCrossAttention`: PEM's prototype-based masked cross-attention (the official ``PEM_CA``).
- :class:`MaskedCrossAttention`, :class:`SDPAMaskedCrossAttention`: Mask2Former's masked
  cross-attention with the same interface, the baselines PEM-CA is compared against.
"""

from pem_kernels.nn.baselines import MaskedCrossAttention, SDPAMaskedCrossAttention
from pem_kernels.nn.pem_cross_attention import LocalRepresentation, PEMCrossAttention

__all__ = [
    "LocalRepresentation",
    "MaskedCrossAttention",
    "PEMCrossAttention",
    "SDPAMaskedCrossAttention",
]
