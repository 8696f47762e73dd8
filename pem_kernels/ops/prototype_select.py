"""``prototype_select``: the masked argmax + gather of PEM's cross-attention, fused.

Backends: ``reference`` (pure PyTorch, materializes the similarity), ``cpu`` (C++, streaming
argmax over pixel tiles), ``cuda`` (C++/CUDA, split-pixel tiles; what ``"auto"`` picks for CUDA
tensors: it passed the GPU tests and beat the reference at every size of the H200 run, fp32 and
bf16), ``triton`` (``pem_kernels.triton.prototype_select``: CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``; fp32/fp16/bf16; faster than ``cuda`` from 32768 pixels on, slower below
(launch overhead) in that run, and its torch.compile fix has not run on a GPU yet, so ``"auto"``
does not pick it). The registered op is ``torch.ops.pem_kernels.prototype_select``; its backward
is the registered op ``torch.ops.pem_kernels._prototype_select_backward``. The Triton backend
registers its own pair, ``pem_kernels::prototype_select_triton`` and
``_prototype_select_backward_triton``.
"""

from __future__ import annotations

import functools

import torch

from pem_kernels._backends import (
    OpBackends,
    autocast_inputs,
    call_op,
    compiled_kernel,
    inference_only_autograd,
    reference_context,
    refuse_forward_ad,
    register_op_backends,
    triton_kernel,
)
from pem_kernels._extension import EXTENSION_LOADED
from pem_kernels.reference.prototype_select import (
    EMPTY_MASK_RULES,
    EmptyMaskRule,
    prototype_select_ref,
)

__all__ = ["prototype_select"]

# Mask logits each compiled backend's kernel reads itself; any others get ~(logits < 0) first.
MASK_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOGITS_READ = {"triton": MASK_LOGIT_DTYPES, "cuda": MASK_LOGIT_DTYPES, "cpu": (torch.float32,)}


_BACKENDS = register_op_backends(
    OpBackends(
        "prototype_select",
        availability={
            "cpu": compiled_kernel("prototype_select", "CPU", "cpu"),
            "cuda": compiled_kernel("prototype_select", "CUDA", "cuda"),
            "triton": triton_kernel,
        },
        # fp32 on a GPU: the Triton kernel first. On the H200 (2026-11-27) it took half the CUDA
        # kernel's device time at every size from 2048 to 131072 px (0.111 vs 0.216 ms at
        # 32768), and the PEM-CA layer with it 0.487 against 0.582 ms at 32768 px and 1.499
        # against 1.826 at 131072 (a tie at 8192, where the layer is host-bound). 16-bit keys
        # keep the CUDA kernel: the Triton one was faster on the device there too, but its
        # latency was the slower up to 32768 px and the layer was not timed with it.
        auto_order={
            "cpu": ("cpu",), "cuda": ("cuda",), ("cuda", torch.float32): ("triton", "cuda"),
        },
    )
)


