"""PEM-CA's fused feature projection (C++ on CPU, CUDA, Triton) against the modules.

Triton runs under the interpreter on CPU tensors when there is no GPU; the CUDA backend's cases
run where a GPU exists (its source runs on the CPU in tests/test_cuda_emulation.py).
"""

from __future__ import annotations

import pytest
import torch

import pem_kernels
from pem_kernels.nn import PEMCrossAttention
from pem_kernels.nn.pem_cross_attention import LocalRepresentation

from conftest import HAS_CUDA, assert_compiles_for_sm90

DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no GPU")),
            "triton"]


def _device(backend: str) -> str:
    return "cpu" if backend == "cpu" else DEVICE


@pytest.fixture
def fused():
    return pytest.importorskip("pem_kernels.triton.local_representation")


def _module(
    channels: int, dtype: torch.dtype = torch.float32, device: str = DEVICE
) -> LocalRepresentation:
    torch.manual_seed(0)
    module = LocalRepresentation(channels)
    with torch.no_grad():  # non-trivial BN statistics and affine
        module.bn.running_mean.uniform_(-1, 1)
        module.bn.running_var.uniform_(0.5, 2)
        module.bn.weight.uniform_(0.5, 1.5)
        module.bn.bias.uniform_(-0.5, 0.5)
    return module.to(device=device, dtype=dtype).eval()


def _bn_operands(module: LocalRepresentation) -> tuple:
    """(running_mean, running_var, weight, bias, eps): the eval-mode BatchNorm as the fused op
    takes it."""
    bn = module.bn
    return bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps


def _forbid_modules(monkeypatch, module: LocalRepresentation) -> None:
    """From now on ``module``'s unfused forward raises: project() must take the fused kernel."""

    def unfused(*args):
        raise AssertionError("the modules ran instead of the fused kernel")

    monkeypatch.setattr(module, "forward", unfused)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 32, 5, 7), (1, 48, 9, 4), (1, 16, 1, 1), (1, 64, 16, 12),
                                   (1, 16, 3, 150), (1, 160, 2, 40), (2, 8, 70, 3)],
                         ids=str)
@pytest.mark.parametrize("with_pos", [True, False])
def test_matches_the_modules_fp32(backend, shape, with_pos, monkeypatch):
    device = _device(backend)
    module = _module(shape[1], device=device)
    memory = torch.randn(shape, device=device)
    pos = torch.randn(shape, device=device) if with_pos else None
    with torch.no_grad():
        expected = module(memory + pos if with_pos else memory)
        _forbid_modules(monkeypatch, module)
        out = module.project(memory, pos, backend)
    assert out.shape == (shape[0], shape[2] * shape[3], shape[1])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_cpu_fp64_matches_the_modules_tightly(monkeypatch):
    module = _module(24, torch.float64, "cpu")
    memory = torch.randn(2, 24, 11, 13, dtype=torch.float64)
    pos = torch.randn(2, 24, 11, 13, dtype=torch.float64)
    with torch.no_grad():
        expected = module(memory + pos)
        _forbid_modules(monkeypatch, module)
        torch.testing.assert_close(module.project(memory, pos, "cpu"), expected,
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 8, 61, 40), (1, 4, 700, 3)], ids=str)
def test_cpu_row_blocks_match_the_modules(shape, monkeypatch):
    """Maps of several row blocks per image (the CPU kernel's tasks hold about 1024 pixels of
    whole rows) with a partial last block: every block reads the rows above and below it,
    zero beyond the image. fp64, so that a row read from the wrong block cannot hide in the
    tolerance."""
    module = _module(shape[1], torch.float64, "cpu")
    memory = torch.randn(shape, dtype=torch.float64)
    pos = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        expected = module(memory + pos)
        _forbid_modules(monkeypatch, module)
        torch.testing.assert_close(module.project(memory, pos, "cpu"), expected,
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_close_to_fp32(backend, dtype, monkeypatch):
    device = _device(backend)
    module32 = _module(32, device=device)
    module = _module(32, dtype, device)
    memory, pos = torch.randn(2, 32, 6, 5, device=device), torch.randn(2, 32, 6, 5, device=device)
    with torch.no_grad():
        expected = module32(memory + pos)
        _forbid_modules(monkeypatch, module)
        out = module.project(memory.to(dtype), pos.to(dtype), backend)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=5e-2)


