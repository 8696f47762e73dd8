"""Multi-process training helpers: process-group setup and a SyncBatchNorm that also runs on CPU.

PEM trains with SyncBN in the pixel decoder (and in the backbone for Cityscapes), facts section 7.
``torch.nn.SyncBatchNorm`` only runs on accelerators, so :func:`convert_sync_batchnorm` uses it on
CUDA and :class:`CPUSyncBatchNorm` elsewhere: the same statistics (mean and biased variance of
the whole global batch for normalization, the unbiased global variance for the running buffers)
computed from all-reduced sums, with gradients that flow through the all-reduce. That keeps the
multi-process path testable on a CPU with the gloo backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "CPUSyncBatchNorm",
    "DistributedContext",
    "convert_sync_batchnorm",
    "init_distributed",
]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: ``rank`` of ``world_size`` processes, on ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistributedContext:
    """Joins the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``), with NCCL on CUDA and gloo on CPU; a single process needs no group.

    Args:
        device: ``"cpu"`` or ``"cuda"``; default CUDA when available. Process ``local_rank`` uses
            GPU ``local_rank``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device_type = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: 'cuda' was requested but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return DistributedContext(rank, world_size, local_rank, dev)


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose gradient is again the sum over processes: each process's loss
    depends on every process's contribution to the global statistics."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the batch of every process (any device).

    Outside training, without an initialized process group, or with one process it is exactly
    ``nn.BatchNorm2d``. Parameters and buffers have the same names, so state_dicts move freely.
    """

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        if dist.get_world_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        c = input.shape[1]
        x = input.float()
        local_count = torch.tensor([x.numel() / c], dtype=torch.float32, device=x.device)
        # Sums rather than means, so processes with different batch sizes weigh correctly.
        stats = torch.cat([x.sum((0, 2, 3)), x.square().sum((0, 2, 3)), local_count])
        stats = _AllReduceSum.apply(stats)
        count = stats[-1]
        if float(count) <= 1:
            raise ValueError(
                "input: expected more than 1 value per channel over all processes, "
                f"got {int(count)}"
            )
        mean = stats[:c] / count
        var = (stats[c : 2 * c] / count - mean.square()).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else self.momentum
                )
                unbiased = var * (count / (count - 1))
                self.running_mean.lerp_(mean.to(self.running_mean), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var), momentum)
        shape = (1, c, 1, 1)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replaces every ``nn.BatchNorm2d`` of ``module`` by a synchronized one: torch's
    ``SyncBatchNorm`` on CUDA, :class:`CPUSyncBatchNorm` elsewhere. Returns the new module."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_to_cpu_sync(module)


def _convert_to_cpu_sync(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, CPUSyncBatchNorm):
        new = CPUSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )
        # The same Parameter and buffer objects: an optimizer built earlier keeps working.
        for name, param in module.named_parameters(recurse=False):
            setattr(new, name, param)
        for name, buffer in module.named_buffers(recurse=False):
            setattr(new, name, buffer)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, _convert_to_cpu_sync(child))
    return module

