"""Training PEM: ``python -m pem.train`` on one CPU, or \
``torchrun --nproc_per_node N -m pem.train``.

The recipe is the official one (facts section 7): AdamW (weight decay 0.05, none on norm layers
and embeddings, ``alpha`` decayed), backbone learning rate x0.1, cosine schedule without warm-up
down to ``--lr-end``, gradient clipping of the full model at norm 0.01, AMP on GPU, the
Mask2Former criterion with deep supervision, SyncBatchNorm and DistributedDataParallel under
``torchrun``. Checkpoints (``OUT/last.pt``) hold everything needed to resume exactly where the
run stopped (``--resume``) and to rebuild the model for ``pem.evaluate`` / ``pem.segment``.

Quick start on a CPU (about ten minutes on 2 cores; the synthetic shapes dataset)::

    python -m pem.train --data synthetic --out runs/synthetic

Real data (see :mod:`pem.data.folders` for the folder layouts)::

    torchrun --nproc_per_node 4 -m pem.train --data cityscapes:/data/cityscapes \
        --backbone r50 --iters 90000 --batch 8 --lr 7e-4 --crop 512x1024 --base-short-side 1024
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from pem.cli import DEVICES, check_device, check_ints, dumps
from pem.criterion import SetCriterion
from pem.matcher import HungarianMatcher
from pem.data import collate, instance_targets, train_transforms
from pem.data.build import build_dataset, parse_data_spec
from pem.distributed import DistributedContext, convert_sync_batchnorm, init_distributed
from pem.model import PEM, SIZE_DIVISIBILITY
from pem_kernels import BACKENDS

__all__ = [
    "NORM_TYPES",
    "ShardedBatchSampler",
    "build_optimizer",
    "cosine_factor",
    "load_checkpoint",
    "main",
    "padded_targets",
    "save_checkpoint",
    "train",
]

NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm,
)
CHECKPOINT_NAME = "last.pt"


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.05,
    backbone_multiplier: float = 0.1,
) -> torch.optim.AdamW:
    """AdamW with detectron2 / Mask2Former parameter groups.

    Parameters of norm layers and of ``nn.Embedding`` get no weight decay (detectron2's
    ``WEIGHT_DECAY_NORM`` / ``WEIGHT_DECAY_EMBED`` = 0); every other parameter, biases and the
    bare ``alpha`` of PEM-CA included, gets ``weight_decay``. Parameters under the top-level
    ``backbone`` module train at ``lr * backbone_multiplier``. Frozen parameters are skipped.
    Each group carries a ``"name"`` for logs.
    """
    groups: dict[tuple[float, float], dict] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        no_decay = isinstance(module, NORM_TYPES) or isinstance(module, nn.Embedding)
        in_backbone = module_name.split(".")[0] == "backbone"
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            group_lr = lr * (backbone_multiplier if in_backbone else 1.0)
            group_wd = 0.0 if no_decay else weight_decay
            key = (group_lr, group_wd)
            if key not in groups:
                name = ("backbone" if in_backbone else "head") + ("_no_decay" if no_decay else "")
                groups[key] = {"params": [], "lr": group_lr, "weight_decay": group_wd, "name": name}
            groups[key]["params"].append(param)
    if not groups:
        raise ValueError("model: has no trainable parameters")
    return torch.optim.AdamW(list(groups.values()), lr=lr, weight_decay=weight_decay)


def cosine_factor(iteration: int, max_iter: int, end_ratio: float) -> float:
    """detectron2's WarmupCosineLR without warm-up, as a multiplier of each group's base lr:
    ``end + (1 - end) * (1 + cos(pi * t / T)) / 2``, held at ``end`` after ``max_iter``."""
    t = min(iteration, max_iter) / max_iter
    return end_ratio + (1.0 - end_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


class ShardedBatchSampler(Sampler[list[int]]):
    """Per-process batches of a seeded, endless shuffle, resumable at any iteration.

    The stream is the concatenation of permutations of ``range(dataset_len)``, the one of epoch e
    drawn from ``seed + e``; global batch i is items ``[i * B * W, (i + 1) * B * W)`` of the
    stream and process r takes its slice ``r * B`` to ``(r + 1) * B``. Iteration ``start`` of a
    resumed run therefore sees exactly the batch the interrupted run would have seen.
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        start_iter: int,
        max_iter: int,
    ) -> None:
        if dataset_len < 1:
            raise ValueError(f"dataset: expected at least one image, got {dataset_len}")
        self.n, self.batch, self.rank, self.world = dataset_len, batch_size, rank, world_size
        self.seed, self.start, self.stop = seed, start_iter, max_iter

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, perm = -1, []
        for iteration in range(self.start, self.stop):
            first = (iteration * self.world + self.rank) * self.batch
            batch = []
            for position in range(first, first + self.batch):
                if position // self.n != epoch:
                    epoch = position // self.n
                    gen = torch.Generator().manual_seed(self.seed + epoch)
                    perm = torch.randperm(self.n, generator=gen).tolist()
                batch.append(perm[position % self.n])
            yield batch

    def __repr__(self) -> str:
        return f"ShardedBatchSampler(n={self.n}, batch={self.batch}, rank={self.rank}/{self.world})"