def test_cpu_op_checks_its_arguments():
    op = torch.ops.pem_kernels.local_representation
    c = 8
    good = [torch.randn(1, c, 4, 4), None, torch.zeros(c), torch.ones(c), torch.ones(c),
            torch.zeros(c), 1e-5, torch.randn(c, 1, 3, 3), torch.randn(c), torch.randn(5, c),
            torch.randn(5)]
    assert op(*good).shape == (1, 16, 5)
    cases = [
        (0, torch.randn(c, 4, 4), "memory must be \\[B, C, H, W\\]"),
        (1, torch.randn(1, c, 4, 5), "pos must have memory's shape"),
        (2, torch.zeros(c + 1), "bn_mean must be \\[C\\] = \\[8\\], got shape \\[9\\]"),
        (3, torch.ones(c, dtype=torch.float64), "bn_var dtype Double must equal memory dtype"),
        (4, torch.ones(2, c), "bn_weight must be \\[C\\]"),
        (5, torch.zeros(c, dtype=torch.int32), "bn_bias dtype Int must equal memory dtype"),
        (7, torch.randn(c, 1, 5, 5), "dw_weight must be \\[C, 1, 3, 3\\]"),
        (9, torch.randn(5, c + 1), "out_weight must be \\[C_out, C\\]"),
        (10, torch.randn(4), "out_bias must be \\[C_out\\]"),
        (8, torch.randn(c, dtype=torch.float64), "dw_bias dtype"),
    ]
    for index, value, match in cases:
        args = list(good)
        args[index] = value
        with pytest.raises(RuntimeError, match=match):
            op(*args)


