"""Triton kernels of pem_kernels.

Nothing here imports Triton at package import time: :func:`triton_unavailable_reason` tries the
import once (on first use) and the kernel modules (``pem_kernels.triton.prototype_select``) are
imported only when the ``"triton"`` backend is actually chosen. Without a GPU the kernels run under
Triton's interpreter, which needs ``TRITON_INTERPRET=1`` in the environment *before* Triton is
imported (``tests/conftest.py`` sets it).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Callable

import torch

__all__ = [
    "block_size",
    "call_triton_op",
    "called_directly",
    "check",
    "check_operands",
    "cdiv",
    "cpu_unavailable_reason",
    "dot_operands",
    "fp32_dot_precision",
    "interpreter_requested",
    "launcher",
    "pem_triton_op",
    "triton_backend_unavailable_reason",
    "triton_unavailable_reason",
]

# Dtypes the Triton kernels take (fp32 accumulation); fp64 is not supported.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# None: not tried yet; "": triton imports; otherwise the import error.
_IMPORT_ERROR: list[str | None] = [None]


def triton_unavailable_reason() -> str | None:
    """``None`` when ``import triton`` works, else a short reason (the import is tried once)."""
    if _IMPORT_ERROR[0] is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _IMPORT_ERROR[0] = ""
        except Exception as error:  # ImportError, or a broken install raising anything else
            _IMPORT_ERROR[0] = f"triton cannot be imported ({type(error).__name__}: {error})"
    return _IMPORT_ERROR[0] or None


def check(condition, message: Callable[[], str]) -> None:
    """``torch._check`` for the Triton ops' bodies, minus its cost where it has nothing to do.

    An eager call's conditions are plain ``True``: that returns at once (``torch._check`` takes
    about 5 us, and an op body checks up to ten conditions per call). Anything else, ``False`` or
    a symbolic condition while torch.compile traces, goes to ``torch._check``, which raises
    ``RuntimeError(message())`` or records the condition without guarding on it.
    """
    if condition is True:
        return
    torch._check(condition, message)


def check_operands(op: str, reference: torch.Tensor, operands: dict) -> None:
    """Clear errors for the tensor arguments of a Triton op body, whose kernels index them by
    the shapes they assume (a wrong shape would be an out-of-bounds access, not an error).

    ``operands`` maps a name to ``(tensor or None, shape tuple, dtype or None)``: the tensor must
    have that shape, that dtype (``None``: ``reference``'s) and ``reference``'s device.
    ``reference`` itself must have a dtype the Triton kernels take. (Plain comparisons, no
    generators: this runs on every eager call, a few microseconds per op.)
    """
    dtype, device = reference.dtype, reference.device
    check(
        dtype in TRITON_DTYPES,
        lambda: f"{op}: dtype {dtype} is not supported; expected one of {TRITON_DTYPES}",
    )
    for name, (tensor, shape, expected) in operands.items():
        if tensor is None:
            continue
        check(
            tensor.shape == shape,
            lambda: f"{op}: {name} must have shape {list(shape)}, got {list(tensor.shape)}",
        )
        if expected is None:
            expected = dtype
        check(
            tensor.dtype == expected and tensor.device == device,
            lambda: f"{op}: {name} must be {expected} on {device}, got {tensor.dtype} "
            f"on {tensor.device}",
        )


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids. Host code uses this, not ``triton.cdiv``: Triton's is a
    constexpr function whose argument unwrapping costs microseconds per call."""
    return -(-a // b)


def block_size(n: int, low: int = 1, high: int | None = None) -> int:
    """The smallest power of 2 >= n (1 for n <= 1), clamped to [low, high]: a ``tl.arange``
    extent for ``n`` elements. Plain Python for the reason given at :func:`cdiv`."""
    size = max(low, 1 << max(int(n) - 1, 0).bit_length())
    return size if high is None else min(size, high)


def fp32_matmul_allows_tf32() -> bool:
    """Whether PyTorch's own fp32 matmuls may use TF32 now.

    The legacy ``torch.get_float32_matmul_precision()`` answers as long as only the legacy API
    (or nothing) set the precision, and raises RuntimeError once the per-backend API of newer
    torch (``torch.backends.cuda.matmul.fp32_precision = "tf32"`` or ``torch.backends.
    fp32_precision``) was used too: then that setting decides.
    """
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:
        return torch.backends.cuda.matmul.fp32_precision == "tf32"


# The environment variable that picks the products of exact-fp32 dots (see fp32_dot_precision).
FP32_DOT_ENV = "PEM_KERNELS_FP32_DOT"
_FP32_DOT_CHOICES = ("tf32x3", "ieee")


def fp32_dot_precision() -> str:
    """``input_precision`` of the Triton kernels' ``tl.dot`` on fp32 operands.

    * ``"tf32"`` where PyTorch's fp32 matmuls may use TF32 (:func:`fp32_matmul_allows_tf32`:
      precision "high" or "medium", or the per-backend setting "tf32"), as theirs do.
    * Otherwise (PyTorch's default "highest") ``"tf32x3"``: each operand is split into a TF32
      part and a TF32 remainder and three tensor-core products are summed in fp32. That keeps
      fp32's accuracy (at most about 5e-7 relative error per product, IEEE fp32's is 6e-8; this
      project's fp32 tolerance is 1e-5) at tensor-core speed, where IEEE products held the
      Triton kernels to the FMA units' (about 9 of the H100's 67 fp32 TFLOP/s on 2026-11-26).
      Not bit-identical to IEEE fp32 products.
    * ``"ieee"``, IEEE fp32 products on the FMA units, with ``PEM_KERNELS_FP32_DOT=ieee``
      (``tf32x3``, the default, may be named too).

    The CUDA C++ kernels' tensor-core products follow the same rules
    (``csrc/include/pem_kernels/fp32_products.h``).
    """
    if fp32_matmul_allows_tf32():
        return "tf32"
    choice = os.environ.get(FP32_DOT_ENV, "tf32x3")
    if choice not in _FP32_DOT_CHOICES:
        raise ValueError(f"{FP32_DOT_ENV}: expected one of {_FP32_DOT_CHOICES}, got {choice!r}")
    return choice


_CAPABILITY: dict[int, tuple[int, int]] = {}


def _capability(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


def dot_operands(
    dtype: torch.dtype, interpreted: bool, device: torch.device | None = None
) -> tuple:
    """(DOT_DTYPE, DOT_PRECISION) of the products of a kernel on ``dtype`` inputs (on ``device``),
    as :func:`pem_kernels.triton.products.dot_product` takes them.

    Half-precision inputs multiply in their own dtype (their input_precision is unused); fp32
    ones as :func:`fp32_dot_precision` says, under the interpreter too (``dot_product`` emulates
    the tensor cores' TF32 products there), except on GPUs older than compute capability 8.0,
    which have no TF32 tensor cores (Triton multiplies fp32 on the FMA units there, so 3xTF32
    would be three IEEE passes for one's accuracy): IEEE. Under the interpreter half-precision
    operands are multiplied as fp32 (its half-precision ``tl.dot`` is unreliable; their products
    are exact in fp32 either way).
    """
    import triton.language as tl

    if dtype == torch.float32:
        if (
            not interpreted and device is not None and device.type == "cuda"
            and _capability(device) < (8, 0)
        ):
            return tl.float32, "ieee"
        return tl.float32, fp32_dot_precision()
    if interpreted:
        return tl.float32, "ieee"
    return (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), "tf32"


def interpreter_requested() -> bool:
    """Whether Triton kernels run under the interpreter (``TRITON_INTERPRET=1``): on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def launcher(kernel, interpreted: bool) -> "_OnTensorDevice":
    """What a kernel module's ``triton_op`` launches ``kernel`` through:
    ``launcher(k, I)[grid](...)``.

    Compiled, the launch goes through ``wrap_triton(kernel)``, so that torch.compile and fake
    tensors see it; under the interpreter (``interpreted``, the module's ``INTERPRET``) through the
    kernel itself, since torch.compile does not apply to CPU tensors and torch before 2.12 (2.11 is
    on this project's GPU machines) refuses to wrap an interpreted kernel; in a body run by
    :func:`call_triton_op` also through the kernel itself. Either way the launch runs on the
    device of its first tensor argument (see :class:`_OnTensorDevice`).
    """
    if interpreted or getattr(_DIRECT, "active", False):
        return _OnTensorDevice(kernel)
    from torch.library import wrap_triton

    return _OnTensorDevice(wrap_triton(kernel))


# Set while call_triton_op runs a triton_op's body directly: its launches skip wrap_triton.
_DIRECT = threading.local()
# The Python function of every op made by pem_triton_op.
_BODIES: dict = {}


def pem_triton_op(name: str):
    """``torch.library.triton_op(name, mutates_args=())`` that also keeps the decorated function,
    for :func:`call_triton_op` to run directly."""
    from torch.library import triton_op

    def register(body):
        op = triton_op(name, mutates_args=())(body)
        _BODIES[op] = body
        return op

    return register


def called_directly() -> bool:
    """Whether the op body running now was called by :func:`call_triton_op` directly (from a
    public op or a layer, which checked the arguments), not dispatched as ``torch.ops...``."""
    return getattr(_DIRECT, "active", False)


def call_triton_op(op, *args):
    """``op(*args)`` for an op made by :func:`pem_triton_op`.

    In a :func:`pem_kernels._backends.plain_eager_call` its Python function runs directly and the
    launches go straight to the kernels (what the custom op's eager dispatch ends up doing too,
    after tens of microseconds of Python dispatch per call); otherwise (gradients to record,
    torch.compile, fake tensors) the registered op runs.
    """
    from pem_kernels._backends import plain_eager_call

    if not plain_eager_call(args):
        return op(*args)
    _DIRECT.active = True
    try:
        return _BODIES[op](*args)
    finally:
        _DIRECT.active = False


class _OnTensorDevice:
    """``kernel[grid](*args)`` made current on the GPU of the first tensor argument.

    Triton launches on the *current* CUDA device, and a ``triton_op`` called eagerly sets none:
    tensors on ``cuda:1`` while ``cuda:0`` is current would be touched from the wrong device. The
    guard is entered only when the devices differ (the common case costs one device query) and
    never while torch.compile traces (inductor's generated code guards the device itself).
    """

    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            if torch.compiler.is_compiling():
                return launch(*args, **kwargs)
            for arg in args:
                if isinstance(arg, torch.Tensor):
                    device = arg.device
                    if device.type == "cuda" and device.index != torch.cuda.current_device():
                        with torch.cuda.device(device):
                            return launch(*args, **kwargs)
                    break
            return launch(*args, **kwargs)

        return run


def cpu_unavailable_reason() -> str | None:
    """``None`` when Triton kernels can run on CPU tensors (through the interpreter), else why not.

    ``triton.jit`` chooses interpreter or compiler when a kernel is defined, so kernel modules
    imported before ``TRITON_INTERPRET=1`` was set stay compiled (GPU-only) kernels.
    """
    if not interpreter_requested():
        return "it runs cpu tensors only under the Triton interpreter (TRITON_INTERPRET=1)"
    for name in _KERNEL_MODULES:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "INTERPRET", True) is False:
            return f"{name} was imported before TRITON_INTERPRET=1 was set (compiled kernels)"
    return None


# Checked by name on every call: scanning all of sys.modules cost milliseconds per op call.
_KERNEL_MODULES = tuple(
    f"pem_kernels.triton.{name}"
    for name in (
        "prototype_select", "prototype_attention", "local_representation", "query_projection",
        "deform_conv2d", "products",
    )
)


def triton_backend_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """``None`` when a Triton kernel can run on tensors of ``device`` and ``dtype``, else why not:
    CUDA tensors, or CPU tensors under the interpreter; fp32, fp16 or bf16; triton importable."""
    if device.type == "cpu":
        reason = cpu_unavailable_reason()
        if reason is not None:
            return reason
    elif device.type != "cuda":
        return "it runs on cuda tensors (or cpu tensors under TRITON_INTERPRET=1)"
    if dtype not in TRITON_DTYPES:
        return f"the Triton kernels support float32, float16 and bfloat16, not {dtype}"
    return triton_unavailable_reason()
