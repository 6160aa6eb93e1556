"""Distributed training: the launcher and the few collective helpers the scripts use.

``launch(train, cfg)`` runs ``train(cfg)`` in every process: under ``torchrun`` (one or several nodes: its
rendezvous sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), under ``srun`` (from SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID; export MASTER_ADDR in the batch script), in ``dist.nproc: N`` spawned local
processes, or in this one. NCCL on CUDA, Gloo on CPU. Models are built from ``seed`` on every rank; each rank's
augmentations draw from ``rank_seed(seed)``; the data order is the seeded sampler's, the same for any number of
ranks (``common.loaders``). ``all_gather_grad`` concatenates a tensor over ranks and keeps the gradient path, so
a loss over batch statistics (uniformity, covariance, centre vector) sees the global batch and, with DDP's
gradient averaging, has the one-process gradient (the gather's backward sums the ranks' gradients).

A ``UserError`` anywhere is one line (``error: ...``) and exit status 2; a ``Stopped`` run prints its line and
exits with its code. Collectives time out after ``dist.timeout_min`` minutes (no rank waits forever on a dead
peer); the spawning launcher names the rank that failed. Decisions that stop a run use ``agree`` / ``any_rank``
(over a Gloo group, also under NCCL: no GPU sync), so that every rank takes the same one.

``launch`` (only a script's ``__main__`` calls it, not an import) makes stdout and stderr line-buffered (each
line reaches a SLURM log when printed) and, for a CPU run, sets glibc's allocator to keep freed memory
(``keep_freed_memory``).
"""
import contextlib
import ctypes
import datetime
import gc
import os
import random
import signal
import socket
import sys
import threading

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

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


class Stopped(Exception):
    """The run stopped early on request (a signal, ``checkpoint.stop_after_step``, nothing left to do) after
    saving its work: ``_run`` prints ``message`` on rank 0 and exits with ``code``."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


GRACE_S = 5     # seconds the other ranks get to exit on their own after one rank exits with an error
_CONTROL = []  # the Gloo group of agree / any_rank (the default group unless that is NCCL)
_ON_EXIT = []  # functions to call when train() returns or raises (lock release, signal handlers)


def on_exit(fn):
    """Call ``fn()`` when this process's ``train()`` ends, however it ends (last registered, first called)."""
    _ON_EXIT.append(fn)


def _control():
    return _CONTROL[0] if _CONTROL else None


def agree(fn):
    """Run ``fn()`` on rank 0 alone; every rank returns its (picklable) result, or raises the same ``UserError``."""
    out, msg = None, None
    if is_main():
        try:
            out = fn()
        except UserError as e:
            msg = str(e)
    if world_size() > 1:
        box = [(out, msg)]
        dist.broadcast_object_list(box, src=0, group=_control())
        out, msg = box[0]
    if msg is not None:
        raise UserError(msg)
    return out


