"""The eager fast path of the public ops (pem_kernels._backends.plain_eager_call): a call that
records no gradient skips torch's Python dispatch of custom ops; everything else goes through it."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import pem_kernels
from pem_kernels import _backends
from pem_kernels._backends import plain_eager_call

from conftest import HAS_CUDA

pytestmark = pytest.mark.skipif(
    not pem_kernels.EXTENSION_LOADED, reason="pem_kernels._C is not built"
)
DEVICE = "cuda" if HAS_CUDA else "cpu"


class _Subclass(torch.Tensor):
    pass


def test_plain_eager_call_conditions():
    plain, leaf = torch.randn(3), torch.randn(3, requires_grad=True)
    assert plain_eager_call([plain, None, torch.nn.Parameter(torch.randn(2), requires_grad=False)])
    assert not plain_eager_call([plain, leaf])
    # An op's whole argument list: the non-tensors are skipped, a tensor among them still counts.
    assert plain_eager_call((plain, 8, True, 1e-5, None))
    assert not plain_eager_call((plain, 8, leaf, None))
    with torch.no_grad():
        assert plain_eager_call([plain, leaf])
    with torch.inference_mode():
        assert plain_eager_call([plain, torch.randn(2)])
    assert not plain_eager_call([plain.as_subclass(_Subclass)])
    with FakeTensorMode():
        assert not plain_eager_call([torch.empty(3)])
    seen = []
    torch.vmap(lambda x: seen.append(plain_eager_call([x])) or x)(torch.randn(2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still traces
        torch.jit.trace(
            lambda x: seen.append(plain_eager_call([x])) or x * 2, (torch.randn(2),),
            check_trace=False,
        )
    assert seen == [False, False]


def _select_args(device):
    keys, queries = torch.randn(2, 40, 16, device=device), torch.randn(2, 3, 16, device=device)
    mask = torch.rand(2, 3, 40, device=device) < 0.3
    return keys, queries, mask


def _deform_args(device):
    return (torch.randn(1, 4, 6, 5, device=device), torch.randn(1, 18, 6, 5, device=device),
            torch.randn(3, 4, 3, 3, device=device))


def _backends_of(op_name: str) -> list[str]:
    names = [b for b in ("cpu", "cuda", "triton")
             if b in pem_kernels.available_backends(op_name, DEVICE)]
    return names + (["cpu"] if DEVICE == "cuda" and "cpu" not in names else [])


@pytest.mark.parametrize("backend", _backends_of("prototype_select"))
def test_fast_path_equals_the_dispatcher_path(backend, monkeypatch):
    device = "cpu" if backend == "cpu" else DEVICE
    keys, queries, mask = _select_args(device)
    deform = _deform_args(device)
    deform_backend = (
        backend if backend in pem_kernels.available_backends("deform_conv2d", device) else "cpu"
    )
    if deform_backend == "cpu":
        deform = tuple(t.cpu() for t in deform)

    def run():
        with torch.no_grad():
            select = pem_kernels.prototype_select(
                keys, queries, mask, 4, empty="official", normalize_keys=True, backend=backend
            )
            conv = pem_kernels.deform_conv2d(*deform, padding=1, backend=deform_backend)
        return (*select, conv)

    fast = run()
    assert all(t.grad_fn is None for t in fast)
    monkeypatch.setattr(_backends, "plain_eager_call", lambda tensors: False)
    for a, b in zip(fast, run()):
        assert torch.equal(a, b)


def test_gradients_still_flow_through_the_registered_ops():
    keys, queries, mask = _select_args("cpu")
    keys.requires_grad_(True)
    prototypes, _ = pem_kernels.prototype_select(keys, queries, mask, 4, backend="cpu")
    assert prototypes.grad_fn is not None
    (grad,) = torch.autograd.grad(prototypes.sum(), keys)
    assert grad.abs().sum() > 0


def test_fake_tensors_go_through_the_fake_kernels():
    with FakeTensorMode():
        keys, queries, mask = _select_args("cpu")
        prototypes, indices = pem_kernels.prototype_select(keys, queries, mask, 4, backend="cpu")
        out = pem_kernels.deform_conv2d(*_deform_args("cpu"), padding=1, backend="cpu")
    assert prototypes.shape == (2, 3, 16) and indices.shape == (2, 4, 3)
    assert out.shape == (1, 3, 6, 5)


# torch's make_dual loads its jvp decompositions through the deprecated torch.jit.script.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_forward_ad_is_refused_by_the_kernels_and_works_on_the_reference():
    """The kernels have no forward-mode formula and a custom op would drop the tangent silently:
    a dual tensor is a clear error on a kernel backend; the reference propagates it."""
    import torch.autograd.forward_ad as fwAD

    keys, queries, mask = _select_args("cpu")
    deform = _deform_args("cpu")
    with fwAD.dual_level():
        dual_keys = fwAD.make_dual(keys, torch.randn_like(keys))
        with pytest.raises(NotImplementedError, match="prototype_select: forward-mode AD"):
            pem_kernels.prototype_select(dual_keys, queries, mask, 4, backend="cpu")
        prototypes, _ = pem_kernels.prototype_select(dual_keys, queries, mask, 4,
                                                     backend="reference")
        assert fwAD.unpack_dual(prototypes).tangent is not None
        dual_input = fwAD.make_dual(deform[0], torch.randn_like(deform[0]))
        with pytest.raises(NotImplementedError, match="deform_conv2d: forward-mode AD"):
            pem_kernels.deform_conv2d(dual_input, *deform[1:], padding=1, backend="cpu")
        out = pem_kernels.deform_conv2d(dual_input, *deform[1:], padding=1, backend="reference")
        assert fwAD.unpack_dual(out).tangent is not None
        # plain tensors inside a dual level still take the kernels
        pem_kernels.prototype_select(keys, queries, mask, 4, backend="cpu")


# torch's make_dual loads its jvp decompositions through the deprecated torch.jit.script.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_local_representation_leaves_dual_tensors_to_the_modules():
    import torch.autograd.forward_ad as fwAD

    from pem_kernels.nn.pem_cross_attention import LocalRepresentation

    module = LocalRepresentation(8).eval()
    memory = torch.randn(1, 8, 3, 4)
    with torch.no_grad(), fwAD.dual_level():
        keys = module.project(fwAD.make_dual(memory, torch.ones_like(memory)), None, "cpu")
        assert fwAD.unpack_dual(keys).tangent is not None


def test_triton_check_skips_torch_check_only_for_a_plain_true(monkeypatch):
    """pem_kernels.triton.check returns at once for True (eager calls) and hands anything else
    (False, symbolic conditions under tracing) to torch._check."""
    from pem_kernels.triton import check

    seen = []
    monkeypatch.setattr(torch, "_check", lambda condition, message: seen.append(condition))
    check(True, lambda: "never built")
    assert seen == []
    check(False, lambda: "bad")
    marker = object()  # stands for a SymBool
    check(marker, lambda: "symbolic")
    assert seen == [False, marker]
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="num_heads must divide"):
        check(8 % 3 == 0, lambda: "num_heads must divide C = 8, got 3")
