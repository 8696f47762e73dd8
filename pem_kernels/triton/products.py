"""The ``tl.dot`` products of every Triton kernel of pem_kernels, 3xTF32 included.

:func:`dot_product` is what the kernels call for ``a @ b``: the operands in ``DOT_DTYPE``, the
precision of :func:`pem_kernels.triton.dot_operands`. For fp32 at PyTorch's default precision that
is ``"tf32x3"``: each operand is split into its TF32 part and a TF32 remainder and three
tensor-core products are added in fp32, the cross terms first (fp32 accuracy: about 5e-7 relative
per product). Triton's own ``input_precision="tf32x3"`` computes the same sum, but as a chain of
dots, each accumulating into the next; on Hopper Triton gives a dot whose result feeds another
dot its warps all along M (its layout for attention-like chains) and the chain's last dot the
usual 2-D warp grid, so it converts the accumulator between the two layouts through shared memory
at every step. In the selection kernel at PEM's sizes (sm_90, Triton 3.8) the chain compiled to
20 barriers per pixel tile; as independent dots added with subtractions, which Triton does not
fold back into a chain, to 4 (``tests/test_triton_products.py`` checks the layouts; the counts
are ``python -m benchmarks sass-stats``'s kind, the compiler's).

The splits are explicit TF32 values, so under the interpreter (``TRITON_INTERPRET=1``, where
``tl.dot`` is a NumPy fp32 matmul whatever the precision) the products are the tensor cores' own:
CPU tests see 3xTF32's results, and with ``"tf32"`` the operands are rounded to TF32 first.
"""

import os

import triton
import triton.language as tl

__all__ = ["dot_product", "dot_3xtf32", "round_to_tf32", "split_tf32"]

# Decided at import, as the kernels' own interpreter flag (triton.jit picks interpreter or
# compiler when a kernel is defined).
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def round_to_tf32(x):
    """fp32 ``x`` rounded to TF32's 10 mantissa bits, to nearest with ties away from zero, kept in
    fp32: ``cvt.rna.tf32.f32``, what the CUDA kernels' ``wmma::__float_to_tf32`` compiles to (one
    instruction; :func:`pem_kernels.triton.dot_operands` asks for TF32 products only on GPUs that
    have them, sm_80 and newer, where it exists).

    The interpreter runs no PTX: there half a TF32 unit is added to the bits and the 13 low ones
    cleared, which rounds the magnitude whatever the sign (sign-magnitude); inf stays inf, and a
    NaN is returned unchanged (its payload could carry into the sign bit)."""
    if INTERPRETED:
        bits = x.to(tl.int32, bitcast=True)
        rounded = ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)
        return tl.where(x == x, rounded, x)
    else:
        return tl.inline_asm_elementwise(
            "cvt.rna.tf32.f32 $0, $1;", "=r,r", [x.to(tl.int32, bitcast=True)], dtype=tl.int32,
            is_pure=True, pack=1,
        ).to(tl.float32, bitcast=True)


@triton.jit
def split_tf32(x):
    """(big, small): ``x`` rounded to TF32 and the remainder ``x - big`` (exact), of which a TF32
    product uses the leading 11 bits; under the interpreter small is rounded to TF32 for that.
    For an infinite ``x`` small is NaN (inf - inf): :func:`dot_3xtf32` drops the NaN cross terms
    that makes."""
    x = x.to(tl.float32)
    big = round_to_tf32(x)
    small = x - big
    if INTERPRETED:
        small = round_to_tf32(small)
    return big, small


@triton.jit
def dot_3xtf32(a_big, a_small, b_big, b_small):
    """``a @ b`` [M, N] in fp32 from the :func:`split_tf32` parts of a [M, K] and b [K, N]:
    ``big @ big + (big @ small + small @ big)``, where a NaN cross sum counts as 0 (the remainder
    of an inf operand is NaN; IEEE products give inf there, and so does the big product). A NaN
    operand still makes the big product NaN.

    ``x - ((-y) - z)`` is ``x + (y + z)`` bit for bit (negation is exact and rounding symmetric);
    written with additions, Triton would fold the sums into a chain of dots (module docstring)."""
    small_big = tl.dot(a_small, b_big, input_precision="tf32")
    big_small = tl.dot(a_big, b_small, input_precision="tf32")
    minus_cross = (-small_big) - big_small
    minus_cross = tl.where(minus_cross == minus_cross, minus_cross, 0.0)
    return tl.dot(a_big, b_big, input_precision="tf32") - minus_cross


@triton.jit
def dot_product(a, b, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``a @ b`` [M, N] in fp32 of a [M, K] and b [K, N], with the operands in ``DOT_DTYPE`` and
    fp32 operands multiplied as ``DOT_PRECISION`` says (``"tf32x3"``, ``"tf32"`` or ``"ieee"``;
    :func:`pem_kernels.triton.dot_operands` picks both)."""
    if DOT_PRECISION == "tf32x3":
        a_big, a_small = split_tf32(a)
        b_big, b_small = split_tf32(b)
        return dot_3xtf32(a_big, a_small, b_big, b_small)
    elif DOT_PRECISION == "tf32" and INTERPRETED:
        # The interpreter's matmul would multiply the full fp32 values.
        return tl.dot(
            round_to_tf32(a.to(tl.float32)), round_to_tf32(b.to(tl.float32)),
            input_precision="tf32",
        )
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=DOT_PRECISION)
