"""Distributed training: the launcher and the few collective helpers the scripts use.

``launch(train, cfg)`` runs ``train(cfg)`` in every process:

- ``torchrun --nproc_per_node=N script.py ...`` (single or multi node: torchrun's
  rendezvous sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT);
- ``srun python script.py ...`` under SLURM (read from ``SLURM_PROCID``,
  ``SLURM_NTASKS``, ``SLURM_LOCALID``; MASTER_ADDR must be exported in the batch
  script, e.g. the first host of ``scontrol show hostnames``);
- ``dist.nproc: N`` spawns N local processes (``torch.multiprocessing``);
- otherwise one process, no process group.

NCCL on CUDA, Gloo on CPU. Each rank seeds ``seed + rank`` for its data and
augmentation randomness; models are built from the same seed on every rank and
DDP broadcasts rank 0's weights anyway. ``all_gather_grad`` concatenates a
tensor over ranks and keeps the gradient path, so a loss over batch statistics
(uniformity, covariance, centre vector) sees the global batch; with DDP's
gradient averaging the result equals the one-process gradient (each rank's
loss computes the same global term; the gather's backward sums the ranks'
gradients; DDP divides by the world size).

A ``UserError`` anywhere is printed as one line (``error: ...``) and the
process exits with status 2.

Process-wide settings belong to the scripts' own runs, not to importing ``common``: ``launch`` (which only
a script's ``__main__`` calls) makes stdout and stderr line-buffered, so every line reaches a SLURM log
file when it is printed, and, for a run on the CPU, sets glibc's allocator to keep freed memory
(``keep_freed_memory``, a ``mallopt`` for the whole process). A program that imports ``common`` and calls
``device`` or ``train`` itself keeps its own allocator and buffering.
"""
import ctypes
import os
import random
import socket
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from common.config import UserError


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def device(cfg):
    """The training device of this process: ``cuda:LOCAL_RANK`` or ``cpu``. No process-wide side effect on the
    CPU: the allocator setting (``keep_freed_memory``) is made by ``launch``, for the scripts' runs only."""
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("device: cuda was asked for but no CUDA GPU is visible; set device=cpu")
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def keep_freed_memory():
    """Training on CPU with glibc: keep freed memory in the process for reuse instead of returning it to the
    system (``mallopt``: no mmap'ed blocks, no trimming), as the CUDA caching allocator does on a GPU; the
    process keeps its peak memory until it exits. With glibc's defaults each step page-faults its large
    tensors in afresh (the kernel zeroes every page): in common.benchmark's step timings of the six scripts
    (ResNet-18, batch 64, 2 cores) 11.9M page faults, against 0.4M with these settings and 1-14% shorter
    steps (README, Speed). Returns whether glibc took the settings.

    This changes the allocator of the whole process, for good: ``launch`` calls it for the scripts' CPU runs
    (and ``python -m common.benchmark`` for its own), never an import or ``device``."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl, Windows): its allocator as it is
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


class _AllGather(torch.autograd.Function):
    """Forward: concatenate every rank's ``x``. Backward: sum the gradients of all ranks, keep ours."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.chunk(world_size())[rank()]