def any_rank(flag):
    """True on every rank if ``flag`` is true on any rank (a CPU all-reduce: no device sync)."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([int(bool(flag))])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control())
    return bool(t.item())


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
    tensors in afresh (the kernel zeroes every page): in common.tools.benchmark's step timings of the six scripts
    (ResNet-18, batch 64, 2 cores) 11.9M page faults, against 0.4M with these settings and 1-14% shorter
    steps (``python -m common.tools.benchmark``). Returns whether glibc took the settings.

    This changes the allocator of the whole process, for good: ``launch`` calls it for the scripts' CPU runs
    (and ``python -m common.tools.benchmark`` for its own), never an import or ``device``."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl, Windows): its allocator as it is
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def rank_seed(seed):
    """The seed of this rank's own random streams (the training views, the paper probe's crops): ``seed + 1000 *
    rank``, so that no two ranks draw the same augmentations. (The models' initial weights use ``seed`` itself, the
    same on every rank.)"""
    return seed + 1000 * rank()


class _AllGather(torch.autograd.Function):
    """Forward: concatenate every rank's ``x``. Backward: sum the gradients of all ranks, keep ours.

    Our own, not ``torch.distributed.nn.functional.all_gather``: that module is deprecated since torch 2.14 (a
    FutureWarning at every call), and its replacement, ``_functional_collectives.all_gather_tensor_autograd``,
    aborts the process on Gloo (torch 2.14.1)."""

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


def all_gather_grad(x):
    """Concatenate ``x`` (same shape on every rank) over ranks along dim 0, keeping gradients."""
    return x if world_size() == 1 else _AllGather.apply(x)


def all_reduce_grad(x):
    """Sum ``x`` over ranks, keeping gradients: the sum of the gathered copies (the gather's backward sums the
    ranks' gradients, which is the gradient of a sum over ranks)."""
    return x if world_size() == 1 else all_gather_grad(x[None]).sum(0)


def all_reduce_sum(x):
    """Sum a (detached) tensor over ranks (a copy; ``x`` is left alone)."""
    if world_size() > 1:
        x = x.detach().clone()
        dist.all_reduce(x)
    return x


def all_reduce_mean(x):
    """Average a (detached) tensor over ranks, for logging."""
    return all_reduce_sum(x) / world_size()


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
    Under autocast (bf16/fp16 input) the statistics and the normalisation are computed in
    float32, as BatchNorm's own kernels do; the output has the input's dtype.
    """

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x):
        if not (self.training and world_size() > 1):
            return super().forward(x)
        dtype, x = x.dtype, x.float()
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
        return y.to(dtype)


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


def sync_bn(module, cfg):
    """``module`` with every BatchNorm synchronised over the processes (statistics over the global batch: torch's
    SyncBatchNorm on CUDA, ``GlooSyncBatchNorm`` on the CPU) when several train and ``model.sync_bn``; else
    ``module`` itself. A BatchNorm that is not synchronised needs 2 or more images per process: a smaller
    ``optim.batch_size`` is one ``UserError``."""
    synced = world_size() > 1 and cfg.model.sync_bn
    local = cfg.optim.batch_size // world_size()
    if local < 2 and not synced and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        raise UserError(f"optim.batch_size={cfg.optim.batch_size} gives each of the {world_size()} processes {local} "
                        f"image per step, and BatchNorm needs 2 or more: set optim.batch_size={2 * world_size()} or "
                        "more" + (" (or model.sync_bn=true)" if world_size() > 1 else ""))
    return convert_sync_bn(module, not _on_cpu(cfg)) if synced else module


def no_sync(model, unless=False):
    """DDP's ``model.no_sync()`` (the backward keeps its gradients local: no all-reduce) unless ``unless`` (the
    last forward of an accumulation group, whose backward all-reduces the group's summed gradients); a null
    context on one process."""
    return contextlib.nullcontext() if unless or world_size() == 1 else model.no_sync()


def ddp(module, device):
    """Wrap in DistributedDataParallel when more than one process runs (no-op otherwise)."""
    if world_size() == 1:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def unwrap(module):
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(cfg):
    """Join the process group (``dist.timeout_min`` for every collective) and make the control group."""
    backend = cfg.dist.backend
    if backend == "auto":
        backend = "nccl" if cfg.device != "cpu" and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = datetime.timedelta(minutes=cfg.dist.timeout_min)
    dist.init_process_group(backend, timeout=timeout)
    _CONTROL[:] = [dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None]


def _on_cpu(cfg):
    return cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())


def one_line(e):
    """The line of a ``UserError`` ``e``. One raised in a DataLoader worker reaches this process re-raised with the
    worker's traceback as its message ("Caught UserError in DataLoader worker process 0. Original Traceback ...");
    its last line is the worker's ``UserError: <message>``: the message."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    name, sep, message = last.partition(": ")
    return message if sep and name.rpartition(".")[2] == "UserError" else last


def _run(train, cfg):
    """Run ``train(cfg)`` in this process: a UserError is one line and exit status 2, a Stopped run its line
    and code. A CPU run keeps freed memory (``keep_freed_memory``): this process is a script's own run."""
    for stream in (sys.stdout, sys.stderr):  # every line into a log file when printed (SLURM), not at exit
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    if _on_cpu(cfg):
        keep_freed_memory()
    code, msg = 0, None
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            _init(cfg)
        return train(cfg)
    except UserError as e:
        code, msg = 2, f"error: {one_line(e)}"
    except Stopped as e:
        code, msg = e.code, str(e)
    finally:
        while _ON_EXIT:
            _ON_EXIT.pop()()
        if dist.is_initialized():
            dist.destroy_process_group()
        _CONTROL.clear()
        if msg and os.environ.get("RANK", "0") == "0":
            print(msg, file=sys.stderr if code else sys.stdout, flush=True)
    sys.stdout.flush()
    if code:
        sys.exit(code)


def _spawned(local_rank, train, cfg, nproc, port):
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ONEFILE_SPAWNED="1")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the launcher, which sends us SIGTERM
    tqdm.set_lock(threading.RLock())  # not tqdm's default multiprocessing lock: os._exit below would leak it
    try:  # Linux: SIGTERM (checkpoint, then exit) if the launcher dies
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    code = 0
    try:
        _run(train, cfg)
    except SystemExit as e:
        code = e.code or 0
    # Done: every file is written and closed. Skip the interpreter's teardown: after the process group is
    # destroyed, a Gloo process now and then aborts there (SIGABRT, "terminate called without an active
    # exception"; ~1 in 15 of our 2-process unit tests), which would report a finished run as failed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
    ctx = torch.multiprocessing.start_processes(_spawned, args=(train, cfg, cfg.dist.nproc, _free_port()),
                                                nprocs=cfg.dist.nproc, join=False, start_method="spawn")
    procs = ctx.processes  # forward's own reference: it may still run after `del ctx` below (a late signal)

    def forward(signum, frame):  # Ctrl-C, SIGTERM, SIGUSR1 to the launcher: every rank stops at the same step
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM if signum == signal.SIGINT else signum)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, forward)
    code, msg = 0, None
    try:
        while not ctx.join(grace_period=GRACE_S):  # after a rank fails, the others get GRACE_S s, then SIGTERM
            pass
    except torch.multiprocessing.ProcessExitedException as e:  # the others have ended by then
        code = e.exit_code if e.exit_code and e.exit_code > 0 else 1
        if code not in (2, 3):  # 2: a UserError, 3: a stop (rank 0 printed its line)
            msg = f"error: process {e.error_index} (rank {e.error_index}) exited with code {e.exit_code}"
    except torch.multiprocessing.ProcessRaisedException as e:
        last = [line for line in str(e).strip().splitlines() if line.strip()][-1]
        code, msg = 1, f"error: process {e.error_index} (rank {e.error_index}) failed: {last}"
    del ctx  # release the queues' semaphores now (else the resource tracker warns at exit)
    gc.collect()
    if msg:
        print(msg, file=sys.stderr, flush=True)
    if code:
        sys.exit(code)
