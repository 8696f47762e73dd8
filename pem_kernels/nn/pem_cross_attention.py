"""PEM's prototype-based masked cross-attention (PEM-CA), as a drop-in for the official
``PEM_CA``."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pem_kernels._backends import autocast_enabled, backend_property, has_forward_ad_tangent
from pem_kernels.ops.local_representation import (
    FUSED_LOCAL_REPRESENTATION_BACKENDS,
    PROJECTION_BACKENDS,
    fused_local_representation,
    normalizes_in_kernel,
)
from pem_kernels.ops.prototype_attention import (
    _BACKENDS as ATTENTION_BACKENDS,
    prototype_attention,
    run_prototype_attention,
)
from pem_kernels.ops.query_projection import (
    FUSED_QUERY_PROJECTION_BACKENDS,
    fused_query_projection,
)
from pem_kernels.ops.prototype_select import (
    _BACKENDS as SELECT_BACKENDS,
    prototype_select,
    run_prototype_select,
)
from pem_kernels.reference.prototype_attention import ATTENTION_NORM_AXES, AttentionNormAxis
from pem_kernels.reference.prototype_select import EMPTY_MASK_RULES, EmptyMaskRule

__all__ = ["LocalRepresentation", "PEMCrossAttention"]


class LocalRepresentation(nn.Module):
    """PEM-CA's feature projection: BatchNorm -> depthwise 3x3 conv -> flatten -> Linear.

    Parameter names follow the official module (``bn``, ``to_query_3x3``, ``out``). The official
    code hard-codes ``nn.SyncBatchNorm``; this uses ``nn.BatchNorm2d``, which has the same
    parameters and buffers (convert with ``nn.SyncBatchNorm.convert_sync_batchnorm`` for DDP).

    Args:
        d_model: channels C.

    Shapes: Tensor[B, C, H, W] -> Tensor[B, H*W, C].
    """

    def __init__(self, d_model: int = 256) -> None:
        super().__init__()
        self.to_query_3x3 = nn.Conv2d(d_model, d_model, 3, groups=d_model, padding=1)
        self.bn = nn.BatchNorm2d(d_model)
        self.out = nn.Linear(d_model, d_model)
        self.d_model = d_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.to_query_3x3(self.bn(x))
        return self.out(local.flatten(2).transpose(1, 2))

    def project(self, memory: torch.Tensor, pos: torch.Tensor | None, backend: str) -> torch.Tensor:
        """``self(memory + pos)``; for inference on the ``cpu`` or ``triton`` backend one fused
        kernel computes it in a single pass, on the ``cuda`` backend one kernel and a cuBLAS GEMM
        (:mod:`pem_kernels.ops.local_representation`). ``"auto"`` resolves through
        ``PROJECTION_BACKENDS`` there: the modules on a GPU until the CUDA kernel is validated.

        The fused kernel runs when BN is in eval mode, no gradient is needed, autocast is off and
        all tensors share one dtype; otherwise the modules run (same result up to rounding).
        """
        return self._project(memory, pos, backend, normalize=False)[0]

    def project_for_selection(
        self, memory: torch.Tensor, pos: torch.Tensor | None, backend: str
    ) -> tuple[torch.Tensor, bool]:
        """(keys, normalized): :meth:`project`, but where the fused kernel runs and can do it in
        its kernel it also L2-normalizes every pixel's keys (``normalized`` True), which PEM-CA's
        prototype selection would otherwise do itself (``normalize_keys``). Everywhere else
        (the modules' path, the exact-fp32 Triton path) that is left to the selection
        (``normalized`` False), whose fused normalization needs no [B, HW, C] copy of the
        normalized keys and differentiates through them."""
        return self._project(memory, pos, backend, normalize=True)

    def _project(
        self, memory: torch.Tensor, pos: torch.Tensor | None, backend: str, normalize: bool,
        *, resolved: bool = False,
    ) -> tuple[torch.Tensor, bool]:
        """(keys, normalized) of :meth:`project` (``normalize=False``) or
        :meth:`project_for_selection`. ``resolved``: ``backend`` is a name that ``resolve`` already
        returned for these tensors (:class:`PEMCrossAttention` resolves once per call)."""
        # Every parameter and buffer read once per call: each nn.Module attribute lookup costs
        # about a microsecond of host time, and a GPU-sized layer call is host-bound.
        bn, conv, out = self.bn, self.to_query_3x3, self.out
        if not self._kernel_modules(bn, conv, out):
            return self(memory + pos if pos is not None else memory), False
        weights = (conv.weight, conv.bias, out.weight, out.bias)
        bn_sources = (bn.running_mean, bn.running_var, bn.weight, bn.bias)
        # (Biases rebuilt away: the kernel adds them.)
        if weights[1] is not None and weights[3] is not None and self._fusable(
            memory, pos, bn.training, weights, bn_sources
        ):
            chosen = backend if resolved else PROJECTION_BACKENDS.resolve(
                backend, memory.device, memory.dtype
            )
            if chosen in FUSED_LOCAL_REPRESENTATION_BACKENDS:
                normalize = normalize and normalizes_in_kernel(
                    chosen, memory.dtype, weights[2].shape[0]
                )
                # The kernels apply the BatchNorm from its statistics: nothing computed here,
                # nothing cached (BatchNorm's training forward and fused optimizers change these
                # tensors without bumping their versions).
                keys = fused_local_representation(
                    chosen, memory, pos, *bn_sources, bn.eps, *weights, normalize
                )
                if keys is not None:
                    return keys, normalize
        return self(memory + pos if pos is not None else memory), False

    @staticmethod
    def _kernel_modules(bn: nn.Module, conv: nn.Module, out: nn.Module) -> bool:
        """Whether the modules are still of the kinds the fused kernel computes (a user may
        replace one): BatchNorm2d (or SyncBatchNorm), a depthwise 3x3 conv with padding 1, a
        Linear (their biases are checked with the weights). Exact types: a subclass may change
        forward. Only plain attributes are read here: a layer call on a GPU is host-bound."""
        return (
            type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm)
            and type(conv) is nn.Conv2d and type(out) is nn.Linear
            and conv.in_channels == conv.out_channels == conv.groups
            and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
            and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros"
        )

    @staticmethod
    def _fusable(
        memory: torch.Tensor, pos: torch.Tensor | None, bn_training: bool, weights: tuple,
        bn_sources: tuple,
    ) -> bool:
        """Whether the fused kernel may replace the modules: eval-mode BN with running
        statistics, memory [B, C, H, W] with the modules' C, no gradient to record, no
        forward-AD tangent, autocast off, one dtype."""
        running_mean, running_var = bn_sources[:2]
        if bn_training or running_mean is None or running_var is None or memory.dim() != 4:
            return False
        if memory.shape[1] != weights[0].shape[0]:  # the modules raise their own error
            return False
        if pos is not None and pos.shape != memory.shape:
            return False
        tensors = [t for t in (memory, pos, *weights, *bn_sources) if t is not None]
        grad, dtype = torch.is_grad_enabled(), memory.dtype
        for tensor in tensors:
            if tensor.dtype != dtype or (grad and tensor.requires_grad):
                return False
        # The modules carry tangents, the kernel does not.
        return not has_forward_ad_tangent(tensors) and not autocast_enabled(memory.device.type)


class PEMCrossAttention(nn.Module):
    """Prototype-based masked cross-attention of PEM (CVPR 2024), fused.

    A drop-in replacement for the official ``PEM_CA(d_model, nhead)``: the same constructor
    arguments, parameter names and shapes (a state_dict loads both ways), the same forward
    signature, and by default the same computation:

    1. ``memory + pos`` -> :class:`LocalRepresentation` -> keys [B, HW, C] (for inference on
       the ``cpu`` and ``triton`` backends one fused kernel, on ``cuda`` a kernel and a GEMM:
       :meth:`LocalRepresentation.project`);
       ``tgt + query_pos`` -> LayerNorm -> Linear -> L2-normalized queries [B, Q, C] (for
       inference one fused op on the ``cpu``, ``cuda`` and ``triton`` backends);
    2. per head, the pixel with the largest similarity to the L2-normalized keys among those whose
       mask logit is not negative (:func:`pem_kernels.prototype_select`; the similarity is never
       materialized, and the keys are normalized by the fused projection's kernel where it ran,
       else inside the op with ``normalize_keys=True``);
    3. ``tgt + final(alpha * l2norm(proj(P * q)) + P)`` (:func:`pem_kernels.prototype_attention`).

    Args:
        d_model: channels C.
        nhead: heads (contiguous channel chunks of C / nhead).
        attention_norm: ``"queries"`` (official code: the l2norm runs over the query axis) or
            ``"channels"`` (what the paper writes).
        empty: ``"official"`` (official code: a fully masked query gets pixel 0 unless the whole
            image is masked) or ``"per_query"`` (Mask2Former: it selects over all pixels).
        backend: ``"auto"`` or a backend name passed to both ops; ``"reference"`` runs the
            pure-PyTorch specification.

    Shapes of :meth:`forward`: tgt [Q, B, C], memory [B, C, H, W], memory_mask [B, Q, H, W] (mask
    logits, detached; ``None`` allows every pixel), pos [B, C, H, W] or None, query_pos [Q, B, C]
    or None; returns [Q, B, C].
    """

    backend = backend_property()

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        *,
        attention_norm: AttentionNormAxis = "queries",
        empty: EmptyMaskRule = "official",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"nhead: expected a divisor of d_model = {d_model}, got {nhead}")
        if attention_norm not in ATTENTION_NORM_AXES:
            raise ValueError(
                f"attention_norm: expected one of {ATTENTION_NORM_AXES}, got {attention_norm!r}"
            )
        if empty not in EMPTY_MASK_RULES:
            raise ValueError(f"empty: expected one of {EMPTY_MASK_RULES}, got {empty!r}")
        self.feature_proj = LocalRepresentation(d_model)
        self.query_proj = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, d_model))
        self.proj = nn.Linear(d_model, d_model)
        self.final = nn.Linear(d_model, d_model)
        self.alpha = nn.Parameter(torch.ones(1, 1, d_model))
        self.num_heads = nhead
        self.attention_norm = attention_norm
        self.empty = empty
        self.backend = backend

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None,
        pos: torch.Tensor | None,
        query_pos: torch.Tensor | None,
    ) -> torch.Tensor:
        autocast = autocast_enabled(tgt.device.type)
        self._check_inputs(tgt, memory, memory_mask, pos, query_pos, autocast)
        residual = tgt.transpose(0, 1)
        # The logits themselves: the selection blocks `logit < 0` as the official code does (a NaN
        # logit allows), its kernels while they read them (no bool copy: two launches fewer on a
        # GPU), the reference after a conversion.
        mask_logits = None if memory_mask is None else memory_mask.detach().flatten(2)
        if autocast:
            return self._forward_autocast(tgt, memory, mask_logits, pos, query_pos, residual)
        # The inputs and parameters share a device and dtype (checked), and so do the tensors
        # the ops get: each backend is resolved once, and the ops run on it without checking
        # their arguments again (a layer call on a GPU is host-bound at PEM's sizes).
        device, dtype, backend = memory.device, memory.dtype, self.backend
        chosen = SELECT_BACKENDS.resolve(backend, device, dtype)
        projection = PROJECTION_BACKENDS.resolve(backend, device, dtype)
        keys, normalized = self.feature_proj._project(
            memory, pos, projection, normalize=True, resolved=True
        )
        queries = self._project_queries(tgt, query_pos, projection)
        prototypes, _ = run_prototype_select(
            chosen, keys, queries, mask_logits, self.num_heads, self.empty, not normalized
        )
        proj, final = self.proj, self.final
        out = run_prototype_attention(
            ATTENTION_BACKENDS.resolve(backend, device, dtype), prototypes, queries, residual,
            proj.weight, proj.bias, self.alpha, final.weight, final.bias, self.attention_norm,
        )
        return out.transpose(0, 1)

    def _forward_autocast(self, tgt, memory, mask_logits, pos, query_pos, residual):
        """:meth:`forward` under autocast: the public ops, which run in the autocast dtype."""
        keys, normalized = self.feature_proj.project_for_selection(memory, pos, self.backend)
        queries = self._project_queries(tgt, query_pos, None)
        prototypes, _ = prototype_select(
            keys, queries, mask_logits, self.num_heads, empty=self.empty,
            normalize_keys=not normalized, backend=self.backend,
        )
        out = prototype_attention(
            prototypes, queries, torch.zeros_like(residual), self.proj.weight, self.proj.bias,
            self.alpha, self.final.weight, self.final.bias, normalize=self.attention_norm,
            backend=self.backend,
        )
        # The official layer adds its low-precision output to the residual stream in the
        # stream's dtype (fp32 + fp16 -> fp32), so do the same.
        return (residual + out).transpose(0, 1)

    def _check_inputs(self, tgt, memory, memory_mask, pos, query_pos, autocast: bool) -> None:
        """Errors that name the argument, where the computation would fail deep inside an op
        (or, for a wrong batch, name an internal tensor). pos and query_pos may broadcast to
        memory and tgt, as in the official layer's additions; under autocast (``autocast``) the
        dtypes may differ from the parameters'."""
        if tgt.dim() != 3 or memory.dim() != 4 or tgt.shape[1:] != memory.shape[:2]:
            raise ValueError(
                f"tgt [Q, B, C] and memory [B, C, H, W] must share B and C, got tgt "
                f"{list(tgt.shape)} and memory {list(memory.shape)}"
            )
        for name, extra, base, base_name in (("pos", pos, memory, "memory"),
                                             ("query_pos", query_pos, tgt, "tgt")):
            if extra is None or extra.shape == base.shape:
                continue
            try:
                broadcast = torch.broadcast_shapes(base.shape, extra.shape) == base.shape
            except RuntimeError:
                broadcast = False
            if not broadcast:
                raise ValueError(
                    f"{name}: expected {base_name}'s shape {list(base.shape)} (or one that "
                    f"broadcasts to it), got {list(extra.shape)}"
                )
        alpha = self.alpha
        if memory.shape[1] != alpha.shape[-1]:
            raise ValueError(
                f"memory: {memory.shape[1]} channels (shape {list(memory.shape)}), expected the "
                f"layer's d_model = {alpha.shape[-1]}"
            )
        if memory.shape[2] * memory.shape[3] == 0:
            raise ValueError(
                f"memory: expected at least one pixel to select prototypes from, got shape "
                f"{list(memory.shape)}"
            )
        device, dtype = alpha.device, alpha.dtype
        check_dtype = not autocast
        for name, tensor in (("tgt", tgt), ("memory", memory), ("pos", pos),
                             ("query_pos", query_pos)):
            if tensor is None:
                continue
            if tensor.device != device:
                raise ValueError(
                    f"{name}: on {tensor.device}, expected the layer's device {device} (move the "
                    f"layer with .to())"
                )
            if check_dtype and tensor.dtype != dtype:
                raise TypeError(
                    f"{name}: dtype {tensor.dtype}, expected the layer's parameter dtype "
                    f"{dtype} (cast the layer with .to(), or run under torch.autocast)"
                )
        if memory_mask is not None:
            expected = [memory.shape[0], tgt.shape[0], memory.shape[2], memory.shape[3]]
            if list(memory_mask.shape) != expected:
                raise ValueError(
                    f"memory_mask: expected shape [B, Q, H, W] = {expected}, "
                    f"got {list(memory_mask.shape)}"
                )
            if not memory_mask.dtype.is_floating_point:
                raise TypeError(
                    f"memory_mask: expected floating mask logits, got {memory_mask.dtype}"
                )
            if memory_mask.device != memory.device:
                raise ValueError(
                    f"memory_mask: on {memory_mask.device}, expected memory's device "
                    f"{memory.device}"
                )

    def _project_queries(
        self, tgt: torch.Tensor, query_pos: torch.Tensor | None, chosen: str | None
    ) -> torch.Tensor:
        """``F.normalize(query_proj(tgt + query_pos))`` [B, Q, C] from tgt [Q, B, C]. For
        inference on the ``cpu``, ``cuda`` or ``triton`` backend (``chosen``, the projections'
        resolved backend, ``PROJECTION_BACKENDS``; ``None`` under autocast) one fused op computes it
        (:mod:`pem_kernels.ops.query_projection`): no gradient needed, one dtype, query_pos of
        tgt's shape; otherwise the modules run (same result up to rounding)."""
        query_proj = self.query_proj
        if chosen not in FUSED_QUERY_PROJECTION_BACKENDS:
            return self._query_proj_modules(tgt, query_pos)
        modules = list(query_proj) if isinstance(query_proj, nn.Sequential) else ()
        if len(modules) != 2 or type(modules[0]) is not nn.LayerNorm or type(
            modules[1]
        ) is not nn.Linear:  # a query_proj replaced by something else: run it as it is
            return self._query_proj_modules(tgt, query_pos)
        norm, linear = modules
        ln_weight, ln_bias, weight, bias = norm.weight, norm.bias, linear.weight, linear.bias
        tensors = [tgt, query_pos, ln_weight, ln_bias, weight, bias]
        fusable = (
            ln_weight is not None and ln_bias is not None and bias is not None
            and norm.normalized_shape == (tgt.shape[-1],)
            and (query_pos is None or query_pos.shape == tgt.shape)
            and not (torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in tensors))
            and not has_forward_ad_tangent(tensors)
            and all(t is None or t.dtype == tgt.dtype for t in tensors)
        )
        if fusable:
            queries = fused_query_projection(
                chosen, tgt, query_pos, ln_weight, ln_bias, norm.eps, weight, bias
            )
            if queries is not None:
                return queries
        return self._query_proj_modules(tgt, query_pos)

    def _query_proj_modules(
        self, tgt: torch.Tensor, query_pos: torch.Tensor | None
    ) -> torch.Tensor:
        if query_pos is not None:
            tgt = tgt + query_pos
        return F.normalize(self.query_proj(tgt.transpose(0, 1)), dim=-1)