def padded_targets(samples: Sequence[dict], task: str, device: torch.device) -> list[dict]:
    """Criterion targets with masks zero-padded to the model's padded canvas (a multiple of 32,
    as Mask2Former pads ``gt_masks`` to the ``ImageList`` size)."""
    out = []
    for sample in samples:
        target = instance_targets(sample, task)
        h, w = target["masks"].shape[-2:]
        pad_h, pad_w = -h % SIZE_DIVISIBILITY, -w % SIZE_DIVISIBILITY
        out.append(
            {
                "labels": target["labels"].to(device),
                "masks": F.pad(target["masks"], (0, pad_w, 0, pad_h)).to(device),
            }
        )
    return out


def save_checkpoint(path: Path, state: dict) -> None:
    """Writes ``state`` atomically (a crash mid-write leaves the previous checkpoint intact)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _rng_state(device: torch.device) -> dict:
    """The random state a resumed run needs: the CPU generator's and, on CUDA, the device's (the
    criterion's point sampling draws on the device)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict | Tensor, device: torch.device) -> None:
    if isinstance(state, Tensor):  # checkpoints written before the CUDA state was saved
        state = {"cpu": state}
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda":
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], device)
        else:
            warnings.warn(
                "--resume: the checkpoint holds no CUDA random state (it was written on the CPU); "
                "the run goes on with a fresh one, so it does not repeat an uninterrupted run",
                stacklevel=2,
            )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Loads a checkpoint written by :func:`train`, with a clear error for a wrong file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no file at {str(path)!r}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as error:
        raise ValueError(
            f"checkpoint: {str(path)!r} is not a pem.train checkpoint (torch.load: {error})"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise ValueError(
            f"checkpoint: {str(path)!r} is not a pem.train checkpoint (missing model/model_config)"
        )
    return state


def model_from_checkpoint(state: dict, backend: str = "auto") -> PEM:
    """Rebuilds the trained model (eval mode) from a :func:`load_checkpoint` dict."""
    model = PEM(**state["model_config"], backend=backend)
    model.load_state_dict(state["model"])
    return model.eval()


def _parse_size(name: str, text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{name}: expected HxW like 512x1024, got {text!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{name}: expected positive sizes, got {text!r}")
    return h, w


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pem.train", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="synthetic", help="synthetic | cityscapes:ROOT | ade20k:ROOT")
    p.add_argument("--task", default="panoptic", choices=("panoptic", "semantic"))
    p.add_argument("--out", default="runs/pem", help="folder for checkpoints and metrics.jsonl")
    p.add_argument("--backbone", default="stdc1", choices=("r50", "stdc1", "stdc2"))
    p.add_argument("--backbone-weights", default=None, help="local backbone state_dict file")
    p.add_argument("--freeze-backbone-bn", action="store_true", help="FrozenBN in the backbone")
    p.add_argument("--num-queries", type=int, default=100)
    p.add_argument("--iters", type=int, default=1500, help="training iterations")
    p.add_argument("--batch", type=int, default=4, help="images per process and iteration")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--lr-end", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--backbone-multiplier", type=float, default=0.1)
    p.add_argument("--num-points", type=int, default=12544,
                   help="points per mask for the mask losses (official 12544 = 112^2)")
    p.add_argument("--clip", type=float, default=0.01, help="full-model gradient norm clip")
    p.add_argument("--crop", default=None, help="HxW training crop (default: synthetic size)")
    p.add_argument("--base-short-side", type=int, default=None, help="resize base (default crop)")
    p.add_argument("--max-size", type=int, default=4096)
    p.add_argument("--synthetic-size", type=int, default=128)
    p.add_argument("--synthetic-images", type=int, default=2000)
    p.add_argument("--device", default=None, choices=DEVICES)
    p.add_argument("--amp", default=None, choices=("off", "fp16", "bf16"),
                   help="mixed precision (default fp16 on CUDA, off on CPU)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="pem_kernels backend of the model")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--checkpoint-period", type=int, default=250)
    p.add_argument("--eval-period", type=int, default=0, help="evaluate every N iterations")
    p.add_argument("--eval-images", type=int, default=50, help="validation images per evaluation")
    p.add_argument("--log-period", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if present")
    p.add_argument("--stop-after", type=int, default=None,
                   help="checkpoint and stop after this iteration (resume later with --resume)")
    args = p.parse_args(argv)
    check_ints(p, args, {
        "iters": 1, "batch": 1, "num_queries": 1, "num_points": 1, "checkpoint_period": 1,
        "log_period": 1, "eval_images": 1, "synthetic_images": 1, "synthetic_size": 2,
        "base_short_side": 2, "max_size": 1, "stop_after": 1, "eval_period": 0, "workers": 0,
    })
    check_device(p, args.device)
    # The pixel decoder's BatchNorms over 1x1 pooled maps need two values per channel in
    # training: two images per process, or in all under torchrun (SyncBatchNorm).
    try:
        world_size = int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        p.error(f"WORLD_SIZE: expected the number of processes, got {os.environ['WORLD_SIZE']!r}")
    if args.batch * world_size < 2:
        p.error(
            f"--batch: expected at least 2 images per iteration in all (the BatchNorms of the "
            f"pixel decoder's pooled 1x1 maps need them), got {args.batch} on {world_size} "
            "process(es)"
        )
    if args.lr <= 0 or args.lr_end < 0 or args.lr_end > args.lr:
        p.error(
            f"--lr / --lr-end: expected 0 <= lr_end <= lr, lr > 0; got {args.lr}, {args.lr_end}"
        )
    for name, value in (("clip", args.clip), ("backbone_multiplier", args.backbone_multiplier),
                        ("weight_decay", args.weight_decay)):
        # clip_grad_norm_ with a negative limit flips every gradient, with 0 zeroes them.
        if not (value > 0 if name == "clip" else value >= 0):
            relation = "> 0" if name == "clip" else ">= 0"
            p.error(f"--{name.replace('_', '-')}: expected a number {relation}, got {value}")
    try:
        args.crop = _parse_size("--crop", args.crop) if args.crop else None
    except ValueError as e:
        p.error(str(e))
    try:
        kind, _ = parse_data_spec(args.data)
    except ValueError as e:
        p.error(f"--{e}")
    if kind != "synthetic" and args.crop is None:
        p.error("--crop: required for folder datasets (training batches need one size)")
    return args


def _autocast_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    amp = args.amp or ("fp16" if device.type == "cuda" else "off")
    return {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]


def train(args: argparse.Namespace) -> dict:
    """Runs the training described by ``args`` (see :func:`parse_args`); returns the last
    logged metrics (and the last evaluation, if any) on the main process."""
    ctx = init_distributed(args.device)
    torch.manual_seed(args.seed + ctx.rank)
    out_dir = Path(args.out)
    ckpt_path = out_dir / CHECKPOINT_NAME

    # parse_args made sure a folder dataset comes with --crop
    crop = args.crop or (args.synthetic_size, args.synthetic_size)
    transform = train_transforms(args.base_short_side or min(crop), crop, args.max_size)
    dataset = build_dataset(
        args.data, "train", args.task, transform,
        synthetic_size=args.synthetic_size, synthetic_images=args.synthetic_images, seed=args.seed,
    )
    info = dataset.info

    model_config = {
        "backbone": args.backbone,
        "num_classes": info.num_classes,
        "num_queries": args.num_queries,
    }
    model = PEM(**model_config, backend=args.backend, backbone_weights=args.backbone_weights)
    if args.freeze_backbone_bn:
        _freeze_batchnorm(model.backbone)
    model.to(ctx.device)
    if ctx.distributed:
        # Before the optimizer is built, so that it holds the converted layers' parameters.
        model = convert_sync_batchnorm(model, ctx.device)
    optimizer = build_optimizer(model, args.lr, args.weight_decay, args.backbone_multiplier)
    # The group that trains at --lr (the backbone's trains at --backbone-multiplier times it), by
    # position: a resume's optimizer.load_state_dict replaces the group dicts.
    head_index = next(
        (i for i, g in enumerate(optimizer.param_groups) if not g["name"].startswith("backbone")),
        0,
    )
    end_ratio = args.lr_end / args.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: cosine_factor(it, args.iters, end_ratio)
    )
    amp_dtype = _autocast_dtype(args, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype is torch.float16)
    criterion = SetCriterion(
        info.num_classes, HungarianMatcher(num_points=args.num_points), num_points=args.num_points
    ).to(ctx.device)

    start_iter, resume_rng = 0, None
    if args.resume and ckpt_path.is_file():
        # On the CPU: the RNG states must stay CPU tensors; load_state_dict moves the rest.
        state = load_checkpoint(ckpt_path)
        if state["model_config"] != model_config:
            raise ValueError(
                f"--resume: {ckpt_path} was trained with {state['model_config']}, "
                f"this run asks for {model_config}"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_iter = int(state["iteration"])
        resume_rng = state["rng"][ctx.rank % len(state["rng"])]

    if ctx.distributed:
        ddp = DistributedDataParallel(
            model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None
        )
    else:
        ddp = model
    sampler = ShardedBatchSampler(
        len(dataset), args.batch, ctx.rank, ctx.world_size, args.seed, start_iter, args.iters
    )
    loader = DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    val_dataset = None
    if args.eval_period > 0 and ctx.is_main:
        val_dataset = build_dataset(
            args.data, "val", args.task,
            synthetic_size=args.synthetic_size, synthetic_images=args.eval_images, seed=args.seed,
        )

    def checkpoint(iteration: int) -> None:
        rng = [_rng_state(ctx.device)]
        if ctx.distributed:
            gathered: list[Tensor | None] = [None] * ctx.world_size
            dist.all_gather_object(gathered, rng[0])
            rng = gathered  # type: ignore[assignment]
        if ctx.is_main:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "iteration": iteration,
                "model_config": model_config,
                "dataset_info": asdict(info),
                "task": args.task,
                "train_args": {k: v for k, v in vars(args).items() if k != "crop"} | {"crop": crop},
                "rng": rng,
            })

    log_path = out_dir / "metrics.jsonl"
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _log(log_path, {"event": "start", "iteration": start_iter, "world_size": ctx.world_size,
                        "device": str(ctx.device),
                        "args": {k: str(v) for k, v in vars(args).items()}})
    bar = tqdm(total=args.iters, initial=start_iter, disable=not ctx.is_main, desc="train",
               dynamic_ncols=True)
    last: dict = {}
    if val_dataset is not None and start_iter == 0:
        # The untrained model's scores: the chance level the training run is measured against.
        _log(log_path, {"iteration": 0,
                        "eval": _evaluate(model, val_dataset, args, ctx.device)})
    if ctx.distributed and args.eval_period > 0 and start_iter == 0:
        dist.barrier()
    ddp.train()
    batches = iter(loader)
    if resume_rng is not None:
        # After the loader has drawn its base seed, so a resumed run continues the interrupted
        # run's random stream (criterion points, augmentation) exactly.
        _set_rng_state(resume_rng, ctx.device)
    tic = time.perf_counter()
    for iteration, (images, samples) in enumerate(batches, start=start_iter):
        images = images.to(ctx.device, non_blocking=True)
        targets = padded_targets(samples, args.task, ctx.device)
        with torch.autocast(ctx.device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            outputs = ddp(images)
            losses = criterion(outputs, targets)
            loss = criterion.weighted_total(losses)
        if not torch.isfinite(loss):
            final = {k: round(losses[k].item(), 4) for k in ("loss_ce", "loss_mask", "loss_dice")}
            raise FloatingPointError(f"loss is {loss.item()} at iteration {iteration}; {final}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        scaler.step(optimizer)
        scaler.update()
        # this iteration's --lr schedule, before the scheduler moves
        step_lr = optimizer.param_groups[head_index]["lr"]
        with warnings.catch_warnings():
            # The schedule counts iterations, as the official training's does: it advances
            # also when the fp16 GradScaler skipped an overflowing step (often the first), for
            # which PyTorch warns that the scheduler stepped before the optimizer.
            warnings.filterwarnings(
                "ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before",
                category=UserWarning,
            )
            scheduler.step()
        done = iteration + 1
        bar.update(1)
        if done % args.log_period == 0 or done == args.iters:
            last = {
                "iteration": done,
                "loss": _mean_over_processes(loss.detach(), ctx),
                **{k: _mean_over_processes(v.detach(), ctx) for k, v in losses.items()
                   if k in ("loss_ce", "loss_mask", "loss_dice")},
                "grad_norm": float(grad_norm),
                "lr": step_lr,
                "seconds": round(time.perf_counter() - tic, 2),
            }
            bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{last['lr']:.2e}")
            if ctx.is_main:
                _log(log_path, last)
        stop = args.stop_after is not None and done >= args.stop_after
        if done % args.checkpoint_period == 0 or done == args.iters or stop:
            checkpoint(done)
        if args.eval_period > 0 and (done % args.eval_period == 0 or done == args.iters):
            if ctx.is_main:
                last["eval"] = _evaluate(model, val_dataset, args, ctx.device)
                _log(log_path, {"iteration": done, "eval": last["eval"]})
                bar.write(f"iteration {done}: " + ", ".join(
                    f"{k} {v:.1f}" for k, v in last["eval"].items()))
            if ctx.distributed:
                dist.barrier()
            ddp.train()
        if stop:
            break
    bar.close()
    if ctx.distributed:
        dist.barrier()
    return last


def _evaluate(model: nn.Module, dataset, args: argparse.Namespace, device: torch.device) -> dict:
    """The periodic evaluation: the first ``--eval-images`` validation images."""
    from pem.evaluate import evaluate

    model.eval()
    result = evaluate(model, dataset, args.task, device, progress=False,
                      max_images=args.eval_images)
    return result.summary()


def _freeze_batchnorm(module: nn.Module) -> None:
    """Replaces BatchNorm2d by torchvision's FrozenBatchNorm2d (fixed statistics and affine)."""
    from torchvision.ops import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.load_state_dict(child.state_dict(), strict=False)
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)


def _mean_over_processes(value: Tensor, ctx: DistributedContext) -> float:
    value = value.float().clone()
    if ctx.distributed:
        dist.all_reduce(value)
        value /= ctx.world_size
    return round(value.item(), 5)


def _log(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(dumps(record) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