class _AllReduce(torch.autograd.Function):
    """Differentiable sum over ranks (the gradient of a sum is the sum of the ranks' gradients)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_gather_grad(x):
    """Concatenate ``x`` (same shape on every rank) over ranks along dim 0, keeping gradients."""
    return x if world_size() == 1 else _AllGather.apply(x)


def all_reduce_grad(x):
    """Sum ``x`` over ranks, keeping gradients."""
    return x if world_size() == 1 else _AllReduce.apply(x)


def all_reduce_mean(x):
    """Average a (detached) tensor over ranks, for logging."""
    if world_size() > 1:
        x = x.detach().clone()
        dist.all_reduce(x)
        x /= world_size()
    return x


def all_reduce_sum(x):
    """Sum a (detached) tensor over ranks (a copy; ``x`` is left alone)."""
    if world_size() > 1:
        x = x.detach().clone()
        dist.all_reduce(x)
    return x


def all_gather_uneven(x):
    """Every rank's ``x`` (no gradients), as a list in rank order; the ranks' sizes may differ in dim 0.

    Same dtype and number of dims on every rank; a rank with no rows may pass any trailing shape (an empty
    rank's features ``[0, 0]``): it receives those of the ranks with rows.
    """
    if world_size() == 1:
        return [x]
    shape = torch.tensor(x.shape, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size())]
    dist.all_gather(shapes, shape)
    shapes = [s.tolist() for s in shapes]
    rows = [s[0] for s in shapes]
    trailing = next((s[1:] for s in shapes if s[0]), list(x.shape[1:]))
    buf = x.new_zeros((max(rows), *trailing))
    if len(x):
        buf[:len(x)] = x
    out = [torch.empty_like(buf) for _ in range(world_size())]
    dist.all_gather(out, buf)
    return [o[:n] for o, n in zip(out, rows)]


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm for CPU/Gloo (torch's runs on GPUs only): batch statistics over all ranks.

    Two differentiable all-reduces (mean, then centred second moment), so gradients
    flow through the global statistics exactly as in one process with the whole batch.
    """

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x):
        if not (self.training and world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        n = torch.tensor(x.numel() // x.shape[1], dtype=x.dtype, device=x.device)
        n = all_reduce_grad(n)
        mean = all_reduce_grad(x.sum(dims)) / n
        var = all_reduce_grad(((x - mean.view(shape)) ** 2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1), m)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_bn(module, on_cuda):
    """Replace every BatchNorm by a synchronised one (torch's on CUDA, ``GlooSyncBatchNorm`` on CPU)."""
    if on_cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
        out = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        out.load_state_dict(module.state_dict())
    for name, child in module.named_children():
        out.add_module(name, convert_sync_bn(child, on_cuda))
    return out


def ddp(module, device):
    """Wrap in DistributedDataParallel when more than one process runs (no-op otherwise)."""
    if world_size() == 1:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def unwrap(module):
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def sampler(dataset, shuffle, seed, drop_last=True):
    """Sampler giving this rank its share of each (seeded, per-epoch) permutation.

    With the same seed the global batch of step t is the same set of images for any
    number of ranks (rank r takes positions r, r+W, ... of the permutation).
    """
    return torch.utils.data.DistributedSampler(dataset, num_replicas=world_size(), rank=rank(),
                                               shuffle=shuffle, seed=seed, drop_last=drop_last)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_cpu(cfg):
    return cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())


def _run(train, cfg):
    """Run ``train(cfg)`` in this process, turning a UserError into one line and exit status 2. A CPU run keeps
    freed memory (``keep_freed_memory``): this process is a script's own run."""
    for stream in (sys.stdout, sys.stderr):  # every line into a log file when printed (SLURM), not at exit
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    if _on_cpu(cfg):
        keep_freed_memory()
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            backend = cfg.dist.backend
            if backend == "auto":
                backend = "nccl" if cfg.device != "cpu" and torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend)
        return train(cfg)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0" or not dist.is_initialized():
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawned(local_rank, train, cfg, nproc, port):
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _run(train, cfg)
    # Done: every file is written and closed. Skip the interpreter's teardown: after the process group is
    # destroyed, a Gloo process now and then aborts there (SIGABRT, "terminate called without an active
    # exception"; ~1 in 15 of our 2-process unit tests), which would report a finished run as failed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(train, cfg):
    """Start ``train(cfg)`` on one process, under torchrun/srun, or on ``cfg.dist.nproc`` local processes.

    For the scripts' ``__main__`` only: each process it runs ``train`` in gets line-buffered stdout/stderr
    and, on the CPU, glibc's keep-freed-memory allocator setting (module docstring)."""
    env = os.environ
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "RANK" not in env:
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"],
                   LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
        env.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in env:
            print("error: under srun, export MASTER_ADDR (e.g. the first host of `scontrol show hostnames "
                  "$SLURM_JOB_NODELIST`) before launching", file=sys.stderr)
            sys.exit(2)
    if "RANK" in env or cfg.dist.nproc <= 1:
        return _run(train, cfg)
    try:
        torch.multiprocessing.spawn(_spawned, args=(train, cfg, cfg.dist.nproc, _free_port()),
                                    nprocs=cfg.dist.nproc)
    except torch.multiprocessing.ProcessExitedException as e:
        sys.exit(e.exit_code if e.exit_code and e.exit_code > 0 else 1)