@pytest.mark.skipif(not HAS_CUDA, reason="no GPU")
def test_cuda_op_checks_devices():
    """The CUDA kernel is chosen when any tensor is on the GPU: the others must be there too."""
    op = torch.ops.pem_kernels.local_representation
    c = 8
    good = [torch.randn(1, c, 4, 4), torch.randn(1, c, 4, 4), torch.zeros(c), torch.ones(c),
            torch.ones(c), torch.zeros(c), 1e-5, torch.randn(c, 1, 3, 3), torch.randn(c),
            torch.randn(5, c), torch.randn(5)]
    on_gpu = [t.cuda() if isinstance(t, torch.Tensor) else t for t in good]
    assert op(*on_gpu).shape == (1, 16, 5)
    device = on_gpu[0].device
    for index, name in [(1, "pos"), (3, "bn_var"), (5, "bn_bias"), (9, "out_weight")]:
        args = list(on_gpu)
        args[index] = good[index]
        with pytest.raises(RuntimeError, match=f"{name} is on cpu, expected memory's device "
                                               f"{device}"):
            op(*args)
    with pytest.raises(RuntimeError, match=f"bn_mean is on {device}, expected memory's device "
                                           "cpu"):
        op(good[0], None, *on_gpu[2:])


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no GPU"))]
)
@pytest.mark.parametrize("normalize", [False, True])
def test_op_opcheck(device, normalize):
    c = 8
    tensors = [t.to(device) for t in (
        torch.randn(2, c, 3, 5), torch.randn(2, c, 3, 5), torch.randn(c), torch.rand(c) + 0.5,
        torch.rand(c) + 0.5, torch.randn(c), torch.randn(c, 1, 3, 3), torch.randn(c),
        torch.randn(6, c), torch.randn(6),
    )]
    args = (*tensors[:6], 1e-5, *tensors[6:], normalize)
    torch.library.opcheck(torch.ops.pem_kernels.local_representation, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


# fp32 at torch's default "highest" (the Triton backend's exact path: BN + depthwise-conv kernel,
# cuBLAS, no in-kernel normalization) and with TF32 allowed ("high": its fused kernel).
PRECISIONS = [("highest", 1e-4), ("high", 1e-2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 32, 5, 7), (1, 16, 3, 150), (1, 272, 2, 3)], ids=str)
@pytest.mark.parametrize("precision, tolerance", PRECISIONS)
def test_normalized_keys_match_the_normalized_modules(
    backend, shape, precision, tolerance, matmul_precision, monkeypatch
):
    """project_for_selection: where the fused kernel can normalize the keys in its kernel, its
    keys divided by their L2 norm, as F.normalize; elsewhere (the CUDA backend, the Triton backend
    in exact fp32 or with C_out = 272 > 256) the raw keys, which the selection normalizes. The op
    itself normalizes either way when asked to (after its kernel where it cannot inside)."""
    from pem_kernels.ops.local_representation import (
        fused_local_representation,
        normalizes_in_kernel,
    )

    matmul_precision(precision)
    device = _device(backend)
    module = _module(shape[1], device=device)
    memory, pos = torch.randn(shape, device=device), torch.randn(shape, device=device)
    in_kernel = normalizes_in_kernel(backend, torch.float32, shape[1])
    assert in_kernel == (
        backend == "cpu" or (backend == "triton" and precision == "high" and shape[1] <= 256)
    )
    with torch.no_grad():
        raw = module(memory + pos)
        expected = torch.nn.functional.normalize(raw, dim=-1)
        _forbid_modules(monkeypatch, module)
        keys, normalized = module.project_for_selection(memory, pos, backend)
        op_keys = fused_local_representation(
            backend, memory, pos, *_bn_operands(module), module.to_query_3x3.weight,
            module.to_query_3x3.bias, module.out.weight, module.out.bias, True,
        )
    assert normalized == in_kernel
    close = dict(rtol=tolerance, atol=tolerance / 10)
    torch.testing.assert_close(keys, expected if normalized else raw, **close)
    torch.testing.assert_close(op_keys, expected, **close)
    torch.testing.assert_close(op_keys.norm(dim=-1), torch.ones(keys.shape[:2], device=device))


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalized_keys_keep_nan_and_zero_rows(backend, matmul_precision, monkeypatch):
    """A NaN anywhere in a pixel's row makes the whole normalized row NaN and an all-zero row stays
    zero (division by eps), as F.normalize does. (TF32 allowed: the Triton backend's fused kernel,
    which normalizes in the kernel.)"""
    from pem_kernels.ops.local_representation import fused_local_representation

    matmul_precision("high")
    device = _device(backend)
    module = _module(16, device=device)
    with torch.no_grad():
        module.out.weight[:, 8:] = 0.0  # pixel rows depend on channels 0-7 only
        module.out.bias.zero_()
    memory = torch.randn(1, 16, 4, 5, device=device)
    memory[0, 8:] = torch.randn(8, 4, 5, device=device)
    memory[0, :8, 1:4, 1:4] = 0.0  # pixel (2, 2) sees zeros in its 3x3 window
    module.bn.running_mean.zero_()
    module.bn.bias.data.zero_()
    module.to_query_3x3.bias.data.zero_()
    memory[0, 3, 0, 0] = float("nan")  # reaches pixels (0, 0), (0, 1), (1, 0), (1, 1)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(module(memory), dim=-1)
        _forbid_modules(monkeypatch, module)
        keys, normalized = module.project_for_selection(memory, None, backend)
        assert normalized == (backend != "cuda")
        if not normalized:  # the selection would normalize them; the op does when asked to
            keys = fused_local_representation(
                backend, memory, None, *_bn_operands(module), module.to_query_3x3.weight,
                module.to_query_3x3.bias, module.out.weight, module.out.bias, True,
            )
    nan_rows = [0, 1, 5, 6]
    assert keys[0, nan_rows].isnan().all() and expected[0, nan_rows].isnan().all()
    assert (keys[0, 12] == 0).all() and (expected[0, 12] == 0).all()
    torch.testing.assert_close(keys, expected, rtol=1e-2, atol=1e-3, equal_nan=True)


