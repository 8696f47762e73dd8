"""Backend selection shared by every public op.

Each public function takes ``backend=`` one of :data:`BACKENDS`. ``"auto"`` (the default) picks
the first backend of the op's validated order for the tensor's device that is available; otherwise
the reference runs. Environment variables override ``"auto"``: ``PEM_KERNELS_BACKEND_<OP>`` for
one op (its name in capitals, other characters as ``_``: ``PEM_KERNELS_BACKEND_PROTOTYPE_SELECT``,
``PEM_KERNELS_BACKEND_PEM_CA_PROJECTIONS``), else ``PEM_KERNELS_BACKEND`` for every op. An
explicitly requested backend that cannot run raises :class:`BackendUnavailableError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Callable, Iterable

import torch
import torch.autograd.forward_ad as forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["BACKENDS", "BackendUnavailableError", "OpBackends", "autocast_enabled",
           "available_backends", "call_op", "functorch_differentiating", "has_forward_ad_tangent",
           "inference_only_autograd", "plain_eager_call", "refuse_forward_ad"]

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
_logger = logging.getLogger("pem_kernels")
_logged_choices: set[tuple[str, str, str]] = set()


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this op on these inputs."""


class OpBackends:
    """The backends of one op.

    Args:
        op_name: the op's name, used in messages.
        availability: backend name -> function(device, dtype) returning ``None`` when the backend
            can run, or a short reason why not.
        auto_order: device type -> backends that ``"auto"`` tries in order before the reference;
            a (device type, dtype) key takes precedence for that dtype (a kernel measured faster
            in one dtype only). Only backends validated on that device belong here.
    """

    def __init__(
        self,
        op_name: str,
        availability: dict[str, Callable[[torch.device, torch.dtype], str | None]],
        auto_order: dict[str | tuple[str, torch.dtype], tuple[str, ...]],
    ) -> None:
        self.op_name = op_name
        self.availability = {"reference": lambda device, dtype: None, **availability}
        self.auto_order = auto_order
        # Checked before PEM_KERNELS_BACKEND: one op moved to another backend, the others left
        # to "auto" (how a benchmark times the PEM-CA layer with one op's other kernel).
        self.environment_variable = "PEM_KERNELS_BACKEND_" + re.sub(
            "[^A-Z0-9]+", "_", op_name.upper()
        )

    def unavailable_reason(
        self, backend: str, device: torch.device, dtype: torch.dtype
    ) -> str | None:
        check = self.availability.get(backend)
        if check is None:
            return f"{self.op_name} has no {backend!r} backend yet"
        return check(device, dtype)

    def resolve(self, backend: str, device: torch.device, dtype: torch.dtype) -> str:
        """Returns the concrete backend to run, or raises a clear error."""
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if backend == "auto":
            backend = self._environment_backend()
        differentiating = functorch_differentiating()
        if backend == "auto":
            chosen = "reference"
            for candidate in () if differentiating else self._auto_candidates(device, dtype):
                if self.unavailable_reason(candidate, device, dtype) is None:
                    chosen = candidate
                    break
        else:
            reason = self.unavailable_reason(backend, device, dtype)
            if reason is None and differentiating and backend != "reference":
                reason = (
                    "torch.func's grad and jvp transforms cannot differentiate the compiled "
                    "kernels; 'auto' runs the reference under them"
                )
            if reason is not None:
                available = [
                    name for name in self.availability
                    if self.unavailable_reason(name, device, dtype) is None
                ]
                raise BackendUnavailableError(
                    f"{self.op_name}: backend {backend!r} is not available for {device.type} "
                    f"tensors of dtype {dtype} ({reason}); available here: {available}"
                )
            chosen = backend
        self._log_once(chosen, device)
        return chosen

    def _auto_candidates(self, device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
        order = self.auto_order.get((device.type, dtype))
        return order if order is not None else self.auto_order.get(device.type, ())

    def _environment_backend(self) -> str:
        """What ``"auto"`` stands for: the op's own environment variable, else the global one,
        else ``"auto"`` (an empty value counts as unset)."""
        for variable in (self.environment_variable, "PEM_KERNELS_BACKEND"):
            value = os.environ.get(variable)
            if value:
                if value not in BACKENDS:
                    raise ValueError(f"{variable}: expected one of {BACKENDS}, got {value!r}")
                return value
        return "auto"

    def _log_once(self, chosen: str, device: torch.device) -> None:
        key = (self.op_name, device.type, chosen)
        if key not in _logged_choices and not torch.compiler.is_compiling():
            _logged_choices.add(key)
            _logger.debug(
                "pem_kernels: %s runs on the %r backend for %s tensors", self.op_name, chosen,
                device.type,
            )


def backend_property() -> property:
    """A module's ``backend`` attribute: one of :data:`BACKENDS`, checked whenever it is set (in
    the constructor, or later as ``module.backend = ...``), so that a misspelled backend is an
    error there rather than at the first forward."""

    def get(module) -> str:
        return module._backend

    def set_checked(module, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {value!r}")
        module._backend = value

    return property(get, set_checked, doc="The backend of the module's ops; see BACKENDS.")


def compiled_kernel(op_name: str, dispatch_key: str, device_type: str):
    """Availability check of a backend that is ``op_name``'s C++ kernel for ``dispatch_key``."""
    from pem_kernels._extension import EXTENSION_ERROR, EXTENSION_LOADED, has_kernel

    def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
        if not EXTENSION_LOADED:
            return f"the compiled extension is not loaded: {EXTENSION_ERROR}"
        if not has_kernel(op_name, dispatch_key):
            return f"pem_kernels._C was built without the {dispatch_key} kernel"
        if device.type != device_type:
            return f"it runs on {device_type} tensors"
        return None

    return unavailable_reason


def triton_kernel(device: torch.device, dtype: torch.dtype) -> str | None:
    """Availability check of a Triton backend (CUDA tensors, or CPU ones under the interpreter)."""
    # pem_kernels.triton itself does not import triton; the check tries the import once.
    from pem_kernels.triton import triton_backend_unavailable_reason

    return triton_backend_unavailable_reason(device, dtype)


_REGISTRY: dict[str, OpBackends] = {}


def register_op_backends(op_backends: OpBackends) -> OpBackends:
    _REGISTRY[op_backends.op_name] = op_backends
    return op_backends


def available_backends(
    op_name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> list[str]:
    """Names of the backends of ``op_name`` that can run on ``device`` with ``dtype``."""
    if op_name not in _REGISTRY:
        raise ValueError(f"op_name: expected one of {sorted(_REGISTRY)}, got {op_name!r}")
    ops = _REGISTRY[op_name]
    device = torch.device(device)
    return [
        name for name in ops.availability if ops.unavailable_reason(name, device, dtype) is None
    ]


def functorch_differentiating() -> bool:
    """Whether a torch.func transform that differentiates (``grad``, ``vjp``, ``jacrev``,
    ``jvp``, ``jacfwd``, ``hessian``) is active. Custom ops have no functorch autograd rule, so
    under these only the reference (plain ATen ops) can run; ``vmap`` alone works with the
    kernels."""
    if not torch._C._are_functorch_transforms_active():
        return False
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(
        interpreter.key() in (TransformType.Grad, TransformType.Jvp)
        for interpreter in retrieve_all_functorch_interpreters()
    )


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False on devices autocast does not exist for
    (``meta``, where torch raises instead: a meta-device dry run must not fail on the check).

    Under torch.compile the availability check is left out: Dynamo of torch 2.11 cannot trace
    ``torch._C._is_autocast_available`` (a graph break, an error with ``fullgraph=True``; seen on
    an H200), and the devices it compiles for have autocast."""
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device_type):
        return False
    return torch.is_autocast_enabled(device_type)


def autocast_inputs(device: torch.device, *tensors: torch.Tensor | None) -> tuple:
    """The op's floating-point tensors in the autocast dtype when autocast is on for ``device``.

    Under ``torch.autocast`` the pem_kernels ops run in the lower precision, as matmul and conv
    do (their kernels accumulate in fp32): every floating tensor argument is cast to the autocast
    dtype, so fp32 weights meet fp16/bf16 activations without a dtype error. This is what PEM's
    official code does for its deformable conv (it casts the weight to the input dtype).
    Outside autocast the tensors come back unchanged.
    """
    if not autocast_enabled(device.type):
        return tensors
    dtype = torch.get_autocast_dtype(device.type)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        for t in tensors
    )


def reference_context(device: torch.device) -> contextlib.AbstractContextManager:
    """Where an op runs its reference on inputs :func:`autocast_inputs` has cast: autocast off.

    The reference then computes in the dtype of its (already cast) inputs, as the kernels do;
    left on, CUDA autocast would run parts of it (``F.normalize``'s norm) in fp32, so the op's
    result under autocast would differ from the op on the cast inputs.
    """
    if autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# Tensor types that carry no dispatch behaviour of their own.
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def plain_eager_call(args: Iterable) -> bool:
    """Whether an op call with arguments ``args`` (the tensors among them matter; anything else,
    None included, is skipped) may skip torch's Python dispatch of custom ops.

    True for an eager call that records no gradient (grad mode off, or no tensor requires grad)
    on plain tensors, with no torch.compile / export / jit tracing, functorch transform or
    dispatch mode (FakeTensorMode, ...) active. Such a call needs nothing from the dispatcher's
    layers above the kernel, whose Python custom-op machinery costs tens of microseconds per call:
    most of the host time of an op on a GPU-sized problem of PEM's size.
    """
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    if torch._C._are_functorch_transforms_active() or torch._C._get_tracing_state() is not None:
        return False
    grad_mode = torch.is_grad_enabled()
    for arg in args:
        if isinstance(arg, torch.Tensor) and (
            type(arg) not in _PLAIN_TENSOR_TYPES or (grad_mode and arg.requires_grad)
        ):
            return False
    return True


def call_op(op: torch._ops.OpOverload, *args):
    """``op(*args)`` for a C++ op of the extension. In a :func:`plain_eager_call` it runs below
    autograd (straight to the device kernel: no autograd node is needed when no gradient is
    recorded, and the Python autograd layer of a custom op is skipped); otherwise through the
    full dispatcher."""
    if plain_eager_call(args):
        with torch._C._AutoDispatchBelowADInplaceOrView():
            return op(*args)
    return op(*args)


def has_forward_ad_tangent(tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether any of ``tensors`` is a forward-mode AD dual tensor with a tangent."""
    if forward_ad._current_level < 0:  # no dual level is open: nothing can carry a tangent
        return False
    return any(
        isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None
        for t in tensors
    )


def refuse_forward_ad(op_name: str, tensors: Iterable[torch.Tensor | None]) -> None:
    """The compiled kernels have no forward-mode AD formula, and a custom op would drop a dual
    tensor's tangent without a word: refuse dual tensors with a clear error instead."""
    if has_forward_ad_tangent(tensors):
        raise NotImplementedError(
            f"{op_name}: forward-mode AD (dual tensors) is not supported by the fused kernels; "
            "use reverse mode (backward) or backend='reference'"
        )


def inference_only_autograd(message: str) -> tuple[Callable, Callable]:
    """(backward, setup_context) for ``register_autograd`` of an op that must not be
    differentiated (an op that serves inference only, or a backward op, whose own derivative
    the kernels do not give): its backward raises ``RuntimeError(message)``, a clear error
    instead of a silently missing gradient when someone differentiates through it."""

    def setup_context(ctx, inputs, output) -> None:
        """Nothing to save."""

    def backward(ctx, *grad_outputs):
        raise RuntimeError(message)

    return backward, setup_context
