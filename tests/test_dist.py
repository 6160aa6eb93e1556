"""common.dist on 2 CPU processes (Gloo): differentiable gather/reduce, Gloo SyncBN, sampler split."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gloo import on_processes

from common import dist as cd
from common.evaluate import uniformity


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 3))


def _loss(model, x, gather):
    z = model(x)
    return (z ** 2).mean() + uniformity(gather(z))  # a local term + a term over the global batch


def _step(rank, world, x):
    n = len(x) // world
    model = torch.nn.parallel.DistributedDataParallel(cd.convert_sync_bn(_net(), on_cuda=False))
    loss = _loss(model, x[rank * n:(rank + 1) * n], cd.all_gather_grad)
    loss.backward()
    mean_loss = cd.all_reduce_mean(loss)  # what the scripts log
    return {"loss": mean_loss, "grads": [p.grad for p in model.parameters()],
            "running_mean": model.module[1].running_mean}


def test_ddp_gloo_syncbn_and_global_batch_loss_equal_one_process():
    x = torch.randn(16, 4)
    got = on_processes(_step, x)[0]
    ref = _net()
    loss = _loss(ref, x, lambda z: z)
    loss.backward()
    assert abs(got["loss"].item() - loss.item()) < 1e-5  # the global term sees all 16 samples
    for g, p in zip(got["grads"], ref.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["running_mean"], ref[1].running_mean, rtol=1e-5, atol=1e-7)
    assert isinstance(cd.convert_sync_bn(_net(), on_cuda=False)[1], cd.GlooSyncBatchNorm)


def _agree(rank, world):
    calls = []
    got = cd.agree(lambda: calls.append(rank) or {"rank": cd.rank(), "eig": [1.5, -2.0]})
    try:
        cd.agree(lambda: (_ for _ in ()).throw(cd.UserError("the disk is full")))
        err = None
    except cd.UserError as e:
        err = str(e)
    return calls, got, err


def test_agree_runs_on_rank_0_alone_and_every_rank_gets_its_result_or_its_error():
    """``agree``: decorr's Fig. 4 eigenvalues (minutes at 8192 x 8192) and the checkpoint writes run on rank 0
    only; every rank returns rank 0's result, or raises rank 0's UserError."""
    for rank, (calls, got, err) in enumerate(on_processes(_agree)):
        assert calls == ([0] if rank == 0 else [])
        assert got == {"rank": 0, "eig": [1.5, -2.0]} and err == "the disk is full"


def test_single_process_helpers_are_identities():
    z = torch.randn(3, 2, requires_grad=True)
    assert cd.all_gather_grad(z) is z and cd.all_reduce_grad(z) is z
    assert cd.world_size() == 1 and cd.rank() == 0 and cd.is_main()


def test_global_batch_and_resumed_epoch_are_the_same_for_any_number_of_ranks():
    """loaders.ResumableSampler (the training sampler): the global batch of each step is the same set of images on
    1 and 2 ranks, and skipping the batches a checkpoint consumed leaves each rank exactly its remaining ones."""
    from common.loaders import ResumableSampler
    ds = list(range(40))
    one = ResumableSampler(ds, 8, num_replicas=1, rank=0, seed=3, drop_last=True)
    two = [ResumableSampler(ds, 4, num_replicas=2, rank=r, seed=3, drop_last=True) for r in (0, 1)]
    for s in (one, *two):
        s.set_epoch(1)
    full = [list(one), *map(list, two)]
    for step in range(40 // 8):  # global batch 8 = 2 ranks x 4
        glob = set(full[0][step * 8:(step + 1) * 8])
        assert glob == set(full[1][step * 4:(step + 1) * 4]) | set(full[2][step * 4:(step + 1) * 4])
    for s, seen, b in ((one, full[0], 8), (two[0], full[1], 4), (two[1], full[2], 4)):
        s.skip_batches = 3
        assert list(s) == seen[3 * b:] and len(s) == len(seen) - 3 * b


FAULTS = """
import resource, sys, torch
sys.path.insert(0, {root!r})
import common.augment, common.checkpoint, common.data, common.evaluate, common.loaders, common.log, common.models
from common import dist
from common.config import Cfg


def faults(n=20):  # minor page faults of 20 steps that allocate and free 36 MB + 16 MB + 4 MB
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        a, b, c = torch.ones(3000, 3000), torch.ones(2048, 2048), torch.ones(1024, 1024)
        del a, b, c
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0


def train(cfg):  # what a script's train() sees once dist.launch has started it
    faults(5)  # the heap settles in 3 steps
    print("launched", faults())


faults(2)
cfg = Cfg.wrap({{"device": "cpu", "dist": {{"nproc": 1, "backend": "auto"}}}})
on_cpu = dist.device(cfg).type == "cpu"
faults(5)
print("imported", on_cpu and faults())  # importing common and calling dist.device: the program's own allocator
dist.launch(train, cfg)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_in_script_runs_only():
    """The allocator setting is the scripts' (``dist.launch``), not an import's: a program that imports every
    common module and calls ``dist.device`` on the CPU keeps glibc's defaults (which mmap the 36 MB tensor
    afresh at every step: 20 x 8,790 page faults at least); once ``dist.launch`` runs ``train`` on the CPU,
    20 steps that allocate and free tensors of 4-36 MB fault fewer pages in than one 16 MB tensor has."""
    root = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    out = subprocess.run([sys.executable, "-c", FAULTS.format(root=root)], capture_output=True, text=True, check=True,
                         env=env)
    got = dict(line.split() for line in out.stdout.splitlines())
    assert int(got["imported"]) >= 20 * 8790 and int(got["launched"]) < 4096, out.stdout


LINES = """
import os, sys
sys.path.insert(0, {root!r})
from common import dist
from common.config import Cfg


def train(cfg):
    print("epoch 1 knn200 12.5")  # a plain print, stdout a pipe (as a file under SLURM)
    os._exit(0)  # no flush at exit: only what was flushed when printed arrives


dist.launch(train, Cfg.wrap({{"device": "cpu", "dist": {{"nproc": 1, "backend": "auto"}}}}))
"""


def test_launched_run_flushes_each_line_into_a_pipe():
    root = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "PYTHONUNBUFFERED")}
    out = subprocess.run([sys.executable, "-c", LINES.format(root=root)], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout == "epoch 1 knn200 12.5\n", out


def _bf16_syncbn(rank, world, x):
    bn = cd.convert_sync_bn(torch.nn.BatchNorm1d(4), on_cuda=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bn(x[rank::world].bfloat16())
    return {"y": y.detach(), "running_mean": bn.running_mean, "dtype": str(y.dtype)}


def test_gloo_syncbn_under_bf16_autocast_keeps_float32_statistics():
    """torchrun with precision=bf16 on CPU: the synchronised BN computes its statistics in float32 (its running
    statistics stay float32, as one process's BatchNorm), and returns the input's dtype."""
    x = torch.randn(16, 4) * 3 + 1
    ranks = on_processes(_bf16_syncbn, x)
    ref = torch.nn.BatchNorm1d(4)
    ref(x.bfloat16().float())
    for r, got in enumerate(ranks):
        assert got["dtype"] == "torch.bfloat16" and got["running_mean"].dtype == torch.float32
        torch.testing.assert_close(got["running_mean"], ref.running_mean, rtol=1e-5, atol=1e-6)
        want = torch.nn.functional.batch_norm(x.bfloat16().float(), None, None, training=True)[r::2]
        torch.testing.assert_close(got["y"].float(), want, rtol=2e-2, atol=2e-2)
