"""Tests of PEM training: optimizer groups, schedule, sampler, SyncBN on CPU, loop, DDP, resume."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import requires_cuda
from pem.distributed import CPUSyncBatchNorm, convert_sync_batchnorm
from pem.model import PEM
from pem.train import (
    ShardedBatchSampler,
    _rng_state,
    _set_rng_state,
    build_optimizer,
    cosine_factor,
    load_checkpoint,
    main as train_main,
)

REPO = Path(__file__).resolve().parents[1]
# A tiny, fast configuration of the real training command.
TINY = ["--data", "synthetic", "--synthetic-size", "64", "--synthetic-images", "16",
        "--num-queries", "8", "--num-points", "256", "--batch", "2", "--log-period", "1",
        "--lr", "1e-4"]


def test_optimizer_groups_follow_detectron2_rules() -> None:
    model = PEM("stdc1", num_classes=5, num_queries=10, backend="reference")
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, backbone_multiplier=0.1)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params)

    def lr_wd(name: str) -> tuple[float, float]:
        g = group_of[id(params[name])]
        return g["lr"], g["weight_decay"]

    backbone_conv, backbone_bn = "backbone.stem.0.0.weight", "backbone.stem.0.1.weight"
    assert isinstance(model.backbone.stem[0][1], nn.BatchNorm2d)
    assert lr_wd(backbone_conv) == pytest.approx((1e-4, 0.05))
    assert lr_wd(backbone_bn) == pytest.approx((1e-4, 0.0))
    assert lr_wd("transformer_decoder.query_feat.weight") == pytest.approx((1e-3, 0.0))
    alpha = next(n for n in params if n.endswith("alpha"))
    assert lr_wd(alpha) == pytest.approx((1e-3, 0.05))  # a bare Parameter: decayed, as official
    norm = "transformer_decoder.self_attention_layers.0.norm.weight"
    assert lr_wd(norm) == pytest.approx((1e-3, 0.0))
    bias = "transformer_decoder.class_embed.bias"
    assert lr_wd(bias) == pytest.approx((1e-3, 0.05))


def test_cosine_factor() -> None:
    assert cosine_factor(0, 100, 0.0) == 1.0
    assert cosine_factor(50, 100, 0.0) == pytest.approx(0.5)
    assert cosine_factor(100, 100, 0.1) == pytest.approx(0.1)
    assert cosine_factor(150, 100, 0.1) == pytest.approx(0.1)
    assert cosine_factor(25, 100, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_sharded_sampler_resumes_and_shards() -> None:
    n, b, world, iters = 7, 2, 2, 9
    full = [list(ShardedBatchSampler(n, b, r, world, seed=3, start_iter=0, max_iter=iters))
            for r in range(world)]
    resumed = [list(ShardedBatchSampler(n, b, r, world, seed=3, start_iter=4, max_iter=iters))
               for r in range(world)]
    for r in range(world):
        assert len(full[r]) == iters and resumed[r] == full[r][4:]
    # The global stream, read in order, is a sequence of permutations of range(n).
    stream = [i for it in range(iters) for r in range(world) for i in full[r][it]]
    for start in range(0, len(stream) - n + 1, n):
        assert sorted(stream[start : start + n]) == list(range(n))
    assert stream[:n] != stream[n : 2 * n]  # a fresh shuffle every epoch


def _sync_bn_worker(rank: int, world: int, port: int, x: torch.Tensor, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    bn = CPUSyncBatchNorm(3, momentum=0.5)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    local = x.chunk(world)[rank].clone().requires_grad_()
    out = bn(local)
    (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
    grads = [p.grad.clone() for p in bn.parameters()]
    for g in grads:
        dist.all_reduce(g)
    # As numpy arrays, pickled by value: a torch tensor would travel as a handle to this process's
    # shared memory, which fails (FileNotFoundError) when the process has exited before the
    # parent reads the queue.
    tensors = (out, local.grad, *grads, bn.running_mean, bn.running_var)
    arrays = [t.detach().numpy().copy() for t in tensors]
    queue.put((rank, arrays))
    dist.destroy_process_group()


def test_cpu_sync_batchnorm_equals_batchnorm_over_the_global_batch() -> None:
    torch.manual_seed(0)
    world = 2
    x = torch.randn(4, 3, 5, 6, dtype=torch.float32) * 3 + 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_sync_bn_worker, args=(r, world, port, x, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    received = sorted((queue.get(timeout=120) for _ in procs), key=lambda r: r[0])
    results = []
    for rank, arrays in received:
        out, grad, weight_grad, bias_grad, running_mean, running_var = map(torch.from_numpy, arrays)
        results.append((rank, out, grad, [weight_grad, bias_grad], running_mean, running_var))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    ref = nn.BatchNorm2d(3, momentum=0.5)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        ref.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    xr = x.clone().requires_grad_()
    out = ref(xr)
    (torch.cat([(o * torch.arange(o.numel()).view_as(o).sin()) for o in out.chunk(world)]).sum()
     ).backward()
    torch.testing.assert_close(torch.cat([r[1] for r in results]), out.detach(),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r[2] for r in results]), xr.grad, rtol=1e-4, atol=1e-5)
    # Parameter gradients: each process holds its local share; their sum is the global gradient.
    for got, want in zip(results[0][3], [ref.weight.grad, ref.bias.grad]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for r in results:
        torch.testing.assert_close(r[4], ref.running_mean)
        torch.testing.assert_close(r[5], ref.running_var)


def test_convert_sync_batchnorm_keeps_parameters_and_state() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    weight = model[1].weight
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    assert (isinstance(converted[1], CPUSyncBatchNorm)
            and isinstance(converted[2][0], CPUSyncBatchNorm))
    assert converted[1].weight is weight
    assert converted.state_dict().keys() == state.keys()
    x = torch.randn(2, 3, 4, 4)
    # Without a process group it is plain BatchNorm.
    ref = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    ref.load_state_dict(state)
    torch.testing.assert_close(converted(x), ref(x))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_main(TINY + ["--iters", "4", "--out", str(straight), "--checkpoint-period", "2"])
    # The same 4-iteration run, interrupted after iteration 2, then resumed.
    train_main(TINY + ["--iters", "4", "--out", str(resumed), "--checkpoint-period", "2",
                       "--stop-after", "2"])
    assert load_checkpoint(resumed / "last.pt")["iteration"] == 2
    train_main(TINY + ["--iters", "4", "--out", str(resumed), "--checkpoint-period", "2",
                       "--resume"])
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(resumed / "last.pt")
    assert b["iteration"] == 4
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    losses_a = [m["loss"] for m in _metrics(straight) if "loss" in m]
    losses_b = [m["loss"] for m in _metrics(resumed) if "loss" in m]
    assert losses_b == pytest.approx(losses_a, rel=1e-4)
    # The logged lr is the one each step used in the group that trains at --lr (1e-4), not the
    # backbone's (0.1x) nor the next step's; after the resume too (it once stayed at the
    # resumed step's lr: the optimizer's state load replaces its group dicts).
    expected = pytest.approx([1e-4 * cosine_factor(i, 4, 0.0) for i in range(4)])
    assert [m["lr"] for m in _metrics(straight) if "loss" in m] == expected
    assert [m["lr"] for m in _metrics(resumed) if "loss" in m] == expected


def test_rng_state_round_trip_and_older_checkpoints() -> None:
    cpu = torch.device("cpu")
    saved = _rng_state(cpu)
    expected = torch.rand(3)
    for state in (saved, saved["cpu"]):  # the current format, and the bare CPU state of old ones
        _set_rng_state(state, cpu)
        assert torch.equal(torch.rand(3), expected)
    # A CPU checkpoint resumed on CUDA: the CPU stream continues, and the user is told that the
    # device stream cannot (nothing CUDA is touched on this path).
    with pytest.warns(UserWarning, match="no CUDA random state"):
        _set_rng_state(saved, torch.device("cuda"))
    assert torch.equal(torch.rand(3), expected)


def test_train_bad_arguments(capsys) -> None:
    """Usage errors naming the option, before anything is built (a bad --data was a ValueError
    from deep in the dataset code, and a folder dataset without --crop asked for --crop first
    even when --data itself was wrong)."""
    for argv, message in [
        (["--iters", "0"], "--iters: expected an int >= 1, got 0"),
        (["--batch", "1"], "--batch: expected at least 2 images per iteration in all"),
        (["--clip", "-1"], "--clip: expected a number > 0, got -1.0"),
        (["--clip", "0"], "--clip: expected a number > 0, got 0.0"),
        (["--backbone-multiplier", "-1"], "--backbone-multiplier: expected a number >= 0"),
        (["--eval-images", "0"], "--eval-images: expected an int >= 1, got 0"),
        (["--synthetic-size", "-1"], "--synthetic-size: expected an int >= 2, got -1"),
        (["--backend", "gpu"], "argument --backend: invalid choice: 'gpu'"),
        (["--crop", "12by3"], "--crop"),
        (["--data", "imagenet:/x"],
         "--data: expected 'synthetic', 'cityscapes:ROOT' or 'ade20k:ROOT'"),
        (["--data", "ade20k"], "--data: 'ade20k' needs a root folder"),
        (["--data", "synthetic:/x"], "--data: 'synthetic' takes no root"),
        (["--data", "cityscapes:/x"], "--crop: required for folder datasets"),
    ]:
        with pytest.raises(SystemExit):
            train_main(argv)
        assert message in capsys.readouterr().err, argv


def test_periodic_evaluation_scores_eval_images(monkeypatch) -> None:
    """--eval-images bounds every periodic evaluation, also on a folder dataset (it was only the
    size of the synthetic validation set: Cityscapes scored all 500 images each time)."""
    import pem.evaluate
    from pem.train import _evaluate, parse_args

    seen = {}

    class Result:
        def summary(self):
            return {"mIoU": 1.0}

    def fake_evaluate(model, dataset, task, device, **kwargs):
        seen.update(kwargs)
        return Result()

    monkeypatch.setattr(pem.evaluate, "evaluate", fake_evaluate)
    args = parse_args(["--data", "ade20k:/data", "--crop", "64x64", "--eval-images", "3"])
    assert _evaluate(nn.Identity(), None, args, torch.device("cpu")) == {"mIoU": 1.0}
    assert seen["max_images"] == 3


def test_torchrun_ddp_two_processes_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pem.train", *TINY, "--iters", "2", "--out", str(out), "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = _metrics(out)
    assert records[0]["world_size"] == 2
    assert [m["iteration"] for m in records if "loss" in m] == [1, 2]
    state = load_checkpoint(out / "last.pt")
    assert state["iteration"] == 2 and len(state["rng"]) == 2
    # Parameters were updated (the run trained) and the SyncBN state loads into a plain model.
    model = PEM(**state["model_config"], backend="reference")
    model.load_state_dict(state["model"])
    fresh = PEM(**state["model_config"], backend="reference").state_dict()
    assert any(not torch.equal(fresh[k], v)
               for k, v in state["model"].items() if v.is_floating_point())


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_train_with_amp_on_cpu(tmp_path: Path, amp: str) -> None:
    # The mixed-precision path of the GPU recipe (autocast; for fp16 also the GradScaler's
    # unscale / clip / step), run here with CPU autocast. The fused ops meet fp32 weights and
    # low-precision activations, as the official DCN does.
    out = tmp_path / amp
    train_main(TINY + ["--iters", "2", "--out", str(out), "--amp", amp])
    losses = [m["loss"] for m in _metrics(out) if "loss" in m]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    state = load_checkpoint(out / "last.pt")
    if amp == "fp16":
        # fp16 gradients overflow at the initial scale 2^16: the scaler skips and backs off.
        assert state["scaler"]["scale"] <= 2.0**16
    assert all(v.dtype != torch.bfloat16 and v.dtype != torch.float16
               for v in state["model"].values() if v.is_floating_point())


@requires_cuda
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_train_on_cuda_with_fp16_amp_and_resume(tmp_path: Path, backend: str) -> None:
    """The GPU recipe (fp16 autocast with the GradScaler, the default on CUDA) on the reference and
    on the fused Triton ops: finite losses, trained parameters, an exact resume."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = TINY + ["--device", "cuda", "--backend", backend, "--iters", "4",
                   "--checkpoint-period", "2"]
    train_main(args + ["--out", str(straight)])
    losses = [m["loss"] for m in _metrics(straight) if "loss" in m]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    state = load_checkpoint(straight / "last.pt")
    assert state["scaler"]["scale"] > 0
    fresh = PEM(**state["model_config"], backend="reference").state_dict()
    assert any(not torch.equal(fresh[k], v.cpu()) for k, v in state["model"].items()
               if v.is_floating_point())
    train_main(args + ["--out", str(resumed), "--stop-after", "2"])
    train_main(args + ["--out", str(resumed), "--resume"])
    resumed_losses = [m["loss"] for m in _metrics(resumed) if "loss" in m]
    # Same kernels, same order: the resumed run repeats the uninterrupted one (up to atomics in
    # cuDNN/cuBLAS algorithm choice, hence a tolerance).
    assert resumed_losses == pytest.approx(losses, rel=1e-3)