def test_modules_path_leaves_normalization_to_the_selection():
    module = _module(16, device="cpu").train()  # BN in training mode: the modules run
    memory = torch.randn(1, 16, 3, 4)
    with torch.no_grad():
        keys, normalized = module.project_for_selection(memory, None, "cpu")
        expected = module(memory)
    assert not normalized
    torch.testing.assert_close(keys, expected)


def test_triton_op_checks_its_arguments(fused):
    c = 8
    good = [torch.randn(1, c, 4, 4, device=DEVICE), None, torch.zeros(c, device=DEVICE),
            torch.ones(c, device=DEVICE), torch.ones(c, device=DEVICE),
            torch.zeros(c, device=DEVICE), 1e-5, torch.randn(c, 1, 3, 3, device=DEVICE),
            torch.randn(c, device=DEVICE), torch.randn(5, c, device=DEVICE),
            torch.randn(5, device=DEVICE)]
    assert fused.local_representation_triton(*good).shape == (1, 16, 5)
    cases = [
        (0, torch.randn(c, 4, 4, device=DEVICE), r"memory must be \[B, C, H, W\]"),
        (1, torch.randn(1, c, 4, 5, device=DEVICE), r"pos must have shape \[1, 8, 4, 4\]"),
        (2, torch.ones(c + 1, device=DEVICE), r"bn_mean must have shape \[8\]"),
        (3, torch.ones(c, device=DEVICE, dtype=torch.float16), "bn_var must be torch.float32"),
        (4, torch.ones(c, 1, device=DEVICE), r"bn_weight must have shape \[8\]"),
        (7, torch.randn(c, 1, 5, 5, device=DEVICE), r"dw_weight must have shape \[8, 1, 3, 3\]"),
        (9, torch.randn(5, c + 1, device=DEVICE), r"weight must have shape \[5, 8\]"),
        (10, torch.randn(4, device=DEVICE), r"bias must have shape \[5\]"),
        (8, torch.randn(c, device=DEVICE, dtype=torch.float64), "dw_bias must be torch.float32"),
    ]
    for index, value, match in cases:
        args = list(good)
        args[index] = value
        with pytest.raises(RuntimeError, match=match):
            fused.local_representation_triton(*args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_differentiating_through_the_kernel_is_a_clear_error(backend):
    from pem_kernels.ops.local_representation import fused_local_representation

    device, c = _device(backend), 8
    memory = torch.randn(1, c, 3, 4, device=device, requires_grad=True)
    params = [torch.randn(c, device=device), torch.rand(c, device=device) + 0.5,
              torch.rand(c, device=device) + 0.5, torch.randn(c, device=device), 1e-5,
              torch.randn(c, 1, 3, 3, device=device), torch.randn(c, device=device),
              torch.randn(5, c, device=device), torch.randn(5, device=device)]
    keys = fused_local_representation(backend, memory, None, *params)
    assert keys.requires_grad
    with pytest.raises(RuntimeError, match="has no backward"):
        keys.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_pem_cross_attention_uses_it_for_inference_only(monkeypatch, backend):
    torch.manual_seed(0)
    device = _device(backend)
    layer = PEMCrossAttention(32, 4, backend=backend).to(device).eval()
    reference = PEMCrossAttention(32, 4, backend="reference").to(device).eval()
    reference.load_state_dict(layer.state_dict())
    args = (torch.randn(6, 2, 32, device=device), torch.randn(2, 32, 5, 7, device=device),
            torch.randn(2, 6, 5, 7, device=device), torch.randn(2, 32, 5, 7, device=device),
            torch.randn(6, 2, 32, device=device))
    calls, normalize_keys = [], []
    from pem_kernels.nn import pem_cross_attention

    original = pem_cross_attention.fused_local_representation
    def recording(*a):
        keys = original(*a)
        calls.append(a[0] if keys is not None else None)  # None: no fused kernel ran
        return keys

    original_select = pem_cross_attention.run_prototype_select
    def recording_select(*a):
        normalize_keys.append(a[-1])  # (chosen, keys, queries, mask, heads, empty, normalize_keys)
        return original_select(*a)

    monkeypatch.setattr(pem_cross_attention, "fused_local_representation", recording)
    monkeypatch.setattr(pem_cross_attention, "run_prototype_select", recording_select)
    with torch.no_grad():
        out = layer(*args)
        expected = reference(*args)
    # The fused projection hands the selection normalized keys where its kernel normalizes them
    # (not the Triton backend's exact-fp32 path); the reference normalizes in the selection.
    from pem_kernels.ops.local_representation import normalizes_in_kernel

    in_kernel = normalizes_in_kernel(backend, torch.float32, 32)
    assert in_kernel == (backend == "cpu")
    assert calls == [backend] and normalize_keys == [not in_kernel, True]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    # With gradients (or BN in training mode) the modules run, so autograd sees every op.
    out = layer(*args)
    out.sum().backward()
    assert calls == [backend] and layer.feature_proj.out.weight.grad is not None
    assert normalize_keys == [not in_kernel, True, True]
    with torch.no_grad():
        layer.train()(*args)
    assert calls == [backend]


def test_triton_fp32_under_tf32_precision_is_close(fused, monkeypatch):
    """With TF32 allowed (torch.set_float32_matmul_precision("high")) the Triton kernel's GEMM
    uses it, as the Linear it replaces does: close to the modules at TF32's precision."""
    module = _module(64)
    memory, pos = torch.randn(1, 64, 6, 7, device=DEVICE), torch.randn(1, 64, 6, 7, device=DEVICE)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with torch.no_grad():
            expected = module(memory + pos)
            _forbid_modules(monkeypatch, module)
            out = module.project(memory, pos, "triton")
    finally:
        torch.set_float32_matmul_precision(previous)
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batchnorm_changes_reach_the_fused_kernel(backend, monkeypatch):
    """Every change of the BatchNorm reaches the fused kernel, also those that leave the tensors'
    versions as they were (a version-keyed cache of the BN affine once missed the last two)."""
    device = _device(backend)
    module = _module(16, device=device)
    memory = torch.randn(1, 16, 5, 6, device=device)

    def check():
        with torch.no_grad():
            expected = LocalRepresentation.forward(module, memory)
            torch.testing.assert_close(module.project(memory, None, backend), expected,
                                       rtol=1e-4, atol=1e-4)

    _forbid_modules(monkeypatch, module)
    check()
    with torch.no_grad():
        module.bn.running_mean.add_(0.5)  # in place: a new version
    check()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    state["bn.running_var"] *= 3.0
    state["bn.bias"] -= 1.0
    module.load_state_dict(state)
    check()
    module.bn.eps = 0.5
    check()
    module.bn.weight = torch.nn.Parameter(torch.full((16,), 2.0, device=device))  # a new tensor
    check()
    # A training forward updates the running statistics without a new version.
    versions = (module.bn.running_mean._version, module.bn.running_var._version)
    mean = module.bn.running_mean.clone()
    module.bn.train()
    module.bn(torch.randn(2, 16, 5, 6, device=device) * 3 + 2)
    module.bn.eval()
    assert not torch.equal(module.bn.running_mean, mean)
    assert (module.bn.running_mean._version, module.bn.running_var._version) == versions
    check()
    # So does a fused optimizer step on the affine parameters (BatchNorm frozen in eval mode).
    optimizer = torch.optim.Adam([module.bn.weight, module.bn.bias], lr=0.1, fused=True)
    module.bn(torch.randn(2, 16, 5, 6, device=device)).square().sum().backward()
    weight, version = module.bn.weight.detach().clone(), module.bn.weight._version
    optimizer.step()
    assert not torch.equal(module.bn.weight, weight) and module.bn.weight._version == version
    check()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("precision, tolerance", PRECISIONS)
def test_kernels_apply_batchnorm_statistics_eps_and_affine(
    backend, affine, precision, tolerance, matmul_precision, monkeypatch
):
    """The kernels apply the BatchNorm from its running statistics, eps and optional affine as
    the module does: a large eps (it matters), and a BatchNorm without affine (weight and bias
    None). On the Triton backend both its kernels: exact fp32 and TF32 allowed."""
    matmul_precision(precision)
    device = _device(backend)
    module = _module(16, device=device)
    if not affine:
        module.bn = torch.nn.BatchNorm2d(16, affine=False).to(device).eval()
        with torch.no_grad():
            module.bn.running_mean.uniform_(-1, 1)
            module.bn.running_var.uniform_(0.5, 2)
    module.bn.eps = 0.3
    memory, pos = torch.randn(2, 16, 5, 6, device=device), torch.randn(2, 16, 5, 6, device=device)
    with torch.no_grad():
        expected = LocalRepresentation.forward(module, memory + pos)
        _forbid_modules(monkeypatch, module)
        out = module.project(memory, pos, backend)
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance / 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    module = _module(16, device=_device(backend))
    with torch.no_grad():
        out = module.project(torch.randn(0, 16, 3, 3, device=_device(backend)), None, backend)
    assert out.shape == (0, 9, 16)


_SM90_COMPILE = """
import torch
from pem_kernels.triton import local_representation as K

assert not K.INTERPRET
fn = K._local_representation_kernel
# Every launch configuration the op can choose (C_out -> BLOCK_N 16 / 128 / 256, normalized rows
# at 256), with pos. fp32 reaches the fused kernel only where TF32 is allowed.
torch.set_float32_matmul_precision("high")
for dtype, name in [(torch.bfloat16, "bf16"), (torch.float32, "fp32")]:
    pointers = {n: "*" + name for n in ("x_ptr", "pos_ptr", "mean_ptr", "var_ptr",
                                         "bn_weight_ptr", "bn_bias_ptr", "dw_weight_ptr",
                                         "dw_bias_ptr", "weight_ptr", "bias_ptr", "out_ptr")}
    pointers.update(bn_eps="fp32")
    for out_channels, normalize in ((16, False), (128, False), (256, False), (256, True)):
        constants = K._launch_config(out_channels, dtype)
        options = {key: constants.pop(key) for key in ("num_warps", "num_stages")}
        constants.update(HAS_POS=True, NORMALIZE=normalize)
        compile_sm90(fn, lambda n: pointers.get(n, "i32"), constants, **options)
# The exact-fp32 path's conv kernel in the configuration in use, with and without pos.
pointers = {n: "*fp32" for n in ("x_ptr", "pos_ptr", "mean_ptr", "var_ptr", "bn_weight_ptr",
                                  "bn_bias_ptr", "dw_weight_ptr", "dw_bias_ptr", "out_ptr")}
pointers.update(bn_eps="fp32")
constants = dict(K.BN_DEPTHWISE_CONFIG)
options = {"num_warps": constants.pop("num_warps")}
for has_pos in (True, False):
    compile_sm90(K._bn_depthwise_conv_kernel, lambda n: pointers.get(n, "i32"),
                 dict(constants, HAS_POS=has_pos), **options)
print("compiled for sm_90")
"""


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the kernel is compiled and run by the tests")
def test_triton_kernel_compiles_for_sm90_without_a_gpu(fused):
    assert_compiles_for_sm90(_SM90_COMPILE)


def test_auto_takes_only_validated_projection_kernels(monkeypatch):
    """'auto' resolves the layer's projections to the C++ kernel of the device (validated on it)
    where the extension has one, else to the modules ('reference'), never to Triton's;
    PEM_KERNELS_BACKEND overrides it."""
    from pem_kernels.ops.local_representation import PROJECTION_BACKENDS

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert PROJECTION_BACKENDS.resolve("auto", cpu, torch.float32) == "cpu"
    has_cuda_kernel = pem_kernels._extension.has_kernel("local_representation", "CUDA")
    assert PROJECTION_BACKENDS.resolve("auto", cuda, torch.float32) == (
        "cuda" if has_cuda_kernel else "reference")
    monkeypatch.setenv("PEM_KERNELS_BACKEND", "cuda")
    if has_cuda_kernel:
        assert PROJECTION_BACKENDS.resolve("auto", cuda, torch.float32) == "cuda"
    with pytest.raises(pem_kernels.BackendUnavailableError, match="runs on cuda tensors"):
        PROJECTION_BACKENDS.resolve("auto", cpu, torch.float32)
