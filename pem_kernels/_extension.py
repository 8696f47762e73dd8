"""Loads the compiled extension ``pem_kernels._C`` if it is there.

Importing ``_C`` registers every op schema (``torch.ops.pem_kernels.*``) and the C++ kernels built
into it. Without it the package still imports and runs the pure-PyTorch reference backend.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

__all__ = ["EXTENSION_LOADED", "EXTENSION_ERROR", "has_kernel"]

EXTENSION_ERROR: str | None = None
if importlib.util.find_spec("pem_kernels._C") is None:
    # Python's own error for a module that is not there blames a circular import here.
    EXTENSION_LOADED = False
    EXTENSION_ERROR = (
        "it was not built (no pem_kernels/_C*.so: installed with PEM_KERNELS_SKIP_EXT=1, or "
        "its build failed)"
    )
else:
    try:
        from pem_kernels import _C  # noqa: F401  (imported for its op registrations)

        EXTENSION_LOADED = True
    except ImportError as error:  # built against another torch, or a missing library
        EXTENSION_LOADED = False
        EXTENSION_ERROR = str(error)
if not EXTENSION_LOADED:
    warnings.warn(
        f"pem_kernels: the compiled extension pem_kernels._C could not be loaded "
        f"({EXTENSION_ERROR}); only the pure-PyTorch 'reference' backend is available. "
        "Reinstall with `pip install --no-build-isolation .` to build it.",
        RuntimeWarning,
        stacklevel=2,
    )


_OPS = (
    "prototype_select",
    "_prototype_select_backward",
    "prototype_attention",
    "deform_conv2d",
    "_deform_conv2d_backward",
    "local_representation",
    "query_projection",
)
_DISPATCH_KEYS = ("CPU", "CUDA")
# Looked up once: the registrations are static, and a plain set lookup stays traceable by
# torch.compile (the dispatcher query itself is not).
_COMPILED_KERNELS = frozenset(
    (op, key)
    for op in (_OPS if EXTENSION_LOADED else ())
    for key in _DISPATCH_KEYS
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"pem_kernels::{op}", key)
)


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether ``pem_kernels::<op_name>`` has a compiled kernel for ``dispatch_key``
    ("CPU", "CUDA")."""
    return (op_name, dispatch_key) in _COMPILED_KERNELS