@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="needs 2 GPUs: with one process there is no process group (no NCCL, DDP or SyncBN), "
    "and NCCL refuses two ranks on one GPU",
)
def test_torchrun_on_cuda_uses_nccl_and_sync_batchnorm(tmp_path: Path) -> None:
    """torchrun with one process per GPU (NCCL, torch's SyncBatchNorm, DDP with device_ids)."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(torch.cuda.device_count()), "-m", "pem.train", *TINY, "--iters", "2",
           "--out", str(out), "--device", "cuda"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = _metrics(out)
    assert records[0]["world_size"] == torch.cuda.device_count()
    assert [m["iteration"] for m in records if "loss" in m] == [1, 2]
    assert all(math.isfinite(m["loss"]) for m in records if "loss" in m)


def test_batch_counts_the_processes_of_torchrun(monkeypatch, capsys) -> None:
    """--batch 1 needs a second process (WORLD_SIZE, as torchrun sets it); an empty WORLD_SIZE
    is one process, a malformed one a usage error, not a traceback."""
    from pem.train import parse_args

    monkeypatch.setenv("WORLD_SIZE", "")
    with pytest.raises(SystemExit):
        parse_args(["--batch", "1"])
    assert parse_args(["--batch", "2"]).batch == 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parse_args(["--batch", "1"]).batch == 1
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(SystemExit):
        parse_args(["--batch", "2"])
    assert "WORLD_SIZE: expected the number of processes, got 'two'" in capsys.readouterr().err