def _check_args(
    keys: torch.Tensor,
    queries: torch.Tensor,
    mask: torch.Tensor | None,
    num_heads: int,
    empty: str,
) -> None:
    if not isinstance(keys, torch.Tensor) or keys.dim() != 3:
        shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
        raise ValueError(f"keys: expected a Tensor[B, HW, C], got {shape}")
    if not isinstance(queries, torch.Tensor) or queries.dim() != 3:
        shape = (
            tuple(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__
        )
        raise ValueError(f"queries: expected a Tensor[B, N, C], got {shape}")
    if not keys.dtype.is_floating_point:
        raise TypeError(f"keys: expected a floating dtype, got {keys.dtype}")
    if queries.dtype != keys.dtype:
        raise TypeError(f"queries: dtype {queries.dtype} must equal keys.dtype {keys.dtype}")
    if queries.device != keys.device:
        raise ValueError(f"queries: on {queries.device}, expected keys' device {keys.device}")
    batch, pixels, channels = keys.shape
    if queries.shape[0] != batch or queries.shape[2] != channels:
        raise ValueError(
            f"queries: expected shape [B, N, C] = [{batch}, N, {channels}] to match keys, "
            f"got {list(queries.shape)}"
        )
    if pixels < 1:
        raise ValueError(
            f"keys: expected at least one pixel (HW >= 1), got shape {list(keys.shape)}"
        )
    if (
        isinstance(num_heads, bool)
        or not isinstance(num_heads, int)
        or num_heads < 1
        or channels % num_heads
    ):
        raise ValueError(
            f"num_heads: expected a positive divisor of C = {channels}, got {num_heads!r}"
        )
    if empty not in EMPTY_MASK_RULES:
        raise ValueError(f"empty: expected one of {EMPTY_MASK_RULES}, got {empty!r}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or not (
            mask.dtype == torch.bool or mask.dtype.is_floating_point
        ):
            kind = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(
                f"mask: expected a bool or floating (mask logits) Tensor[B, N, HW] or None, "
                f"got {kind}"
            )
        expected = [batch, queries.shape[1], pixels]
        if list(mask.shape) != expected:
            raise ValueError(
                f"mask: expected shape [B, N, HW] = {expected}, got {list(mask.shape)}"
            )
        if mask.device != keys.device:
            raise ValueError(f"mask: on {mask.device}, expected keys' device {keys.device}")


def prototype_select(
    keys: torch.Tensor,
    queries: torch.Tensor,
    mask: torch.Tensor | None,
    num_heads: int,
    *,
    empty: EmptyMaskRule = "per_query",
    normalize_keys: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selects, per head and query, the allowed pixel most similar to the query, and gathers it.

    Semantics are those of :func:`pem_kernels.reference.prototype_select_ref` (ties to the lowest
    index, NaN scores larger than any number, the two empty-mask rules). The fused backends stream
    over pixels and never build the [B, heads, HW, N] similarity. Backward: gradient to ``keys``
    at the selected pixels only (deterministic), none to ``queries`` or ``mask``.

    The fused backends sum the scores in fp32 (fp64 for fp64 inputs); the ``reference`` computes
    in the input dtype. fp32 products: IEEE on the ``cpu`` backend; on the ``cuda`` and
    ``triton`` backends tensor cores, 3xTF32 (fp32 accuracy, not IEEE's bits: pixels whose scores
    tie within about 1e-6 may be chosen differently) unless PyTorch allows TF32 (then TF32) or
    ``PEM_KERNELS_FP32_DOT=ieee`` (IEEE). See the README's "fp32 precision".

    Args:
        keys: Tensor[B, HW, C] float64/float32/float16/bfloat16.
        queries: Tensor[B, N, C], the same dtype and device as ``keys``.
        mask: Tensor[B, N, HW] bool, True = may be selected; or the floating mask logits
            themselves, a pixel allowed where its logit is not < 0 (PEM's rule: ``logit < 0``
            blocks, so a NaN logit allows), which the kernels read directly (``triton`` and
            ``cuda`` fp32, fp16 or bf16, ``cpu`` fp32: no bool copy) and the ``reference``
            converts first; or ``None`` to allow every pixel.
        num_heads: heads are contiguous channel chunks of ``C // num_heads``.
        empty: ``"per_query"`` (Mask2Former: an empty query selects over all pixels) or
            ``"official"`` (the PEM code: an image is unmasked only if all its queries are empty;
            an empty query otherwise gets pixel 0).
        normalize_keys: L2-normalize each pixel's full C-vector before scoring and gathering
            (as the official layer does), without materializing the normalized keys.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        prototypes: Tensor[B, N, C] in ``keys.dtype``; indices: Tensor[B, num_heads, N] int64.

    Example::

        >>> keys, queries = torch.randn(1, 64, 32), torch.randn(1, 5, 32)
        >>> mask = torch.rand(1, 5, 64) > 0.5
        >>> prototypes, indices = prototype_select(keys, queries, mask, num_heads=4)

    Under ``torch.autocast``, keys and queries are cast to the autocast dtype first.
    """
    if isinstance(keys, torch.Tensor):
        keys, queries = autocast_inputs(keys.device, keys, queries)
    _check_args(keys, queries, mask, num_heads, empty)
    chosen = _BACKENDS.resolve(backend, keys.device, keys.dtype)
    return run_prototype_select(chosen, keys, queries, mask, num_heads, empty, normalize_keys)


def run_prototype_select(
    chosen: str,
    keys: torch.Tensor,
    queries: torch.Tensor,
    mask: torch.Tensor | None,
    num_heads: int,
    empty: EmptyMaskRule,
    normalize_keys: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`prototype_select` on the backend ``chosen`` (a name ``resolve`` returned, not
    ``"auto"``), for callers that checked the arguments themselves and cast them under autocast:
    :class:`pem_kernels.nn.PEMCrossAttention`, whose own tensors they are (a layer call is
    host-bound on a GPU, and checking them again costs about 10 us)."""
    if (
        mask is not None and mask.dtype != torch.bool
        and mask.dtype not in _LOGITS_READ.get(chosen, ())
    ):
        mask = ~(mask < 0)
    if chosen == "reference":
        with reference_context(keys.device):
            return prototype_select_ref(
                keys, queries, mask, num_heads, empty=empty, normalize_keys=normalize_keys
            )
    refuse_forward_ad("prototype_select", (keys, queries))
    if chosen == "triton":
        call_triton_op, prototype_select_triton = _triton_op()
        return call_triton_op(
            prototype_select_triton, keys, queries, mask, num_heads, empty == "official",
            normalize_keys,
        )
    return call_op(
        torch.ops.pem_kernels.prototype_select.default, keys, queries, mask, num_heads,
        empty == "official", normalize_keys,
    )


@functools.cache
def _triton_op():
    """(call_triton_op, the Triton op), imported on first use so that ``import pem_kernels``
    never imports triton (and once: an import statement costs a microsecond per call)."""
    from pem_kernels.triton import call_triton_op
    from pem_kernels.triton.prototype_select import prototype_select_triton

    return call_triton_op, prototype_select_triton


def autograd_functions(backward_op):
    """(backward, setup_context) for ``register_autograd`` of a prototype_select op whose keys
    gradient is ``backward_op(grad_prototypes, keys, indices, normalize_keys)``; shared by the C++
    and Triton ops."""

    def setup_context(ctx, inputs, output) -> None:
        keys, _queries, _mask, _num_heads, _official_empty, normalize_keys = inputs
        _prototypes, indices = output
        ctx.save_for_backward(keys, indices)
        ctx.normalize_keys = normalize_keys
        ctx.mark_non_differentiable(indices)

    def backward(ctx, grad_prototypes, _grad_indices):
        keys, indices = ctx.saved_tensors
        grad_keys = None
        if ctx.needs_input_grad[0]:
            grad_keys = backward_op(grad_prototypes, keys, indices, ctx.normalize_keys)
        return grad_keys, None, None, None, None, None

    return backward, setup_context


if EXTENSION_LOADED:

    @torch.library.register_fake("pem_kernels::prototype_select")
    def _prototype_select_fake(keys, queries, mask, num_heads, official_empty, normalize_keys):
        torch._check(keys.dim() == 3 and queries.dim() == 3, lambda: "keys/queries must be 3-D")
        torch._check(keys.shape[2] % num_heads == 0, lambda: "num_heads must divide C")
        batch, _, channels = keys.shape
        num_queries = queries.shape[1]
        prototypes = keys.new_empty(batch, num_queries, channels)
        indices = keys.new_empty(batch, num_heads, num_queries, dtype=torch.long)
        return prototypes, indices

    @torch.library.register_fake("pem_kernels::_prototype_select_backward")
    def _prototype_select_backward_fake(grad_prototypes, keys, indices, normalize_keys):
        return torch.empty_like(keys)

    _backward, _setup_context = autograd_functions(
        lambda *args: call_op(torch.ops.pem_kernels._prototype_select_backward.default, *args)
    )
    torch.library.register_autograd(
        "pem_kernels::prototype_select", _backward, setup_context=_setup_context
    )
    # Without a registration torch would differentiate the backward as a constant (zero second
    # derivatives with only a warning); the kernels give first-order gradients only.
    _no_double_backward, _no_double_backward_setup = inference_only_autograd(
        "pem_kernels.prototype_select: double backward (differentiating its keys gradient, "
        "as create_graph=True does) is not supported by the fused kernels; use "
        "backend='reference'"
    )
    torch.library.register_autograd(
        "pem_kernels::_prototype_select_backward", _no_double_backward,
        setup_context=_no_double_backward_setup,
    )
